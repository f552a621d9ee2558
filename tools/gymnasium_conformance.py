"""Runs Gymnasium's own vector-env test suite with `segvec.SegmentVecEnv` standing in for AsyncVectorEnv.

    python tools/gymnasium_conformance.py PATH/TO/Gymnasium            # both shared_memory defaults
    python tools/gymnasium_conformance.py PATH/TO/Gymnasium --shared-memory false -- -x -k reset

``PATH/TO/Gymnasium`` is a checkout of Gymnasium's repository at the release that is installed (its
``tests/vector/`` is what runs).  Every ``AsyncVectorEnv(env_fns, **kwargs)`` the tests build becomes
``SegmentVecEnv(env_fns, backend="multiprocessing", **kwargs)``; a test that passes no ``shared_memory`` gets
the default of the run.  The report counts the tests that built at least one segvec env ("ours") apart from
the tests of Gymnasium's other classes (and from the tests a space skips: gymnasium's suite skips dynamic spaces
under shared memory), and lists every failure of ours.  Exit status 0 when all of ours pass.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import segvec


class SubstitutePlugin:
    """A pytest plugin: substitutes the class before collection, and tells which tests built one."""

    def __init__(self, shared_memory: bool):
        self.shared_memory = shared_memory
        self.built = 0
        self.outcomes: dict[str, tuple[bool, str]] = {}  # nodeid -> (built segvec, outcome)
        self._built_at_start: dict[str, int] = {}

    def pytest_configure(self, config):
        import gymnasium.vector
        import gymnasium.vector.async_vector_env

        plugin = self

        class AsyncVectorEnv(segvec.SegmentVecEnv):
            """``SegmentVecEnv`` on the multiprocessing backend, under AsyncVectorEnv's name."""

            def __init__(self, env_fns, **kwargs):
                plugin.built += 1
                kwargs.setdefault("shared_memory", plugin.shared_memory)
                super().__init__(env_fns, backend="multiprocessing", **kwargs)

        gymnasium.vector.AsyncVectorEnv = AsyncVectorEnv
        gymnasium.vector.async_vector_env.AsyncVectorEnv = AsyncVectorEnv

    def pytest_runtest_logstart(self, nodeid, location):
        self._built_at_start[nodeid] = self.built

    def pytest_runtest_logreport(self, report):
        built = self.built > self._built_at_start.get(report.nodeid, self.built)
        previous_built, previous = self.outcomes.get(report.nodeid, (False, "passed"))
        outcome = previous if previous != "passed" else report.outcome
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.nodeid] = (built or previous_built, outcome)


def run(gymnasium_root: Path, shared_memory: bool, pytest_args: list[str]) -> tuple[int, int, list[str]]:
    """Runs the suite once; returns ``(ours passed, ours total, failures of ours)``."""
    plugin = SubstitutePlugin(shared_memory)
    os.chdir(gymnasium_root)
    sys.path.insert(0, str(gymnasium_root))
    pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(gymnasium_root), "-o", "addopts=",
                 "--timeout", "120", "tests/vector", *pytest_args], plugins=[plugin])
    ours = {node: outcome for node, (built, outcome) in plugin.outcomes.items() if built and outcome != "skipped"}
    failures = sorted(node for node, outcome in ours.items() if outcome == "failed")
    passed = sum(outcome == "passed" for outcome in ours.values())
    return passed, len(ours), failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gymnasium_root", type=Path, help="a checkout of Gymnasium's repository")
    parser.add_argument("--shared-memory", choices=["both", "true", "false"], default="both",
                        help="the shared_memory default of tests that pass none")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.pytest_args = argv[split + 1:]
    root = args.gymnasium_root.resolve()
    if args.shared_memory == "both":  # one process per setting: pytest imports the test modules once
        statuses = [subprocess.run([sys.executable, __file__, str(root), "--shared-memory", setting, "--",
                                    *args.pytest_args]).returncode for setting in ("true", "false")]
        return int(any(statuses))
    shared_memory = args.shared_memory == "true"
    passed, total, failures = run(root, shared_memory, args.pytest_args)
    lines = [f"shared_memory={shared_memory}: {passed} of {total} tests that build a SegmentVecEnv passed"]
    lines.extend(f"    FAILED {node}" for node in failures)
    print("\n".join(lines))
    return int(passed != total or total == 0)


if __name__ == "__main__":
    sys.exit(main())
