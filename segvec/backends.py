"""Where envs run: in the learner's process (serial) or in worker processes (multiprocessing).

Both backends drive the same `EnvRunner` over the same segment block; they differ only in who calls it
and how the learner waits.  The learner-side contract (used by `SegmentVecEnv`):

    start(geometry_for)   build envs (in workers), check their spaces, build the block
    after_dispatch()      actions were dispatched through the C core (serial: step them now)
    reset(ids, seeds, options)
    wait(min_count, deadline)   until min_count envs are published; raises EnvError / WorkerDied / TimeoutError
    infos_for(ids)        (infos, final_infos) of envs whose env_has_info flag is set
    call(name, args, kwargs, env_ids=None) / set_attr(name, values)
    close(terminate)
"""
from __future__ import annotations

import enum
import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import pickle
import select
import signal
import threading
import time
import traceback
from typing import Any, Callable

import cloudpickle
import numpy as np

from segvec._core import Geometry, MemoryBlock, Storage, check, ffi, lib
from segvec.errors import EnvError, SegvecError, WorkerDied, make_env_error
from segvec.runner import BatchResult, EnvFailure, EnvRunner

WAIT_SLICE_MS = 100
LIVENESS_CHECK_S = 0.2  # how often a learner that never waits still checks that its workers live


class Command(enum.IntEnum):
    """Messages on a worker's pipe (learner -> worker); actions never travel here."""

    ATTACH = 1
    RESET = 2
    CALL = 3
    SET_ATTR = 4
    CLOSE = 5
    RESTART_ENVS = 6  # a replacement worker takes over the envs of a dead one


class Reply(enum.IntEnum):
    """Messages on a worker's pipe (worker -> learner)."""

    SPACES = 1
    ATTACHED = 2
    INFOS = 3
    RESULT = 4
    ERROR = 5


def env_error_from(payload: tuple) -> BaseException:
    """Rebuilds the learner-side error from a worker's ERROR payload."""
    env_index, action, type_bytes, detail, worker_traceback = payload
    try:
        original_type = pickle.loads(type_bytes) if type_bytes else Exception
    except Exception:  # noqa: BLE001 - an exception type we cannot import here
        original_type = Exception
    if env_index < 0:
        return SegvecError(f"a worker failed in {action}: {detail}\n\nTraceback in the worker:\n{worker_traceback}")
    return make_env_error(original_type, env_index, action, worker_traceback, detail)


def _error_payload(env_index: int, action: str, error: BaseException, worker_traceback: str | None = None):
    try:
        type_bytes = pickle.dumps(type(error))
    except Exception:  # noqa: BLE001
        type_bytes = b""
    if worker_traceback is None:
        worker_traceback = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return (env_index, action, type_bytes, f"{type(error).__name__}: {error}", worker_traceback)


def _call_env(env, name, args, kwargs):
    """Calls method `name` of `env` (or returns the attribute), found through wrappers like gymnasium's
    vector envs do (``get_wrapper_attr``); a callable `name` is called as ``name(env, *args, **kwargs)``."""
    if callable(name):
        return name(env, *args, **kwargs)
    attribute = env.get_wrapper_attr(name) if hasattr(env, "get_wrapper_attr") else getattr(env, name)
    return attribute(*args, **kwargs) if callable(attribute) else attribute


def _set_env_attr(env, name: str, value) -> None:
    """Sets attribute `name` where it lives in the wrapper stack (gymnasium's ``set_wrapper_attr``)."""
    if hasattr(env, "set_wrapper_attr"):
        env.set_wrapper_attr(name, value)
    else:
        setattr(env, name, value)


# ---------------------------------------------------------------------------------------------------
class SerialBackend:
    """Runs every env in the learner's process, stepping at dispatch time."""

    def __init__(self, env_fns: list[Callable], autoreset_mode, restart_failed_envs: bool = False):
        self.env_fns = env_fns
        self.autoreset_mode = autoreset_mode
        self.restart_failed_envs = restart_failed_envs
        self.envs: list = []
        self._infos: dict[int, dict] = {}
        self._final_infos: dict[int, dict] = {}
        self._errors: list[BaseException] = []  # env errors waiting for the learner's next wait

    def create_envs(self) -> list[tuple]:
        for index, fn in enumerate(self.env_fns):
            try:
                self.envs.append(fn())
            except Exception as error:
                self.close()
                raise make_env_error(error, index, "__init__", traceback.format_exc()) from error
        return [(env.observation_space, env.action_space) for env in self.envs]

    def attach(self, geometry: Geometry) -> Storage:
        self.storage = Storage(geometry, shared=False)
        self.runner = EnvRunner(self.envs, 0, self.storage, self.autoreset_mode,
                                self.env_fns if self.restart_failed_envs else None)
        self._ids = np.zeros(geometry.num_envs, np.int32)
        self._ids_ptr = ffi.from_buffer("int32_t[]", self._ids)
        self._count = ffi.new("int32_t *")
        return self.storage

    def _take(self, result: BatchResult) -> None:
        """Keeps a batch's infos and errors, publishes its finished envs, re-raises an interrupt."""
        self._infos.update(result.infos)
        self._final_infos.update(result.final_infos)
        self.runner.publish(result.finished)
        for failure in result.failures:
            if failure.error is not result.interrupt:
                error = make_env_error(failure.error, failure.env_index, failure.action, failure.worker_traceback)
                error.__cause__ = failure.error
                self._errors.append(error)
        if result.interrupt is not None:
            raise result.interrupt

    def after_dispatch(self) -> None:
        count = self._count
        check(lib.segvec_worker_pop(self.storage.core, 0, len(self._ids), self._ids_ptr, count))
        self._take(self.runner.step(self._ids[:count[0]]))

    def reset(self, env_ids: np.ndarray, seeds: list, options) -> None:
        self._take(self.runner.reset(env_ids, seeds, options))

    def wait(self, min_count: int, deadline: float | None) -> None:
        """Envs step at dispatch here: raises the oldest env error not raised yet, else returns."""
        if self._errors:
            raise self._errors.pop(0)
        ready = ffi.new("int32_t *")
        status = lib.segvec_wait_ready(self.storage.core, min_count, 0, ready)
        if status != lib.SEGVEC_OK:  # every dispatched env was stepped at dispatch: nothing to wait for
            raise SegvecError(f"only {ready[0]} of {min_count} envs are ready in the serial backend")

    def infos_for(self, env_ids: np.ndarray, deadline: float | None = None) -> tuple[dict, dict]:
        wanted = [int(e) for e in env_ids[self.storage.env_has_info[env_ids] != 0]]
        return ({e: self._infos.pop(e) for e in wanted if e in self._infos},
                {e: self._final_infos.pop(e) for e in wanted if e in self._final_infos})

    def call(self, name, args, kwargs, env_ids=None) -> list:
        results = []
        for index in range(len(self.envs)) if env_ids is None else env_ids:
            try:
                results.append(_call_env(self.envs[index], name, args, kwargs))
            except Exception as error:
                raise make_env_error(error, index, f"call({name!r})", traceback.format_exc()) from error
        return results

    def set_attr(self, name: str, values: list) -> None:
        for index, (env, value) in enumerate(zip(self.envs, values)):
            try:
                _set_env_attr(env, name, value)
            except Exception as error:
                raise make_env_error(error, index, f"set_attr({name!r})", traceback.format_exc()) from error

    def close(self, terminate: bool = False) -> None:
        for env in self.envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - close every env whatever one of them does
                pass
        self.envs = []


# ---------------------------------------------------------------------------------------------------
def _worker_main(worker_index: int, first_env: int, payload: bytes, conn, autoreset_mode,
                 restart_failed_envs: bool = False):
    """Entry point of a worker process: build envs, attach to the block, serve until shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the learner's to handle; it closes us
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="segvec-orphan-watch",
                     daemon=True).start()
    envs = []
    runner = None
    try:
        env_fns = payload if isinstance(payload, list) else cloudpickle.loads(payload)
        for offset, fn in enumerate(env_fns):
            try:
                envs.append(fn())
            except Exception as error:  # noqa: BLE001
                conn.send((Reply.ERROR, _error_payload(first_env + offset, "__init__", error)))
                return
        conn.send((Reply.SPACES, [(env.observation_space, env.action_space) for env in envs]))
        command, geometry, name, nbytes = conn.recv()
        if command != Command.ATTACH:
            return
        if name is None:  # a replacement worker: the block's name is gone, its descriptor comes instead
            block = MemoryBlock(nbytes, shared=True, fd=multiprocessing.reduction.recv_handle(conn))
        else:
            block = MemoryBlock(nbytes, shared=True, name=name)
        storage = Storage(geometry, block=block, format_block=False)
        runner = EnvRunner(envs, first_env, storage, autoreset_mode, env_fns if restart_failed_envs else None)
        conn.send((Reply.ATTACHED, None))
        _serve(worker_index, runner, storage, conn)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    except Exception as error:  # noqa: BLE001 - anything else goes to the learner with its traceback
        try:
            conn.send((Reply.ERROR, _error_payload(-1, f"worker {worker_index}", error)))
            if runner is not None:
                lib.segvec_post_alert(runner.storage.core)
        except Exception:  # noqa: BLE001
            pass
    finally:
        for env in envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001
                pass


def _exit_with_parent(parent: int) -> None:
    """Ends the worker once its parent is gone (learner SIGKILLed), even while an env hangs in Python
    code, where the serve loop never gets to look."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def _report(conn, core, result: BatchResult) -> None:
    """Hands a batch to the learner: infos first, then one ERROR per failed env, then the envs themselves
    (so that infos and errors are in the pipe before the learner can see the envs), then the alert."""
    if result.infos or result.final_infos:
        conn.send((Reply.INFOS, (result.infos, result.final_infos)))
    for failure in result.failures:
        conn.send((Reply.ERROR, _error_payload(failure.env_index, failure.action, failure.error,
                                               failure.worker_traceback)))
    if len(result.finished):
        check(lib.segvec_publish(core, len(result.finished), ffi.from_buffer("int32_t[]", result.finished)))
    if result.failures:
        lib.segvec_post_alert(core)


def _serve(worker_index: int, runner: EnvRunner, storage: Storage, conn) -> None:
    core = storage.core
    ids = np.zeros(len(runner.envs), np.int32)
    ids_ptr = ffi.from_buffer("int32_t[]", ids)
    count = ffi.new("int32_t *")
    # Our parent is the learner (fork, spawn) or the forkserver, which exits when the learner does; either
    # way a new parent means the learner is gone.
    watched_pid = os.getppid()
    # One poll object for the command pipe: conn.poll() builds a selector on every call, which costs more
    # than a whole CartPole step; a readable or hung-up pipe both count as "look at it", as with conn.poll().
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    while True:
        status = lib.segvec_worker_wait(core, worker_index, 1000)
        if status == lib.SEGVEC_ERR_SHUTDOWN:
            return
        if status == lib.SEGVEC_ERR_TIMEOUT and os.getppid() != watched_pid:
            return  # the learner is gone
        while poller.poll(0):
            message = conn.recv()
            command = message[0]
            if command == Command.CLOSE:
                return
            if command == Command.RESET:
                _, env_ids, seeds, options = message
                _report(conn, core, runner.reset(env_ids, seeds, options))
            elif command == Command.RESTART_ENVS:
                _, lost, held, reason, resetting, seeds, options = message
                runner.mark_for_restart(held, reason)
                _report(conn, core, runner.restart_envs(lost, reason))
                if len(resetting):
                    _report(conn, core, runner.reset(resetting, seeds, options))
            elif command == Command.CALL:
                _, name, args, kwargs, offsets = message
                results = []
                try:
                    for offset in range(len(runner.envs)) if offsets is None else offsets:
                        results.append(_call_env(runner.envs[offset], name, args, kwargs))
                    conn.send((Reply.RESULT, results))
                except Exception as error:  # noqa: BLE001
                    conn.send((Reply.ERROR, _error_payload(runner.first_env + offset, f"call({name!r})", error)))
            elif command == Command.SET_ATTR:
                _, name, values = message
                try:
                    for offset, (env, value) in enumerate(zip(runner.envs, values)):
                        _set_env_attr(env, name, value)
                    conn.send((Reply.RESULT, None))
                except Exception as error:  # noqa: BLE001
                    conn.send((Reply.ERROR, _error_payload(runner.first_env + offset, f"set_attr({name!r})", error)))
        check(lib.segvec_worker_pop(core, worker_index, len(ids), ids_ptr, count))
        if count[0]:
            _report(conn, core, runner.step(ids[:count[0]]))


class MultiprocessingBackend:
    """Runs envs in `num_workers` processes; worker w owns envs [w * k, (w + 1) * k)."""

    def __init__(self, env_fns: list[Callable], autoreset_mode, num_workers: int, context=None,
                 restart_failed_envs: bool = False):
        self.env_fns = env_fns
        self.autoreset_mode = autoreset_mode
        self.restart_failed_envs = restart_failed_envs
        self._reset_seeds: dict[int, Any] = {}  # the last reset's seed of each env, for replacements
        self._reset_options = None
        self._last_liveness_check = time.monotonic()
        self._payloads: list[bytes] = []
        self.num_workers = num_workers
        self.envs_per_worker = len(env_fns) // num_workers
        if context is None or isinstance(context, str):
            context = multiprocessing.get_context(context)
        self.context = context
        self.processes: list = []
        self.pipes: list = []
        self.block: MemoryBlock | None = None
        self.storage: Storage | None = None
        self._infos: dict[int, dict] = {}
        self._final_infos: dict[int, dict] = {}
        self._closed = False

    # ---- start-up -------------------------------------------------------------------------------
    def create_envs(self) -> list[tuple]:
        k = self.envs_per_worker
        start_method = self.context.get_start_method()
        try:
            for w in range(self.num_workers):
                fns = self.env_fns[w * k:(w + 1) * k]
                try:  # a forked worker inherits the factories as they are: closures need no pickling there
                    self._payloads.append(list(fns) if start_method == "fork" else cloudpickle.dumps(fns))
                except Exception as error:
                    raise TypeError(
                        f"the env factories cannot be pickled for the {start_method!r} start method: {error}. "
                        "Use module-level functions (or functools.partial), or the 'fork' start method."
                    ) from error
                process, pipe = self._start_worker(w)
                self.processes.append(process)
                self.pipes.append(pipe)
            spaces = []
            for w in range(self.num_workers):
                kind, body = self._recv_startup(w)
                if kind == Reply.ERROR:
                    raise env_error_from(body)
                spaces.extend(body)
            return spaces
        except BaseException:
            self.close(terminate=True)
            raise

    def _start_worker(self, w: int):
        parent, child = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=_worker_main, name=f"segvec-worker-{w}",
            args=(w, w * self.envs_per_worker, self._payloads[w], child, self.autoreset_mode,
                  self.restart_failed_envs),
            daemon=True)
        process.start()
        child.close()
        return process, parent

    def _respawn(self, w: int) -> None:
        """Replaces dead worker w (restart_failed_envs): its envs are rebuilt and restarted.

        The core first takes back the envs the dead worker held (segvec_recover_worker rolls each back to
        the slot it was sent at, so nothing it half-wrote survives).  Those come back at once as restarted
        (truncated) envs; envs it was resetting are reset again with the same seed; envs the learner holds
        or has yet to receive are restarted in place of their next step, so no action meets an env it was
        not meant for.
        """
        old, storage = self.processes[w], self.storage
        old.join(0.1)
        reason = f"worker {w} died (exit code {old.exitcode})"
        lost = np.empty(self.envs_per_worker, np.int32)
        n_lost = ffi.new("int32_t *")
        check(lib.segvec_recover_worker(storage.core, w, ffi.from_buffer("int32_t[]", lost), n_lost))
        lost = lost[:n_lost[0]].copy()
        envs = np.asarray(self._env_range(w), np.int32)
        states = storage.env_state[envs]
        resetting = envs[states == lib.SEGVEC_ENV_RESETTING]
        held = envs[(states != lib.SEGVEC_ENV_RESETTING) & ~np.isin(envs, lost)]
        seeds = [self._reset_seeds.get(int(e)) for e in resetting]
        try:
            self.pipes[w].close()
        except OSError:
            pass
        process, pipe = self._start_worker(w)
        self.processes[w], self.pipes[w] = process, pipe
        kind, body = self._recv_startup(w)
        if kind == Reply.ERROR:
            raise env_error_from(body)
        pipe.send((Command.ATTACH, storage.geometry, None, self.block.nbytes))
        multiprocessing.reduction.send_handle(pipe, self.block.fd, process.pid)
        kind, body = self._recv_startup(w)
        if kind == Reply.ERROR:
            raise env_error_from(body)
        pipe.send((Command.RESTART_ENVS, lost, held, reason, resetting, seeds, self._reset_options))
        lib.segvec_kick_worker(storage.core, w)

    def _recv_startup(self, w: int, timeout: float = 120.0):
        pipe, process = self.pipes[w], self.processes[w]
        deadline = time.monotonic() + timeout
        while not pipe.poll(0.05):
            if not process.is_alive():
                raise WorkerDied(f"worker {w} (envs {self._env_range(w)}) died while starting "
                                 f"(exit code {process.exitcode})", w, self._env_range(w), process.exitcode)
            if time.monotonic() > deadline:
                raise multiprocessing.TimeoutError(f"worker {w} did not start within {timeout} s")
        return pipe.recv()

    def _env_range(self, w: int) -> tuple:
        return tuple(range(w * self.envs_per_worker, (w + 1) * self.envs_per_worker))

    def attach(self, geometry: Geometry) -> Storage:
        try:
            nbytes = Storage.plan(geometry)[2]
            self.block = MemoryBlock(nbytes, shared=True)
            self.storage = Storage(geometry, block=self.block)
            for pipe in self.pipes:
                pipe.send((Command.ATTACH, geometry, self.block.name, nbytes))
            for w in range(self.num_workers):
                kind, body = self._recv_startup(w)
                if kind == Reply.ERROR:
                    raise env_error_from(body)
            self.block.unlink()  # every worker has it mapped: the name is no longer needed
            return self.storage
        except BaseException:
            self.close(terminate=True)
            raise

    # ---- hot path -------------------------------------------------------------------------------
    def after_dispatch(self) -> None:
        pass

    def reset(self, env_ids: np.ndarray, seeds: list, options) -> None:
        k = self.envs_per_worker
        workers = env_ids // k
        self._reset_seeds.update(zip(env_ids.tolist(), seeds))
        self._reset_options = options
        for w in np.unique(workers):
            mine = env_ids[workers == w]
            self._send(w, (Command.RESET, mine, [seeds[i] for i in np.nonzero(workers == w)[0]], options))
            lib.segvec_kick_worker(self.storage.core, int(w))

    def wait(self, min_count: int, deadline: float | None) -> None:
        core = self.storage.core
        ready = ffi.new("int32_t *")
        while True:
            slice_ms = WAIT_SLICE_MS
            if deadline is not None:
                slice_ms = max(0, min(slice_ms, int((deadline - time.monotonic()) * 1000)))
            status = lib.segvec_wait_ready(core, min_count, slice_ms, ready)
            if status == lib.SEGVEC_OK:
                # Other workers may keep the learner busy while one is dead: look now and then anyway.
                now = time.monotonic()
                if now - self._last_liveness_check > LIVENESS_CHECK_S:
                    self._last_liveness_check = now
                    self._check_alive()
                return
            self._drain()  # raises the env error a worker reported (SEGVEC_ERR_ALERT)
            if status == lib.SEGVEC_ERR_ALERT:
                continue
            self._check_alive()
            if deadline is not None and time.monotonic() >= deadline:
                raise multiprocessing.TimeoutError(
                    f"timed out waiting for {min_count} envs ({ready[0]} ready)")

    def _check_alive(self) -> None:
        for w, process in enumerate(self.processes):
            if not process.is_alive():
                self._drain([w])  # an error it sent before dying explains more than its death
                if self.restart_failed_envs and not self._closed:
                    self._respawn(w)
                    continue
                raise WorkerDied(
                    f"worker {w} (pid {process.pid}, envs {list(self._env_range(w))}) died with exit code "
                    f"{process.exitcode}" + (f" (signal {-process.exitcode})" if (process.exitcode or 0) < 0 else ""),
                    w, self._env_range(w), process.exitcode)

    def _handle(self, w: int, message) -> Any:
        kind, body = message
        if kind == Reply.INFOS:
            infos, final_infos = body
            self._infos.update(infos)
            self._final_infos.update(final_infos)
            return None
        if kind == Reply.ERROR:
            raise env_error_from(body)
        return message

    def _drain(self, workers=None) -> None:
        """Reads every message waiting on the pipes of `workers` (default all; infos are kept, errors raised).

        Only a dead worker's pipe is drained when it dies: the others may hold replies a `call` awaits."""
        for w in range(len(self.pipes)) if workers is None else workers:
            pipe = self.pipes[w]
            try:
                while pipe.poll():
                    result = self._handle(w, pipe.recv())
                    if result is not None:
                        raise SegvecError(f"unexpected message from worker {w}: {result[0]!r}")
            except (EOFError, ConnectionResetError, BrokenPipeError):
                continue

    def infos_for(self, env_ids: np.ndarray, deadline: float | None = None) -> tuple[dict, dict]:
        flags = self.storage.env_has_info
        wanted = [int(e) for e in env_ids[flags[env_ids] != 0]]
        for e in wanted:
            w = e // self.envs_per_worker
            while e not in self._infos and e not in self._final_infos:
                result = self._handle(w, self._recv(w, deadline))
                if result is not None:
                    raise SegvecError(f"unexpected message from worker {w}: {result[0]!r}")
        return ({e: self._infos.pop(e) for e in wanted if e in self._infos},
                {e: self._final_infos.pop(e) for e in wanted if e in self._final_infos})

    def _recv(self, w: int, deadline: float | None = None):
        """The next message of worker w.  Raises WorkerDied when it died first (with restart_failed_envs,
        after replacing it: what it was asked is lost), TimeoutError past `deadline`."""
        pipe, process = self.pipes[w], self.processes[w]
        try:
            while not pipe.poll(WAIT_SLICE_MS / 1000):
                if not process.is_alive() and not pipe.poll():
                    raise EOFError
                if deadline is not None and time.monotonic() >= deadline:
                    raise multiprocessing.TimeoutError(f"worker {w} did not answer in time")
            return pipe.recv()
        except (EOFError, OSError):  # a killed worker's pipe can also be reset
            self._worker_gone(w)

    def _send(self, w: int, message) -> None:
        """Sends a command to worker w; a dead worker's broken pipe raises WorkerDied (with
        restart_failed_envs, after replacing it)."""
        try:
            self.pipes[w].send(message)
        except OSError:
            self._worker_gone(w)

    def _worker_gone(self, w: int) -> None:
        """Worker w's pipe broke: raises WorkerDied once its death is seen (the pipe closes just before)."""
        process = self.processes[w]
        process.join(1.0)
        self._check_alive()  # raises WorkerDied, or (restart_failed_envs) replaces the worker
        raise WorkerDied(f"worker {w} (pid {process.pid}, envs {list(self._env_range(w))}) died with exit code "
                         f"{process.exitcode} while answering; it was replaced and its envs restarted",
                         w, self._env_range(w), process.exitcode)

    def _gather_results(self, deadline=None, workers=None) -> list:
        """One reply per worker asked.  Reads every worker's reply before raising the first env error,
        so that no reply is left in a pipe to be taken for the answer to a later command."""
        out, first_error = [], None
        for w in range(self.num_workers) if workers is None else workers:
            while True:
                try:
                    result = self._handle(w, self._recv(w, deadline))
                except (EnvError, WorkerDied) as error:  # this worker's reply: the command failed
                    first_error = first_error or error
                    break
                if result is not None:
                    out.append(result[1])
                    break
        if first_error is not None:
            raise first_error
        return out

    def call(self, name, args, kwargs, timeout: float | None = None, env_ids=None) -> list:
        k = self.envs_per_worker
        deadline = None if timeout is None else time.monotonic() + timeout
        if env_ids is None:
            for w in range(self.num_workers):
                self._send(w, (Command.CALL, name, args, kwargs, None))
                lib.segvec_kick_worker(self.storage.core, w)
            return [value for chunk in self._gather_results(deadline) for value in chunk]
        env_ids = [int(e) for e in env_ids]
        workers = sorted({e // k for e in env_ids})
        for w in workers:
            self._send(w, (Command.CALL, name, args, kwargs, [e - w * k for e in env_ids if e // k == w]))
            lib.segvec_kick_worker(self.storage.core, w)
        chunks = {w: iter(chunk) for w, chunk in zip(workers, self._gather_results(deadline, workers))}
        return [next(chunks[e // k]) for e in env_ids]  # back in the order asked

    def set_attr(self, name: str, values: list) -> None:
        k = self.envs_per_worker
        for w in range(self.num_workers):
            self._send(w, (Command.SET_ATTR, name, values[w * k:(w + 1) * k]))
            lib.segvec_kick_worker(self.storage.core, w)
        self._gather_results()

    # ---- shutdown -------------------------------------------------------------------------------
    def close(self, terminate: bool = False) -> None:
        """Stops every worker (politely, then by force) and removes the shared memory; idempotent.

        A KeyboardInterrupt during the polite wait (a second Ctrl-C) still stops the workers by force
        before it propagates.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self.storage is not None:
                lib.segvec_shutdown(self.storage.core)
            for pipe in self.pipes:
                try:
                    pipe.send((Command.CLOSE,))
                except Exception:  # noqa: BLE001 - a dead worker's pipe
                    pass
            deadline = time.monotonic() + (0.0 if terminate else 2.0)
            for process in self.processes:
                process.join(max(0.0, deadline - time.monotonic()))
        finally:
            self._stop_by_force()

    def _stop_by_force(self) -> None:
        """SIGTERM (then SIGKILL) every live worker, then closes the pipes and the block."""
        alive = [process for process in self.processes if process.is_alive()]
        for process in alive:
            process.terminate()
            try:  # a stopped (SIGSTOP) worker acts on SIGTERM only once it runs again
                os.kill(process.pid, signal.SIGCONT)
            except OSError:
                pass
        deadline = time.monotonic() + 1.0
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in alive:
            if process.is_alive():
                process.kill()
                process.join(1.0)
        for pipe in self.pipes:
            try:
                pipe.close()
            except Exception:  # noqa: BLE001
                pass
        if self.block is not None:
            self.block.close()
