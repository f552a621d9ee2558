"""RayRollouts next to a local segvec vector env, side by side in one run, and what a row costs to ship.

Both methods step the same envs (``segvec/SyntheticAtariHeavy-v0``: about 1 ms of real CPU work per step,
84x84x4 uint8 frames) with the same policy in the loop (a numpy policy: an action from each frame's mean,
value 0, log-probability of a uniform choice), and the learner takes and releases every complete
128-step row as it arrives:

    local-mp   ``segvec.make_vec(..., backend="multiprocessing", num_workers=W)`` with ``--envs`` envs,
               ``recv``/``send`` loop in the learner, taking complete rows
    ray        ``RayRollouts(num_runners=W, envs_per_runner=envs / W, backend="serial")`` on a local Ray
               cluster of W CPUs: each runner steps its envs and runs the policy in its actor, the learner
               calls ``take_segments``

Each of ``--repeats`` rounds runs each method for ``--warmup`` seconds (rows produced ahead are consumed
there: the measured window sees the steady state) and then ``--seconds`` timed; the table shows the median
env steps/s (rows taken x horizon / seconds), the spread ((max - min) / median), and the ratio to local-mp.

Transport (``--transport-rows`` rows per call): the cost of one 128-step row of 84x84x4 uint8 frames (129
frames, 3.6 MB, plus its step fields) on its way from a runner to the learner, by part:
    copy      the runner copies the row out of its segment block (``np.array`` of the row's fields)
    ship      an actor returns a chunk of such rows (serialized into the object store) and the learner's
              ``ray.get`` maps it: the round trip of a call, per row
    fetch     the learner's part of it: ``ray.get`` of a chunk that is ready in the store
Then a model of a cluster of ``--nodes`` nodes like this one, from the measured numbers (see the README).

Usage:
    python benchmarks/ray_rollouts.py                         # about 2 minutes on 2 cores
    python benchmarks/ray_rollouts.py --seconds 1 --warmup 1 --repeats 1 --envs 4 --transport-rows 2  # smoke
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the local cluster on 127.0.0.1 only

import numpy as np  # noqa: E402
import ray  # noqa: E402

import segvec  # noqa: E402
from segvec.distributed import RayRollouts  # noqa: E402

ENV = "segvec.envs:segvec/SyntheticAtariHeavy-v0"
HORIZON = 128
FRAME = (84, 84, 4)


def frame_policy():
    """The policy both methods run: numpy, a few microseconds per batch next to the env's millisecond."""
    def policy(obs):
        means = np.asarray(obs).reshape(len(obs), -1)[:, ::97].mean(axis=1)
        return (means.astype(np.int64) % 6, np.zeros(len(obs), np.float32),
                np.full(len(obs), -np.log(6.0), np.float32))
    return policy


class Method:
    """A way to produce rows: `take` steps until rows are complete and returns how many it took."""

    def take(self) -> int:
        raise NotImplementedError

    def run(self, seconds: float) -> int:
        """Takes rows for `seconds`; returns the env steps in the rows taken."""
        rows, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            rows += self.take()
        return rows * HORIZON


class LocalMP(Method):
    """The local peer: one multiprocessing vector env, the policy in the learner's loop."""

    def __init__(self, envs: int, workers: int):
        self.envs = segvec.make_vec(ENV, num_envs=envs, backend="multiprocessing", num_workers=workers,
                                    horizon=HORIZON)
        self.policy = frame_policy()
        self.envs.async_reset(seed=0)

    def take(self) -> int:
        envs = self.envs
        obs, _, _, _, info = envs.recv()
        actions, values, logprobs = self.policy(obs)
        envs.send(actions, info["env_id"], value=values, logprob=logprobs)
        ready = envs.segments_ready
        if ready:
            envs.take_segments(ready).release()
        return ready

    def close(self) -> None:
        self.envs.close()


class Ray(Method):
    """RayRollouts with one serial runner per CPU."""

    def __init__(self, envs: int, workers: int):
        self.per_call = envs // workers
        self.rollouts = RayRollouts(ENV, num_runners=workers, envs_per_runner=envs // workers, policy=frame_policy,
                                    horizon=HORIZON, backend="serial")

    def take(self) -> int:
        self.rollouts.take_segments(self.per_call, timeout=120).release()
        return self.per_call

    def close(self) -> None:
        self.rollouts.close()


class _Source:
    """An actor that returns chunks of prebuilt rows shaped like the runners' (the transport alone)."""

    def __init__(self, k: int):
        rng = np.random.default_rng(0)
        self.rows = make_rows(k, rng)

    def chunk(self):
        return self.rows


def make_rows(k: int, rng) -> dict:
    """`k` rows of a runner's chunk: frames [k, 129, 84, 84, 4] uint8 and the step fields."""
    steps = (k, HORIZON)
    rows = {"obs": rng.integers(0, 255, (k, HORIZON + 1, *FRAME), dtype=np.uint8),
            "action": np.zeros(steps, np.int64), "policy_version": np.zeros(steps, np.int64)}
    for name in ("value", "logprob", "reward", "next_value"):
        rows[name] = np.zeros(steps, np.float32)
    for name in ("terminated", "truncated", "episode_start", "mask"):
        rows[name] = np.zeros(steps, bool)
    for name in ("length", "env_id", "start_step", "runner_id", "incarnation"):
        rows[name] = np.zeros(k, np.int64)
    return rows


def transport(k: int, calls: int) -> tuple[float, float, float, int]:
    """``(copy, ship, fetch)`` in ms per row, and bytes per row."""
    rows = make_rows(k, np.random.default_rng(1))
    nbytes = sum(array.nbytes for array in rows.values()) // k
    start = time.perf_counter()
    for _ in range(calls):
        {name: np.array(array) for name, array in rows.items()}
    copy = (time.perf_counter() - start) / (calls * k) * 1e3
    source = ray.remote(_Source).options(num_cpus=0).remote(k)
    ray.get(source.chunk.remote())  # (warm: the actor is up)
    ship = fetch = 0.0
    for _ in range(calls):
        start = time.perf_counter()
        ref = source.chunk.remote()
        ray.wait([ref], fetch_local=False)
        ready = time.perf_counter()
        chunk = ray.get(ref)
        assert chunk["obs"].shape[0] == k
        done = time.perf_counter()
        ship, fetch = ship + done - start, fetch + done - ready
        del chunk, ref
    ray.kill(source)
    return copy, ship / (calls * k) * 1e3, fetch / (calls * k) * 1e3, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=8, help="envs in all (split over workers / runners)")
    parser.add_argument("--workers", type=int, default=2, help="multiprocessing workers = Ray runners = CPUs")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed window per method per round")
    parser.add_argument("--warmup", type=float, default=4.0, help="untimed seconds before each window")
    parser.add_argument("--repeats", type=int, default=3, help="rounds")
    parser.add_argument("--transport-rows", type=int, default=8, help="rows per call of the transport test")
    parser.add_argument("--transport-calls", type=int, default=20, help="calls of the transport test")
    parser.add_argument("--nodes", type=int, default=10, help="nodes of the modelled cluster")
    parser.add_argument("--node-cpus", type=int, default=32, help="CPUs per node of the modelled cluster")
    parser.add_argument("--network-gbit", type=float, default=10.0,
                        help="learner's network bandwidth of the model (assumed, not measured)")
    args = parser.parse_args()
    if args.envs % args.workers:
        parser.error(f"--workers {args.workers} must divide --envs {args.envs}")

    print(f"date: {datetime.date.today()}  machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, ray {ray.__version__} (a shared, noisy machine: compare "
          "ratios of one run, not absolute numbers across runs)")
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    methods = {"local-mp": LocalMP(args.envs, args.workers), "ray": Ray(args.envs, args.workers)}
    rates: dict[str, list[float]] = {name: [] for name in methods}
    try:
        for _ in range(args.repeats):
            for name, method in methods.items():
                method.run(args.warmup)
                start = time.perf_counter()
                steps = method.run(args.seconds)
                rates[name].append(steps / (time.perf_counter() - start))
        copy, ship, fetch, nbytes = transport(args.transport_rows, args.transport_calls)
    finally:
        for method in methods.values():
            method.close()
        ray.shutdown()

    print(f"\n{ENV.split(':')[1]} (about 1 ms of CPU per step, {FRAME[0]}x{FRAME[1]}x{FRAME[2]} uint8), "
          f"{args.envs} envs, {args.workers} workers/runners, horizon {HORIZON}, {args.repeats} x {args.seconds} s")
    print(f"{'method':<12}{'steps/s':>10}{'spread':>8}{'ratio':>8}")
    base = statistics.median(rates["local-mp"])
    for name, values in rates.items():
        median = statistics.median(values)
        spread = (max(values) - min(values)) / median if median else float("nan")
        print(f"{name:<12}{median:>10,.0f}{spread:>7.0%}{median / base:>7.2f}x")
    ratio = statistics.median(rates["ray"]) / base
    print(f"target: ray >= 0.8x local-mp: {'PASS' if ratio >= 0.8 else 'MISS'} ({ratio:.2f}x)")

    print(f"\ntransport of one {HORIZON}-step row ({nbytes / 1e6:.2f} MB: {HORIZON + 1} frames + step fields), "
          f"chunks of {args.transport_rows} rows, {args.transport_calls} calls:")
    print(f"  copy out of the segment block   {copy:6.2f} ms/row")
    print(f"  ship (actor -> store -> learner) {ship:6.2f} ms/row  (same node: a call's round trip)")
    print(f"  fetch (learner's ray.get)        {fetch:6.2f} ms/row  (same node: the learner's own share)")

    per_cpu = statistics.median(rates["ray"]) / args.workers
    node_rate = per_cpu * args.node_cpus
    learner_rows = 1e3 / fetch  # rows/s the learner can map; serializing runs on the runners' nodes
    network_rows = args.network_gbit * 1e9 / 8 / nbytes
    cluster = min(args.nodes * node_rate, learner_rows * HORIZON, network_rows * HORIZON)
    print(f"\nmodel of {args.nodes} nodes x {args.node_cpus} CPUs (one serial runner per CPU):")
    print(f"  envs:    {per_cpu:,.0f} steps/s per runner (measured) x {args.nodes * args.node_cpus} runners "
          f"= {args.nodes * node_rate:,.0f} steps/s")
    print(f"  learner: {learner_rows:,.0f} rows/s ({1e3 / learner_rows:.2f} ms/row measured) "
          f"= {learner_rows * HORIZON:,.0f} steps/s")
    print(f"  network: {network_rows:,.0f} rows/s at {args.network_gbit:g} Gbit/s (assumed) "
          f"= {network_rows * HORIZON:,.0f} steps/s")
    print(f"  expected: {cluster:,.0f} steps/s (the smallest of the three)")


if __name__ == "__main__":
    main()
