"""The seam between the vector env's faces and where its envs run: the `Backend` interface.

`SegmentVecEnv` talks to its envs only through these methods; it never asks which backend it has.  A new
backend (threads, a batched engine, remote runners) subclasses `Backend`, implements every abstract
method with these signatures, and adds its name to ``BACKENDS`` in ``segvec/backends/__init__.py``.
Whatever runs the envs drives an `EnvRunner` (``segvec/runner.py``) or does its job: for every env it is
given (IN_FLIGHT or RESETTING in the core), write the outcome and the new observation into the env's slot
through the core, then publish the env; report an env that raised as a failure (the env becomes FAILED).

Life of a backend:
    source(env_fns)        (static) what SegmentVecEnv's first argument is, and how many envs it gives
    create_envs()          build the envs; returns each env's (observation_space, action_space)
    attach(geometry)       build the segment block for that geometry; returns its `Storage`
    env_metadata()         env 0's ``metadata`` (with ``render_mode``)
    before_reset(ids, options)   a reset of `ids` begins (nothing changed yet): refuse it, or settle first
    reset(ids, seeds, options)   reset RESETTING envs (their rows are flushed); they publish when done
    send_object_actions(actions)   the object leaves of actions ({env: [values]}), before their dispatch
    after_dispatch()       actions were dispatched through the core (a backend that steps inline does it here)
    wait(min_count, deadline)    until min_count envs are published; raises the envs' errors
    infos_for(ids, deadline)     (infos, final_infos) of the envs whose ``env_has_info`` flag is set
    batched_infos(ids, size, deadline)   the same, already batched, for envs that report batched infos
    call(name, args, kwargs, env_ids, timeout) / set_attr(name, values, timeout)
    raise_errors()         raises the oldest env error not raised yet (each error is raised once)
    discard_errors(ids)    forgets (with a warning) the errors not raised yet of envs about to be reset
    close(terminate)       idempotent; leaves no process and no shared memory behind
"""
from __future__ import annotations

import abc
import warnings

import numpy as np

from segvec._core import Geometry, Storage


class Backend(abc.ABC):
    """Where the envs of one `SegmentVecEnv` run (see the module docstring for the life of one).

    Attributes:
        num_workers: processes (or other units) the envs are split over; env ``e`` belongs to unit
            ``e // (num_envs // num_workers)``.
        storage: the segment block, once attached.
    """

    num_workers: int
    storage: Storage | None = None

    def __init__(self):
        self._errors: list[BaseException] = []  # env errors not raised yet, oldest first
        self._infos: dict[int, dict] = {}        # infos of published envs, until the learner asks
        self._final_infos: dict[int, dict] = {}

    def _collect_errors(self) -> None:
        """Moves env errors that reached this process into the queue (a backend with pipes reads them)."""

    def raise_errors(self) -> None:
        """Raises the oldest env error not raised yet, if any (each is raised once)."""
        self._collect_errors()
        if self._errors:
            raise self._errors.pop(0)

    def discard_errors(self, env_ids) -> None:
        """Forgets the errors not raised yet of `env_ids` (about to be reset), each with a warning."""
        self._collect_errors()
        ids = {int(e) for e in env_ids}
        kept = []
        for error in self._errors:
            if getattr(error, "env_index", -1) in ids:
                warnings.warn(f"dropped by the reset of env {error.env_index}: {error}", RuntimeWarning, stacklevel=4)
            else:
                kept.append(error)
        self._errors = kept

    @staticmethod
    def source(env_fns) -> tuple:
        """``(source, num_envs)`` of what `SegmentVecEnv` was given: here a list of env factories (one per
        env); a backend with envs of another origin (a batched engine) says what it takes.

        Raises:
            TypeError: `env_fns` is not what this backend takes.
        """
        fns = list(env_fns)
        return fns, len(fns)

    @staticmethod
    @abc.abstractmethod
    def resolve_num_workers(num_envs: int, num_workers: int | None) -> int:
        """The number of workers to use for `num_envs` envs when the user asked for `num_workers`.

        Raises:
            ValueError: `num_workers` does not suit this backend or does not divide `num_envs`.
        """

    @abc.abstractmethod
    def create_envs(self) -> list[tuple]:
        """Builds every env; returns ``[(observation_space, action_space)]`` in env order.

        Raises:
            EnvError: an env's factory raised (the backend has cleaned up after itself).
        """

    @abc.abstractmethod
    def attach(self, geometry: Geometry) -> Storage:
        """Builds the segment block of `geometry` and hands it to whatever runs the envs."""

    @abc.abstractmethod
    def env_metadata(self) -> dict:
        """Env 0's ``metadata``, with its ``render_mode`` under that key."""

    def before_reset(self, env_ids: np.ndarray, options: dict | None) -> None:
        """A reset of `env_ids` begins: called before anything changes (envs still in flight are waited for
        after it).  A backend that cannot reset these envs now raises (ValueError); one that holds actions
        it has not applied yet gives them back.  Nothing to do by default."""

    @abc.abstractmethod
    def reset(self, env_ids: np.ndarray, seeds: list, options: dict | None) -> None:
        """Resets `env_ids` (RESETTING in the core) with ``seeds[i]`` and `options`; does not wait."""

    @abc.abstractmethod
    def send_object_actions(self, actions: dict) -> None:
        """Hands over the parts of actions with no fixed shape (``{env: [value per object leaf]}``); called
        just before those envs are dispatched (see ``segvec/objects.py``)."""

    @abc.abstractmethod
    def after_dispatch(self) -> None:
        """Called after every dispatch of actions (a backend that steps in the learner's process steps here)."""

    @abc.abstractmethod
    def wait(self, min_count: int, deadline: float | None) -> None:
        """Returns once `min_count` envs are published.

        Raises:
            EnvError: an env raised (each error once; the env is FAILED in the core).
            WorkerDied: a worker died (and envs are not restarted).
            multiprocessing.TimeoutError: `deadline` (``time.monotonic()``) passed.
        """

    @abc.abstractmethod
    def infos_for(self, env_ids: np.ndarray, deadline: float | None = None) -> tuple[dict, dict]:
        """``(infos, final_infos)`` by env index for the envs of `env_ids` whose info flag is set."""

    def batched_infos(self, env_ids: np.ndarray, size: int, deadline: float | None = None) -> dict | None:
        """The infos of `env_ids` in gymnasium's batched layout (positions 0..len-1 of a batch of `size`),
        for a backend whose envs report their infos batched already (a batched engine); None (the default):
        `collect_infos` builds them from `infos_for`, env by env."""
        return None

    @abc.abstractmethod
    def call(self, name, args: tuple, kwargs: dict, env_ids=None, timeout: float | None = None) -> list:
        """Calls `name` on every env (or on `env_ids`, results in that order); see `call_env`."""

    @abc.abstractmethod
    def set_attr(self, name: str, values: list, timeout: float | None = None) -> None:
        """Sets attribute `name` of env i to ``values[i]`` (see `set_env_attr`)."""

    @abc.abstractmethod
    def close(self, terminate: bool = False) -> None:
        """Stops every env and frees the block; idempotent."""


def call_env(env, name, args, kwargs):
    """Calls method `name` of `env` (or returns the attribute), found through wrappers like gymnasium's
    vector envs do (``get_wrapper_attr``); a callable `name` is called as ``name(env, *args, **kwargs)``."""
    if callable(name):
        return name(env, *args, **kwargs)
    attribute = env.get_wrapper_attr(name) if hasattr(env, "get_wrapper_attr") else getattr(env, name)
    return attribute(*args, **kwargs) if callable(attribute) else attribute


def set_env_attr(env, name: str, value) -> None:
    """Sets attribute `name` where it lives in the wrapper stack (gymnasium's ``set_wrapper_attr``)."""
    if hasattr(env, "set_wrapper_attr"):
        env.set_wrapper_attr(name, value)
    else:
        setattr(env, name, value)


def env_metadata(env) -> dict:
    """An env's ``metadata`` with its ``render_mode`` under that key (gymnasium vector envs report it so)."""
    metadata = dict(getattr(env, "metadata", None) or {})
    metadata.setdefault("render_mode", getattr(env, "render_mode", None))
    return metadata
