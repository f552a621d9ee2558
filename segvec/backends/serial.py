"""The serial backend: every env runs in the learner's process and steps as soon as its action is sent.

The same runner as a worker process's (`make_runner`) drives the envs, over a block in plain memory.  Env
errors are kept and raised by the next `wait`, as the multiprocessing backend raises them, so the faces see
the same thing from both.
"""
from __future__ import annotations

import traceback
from typing import Callable

import numpy as np

from segvec._core import Geometry, Storage
from segvec.backends.base import Backend, call_env, env_metadata, set_env_attr
from segvec.errors import SegvecError, make_env_error
from segvec.runner import BatchResult, make_runner


class SerialBackend(Backend):
    """Runs every env in the learner's process, stepping at dispatch time."""

    num_workers = 1

    @staticmethod
    def resolve_num_workers(num_envs: int, num_workers: int | None) -> int:
        if num_workers not in (None, 1):
            raise ValueError("the serial backend runs every env in this process: leave num_workers unset")
        return 1

    def __init__(self, env_fns: list[Callable], autoreset_mode, num_workers: int = 1, context=None,
                 restart_failed_envs: bool = False, daemon: bool = True):
        super().__init__()
        self.env_fns = env_fns
        self.autoreset_mode = autoreset_mode
        self.restart_failed_envs = restart_failed_envs
        self.envs: list = []

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
        self.runner = make_runner(self.envs, 0, self.storage, self.autoreset_mode,
                                  self.env_fns if self.restart_failed_envs else None)
        return self.storage

    def env_metadata(self) -> dict:
        return env_metadata(self.envs[0])

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

    def send_object_actions(self, actions: dict) -> None:
        self.runner.put_object_actions(actions)

    def after_dispatch(self) -> None:
        self._take(self.runner.step(self.storage.core.worker_pop(0)))

    def reset(self, env_ids: np.ndarray, seeds: list, options) -> None:
        self._take(self.runner.reset(env_ids, seeds, options))

    def wait(self, min_count: int, deadline: float | None) -> None:
        """Envs step at dispatch here: raises the oldest env error not raised yet, else returns."""
        self.raise_errors()
        _, ready = self.storage.core.wait_ready(min_count, 0)
        if ready < min_count:  # every dispatched env was stepped at dispatch: nothing to wait for
            raise SegvecError(f"only {ready} of {min_count} envs are ready in the serial backend")

    def infos_for(self, env_ids: np.ndarray, deadline: float | None = None) -> tuple[dict, dict]:
        wanted = [int(e) for e in env_ids[self.storage.env_has_info[env_ids] != 0]]
        return ({e: self._infos.pop(e) for e in wanted if e in self._infos},
                {e: self._final_infos.pop(e) for e in wanted if e in self._final_infos})

    def call(self, name, args, kwargs, env_ids=None, timeout: float | None = None) -> list:
        results = []
        for index in range(len(self.envs)) if env_ids is None else env_ids:
            try:
                results.append(call_env(self.envs[index], name, args, kwargs))
            except Exception as error:
                raise make_env_error(error, index, f"call({name!r})", traceback.format_exc()) from error
        return results

    def set_attr(self, name: str, values: list, timeout: float | None = None) -> None:
        for index, (env, value) in enumerate(zip(self.envs, values)):
            try:
                set_env_attr(env, name, value)
            except Exception as error:
                raise make_env_error(error, index, f"set_attr({name!r})", traceback.format_exc()) from error

    def close(self, terminate: bool = False) -> None:
        if self.storage is not None:
            self.storage.close()
        for env in self.envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - close every env whatever one of them does
                pass
        self.envs = []
