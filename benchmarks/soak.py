"""Soak run: millions of async steps, watching for leaks and lost or duplicated transitions.

Steps ``--num-envs`` envs in ``--workers`` worker processes with the async face (``recv`` of half the envs,
``send`` of random actions with a value), takes every complete segment as soon as it is ready, holds the
last ``--hold`` batches and releases older ones.  Every ``--interval`` seconds it records the resident
memory (RSS) of the learner and of every worker, their open file descriptors and the /dev/shm entries
whose name contains "segvec".  At the end it says whether each of those stayed flat, flushes, takes the
rest, and checks that three counts agree:

    sent     real transitions the learner sent actions for (a send right after an episode ended is the
             NEXT_STEP reset step, not a transition)
    stepped  ``envs.stats()["steps"]``, the transitions the workers committed
    taken    mask-True transitions in every batch taken

and that no complete row was recycled (a recycled row would be lost to the learner).

With ``--kill-every SECONDS`` it runs a kill storm instead (``tests/storm.py``): 8 envs in 4 workers with
``restart_failed_envs=True``, a horizon of 2-4, the learner holding its batches (releasing them now and
then, and whenever the envs run out of rows), and a random worker SIGKILLed every ~SECONDS for
``--duration`` seconds.  Every env writes its own build, episode and step counters into its observations;
at the end every taken transition is checked against them: none lost, none duplicated, each restart cut as
a truncation bootstrapped by the value already sent.

Usage:
    python benchmarks/soak.py                        # 10M steps of segvec/SyntheticAtari-v0
    python benchmarks/soak.py --steps 2000000 --interval 5
    python benchmarks/soak.py --env CartPole-v1 --steps 1000000
    python benchmarks/soak.py --kill-every 0.5 --duration 60

Exit status: 0 when everything stayed flat and the counts agree (or the storm found nothing), 1 otherwise.
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import statistics
import sys
import time

import numpy as np

import segvec

try:
    import segvec.envs  # noqa: F401 - registers segvec/SyntheticAtari-v0

    DEFAULT_ENV = "segvec/SyntheticAtari-v0"
except ImportError:  # an older tree without the synthetic envs
    DEFAULT_ENV = "CartPole-v1"

MIB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10_000_000, help="env steps (actions sent) in total")
    parser.add_argument("--env", default=DEFAULT_ENV, help="gymnasium id")
    parser.add_argument("--work-us", type=float, default=None,
                        help="work per step of the synthetic env, in microseconds (its default if unset)")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="envs per recv (default num_envs / 2)")
    parser.add_argument("--horizon", type=int, default=64)
    parser.add_argument("--hold", type=int, default=2, help="taken batches held before release")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between resource samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-every", type=float, default=None,
                        help="run a kill storm: SIGKILL a random worker about every this many seconds")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the kill storm")
    return parser.parse_args(argv)


def kill_storm_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
    from storm import kill_storm

    print(f"kill storm: 8 envs, 4 workers, restart_failed_envs, a worker SIGKILLed every ~{args.kill_every} s "
          f"for {args.duration:.0f} s (seed {args.seed})", flush=True)
    start = time.monotonic()

    def report(kills: int, rounds: int) -> None:
        if kills % 20 == 0:
            print(f"  {time.monotonic() - start:5.1f} s: {kills} kills, {rounds:,} recv/send rounds", flush=True)

    try:
        result = kill_storm(args.duration, args.kill_every, seed=args.seed, report=report)
    except AssertionError as error:
        print(f"FAIL: {error}")
        return 1
    print(f"horizon {result['horizon']}: {result['kills']} workers killed, {result['restarts']} env restarts "
          f"({result['rolled_back']} steps in flight rolled back), {result['rounds']:,} recv/send rounds, "
          f"{result['steps']:,} transitions in {result['rows']:,} rows, learner out of rows "
          f"{result['exhausted']:,} times")
    print("every transition exactly once, rows chained, no row handed out twice, no release error: PASS")
    return 0


# ---- what a process holds --------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    out = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)


def shm_entries() -> int:
    try:
        return sum("segvec" in name for name in os.listdir("/dev/shm"))
    except FileNotFoundError:
        return 0


Sample = collections.namedtuple("Sample", "seconds steps rss fds shm")


def sample(seconds: float, steps: int, pids: list[int]) -> Sample:
    return Sample(seconds, steps, [rss_bytes(p) for p in pids], [open_fds(p) for p in pids], shm_entries())


def flat_memory(samples: list[Sample], index: int) -> tuple[bool, str]:
    """Flat: after warm-up, the median RSS of the second half exceeds the first half's median by at most
    4 MiB or 2%.  A leak raises the typical level; a batch gathered into a fresh array (rows that are not
    adjacent) is a transient spike of one batch's size, which the median ignores and the report shows.
    Warm-up (the samples before the first interval ends) is left out: the block's pages become resident as
    rows fill for the first time, and every buffer reaches its working size."""
    values = [s.rss[index] for s in samples[2:]] if len(samples) >= 4 else [s.rss[index] for s in samples]
    half = len(values) // 2
    first_half, second_half = values[:half] or values, values[half:]
    first, second = statistics.median(first_half), statistics.median(second_half)
    growth = second - first
    ok = growth <= max(4 * MIB, 0.02 * first)
    return ok, (f"{samples[0].rss[index] / MIB:.1f} MiB at start, {values[0] / MIB:.1f} -> {values[-1] / MIB:.1f} "
                f"MiB after warm-up (median of each half {first / MIB:.1f} -> {second / MIB:.1f}, peak "
                f"{max(first_half) / MIB:.1f} -> {max(second_half) / MIB:.1f})")


# ---- the run ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.kill_every is not None:
        return kill_storm_main(args)
    batch_size = args.batch_size or max(1, args.num_envs // 2)
    env_kwargs = {"work_us": args.work_us} if args.work_us is not None else None
    envs = segvec.make_vec(args.env, num_envs=args.num_envs, backend="multiprocessing", num_workers=args.workers,
                           batch_size=batch_size, horizon=args.horizon, env_kwargs=env_kwargs)
    pids = [os.getpid()] + children(os.getpid())
    names = ["learner"] + [f"worker{i}" for i in range(len(pids) - 1)]
    print(f"soak: {args.steps:,} steps of {args.env}, {args.num_envs} envs, {args.workers} workers, "
          f"batch {batch_size}, horizon {args.horizon}, {envs.num_segments} rows; pids {dict(zip(names, pids))}")
    rng = np.random.default_rng(args.seed)
    n_actions = int(envs.single_action_space.n)
    action_bank = rng.integers(0, n_actions, size=(512, batch_size))
    values = np.zeros(batch_size, np.float32)

    sent = 0                    # actions sent (transitions + NEXT_STEP reset steps)
    sent_transitions = 0        # actions that were real transitions
    taken_transitions = 0
    taken_rows = 0
    held: collections.deque = collections.deque()
    ended = np.zeros(args.num_envs, bool)  # the env's last step ended its episode

    def take_all() -> None:
        nonlocal taken_transitions, taken_rows
        ready = envs.segments_ready
        if not ready:
            return
        batch = envs.take_segments(ready)
        taken_transitions += int(batch.mask.sum())
        taken_rows += len(batch.env_id)
        held.append(batch)
        while len(held) > args.hold:
            held.popleft().release()

    start = time.monotonic()
    samples = [sample(0.0, 0, pids)]
    next_sample = start + args.interval
    header = f"{'t(s)':>7} {'steps':>12} {'steps/s':>9} " + " ".join(f"{n + ' RSS':>13}" for n in names) + \
        f" {'fds':>12} {'shm':>4}"
    print(header)

    def show(s: Sample, previous: Sample) -> None:
        rate = (s.steps - previous.steps) / max(1e-9, s.seconds - previous.seconds)
        print(f"{s.seconds:7.1f} {s.steps:12,} {rate:9.0f} " + " ".join(f"{r / MIB:10.1f}MiB" for r in s.rss) +
              f" {'/'.join(map(str, s.fds)):>12} {s.shm:4d}", flush=True)

    show(samples[0], samples[0])
    envs.async_reset(seed=args.seed)
    i = 0
    while sent < args.steps:
        _, _, terminated, truncated, infos = envs.recv()
        env_ids = infos["env_id"]
        n = len(env_ids)
        actions = action_bank[i % len(action_bank), :n]
        ended[env_ids] = terminated | truncated  # NEXT_STEP: then this action is ignored (the env resets)
        sent_transitions += n - int(ended[env_ids].sum())
        envs.send(actions, env_ids, value=values[:n])
        sent += n
        i += 1
        if envs.segments_ready:
            take_all()
        now = time.monotonic()
        if now >= next_sample:
            samples.append(sample(now - start, sent, pids))
            show(samples[-1], samples[-2])
            next_sample += args.interval
    envs.flush()
    take_all()
    while held:
        held.popleft().release()
    elapsed = time.monotonic() - start
    samples.append(sample(elapsed, sent, pids))
    show(samples[-1], samples[-2])
    stats = envs.stats()
    envs.close()

    print(f"\n{sent:,} steps in {elapsed:.1f} s ({sent / elapsed:,.0f} steps/s); stats: {stats}")
    ok = True
    for index, name in enumerate(names):
        flat, text = flat_memory(samples, index)
        ok &= flat
        print(f"RSS {name:8s} {'flat' if flat else 'GREW'}: {text}")
    fds_flat = all(s.fds == samples[0].fds for s in samples)
    shm_flat = all(s.shm == samples[0].shm for s in samples)
    ok &= fds_flat and shm_flat
    print(f"open fds      {'flat' if fds_flat else 'CHANGED'}: {samples[0].fds} -> {samples[-1].fds}")
    print(f"/dev/shm      {'flat' if shm_flat else 'CHANGED'}: {samples[0].shm} -> {samples[-1].shm} "
          "entries containing 'segvec'")
    counts_ok = sent_transitions == stats["steps"] == taken_transitions and stats["segments_recycled"] == 0 \
        and stats["segments_taken"] == taken_rows
    ok &= counts_ok
    print(f"transitions   {'OK' if counts_ok else 'MISMATCH'}: sent {sent_transitions:,}, stepped "
          f"{stats['steps']:,}, taken {taken_transitions:,} in {taken_rows:,} rows "
          f"(segments_taken {stats['segments_taken']:,}, recycled {stats['segments_recycled']:,})")
    time.sleep(0.5)
    leftover = [p for p in pids[1:] if os.path.exists(f"/proc/{p}")]
    ok &= not leftover
    print(f"after close   {'no worker left' if not leftover else f'workers left: {leftover}'}, "
          f"{shm_entries()} /dev/shm entries containing 'segvec'")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
