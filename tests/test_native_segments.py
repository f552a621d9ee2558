"""Exactly-once delivery and exact bootstraps for envs written in C, with the checks the Python envs pass.

`native_envs.NativeCounterEnv` is `envs.CounterEnv` in C, draw for draw, so `test_segments.drive` and
`test_segments.check` run unchanged over it: every taken row is compared slot for slot with the plain
sequential loop of the Python env (observations, actions, rewards, terminations, truncations, masks,
values, bootstraps, GAE, SAME_STEP final observations), on both backends, in NEXT_STEP, SAME_STEP and
DISABLED modes, with flushes, takes and reseeded resets.  `native_envs.NativeCountingEnv` is
`storm.CountingEnv` in C: failing envs rebuilt (restart_failed_envs), dead workers replaced, a kill storm,
each checked by `storm.assert_exactly_once`.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segvec
from conftest import backend_options
from envs import counter_fns, policy
from native_envs import NativeCountingEnv, native_counter_fns, native_counting_factory
from segvec.runner import NativeEnvRunner
from storm import Collector, assert_exactly_once, collect, kill_storm
from test_segments import DISABLED, NEXT, OPS, SAME, Config, _cycle, check, config_strategy, drive


@pytest.fixture
def c_steps(monkeypatch):
    """Counts the batches NativeEnvRunner steps in this process (the serial backend's)."""
    calls = []
    original = NativeEnvRunner.step

    def counted(self, env_ids):
        calls.append(len(env_ids))
        return original(self, env_ids)

    monkeypatch.setattr(NativeEnvRunner, "step", counted)
    return calls


def _exactly_once(cfg, data):
    run = drive(cfg, lambda k: data.draw(st.integers(0, k)), lambda: data.draw(OPS),
                env_fns=native_counter_fns(cfg.num_envs, cfg.max_length))
    check(cfg, run)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy("serial", 6, 150), data=st.data())
def test_exactly_once_serial(cfg, data):
    _exactly_once(cfg, data)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy("multiprocessing", 6, 120), data=st.data())
def test_exactly_once_multiprocessing(cfg, data):
    _exactly_once(cfg, data)


@pytest.mark.parametrize("mode, face, value_fn", [(NEXT, "step", False), (SAME, "async", True), (SAME, "step", False),
                                                  (DISABLED, "step", True), (NEXT, "async", True)],
                         ids=["NEXT-step", "SAME-async-value_fn", "SAME-step", "DISABLED-step", "NEXT-async"])
def test_rows_are_the_sequential_reference(backend, mode, face, value_fn, c_steps):
    """Fixed schedules of takes, flushes (3) and reseeded resets (4) over every mode."""
    cfg = Config(backend, mode, face, num_envs=4, batch_size=2 if face == "async" else 4, horizon=5,
                 segments_per_env=5, seed=17, max_length=6, use_value_fn=value_fn, iterations=160)
    run = drive(cfg, _cycle(0, 2, 1, 1, 3, 0, 2, 4, 1), env_fns=native_counter_fns(4, 6))
    check(cfg, run)
    assert c_steps if backend == "serial" else True, "the envs were stepped in C"


def test_episodes_and_stats_are_those_of_the_python_env(backend):
    """The same seeds and actions give the same episodes() records and counters as the Python env."""
    results = []
    for fns in (counter_fns(4, 7), native_counter_fns(4, 7)):
        envs = segvec.make_vec(fns, num_envs=4, horizon=6, **backend_options(backend, 4))
        try:
            obs, _ = envs.reset(seed=8)
            for _ in range(90):
                obs = envs.step(policy(obs))[0]
            episodes = envs.episodes()
            stats = envs.stats()
        finally:
            envs.close()
        results.append((episodes, {k: stats[k] for k in ("steps", "episodes", "segments_completed")}))
    (python_episodes, python_stats), (c_episodes, c_stats) = results
    assert python_stats == c_stats and python_stats["episodes"] > 20
    for key in ("env_id", "return", "length", "end_step"):
        np.testing.assert_array_equal(c_episodes[key], python_episodes[key], err_msg=key)


# ---- failures, restarts, dead workers ------------------------------------------------------------------
def test_a_failing_c_env_raises_env_error_and_is_failed_until_reset(backend):
    envs = segvec.make_vec([native_counting_factory(i, 5 if i == 1 else 0) for i in range(2)], num_envs=2,
                           horizon=4, **backend_options(backend, 2))
    try:
        obs, _ = envs.reset(seed=0)
        with pytest.raises(segvec.EnvError, match="broke") as error:
            for _ in range(10):
                obs = envs.step(np.zeros(2, np.int64))[0]
        assert error.value.env_index == 1 and isinstance(error.value, segvec.native.NativeEnvError)
        with pytest.raises(segvec.NotReceivedError, match="failed"):
            envs.step(np.zeros(2, np.int64))
        envs.reset(seed=1)
        envs.step(np.zeros(2, np.int64))
    finally:
        envs.close()


def test_failing_c_envs_are_rebuilt_and_nothing_is_lost(backend, c_steps):
    num_envs = 4
    envs = segvec.SegmentVecEnv([native_counting_factory(i, 11) for i in range(num_envs)], backend=backend,
                                num_workers=None if backend == "serial" else 2, horizon=5, num_segments=64,
                                restart_failed_envs=True)
    try:
        rows, restarts_seen, current_obs = collect(envs, rounds=60, error_text="broke")
        stats = envs.stats()
    finally:
        envs.close()
    assert stats["restarts"] == restarts_seen > 0
    assert assert_exactly_once(rows, num_envs, current_obs) == restarts_seen
    assert c_steps if backend == "serial" else True


def test_a_dead_workers_c_envs_restart():
    envs = segvec.SegmentVecEnv([native_counting_factory(i, 0) for i in range(4)], backend="multiprocessing",
                                num_workers=2, horizon=4, batch_size=2, restart_failed_envs=True)
    try:
        collector = Collector(envs)
        envs.async_reset(seed=0)
        first_builds = envs.get_attr("build")
        for i in range(300):
            collector.round()
            if i == 50:
                os.kill(envs._backend.processes[1].pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
            if i > 50:
                assert time.monotonic() < deadline, "the dead worker was not replaced"
        collector.finish()
        builds = envs.get_attr("build")
        assert builds[:2] == first_builds[:2] and builds[2] != first_builds[2] and builds[3] != first_builds[3]
        restarts = assert_exactly_once(collector.rows, 4, collector.current_obs)
        assert restarts == envs.stats()["restarts"] == 2
    finally:
        envs.close()


@pytest.mark.timeout(120)
def test_kill_storm_loses_and_duplicates_nothing_with_c_envs():
    result = kill_storm(seconds=4, kill_every=0.3, seed=3, env_factory=native_counting_factory)
    print(result)
    assert result["kills"] >= 6
    assert isinstance(NativeCountingEnv(0), segvec.native.NativeEnv)
