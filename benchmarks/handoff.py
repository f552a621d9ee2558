"""Cost of getting a ``[B, T]`` training batch into a usable form: segvec rows against a flat transition buffer.

Both ways hold the same 65,536 transitions (B envs x T steps) and end with torch tensors shaped
``[B, T, ...]`` (or minibatches of whole rows of them), each row ``T`` consecutive steps of one env, ready for
GAE and recurrent training:

  - segvec: ``envs.take_segments(B)``.  Rows already hold consecutive steps of one env, and a batch reads
    the block's own rows: taking copies nothing.  When the taken rows are adjacent in the buffer
    ("contiguous": synchronous rollouts taken ``num_envs`` at a time, usually) every field is a view of
    shared memory; when they are not ("non-contiguous": the rows wrap around the buffer) a field is gathered
    when first read, and minibatches are gathered from the block at minibatch size.
  - flat: transitions stored in the order they arrived (envs interleaved, as an async collector sees
    them) with their env id and step index; ``np.lexsort`` by (env, step), then one gather per field.
    The flat way gathers ``obs`` ``[B, T]`` only (segvec's rows also carry ``obs[T]`` and ``next_value``).

Three lines per kind of take, each against the flat way doing the same job:

  - ``take``: ``take_segments(B)`` alone (nothing gathered yet) against the flat sort+gather.
  - ``take + to_torch()``: the whole batch as CPU tensors (views when contiguous, one gather of every field
    otherwise) against the flat sort+gather.
  - ``take + minibatch epoch``: ``take_segments(B)`` and then, for each of 4 minibatches of B/4 whole rows
    in random order, ``mb.to_torch(fields=FIELDS)`` (each field gathered once from the block, at minibatch
    size) -- one epoch of what a PPO trainer reads -- against the flat sort+gather followed by the same
    epoch of minibatch gathers (numpy gathers of the sorted arrays, as segvec's).  Both pay the minibatch
    gathers: this line is what a CPU trainer pays in all for its first epoch.

Fields in both: obs, action, reward, terminated, truncated, value, logprob (``to_torch()`` of a segvec batch
also gives next_value, episode_start, mask, policy_version, length, env_id, start_step).  Every timed run
comes right after a rollout of T steps of every env, for both ways, so both start from the same caches.

    python benchmarks/handoff.py            # CartPole-sized and 84x84x4 uint8 observations
    python benchmarks/handoff.py --repeats 7
    python benchmarks/handoff.py --envs 4 --transitions 256 --repeats 1   # a smoke run (seconds)
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
MINIBATCHES = 4
FOLLOW_UPS = ("take", "take + to_torch()", "take + minibatch epoch")
FIELDS = ("obs", "action", "reward", "terminated", "truncated", "value", "logprob")  # both ways have these


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


def fill(envs, steps: int, generator: torch.Generator) -> None:
    """Steps every env `steps` times under a stand-in policy: it reads each observation as a tensor and
    draws actions, values and log-probabilities with torch, as a trainer's policy does (so torch's code is
    as warm, or as cold, as in a trainer when the batch is taken)."""
    n, actions = envs.num_envs, envs.single_action_space.n
    for _ in range(steps):
        action = torch.randint(0, actions, (n,), generator=generator)
        value, logprob = torch.randn(2, n, generator=generator)
        obs = envs.step(action.numpy(), value=value.numpy(), logprob=logprob.numpy())[0]
        torch.as_tensor(obs)  # (the policy's input for the next step)


def segvec_epoch(batch, rng) -> int:
    """One epoch of minibatches of whole rows, each as CPU tensors of the flat buffer's fields; returns the
    rows seen."""
    seen = 0
    for minibatch in batch.minibatches(MINIBATCHES, generator=rng):
        tensors = minibatch.to_torch(fields=FIELDS)
        seen += tensors.obs.shape[0]
    return seen


class Flat:
    """The same number of transitions in a flat buffer, in arrival order, with env ids and step indices."""

    def __init__(self, obs_shape, obs_dtype, B: int, T: int, rng):
        n = B * T
        self.B, self.T, self.obs_shape = B, T, obs_shape
        # Arrival order: at every step the B envs report in a random order.
        self.env_id = np.concatenate([rng.permutation(B) for _ in range(T)]).astype(np.int32)
        self.step = np.repeat(np.arange(T, dtype=np.int64), B)
        obs = np.empty((n, *obs_shape), obs_dtype)
        obs[...] = rng.integers(0, 255, (n,) + (1,) * len(obs_shape)).astype(obs_dtype)
        self.fields = {
            "obs": obs, "action": rng.integers(0, 6, n), "reward": rng.standard_normal(n, np.float32),
            "terminated": rng.random(n) < 0.01, "truncated": rng.random(n) < 0.001,
            "value": rng.standard_normal(n, np.float32), "logprob": rng.standard_normal(n, np.float32),
        }
        assert tuple(self.fields) == FIELDS
        self.nbytes = obs.nbytes

    def run(self, epoch: bool, rng) -> None:
        """Sorts the buffer into [B, T] tensors (argsort by (env, step), one gather per field); with `epoch`,
        then gathers every field of each of the epoch's minibatches of whole rows (numpy gathers, as segvec's)."""
        B, T = self.B, self.T
        order = np.lexsort((self.step, self.env_id))
        rows = {name: array[order].reshape(B, T, *array.shape[1:]) for name, array in self.fields.items()}
        tensors = {name: torch.from_numpy(array) for name, array in rows.items()}
        assert tensors["obs"].shape[:2] == (B, T)
        if epoch:
            for index in np.array_split(rng.permutation(B), MINIBATCHES):
                minibatch = {name: torch.from_numpy(array[np.sort(index)]) for name, array in rows.items()}
                del minibatch


def measure(make_env, obs_shape, obs_dtype, B: int, T: int, repeats: int, rng) -> tuple[dict, dict]:
    """Seconds, best of `repeats`, of every line: segvec's for adjacent and for scattered rows, and the flat
    buffer's.  Every timed run comes right after the envs stepped T times (a rollout), for both ways."""
    lines = {kind: {line: [] for line in FOLLOW_UPS} for kind in (True, False)}
    flat_lines: dict = {"sort+gather": [], "sort+gather + minibatch epoch": []}
    flat = Flat(obs_shape, obs_dtype, B, T, rng)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    # 2.5 * B rows: successive takes of B rows sometimes wrap around the buffer (non-adjacent rows).
    envs = segvec.make_vec(make_env, num_envs=B, backend="serial", horizon=T, num_segments=B * 5 // 2)
    out_bytes = B * (T + 1) * int(np.prod(envs.single_observation_space.shape)) * \
        envs.single_observation_space.dtype.itemsize

    def wanted(kind):  # the line after a take with the fewest samples for this kind of take
        counts = {line: len(lines[kind][line]) for line in FOLLOW_UPS[1:]}
        line = min(counts, key=counts.get)
        return line if counts[line] < repeats else None

    def flat_wanted():
        line = min(flat_lines, key=lambda name: len(flat_lines[name]))
        return line if len(flat_lines[line]) < repeats else None

    try:
        envs.reset(seed=0)
        fill(envs, 1, generator)
        for i in range(60 * repeats):  # (a bound, in case one kind of take never came)
            segvec_left = wanted(True) or wanted(False) or min(len(lines[k]["take"]) for k in lines) < repeats
            if not segvec_left and not flat_wanted():
                break
            gc.collect()
            fill(envs, T, generator)
            if flat_wanted() and (i % 2 == 1 or not segvec_left):
                line = flat_wanted()
                prefault(2 * out_bytes if "epoch" in line else out_bytes)
                start = time.perf_counter()
                flat.run("epoch" in line, rng)
                flat_lines[line].append(time.perf_counter() - start)
                envs.take_segments(B).release()  # (untimed: the rows go on)
                continue
            prefault(out_bytes)
            start = time.perf_counter()
            batch = envs.take_segments(B)
            taken = time.perf_counter()
            kind = batch.zero_copy
            line = wanted(kind)
            if line == "take + to_torch()":
                tensors = batch.to_torch()
                assert tensors.obs.shape[:2] == (B, T + 1)
                del tensors
            elif line == "take + minibatch epoch":
                assert segvec_epoch(batch, rng) == B
            done = time.perf_counter()
            lines[kind]["take"].append(taken - start)
            if line is not None:
                lines[kind][line].append(done - start)
            batch.release()
            del batch
    finally:
        envs.close()
    segvec_best = {("contiguous" if kind else "non-contiguous"): {line: min(samples, default=float("nan"))
                                                                  for line, samples in by_line.items()}
                   for kind, by_line in lines.items()}
    return segvec_best, {line: min(samples, default=float("nan")) for line, samples in flat_lines.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=64, help="B: rows (envs) per batch")
    parser.add_argument("--transitions", type=int, default=TRANSITIONS, help="B x T (T = transitions / B)")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    B = options.envs
    T = options.transitions // B
    rng = np.random.default_rng(0)
    import segvec.torch_utils  # noqa: F401 - imported by the first to_torch; not part of the timing
    cases = [
        ("CartPole (4 float32)", lambda: gym.make("CartPole-v1"), (4,), np.float32),
        ("84x84x4 uint8", FrameEnv, (84, 84, 4), np.uint8),
    ]
    print(f"[B, T] = [{B}, {T}] = {B * T} transitions; best of {options.repeats} runs; "
          f"torch {torch.__version__}, CPU tensors; {MINIBATCHES} minibatches of {B // MINIBATCHES} rows; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for name, make_env, obs_shape, obs_dtype in cases:
        segvec_times, flat = measure(make_env, obs_shape, obs_dtype, B, T, options.repeats, rng)
        gc.collect()
        for kind, lines in segvec_times.items():
            for line, seconds in lines.items():
                flat_name = "sort+gather + minibatch epoch" if "epoch" in line else "sort+gather"
                flat_seconds = flat[flat_name]
                print(f"{name:21s} {kind:15s} segvec {line:23s} {seconds * 1e3:9.3f} ms   flat {flat_name:29s} "
                      f"{flat_seconds * 1e3:9.3f} ms   ratio {flat_seconds / seconds:8.1f}x")


if __name__ == "__main__":
    main()
