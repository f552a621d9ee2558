"""A kill storm and the checks behind it, shared by ``test_recovery.py`` and ``benchmarks/soak.py``.

`CountingEnv` writes its own counters into its observations, `Collector` drives the async face while
holding taken batches, `assert_exactly_once` checks taken rows against those counters, and `kill_storm`
SIGKILLs workers at random while all of that runs.
"""
from __future__ import annotations

import os
import random
import signal
import time

import gymnasium as gym
import numpy as np
from gymnasium import spaces

import segvec


class CountingEnv(gym.Env):
    """obs = [env_index, build, episode, step]; raises in step every `fail_every` steps.

    `build` is unique to each construction, in any process: ``pid * 1000 + constructions in that process``.
    """

    observation_space = spaces.Box(-1e9, 1e9, (4,), np.float64)
    action_space = spaces.Discrete(3)

    builds: dict = {}

    def __init__(self, env_index: int, fail_every: int = 0, episode_length: int = 7):
        self.env_index = env_index
        self.fail_every = fail_every
        self.episode_length = episode_length
        count = CountingEnv.builds.get((os.getpid(), env_index), 0)
        CountingEnv.builds[(os.getpid(), env_index)] = count + 1
        self.build = os.getpid() * 1000 + count
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


def rows_of(batch):
    out = []
    for i in range(len(batch)):
        n = int(batch.length[i])
        out.append(dict(env=int(batch.env_id[i]), start=int(batch.start_step[i]), length=n,
                        obs=batch.obs[i, :n + 1].copy(), action=batch.action[i, :n].copy(),
                        reward=batch.reward[i, :n].copy(), terminated=batch.terminated[i, :n].copy(),
                        truncated=batch.truncated[i, :n].copy(), mask=batch.mask[i, :n].copy(),
                        next_value=batch.next_value[i, :n].copy(), value=batch.value[i, :n].copy()))
    return out


def assert_exactly_once(rows, num_envs, current_obs, value_is_step=True) -> int:
    """Checks taken rows against each env's own counters in its observations; returns the restarts seen.

    `current_obs[env]` is the env's observation now (after the last row): a restart in the slot after the
    last row shows only there.

    Per env: rows chain without gap or overlap (`start_step`); every real transition appears once and moves
    one step forward inside one build and episode, except where a restart cut the episode: then it is
    truncated and (with values sent as the step counter) bootstrapped by the value sent for the observation
    the env failed on, one past its own; or it terminated, and the bootstrap is 0.
    """
    restarts = 0
    for env in range(num_envs):
        mine = sorted((r for r in rows if r["env"] == env), key=lambda r: r["start"])
        for a, b in zip(mine, mine[1:]):
            assert b["start"] == a["start"] + a["length"], f"env {env}: rows overlap or leave a gap"
        seen = set()
        for r in mine:
            for t in range(r["length"]):
                before, after = tuple(r["obs"][t]), tuple(r["obs"][t + 1])
                restarts += after[1] != before[1]
                if not r["mask"][t]:
                    continue
                assert before not in seen, f"env {env}: the transition from {before} appears twice"
                seen.add(before)
                if after[1] != before[1]:
                    if not r["terminated"][t]:
                        assert r["truncated"][t], f"env {env}: a restart inside a row must truncate {before}"
                        if value_is_step:
                            assert r["next_value"][t] == before[3] + 1
                else:
                    assert after[2] == before[2] and after[3] == before[3] + 1, (env, before, after)
        # a restart at a row's first slot falls between rows: that row's obs[0] starts the new build
        restarts += sum(1 for a, b in zip(mine, mine[1:]) if b["obs"][0][1] != a["obs"][a["length"]][1])
        if mine:
            restarts += current_obs[env][1] != mine[-1]["obs"][mine[-1]["length"]][1]
    return int(restarts)


class Collector:
    """Drives the async face with values = the observation's step counter, holding taken batches (so the
    learner can run out of rows), and keeps a copy of every taken row."""

    def __init__(self, envs):
        self.envs = envs
        self.rows: list = []
        self.held: list = []
        self.exhausted = 0
        self.current_obs: dict = {}  # env -> the last observation received

    def release_all(self):
        for batch in self.held:
            batch.release()  # a row handed out twice, or recycled while held, would fail here
        self.held.clear()

    def take(self):
        if self.envs.segments_ready:
            batch = self.envs.take_segments()
            assert len(set(batch.rows.tolist())) == len(batch), "a row twice in one batch"
            held_rows = {r for b in self.held for r in b.rows.tolist()}
            assert not held_rows & set(batch.rows.tolist()), "a row handed out while the learner holds it"
            self.rows.extend(rows_of(batch))
            self.held.append(batch)

    def retrying(self, call, on_exhausted=None):
        for _ in range(3):
            try:
                return call()
            except segvec.SegmentBufferExhausted:
                self.exhausted += 1
                if on_exhausted is not None:
                    on_exhausted()
                self.release_all()
        raise AssertionError("releasing every batch must let the envs go on")

    def round(self, on_exhausted=None):
        envs = self.envs
        obs, _, _, _, info = self.retrying(lambda: envs.recv(timeout=10), on_exhausted)
        ids = info["env_id"]
        self.current_obs.update(zip(ids.tolist(), obs))
        self.retrying(lambda: envs.send(obs[:, 3].astype(np.int64) % 3, ids, value=obs[:, 3].astype(np.float32)),
                      on_exhausted)
        self.take()

    def finish(self):
        """Closes every row, takes them, and receives every env once more (its current observation)."""
        self.release_all()
        self.envs.flush(timeout=10)
        self.take()
        self.release_all()
        while self.envs._outstanding:
            obs, *_, info = self.envs.recv(timeout=10)
            self.current_obs.update(zip(info["env_id"].tolist(), obs))


def kill_storm(seconds: float, kill_every: float, num_envs: int = 8, num_workers: int = 4, seed: int = 0,
               horizons=(2, 3, 4), report=None, env_factory=None) -> dict:
    """SIGKILLs a random worker every ~`kill_every` s for `seconds` while the learner steps with batches held
    (released now and then, and whenever the envs run out of rows); checks every transition exactly once.
    `env_factory(env_index, fail_every)` makes the envs (default `factory`: `CountingEnv`s).

    Returns counts (steps, rows, kills, restarts, rolled_back).  Used by this test and benchmarks/soak.py.
    """
    rng = random.Random(seed)
    horizon = rng.choice(horizons)
    make = env_factory or factory
    envs = segvec.SegmentVecEnv([make(i, 0) for i in range(num_envs)], backend="multiprocessing",
                                num_workers=num_workers, horizon=horizon, num_segments=3 * num_envs,
                                batch_size=num_envs // 2, restart_failed_envs=True)
    kills = 0
    try:
        collector = Collector(envs)
        envs.async_reset(seed=seed)
        start = time.monotonic()
        next_kill = start + kill_every * rng.uniform(0.5, 1.5)
        rounds = 0
        while time.monotonic() - start < seconds:
            collector.round()
            rounds += 1
            if rounds % 25 == 0:
                collector.release_all()
            if time.monotonic() >= next_kill:
                victim = envs._backend.processes[rng.randrange(num_workers)]
                os.kill(victim.pid, signal.SIGKILL)
                kills += 1
                next_kill = time.monotonic() + kill_every * rng.uniform(0.5, 1.5)
                if report:
                    report(kills, rounds)
        collector.finish()
        stats = envs.stats()
        restarts = assert_exactly_once(collector.rows, num_envs, collector.current_obs)
        # every kill restarts its worker's envs; an env killed again before it stepped is restarted twice in
        # the same slot, and only its last build shows
        assert kills <= restarts <= stats["restarts"]
        steps = sum(int(r["mask"].sum()) for r in collector.rows)
        return dict(horizon=horizon, rounds=rounds, steps=steps, rows=len(collector.rows), kills=kills,
                    restarts=restarts, rolled_back=stats["rolled_back"], exhausted=collector.exhausted)
    finally:
        envs.close()


def collect(envs, rounds: int, error_text: str | None = None):
    """Steps `rounds` times with action = step % 3 and value = step, taking every segment (and flushing at
    the end); returns ``(rows, restarts seen, last obs)``.  Every restart must come with ``truncated``, and
    with `error_text` in its ``env_error`` when given."""
    rows, restarts_seen = [], 0
    obs, _ = envs.reset(seed=0)
    for _ in range(rounds):
        obs, _, _, truncated, info = envs.step(obs[:, 3].astype(np.int64) % 3, value=obs[:, 3].astype(np.float32))
        if "env_restarted" in info:
            restarted = info["_env_restarted"]
            restarts_seen += int(restarted.sum())
            assert truncated[restarted].all()
            if error_text is not None:
                assert all(error_text in text for text in info["env_error"][restarted])
        while envs.segments_ready:
            with envs.take_segments() as batch:
                rows.extend(rows_of(batch))
    envs.flush()
    with envs.take_segments() as batch:
        rows.extend(rows_of(batch))
    return rows, restarts_seen, obs
