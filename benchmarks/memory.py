"""A task that needs memory: examples/ppo.py on CartPole-v1 without velocities (``--mask-velocity``), with the
LSTM policy (``--lstm``: the state at each row's first step is a segment field, ``episode_start`` resets it
inside rows) against the feed-forward one, the same seed, the same budget of env steps and the same
`HYPERPARAMETERS`.  Both see the observations normalized by their running statistics (``--norm-obs``: the
pole's angle moves by hundredths of a radian a step, and the LSTM has to tell its velocity from those
differences).

Each run is a fresh process of examples/ppo.py with ``--curve-path``; this script prints one line per policy
(steps, wall time, the mean return of the last 20 training episodes, the greedy policy's mean return over
``--eval-episodes`` evaluation episodes) and the LSTM's ratio to the feed-forward policy, and draws both
learning curves in one figure.

    python benchmarks/memory.py                                   # 150k steps each, docs/img/ppo_masked_cartpole.png
    python benchmarks/memory.py --total-timesteps 20000 --plot-path ""
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PPO = ROOT / "examples" / "ppo.py"
FINAL = re.compile(r"^(?:solved|not solved): mean return of the last \d+ episodes ([-0-9.na]+) after (\d+) steps, "
                   r"(\d+) episodes, ([0-9.]+) s", re.MULTILINE)
EVAL = re.compile(r"^eval/mean_return\s+(\S+)$", re.MULTILINE)
POLICIES = (("LSTM", ["--lstm"]), ("feed-forward", []))
HYPERPARAMETERS = ["--norm-obs", "--horizon", "32", "--num-minibatches", "1", "--update-epochs", "10", "--gamma", "0.98",
                   "--gae-lambda", "0.98", "--learning-rate", "1e-3"]
"""Both policies' flags beside CartPole's defaults: short rows, one minibatch of all 8, ten epochs."""


def run(flags: list[str], options, curve: pathlib.Path) -> dict:
    """One training run; its printed totals and its learning curve."""
    command = [sys.executable, str(PPO), "--mask-velocity", *HYPERPARAMETERS, "--total-timesteps", str(options.total_timesteps),
               "--seed", str(options.seed), "--solved-return", "inf", "--plot-path", "", "--curve-path", str(curve),
               "--eval-episodes", str(options.eval_episodes), *flags]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-4000:]}")
    final, evaluation = FINAL.search(out.stdout), EVAL.search(out.stdout)
    with open(curve) as f:
        rows = list(csv.DictReader(f))
    return {"last20": float(final.group(1)), "steps": int(final.group(2)), "episodes": int(final.group(3)),
            "seconds": float(final.group(4)), "eval": float(evaluation.group(1)),
            "curve": ([int(r["step"]) for r in rows], [float(r["return"]) for r in rows])}


def plot(path: str, results: dict, options) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    window = 20
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        steps, returns = map(np.asarray, result["curve"])
        line = ax.plot(steps, returns, ".", alpha=0.15, markersize=3)[0]
        if len(returns) >= window:
            rolling = np.convolve(returns, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], rolling, color=line.get_color(),
                    label=f"{name} ({result['seconds']:.0f} s)")
    ax.set_xlabel("env steps")
    ax.set_ylabel(f"episode return (dots; lines: mean of the last {window})")
    ax.set_title(f"PPO on CartPole-v1 without velocities, seed {options.seed}, 8 envs (segvec, 2-core CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-timesteps", type=int, default=150_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--plot-path", default=str(ROOT / "docs" / "img" / "ppo_masked_cartpole.png"))
    options = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in POLICIES:
            results[name] = run(flags, options, pathlib.Path(tmp) / f"{len(results)}.csv")
    print(f"{datetime.date.today()}  CartPole-v1 without velocities, seed {options.seed}, "
          f"{options.total_timesteps} steps each, {os.cpu_count()} CPUs (timings: a shared, noisy machine)")
    print(f"{'policy':14s} {'steps':>8s} {'wall s':>8s} {'episodes':>9s} {'last 20 mean':>13s} {'eval mean':>10s}")
    for name, r in results.items():
        print(f"{name:14s} {r['steps']:8d} {r['seconds']:8.1f} {r['episodes']:9d} {r['last20']:13.1f} {r['eval']:10.1f}")
    lstm, ff = results["LSTM"], results["feed-forward"]
    print(f"LSTM / feed-forward: eval return {lstm['eval'] / ff['eval']:.2f}x, last-20 return "
          f"{lstm['last20'] / ff['last20']:.2f}x, wall time {lstm['seconds'] / ff['seconds']:.2f}x")
    if options.plot_path:
        plot(options.plot_path, results, options)
        print(f"figure: {os.path.relpath(options.plot_path, ROOT)}")


if __name__ == "__main__":
    main()
