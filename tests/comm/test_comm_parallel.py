"""The PettingZoo ParallelEnv versions of the grid worlds: PettingZoo's own API and seed tests,
and the batched training environments stepped side by side with them."""

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from gatelab.comm.envs import PredatorCapturePrey, PredatorPrey
from gatelab.comm.envs.parallel import PredatorCapturePreyEnv, PredatorPreyEnv

PAIRS = [(PredatorPreyEnv, PredatorPrey), (PredatorCapturePreyEnv, PredatorCapturePrey)]


@pytest.mark.parametrize("cls", [PredatorPreyEnv, PredatorCapturePreyEnv])
def test_pettingzoo_api_and_seed_tests(cls):
    parallel_api_test(cls(n_agents=4, grid=5, episode_limit=30), num_cycles=60)
    parallel_seed_test(lambda: cls(n_agents=4, grid=5, episode_limit=30), num_cycles=60)
    env = cls(n_agents=3, grid=4)
    assert env.observation_space(env.possible_agents[0]).shape == (env.obs_dim,)


@pytest.mark.parametrize(("single", "batched"), PAIRS)
def test_same_dynamics_as_the_batched_environment(single, batched):
    # environment 0 of the batch and the ParallelEnv, same seed and actions: same everything
    a, grid, limit = 3, 3, 40
    env, batch = single(a, grid, 1, limit), batched(6, a, grid, 1, limit)
    ends = set()
    for seed in range(30):
        rng = np.random.default_rng(seed)
        obs, infos = env.reset(seed=seed)
        batch_obs = batch.reset(seed)
        while True:
            stacked = np.stack([obs[n] for n in env.possible_agents])
            np.testing.assert_array_equal(stacked, batch_obs[0])
            if not env.agents:
                break
            assert [infos[n]["acting"] for n in env.possible_agents] == batch.acting()[0].tolist()
            acts = rng.integers(0, batch.n_actions, (6, a))
            if batched is PredatorCapturePrey:  # capture 30% of the time: some episodes succeed
                acts = np.where(rng.random((6, a)) < 0.3, 5, acts)
            obs, rewards, term, trunc, infos = env.step(
                {n: int(acts[0, i]) for i, n in enumerate(env.possible_agents)}
            )
            step = batch.step(acts)
            batch_obs = step.obs
            mine = np.array([rewards[n] for n in env.possible_agents], dtype=np.float32)
            np.testing.assert_array_equal(mine, step.reward[0])  # the batch keeps float32
            assert all(term.values()) == bool(step.success[0])
            assert (all(term.values()) or all(trunc.values())) == bool(step.done[0])
        assert env.t == batch.t[0]
        ends.add("success" if batch.success[0] else "limit")
    assert ends == {"success", "limit"}  # both kinds of end were compared


def test_some_episodes_end_in_success_and_render():
    env = PredatorPreyEnv(n_agents=2, grid=3, episode_limit=40, render_mode="ansi")
    successes = 0
    for seed in range(20):
        env.reset(seed=seed)
        while env.agents:
            _, _, term, _, _ = env.step({n: env.action_space(n).sample() for n in env.agents})
        successes += all(term.values())
    assert 0 < successes < 20  # both ends happen: the test above sees terminations too
    text = env.render()
    assert len(text.splitlines()) == 3 and "P" in text or "*" in text


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_agents"):
        PredatorPreyEnv(n_agents=1)
    with pytest.raises(ValueError, match="render_mode"):
        PredatorPreyEnv(render_mode="human")
    with pytest.raises(ValueError, match="n_capture"):
        PredatorCapturePreyEnv(n_agents=3, n_capture=3)
    env = PredatorPreyEnv(n_agents=2, grid=3)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="missing"):
        env.step({"predator_0": 0})
    with pytest.raises(ValueError, match="predator_1"):
        env.step({"predator_0": 0, "predator_1": 7})
