"""EnvRunner paths that the small-observation tests do not reach: observations of 1 KiB and more are
written straight into their slots (rows that fill are staged and scattered after the commit)."""
import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import segvec


class ImageCounterEnv(gym.Env):
    """A 32x32 float32 observation (4 KiB) filled with ``env * 1e6 + episode * 1e3 + step``."""

    observation_space = spaces.Box(-np.inf, np.inf, (32, 32), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, env_index: int, episode_length: int):
        self.env_index, self.episode_length = env_index, episode_length
        self.episode, self.t = -1, 0

    def _obs(self):
        return np.full((32, 32), self.env_index * 1e6 + self.episode * 1e3 + self.t, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 1.0, self.t >= self.episode_length, False, {}


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
@pytest.mark.parametrize("horizon", [1, 3, 8])
def test_large_observations_land_in_their_slots_and_rows_chain(backend, horizon):
    num_envs = 4
    fns = [lambda i=i: ImageCounterEnv(i, episode_length=5 + i) for i in range(num_envs)]
    envs = segvec.SegmentVecEnv(fns, backend=backend, num_workers=None if backend == "serial" else 2,
                                horizon=horizon, num_segments=num_envs * (24 // horizon + 3))  # no recycling
    returned = {e: [] for e in range(num_envs)}
    try:
        obs, _ = envs.reset(seed=0)
        for e in range(num_envs):
            returned[e].append(float(obs[e, 0, 0]))
        for _ in range(23):
            obs, *_ = envs.step(np.zeros(num_envs, np.int64))
            assert (obs == obs[:, :1, :1]).all(), "an observation was torn or mixed"
            for e in range(num_envs):
                returned[e].append(float(obs[e, 0, 0]))
        envs.flush()
        batch = envs.take_segments()
        rows = sorted(range(len(batch)), key=lambda i: (batch.env_id[i], batch.start_step[i]))
        for e in range(num_envs):
            mine = [i for i in rows if batch.env_id[i] == e]
            stored = []
            for i in mine:
                length = int(batch.length[i])
                images = batch.obs[i, :length + 1]
                assert (images == images[:, :1, :1]).all()
                stored.extend(float(v) for v in images[:length, 0, 0])
            last = mine[-1]
            stored.append(float(batch.obs[last, batch.length[last], 0, 0]))
            assert stored == returned[e]
            for a, b in zip(mine, mine[1:]):  # obs[length] of a row is obs[0] of the env's next row
                assert batch.obs[a, batch.length[a], 0, 0] == batch.obs[b, 0, 0, 0]
        batch.release()
    finally:
        envs.close()
