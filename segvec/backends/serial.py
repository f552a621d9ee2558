"""The serial backend: every env runs in the learner's process and steps as soon as its action is sent.

The same runner as a worker process's (`make_runner`) drives the envs, over a block in plain memory, through
`LocalEnvs` (``local.py``), which also steps the learner's share of the multiprocessing backend.  Env
errors are kept and raised by the next `wait`, as the multiprocessing backend raises them, so the faces see
the same thing from both.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from segvec._core import Geometry, Storage
from segvec.backends.base import Backend
from segvec.backends.local import LocalEnvs
from segvec.errors import SegvecError


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
        self.local = LocalEnvs(self, env_fns, 0, 0, autoreset_mode, restart_failed_envs)

    @property
    def envs(self) -> list:
        """The env objects, in env order."""
        return self.local.envs

    @property
    def runner(self):
        """The runner that steps every env (`make_runner`)."""
        return self.local.runner

    def create_envs(self) -> list[tuple]:
        return self.local.create()

    def attach(self, geometry: Geometry) -> Storage:
        self.storage = Storage(geometry, shared=False)
        self.local.attach(self.storage)
        return self.storage

    def env_metadata(self) -> dict:
        return self.local.metadata()

    def send_object_actions(self, actions: dict) -> None:
        self.local.put_object_actions(actions)

    def after_dispatch(self) -> None:
        self.local.step()

    def reset(self, env_ids: np.ndarray, seeds: list, options) -> None:
        self.local.reset(env_ids, seeds, options)

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
        return self.local.call(name, args, kwargs, env_ids)

    def set_attr(self, name: str, values: list, timeout: float | None = None) -> None:
        self.local.set_attr(name, values)

    def close(self, terminate: bool = False) -> None:
        if self.storage is not None:
            self.storage.close()
        self.local.close()
