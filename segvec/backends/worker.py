"""A worker process of the multiprocessing backend: it builds its envs, maps the segment block and serves.

Actions never travel over the pipe: the learner writes them into the envs' slots and hands the envs over
through the core's action queue (``segvec_worker_wait`` / ``segvec_worker_pop``).  The pipe carries the
commands below, non-empty infos and errors, and the parts of actions and observations that have no fixed
shape (``segvec/objects.py``): those actions are sent before their envs are dispatched.  Every message type is an enum member, never a string.
"""
from __future__ import annotations

import enum
import multiprocessing.reduction
import os
import pickle
import select
import signal
import threading
import time
import traceback

import cloudpickle

from segvec._core import MemoryBlock, Storage, Wait
from segvec.backends.base import call_env, env_metadata, set_env_attr
from segvec.errors import SegvecError, make_env_error
from segvec.runner import BatchResult, EnvRunner, close_envs, make_runner

IDLE_WAIT_MS = 1000  # a worker with nothing to do looks at its parent this often


class Command(enum.IntEnum):
    """Messages on a worker's pipe (learner -> worker)."""

    ATTACH = 1        # (ATTACH, geometry, shm name or None, nbytes); None: the descriptor follows
    RESET = 2         # (RESET, env_ids, seeds, options)
    CALL = 3          # (CALL, call_id, name, args, kwargs, offsets or None)
    SET_ATTR = 4      # (SET_ATTR, call_id, name, values)
    CLOSE = 5         # (CLOSE,)
    RESTART_ENVS = 6  # (RESTART_ENVS, lost, held, reason, resetting, seeds, options): a replacement takes over
    METADATA = 7      # (METADATA, call_id): env 0's metadata
    ACTIONS = 8       # (ACTIONS, {env: [object leaves of its action]}), sent before the envs are dispatched


class Reply(enum.IntEnum):
    """Messages on a worker's pipe (worker -> learner)."""

    SPACES = 1    # [(observation_space, action_space)] of its envs
    ATTACHED = 2
    INFOS = 3     # ({env: info}, {env: final_info}), sent before those envs are published
    RESULT = 4    # (call_id, results): the answer to CALL / SET_ATTR / METADATA
    ERROR = 5     # error_payload(...) of an env that failed (or env index -1: the worker itself failed)
    FAILED = 6    # (call_id, error_payload(...)): a CALL / SET_ATTR / METADATA that raised


def error_payload(env_index: int, action: str, error: BaseException, worker_traceback: str | None = None) -> tuple:
    """What the learner needs to rebuild `error` in its own process (see `env_error_from`)."""
    try:
        type_bytes = pickle.dumps(type(error))
    except Exception:  # noqa: BLE001 - a type that does not pickle: the learner uses Exception
        type_bytes = b""
    if worker_traceback is None:
        worker_traceback = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return (env_index, action, type_bytes, f"{type(error).__name__}: {error}", worker_traceback)


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


def worker_main(worker_index: int, first_env: int, payload, conn, autoreset_mode,
                restart_failed_envs: bool = False) -> None:
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
                conn.send((Reply.ERROR, error_payload(first_env + offset, "__init__", error)))
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
        runner = make_runner(envs, first_env, storage, autoreset_mode, env_fns if restart_failed_envs else None)
        conn.send((Reply.ATTACHED, None))
        _serve(worker_index, runner, conn)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    except Exception as error:  # noqa: BLE001 - anything else goes to the learner with its traceback
        try:
            conn.send((Reply.ERROR, error_payload(-1, f"worker {worker_index}", error)))
            if runner is not None:
                runner.storage.core.post_alert()
        except Exception:  # noqa: BLE001
            pass
    finally:
        close_envs(envs)


def _exit_with_parent(parent: int) -> None:
    """Ends the worker once its parent is gone (learner SIGKILLed), even while an env hangs in Python
    code, where the serve loop never gets to look."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def _report(conn, runner: EnvRunner, result: BatchResult) -> None:
    """Hands a batch to the learner: infos first, then one ERROR per failed env, then the envs themselves
    (so that infos and errors are in the pipe before the learner can see the envs), then the alert."""
    if result.infos or result.final_infos:
        conn.send((Reply.INFOS, (result.infos, result.final_infos)))
    for failure in result.failures:
        conn.send((Reply.ERROR, error_payload(failure.env_index, failure.action, failure.error,
                                              failure.worker_traceback)))
    runner.publish(result.finished)
    if result.failures:
        runner.storage.core.post_alert()


def _answer(conn, runner: EnvRunner, call_id: int, name: str, offsets, work) -> None:
    """Runs `work(env, offset)` for each env offset and sends the results, or the first env's error."""
    results, offset = [], None
    try:
        for offset in range(len(runner.envs)) if offsets is None else offsets:
            results.append(work(runner.envs[offset], offset))
        conn.send((Reply.RESULT, (call_id, results)))
    except Exception as error:  # noqa: BLE001
        conn.send((Reply.FAILED, (call_id, error_payload(runner.first_env + (offset or 0), name, error))))


def _serve(worker_index: int, runner: EnvRunner, conn) -> None:
    core = runner.storage.core
    # Our parent is the learner (fork, spawn) or the forkserver, which exits when the learner does; either
    # way a new parent means the learner is gone.
    watched_pid = os.getppid()
    # One poll object for the command pipe: conn.poll() builds a selector on every call, which costs more
    # than a whole CartPole step; a readable or hung-up pipe both count as "look at it", as with conn.poll().
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    while True:
        status = core.worker_wait(worker_index, IDLE_WAIT_MS)
        if status == Wait.SHUTDOWN:
            return
        if status == Wait.TIMEOUT and os.getppid() != watched_pid:
            return  # the learner is gone
        while poller.poll(0):
            if not _obey(conn, runner, conn.recv()):
                return
        batch = core.worker_pop(worker_index)  # (a view of the core's buffer; stepping does not touch it)
        if len(batch) and poller.poll(0):  # actions sent pickled before this dispatch, while we popped
            batch = batch.copy()  # (commands below reuse the core's buffer)
            while poller.poll(0):
                if not _obey(conn, runner, conn.recv()):
                    return
        if len(batch) and runner.lacks_object_actions(batch):  # (a large message still on its way)
            batch = batch.copy()
            while runner.lacks_object_actions(batch):
                if not _obey(conn, runner, conn.recv()):
                    return
        if len(batch):
            _report(conn, runner, runner.step(batch))


def _obey(conn, runner: EnvRunner, message) -> bool:
    """Carries out one command of the learner; False for CLOSE."""
    command = message[0]
    if command == Command.CLOSE:
        return False
    if command == Command.ACTIONS:
        runner.put_object_actions(message[1])
    elif command == Command.RESET:
        _, env_ids, seeds, options = message
        _report(conn, runner, runner.reset(env_ids, seeds, options))
    elif command == Command.RESTART_ENVS:
        _, lost, held, reason, resetting, seeds, options = message
        runner.mark_for_restart(held, reason)
        _report(conn, runner, runner.restart_envs(lost, reason))
        if len(resetting):
            _report(conn, runner, runner.reset(resetting, seeds, options))
    elif command == Command.CALL:
        _, call_id, name, args, kwargs, offsets = message
        _answer(conn, runner, call_id, f"call({name!r})", offsets,
                lambda env, _: call_env(env, name, args, kwargs))
    elif command == Command.SET_ATTR:
        _, call_id, name, values = message
        _answer(conn, runner, call_id, f"set_attr({name!r})", None,
                lambda env, offset: set_env_attr(env, name, values[offset]))
    elif command == Command.METADATA:
        _answer(conn, runner, message[1], "metadata", [0], lambda env, _: env_metadata(env))
    return True
