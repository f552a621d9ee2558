"""Same seed, same run: in synchronous stepping the taken batches and the episodes do not depend on how fast the
workers are, nor on the backend.

The envs sleep a random (unseeded) moment in each step, so the workers finish in a different order every
run.  The policy draws from a seeded RNG in batch order, so an env received at another place of a batch
gets another action and the runs part at once: equal batches mean equal order, not only equal sets.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import pytest

import segvec
from conftest import BACKENDS, backend_options
from envs import CounterEnv

NUM_ENVS, HORIZON, STEPS = 4, 4, 40


class JitterEnv(CounterEnv):
    """A `CounterEnv` whose steps take a random, unseeded time: only the timing differs between runs."""

    def step(self, action):
        time.sleep(np.random.default_rng().random() * 0.002)
        return super().step(action)


def jitter_fns(num_envs: int) -> list:
    return [functools.partial(JitterEnv, index=i, max_length=5) for i in range(num_envs)]


def act(rng: np.random.Generator, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(actions, values, logprobs)`` of a batch of observations, drawing from `rng` in row order."""
    draws = rng.random(len(obs))
    actions = ((np.floor(obs[:, 3] * 10) + np.floor(draws * 4)) % 4).astype(np.int64)
    return actions, (obs[:, 2] + draws).astype(np.float32), np.log(draws + 0.5).astype(np.float32)


def record(batch) -> dict:
    """Copies of every array of a batch (its buffer rows included), and whether it was a view."""
    data = {name: np.array(value, copy=True) for name, value in batch.numpy().items() if name != "final_obs"}
    data["rows"] = np.array(batch.rows, copy=True)
    return data


def run(backend: str, face: str, seed: int = 7) -> tuple[list, list]:
    """One seeded run taking batches as examples/ppo.py does; returns ``(batches, episodes)``."""
    envs = segvec.make_vec(jitter_fns(NUM_ENVS), num_envs=NUM_ENVS, horizon=HORIZON,
                           **backend_options(backend, NUM_ENVS))
    rng = np.random.default_rng(seed)
    batches, episodes = [], []
    try:
        if face == "gymnasium":
            obs, _ = envs.reset(seed=seed)
        else:
            envs.async_reset(seed=seed)
        for _ in range(STEPS):
            if face == "gymnasium":
                actions, values, logprobs = act(rng, obs)
                obs = envs.step(actions, value=values, logprob=logprobs)[0]
            else:
                obs, _, _, _, infos = envs.recv()
                env_ids = infos["env_id"]
                np.testing.assert_array_equal(env_ids, np.arange(NUM_ENVS))  # every env, in env order
                episodes.append(envs.episodes())  # nothing in flight now
                actions, values, logprobs = act(rng, obs)
                envs.send(actions, env_ids, value=values, logprob=logprobs)
            if face == "gymnasium":
                episodes.append(envs.episodes())
            while envs.segments_ready >= NUM_ENVS:
                with envs.take_segments(NUM_ENVS) as batch:
                    batches.append(record(batch))
    finally:
        envs.close()
    return batches, episodes


def assert_same_runs(a: tuple[list, list], b: tuple[list, list], what: str) -> None:
    (batches_a, episodes_a), (batches_b, episodes_b) = a, b
    assert len(batches_a) == len(batches_b) >= STEPS // HORIZON - 1, what
    for i, (x, y) in enumerate(zip(batches_a, batches_b)):
        assert x.keys() == y.keys()
        for name in x:
            np.testing.assert_array_equal(x[name], y[name], err_msg=f"{what}: batch {i}, {name}")
    assert len(episodes_a) == len(episodes_b)
    for i, (x, y) in enumerate(zip(episodes_a, episodes_b)):
        for name in ("env_id", "return", "length", "end_step"):
            np.testing.assert_array_equal(x[name], y[name], err_msg=f"{what}: episodes() call {i}, {name}")
        assert x["lost"] == y["lost"] == 0


@pytest.mark.parametrize("face", ["gymnasium", "async"])
def test_same_seed_same_batches_on_every_run_and_backend(face):
    runs = {(backend, attempt): run(backend, face) for backend in BACKENDS for attempt in range(2)}
    reference = runs[("serial", 0)]
    assert sum(len(calls["env_id"]) for calls in reference[1]) > 10, "the runs should finish episodes"
    for key, result in runs.items():
        assert_same_runs(reference, result, f"{face} face, {key[0]} run {key[1]}")


def test_episodes_come_in_step_then_env_order():
    envs = segvec.make_vec(jitter_fns(NUM_ENVS), num_envs=NUM_ENVS, horizon=HORIZON,
                           **backend_options("multiprocessing", NUM_ENVS))
    try:
        obs, _ = envs.reset(seed=3)
        for _ in range(30):
            obs = envs.step(np.zeros(NUM_ENVS, np.int64))[0]
        episodes = envs.episodes()
        keys = list(zip(episodes["end_step"].tolist(), episodes["env_id"].tolist()))
        assert len(keys) > 5 and keys == sorted(keys)
        assert (episodes["end_step"] >= episodes["length"]).all() and episodes["end_step"].max() <= 30
    finally:
        envs.close()


def test_recv_of_a_partial_batch_keeps_arrival_order():
    """batch_size < num_envs: the first envs ready, in the order they became ready (not sorted)."""
    envs = segvec.make_vec(jitter_fns(NUM_ENVS), num_envs=NUM_ENVS, horizon=HORIZON, batch_size=2,
                           backend="serial")
    try:
        envs.async_reset(seed=0)
        seen = []
        for _ in range(6):
            obs, _, _, _, infos = envs.recv()
            seen.append(infos["env_id"].tolist())
            envs.send(np.zeros(2, np.int64), infos["env_id"][::-1])  # sent in reverse: they come back so
        assert seen[0] == [0, 1] and seen[2] == [1, 0]
    finally:
        envs.close()
