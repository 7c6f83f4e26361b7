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
    env = hand_built(PredatorCapturePrey)  # n_capture = 1: agent 2 captures
    assert env.is_capture.tolist() == [False, False, True]
    obs = env.observe()[0]
    assert obs[2, 4:].sum() == 0 and obs[2, 3] == 1  # the capture agent is blind
    env.pos[0, 2] = [2, 2]
    step = env.step(np.array([[STAY, RIGHT, STAY]]))  # on the prey but did not capture
    assert not env.reached[0].any() and not step.done[0]
    np.testing.assert_allclose(step.reward[0], [-0.05] * 3)
    step = env.step(np.array([[CAPTURE, STAY, CAPTURE]]))
    assert env.reached[0].tolist() == [False, False, True]
    assert step.success[0] and step.done[0]
    assert env.pos[0, 0].tolist() == [0, 0]  # capture is "stay" for perception agents


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
