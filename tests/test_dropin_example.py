"""Smoke tests of examples/gymnasium_dropin.py and examples/sb3_ppo.py, run as scripts with tiny step counts.

The drop-in example is also run with its one segvec line put back to the gymnasium line it replaced (kept
in the comment above it): both runs must print the same training, number for number.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SEGVEC_LINE = re.compile(r"^(\s*)envs = segvec\.make_vec\(.*# <-- segvec.*$", re.MULTILINE)
BEFORE_LINE = re.compile(r"^\s*# before: (envs = gym\.make_vec\(.*\))\s*$", re.MULTILINE)


def run_script(path: pathlib.Path, *flags: str, timeout: float = 120) -> str:
    result = subprocess.run([sys.executable, str(path), *flags], capture_output=True, text=True, timeout=timeout,
                            cwd=EXAMPLES.parent)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_gymnasium_dropin_differs_from_gymnasium_by_one_line_and_trains_the_same(tmp_path):
    source = (EXAMPLES / "gymnasium_dropin.py").read_text()
    assert len(SEGVEC_LINE.findall(source)) == 1 and len(BEFORE_LINE.findall(source)) == 1
    original = SEGVEC_LINE.sub(lambda m: m.group(1) + BEFORE_LINE.search(source).group(1), source)
    changed = [(a, b) for a, b in zip(source.splitlines(), original.splitlines()) if a != b]
    assert len(changed) == 1 and "gym.make_vec" in changed[0][1]
    gymnasium_version = tmp_path / "gymnasium_dropin_original.py"
    gymnasium_version.write_text(original)

    flags = ("--total-timesteps", "3000", "--num-envs", "4", "--episodes-per-update", "4")
    on_segvec = run_script(EXAMPLES / "gymnasium_dropin.py", *flags)
    on_gymnasium = run_script(gymnasium_version, *flags)
    assert "charts/episodic_return=" in on_segvec and re.search(r"episodes=\d+ mean_return_last_20=", on_segvec)
    strip_speed = re.compile(r" charts/SPS=\d+")
    assert strip_speed.sub("", on_segvec) == strip_speed.sub("", on_gymnasium)


def test_sb3_ppo_example_runs():
    pytest.importorskip("stable_baselines3", reason="stable-baselines3 is not installed (pip install -e .[sb3])")
    out = run_script(EXAMPLES / "sb3_ppo.py", "--total-timesteps", "256", "--num-envs", "4", "--num-workers", "2",
                     "--n-steps", "32", "--batch-size", "64", "--n-epochs", "1", "--eval-episodes", "2")
    assert re.search(r"global_step=256 charts/episodic_return=[\d.]+ charts/SPS=\d+", out), out
    assert re.search(r"eval/mean_return=[\d.]+ eval/std_return=[\d.]+ episodes=2", out), out
