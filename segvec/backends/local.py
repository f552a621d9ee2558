"""Envs stepped in the learner's own process: the share of the serial backend (every env) and of the
multiprocessing backend with ``learner_share=True`` (worker 0's envs).

`LocalEnvs` builds the envs of one worker, drives them through the same runner as a worker process does
(`make_runner`), and hands what a batch did to its backend as a worker's pipe would: infos and errors into
the backend's queues, the finished envs published in the core, a KeyboardInterrupt re-raised after the
envs it did not reach went back to the learner.
"""
from __future__ import annotations

import traceback
from typing import Callable

import numpy as np

from segvec._core import Storage
from segvec.backends.base import Backend, call_env, env_metadata, set_env_attr
from segvec.errors import make_env_error
from segvec.runner import BatchResult, EnvRunner, close_envs, make_runner


class LocalEnvs:
    """Worker `worker`'s envs ``[first_env, first_env + len(env_fns))``, built and stepped in this process.

    Args:
        backend: the backend whose ``_infos``, ``_final_infos`` and ``_errors`` receive what the envs report.
        env_fns: one factory per env, in env order.
        first_env: the vector-env index of ``env_fns[0]``.
        worker: the worker index of these envs in the core (whose action queue `step` pops).
        autoreset_mode: the vector env's autoreset mode.
        restart_failed_envs: rebuild (with its factory) and reset an env that raises, instead of failing it.
    """

    envs: list
    runner: EnvRunner | None

    def __init__(self, backend: Backend, env_fns: list[Callable], first_env: int, worker: int, autoreset_mode,
                 restart_failed_envs: bool):
        self.backend = backend
        self.env_fns = env_fns
        self.first_env = first_env
        self.worker = worker
        self.autoreset_mode = autoreset_mode
        self.restart_failed_envs = restart_failed_envs
        self.envs = []
        self.runner = None

    def create(self) -> list[tuple]:
        """Builds the envs; returns ``[(observation_space, action_space)]`` in env order.

        Raises:
            EnvError: a factory raised (the envs built so far are closed).
        """
        for offset, fn in enumerate(self.env_fns):
            try:
                self.envs.append(fn())
            except Exception as error:
                self.close()
                raise make_env_error(error, self.first_env + offset, "__init__", traceback.format_exc()) from error
        return [(env.observation_space, env.action_space) for env in self.envs]

    def attach(self, storage: Storage) -> None:
        """Builds the runner of the envs over `storage` (the block every worker maps)."""
        self.runner = make_runner(self.envs, self.first_env, storage, self.autoreset_mode,
                                  self.env_fns if self.restart_failed_envs else None)

    def take(self, result: BatchResult) -> bool:
        """Keeps a batch's infos and errors, publishes its finished envs, re-raises an interrupt.

        Returns:
            Whether an env failed (its EnvError is queued in the backend).
        """
        backend = self.backend
        backend._infos.update(result.infos)
        backend._final_infos.update(result.final_infos)
        self.runner.publish(result.finished)
        failed = False
        for failure in result.failures:
            if failure.error is not result.interrupt:
                error = make_env_error(failure.error, failure.env_index, failure.action, failure.worker_traceback)
                error.__cause__ = failure.error
                backend._errors.append(error)
                failed = True
        if result.interrupt is not None:
            raise result.interrupt
        return failed

    def step(self) -> bool:
        """Steps the envs dispatched to this worker (its action queue in the core); see `take`."""
        return self.take(self.runner.step(self.runner.storage.core.worker_pop(self.worker)))

    def reset(self, env_ids: np.ndarray, seeds: list, options) -> bool:
        """Resets `env_ids` (RESETTING in the core, all of them this share's) with `seeds`; see `take`."""
        return self.take(self.runner.reset(env_ids, seeds, options))

    def put_object_actions(self, actions: dict) -> None:
        """The object leaves of the actions of this share's envs, ``{env: [values]}``."""
        self.runner.put_object_actions(actions)

    def call(self, name, args, kwargs, env_ids=None) -> list:
        """Calls `name` on each env of `env_ids` (vector-env indices; default every env of the share).

        Raises:
            EnvError: the first env that raised, named, with its traceback.
        """
        return self._each(f"call({name!r})", env_ids, lambda env, _: call_env(env, name, args, kwargs))

    def set_attr(self, name: str, values: list) -> None:
        """Sets attribute `name` of the share's env i to ``values[i]``.

        Raises:
            EnvError: the first env that raised, named, with its traceback.
        """
        self._each(f"set_attr({name!r})", None, lambda env, offset: set_env_attr(env, name, values[offset]))

    def metadata(self) -> dict:
        """The first env's ``metadata`` (with its ``render_mode``)."""
        return env_metadata(self.envs[0])

    def _each(self, action: str, env_ids, work) -> list:
        results = []
        for index in range(self.first_env, self.first_env + len(self.envs)) if env_ids is None else env_ids:
            offset = int(index) - self.first_env
            try:
                results.append(work(self.envs[offset], offset))
            except Exception as error:
                raise make_env_error(error, int(index), action, traceback.format_exc()) from error
        return results

    def close(self) -> None:
        """Closes every env (whatever one of them raises); idempotent."""
        close_envs(self.envs)
        self.envs = []
