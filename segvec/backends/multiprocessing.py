"""The multiprocessing backend: envs run in worker processes that write straight into a shared block.

Worker w owns envs ``[w * k, (w + 1) * k)`` (``k = num_envs // num_workers``); its code is in
``worker.py``.  This module is the learner's side: starting, watching and replacing workers, waiting on
the core, and the pipes that carry commands, infos and errors.

With ``learner_share=True`` worker 0 is the learner itself: its envs are built and stepped in this process
by `LocalEnvs` (``local.py``, the serial backend's code), after each dispatch has woken the worker processes
1..W-1, so they step in parallel with it.  ``processes[0]`` and ``pipes[0]`` are then None.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import pickle
import select
import signal
import time
from typing import Any, Callable

import cloudpickle
import numpy as np

from segvec._core import EnvState, Geometry, MemoryBlock, Storage, Wait
from segvec.backends.base import Backend
from segvec.backends.local import LocalEnvs
from segvec.backends.worker import Command, Reply, env_error_from, worker_main
from segvec.errors import WorkerDied, warn

WAIT_SLICE_MS = 500  # a waiting learner looks after dead workers this often (errors wake it at once)
LIVENESS_CHECK_S = 0.2  # how often a learner that never waits still checks that its workers live


class MultiprocessingBackend(Backend):
    """Runs envs in `num_workers` processes; worker w owns envs [w * k, (w + 1) * k).

    With `learner_share`, worker 0 is the learner's process (`local`) and workers 1..W-1 are processes.
    """

    @staticmethod
    def resolve_num_workers(num_envs: int, num_workers: int | None) -> int:
        if num_workers is None:
            cpus = os.cpu_count() or 1
            usable = min(num_envs, cpus)
            num_workers = usable
            while num_envs % num_workers:
                num_workers -= 1
            if 2 * num_workers <= usable:  # a divisor far below the cores: say so rather than run slowly
                multiples = sorted({max(cpus, num_envs - num_envs % cpus), num_envs - num_envs % cpus + cpus})
                warn(f"segvec: num_envs={num_envs} runs on {num_workers} worker process"
                     f"{'es' if num_workers > 1 else ''} although {cpus} CPUs are available: the envs are split "
                     f"evenly, so the number of workers must divide num_envs, and the largest divisor of "
                     f"{num_envs} up to {usable} is {num_workers}. Pass a num_envs that is a multiple of {cpus} "
                     f"(e.g. {' or '.join(map(str, multiples))}), or pass num_workers explicitly to silence this "
                     f"(a divisor of num_envs: {[w for w in range(1, num_envs + 1) if num_envs % w == 0]}).")
        if not isinstance(num_workers, (int, np.integer)) or num_workers < 1 or num_envs % num_workers:
            raise ValueError(
                f"num_envs ({num_envs}) must be a multiple of num_workers ({num_workers}); "
                f"choose num_workers among {[w for w in range(1, num_envs + 1) if num_envs % w == 0]}")
        return int(num_workers)

    def __init__(self, env_fns: list[Callable], autoreset_mode, num_workers: int, context=None,
                 restart_failed_envs: bool = False, daemon: bool = True, learner_share: bool = False):
        super().__init__()
        self.daemon = daemon  # daemon workers end with the learner but cannot start processes of their own
        self.env_fns = env_fns
        self.autoreset_mode = autoreset_mode
        self.restart_failed_envs = restart_failed_envs
        self._call_id = 0  # replies to an older call (one that timed out) are recognised and dropped
        self._replies: dict[int, tuple] = {}  # worker -> its reply to the current call
        self._reset_seeds: dict[int, Any] = {}  # the last reset's seed of each env, for replacements
        self._reset_options = None
        self._last_liveness_check = time.monotonic()
        self._payloads: list[bytes] = []
        self._pollers: dict[int, tuple] = {}  # worker -> (pipe fd, poll object), see _readable
        self.num_workers = num_workers
        self.envs_per_worker = len(env_fns) // num_workers
        self.local: LocalEnvs | None = None  # worker 0's envs when the learner steps them (learner_share)
        if learner_share:
            self.local = LocalEnvs(self, env_fns[:self.envs_per_worker], 0, 0, autoreset_mode, restart_failed_envs)
        self._remote = range(1 if learner_share else 0, num_workers)  # the workers that are processes
        if context is None or isinstance(context, str):
            context = multiprocessing.get_context(context)
        self.context = context
        self.processes: list = []
        self.pipes: list = []
        self.block: MemoryBlock | None = None
        self.storage: Storage | None = None
        self._closed = False

    # ---- start-up -------------------------------------------------------------------------------
    def create_envs(self) -> list[tuple]:
        k = self.envs_per_worker
        start_method = self.context.get_start_method()
        try:
            for w in range(self.num_workers):
                if w not in self._remote:  # the learner's share
                    self._payloads.append(None)
                    self.processes.append(None)
                    self.pipes.append(None)
                    continue
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
            spaces = [] if self.local is None else self.local.create()  # (while the workers build theirs)
            for w in self._remote:
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
            target=worker_main, name=f"segvec-worker-{w}",
            args=(w, w * self.envs_per_worker, self._payloads[w], child, self.autoreset_mode,
                  self.restart_failed_envs),
            daemon=self.daemon)
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
        lost = storage.core.recover_worker(w)
        envs = np.asarray(self._env_range(w), np.int32)
        states = storage.env_state[envs]
        resetting = envs[states == EnvState.RESETTING]
        held = envs[(states != EnvState.RESETTING) & ~np.isin(envs, lost)]
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
        storage.core.kick_worker(w)

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
            nbytes = Storage.plan(geometry)[1]
            self.block = MemoryBlock(nbytes, shared=True)
            self.storage = Storage(geometry, block=self.block)
            for w in self._remote:
                self.pipes[w].send((Command.ATTACH, geometry, self.block.name, nbytes))
            if self.local is not None:
                self.local.attach(self.storage)
            for w in self._remote:
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
        if self.local is not None:  # the dispatch woke the worker processes: they step meanwhile
            self.local.step()

    def send_object_actions(self, actions: dict) -> None:
        k = self.envs_per_worker
        by_worker: dict[int, dict] = {}
        for env_index, values in actions.items():
            by_worker.setdefault(env_index // k, {})[env_index] = values
        for w, mine in by_worker.items():
            if w not in self._remote:
                self.local.put_object_actions(mine)
                continue
            self._send(w, (Command.ACTIONS, mine))  # (the dispatch that follows wakes the worker)

    def reset(self, env_ids: np.ndarray, seeds: list, options) -> None:
        k = self.envs_per_worker
        workers = env_ids // k
        self._reset_seeds.update(zip(env_ids.tolist(), seeds))
        self._reset_options = options
        for w in np.unique(workers):
            if w not in self._remote:
                continue
            mine = env_ids[workers == w]
            self._command(int(w), (Command.RESET, mine, [seeds[i] for i in np.nonzero(workers == w)[0]], options))
        if self.local is not None and (workers == 0).any():  # after the workers were asked: in parallel
            self.local.reset(env_ids[workers == 0], [seeds[i] for i in np.nonzero(workers == 0)[0]], options)

    def wait(self, min_count: int, deadline: float | None) -> None:
        core = self.storage.core
        if self.local is not None and self._errors:  # a local env failed (it never publishes): its error first
            self.raise_errors()
        while True:
            slice_ms = WAIT_SLICE_MS
            if deadline is not None:
                slice_ms = max(0, min(slice_ms, int((deadline - time.monotonic()) * 1000)))
            status, ready = core.wait_ready(min_count, slice_ms)
            if status == Wait.DONE:
                # Other workers may keep the learner busy while one is dead: look now and then anyway.
                now = time.monotonic()
                if now - self._last_liveness_check > LIVENESS_CHECK_S:
                    self._last_liveness_check = now
                    self._check_alive()
                return
            self.raise_errors()  # the env error a worker reported (Wait.ALERT)
            if status == Wait.ALERT:
                continue
            self._check_alive()
            if deadline is not None and time.monotonic() >= deadline:
                raise multiprocessing.TimeoutError(f"timed out waiting for {min_count} envs ({ready} ready)")

    def _check_alive(self) -> None:
        for w in self._remote:
            process = self.processes[w]
            if not process.is_alive():
                self._drain([w])
                self.raise_errors()  # an error it sent before dying explains more than its death
                if self.restart_failed_envs and not self._closed:
                    self._respawn(w)
                    continue
                raise WorkerDied(
                    f"worker {w} (pid {process.pid}, envs {list(self._env_range(w))}) died with exit code "
                    f"{process.exitcode}" + (f" (signal {-process.exitcode})" if (process.exitcode or 0) < 0 else ""),
                    w, self._env_range(w), process.exitcode)

    def _handle(self, w: int, message) -> None:
        """Keeps infos, queues env errors, keeps worker w's reply to the current call (a reply to an older
        call, one that timed out, is dropped)."""
        kind, body = message
        if kind == Reply.INFOS:
            infos, final_infos = body
            self._infos.update(infos)
            self._final_infos.update(final_infos)
        elif kind == Reply.ERROR:
            self._errors.append(env_error_from(body))
        elif body[0] == self._call_id:
            self._replies[w] = message

    def _collect_errors(self) -> None:
        self._drain()

    def _drain(self, workers=None) -> None:
        """Reads every message waiting on the pipes of `workers` (default all): infos are kept, env errors
        queued, replies to calls that gave up (timed out) dropped."""
        for w in self._remote if workers is None else workers:
            pipe = self.pipes[w]
            try:
                while self._readable(w):
                    self._handle(w, pipe.recv())
            except (EOFError, OSError):  # a dead worker's pipe: hung up, reset or closed
                continue

    def _readable(self, w: int) -> bool:
        """Whether worker w's pipe holds a message (or hung up), from one poll object per pipe: cheaper than
        ``conn.poll()``, which builds a selector on every call, for a learner that looks at every wait slice."""
        fd = self.pipes[w].fileno()
        entry = self._pollers.get(w)
        if entry is None or entry[0] != fd:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            entry = self._pollers[w] = (fd, poller)
        return bool(entry[1].poll(0))

    def infos_for(self, env_ids: np.ndarray, deadline: float | None = None) -> tuple[dict, dict]:
        flags = self.storage.env_has_info
        wanted = [int(e) for e in env_ids[flags[env_ids] != 0]]
        for e in wanted:
            w = e // self.envs_per_worker
            while w in self._remote and e not in self._infos and e not in self._final_infos:
                self._handle(w, self._recv(w, deadline))
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
        restart_failed_envs, after replacing it); arguments that do not pickle are a TypeError."""
        try:
            self.pipes[w].send(message)
        except OSError:
            self._worker_gone(w)
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            raise TypeError(f"the arguments of {Command(message[0]).name.lower()} cannot be pickled to the workers: "
                            f"{error}. Pass module-level functions and picklable values.") from error

    def _worker_gone(self, w: int) -> None:
        """Worker w's pipe broke: raises WorkerDied once its death is seen (the pipe closes just before)."""
        process = self.processes[w]
        process.join(1.0)
        self._check_alive()  # raises WorkerDied, or (restart_failed_envs) replaces the worker
        raise WorkerDied(f"worker {w} (pid {process.pid}, envs {list(self._env_range(w))}) died with exit code "
                         f"{process.exitcode} while answering; it was replaced and its envs restarted",
                         w, self._env_range(w), process.exitcode)

    def _gather_results(self, call_id: int, deadline=None, workers=None) -> list:
        """The reply of each worker asked to call `call_id`.  Reads every worker's reply before raising the
        first error; replies to older calls (that timed out) are dropped."""
        out, first_error = [], None
        for w in self._remote if workers is None else workers:
            try:
                while w not in self._replies:
                    self._handle(w, self._recv(w, deadline))
            except WorkerDied as error:
                first_error = first_error or error
                continue
            kind, (_, body) = self._replies.pop(w)
            if kind == Reply.FAILED:
                first_error = first_error or env_error_from(body)
            else:
                out.append(body)
        if first_error is not None:
            raise first_error
        return out

    def _next_call_id(self) -> int:
        self._call_id += 1
        self._replies.clear()
        return self._call_id

    def _gather_with_local(self, call_id: int, deadline, workers: list, local_work) -> list:
        """The chunks of results of `workers` (asked to call `call_id`), in worker order, with the learner's
        share's chunk (``local_work()``, run while the workers work) first when worker 0 is among them.
        Every reply is read before the first error is raised, the learner's share's first."""
        local, local_error = [], None
        if workers and workers[0] not in self._remote:
            try:
                local = [local_work()]
            except Exception as error:  # noqa: BLE001 - raised below, once the workers answered
                local_error = error
            workers = workers[1:]
        try:
            remote = self._gather_results(call_id, deadline, workers)
        except Exception:
            if local_error is None:
                raise
            remote = []
        if local_error is not None:
            raise local_error
        return local + remote

    def call(self, name, args, kwargs, env_ids=None, timeout: float | None = None) -> list:
        k = self.envs_per_worker
        deadline = None if timeout is None else time.monotonic() + timeout
        call_id = self._next_call_id()
        local = self.local
        if env_ids is None:
            for w in self._remote:
                self._command(w, (Command.CALL, call_id, name, args, kwargs, None))
            chunks = self._gather_with_local(call_id, deadline, list(range(self.num_workers)),
                                             lambda: local.call(name, args, kwargs))
            return [value for chunk in chunks for value in chunk]
        env_ids = [int(e) for e in env_ids]
        workers = sorted({e // k for e in env_ids})
        for w in workers:
            if w in self._remote:
                self._command(w, (Command.CALL, call_id, name, args, kwargs,
                                  [e - w * k for e in env_ids if e // k == w]))
        chunks = self._gather_with_local(call_id, deadline, workers,
                                         lambda: local.call(name, args, kwargs, [e for e in env_ids if e < k]))
        chunks = {w: iter(chunk) for w, chunk in zip(workers, chunks)}
        return [next(chunks[e // k]) for e in env_ids]  # back in the order asked

    def set_attr(self, name: str, values: list, timeout: float | None = None) -> None:
        k = self.envs_per_worker
        call_id = self._next_call_id()
        for w in self._remote:
            self._command(w, (Command.SET_ATTR, call_id, name, values[w * k:(w + 1) * k]))
        self._gather_with_local(call_id, None if timeout is None else time.monotonic() + timeout,
                                list(range(self.num_workers)), lambda: self.local.set_attr(name, values[:k]))

    def env_metadata(self) -> dict:
        if self.local is not None:
            return self.local.metadata()
        call_id = self._next_call_id()
        self._command(0, (Command.METADATA, call_id))
        return self._gather_results(call_id, None, [0])[0][0]

    def _command(self, w: int, message) -> None:
        """Sends a command to worker w and wakes it to read its pipe."""
        self._send(w, message)
        self.storage.core.kick_worker(w)

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
                self.storage.core.shutdown()
            for pipe in self._live(self.pipes):
                try:
                    pipe.send((Command.CLOSE,))
                except Exception:  # noqa: BLE001 - a dead worker's pipe
                    pass
            deadline = time.monotonic() + (0.0 if terminate else 2.0)
            for process in self._live(self.processes):
                process.join(max(0.0, deadline - time.monotonic()))
        finally:
            if self.local is not None:
                self.local.close()
            self._stop_by_force()

    @staticmethod
    def _live(items: list) -> list:
        """The processes (or pipes) of the workers that are processes (not the learner's share)."""
        return [item for item in items if item is not None]

    def _stop_by_force(self) -> None:
        """SIGTERM (then SIGKILL) every live worker, then closes the pipes and the block."""
        alive = [process for process in self._live(self.processes) if process.is_alive()]
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
        for pipe in self._live(self.pipes):
            try:
                pipe.close()
            except Exception:  # noqa: BLE001
                pass
        if self.storage is not None:
            self.storage.close()
        if self.block is not None:
            self.block.close()
