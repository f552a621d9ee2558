"""Tests of segvec/envs.py: the synthetic Atari-shaped envs used by benchmarks and soak runs."""
import gymnasium
import numpy as np
import pytest

import segvec
from segvec.envs import SyntheticAtariEnv, calibrate_work, units_for


def rollout(seed, steps=600, **kwargs):
    env = SyntheticAtariEnv(work_us=0, **kwargs)
    obs, info = env.reset(seed=seed)
    trace = [(obs.tobytes(), None, None, None)]
    for t in range(steps):
        obs, reward, terminated, truncated, info = env.step(t % 6)
        trace.append((obs.tobytes(), reward, terminated, truncated))
        if terminated or truncated:
            obs, _ = env.reset()
            trace.append((obs.tobytes(), None, None, None))
    return trace


def test_spaces_and_registered_ids():
    for env_id in ("segvec/SyntheticAtari-v0", "segvec/SyntheticAtariHeavy-v0"):
        env = gymnasium.make(env_id, work_us=0)
        assert env.observation_space == gymnasium.spaces.Box(0, 255, (84, 84, 4), np.uint8)
        assert env.action_space == gymnasium.spaces.Discrete(6)
        obs, info = env.reset(seed=1)
        assert env.observation_space.contains(obs) and info == {}
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        env.close()
    assert gymnasium.spec("segvec/SyntheticAtari-v0").kwargs["work_us"] == 50
    assert gymnasium.spec("segvec/SyntheticAtariHeavy-v0").kwargs["work_us"] == 1000


def test_deterministic_given_the_seed():
    assert rollout(3) == rollout(3)
    assert rollout(3) != rollout(4)


def test_work_does_not_change_the_outcome():
    env = SyntheticAtariEnv(work_us=20)
    obs, _ = env.reset(seed=5)
    trace = [obs.tobytes()]
    for t in range(300):
        obs, reward, terminated, truncated, _ = env.step(t % 6)
        trace.append((obs.tobytes(), reward, terminated, truncated))
        if terminated or truncated:
            obs, _ = env.reset()
            trace.append(obs.tobytes())
    reference = [entry[0] if entry[1] is None else entry for entry in rollout(5, steps=300)]
    assert trace == reference


def test_episodes_end_by_termination_and_by_truncation():
    env = SyntheticAtariEnv(work_us=0, episode_length=(5, 12), truncation_prob=0.5)
    env.reset(seed=0)
    ends, length = [], 0
    for t in range(2000):
        _, _, terminated, truncated, _ = env.step(t % 6)
        length += 1
        assert not (terminated and truncated)
        if terminated or truncated:
            assert 5 <= length <= 12
            ends.append("term" if terminated else "trunc")
            env.reset()
            length = 0
    assert "term" in ends and "trunc" in ends
    with pytest.raises(RuntimeError):
        env = SyntheticAtariEnv(work_us=0, episode_length=(1, 1))
        env.reset(seed=0)
        env.step(0)
        env.step(0)


def test_frames_stack_oldest_first():
    env = SyntheticAtariEnv(work_us=0, episode_length=(100, 100))
    previous, _ = env.reset(seed=2)
    assert all((previous[:, :, k] == previous[:, :, 0]).all() for k in range(4))
    for t in range(20):
        obs, *_ = env.step(t % 6)
        assert (obs[:, :, :3] == previous[:, :, 1:]).all()
        previous = obs
    assert env.render() is None
    frame = SyntheticAtariEnv(work_us=0, render_mode="rgb_array")
    frame.reset(seed=0)
    assert frame.render().shape == (84, 84, 3)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        SyntheticAtariEnv(episode_length=(0, 5))
    with pytest.raises(ValueError):
        SyntheticAtariEnv(episode_length=(9, 5))
    with pytest.raises(ValueError):
        SyntheticAtariEnv(truncation_prob=1.5)
    env = SyntheticAtariEnv(work_us=0)
    env.reset(seed=0)
    with pytest.raises(ValueError):
        env.step(6)


def test_calibration():
    assert calibrate_work() > 0
    assert units_for(0) == 0
    assert units_for(1000) > units_for(50) >= 1


def test_runs_in_a_segment_vec_env():
    envs = segvec.make_vec(lambda: SyntheticAtariEnv(work_us=0, episode_length=(3, 6)), num_envs=2,
                           backend="serial", horizon=4)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 84, 84, 4) and obs.dtype == np.uint8
    for t in range(20):
        obs, *_ = envs.step(np.full(2, t % 6))
    assert envs.stats()["episodes"] >= 2
    envs.close()
