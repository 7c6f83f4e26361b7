import numpy as np
import pytest

from gatelab.comm.envs import PredatorCapturePrey, PredatorPrey, make_env

UP, RIGHT, DOWN, LEFT, STAY, CAPTURE = range(6)


def hand_built(cls=PredatorPrey, **kw):
    env = cls(n_envs=1, n_agents=3, grid=5, vision=1, episode_limit=kw.pop("limit", 10), **kw)
    env.reset(0)
    env.pos[:] = [[[0, 0], [2, 1], [4, 4]]]
    env.prey[:] = [[2, 2]]
    env.reached[:] = False
    return env


def test_moves_and_clipping():
    env = hand_built()
    env.step(np.array([[UP, DOWN, RIGHT]]))
    assert env.pos[0].tolist() == [[0, 0], [3, 1], [4, 4]]  # up/right off the grid are clipped
    env.step(np.array([[LEFT, UP, UP]]))
    assert env.pos[0].tolist() == [[0, 0], [2, 1], [3, 4]]


def test_reward_reach_freeze_and_success():
    env = hand_built()
    step = env.step(np.array([[STAY, RIGHT, STAY]]))  # agent 1 reaches the prey at (2, 2)
    assert env.reached[0].tolist() == [False, True, False]
    np.testing.assert_allclose(step.reward[0], [-0.05, 0.0, -0.05])
    assert env.acting()[0].tolist() == [True, False, True]  # its next action will be ignored
    env.step(np.array([[STAY, LEFT, STAY]]))  # a predator on the prey is frozen
    assert env.pos[0, 1].tolist() == [2, 2]
    env.pos[0, 0] = [2, 3]
    env.pos[0, 2] = [3, 2]
    step = env.step(np.array([[LEFT, UP, UP]]))
    assert step.done[0] and step.success[0] and env.t[0] == 3
    np.testing.assert_allclose(step.reward[0], [0.0, 0.0, 0.0])
    after = env.step(np.array([[UP, UP, UP]]))  # a finished episode pays nothing and stays done
    np.testing.assert_allclose(after.reward, 0.0)
    assert after.done[0] and env.t[0] == 3
    assert not env.acting().any()  # nobody acts in a finished episode


def test_episode_limit_is_failure():
    env = hand_built(limit=2)
    env.step(np.array([[STAY, STAY, STAY]]))
    step = env.step(np.array([[STAY, STAY, STAY]]))
    assert step.done[0] and not step.success[0]
    assert step.reward.sum() == pytest.approx(-0.15)


def test_observation_window():
    env = hand_built()
    obs = env.observe()[0]  # (A, 4 + 27)
    assert obs.shape == (3, env.obs_dim) and env.obs_dim == 31
    np.testing.assert_allclose(obs[1, :2], [2 / 4, 1 / 4])
    window = obs[:, 4:].reshape(3, 9, 3)  # (A, W, [prey, others, outside]) row-major offsets
    assert window[1, 5, 0] == 1 and window[1, :, 0].sum() == 1  # prey at offset (0, +1)
    assert window[0, :, 0].sum() == 0  # agent 0 at (0, 0) cannot see (2, 2)
    outside = window[0, :, 2].reshape(3, 3)  # the corner: top row and left column are outside
    np.testing.assert_array_equal(outside, [[1, 1, 1], [1, 0, 0], [1, 0, 0]])
    env.pos[0, 0] = [2, 0]  # now agent 0 is beside agent 1
    window = env.observe()[0, :, 4:].reshape(3, 9, 3)
    assert window[0, 5, 1] == pytest.approx(1 / 3) and window[0, 4, 1] == 0  # self not counted


def test_reset_distinct_and_seeded():
    env = PredatorPrey(n_envs=50, n_agents=5, grid=3)
    a = env.reset(7)
    cells = np.concatenate([env.pos, env.prey[:, None]], 1)  # (B, A+1, 2)
    flat = cells[..., 0] * 3 + cells[..., 1]
    assert all(len(set(row)) == 6 for row in flat.tolist())
    np.testing.assert_array_equal(a, env.reset(7))
    assert not np.array_equal(a, env.reset(8))


def test_capture_rules():
    # HetNet's rules: perception agents 0 and 1 stay on the prey once there, capture agent 2
    # cannot leave the prey's cell, only capture; success is all three done
    env = hand_built(PredatorCapturePrey)  # n_capture = 1: agent 2 captures
    assert env.is_capture.tolist() == [False, False, True]
    obs = env.observe()[0]
    assert obs[2, 4:].sum() == 0 and obs[2, 3] == 1  # the capture agent is blind
    step = env.step(np.array([[STAY, STAY, CAPTURE]]))  # capture off the prey: nothing
    assert env.pos[0, 2].tolist() == [4, 4] and not env.reached[0].any()
    np.testing.assert_allclose(step.reward[0], [-0.05] * 3)
    env.pos[0, 2] = [2, 2]
    step = env.step(np.array([[STAY, RIGHT, UP]]))  # agent 1 arrives; agent 2 cannot leave
    assert env.reached[0].tolist() == [False, True, False] and not step.done[0]
    assert env.pos[0, 1:].tolist() == [[2, 2], [2, 2]]
    np.testing.assert_allclose(step.reward[0], [-0.05, 0.0, -0.05])
    assert env.acting()[0].tolist() == [True, False, True]  # agent 2's capture still counts
    step = env.step(np.array([[CAPTURE, LEFT, CAPTURE]]))
    assert env.reached[0].tolist() == [False, True, True] and not step.done[0]
    assert env.pos[0, :2].tolist() == [[0, 0], [2, 2]]  # capture is "stay"; agent 1 is frozen
    np.testing.assert_allclose(step.reward[0], [-0.05, 0.0, 0.0])
    env.pos[0, 0] = [2, 3]
    step = env.step(np.array([[LEFT, STAY, STAY]]))
    assert step.success[0] and step.done[0] and env.t[0] == 4
    np.testing.assert_allclose(step.reward[0], [0.0, 0.0, 0.0])


def test_bad_config_and_actions():
    with pytest.raises(ValueError, match="n_agents"):
        PredatorPrey(1, 1)
    with pytest.raises(ValueError, match="unknown env"):
        make_env("nope", 1, 3)
    env = hand_built()
    with pytest.raises(ValueError, match="actions"):
        env.step(np.array([[5, 0, 0]]))


def test_adapters_smoke():
    env = make_env("simple_spread", 2, 3, episode_limit=3)
    obs = env.reset(0)
    assert obs.shape == (2, 3, env.obs_dim) and env.n_actions == 5
    for _ in range(3):
        step = env.step(np.zeros((2, 3), dtype=int))
    assert step.done.all() and step.reward.shape == (2, 3)
    env.close()
    env = make_env("lbforaging", 2, 2, grid=5)
    assert env.reset(0).shape == (2, 2, env.obs_dim)
    step = env.step(np.zeros((2, 2), dtype=int))
    assert step.reward.shape == (2, 2)
    env.close()


FAKE = """
import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv


class Env(ParallelEnv):
    metadata = {"name": "fake"}

    def __init__(self, action="discrete", obs="box", leave_at=0, widths=(3, 3)):
        self.possible_agents = [f"a{i}" for i in range(len(widths))]
        self.leave_at, self.max_cycles = leave_at, 6
        act = spaces.Discrete(4) if action == "discrete" else spaces.Box(-1, 1, (2,))
        self._act = dict.fromkeys(self.possible_agents, act)
        if obs == "box":
            self._obs = {a: spaces.Box(0, 1, (w,)) for a, w in zip(self.possible_agents, widths)}
        else:
            self._obs = dict.fromkeys(self.possible_agents, spaces.Dict({"x": spaces.Discrete(2)}))

    def observation_space(self, agent):
        return self._obs[agent]

    def action_space(self, agent):
        return self._act[agent]

    def _see(self):
        return {a: np.full(self._obs[a].shape, self.t / 10, np.float32) for a in self.agents}

    def reset(self, seed=None, options=None):
        self.t, self.agents = 0, list(self.possible_agents)
        return self._see(), {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        done = {a: self.leave_at and self.t >= self.leave_at and a == "a0" for a in self.agents}
        obs, rew = self._see(), {a: float(actions[a]) for a in self.agents}
        self.agents = [a for a in self.agents if not done[a]]
        return obs, rew, done, dict.fromkeys(done, False), {a: {} for a in done}


def parallel_env(**kwargs):
    return Env(**kwargs)
"""


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    (tmp_path / "fake_pz_env.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fake_pz_env"


def test_any_pettingzoo_module_runs_through_the_adapter(fake_module):
    env = make_env(fake_module, 2, 2, env_kwargs={"widths": [3, 5]})
    assert (env.n_agents, env.n_actions, env.obs_dim, env.episode_limit) == (2, 4, 5, 6)
    obs = env.reset(0)
    np.testing.assert_array_equal(obs[0, 0], [0, 0, 0, 0, 0])  # the narrow agent: zero-padded
    step = env.step(np.array([[1, 2], [3, 0]]))
    np.testing.assert_allclose(step.reward, [[1, 2], [3, 0]])
    np.testing.assert_allclose(step.obs[:, 0, :3], 0.1) and np.testing.assert_allclose(
        step.obs[:, 0, 3:], 0.0
    )
    for _ in range(5):
        step = env.step(np.zeros((2, 2), dtype=int))
    assert step.done.all() and not step.success.any()  # max_cycles = 6: the episode limit


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "box"}, "needs discrete actions"),
        ({"obs": "dict"}, "needs array observations"),
        ({"widths": [3]}, "communication needs two"),
        ({"bogus": 1}, "parallel_env"),
    ],
)
def test_what_an_environment_lacks_is_named(fake_module, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env(fake_module, 1, 2, env_kwargs=kwargs)


def test_an_agent_leaving_is_a_fixed_agent_count_error(fake_module):
    env = make_env(fake_module, 1, 2, env_kwargs={"leave_at": 2})
    env.reset(0)
    env.step(np.zeros((1, 2), dtype=int))
    with pytest.raises(ValueError, match="'a0' left the episode at step 2.*fixed agent count"):
        env.step(np.zeros((1, 2), dtype=int))


def test_unknown_modules_are_named():
    with pytest.raises(ValueError, match="unknown env .no_such_pkg.env_v0.*cannot import"):
        make_env("no_such_pkg.env_v0", 1, 2)
    with pytest.raises(ValueError, match="no parallel_env"):
        make_env("json.decoder", 1, 2)
    with pytest.raises(ValueError, match="env_kwargs are for PettingZoo modules"):
        make_env("predator_prey", 1, 2, env_kwargs={"N": 3})
