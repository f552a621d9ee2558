"""The multiprocessing backend with ``learner_share=True``: worker 0's envs step in the learner's process.

Against the plain sequential reference of `test_segments` (every transition exactly once, exact bootstraps,
both faces, NEXT_STEP and SAME_STEP), against the serial and plain multiprocessing backends (same seeds and
actions, same taken batches), and through faults: a local env that raises (named, reset, go on; rebuilt
with restart_failed_envs), a worker process SIGKILLed (replaced), Ctrl-C inside a local env, close.
"""
from __future__ import annotations

import os
import signal

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segvec
from segvec._core import MemoryBlock
from segvec.runner import NativeEnvRunner

from envs import CounterEnv, TextEnv, counter_fns
from fault_envs import fault_fns
from test_determinism import assert_same_runs, run
from test_faults import assert_gone, check_env_error, closed_twice, sigint_after
from test_segments import NEXT, SAME, Config, _cycle, _exactly_once, check, config_strategy, drive

pytestmark = pytest.mark.timeout(60)  # a wait that never ends fails here, and no test needs more than seconds

NUM_ENVS = 4  # two workers: envs 0, 1 in the learner, envs 2, 3 in one worker process


def make(fns, **options) -> segvec.SegmentVecEnv:
    options.setdefault("num_workers", 2)
    options.setdefault("horizon", 8)
    return segvec.SegmentVecEnv(fns, backend="multiprocessing", learner_share=True, **options)


def zeros(n: int = NUM_ENVS) -> np.ndarray:
    return np.zeros(n, np.int64)


def pid_of(env) -> int:
    """The process an env lives in (for ``call``)."""
    return os.getpid()


def steps_of(env) -> int:
    """How many times an env was stepped."""
    return env.unwrapped.steps


class CountingEnv(CounterEnv):
    """A `CounterEnv` that counts its ``step`` calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def step(self, action):
        self.steps += 1
        return super().step(action)


@pytest.fixture(autouse=True)
def nothing_left_behind(monkeypatch):
    """Every worker process a test started is gone after it, and every shared-memory name it made."""
    names, blocks = [], MemoryBlock.__init__

    def recording_init(self, *args, **kwargs):
        blocks(self, *args, **kwargs)
        if self.name is not None:
            names.append(self.name)

    monkeypatch.setattr(MemoryBlock, "__init__", recording_init)
    children = set(multiprocessing_children())
    yield
    assert_gone(set(multiprocessing_children()) - children, names)


def multiprocessing_children() -> list[int]:
    import multiprocessing
    return [process.pid for process in multiprocessing.active_children()]


# ---- where the envs run ---------------------------------------------------------------------------
def test_worker_0s_envs_step_in_the_learners_process_exactly_once_per_step():
    envs = make([lambda i=i: CountingEnv(index=i) for i in range(NUM_ENVS)], horizon=4)
    pids = envs.call(pid_of)
    assert pids[:2] == (os.getpid(),) * 2 and os.getpid() not in pids[2:] and pids[2] == pids[3]
    assert envs._backend.processes[0] is None and envs._backend.processes[1].pid == pids[2]
    envs.reset(seed=0)
    for _ in range(5):
        envs.step_async(zeros())
        envs.step_wait(timeout=5)
    envs.async_reset(seed=1)
    for _ in range(5):
        *_, infos = envs.recv(timeout=5)
        envs.send(zeros(len(infos["env_id"])), infos["env_id"])
    envs.recv(timeout=5)
    assert envs.call(steps_of) == (10,) * NUM_ENVS, "every env, local or not, steps once per action"
    closed_twice(envs)


def test_one_worker_runs_every_env_in_the_learner():
    envs = make(fault_fns(2), num_workers=1)
    assert envs._backend.processes == [None] and envs.call(pid_of) == (os.getpid(),) * 2
    obs, _ = envs.reset(seed=0)
    assert envs.step(zeros(2))[1].tolist() == [1.0, 1.0]
    closed_twice(envs)


# ---- against the sequential reference -------------------------------------------------------------
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy("share", 6, 100), data=st.data())
def test_exactly_once(cfg, data):
    _exactly_once(cfg, data)


@pytest.mark.parametrize("mode, face, batch_size, use_value_fn, schedule", [
    (NEXT, "step", 4, False, (0, 2, 0, 1, 1)),
    (SAME, "step", 4, True, (0, 1, 2, 3, 0)),
    (NEXT, "async", 2, False, (2, 0, 1, 1, 3, 0)),
    (SAME, "async", 2, True, (2, 0, 1, 1, 3, 0)),
])
def test_segments_and_bootstraps_match_the_reference(mode, face, batch_size, use_value_fn, schedule):
    cfg = Config("share", mode, face, num_envs=4, batch_size=batch_size, horizon=5, segments_per_env=4, seed=3,
                 max_length=6, use_value_fn=use_value_fn, iterations=90)
    check(cfg, drive(cfg, _cycle(*schedule)))


@pytest.mark.parametrize("face", ["gymnasium", "async"])
def test_same_batches_as_the_serial_and_multiprocessing_backends(face):
    reference = run("serial", face)
    assert_same_runs(reference, run("multiprocessing", face), f"multiprocessing vs serial, {face}")
    assert_same_runs(reference, run("share", face), f"learner share vs serial, {face}")


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP], ids=lambda m: m.name)
def test_infos_and_final_infos_are_the_serial_backends(mode):
    """Every step's infos (SAME_STEP: final_obs and final_info of the envs whose episode ended) are the serial
    backend's, key for key and env for env, local envs and remote ones alike."""
    fns = fault_fns(NUM_ENVS, infos=True, episode_length=3)
    serial = segvec.SegmentVecEnv(fns, backend="serial", autoreset_mode=mode, horizon=4)
    share = make(fns, autoreset_mode=mode, horizon=4)
    try:
        got, want = share.reset(seed=2)[1], serial.reset(seed=2)[1]
        finals = 0
        for t in range(10):
            actions = np.array([(t + e) % 2 for e in range(NUM_ENVS)], np.int64)
            *outcome, got = share.step(actions)
            *expected, want = serial.step(actions)
            for a, b in zip(outcome, expected):
                np.testing.assert_array_equal(a, b)
            assert got.keys() == want.keys(), t
            for key in want:
                if key == "final_info":
                    assert got[key].keys() == want[key].keys()
                    for inner in want[key]:
                        np.testing.assert_array_equal(got[key][inner], want[key][inner])
                else:
                    np.testing.assert_array_equal(np.stack(got[key]), np.stack(want[key]), err_msg=f"{key}, step {t}")
            finals += int(want.get("_final_obs", np.zeros(1, bool)).sum())
        assert finals == (12 if mode == AutoresetMode.SAME_STEP else 0), "every env ends episodes of 3 steps"
    finally:
        share.close()
        serial.close()


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP], ids=lambda m: m.name)
def test_c_envs_are_gymnasiums_cartpole(mode):
    theirs = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make("CartPole-v1")] * NUM_ENVS,
                                            autoreset_mode=mode)
    ours = segvec.make_vec("segvec/CartPole-c", num_envs=NUM_ENVS, autoreset_mode=mode, horizon=16,
                           num_workers=2, learner_share=True)
    try:
        assert isinstance(ours._backend.local.runner, NativeEnvRunner)
        assert ours.reset(seed=11)[0].tobytes() == theirs.reset(seed=11)[0].tobytes()
        for t in range(300):
            actions = np.array([(t // 7 + e) % 2 for e in range(NUM_ENVS)], np.int64)
            got, want = ours.step(actions), theirs.step(actions)
            for a, b in zip(got[:4], want[:4]):
                np.testing.assert_array_equal(a, b)
            if mode == AutoresetMode.SAME_STEP and "_final_obs" in want[4]:
                np.testing.assert_array_equal(got[4]["_final_obs"], want[4]["_final_obs"])
                np.testing.assert_array_equal(np.stack(got[4]["final_obs"][got[4]["_final_obs"]]),
                                              np.stack(want[4]["final_obs"][want[4]["_final_obs"]]))
    finally:
        ours.close()
        theirs.close()


def test_object_observations_without_shared_memory():
    envs = make([TextEnv] * NUM_ENVS, shared_memory=False)
    obs, _ = envs.reset(seed=0)
    assert list(obs) == ["start"] * NUM_ENVS
    obs, *_ = envs.step(zeros())
    assert list(obs) == ["step"] * NUM_ENVS
    envs.flush()
    with envs.take_segments() as batch:
        assert [list(row[:2]) for row in batch.obs] == [["start", "step"]] * NUM_ENVS
    closed_twice(envs)


def test_multiagent_envs():
    pytest.importorskip("pettingzoo")
    from multiagent_envs import AGENTS
    from multiagent_envs import counter_fns as multiagent_fns

    envs = segvec.make_multiagent(multiagent_fns(2, 6, late_joins=False), num_envs=2, num_workers=2,
                                  learner_share=True, horizon=8)
    plain = segvec.make_multiagent(multiagent_fns(2, 6, late_joins=False), num_envs=2, num_workers=2, horizon=8)
    try:
        assert envs._backend.local is not None and envs.call(pid_of)[:len(AGENTS)] == (os.getpid(),) * len(AGENTS)
        np.testing.assert_array_equal(envs.reset(seed=3)[0], plain.reset(seed=3)[0])
        for t in range(30):
            actions = np.full(2 * len(AGENTS), t % 2, np.int64)
            got, want = envs.step(actions), plain.step(actions)
            for a, b in zip(got[:4], want[:4]):
                np.testing.assert_array_equal(a, b)
    finally:
        envs.close()
        plain.close()


# ---- calls ----------------------------------------------------------------------------------------
def test_calls_reach_local_and_remote_envs_in_the_order_asked():
    envs = make(fault_fns(NUM_ENVS))
    envs.reset(seed=5)
    assert envs.get_attr("index") == (0, 1, 2, 3)
    assert envs.get_attr("np_random_seed") == (5, 6, 7, 8)
    envs.set_attr("delay", [0.1, 0.2, 0.3, 0.4])
    assert envs.get_attr("delay") == (0.1, 0.2, 0.3, 0.4)
    assert envs.call_at([3, 0, 2], "index") == (3, 0, 2)
    assert envs.call_at([1], "index") == (1,) and envs.call_at([2], "index") == (2,)
    assert envs.metadata["render_modes"] == []
    closed_twice(envs)


def test_a_local_env_raising_in_a_call_is_named():
    envs = make(fault_fns(NUM_ENVS))
    with pytest.raises(segvec.EnvError, match="env 0") as info:
        envs.call("step")  # a missing argument: a TypeError in every env; the learner's share comes first
    assert info.value.env_index == 0 and "Traceback" in str(info.value)
    assert envs.get_attr("index") == (0, 1, 2, 3), "the workers' replies were read: the next call is answered"
    closed_twice(envs)


# ---- faults ---------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("face", ["step", "recv"])
def test_a_local_env_error_is_named_then_the_learner_resets_and_goes_on(face):
    envs = make(fault_fns(NUM_ENVS, "step", target=1, at_step=2, times=1, infos=True))
    if face == "step":
        envs.reset(seed=0)
        with pytest.raises(segvec.EnvError) as info:
            for _ in range(5):
                envs.step(zeros())
        with pytest.raises(segvec.NotReceivedError, match=r"envs \[1\] failed.*reset"):
            envs.step(zeros())
    else:
        envs.async_reset(seed=0)
        with pytest.raises(segvec.EnvError) as info:
            for _ in range(5):
                *_, infos = envs.recv(timeout=3)
                envs.send(zeros(len(infos["env_id"])), infos["env_id"])
        *_, infos = envs.recv(timeout=3)  # the others landed, with their infos
        assert sorted(infos["env_id"].tolist()) == [0, 2, 3] and infos["_t"].all()
        envs.send(zeros(3), infos["env_id"])
    check_env_error(info.value, 1, "step")
    obs, _ = envs.reset(seed=1)
    assert obs[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    for _ in range(3):
        _, rewards, *_ = envs.step(zeros())
        assert rewards.tolist() == [1.0] * NUM_ENVS
    closed_twice(envs)


def test_a_local_env_raising_in_reset_is_named():
    envs = make(fault_fns(NUM_ENVS, "reset", target=0))
    with pytest.raises(segvec.EnvError) as info:
        envs.reset(seed=0)
    check_env_error(info.value, 0, "reset")
    closed_twice(envs)


def test_a_local_env_raising_in_init_is_named():
    with pytest.raises(segvec.EnvError) as info:
        make(fault_fns(NUM_ENVS, "init", target=1))
    check_env_error(info.value, 1, "__init__")


@pytest.mark.timeout(30)
def test_a_raising_local_env_is_rebuilt_with_restart_failed_envs():
    envs = make(fault_fns(NUM_ENVS, "step", target=0, at_step=2), restart_failed_envs=True)
    envs.reset(seed=0)
    restarted = 0
    for t in range(6):
        _, _, _, truncated, info = envs.step(zeros())
        if info.get("_env_restarted", np.zeros(NUM_ENVS, bool)).any():
            assert info["_env_restarted"].tolist() == [True, False, False, False]
            assert truncated[0] and "EnvBoom" in str(info["env_error"][0])
            restarted += 1
    assert restarted >= 1 and envs.stats()["restarts"] == restarted
    closed_twice(envs)


@pytest.mark.timeout(30)
def test_a_killed_worker_process_is_replaced_with_restart_failed_envs():
    envs = make(fault_fns(NUM_ENVS), restart_failed_envs=True, horizon=4)
    envs.reset(seed=0)
    envs.step(zeros())
    victim = envs._backend.processes[1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(5)
    seen = False
    for _ in range(5):
        _, _, _, truncated, info = envs.step(zeros())
        if "_env_restarted" in info and info["_env_restarted"].any():
            assert info["_env_restarted"].tolist() == [False, False, True, True], "only the dead worker's envs"
            assert truncated[2:].all()
            seen = True
    assert seen and envs._backend.processes[1].pid != victim.pid
    assert envs.call(pid_of)[:2] == (os.getpid(),) * 2
    closed_twice(envs)


@pytest.mark.timeout(30)
def test_a_killed_worker_process_raises_worker_died():
    envs = make(fault_fns(NUM_ENVS))
    envs.reset(seed=0)
    victim = envs._backend.processes[1]
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(segvec.WorkerDied) as info:
        for _ in range(3):
            envs.step(zeros())
    assert info.value.worker_index == 1 and info.value.env_indices == (2, 3)
    closed_twice(envs)


@pytest.mark.timeout(30)
def test_ctrl_c_inside_a_local_env_step_then_reset_goes_on():
    """Ctrl-C inside env 0's step: env 0 is FAILED, env 1 (not stepped yet) is handed back, the worker
    process's envs land; reset() brings every env back and stepping goes on."""
    envs = make(fault_fns(NUM_ENVS, "hang_step", target=0, at_step=1, times=1))
    envs.reset(seed=0)
    envs.step(zeros())
    with sigint_after(0.3), pytest.raises(KeyboardInterrupt):
        envs.step(zeros())
    from segvec._native import lib
    assert envs._storage.env_state[:2].tolist() == [lib.SEGVEC_ENV_FAILED, lib.SEGVEC_ENV_HELD]
    with pytest.raises(segvec.NotReceivedError, match=r"\[0\] failed"):
        envs.step(zeros())
    obs, _ = envs.reset(seed=1)
    assert obs[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    for _ in range(3):
        assert envs.step(zeros())[1].tolist() == [1.0] * NUM_ENVS
    closed_twice(envs)


@pytest.mark.timeout(30)
def test_close_stops_the_worker_and_closes_local_envs_and_calls_after_close_raise():
    envs = make(fault_fns(NUM_ENVS))
    envs.reset(seed=0)
    envs.step(zeros())
    local = envs._backend.local
    worker = envs._backend.processes[1]
    closed_twice(envs)
    assert local.envs == [] and not worker.is_alive()
    for call in (lambda: envs.step(zeros()), lambda: envs.reset(seed=0), lambda: envs.get_attr("index"),
                 envs.recv):
        with pytest.raises(segvec.ClosedEnvironmentError):
            call()


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["serial", "engine"])
def test_learner_share_needs_the_multiprocessing_backend(backend):
    source = counter_fns(2) if backend == "serial" else gymnasium.vector.SyncVectorEnv(counter_fns(2))
    with pytest.raises(ValueError, match="learner_share=True.*multiprocessing"):
        segvec.SegmentVecEnv(source, backend=backend, learner_share=True)
    if backend == "engine":
        source.close()


def test_learner_share_must_be_a_bool():
    with pytest.raises(ValueError, match="learner_share"):
        segvec.make_vec(counter_fns(2), num_envs=2, num_workers=2, learner_share="yes")
