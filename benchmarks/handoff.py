"""Cost of building a ``[B, T]`` training batch: segvec rows against a flat transition buffer.

Both ways hold the same 65,536 transitions (B envs x T steps) and end with torch tensors shaped
``[B, T, ...]``, each row ``T`` consecutive steps of one env, ready for GAE and recurrent training:

  - segvec: ``envs.take_segments(B).to_torch()``.  Rows already hold consecutive steps of one env; when
    the taken rows are adjacent in the buffer (synchronous rollouts taken ``num_envs`` at a time) every
    tensor is a view of shared memory.  When they are not, segvec gathers whole row slabs: the
    "non-contiguous" line measures that fallback.
  - flat: transitions stored in the order they arrived (envs interleaved, as an async collector sees
    them) with their env id and step index; ``np.lexsort`` by (env, step), then one gather per field.
    The flat way gathers ``obs`` ``[B, T]`` only (segvec's rows also carry ``obs[T]`` and ``next_value``).

Fields in both: obs, action, reward, terminated, truncated, value, logprob.

    python benchmarks/handoff.py            # CartPole-sized and 84x84x4 uint8 observations
    python benchmarks/handoff.py --repeats 5
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import gymnasium as gym
import numpy as np
import torch

import segvec

TRANSITIONS = 65_536


class FrameEnv(gym.Env):
    """An env with Atari-sized observations (84x84x4 uint8) and no game: its cost is the frame copy."""

    observation_space = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    action_space = gym.spaces.Discrete(6)

    def __init__(self):
        self.frame = np.zeros((84, 84, 4), np.uint8)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.frame, {}

    def step(self, action):
        self.t += 1
        self.frame[0, 0, 0] = self.t % 256
        return self.frame, 1.0, False, self.t >= 10_000, {}


def prefault(nbytes: int) -> None:
    """Touches and frees `nbytes` of fresh memory, so that neither way pays the VM's first-touch cost
    (on some hosts a page's first use costs far more than copying it) for the output it allocates."""
    np.ones(nbytes, np.uint8)


def fill(envs, steps: int, rng) -> None:
    """Steps every env `steps` times with random actions, values and log-probabilities."""
    n = envs.num_envs
    for _ in range(steps):
        envs.step(rng.integers(0, envs.single_action_space.n, n),
                  value=rng.standard_normal(n, np.float32), logprob=rng.standard_normal(n, np.float32))


def time_segvec(make_env, B: int, T: int, repeats: int, rng) -> dict:
    """Seconds to take B rows as torch tensors, adjacent rows (zero-copy) and scattered rows (gather)."""
    times: dict = {True: [], False: []}
    # 2.5 * B rows: successive takes of B rows sometimes wrap around the buffer (non-adjacent rows).
    envs = segvec.make_vec(make_env, num_envs=B, backend="serial", horizon=T, num_segments=B * 5 // 2)
    out_bytes = B * (T + 1) * int(np.prod(envs.single_observation_space.shape)) * \
        envs.single_observation_space.dtype.itemsize
    try:
        envs.reset(seed=0)
        fill(envs, 1, rng)
        while min(len(times[True]), len(times[False])) < repeats:
            fill(envs, T, rng)
            prefault(out_bytes)
            start = time.perf_counter()
            with envs.take_segments(B) as batch:
                tensors = batch.to_torch()
                elapsed = time.perf_counter() - start
                assert tensors.obs.shape[:2] == (B, T + 1)
                times[batch.zero_copy].append(elapsed)
                del tensors
    finally:
        envs.close()
    return {"contiguous": min(times[True]), "non-contiguous": min(times[False])}


def time_flat(obs_shape, obs_dtype, B: int, T: int, repeats: int, rng) -> float:
    """Seconds to sort a flat arrival-order buffer into [B, T] torch tensors."""
    n = B * T
    # Arrival order: at every step the B envs report in a random order.
    env_id = np.concatenate([rng.permutation(B) for _ in range(T)]).astype(np.int32)
    step = np.repeat(np.arange(T, dtype=np.int64), B)
    obs = np.empty((n, *obs_shape), obs_dtype)
    obs[...] = rng.integers(0, 255, (n,) + (1,) * len(obs_shape)).astype(obs_dtype)
    fields = {
        "action": rng.integers(0, 6, n), "reward": rng.standard_normal(n, np.float32),
        "terminated": rng.random(n) < 0.01, "truncated": rng.random(n) < 0.001,
        "value": rng.standard_normal(n, np.float32), "logprob": rng.standard_normal(n, np.float32),
    }
    times = []
    for _ in range(repeats):
        prefault(obs.nbytes)
        start = time.perf_counter()
        order = np.lexsort((step, env_id))
        out = {"obs": torch.from_numpy(obs[order].reshape(B, T, *obs_shape))}
        for name, array in fields.items():
            out[name] = torch.from_numpy(array[order].reshape(B, T))
        times.append(time.perf_counter() - start)
        del out
        gc.collect()
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=64, help="B: rows (envs) per batch")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    B = options.envs
    T = TRANSITIONS // B
    rng = np.random.default_rng(0)
    import segvec.torch_utils  # noqa: F401 - imported by the first to_torch; not part of the timing
    cases = [
        ("CartPole (4 float32)", lambda: gym.make("CartPole-v1"), (4,), np.float32),
        ("84x84x4 uint8", FrameEnv, (84, 84, 4), np.uint8),
    ]
    print(f"[B, T] = [{B}, {T}] = {B * T} transitions; best of {options.repeats} runs; "
          f"torch {torch.__version__}, CPU tensors; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for name, make_env, obs_shape, obs_dtype in cases:
        segvec_times = time_segvec(make_env, B, T, options.repeats, rng)
        gc.collect()
        flat = time_flat(obs_shape, obs_dtype, B, T, options.repeats, rng)
        gc.collect()
        for kind, seconds in segvec_times.items():
            print(f"{name:22s} segvec {kind:15s} {seconds * 1e3:10.3f} ms   flat argsort+gather "
                  f"{flat * 1e3:10.3f} ms   ratio {flat / seconds:10.1f}x")


if __name__ == "__main__":
    main()
