"""The engine backend: the envs are the sub-envs of a batched engine that steps them itself.

A batched engine (a gymnasium ``VectorEnv`` such as ``SyncVectorEnv``, ``AsyncVectorEnv`` or ale-py's
``AtariVectorEnv``; an EnvPool gymnasium env) is already parallel, so it runs in the learner's process and
this backend only moves its batches in and out of the segment block: it reads the envs' actions from their
slots, hands the engine one batch, and records what comes back with the core's own bookkeeping -- one
``commit_steps`` (or ``commit_resets``) per batch, one scatter call per observation leaf, one ``publish``.
Nothing on that path loops over envs in Python.

How the engine's behaviour maps onto the core's:

- Autoreset: the engine's mode is the vector env's.  NEXT_STEP: the engine's reset step (the action sent
  to an env whose episode ended is ignored, reward 0) becomes the core's masked reset step.  SAME_STEP: the
  engine's ``final_obs`` (gymnasium's object array, or ale-py's dense array) becomes the block's final
  observations, from which truncations are bootstrapped.  DISABLED: the user resets ended envs.
- Engines that step every env at once (gymnasium's vector envs, AtariVectorEnv): the engine steps when
  every env has its action.  A send of some envs (the async face with ``batch_size < num_envs``) waits for
  the others; the step's results are then returned in batches.  EnvPool steps any envs it is sent; in its
  async mode (``batch_size < num_envs``) each of its ``recv`` returns ``batch_size`` envs.
- Failures: the engine is one unit.  When an engine call raises, every env it had in flight (sent or being
  reset) becomes FAILED and an EnvError names the engine (``env_index == -1``, ``failed_envs`` lists the
  envs) with the traceback; ``reset()`` brings them back if the engine can still reset.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import time
import traceback
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from segvec import checks
from segvec._core import EnvState, Geometry, Scatter, Storage
from segvec.backends.base import Backend, call_env, env_metadata, set_env_attr
from segvec.errors import EnvError, SegvecError, make_env_error, warn
from segvec.runner import HEAD_REWARDS_KEY
from segvec.spaces import SpaceLayout

_READY = 1 << EnvState.READY
_IN_FLIGHT, _RESETTING = int(EnvState.IN_FLIGHT), int(EnvState.RESETTING)


class EngineOutputError(ValueError):
    """The engine returned something that does not fit its spaces or its own batch."""


@dataclasses.dataclass(slots=True)
class Landing:
    """A batch the engine returned: env ``env_ids[i]`` is row ``i`` of the arrays (or row ``rows[i]`` of
    the observations and ``info_rows[i]`` of the info arrays when those are given).  ``reward`` None: the
    batch is a reset."""

    env_ids: np.ndarray
    obs: Any
    rows: np.ndarray | None = None
    reward: Any = None
    terminated: Any = None
    truncated: Any = None
    info: dict | None = None
    info_rows: np.ndarray | None = None


def _defined_in(obj, package: str) -> bool:
    return any(getattr(cls, "__module__", "").split(".")[0] == package for cls in type(obj).__mro__)


def _mode_of(engine) -> AutoresetMode:
    metadata = getattr(engine, "metadata", None) or {}
    mode = metadata.get("autoreset_mode", getattr(engine, "autoreset_mode", None))
    return AutoresetMode.NEXT_STEP if mode is None else checks.autoreset_mode(mode)


class _GymnasiumEngine:
    """A gymnasium ``VectorEnv``: every env steps at once, actions in env order.  ``step_async``/``step_wait``
    (AsyncVectorEnv) split a step so that the learner can work while the engine steps; ale-py's
    AtariVectorEnv splits it with ``send``/``recv`` and names the envs of a batch in ``info["env_id"]``."""

    whole = True

    def __init__(self, engine):
        self.engine = engine
        self.num_envs = int(engine.num_envs)
        self.batch = self.num_envs
        self.name = type(engine).__name__
        self.autoreset_mode = _mode_of(engine)
        base = getattr(engine, "unwrapped", engine)
        self.ale = _defined_in(base, "ale_py")  # seeds per env reset, info["env_id"] names the rows
        if self.ale and int(getattr(base, "batch_size", self.num_envs)) != self.num_envs:
            raise ValueError(f"AtariVectorEnv with batch_size={base.batch_size} < num_envs={self.num_envs} (its async "
                             "mode) is not supported: make it with batch_size=num_envs (the default); segvec's async "
                             "face returns its envs in batches of the vector env's batch_size")
        if self.ale and base is engine:
            self._start, self._finish = engine.send, engine.recv
        elif callable(getattr(engine, "step_async", None)) and callable(getattr(engine, "step_wait", None)):
            # (never with a timeout: AsyncVectorEnv gives a timed-out step up, and its results would then
            # reach the next call)
            self._start, self._finish = engine.step_async, engine.step_wait
        else:
            self._start, self._finish = None, None
        self.eager = self._start is None  # the step is over when send returns
        self.in_flight = 0
        self._result = None
        self._ids = np.arange(self.num_envs, dtype=np.int32)

    def spaces(self) -> tuple:
        return self.engine.single_observation_space, self.engine.single_action_space

    def can_recv(self) -> bool:
        return self.in_flight > 0

    def send(self, env_ids: np.ndarray, actions) -> None:
        self.in_flight = self.num_envs
        if self._start is None:
            self._result = self.engine.step(actions)
        else:
            self._start(actions)

    def recv(self) -> Landing:
        if self._finish is None:
            result, self._result = self._result, None
        else:
            result = self._finish()
        self.in_flight = 0
        obs, reward, terminated, truncated, info = result
        return Landing(self._row_ids(info), obs, None, reward, terminated, truncated, info)

    def _row_ids(self, info) -> np.ndarray:
        """The env of each row of a batch: ``self._ids`` itself when they are every env in env order."""
        if self.ale and isinstance(info, dict) and "env_id" in info:
            ids = np.ascontiguousarray(info["env_id"], dtype=np.int32)
            if len(ids) != self.num_envs or not (ids == self._ids).all():
                return ids
        return self._ids

    def reset(self, env_ids: np.ndarray, seeds: list, options: dict | None) -> Landing:
        full = len(env_ids) == self.num_envs
        options = dict(options) if options else {}
        if not full:
            mask = np.zeros(self.num_envs, bool)
            mask[env_ids] = True
            options["reset_mask"] = mask
        seed = None
        if any(s is not None for s in seeds):
            if self.ale:  # one seed per env reset, -1: unseeded
                seed = np.asarray([-1 if s is None else int(s) for s in seeds], np.int64)
            else:  # gymnasium: one per env of the vector env
                seed = [None] * self.num_envs
                for e, s in zip(env_ids.tolist(), seeds):
                    seed[e] = s
        obs, info = self.engine.reset(seed=seed, options=options or None)
        self.in_flight = 0
        rows = self._row_ids(info)
        if rows is not self._ids:  # row of each env in the results
            order = np.empty(self.num_envs, np.int64)
            order[rows] = np.arange(len(rows))
            rows = order[env_ids]
        else:
            rows = None if full else env_ids.astype(np.int64)
        return Landing(env_ids, obs, rows, info=info, info_rows=rows)

    def check_reset(self, env_ids: np.ndarray, options: dict | None) -> None:
        pass

    def forget(self) -> None:
        self.in_flight, self._result = 0, None


class _EnvPoolEngine:
    """An EnvPool gymnasium env: steps the envs it is sent (``send(actions, env_id)``), returns a batch per
    ``recv`` with ``info["env_id"]``; in async mode every ``recv`` returns ``batch_size`` envs."""

    whole = False
    eager = False

    def __init__(self, engine):
        self.engine = engine
        config = engine.config
        self.num_envs = int(config["num_envs"])
        self.batch = int(config.get("batch_size") or self.num_envs)
        self.async_mode = self.batch < self.num_envs
        self.name = type(engine).__name__
        self.autoreset_mode = _mode_of(engine)
        if self.async_mode and self.num_envs % self.batch:
            raise ValueError(f"EnvPool in async mode returns whole batches of batch_size={self.batch} envs, so that "
                             f"every env can be received num_envs must be a multiple of it (got num_envs="
                             f"{self.num_envs})")
        self.in_flight = 0
        self._warned_seeds = False

    def spaces(self) -> tuple:
        return self.engine.single_observation_space, self.engine.single_action_space

    def can_recv(self) -> bool:
        return self.in_flight >= (self.batch if self.async_mode else 1)

    def send(self, env_ids: np.ndarray, actions) -> None:
        self.engine.send(actions, env_ids)
        self.in_flight += len(env_ids)

    def recv(self) -> Landing:
        obs, reward, terminated, truncated, info = self.engine.recv()
        ids = np.ascontiguousarray(info["env_id"], dtype=np.int32)
        self.in_flight -= len(ids)
        return Landing(ids, obs, None, reward, terminated, truncated, info)

    def reset(self, env_ids: np.ndarray, seeds: list, options: dict | None) -> Landing | None:
        if any(s is not None for s in seeds) and not self._warned_seeds:
            self._warned_seeds = True
            warn("segvec: EnvPool fixes its envs' seeds when it is made (envpool.make_gymnasium(..., seed=...)); the "
                 "seeds given to reset are ignored. This warning comes once.")
        if self.async_mode and len(env_ids) == self.num_envs:
            self.engine.async_reset()  # the first observations come through recv
            self.in_flight += self.num_envs
            return None
        obs, info = self.engine.reset(env_id=env_ids)  # async mode: the first batch of them; the rest follow
        ids = np.ascontiguousarray(info["env_id"], dtype=np.int32)
        self.in_flight += len(env_ids) - len(ids)
        return Landing(ids, obs, info=info)

    def check_reset(self, env_ids: np.ndarray, options: dict | None) -> None:
        if options:
            raise ValueError(f"EnvPool's reset takes no options (other than reset_mask), got {sorted(options)}")
        if self.async_mode and len(env_ids) % self.batch:
            raise ValueError(f"EnvPool in async mode returns whole batches of batch_size={self.batch} envs: a reset "
                             f"of {len(env_ids)} envs would never be received whole. Reset a multiple of {self.batch} "
                             "envs (reset() or async_reset() resets them all)")
        if self.async_mode and self.in_flight % self.batch:
            raise ValueError(f"EnvPool in async mode has {self.in_flight} envs in flight, which it cannot return in "
                             f"whole batches of {self.batch}: send actions to the envs you received before resetting")

    def forget(self) -> None:
        self.in_flight = 0


def engine_of(engine):
    """The adapter of a batched engine.

    Raises:
        TypeError: `engine` is not a gymnasium VectorEnv or an EnvPool gymnasium env.
        ValueError: an engine mode segvec does not support (AtariVectorEnv's async mode; EnvPool's async
            mode with num_envs not a multiple of batch_size).
    """
    if _defined_in(engine, "envpool"):
        if not isinstance(engine, VectorEnv):
            raise TypeError(f"{type(engine).__name__} is an EnvPool env without gymnasium's API: make it with "
                            "envpool.make_gymnasium(...)")
        return _EnvPoolEngine(engine)
    if isinstance(engine, VectorEnv):
        return _GymnasiumEngine(engine)
    raise TypeError(f"wrap_vector_env needs a batched engine: a gymnasium.vector.VectorEnv (SyncVectorEnv, "
                    f"AsyncVectorEnv, ale_py's AtariVectorEnv, ...) or an EnvPool gymnasium env, got "
                    f"{type(engine).__name__}. For single envs, use segvec.make_vec")


def engine_options(engine) -> dict:
    """The options a `SegmentVecEnv` over `engine` follows from the engine: its autoreset mode, and the size
    of its batches (EnvPool's async mode) as the default ``batch_size``."""
    io = engine_of(engine)
    return {"autoreset_mode": io.autoreset_mode, "batch_size": io.batch}


class _BatchedInfos:
    """The engine's infos as it returned them, batched: each env points at the info dict of its latest
    batch and its position there, so that a later `take` in any order is one gather per key (none when
    the envs asked are that batch, in its order)."""

    def __init__(self, num_envs: int, every_env: np.ndarray):
        self.num_envs = num_envs
        self.every_env = every_env  # the ids array of a batch of every env in env order
        self.batch = np.full(num_envs, -1, np.int64)   # key of the kept info holding env e's latest info
        self.position = np.zeros(num_envs, np.int64)  # env e's position in it
        self.kept: dict[int, tuple[dict, int | None]] = {}
        self._next = 0
        self._arange = np.arange(num_envs, dtype=np.int64)
        self._whole: int | None = None  # key of a batch that is every env's latest, env e at position e
        self._identity = False  # position[e] == e for every env

    def put(self, env_ids: np.ndarray, info: dict | None, rows: np.ndarray | None, flags: np.ndarray) -> None:
        n = len(env_ids)
        every = env_ids is self.every_env and rows is None
        if not info:
            self.batch[env_ids] = -1
            flags[env_ids] = 0
            self._whole = -1 if every else None
            return
        key = self._next
        self._next += 1
        length = None
        for value in info.values():
            if isinstance(value, np.ndarray) and value.ndim:
                length = len(value)
                break
        if every:  # (a step of every env: no per-env bookkeeping)
            if not self._identity:
                self.position[:] = self._arange
                self._identity = True
            flags.fill(1)
            self.batch.fill(key)
            self._whole = key
            self.kept = {key: (info, length)}
            return
        self.kept[key] = (info, length)
        flags[env_ids] = 1
        self._whole = None
        self._identity = False
        self.batch[env_ids] = key
        self.position[env_ids] = self._arange[:n] if rows is None else rows
        if len(self.kept) > 2 * self.num_envs + 8:
            live = set(np.unique(self.batch).tolist())
            self.kept = {k: v for k, v in self.kept.items() if k in live}

    def take(self, env_ids: np.ndarray, size: int) -> dict:
        whole = self._whole
        if whole is not None and size == len(env_ids) == self.num_envs and (env_ids == self._arange).all():
            return {} if whole < 0 else dict(self.kept[whole][0])
        keys = self.batch[env_ids]
        first = int(keys[0]) if len(keys) else -1
        if len(keys) and (keys == first).all():
            if first < 0:
                return {}
            info, length = self.kept[first]
            positions = self.position[env_ids]
            if length == size == len(env_ids) and (positions == self._arange[:size]).all():
                return dict(info)  # the batch as the engine returned it
            return _gather({}, info, positions, self._arange[:len(env_ids)], size)
        out: dict = {}
        for key in np.unique(keys[keys >= 0]).tolist():
            at = np.flatnonzero(keys == key)
            _gather(out, self.kept[key][0], self.position[env_ids[at]], at, size)
        return out

    def one(self, env_index: int) -> dict:
        key = int(self.batch[env_index])
        if key < 0:
            return {}
        return _pick(self.kept[key][0], int(self.position[env_index]))


def _gather(out: dict, info: dict, src: np.ndarray, dst: np.ndarray, size: int) -> dict:
    """``out[key][dst] = info[key][src]`` for every per-env array of `info` (nested dicts too); values that
    are not one entry per env are passed on as they are."""
    top = int(src.max()) if len(src) else -1
    for key, value in info.items():
        if isinstance(value, dict):
            _gather(out.setdefault(key, {}), value, src, dst, size)
            continue
        if not isinstance(value, np.ndarray) or value.ndim == 0 or len(value) <= top:
            out[key] = value
            continue
        target = out.get(key)
        if not isinstance(target, np.ndarray) or len(target) != size:
            target = (np.full(size, None, dtype=object) if value.dtype == object
                      else np.zeros((size,) + value.shape[1:], value.dtype))
            out[key] = target
        target[dst] = value[src]
    return out


def _pick(info: dict, position: int) -> dict:
    out = {}
    for key, value in info.items():
        if isinstance(value, dict):
            out[key] = _pick(value, position)
        elif isinstance(value, np.ndarray) and value.ndim and position < len(value):
            out[key] = value[position]
    return out


class EngineBackend(Backend):
    """The sub-envs of one batched engine, stepped in the learner's process (see the module docstring).

    Attributes:
        engine: the engine (closed with the vector env).
    """

    num_workers = 1

    @staticmethod
    def source(env_fns) -> tuple:
        return env_fns, engine_of(env_fns).num_envs

    @staticmethod
    def resolve_num_workers(num_envs: int, num_workers: int | None) -> int:
        if num_workers not in (None, 1):
            raise ValueError("a batched engine runs its envs itself, in this process: leave num_workers unset")
        return 1

    def __init__(self, engine, autoreset_mode, num_workers: int = 1, context=None, restart_failed_envs: bool = False,
                 daemon: bool = True):
        super().__init__()
        self.io = engine_of(engine)
        self.engine = engine
        if restart_failed_envs:
            raise ValueError("restart_failed_envs needs a factory per env, and a batched engine's envs cannot be "
                             "rebuilt one by one: leave it off. When the engine raises, its envs fail with an "
                             "EnvError naming the engine; reset() brings them back if the engine can still reset")
        if context is not None:
            raise ValueError("a batched engine runs in this process: `context` does not apply")
        if autoreset_mode != self.io.autoreset_mode:
            raise ValueError(f"{self.io.name} autoresets in {self.io.autoreset_mode.name} mode and segvec follows its "
                             f"engine: pass autoreset_mode={self.io.autoreset_mode.name!r} (or leave it out with "
                             f"segvec.wrap_vector_env), not {autoreset_mode.name!r}; choose the mode where the engine "
                             "is made")
        self.autoreset_mode = autoreset_mode
        E = self.io.num_envs
        self._all_ids = getattr(self.io, "_ids", None)  # the adapter's: a batch of every env in order is it
        if self._all_ids is None:
            self._all_ids = np.arange(E, dtype=np.int32)
        self._pending = np.zeros(E, bool)  # sent, waiting for the other envs (engines that step every env at once)
        self._waiting = False  # some are
        self._batched = _BatchedInfos(E, self._all_ids)
        self._owns_engine = False
        self._closed = False

    # ---- start-up -------------------------------------------------------------------------------
    def create_envs(self) -> list[tuple]:
        observation_space, action_space = self.io.spaces()
        for role, space in (("observation", observation_space), ("action", action_space)):
            if not isinstance(space, spaces.Space):
                raise TypeError(f"{self.io.name}'s single {role} space is {space!r}, not a gymnasium space")
            layout = SpaceLayout(space, role)
            if layout.has_objects:
                raise TypeError(f"{self.io.name}'s {role} space {space} has parts with no fixed shape: the engine "
                                "backend needs spaces of Box, Discrete, MultiDiscrete, MultiBinary (and Dict/Tuple "
                                "of them)")
        return [(observation_space, action_space)] * self.io.num_envs

    def attach(self, geometry: Geometry) -> Storage:
        self.storage = storage = Storage(geometry, shared=False)
        layout = storage.obs_layout
        self._flat_obs = layout.is_flat
        self._obs_layout = layout
        self._obs_checks = [(leaf.shape, leaf.dtype) for leaf in layout.leaves]
        self._scatter = Scatter(None, storage.obs_by_slot)
        self._next_step = self.autoreset_mode == AutoresetMode.NEXT_STEP
        self._same_step = self.autoreset_mode == AutoresetMode.SAME_STEP
        self._heads = geometry.value_shape  # (k,): rewards per value head, see _step_outputs
        self._owns_engine = True
        return storage

    def env_metadata(self) -> dict:
        return env_metadata(self.engine)

    # ---- hot path -------------------------------------------------------------------------------
    def send_object_actions(self, actions: dict) -> None:
        pass  # (only actions given as one number per env come here: the engine gets the slots' batch)

    def after_dispatch(self) -> None:
        core, io = self.storage.core, self.io
        ids = core.worker_pop(0)
        if not len(ids):
            return
        if io.whole:
            if len(ids) < io.num_envs or self._waiting:
                self._pending[ids] = True
                self._waiting = True
                if not self._pending.all():
                    return  # the engine steps every env at once: wait for the others' actions
                self._pending[:] = False
                self._waiting = False
            ids = self._all_ids
        else:
            ids = ids.copy()
            if not io.async_mode and io.in_flight:
                self._land_next()  # EnvPool's sync mode: one batch in flight at a time
        slots = core.cursor_slots(ids)
        leaves = [by_slot[slots] for by_slot in self.storage.action_by_slot]
        actions = leaves[0] if self.storage.action_layout.is_flat else self.storage.action_layout.structure(leaves)
        try:
            io.send(ids, actions)
        except BaseException as error:  # noqa: BLE001 - the engine failed as a whole
            self._engine_failed("step", error)
            return
        if io.eager:
            self._land_next()

    def reset(self, env_ids: np.ndarray, seeds: list, options) -> None:
        try:
            landing = self.io.reset(env_ids, seeds, options)
        except BaseException as error:  # noqa: BLE001
            self._engine_failed("reset", error)
            return
        if landing is not None:
            self._land(landing, "reset")

    def before_reset(self, env_ids: np.ndarray, options) -> None:
        self.io.check_reset(env_ids, options)
        pending = np.flatnonzero(self._pending).astype(np.int32)
        if len(pending):
            kept = np.setdiff1d(pending, env_ids)
            if len(kept):
                raise ValueError(
                    f"envs {kept.tolist()} were sent actions that wait for the other envs of {self.io.name} (it steps "
                    f"all its {self.io.num_envs} envs at once), and this reset keeps them: send actions to every env "
                    "first, or reset these envs too")
            self.storage.core.return_envs(pending)  # their actions are dropped: they are about to be reset
            self._pending[:] = False
            self._waiting = False

    def wait(self, min_count: int, deadline: float | None) -> None:
        """Receives batches from the engine until `min_count` envs are published.  `deadline` is checked
        before each call into the engine, never inside one (an engine call runs to its end).

        Returns early, without error, when the envs still missing failed (their errors were raised), or
        when the caller wants some of the envs outstanding (a recv) and the engine cannot return more before
        the learner sends actions to those ready now (an engine that steps every env at once, with
        num_envs not a multiple of batch_size; EnvPool's async mode).  Raises SegvecError when nothing can
        come: the engine waits for actions the learner holds.
        """
        self.raise_errors()
        core, io = self.storage.core, self.io
        while core.count_envs(_READY) < min_count:
            if io.can_recv():
                if deadline is not None and time.monotonic() >= deadline:
                    raise multiprocessing.TimeoutError(
                        f"timed out waiting for {min_count} envs ({core.count_envs(_READY)} ready)")
                self._land_next()
                self.raise_errors()
                continue
            states = self.storage.env_state
            waiting = np.flatnonzero((states == _IN_FLIGHT) | (states == _RESETTING))
            if not len(waiting):
                return  # nothing more can come: the rest failed
            ready = core.count_envs(_READY)
            if ready and min_count < ready + len(waiting):
                return  # a recv of some of the envs: those ready now, the rest needs their actions first
            held = np.flatnonzero(states == int(EnvState.HELD)).tolist()
            if io.whole:
                raise SegvecError(
                    f"{io.name} steps all its {io.num_envs} envs at once, and only {len(waiting)} have their actions: "
                    f"send actions to the envs you hold ({held}) before waiting for the others")
            raise SegvecError(
                f"{io.name} returns batches of exactly {io.batch} envs (its async mode) and has only "
                f"{io.in_flight} in flight: send actions to the envs you hold ({held}) before waiting for more")

    def _land_next(self) -> None:
        try:
            landing = self.io.recv()
        except BaseException as error:  # noqa: BLE001 - the engine failed as a whole
            self._engine_failed("step", error)
            return
        self._land(landing, "step")

    def _land(self, landing: Landing, action: str) -> None:
        """Records a batch the engine returned and publishes its envs; a batch that does not fit fails the
        engine's envs instead (nothing of it is recorded)."""
        storage, core = self.storage, self.storage.core
        try:
            ids = np.ascontiguousarray(landing.env_ids, dtype=np.int32)
            n = len(ids)
            if self.io.whole and landing.reward is not None and n != self.io.num_envs:
                raise EngineOutputError(f"a step of {n} envs, not of its {self.io.num_envs}")
            leaves = self._obs_leaves(landing.obs, landing.rows, n)
            states = None if self.io.whole and landing.reward is not None else storage.env_state[ids]
            if landing.reward is None:
                if not (states == _RESETTING).all():
                    raise EngineOutputError(f"reset results for envs that are not being reset: "
                                            f"{ids[states != _RESETTING].tolist()}")
                slots = core.commit_resets(ids)
                self._scatter.bind(leaves)(slots)
                self._batched.put(ids, landing.info, landing.info_rows, storage.env_has_info)
                core.publish(ids)
                return
            reward, terminated, truncated, heads = self._step_outputs(landing, n)
            if self.io.whole or (states == _IN_FLIGHT).all():  # the usual case: a batch of steps (the core checks)
                self._commit_steps(ids, leaves, reward, terminated, truncated, landing.info, landing.info_rows, heads)
                self._batched.put(ids, landing.info, landing.info_rows, storage.env_has_info)
                core.publish(ids)
                return
            # EnvPool's async mode: first observations of a reset come through recv, with steps of other envs
            info_rows = np.arange(n) if landing.info_rows is None else landing.info_rows
            resets, steps = states == _RESETTING, states == _IN_FLIGHT
            if steps.any():
                self._commit_steps(ids[steps], [np.ascontiguousarray(leaf[steps]) for leaf in leaves], reward[steps],
                                   terminated[steps], truncated[steps], landing.info, info_rows[steps],
                                   None if heads is None else heads[steps])
            if resets.any():
                slots = core.commit_resets(ids[resets])
                self._scatter.bind([np.ascontiguousarray(leaf[resets]) for leaf in leaves])(slots)
            landed = resets | steps
            self._batched.put(ids[landed], landing.info, info_rows[landed], storage.env_has_info)
            core.publish(np.ascontiguousarray(ids[landed]))
        except EngineOutputError as error:
            self._engine_failed(action, error)

    def _obs_leaves(self, obs, rows: np.ndarray | None, n: int) -> list[np.ndarray]:
        """The batch's observations per leaf: C-contiguous ``[n, *leaf_shape]`` arrays of the leaf's dtype."""
        try:
            values = [obs] if self._flat_obs else self._obs_layout.flatten(obs)
        except (KeyError, IndexError, TypeError) as error:
            raise EngineOutputError(f"observations that do not fit the observation space: {error!r}") from None
        out = []
        for value, (shape, dtype) in zip(values, self._obs_checks):
            array = value if type(value) is np.ndarray else np.asarray(value)
            if rows is not None:
                array = array[rows]
            if array.shape != (n,) + shape:
                raise EngineOutputError(f"observations of shape {array.shape} for {n} envs, its space says {shape}")
            if array.dtype != dtype:
                if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                    raise EngineOutputError(f"observations of dtype {array.dtype}, its space says {dtype}")
                array = array.astype(dtype)
            elif not array.flags.c_contiguous:
                array = np.ascontiguousarray(array)
            out.append(array)
        return out

    def _step_outputs(self, landing: Landing, n: int) -> tuple:
        """``(reward, terminated, truncated, heads)`` of a batch of steps; `heads` None, or with value heads
        the ``[n, k]`` rewards per head: the engine's rewards when they are ``[n, k]`` (head 0 becomes the
        scalar reward), else its ``info["rewards"]`` when it has them."""
        reward = np.asarray(landing.reward)
        terminated = np.asarray(landing.terminated)
        truncated = np.asarray(landing.truncated)
        heads = None
        if self._heads:
            if reward.ndim == 2:
                heads, reward = reward, reward[:, 0]
            elif isinstance(landing.info, dict) and HEAD_REWARDS_KEY in landing.info:
                heads = np.asarray(landing.info[HEAD_REWARDS_KEY])
                if landing.info_rows is not None and heads.ndim == 2:
                    heads = heads[landing.info_rows]
            if heads is not None and (heads.shape != (n,) + self._heads or heads.dtype.kind not in "biuf"):
                raise EngineOutputError(f"rewards per value head of shape {heads.shape} and dtype {heads.dtype} "
                                        f"for {n} envs and value_shape={self._heads}")
        for name, array in (("rewards", reward), ("terminations", terminated), ("truncations", truncated)):
            if array.shape != (n,) or array.dtype.kind not in "biuf":
                raise EngineOutputError(f"{name} of shape {array.shape} and dtype {array.dtype} for {n} envs")
        return reward, terminated.astype(bool, copy=False), truncated.astype(bool, copy=False), heads

    def _commit_steps(self, ids: np.ndarray, leaves: list, reward, terminated, truncated, info, info_rows,
                      heads=None) -> None:
        """One `commit_steps` (with the scatter) for a batch of steps, and SAME_STEP final observations."""
        storage, core = self.storage, self.storage.core
        n = len(ids)
        final = self._final_obs(ids, terminated, truncated, info, info_rows) if self._same_step else None
        out = core.outcomes
        out[:n, 0] = reward
        out[:n, 1] = terminated
        out[:n, 2] = truncated
        if self._next_step:
            needs = storage.env_needs_reset if ids is self._all_ids else storage.env_needs_reset[ids]
            if needs.any():  # the engine's reset step: its action was ignored (reward 0, nothing ended)
                out[:n, 0:3][needs] = 0.0
                out[:n, 3] = ~needs
                out[:n, 4] = needs
                out[:n, 5] = (terminated | truncated) & ~needs
            else:
                out[:n, 3:5] = (1.0, 0.0)
                out[:n, 5] = terminated | truncated
        elif self._same_step:
            out[:n, 3] = 1.0
            out[:n, 4] = terminated | truncated
            out[:n, 5] = 0.0
        else:
            out[:n, 3:] = (1.0, 0.0, 0.0)
        core.commit_steps(ids, self._scatter.bind(leaves))
        if heads is not None:
            heads = np.array(heads, np.float32)
            if self._next_step:
                heads[out[:n, 3] == 0.0] = 0.0  # the engine's reset steps: reward 0 in every head
            storage.write_head_rewards(ids, heads)
        if final is not None:
            ended, values = final
            for staging, value in zip(storage.final_obs, values):
                staging[ids[ended]] = value

    def _final_obs(self, ids, terminated, truncated, info, info_rows):
        """SAME_STEP: ``(rows that ended, final observation leaves)`` from the engine's ``final_obs``."""
        ended = np.flatnonzero(terminated | truncated)
        if not len(ended):
            return None
        final = info.get("final_obs") if isinstance(info, dict) else None
        if final is None:
            if (truncated & ~terminated)[ended].any():
                raise EngineOutputError("truncated episodes without a final observation (info['final_obs']): "
                                        "their bootstrap values cannot be known")
            return None
        positions = ended if info_rows is None else info_rows[ended]
        layout = self._obs_layout

        def flatten(value):
            return [value] if self._flat_obs else layout.flatten(value)

        try:
            if isinstance(final, np.ndarray) and final.dtype == object:
                items = [flatten(final[p]) for p in positions.tolist()]
                values = [np.stack([np.asarray(item[j]) for item in items]) for j in range(len(self._obs_checks))]
            else:
                values = [np.asarray(leaf)[positions] for leaf in flatten(final)]
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise EngineOutputError(f"final observations (info['final_obs']) that do not fit the observation space "
                                    f"for envs {ids[ended].tolist()}: {error!r}") from None
        for value, (shape, _) in zip(values, self._obs_checks):
            if value.shape != (len(ended),) + shape:
                raise EngineOutputError(f"final observations of shape {value.shape[1:]}, the space says {shape}")
        return ended, values

    def _engine_failed(self, action: str, error: BaseException) -> None:
        """The engine raised (or returned what does not fit): every env it had in flight fails.  An Exception
        becomes an EnvError naming the engine, raised by the next wait; anything else (Ctrl-C) is re-raised."""
        states = self.storage.env_state
        lost = np.flatnonzero((states == _IN_FLIGHT) | (states == _RESETTING)).astype(np.int32)
        self._pending[:] = False
        self._waiting = False
        self.io.forget()
        if len(lost):
            self.storage.core.fail_envs(lost)
        if not isinstance(error, Exception):
            raise error
        detail = None if not isinstance(error, EngineOutputError) else f"it returned {error}"
        engine_error = make_env_error(error, -1, action, traceback.format_exc(), detail=detail, source=self.io.name)
        engine_error.__cause__ = error
        engine_error.failed_envs = lost.tolist()
        self._errors.append(engine_error)

    def discard_errors(self, env_ids) -> None:
        """Also forgets (with a warning) an engine error whose failed envs are all being reset."""
        reset = {int(e) for e in env_ids}
        kept = []
        for error in self._errors:
            if getattr(error, "env_index", 0) < 0 and set(getattr(error, "failed_envs", ())) <= reset:
                warn(f"dropped by the reset of the envs it failed: {error}", RuntimeWarning)
            else:
                kept.append(error)
        self._errors = kept
        super().discard_errors(env_ids)

    # ---- infos ----------------------------------------------------------------------------------
    def batched_infos(self, env_ids: np.ndarray, size: int, deadline: float | None = None) -> dict:
        return self._batched.take(env_ids, size)

    def infos_for(self, env_ids: np.ndarray, deadline: float | None = None) -> tuple[dict, dict]:
        flags = self.storage.env_has_info
        return {int(e): self._batched.one(int(e)) for e in env_ids[flags[env_ids] != 0]}, {}

    # ---- calls ----------------------------------------------------------------------------------
    def _sub_envs(self) -> list | None:
        envs = getattr(self.engine, "envs", None)  # SyncVectorEnv's envs live in this process
        return list(envs) if isinstance(envs, (list, tuple)) and len(envs) == self.io.num_envs else None

    def call(self, name, args, kwargs, env_ids=None, timeout: float | None = None) -> list:
        if env_ids is None and isinstance(name, str) and callable(getattr(self.engine, "call", None)):
            try:
                return list(self.engine.call(name, *args, **kwargs))
            except EnvError:
                raise
            except Exception as error:  # noqa: BLE001 - reported with the engine's name and traceback
                raise make_env_error(error, -1, f"call({name!r})", traceback.format_exc(), source=self.io.name) \
                    from error
        envs = self._sub_envs()
        if envs is None:
            what = "a function" if callable(name) else repr(name)
            raise AttributeError(f"{self.io.name} cannot call {what} on {'some' if env_ids is not None else 'each'} of "
                                 "its envs from here: call the engine itself (envs.engine)")
        results = []
        for index in range(len(envs)) if env_ids is None else env_ids:
            try:
                results.append(call_env(envs[index], name, args, kwargs))
            except Exception as error:  # noqa: BLE001
                raise make_env_error(error, index, f"call({name!r})", traceback.format_exc()) from error
        return results

    def set_attr(self, name: str, values: list, timeout: float | None = None) -> None:
        if callable(getattr(self.engine, "set_attr", None)):
            try:
                self.engine.set_attr(name, values)
                return
            except Exception as error:  # noqa: BLE001
                raise make_env_error(error, -1, f"set_attr({name!r})", traceback.format_exc(), source=self.io.name) \
                    from error
        envs = self._sub_envs()
        if envs is None:
            raise AttributeError(f"{self.io.name} cannot set {name!r} on each of its envs from here: set it on the "
                                 "engine itself (envs.engine)")
        for index, (env, value) in enumerate(zip(envs, values)):
            try:
                set_env_attr(env, name, value)
            except Exception as error:  # noqa: BLE001
                raise make_env_error(error, index, f"set_attr({name!r})", traceback.format_exc()) from error

    def close(self, terminate: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self.storage is not None:
            self.storage.close()
        if self._owns_engine:
            try:
                self.engine.close()
            except Exception:  # noqa: BLE001 - closing must not raise
                pass
