"""The C core under ThreadSanitizer and ASan+UBSan: native/stress/sanitize.sh builds a threaded driver of the
core's calls (native/stress/driver.c: one learner thread, worker threads that fail, restart and die) and a
driver of the C envs' batch loops (native/stress/env_driver.c), and runs them over a few configurations; any
sanitizer report or protocol violation fails it."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "native", "stress", "sanitize.sh")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not on PATH: the sanitizer builds need it")
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not on PATH: sanitize.sh needs it")
def test_core_runs_clean_under_thread_and_address_sanitizers():
    # 2 s per run: 9 runs (3 configurations x 2 builds, 3 of the env driver) plus three builds, ~35 s on 2 cores.
    result = subprocess.run(["bash", SCRIPT, "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, output[-20000:]
    assert lines and lines[-1] == "sanitizers: 9 runs, 0 reports", output[-20000:]
