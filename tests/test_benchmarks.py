"""Smoke tests of benchmarks/throughput.py, benchmarks/handoff.py and benchmarks/memory.py: tiny runs print
their tables (no timing asserts)."""
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_throughput_quick_prints_a_table():
    ale = importlib.util.find_spec("ale_py") is not None
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--envs", "cartpole,light",
         "--num-envs", "2", "--methods", "raw,gym-sync,segvec-serial,segvec-sync,segvec-async,segvec-share",
         "--seconds", "0.1", "--warmup", "0.05", "--c-envs", "0", "--engines", "ale" if ale else "none", "--multiagent", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "machine:" in out
    assert "CartPole-v1" in out and "segvec/SyntheticAtari-v0" in out
    labels = ["gymnasium SyncVectorEnv", "segvec serial", "segvec multiprocessing sync", "segvec multiprocessing async",
              "segvec mp sync + learner share"]
    if ale:
        assert "Pong on ale" in out
        labels += ["ale-py AtariVectorEnv", "segvec over AtariVectorEnv"]
    for label in labels:
        row = next(line for line in out.splitlines() if line.strip().startswith(label))
        assert re.search(r"[\d,]+\s+\d+%\s+[\d.]+x", row), row
    assert "targets" in out
    assert re.search(r"\d+ PASS, \d+ MISS", out)


def test_throughput_c_envs_table_prints_ratios_to_the_c_loop():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--envs", "none", "--c-envs", "64",
         "--c-methods", "c-loop,segvec-c-serial,segvec-c-sync,segvec-c-async", "--seconds", "0.1", "--warmup", "0.05",
         "--multiagent", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "segvec/CartPole-c" in out and "x loop" in out
    for label in ("plain C loop", "segvec serial + segments", "segvec multiprocessing sync + segments",
                  "segvec mp async (n/2) + segments"):
        row = next(line for line in out.splitlines() if line.strip().startswith(label))
        assert re.search(r"[\d,]+\s+\d+%\s+[\d.]+x", row), row


def test_throughput_multiagent_table_prints_agent_steps():
    pytest.importorskip("pettingzoo")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--envs", "none", "--c-envs", "0",
         "--engines", "none", "--multiagent", "2", "--seconds", "0.1", "--warmup", "0.05"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "knights_archers_zombies_v11" in out and "agent steps/s" in out
    for label in ("raw single ParallelEnv", "segvec make_multiagent sync", "segvec make_multiagent async"):
        row = next(line for line in out.splitlines() if line.strip().startswith(label))
        assert re.search(r"[\d,]+\s+\d+%\s+[\d.]+x", row), row
    assert ">= 2 x SuperSuit" in out


def test_handoff_quick_prints_every_line():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "handoff.py"), "--envs", "4", "--transitions", "256",
         "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if " segvec " in line]
    assert len(lines) == 12, result.stdout
    for case in ("CartPole (4 float32)", "84x84x4 uint8"):
        for kind in ("contiguous", "non-contiguous"):
            for line in ("take ", "take + to_torch()", "take + minibatch epoch"):
                assert any(row.startswith(case) and f" {kind} " in row and f"segvec {line}" in row
                           and re.search(r"ratio\s+[\d.]+x$", row) for row in lines), (case, kind, line)


def test_ray_rollouts_quick_prints_the_table_transport_and_model():
    if importlib.util.find_spec("ray") is None:
        import pytest

        pytest.skip("ray is not installed (pip install -e .[ray])")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ray_rollouts.py"), "--envs", "2", "--seconds", "0.5",
         "--warmup", "0.5", "--repeats", "1", "--transport-rows", "1", "--transport-calls", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    for label in ("local-mp", "ray"):
        row = next(line for line in out.splitlines() if line.startswith(label + " "))
        assert re.search(r"[\d,]+\s+\d+%\s+[\d.]+x$", row), row
    assert re.search(r"target: ray >= 0.8x local-mp: (PASS|MISS)", out)
    for line in ("copy out of the segment block", "ship (actor -> store -> learner)", "fetch (learner's ray.get)"):
        assert re.search(re.escape(line) + r"\s+[\d.]+ ms/row", out), out
    assert re.search(r"expected: [\d,]+ steps/s", out)


def test_memory_prints_both_policies_and_draws_the_figure(tmp_path):
    figure = tmp_path / "memory.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--total-timesteps", "512", "--eval-episodes", "2",
         "--plot-path", str(figure)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for policy in ("LSTM", "feed-forward"):  # 2 updates of 8 envs x 32 steps, + 1 step: 520 steps
        row = next(line for line in result.stdout.splitlines() if line.startswith(policy + " "))
        assert re.search(r"\s520\s+[\d.]+\s+\d+\s+[\d.]+\s+[\d.]+$", row), row
    assert re.search(r"LSTM / feed-forward: eval return [\d.]+x", result.stdout), result.stdout
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
