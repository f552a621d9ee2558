"""Faults and shutdown: env errors, hangs, dead or stopped workers, Ctrl-C, close(), and going on after each.

Every test ends with the `leftovers` check: each worker process the test started is gone (not running, not a
zombie), no new child of this process remains, and no shared-memory object the test created is still in
/dev/shm.  The shared-memory check covers the names this process (or a subprocess under test) created, not
every /dev/shm entry on the machine, so that test runs of other checkouts on the same machine cannot make
it fail.  Hanging envs sleep in their own code.  Waits that must end by themselves (a dead worker) have no
timeout; a watchdog (faulthandler) dumps every thread's stack and exits if any test runs past a minute.
"""
from __future__ import annotations

import contextlib
import errno
import faulthandler
import gc
import json
import multiprocessing
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

import segvec
from segvec._core import MemoryBlock, Storage
from segvec.backends import MultiprocessingBackend

from fault_envs import EnvBoom, FaultEnv, fault_fns, make_fault_env

BACKENDS = ["serial", "multiprocessing"]
NUM_ENVS = 4
SRC = pathlib.Path(segvec.__file__).parent
TESTS = pathlib.Path(__file__).parent
WATCHDOG_S = 60  # no test here needs more than a few seconds


def make(fns, backend: str, **options) -> segvec.SegmentVecEnv:
    if backend == "multiprocessing":
        options.setdefault("num_workers", 2)
    options.setdefault("horizon", 8)
    return segvec.SegmentVecEnv(fns, backend=backend, **options)


def zeros(n: int = NUM_ENVS) -> np.ndarray:
    return np.zeros(n, np.int64)


# ---- what a test leaves behind ---------------------------------------------------------------------
def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process, or None when it does not exist."""
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _cpu_seconds(pid: int) -> float:
    text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wakeups(pid: int, thread: int | None = None) -> int:
    """Times the threads of process `pid` (or its thread `thread` alone) went to sleep and woke again (their
    voluntary context switches)."""
    total = 0
    for status in pathlib.Path(f"/proc/{pid}/task").glob(f"{'*' if thread is None else thread}/status"):
        try:
            text = status.read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        total += int(text.split("voluntary_ctxt_switches:")[1].split()[0])
    return total


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def _children(pid: int) -> set[int]:
    out = set()
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            state = _proc_state(int(entry.name))
            if state is not None and state[1] == pid:
                out.add(int(entry.name))
    return out


# multiprocessing's own server processes, e.g. a forkserver whose start a Ctrl-C cut short before
# multiprocessing recorded its pid.
HELPER_CMDLINE = r"from multiprocessing\.(forkserver|resource_tracker) import main"


def _helper_pids() -> set[int]:
    """Long-lived helpers of multiprocessing itself (forkserver, resource tracker), not segvec's."""
    pids = set()
    from multiprocessing import forkserver, resource_tracker
    for pid in (getattr(forkserver._forkserver, "_forkserver_pid", None),
                getattr(resource_tracker._resource_tracker, "_pid", None)):
        if pid:
            pids.add(pid)
    return pids


def assert_gone(pids, shm_names, within: float = 3.0) -> None:
    """Each pid has exited and been reaped and each shared-memory name is unlinked, within `within` s."""
    deadline = time.monotonic() + within
    while True:
        alive = {pid: _proc_state(pid) for pid in pids}
        alive = {pid: state for pid, state in alive.items() if state is not None}
        files = [name for name in shm_names if os.path.exists("/dev/shm/" + name.lstrip("/"))]
        if not alive and not files:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: processes {alive} (state, parent), shared memory {files}")
        time.sleep(0.05)


@contextlib.contextmanager
def sigint_after(seconds: float):
    """Sends SIGINT (Ctrl-C) to this process after `seconds`, from a thread; restores the handler after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)


class Leftovers:
    """Records the worker pids and shared-memory names created while a test runs."""

    def __init__(self):
        self.worker_pids: list[int] = []
        self.shm_names: list[str] = []


@pytest.fixture(autouse=True)
def leftovers(monkeypatch):
    record = Leftovers()
    children_before = _children(os.getpid())
    block_init = MemoryBlock.__init__
    create_envs = MultiprocessingBackend.create_envs

    def recording_block_init(self, *args, **kwargs):
        block_init(self, *args, **kwargs)
        if self.name is not None:
            record.shm_names.append(self.name)

    def recording_create_envs(self):
        try:
            return create_envs(self)
        finally:
            record.worker_pids.extend(p.pid for p in self.processes if p.pid is not None)

    monkeypatch.setattr(MemoryBlock, "__init__", recording_block_init)
    monkeypatch.setattr(MultiprocessingBackend, "create_envs", recording_create_envs)
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a hang fails loudly instead of stalling
    try:
        yield record
    finally:
        faulthandler.cancel_dump_traceback_later()
    gc.collect()
    assert_gone(record.worker_pids, record.shm_names)
    new_children = {pid for pid in _children(os.getpid()) - children_before - _helper_pids()
                    if not re.search(HELPER_CMDLINE, _cmdline(pid))}
    assert not new_children, f"child processes left behind: {[(p, _proc_state(p), _cmdline(p)) for p in new_children]}"


def closed_twice(envs) -> None:
    envs.close()
    envs.close()
    assert envs.closed


# ---- env errors ------------------------------------------------------------------------------------
def check_env_error(error: BaseException, env_index: int, action: str) -> None:
    assert isinstance(error, segvec.EnvError)
    assert isinstance(error, EnvBoom), "the original exception type is kept (EnvError subclasses it)"
    assert isinstance(error, ValueError)
    assert error.env_index == env_index
    assert f"env {env_index}" in str(error) and action in str(error)
    assert "EnvBoom" in error.worker_traceback and "fault_envs.py" in error.worker_traceback
    assert "Traceback" in str(error), "the message carries the worker's traceback"


class TwoArgumentError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)


@pytest.mark.parametrize("original", [
    EnvBoom("boom"), KeyError("missing"), TwoArgumentError(1, "two"), OSError(5, "io"),
    FileNotFoundError(2, "gone", "rom.bin"), TimeoutError("slow"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
])
def test_env_error_keeps_the_original_type_where_possible(original):
    error = segvec.errors.make_env_error(original, 5, "step", "Traceback (most recent call last): ...")
    assert isinstance(error, segvec.EnvError) and isinstance(error, type(original))
    assert error.env_index == 5 and error.original_type is type(original)
    assert str(error).startswith(f"env 5 raised in step: {type(original).__name__}")
    assert "Traceback" in str(error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_env_raises_in_init(backend, leftovers):
    start = time.monotonic()
    with pytest.raises(segvec.EnvError) as info:
        make(fault_fns(NUM_ENVS, "init", target=3), backend)
    assert time.monotonic() - start < 10
    check_env_error(info.value, 3, "__init__")


@pytest.mark.parametrize("backend", BACKENDS)
def test_env_raises_in_reset(backend):
    envs = make(fault_fns(NUM_ENVS, "reset", target=2), backend)
    start = time.monotonic()
    with pytest.raises(segvec.EnvError) as info:
        envs.reset(seed=0)
    assert time.monotonic() - start < 5
    check_env_error(info.value, 2, "reset")
    closed_twice(envs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("face", ["step", "recv"])
def test_env_raises_in_step(backend, face):
    envs = make(fault_fns(NUM_ENVS, "step", target=1, at_step=2), backend)
    start = time.monotonic()
    with pytest.raises(segvec.EnvError) as info:
        if face == "step":
            envs.reset(seed=0)
            for _ in range(5):
                envs.step_async(zeros())
                envs.step_wait(timeout=5)
        else:
            envs.async_reset(seed=0)
            for _ in range(5):
                *_, infos = envs.recv(timeout=5)
                envs.send(zeros(len(infos["env_id"])), infos["env_id"])
    assert time.monotonic() - start < 5
    check_env_error(info.value, 1, "step")
    closed_twice(envs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_env_raising_an_os_error(backend):
    """OSError subclasses need their own __new__: the learner still gets an EnvError of that type."""
    envs = make(fault_fns(NUM_ENVS, "step_oserror", target=2), backend)
    envs.reset(seed=0)
    with pytest.raises(FileNotFoundError) as info:
        envs.step(zeros())
    assert isinstance(info.value, segvec.EnvError) and info.value.env_index == 2
    assert "rom.bin" in str(info.value) and "fault_envs.py" in info.value.worker_traceback
    closed_twice(envs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault, dtype, words", [
    ("bad_shape", np.float32, "shape (5,)"),
    ("bad_dtype", np.uint8, "dtype float64"),
])
def test_wrong_observation_is_a_clear_error(backend, fault, dtype, words):
    envs = make(fault_fns(NUM_ENVS, fault, target=3, obs_dtype=dtype), backend)
    envs.reset(seed=0)
    with pytest.raises(segvec.EnvError) as info:
        envs.step(zeros())
    error = info.value
    assert isinstance(error, ValueError)
    assert error.env_index == 3
    assert words in str(error) and "its space says" in str(error)
    closed_twice(envs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_reward_passes_through_and_is_counted(backend):
    envs = make(fault_fns(NUM_ENVS, "nan_reward", target=0, at_step=3), backend, horizon=4)
    envs.reset(seed=0)
    rewards = [envs.step(zeros())[1] for _ in range(8)]
    assert all(np.isnan(r[0]) == (t >= 3) for t, r in enumerate(rewards))
    assert all(np.all(r[1:] == 1.0) for r in rewards)
    assert envs.stats()["nan_rewards"] == 5
    envs.flush()
    batch = envs.take_segments()
    assert int(np.isnan(batch.reward[batch.mask]).sum()) == 5
    batch.release()
    closed_twice(envs)


# ---- hangs, dead and stopped workers ---------------------------------------------------------------
@pytest.mark.parametrize("fault", ["hang_step", "hang_reset"])
def test_hanging_env_times_out(fault):
    envs = make(fault_fns(NUM_ENVS, fault, target=0), "multiprocessing")
    start = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError):
        if fault == "hang_reset":
            envs.reset_async(seed=0)
            envs.reset_wait(timeout=0.3)
        else:
            envs.reset(seed=0)
            envs.step_async(zeros())
            envs.step_wait(timeout=0.3)
    assert time.monotonic() - start < 2
    closed_twice(envs)


def test_hanging_env_recv_times_out():
    envs = make(fault_fns(NUM_ENVS, "hang_step", target=0), "multiprocessing")
    envs.async_reset(seed=0)
    *_, infos = envs.recv(timeout=5)
    envs.send(zeros(), infos["env_id"])
    start = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError):
        envs.recv(timeout=0.3)
    assert time.monotonic() - start < 2
    envs.close(terminate=True)


@pytest.mark.parametrize("face", ["step", "recv", "idle"])
def test_sigkilled_worker_raises_worker_died(face):
    """SIGKILL a worker (idle, or while its env hangs in step): the next wait raises WorkerDied."""
    envs = make(fault_fns(NUM_ENVS, None if face == "idle" else "hang_step", target=3), "multiprocessing")
    victim = envs._backend.processes[1]  # runs envs 2 and 3
    if face == "recv":
        envs.async_reset(seed=0)
        *_, infos = envs.recv(timeout=5)
        envs.send(zeros(), infos["env_id"])
    else:
        envs.reset(seed=0)
        envs.step_async(zeros())
    if face == "idle":
        os.kill(victim.pid, signal.SIGKILL)
    else:
        threading.Timer(0.3, os.kill, (victim.pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(segvec.WorkerDied) as info:
        for _ in range(3):  # no timeout: death must be noticed, never a hang
            if face == "recv":
                *_, infos = envs.recv()
                envs.send(zeros(len(infos["env_id"])), infos["env_id"])
            else:
                envs.step_wait()
                envs.step_async(zeros())
    assert time.monotonic() - start < 5
    error = info.value
    assert error.worker_index == 1 and error.env_indices == (2, 3)
    assert error.exitcode == -signal.SIGKILL and "signal 9" in str(error)
    closed_twice(envs)


def test_sigkilled_worker_during_call_raises_worker_died():
    envs = make(fault_fns(NUM_ENVS), "multiprocessing")
    envs.reset(seed=0)
    os.kill(envs._backend.processes[0].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(segvec.WorkerDied):
        envs.get_attr("index")
    assert time.monotonic() - start < 5
    closed_twice(envs)


@pytest.mark.parametrize("terminate, limit", [(False, 3.0), (True, 1.0)])
def test_sigstopped_worker_times_out_and_close_still_works(terminate, limit):
    envs = make(fault_fns(NUM_ENVS), "multiprocessing")
    envs.reset(seed=0)
    victim = envs._backend.processes[0]
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        envs.step_async(zeros())
        start = time.monotonic()
        with pytest.raises(multiprocessing.TimeoutError):
            envs.step_wait(timeout=0.3)
        assert time.monotonic() - start < 2
        start = time.monotonic()
        envs.close(terminate=terminate)  # polite: 2 s for the workers to leave, then SIGTERM + SIGCONT
        assert time.monotonic() - start < limit, "a stopped worker must not stall close()"
        envs.close()
    finally:
        if _proc_state(victim.pid) is not None:
            os.kill(victim.pid, signal.SIGCONT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keyboard_interrupt_mid_wait_then_close(backend):
    """Ctrl-C while the learner waits on a hanging env: close() leaves no process and no shared memory."""
    envs = make(fault_fns(NUM_ENVS, "hang_step", target=0), backend)
    envs.async_reset(seed=0)
    *_, infos = envs.recv(timeout=5)
    start = time.monotonic()
    with sigint_after(0.3), pytest.raises(KeyboardInterrupt):
        envs.send(zeros(), infos["env_id"])  # the serial backend steps (and hangs) here
        envs.recv(timeout=10)
    assert time.monotonic() - start < 3
    start = time.monotonic()
    envs.close()
    assert time.monotonic() - start < 4
    envs.close()


@pytest.mark.parametrize("delay", [0.05, 0.3])
def test_keyboard_interrupt_during_construction(delay):
    """Ctrl-C while spawned workers start (or just after): no worker and no shared memory is left."""
    with sigint_after(delay), pytest.raises(KeyboardInterrupt):
        envs = make(fault_fns(NUM_ENVS), "multiprocessing", context="spawn")
        envs.reset(seed=0)
        time.sleep(5)  # the interrupt comes after construction: dropping `envs` must clean up


def test_keyboard_interrupt_during_close_still_stops_workers():
    """A second Ctrl-C while close() politely waits for a hanging worker: the workers still go."""
    envs = make(fault_fns(NUM_ENVS, "hang_step", target=0), "multiprocessing")
    envs.reset(seed=0)
    envs.step_async(zeros())
    with pytest.raises(multiprocessing.TimeoutError):
        envs.step_wait(timeout=0.2)
    start = time.monotonic()
    with sigint_after(0.3), pytest.raises(KeyboardInterrupt):
        envs.close()  # waits up to 2 s for the hanging worker to leave
    assert time.monotonic() - start < 2
    envs.close()


# ---- close() ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_close_twice_and_use_after_close(backend):
    envs = make(fault_fns(NUM_ENVS), backend)
    envs.reset(seed=0)
    envs.step(zeros())
    closed_twice(envs)
    with pytest.raises(segvec.ClosedEnvironmentError):
        envs.step(zeros())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropping_the_last_reference_closes(backend, leftovers):
    envs = make(fault_fns(NUM_ENVS), backend)
    envs.reset(seed=0)
    envs.step(zeros())
    pids = list(leftovers.worker_pids)
    del envs  # no gc.collect(): plain reference counting must be enough
    assert_gone(pids, leftovers.shm_names)


def test_dropping_an_env_with_a_hanging_worker_closes(leftovers):
    envs = make(fault_fns(NUM_ENVS, "hang_step", target=0), "multiprocessing")
    envs.reset(seed=0)
    envs.step_async(zeros())
    with pytest.raises(multiprocessing.TimeoutError):
        envs.step_wait(timeout=0.2)
    del envs
    assert_gone(leftovers.worker_pids, leftovers.shm_names)


EXIT_SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
import numpy as np
import segvec
from segvec._core import MemoryBlock
from fault_envs import fault_fns

names = []
block_init = MemoryBlock.__init__
def recording_block_init(self, *args, **kwargs):
    block_init(self, *args, **kwargs)
    names.append(self.name)
MemoryBlock.__init__ = recording_block_init

envs = segvec.SegmentVecEnv(fault_fns(4, {fault!r}, target=0), backend="multiprocessing", num_workers=2,
                            horizon=8, context={context!r})
envs.async_reset(seed=0)
*_, infos = envs.recv(timeout=30)
envs.send(np.zeros(4, np.int64), infos["env_id"])
print(json.dumps({{"pids": [p.pid for p in envs._backend.processes], "shm": names}}), flush=True)
if {mode!r} == "wait_for_kill":
    time.sleep(60)
"""


def _run_learner_script(fault, context, mode):
    script = EXIT_SCRIPT.format(tests=str(TESTS), fault=fault, context=context, mode=mode)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    line = process.stdout.readline()
    if not line:
        process.wait(30)
        raise AssertionError(f"the learner script failed:\n{process.stderr.read()}")
    return process, json.loads(line)


@pytest.mark.parametrize("fault, context", [(None, "fork"), ("hang_step", "fork"), (None, "forkserver")])
def test_interpreter_exit_without_close(fault, context):
    process, report = _run_learner_script(fault, context, "exit")
    assert process.wait(10) == 0, process.stderr.read()
    assert_gone(report["pids"], report["shm"], within=3)
    assert not [name for name in report["shm"] if os.path.exists("/dev/shm/" + name.lstrip("/"))]


def test_sigkilled_learner_leaves_no_idle_worker():
    process, report = _run_learner_script(None, "fork", "wait_for_kill")
    time.sleep(0.2)  # the workers have stepped and are idle
    process.kill()
    process.wait(5)
    assert_gone(report["pids"], report["shm"], within=5)


# ---- idle cost -------------------------------------------------------------------------------------
def test_waiting_burns_no_cpu():
    """A learner blocked in recv(timeout=4) and idle workers sleep: each process wakes fewer than 30 times in
    the 4 s (the learner looks after its workers every 500 ms, a worker at its parent every second), and all
    of them together use < 10% of one core.  The wake-ups are what tells a waiter that polls every few
    milliseconds from one that sleeps (a 2 ms poll loop wakes 2,000 times); the CPU bound leaves room for
    virtual machines that charge each wake-up of a long-idle process milliseconds of CPU time (on one, this
    test measured 2-5% of a core with 8-10 wake-ups per process).  In the learner's process only its own
    thread is watched (other tests may leave threads behind, Ray's for one): segvec starts none there."""
    threads_before = set(os.listdir("/proc/self/task"))
    envs = make(fault_fns(NUM_ENVS, "hang_step", target=0), "multiprocessing")
    envs.async_reset(seed=0)
    *_, infos = envs.recv(timeout=5)
    envs.send(zeros(), infos["env_id"])  # worker 0 sleeps in env 0's step, worker 1 idles in its wait
    time.sleep(0.2)
    assert set(os.listdir("/proc/self/task")) <= threads_before, "segvec started a thread in the learner"
    me = threading.get_native_id()
    pids = [os.getpid()] + [p.pid for p in envs._backend.processes]
    watched = [(os.getpid(), me)] + [(pid, None) for pid in pids[1:]]
    wakeups_before = [_wakeups(pid, thread) for pid, thread in watched]
    workers_before = [_cpu_seconds(pid) for pid in pids[1:]]
    learner_before = time.thread_time()
    wall = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError):
        envs.recv(timeout=4)
    wall = time.monotonic() - wall
    learner = time.thread_time() - learner_before
    workers = [_cpu_seconds(pid) - before for pid, before in zip(pids[1:], workers_before)]
    wakeups = [_wakeups(pid, thread) - before for (pid, thread), before in zip(watched, wakeups_before)]
    envs.close(terminate=True)
    used = (learner + sum(workers)) / wall
    print(f"idle for {wall:.2f} s: learner {learner * 1e3:.1f} ms, workers {[round(w * 1e3, 1) for w in workers]} ms "
          f"of CPU: {100 * used:.2f}% of a core; wake-ups (learner, workers): {wakeups}")
    assert max(wakeups) < 30, f"wake-ups in {wall:.2f} s (learner, workers): {wakeups}"
    assert used < 0.10, f"learner {learner:.3f} s, workers {workers} s of CPU in {wall:.2f} s"


# ---- buffer limits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_take_more_segments_than_the_buffer(backend):
    envs = make(fault_fns(NUM_ENVS), backend, horizon=2)
    envs.reset(seed=0)
    for _ in range(3):
        envs.step(zeros())
    with pytest.raises(ValueError, match="only"):
        envs.take_segments(envs.num_segments + 1)
    with pytest.raises(segvec.NotEnoughSegmentsError):
        envs.take_segments(envs.segments_ready + 1)
    batch = envs.take_segments(envs.segments_ready)
    batch.release()
    closed_twice(envs)


# ---- start methods ---------------------------------------------------------------------------------
@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_start_methods_with_module_level_factories(context):
    envs = make(fault_fns(2), "multiprocessing", context=context, num_workers=2)
    obs, _ = envs.reset(seed=0)
    assert obs[:, 0].tolist() == [0.0, 1.0]
    envs.step(zeros(2))
    time.sleep(1.3)  # longer than a worker's idle wait: idle workers must stay up
    envs.step(zeros(2))
    with pytest.raises(segvec.EnvError):
        envs.call("no_such_method")
    assert envs.get_attr("index") == (0, 1), "envs survive a failed call"
    closed_twice(envs)


def test_lambda_and_closure_factories_work_with_fork():
    lock = threading.Lock()

    def closure():
        with lock:
            return FaultEnv(7)

    envs = make([lambda: make_fault_env(3), closure], "multiprocessing", context="fork", num_workers=2)
    obs, _ = envs.reset(seed=0)
    assert obs[:, 0].tolist() == [3.0, 7.0]
    closed_twice(envs)


def test_unpicklable_factory_with_spawn_is_a_type_error(leftovers):
    lock = threading.Lock()

    def closure():
        with lock:
            return FaultEnv(0)

    with pytest.raises(TypeError, match="spawn") as info:
        make([closure, closure], "multiprocessing", context="spawn", num_workers=2)
    assert "pickle" in str(info.value) and "module-level" in str(info.value)


# ---- security --------------------------------------------------------------------------------------
def test_shared_memory_is_owner_only_and_unlinked(monkeypatch, leftovers):
    seen = {}
    unlink = MemoryBlock.unlink

    def inspecting_unlink(self):
        if self.name is not None:
            seen[self.name] = os.stat("/dev/shm/" + self.name.lstrip("/")).st_mode & 0o777
        unlink(self)

    monkeypatch.setattr(MemoryBlock, "unlink", inspecting_unlink)
    envs = make(fault_fns(NUM_ENVS), "multiprocessing")
    (name, mode), = seen.items()
    assert mode == 0o600, oct(mode)
    assert re.fullmatch(r"/segvec-[0-9a-f]{32}", name), "an unguessable name"
    assert not os.path.exists("/dev/shm/" + name.lstrip("/")), "unlinked once the workers attached"
    envs.reset(seed=0)
    closed_twice(envs)


def test_nothing_is_unpickled_from_shared_memory():
    """Scope: the segvec package.  The modules that read the block never unpickle, the block holds no
    object arrays, and the only unpickling in segvec is of pipe messages (commands, errors, factories).
    (The engine backend's ``recv()`` is a batched engine's own, which returns arrays; a Ray runner's
    ``envs.recv()`` is segvec's own async face.)"""
    unpickling = re.compile(r"\b(pickle\.loads?|cloudpickle\.loads?|Unpickler|marshal\.loads?|"
                            r"allow_pickle\s*=\s*True|\.recv\(\))")
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        hits = [line.strip() for line in path.read_text().splitlines() if unpickling.search(line)]
        if hits:
            found[path.name] = hits
    assert set(found) <= {"multiprocessing.py", "worker.py", "engine.py", "distributed.py"}, found
    for line in found.get("multiprocessing.py", []) + found.get("worker.py", []):
        assert re.search(r"(conn|pipe)\.recv\(\)|loads\((type_bytes|payload)\)", line), line
    for line in found.get("engine.py", []):  # the engine's recv (EnvPool, ale-py) and its adapter's
        assert re.search(r"self\.(engine|io)\.recv\(\)", line), line
    for line in found.get("distributed.py", []):  # a runner's vector env
        assert re.search(r"\benvs\.recv\(\)", line), line

    envs = make(fault_fns(NUM_ENVS), "serial")
    storage: Storage = envs._storage
    arrays = [value for value in vars(storage).values() if isinstance(value, np.ndarray)]
    arrays += [a for group in (storage.obs, storage.action, storage.final_obs) for a in group]
    arrays += list(storage.step_fields.values()) + list(storage.segment_fields.values())
    assert arrays and not any(a.dtype.hasobject for a in arrays)
    closed_twice(envs)


# ---- after errors, interrupts and timeouts ------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("face", ["step", "recv"])
def test_after_an_env_error_the_learner_resets_and_goes_on(backend, face):
    """After an EnvError nothing hangs (the other envs' infos included): a second wait
    answers at once, a send to the failed env says to reset it, and reset() brings every env back."""
    envs = make(fault_fns(NUM_ENVS, "step", target=1, at_step=2, times=1, infos=True), backend)
    start = time.monotonic()
    if face == "step":
        envs.reset(seed=0)
        with pytest.raises(segvec.EnvError) as info:
            for _ in range(5):
                envs.step(zeros())
        with pytest.raises(segvec.NoAsyncCallError):
            envs.step_wait(timeout=3)  # the failed step is over
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
        with pytest.raises(segvec.NotReceivedError, match="reset"):
            envs.send(zeros(1), [1])
        envs.send(zeros(3), infos["env_id"])
    assert info.value.env_index == 1
    obs, _ = envs.reset(seed=1)
    assert obs[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    for _ in range(3):
        _, rewards, *_ = envs.step(zeros())
        assert rewards.tolist() == [1.0] * NUM_ENVS
    assert time.monotonic() - start < 10
    closed_twice(envs)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_learner_field_changes_nothing(backend):
    """A step field of the wrong shape raises before the core changes anything; the same
    envs step and reset afterwards, on both faces."""
    envs = make(fault_fns(NUM_ENVS), backend, step_fields={"h": ((3,), np.float32)},
                segment_fields={"s": ((2,), np.float32)})
    envs.reset(seed=0)
    good = dict(h=np.zeros((NUM_ENVS, 3), np.float32), s=np.zeros((NUM_ENVS, 2), np.float32))
    for bad in (dict(good, h=np.zeros((NUM_ENVS, 4), np.float32)), dict(good, s=np.zeros((3, 2), np.float32)),
                dict(good, h=np.full((NUM_ENVS, 3), "x"))):
        with pytest.raises((ValueError, TypeError), match="field"):
            envs.step(zeros(), **bad)
        envs.step(zeros(), **good)
    envs.reset(seed=1)
    envs.async_reset(seed=2)
    *_, infos = envs.recv(timeout=5)
    with pytest.raises(ValueError, match="field 'h'"):
        envs.send(zeros(), infos["env_id"], h=np.zeros((NUM_ENVS, 5), np.float32), s=good["s"])
    envs.send(zeros(), infos["env_id"], **good)
    envs.recv(timeout=5)
    closed_twice(envs)


@pytest.mark.timeout(30)
def test_ctrl_c_inside_a_serial_env_step_then_reset_goes_on():
    """Serial backend: Ctrl-C inside env.step; the envs after it in the batch are handed back,
    the interrupted one is reset by reset(), and stepping goes on (no phantom envs in flight)."""
    envs = make(fault_fns(NUM_ENVS, "hang_step", target=2, at_step=1, times=1), "serial")
    envs.reset(seed=0)
    envs.step(zeros())
    with sigint_after(0.3), pytest.raises(KeyboardInterrupt):
        envs.step(zeros())
    from segvec._native import lib
    # envs 0, 1 stepped (landed), env 2 was interrupted, env 3 never stepped: handed back, nothing in flight
    assert envs._storage.env_state.tolist() == [lib.SEGVEC_ENV_READY] * 2 + [lib.SEGVEC_ENV_FAILED,
                                                                             lib.SEGVEC_ENV_HELD]
    with pytest.raises(segvec.NotReceivedError, match=r"\[2\] failed"):
        envs.step(zeros())
    envs.reset(seed=1)
    for _ in range(3):
        envs.step(zeros())
    closed_twice(envs)


@pytest.mark.timeout(30)
def test_reset_after_a_reset_wait_timeout_goes_on():
    """After reset_wait times out, the next
    reset() waits for the slow reset to land (never flushing an env its worker still writes), then resets
    again; steps and segments go on consistently."""
    envs = make(fault_fns(NUM_ENVS, "slow_reset", target=0, delay=0.5), "multiprocessing", horizon=4)
    envs.reset_async(seed=0)
    with pytest.raises(multiprocessing.TimeoutError):
        envs.reset_wait(timeout=0.05)
    start = time.monotonic()
    obs, _ = envs.reset(seed=10)
    assert 0.4 < time.monotonic() - start < 5
    assert envs.get_attr("np_random_seed") == (10, 11, 12, 13)
    for _ in range(6):
        envs.step(zeros())
    envs.flush()
    with envs.take_segments() as batch:
        steps = {e: int(batch.mask[batch.env_id == e].sum()) for e in range(NUM_ENVS)}
        assert steps == {e: 6 for e in range(NUM_ENVS)}
        for e in range(NUM_ENVS):
            starts = np.sort(batch.start_step[batch.env_id == e])
            lengths = batch.length[batch.env_id == e][np.argsort(batch.start_step[batch.env_id == e])]
            assert (starts[1:] == (starts + lengths)[:-1]).all()
    closed_twice(envs)


@pytest.mark.timeout(30)
def test_get_attr_while_the_learner_holds_every_row():
    """The learner holds every row the envs could move to; call/get_attr still answer
    at once (no worker waits for a row), and after a release the envs go on."""
    envs = make(fault_fns(NUM_ENVS), "multiprocessing", horizon=2, num_segments=2 * NUM_ENVS)
    envs.async_reset(seed=0)
    held = []
    with pytest.raises(segvec.SegmentBufferExhausted, match="release"):
        for _ in range(50):
            *_, infos = envs.recv(timeout=5)
            envs.send(zeros(len(infos["env_id"])), infos["env_id"])
            if envs.segments_ready:
                held.append(envs.take_segments())
    start = time.monotonic()
    assert envs.get_attr("index") == (0, 1, 2, 3)
    envs.set_attr("at_step", 0)
    assert time.monotonic() - start < 3
    for batch in held:
        batch.release()
    envs.send(zeros(len(infos["env_id"])), infos["env_id"])
    envs.recv(timeout=5)
    closed_twice(envs)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("restart", [False, True])
def test_a_reward_that_is_not_a_number_is_that_envs_error(backend, restart):
    """A reward of shape (1,) is env 1's EnvError (or restart), not the worker's death
    nor envs left in flight; the other envs go on."""
    envs = make(fault_fns(NUM_ENVS, "reward_shape", target=1, at_step=1, times=1), backend,
                restart_failed_envs=restart)
    envs.reset(seed=0)
    envs.step(zeros())
    if restart:
        _, rewards, _, truncated, info = envs.step(zeros())
        assert truncated.tolist() == [False, True, False, False] and info["_env_restarted"][1]
        assert "reward" in info["env_error"][1]
    else:
        with pytest.raises(segvec.EnvError, match="reward of type ndarray and shape \\(1,\\)") as info:
            envs.step(zeros())
        assert info.value.env_index == 1 and isinstance(info.value, ValueError)
        envs.reset(seed=1)
    _, rewards, *_ = envs.step(zeros())
    assert rewards.tolist() == [1.0] * NUM_ENVS
    closed_twice(envs)


def test_too_little_shared_memory_is_a_clear_error_at_construction(leftovers):
    """A block larger than /dev/shm has room for fails at construction, naming the
    size and /dev/shm, instead of a worker dying of SIGBUS later."""
    from gymnasium import spaces

    from segvec._core import SHM_DIR

    free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize
    space = spaces.Box(0, 255, (1024, 1024), np.uint8)  # 1 MiB observations, 2 per row
    rows = int(free // 2 ** 21) + 64
    with pytest.raises(OSError, match=r"MiB of shared memory in /dev/shm") as info:
        segvec.SegmentVecEnv([lambda: FaultEnvWith(space)] * 2, backend="multiprocessing", num_workers=1,
                             horizon=1, num_segments=rows)
    assert info.value.errno == errno.ENOSPC


class FaultEnvWith(FaultEnv):
    """A FaultEnv with another observation space (its observations are never built)."""

    def __init__(self, space):
        super().__init__(0)
        self.observation_space = space


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_error_of_the_last_envs_sent_comes_before_no_async_call(backend):
    """When every env sent failed, the next recv raises their EnvError, not NoAsyncCallError; after
    async_reset the next recv returns the reset observations, not an old error."""
    envs = make(fault_fns(2, "step", target=0, at_step=0, times=1), backend, num_workers=1)
    envs.async_reset(seed=0)
    *_, infos = envs.recv(timeout=5)
    envs.send(zeros(1), [0])  # env 0 fails; env 1 is held
    with pytest.raises(segvec.EnvError):
        envs.recv(timeout=5)
    envs.async_reset(seed=1)
    *_, infos = envs.recv(timeout=5)
    assert sorted(infos["env_id"].tolist()) == [0, 1]
    closed_twice(envs)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_envs_failing_in_one_step_are_both_reset_at_once(backend):
    """Two envs raise in the same step: both errors are logged as gymnasium's AsyncVectorEnv logs them (env,
    traceback, then "Raising the last exception"), the last is raised, and one reset brings both back."""
    fns = fault_fns(NUM_ENVS, "step", target=0, at_step=1, times=1)
    fns[3] = fault_fns(NUM_ENVS, "step", target=3, at_step=1, times=1)[3]
    envs = make(fns, backend)
    envs.reset(seed=0)
    envs.step(zeros())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(segvec.EnvError) as info:
            envs.step(zeros())
    logged = [str(w.message) for w in caught]
    assert len(logged) == 5, logged
    assert {logged[0], logged[2]} == {f"\x1b[31mERROR: Received the following error from Worker-{e} - Shutting it "
                                      "down\x1b[0m" for e in (0, 3)}
    assert "Traceback (most recent call last)" in logged[1] and "fails at step 1" in logged[3]
    assert logged[4] == "\x1b[31mERROR: Raising the last exception back to the main process.\x1b[0m"
    assert info.value.env_index == (0 if "Worker-0" in logged[2] else 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left over to drop
        envs.reset(seed=1)
    _, rewards, *_ = envs.step(zeros())
    assert rewards.tolist() == [1.0] * NUM_ENVS
    closed_twice(envs)


@pytest.mark.timeout(30)
def test_a_call_that_timed_out_does_not_answer_the_next_one():
    envs = make(fault_fns(NUM_ENVS), "multiprocessing")
    envs.call_async("slow_call", 0.5)
    with pytest.raises(multiprocessing.TimeoutError):
        envs.call_wait(timeout=0.05)
    time.sleep(0.6)  # the late answers arrive
    assert envs.get_attr("index") == (0, 1, 2, 3)
    assert envs.call("slow_call", 0.0) == (0, 1, 2, 3)
    closed_twice(envs)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_partial_async_reset_keeps_the_other_envs_in_play(backend):
    """async_reset with a reset_mask on the async face: the envs it does not reset keep coming from recv."""
    envs = make(fault_fns(NUM_ENVS), backend, batch_size=2)
    envs.async_reset(seed=0)
    seen = set()
    for _ in range(6):
        *_, infos = envs.recv(timeout=5)
        envs.send(zeros(len(infos["env_id"])), infos["env_id"])
    envs.async_reset(seed=1, options={"reset_mask": np.array([True, False, False, False])})
    for _ in range(10):
        *_, infos = envs.recv(timeout=5)
        seen.update(infos["env_id"].tolist())
        envs.send(zeros(len(infos["env_id"])), infos["env_id"])
    assert seen == {0, 1, 2, 3}
    closed_twice(envs)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_flush_after_a_partial_async_reset_waits_only_for_envs_in_flight(backend):
    """The envs a partial async_reset received on the way are not in flight: flush does not wait for them."""
    envs = make(fault_fns(NUM_ENVS), backend, batch_size=2)
    envs.async_reset(seed=0)
    for _ in range(4):
        *_, infos = envs.recv(timeout=5)
        envs.send(zeros(len(infos["env_id"])), infos["env_id"])
    envs.async_reset(seed=1, options={"reset_mask": np.array([True, False, False, False])})
    envs.flush(timeout=5)
    seen = set()
    for _ in range(4):
        *_, infos = envs.recv(timeout=5)
        seen.update(infos["env_id"].tolist())
        envs.send(zeros(len(infos["env_id"])), infos["env_id"])
    assert seen == {0, 1, 2, 3}
    closed_twice(envs)
