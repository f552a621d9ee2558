"""Smoke tests of examples/ppo.py: a few updates in a subprocess, as a user would run it."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parent.parent
PPO = ROOT / "examples" / "ppo.py"


def run_ppo(tmp_path, *flags):
    plot = tmp_path / "curve.png"
    command = [sys.executable, str(PPO), "--total-timesteps", "1024", "--num-envs", "4", "--horizon", "32",
               "--num-minibatches", "2", "--update-epochs", "2", "--plot-path", str(plot), *flags]
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    for metric in ("charts/episodic_return", "charts/SPS", "losses/value_loss", "losses/policy_loss",
                   "losses/approx_kl"):
        assert metric in out.stdout, out.stdout
    assert "not solved" in out.stdout and "after 1028 steps" in out.stdout  # 8 updates of 4 x 32, + 1 step
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return out.stdout


def test_ppo_runs(tmp_path):
    run_ppo(tmp_path)


def test_ppo_lstm_runs(tmp_path):
    run_ppo(tmp_path, "--lstm", "--lstm-hidden", "16")


def test_ppo_multiprocessing_backend_runs(tmp_path):
    run_ppo(tmp_path, "--backend", "multiprocessing", "--num-workers", "2")


def test_ppo_on_the_c_cartpole_runs(tmp_path):
    run_ppo(tmp_path, "--env-id", "segvec/CartPole-c")
