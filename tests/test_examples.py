"""Smoke tests of examples/ppo.py, examples/ppo_atari.py and examples/ppo_multiagent.py: a few updates in a subprocess, as a user would run
them, and their command lines (``--help``, errors)."""
from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parent.parent
PPO = ROOT / "examples" / "ppo.py"
PPO_ATARI = ROOT / "examples" / "ppo_atari.py"
PPO_MULTIAGENT = ROOT / "examples" / "ppo_multiagent.py"
LOSSES = ("losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac")


def run_example(tmp_path, script, *flags, expect_rc=0):
    """Runs `script` with `flags` from `tmp_path` (this checkout's segvec first on the path)."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120, env=environment)
    assert out.returncode == expect_rc, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def printed_metrics(stdout: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+/\S+)\s+(\S+)$", stdout, re.MULTILINE)}


def run_ppo(tmp_path, *flags):
    plot = tmp_path / "curve.png"
    out = run_example(tmp_path, PPO, "--total-timesteps", "1024", "--num-envs", "4", "--horizon", "32",
                      "--num-minibatches", "2", "--update-epochs", "2", "--plot-path", str(plot), *flags)
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


def test_ppo_continuous_runs(tmp_path):
    """Pendulum-v1 (Box actions, no reward_threshold): runs its steps, prints finite losses."""
    plot = tmp_path / "curve.png"
    out = run_example(tmp_path, PPO, "--env-id", "Pendulum-v1", "--total-timesteps", "4096", "--num-envs", "4",
                      "--num-minibatches", "2", "--update-epochs", "2", "--plot-path", str(plot))
    assert "not solved" in out.stdout and "after 4100 steps" in out.stdout  # 4 updates of 4 x 256 (its horizon)
    metrics = printed_metrics(out.stdout)
    for name in LOSSES:
        assert math.isfinite(metrics[name]), out.stdout
    assert metrics["charts/episodes"] == 20  # 200-step episodes, truncated: 5 in each env's 1025 steps
    assert plot.exists()


def test_ppo_continuous_lstm_runs(tmp_path):
    """Also: flags given on the command line win over the env's defaults (--horizon, --num-minibatches)."""
    out = run_example(tmp_path, PPO, "--env-id", "Pendulum-v1", "--total-timesteps", "512", "--num-envs", "2",
                      "--horizon", "64", "--num-minibatches", "2", "--update-epochs", "1", "--lstm",
                      "--lstm-hidden", "8", "--plot-path", "")
    assert "after 514 steps" in out.stdout, out.stdout  # 4 updates of 2 x 64 (not CONTINUOUS' 256), + 1 step
    metrics = printed_metrics(out.stdout)
    assert all(math.isfinite(metrics[name]) for name in LOSSES), out.stdout


def test_ppo_help_shows_docs_and_defaults(tmp_path):
    text = " ".join(run_example(tmp_path, PPO, "--help").stdout.split())  # argparse wraps lines
    assert "minibatches per epoch; each holds num_envs / num_minibatches whole rows" in text
    assert "--num-minibatches NUM_MINIBATCHES" in text and "(default: 4)" in text
    assert "gymnasium id of the environment (default: CartPole-v1)" in text
    assert "(default: 475.0)" in text  # CartPole-v1's reward_threshold
    assert "--lstm, --no-lstm recurrent policy" in text


@pytest.mark.parametrize("env_id, shown", [
    ("Acrobot-v1", ["(default: -100.0)", "(default: 128)"]),  # its reward_threshold; discrete defaults
    ("Pendulum-v1", ["(default: inf)", "(default: 256)", "(default: 0.001)"]),  # no threshold; CONTINUOUS
])
def test_ppo_help_shows_the_env_defaults(tmp_path, env_id, shown):
    text = " ".join(run_example(tmp_path, PPO, "--env-id", env_id, "--help").stdout.split())
    for default in shown:
        assert default in text, text


def test_ppo_num_minibatches_must_divide_num_envs(tmp_path):
    out = run_example(tmp_path, PPO, "--num-envs", "4", "--num-minibatches", "3", expect_rc=2)
    assert "error: --num-minibatches 3 must divide --num-envs 4" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_ppo_update_names_the_numbers_when_minibatches_do_not_divide_the_rows(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # ppo.py imports examples/common.py
    import ppo

    args = ppo.Args(num_envs=4, horizon=8, num_minibatches=3)
    agent, optimizer = ppo.make_agent(args, torch.device("cpu"))
    n, T = 4, 8
    rows = ppo.Rows(obs=torch.zeros(n, T, 4), action=torch.zeros(n, T, dtype=torch.long), logprob=torch.zeros(n, T),
                    value=torch.zeros(n, T), advantages=torch.zeros(n, T), returns=torch.zeros(n, T),
                    mask=torch.ones(n, T, dtype=torch.bool), episode_start=torch.zeros(n, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_minibatches=3 does not divide the batch's 4 rows"):
        ppo.ppo_update(agent, optimizer, rows, args)


def test_ppo_replay_runs(tmp_path):
    out = run_ppo(tmp_path, "--replay-ratio", "0.25", "--replay-capacity", "16", "--eval-episodes", "3")
    metrics = printed_metrics(out)
    assert all(math.isfinite(metrics[name]) for name in LOSSES), out
    assert metrics["eval/mean_return"] == metrics["eval/mean_length"] >= 8  # CartPole: 1 a step, >= 8 steps


def test_ppo_lstm_on_cartpole_without_velocities_runs(tmp_path):
    out = run_ppo(tmp_path, "--lstm", "--lstm-hidden", "16", "--mask-velocity", "--replay-ratio", "0.5",
                  "--eval-episodes", "2")
    assert math.isfinite(printed_metrics(out)["eval/mean_return"]), out


def test_ppo_replay_ratio_must_be_a_fraction(tmp_path):
    out = run_example(tmp_path, PPO, "--replay-ratio", "1.0", expect_rc=2)
    assert "error: --replay-ratio 1.0 must be in [0, 1)" in out.stderr, out.stderr


@pytest.mark.parametrize("lstm", [False, True])
def test_batch_minibatches_are_the_torch_indexed_ones(monkeypatch, lstm):
    """The trainer's minibatches gathered by the batch (BatchRows) hold the rows, and the values, that torch
    indexing of the whole batch (Rows.minibatches) gives from the same seed: the update is the same."""
    import numpy as np
    import torch

    import segvec

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import ppo

    fields = {"h": ((3,), np.float32), "c": ((3,), np.float32)} if lstm else None
    envs = segvec.make_vec("CartPole-v1", num_envs=6, backend="serial", horizon=5, num_segments=24,
                           segment_fields=fields)
    try:
        obs, _ = envs.reset(seed=0)
        rng = np.random.default_rng(0)
        for _ in range(16):  # three rows per env: taken rows are not one run of adjacent buffer rows
            extra = {"h": rng.random((6, 3), np.float32), "c": rng.random((6, 3), np.float32)} if lstm else {}
            envs.step(rng.integers(0, 2, 6), value=rng.random(6, np.float32), logprob=rng.random(6, np.float32),
                      **extra)
        batch = envs.take_segments(12)
        batch = batch.rows_view(rng.permutation(12)[:8])  # (a selection: the rows are scattered)
        advantages, returns = rng.random((8, 5), np.float32), rng.random((8, 5), np.float32)
        seg = batch.to_torch()
        whole = ppo.Rows(obs=seg.obs[:, :5], action=seg.action, logprob=seg.logprob, value=seg.value,
                         advantages=torch.as_tensor(advantages), returns=torch.as_tensor(returns), mask=seg.mask,
                         episode_start=seg.episode_start, state=(seg.h, seg.c) if lstm else ())
        torch.manual_seed(3)
        expected = list(whole.minibatches(4))
        torch.manual_seed(3)
        got = list(ppo.BatchRows(batch, advantages, returns, torch.device("cpu")).minibatches(4))
        assert len(got) == len(expected) == 4
        for a, b in zip(got, expected):  # the same rows in the same order: the same update, to the bit
            for name in ("obs", "action", "logprob", "value", "advantages", "returns", "mask", "episode_start"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            for x, y in zip(a.state, b.state):
                assert torch.equal(x, y)
            assert len(a.state) == (2 if lstm else 0) and a.weights is None
    finally:
        envs.close()


def test_ppo_unknown_env_is_a_command_line_error(tmp_path):
    out = run_example(tmp_path, PPO, "--env-id", "NoSuchEnv-v0", expect_rc=2)
    assert "error:" in out.stderr and "NoSuchEnv" in out.stderr and "Traceback" not in out.stderr


def test_ppo_atari_runs(tmp_path):
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")  # AtariPreprocessing resizes with opencv
    plot = tmp_path / "atari.png"
    out = run_example(tmp_path, PPO_ATARI, "--total-timesteps", "256", "--num-envs", "2", "--horizon", "64",
                      "--num-minibatches", "2", "--update-epochs", "1", "--backend", "serial", "--no-cuda",
                      "--torch-threads", "1", "--plot-path", str(plot))
    assert "258 steps" in out.stdout, out.stdout  # 2 updates of 2 x 64, + 1 step
    metrics = printed_metrics(out.stdout)
    assert all(math.isfinite(metrics[name]) for name in LOSSES), out.stdout
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ppo_atari_runs_on_ale_vector_env(tmp_path):
    pytest.importorskip("ale_py")
    out = run_example(tmp_path, PPO_ATARI, "--engine", "ale", "--engine-threads", "1", "--total-timesteps", "256",
                      "--num-envs", "2", "--horizon", "64", "--num-minibatches", "2", "--update-epochs", "1",
                      "--no-cuda", "--torch-threads", "1", "--plot-path", "")
    assert "258 steps" in out.stdout, out.stdout
    metrics = printed_metrics(out.stdout)
    assert all(math.isfinite(metrics[name]) for name in LOSSES), out.stdout


def test_ppo_atari_engine_errors(tmp_path):
    pytest.importorskip("ale_py")
    out = run_example(tmp_path, PPO_ATARI, "--engine", "ale", "--episodic-life", expect_rc=2)
    assert "error: --episodic-life needs Python envs" in out.stderr, out.stderr
    out = run_example(tmp_path, PPO_ATARI, "--engine", "envpol", expect_rc=2)
    assert "error: --engine 'envpol'" in out.stderr, out.stderr


def test_ppo_atari_num_minibatches_error(tmp_path):
    pytest.importorskip("ale_py")
    out = run_example(tmp_path, PPO_ATARI, "--num-envs", "8", "--num-minibatches", "3", expect_rc=2)
    assert "error: --num-minibatches 3 must divide --num-envs 8" in out.stderr, out.stderr


def test_ppo_on_the_c_cartpole_runs(tmp_path):
    run_ppo(tmp_path, "--env-id", "segvec/CartPole-c")


def test_impala_on_a_local_ray_cluster_runs(tmp_path, monkeypatch):
    """examples/impala.py: a few V-trace updates over rows of one runner, on a 127.0.0.1 cluster of its own."""
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the node address: 127.0.0.1
    out = run_example(tmp_path, ROOT / "examples" / "impala.py", "--total-timesteps", "1280", "--num-runners", "1",
                      "--envs-per-runner", "2", "--horizon", "16", "--rows-per-update", "2", "--num-cpus", "1")
    assert "not solved" in out.stdout and "40 updates" in out.stdout, out.stdout  # 1280 / (2 rows x 16 steps)
    metrics = printed_metrics(out.stdout)
    for name in ("losses/value_loss", "losses/policy_loss", "losses/entropy", "charts/SPS"):
        assert math.isfinite(metrics[name]), out.stdout


def test_ppo_multiagent_runs(tmp_path):
    pytest.importorskip("pettingzoo")
    plot = tmp_path / "kaz.png"
    out = run_example(tmp_path, PPO_MULTIAGENT, "--total-timesteps", "512", "--num-envs", "2", "--horizon", "32",
                      "--num-minibatches", "2", "--update-epochs", "1", "--backend", "serial", "--max-cycles", "40",
                      "--plot-path", str(plot))
    assert "knights_archers_zombies_v11: mean game return" in out.stdout, out.stdout
    metrics = printed_metrics(out.stdout)
    assert all(math.isfinite(metrics[name]) for name in LOSSES), out.stdout
    assert metrics["charts/episodes"] > 0
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ppo_multiagent_num_minibatches_error(tmp_path):
    pytest.importorskip("pettingzoo")
    out = run_example(tmp_path, PPO_MULTIAGENT, "--num-envs", "2", "--num-minibatches", "3", expect_rc=2)
    assert "error: --num-minibatches 3 must divide the 8 rows of an update" in out.stderr, out.stderr
