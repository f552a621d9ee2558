"""restart_failed_envs: a failing env (or a dead worker's envs) is rebuilt and training goes on, with no
transition lost or duplicated: each restart cuts its episode as a truncation bootstrapped by the value
already sent.  Also worker deaths at the worst moments: a worker killed while the learner holds every
row, during a reset, during a call, and a storm of kills (checked against each env's own step counter).
"""
import os
import signal
import threading
import time

import numpy as np
import pytest

import segvec
from storm import Collector, assert_exactly_once, collect, factory, kill_storm

BACKENDS = ["serial", "multiprocessing"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_failing_env_is_rebuilt_and_nothing_is_lost(backend):
    num_envs, fail_every = 4, 11
    envs = segvec.SegmentVecEnv([factory(i, fail_every) for i in range(num_envs)], backend=backend,
                                num_workers=None if backend == "serial" else 2, horizon=5,
                                num_segments=64, restart_failed_envs=True)
    try:
        rows, restarts_seen, current_obs = collect(envs, rounds=60)
        stats = envs.stats()
    finally:
        envs.close()
    assert stats["restarts"] == restarts_seen > 0
    assert assert_exactly_once(rows, num_envs, current_obs) == restarts_seen


def test_dead_worker_is_replaced_and_its_envs_restart():
    envs = segvec.SegmentVecEnv([factory(i, 0) for i in range(4)], backend="multiprocessing", num_workers=2,
                                horizon=4, batch_size=2, restart_failed_envs=True)
    try:
        envs.async_reset(seed=0)
        first_builds = envs.get_attr("build")
        restarted = set()
        killed_at = None
        for i in range(100000):
            obs, reward, terminated, truncated, info = envs.recv(timeout=10)
            if "env_restarted" in info:
                restarted.update(info["env_id"][info["_env_restarted"]].tolist())
            envs.send(obs[:, 3].astype(np.int64) % 3, info["env_id"])
            if i == 50:
                os.kill(envs._backend.processes[1].pid, signal.SIGKILL)
                killed_at = time.monotonic()
            if killed_at and restarted and i > 200:
                break
            assert killed_at is None or time.monotonic() - killed_at < 10, "the dead worker was not replaced"
        assert restarted == {2, 3}
        assert envs.stats()["restarts"] == 2
        builds = envs.get_attr("build")
        assert builds[:2] == first_builds[:2] and builds[2] != first_builds[2] and builds[3] != first_builds[3]
    finally:
        envs.close()


# ---- worker deaths at the worst moments ------------------------------------------------------------
@pytest.mark.timeout(60)
def test_worker_killed_while_the_learner_holds_every_row_duplicates_nothing():
    """A worker dies while the learner holds every row (the envs cannot move on); its
    replacement restarts the envs, and no row is handed out twice, lost, or released in error."""
    num_envs = 4
    envs = segvec.SegmentVecEnv([factory(i, 0) for i in range(num_envs)], backend="multiprocessing",
                                num_workers=2, horizon=2, num_segments=2 * num_envs, restart_failed_envs=True)
    kills = []

    def kill_a_worker():
        if len(kills) < 3:
            victim = envs._backend.processes[len(kills) % 2]
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(5)
            kills.append(victim.pid)

    try:
        collector = Collector(envs)
        envs.async_reset(seed=0)
        for _ in range(120):
            collector.round(on_exhausted=kill_a_worker)
        collector.finish()
        assert collector.exhausted >= 3 and len(kills) == 3
        restarts = assert_exactly_once(collector.rows, num_envs, collector.current_obs)
        assert restarts == envs.stats()["restarts"] > 0
    finally:
        envs.close()


@pytest.mark.timeout(60)
def test_worker_killed_during_reset_is_replaced_and_the_reset_completes():
    """A worker killed while it resets its envs; the replacement resets them again with
    the same seeds, and reset_wait returns."""
    from fault_envs import fault_fns

    envs = segvec.SegmentVecEnv(fault_fns(4, "slow_reset", target=2, delay=1.0), backend="multiprocessing",
                                num_workers=2, horizon=4, restart_failed_envs=True)
    try:
        envs.reset(seed=0)
        envs.reset_async(seed=10)
        time.sleep(0.3)  # worker 1 sleeps in env 2's reset
        victim = envs._backend.processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        start = time.monotonic()
        obs, _ = envs.reset_wait(timeout=15)
        assert time.monotonic() - start < 10
        assert obs[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert envs._backend.processes[1].pid != victim.pid
        assert envs.get_attr("np_random_seed") == (10, 11, 12, 13), "replaced envs reset with the same seeds"
        for _ in range(3):
            envs.step(np.zeros(4, np.int64))
    finally:
        envs.close()


@pytest.mark.timeout(60)
def test_worker_killed_during_call_raises_worker_died_and_training_goes_on():
    """A worker killed during call() with restart_failed_envs raises WorkerDied (not a
    bare EOFError); the replacement takes over and stepping goes on."""
    from fault_envs import fault_fns

    envs = segvec.SegmentVecEnv(fault_fns(4), backend="multiprocessing", num_workers=2, horizon=4,
                                restart_failed_envs=True)
    try:
        envs.reset(seed=0)
        victim = envs._backend.processes[1]
        threading.Timer(0.3, os.kill, (victim.pid, signal.SIGKILL)).start()
        with pytest.raises(segvec.WorkerDied, match="replaced"):
            envs.call("slow_call", 2.0)
        assert envs.call("slow_call", 0.0) == (0, 1, 2, 3)
        _, _, _, truncated, info = envs.step(np.zeros(4, np.int64))
        assert truncated.tolist() == [False, False, True, True], "envs of the dead worker restart"
        assert info["_env_restarted"].tolist() == [False, False, True, True]
        envs.step(np.zeros(4, np.int64))
    finally:
        envs.close()


@pytest.mark.timeout(120)
def test_kill_storm_loses_and_duplicates_nothing():
    """A random worker SIGKILLed every ~0.3 s while the learner holds batches: every transition
    lands exactly once, no row is handed out twice, nothing hangs (benchmarks/soak.py --kill-every runs
    the long version)."""
    result = kill_storm(seconds=6, kill_every=0.3, seed=1)
    print(result)
    assert result["kills"] >= 10
