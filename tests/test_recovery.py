"""restart_failed_envs: a failing env (or a dead worker's envs) is rebuilt and training goes on, with no
transition from before the failure lost or duplicated and the affected rows closed as truncated."""
import os
import signal
import time

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import segvec

BACKENDS = ["serial", "multiprocessing"]


class CountingEnv(gym.Env):
    """obs = [env_index, build, episode, step]; raises in step when its step counter hits `fail_at`."""

    observation_space = spaces.Box(-1e9, 1e9, (4,), np.float64)
    action_space = spaces.Discrete(3)

    builds: dict = {}

    def __init__(self, env_index: int, fail_every: int = 0, episode_length: int = 7):
        self.env_index = env_index
        self.fail_every = fail_every
        self.episode_length = episode_length
        self.build = CountingEnv.builds.get(env_index, 0)
        CountingEnv.builds[env_index] = self.build + 1
        self.episode = -1
        self.t = 0
        self.total = 0

    def _obs(self):
        return np.array([self.env_index, self.build, self.episode, self.t], np.float64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.total += 1
        if self.fail_every and self.total % self.fail_every == 0:
            raise RuntimeError(f"env {self.env_index} broke at step {self.total}")
        self.t += 1
        return self._obs(), float(action), self.t >= self.episode_length, False, {}


def factory(env_index, fail_every):
    return lambda: CountingEnv(env_index, fail_every)


def collect(envs, rounds):
    """Steps `rounds` times with action = step % 3, takes every segment; returns rows and restart count."""
    rows = []
    restarts_seen = 0
    obs, _ = envs.reset(seed=0)
    for _ in range(rounds):
        actions = (obs[:, 3].astype(np.int64) % 3)
        obs, reward, terminated, truncated, info = envs.step(actions, value=obs[:, 3].astype(np.float32))
        if "env_restarted" in info:
            restarts_seen += int(info["_env_restarted"].sum())
            assert truncated[info["_env_restarted"]].all()
        while envs.segments_ready:
            with envs.take_segments() as batch:
                rows.extend(_rows_of(batch))
    envs.flush()
    with envs.take_segments() as batch:
        rows.extend(_rows_of(batch))
    return rows, restarts_seen


def _rows_of(batch):
    out = []
    for i in range(len(batch)):
        n = int(batch.length[i])
        out.append(dict(env=int(batch.env_id[i]), start=int(batch.start_step[i]), length=n,
                        obs=batch.obs[i, :n + 1].copy(), action=batch.action[i, :n].copy(),
                        reward=batch.reward[i, :n].copy(), terminated=batch.terminated[i, :n].copy(),
                        truncated=batch.truncated[i, :n].copy(), mask=batch.mask[i, :n].copy(),
                        next_value=batch.next_value[i, :n].copy(), value=batch.value[i, :n].copy()))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_failing_env_is_rebuilt_and_nothing_is_lost(backend):
    num_envs, fail_every = 4, 11
    envs = segvec.SegmentVecEnv([factory(i, fail_every) for i in range(num_envs)], backend=backend,
                                num_workers=None if backend == "serial" else 2, horizon=5,
                                num_segments=64, restart_failed_envs=True)
    try:
        rows, restarts_seen = collect(envs, rounds=60)
        stats = envs.stats()
    finally:
        envs.close()
    assert stats["restarts"] == restarts_seen > 0
    for env in range(num_envs):
        mine = sorted((r for r in rows if r["env"] == env), key=lambda r: r["start"])
        # rows of an env chain without gaps
        for a, b in zip(mine, mine[1:]):
            assert b["start"] == a["start"] + a["length"]
        transitions = [(tuple(r["obs"][t]), tuple(r["obs"][t + 1]), bool(r["truncated"][t]),
                        float(r["next_value"][t])) for r in mine for t in range(r["length"]) if r["mask"][t]]
        # every real transition moves one step forward inside one build and episode, exactly once; a
        # restart inside a row cuts the episode: truncated, bootstrapped by the value sent for the
        # observation the env failed on (its step counter, one past `before`)
        seen = set()
        cuts = 0
        for before, after, truncated, next_value in transitions:
            assert before not in seen, "a transition appears twice"
            seen.add(before)
            if after[1] != before[1]:
                assert truncated and next_value == before[3] + 1
                cuts += 1
            else:
                assert after[:3] == before[:3] and after[3] == before[3] + 1
        # a restart at a row's first slot falls between rows: that row's obs[0] starts the new build
        at_row_start = sum(1 for a, b in zip(mine, mine[1:]) if b["length"] and b["obs"][0][1] != a["obs"][a["length"]][1])
        builds = {int(r["obs"][t][1]) for r in mine for t in range(r["length"] + 1)}
        assert cuts + at_row_start == len(builds) - 1 >= 1


def test_dead_worker_is_replaced_and_its_envs_restart():
    envs = segvec.SegmentVecEnv([factory(i, 0) for i in range(4)], backend="multiprocessing", num_workers=2,
                                horizon=4, batch_size=2, restart_failed_envs=True)
    try:
        envs.async_reset(seed=0)
        restarted = set()
        killed_at = None
        for i in range(100000):
            obs, reward, terminated, truncated, info = envs.recv(timeout=10)
            if "env_restarted" in info:
                restarted.update(info["env_id"][info["_env_restarted"]].tolist())
            envs.send(obs[:, 3].astype(np.int64) % 3, info["env_id"])
            if i == 50:
                os.kill(envs._backend.processes[1].pid, signal.SIGKILL)
                killed_at = time.monotonic()
            if killed_at and restarted and i > 200:
                break
            assert killed_at is None or time.monotonic() - killed_at < 10, "the dead worker was not replaced"
        assert restarted == {2, 3}
        assert envs.stats()["restarts"] == 2
        builds = envs.get_attr("build")
        assert builds[2] >= 1 and builds[3] >= 1
    finally:
        envs.close()
