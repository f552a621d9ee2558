"""`SegmentVecEnv`: a gymnasium VectorEnv whose envs write straight into shared segment memory.

Three faces over one segment block:
  - gymnasium: ``reset/step`` (+ ``*_async/*_wait``, ``call/get_attr/set_attr``), a drop-in VectorEnv;
  - async (EnvPool-style): ``async_reset``, ``recv`` (the first ``batch_size`` ready envs), ``send``;
  - segments: ``take_segments`` -> `SegmentBatch` with bootstrap values, ``flush``, ``stats``.
"""
from __future__ import annotations

import enum
import multiprocessing
import os
import time
import warnings
from typing import Any, Callable, Sequence

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from segvec._core import Geometry, check, ffi, lib
from segvec.backends import MultiprocessingBackend, SerialBackend
from segvec.errors import (
    AlreadyPendingCallError,
    EnvError,
    ClosedEnvironmentError,
    NoAsyncCallError,
    NotEnoughSegmentsError,
    NotReceivedError,
    SegmentBufferExhausted,
    SpaceMismatchError,
)
from segvec.segments import SegmentBatch
from segvec.spaces import spaces_equal

BACKENDS = ("serial", "multiprocessing")


class AsyncState(enum.Enum):
    """What the vector env waits for; one check per method."""

    DEFAULT = "default"
    WAITING_RESET = "reset"
    WAITING_STEP = "step"
    WAITING_CALL = "call"
    ASYNC = "async"  # the async face owns the envs (async_reset/recv/send)


def add_info(infos: dict, env_info: dict, index: int, size: int) -> dict:
    """Adds one env's info to batched infos (gymnasium's layout: arrays plus ``_key`` masks)."""
    for key, value in env_info.items():
        if key == "final_obs":
            array = infos.get("final_obs")
            if array is None:
                array = np.full(size, None, dtype=object)
            array[index] = value
        elif isinstance(value, dict):
            array = add_info(infos.get(key, {}), value, index, size)
        else:
            array = infos.get(key)
            if array is None:
                if type(value) in (int, float, bool) or issubclass(type(value), np.number):
                    array = np.zeros(size, dtype=type(value))
                elif isinstance(value, np.ndarray):
                    array = np.zeros((size, *value.shape), dtype=value.dtype)
                else:
                    array = np.full(size, None, dtype=object)
            array[index] = value
        mask = infos.get(f"_{key}")
        if mask is None:
            mask = np.zeros(size, dtype=np.bool_)
        mask[index] = True
        infos[key], infos[f"_{key}"] = array, mask
    return infos


def _autoreset_mode(mode) -> AutoresetMode:
    """Accepts an AutoresetMode, its value ("NextStep") or its name in any case ("next_step")."""
    if isinstance(mode, AutoresetMode):
        return mode
    if isinstance(mode, str):
        for member in AutoresetMode:
            if mode in (member.value, member.name) or mode.replace("-", "_").upper() == member.name:
                return member
    raise ValueError(f"autoreset_mode must be one of {[m.name for m in AutoresetMode]}, got {mode!r}")


def _as_env_fns(env, num_envs: int, env_kwargs: dict | None) -> list[Callable]:
    if isinstance(env, str):
        env_id, kwargs = env, dict(env_kwargs or {})
        return [_GymMake(env_id, kwargs) for _ in range(num_envs)]
    if callable(env):
        if env_kwargs:
            raise ValueError("env_kwargs only applies to a gymnasium id; pass them inside your callable")
        return [env for _ in range(num_envs)]
    fns = list(env)
    if len(fns) != num_envs:
        raise ValueError(f"got {len(fns)} env callables for num_envs={num_envs}")
    if not all(callable(fn) for fn in fns):
        raise TypeError("env must be a gymnasium id, a callable returning an env, or a list of callables")
    return fns


class _GymMake:
    """A picklable ``gymnasium.make(env_id, **kwargs)``."""

    def __init__(self, env_id: str, kwargs: dict):
        self.env_id, self.kwargs = env_id, kwargs

    def __call__(self):
        return gymnasium.make(self.env_id, **self.kwargs)


def make_vec(env, num_envs: int = 8, **options) -> "SegmentVecEnv":
    """Makes a `SegmentVecEnv` of `num_envs` copies of `env`.

    Args:
        env: a gymnasium id (``"CartPole-v1"``), a zero-argument callable returning an env, or a list of
            such callables (one per env).
        num_envs: number of envs.
        **options: see `SegmentVecEnv` (``env_kwargs`` applies to a gymnasium id).

    Example:
        >>> import segvec
        >>> envs = segvec.make_vec("CartPole-v1", num_envs=4, backend="serial", horizon=8)
        >>> obs, info = envs.reset(seed=0)
        >>> obs.shape
        (4, 4)
        >>> envs.close()
    """
    env_kwargs = options.pop("env_kwargs", None)
    return SegmentVecEnv(_as_env_fns(env, num_envs, env_kwargs), **options)


class SegmentVecEnv(VectorEnv):
    """A vectorized env whose envs write observations and outcomes into shared segment rows.

    Args:
        env_fns: one zero-argument callable per env, each returning a gymnasium.Env.
        backend: ``"serial"`` (envs in this process) or ``"multiprocessing"`` (worker processes).
        num_workers: worker processes (multiprocessing); default ``min(num_envs, cpu count)`` rounded down
            to a divisor of ``num_envs``.  ``num_envs % num_workers`` must be 0.
        batch_size: envs returned by each ``recv()``; default ``num_envs``.
        horizon: steps per segment row.
        num_segments: rows in the buffer, ``>= 2 * num_envs``; default ``4 * num_envs``.
        autoreset_mode: a gymnasium ``AutoresetMode`` (or its string).
        step_fields: extra per-step learner fields ``{name: (shape, dtype)}``, given to ``send``/``step``.
        segment_fields: per-segment fields stored at a row's first step (e.g. recurrent state).
        value_fn: optional ``obs_batch -> values``; gives the value of final observations of truncated
            episodes (SAME_STEP) and of the current observations at ``flush``.
        context: multiprocessing context or start method name (``"fork"``, ``"spawn"``, ``"forkserver"``).
        restart_failed_envs: rebuild (with its factory) and reset an env that raises in ``step`` instead of
            raising EnvError, and replace a worker that dies.  The new episode starts at the same slot of the
            same row: the transition before it becomes truncated, bootstrapped by the value already sent for
            the observation the env failed on.  The learner sees ``truncated=True``,
            ``info["env_restarted"]`` and ``info["env_error"]``; ``stats()["restarts"]`` counts it.  Off by
            default.
        debug: fill fresh rows' rewards with -42.42 so tests can prove none survives into a segment.

    Raises:
        ValueError: invalid sizes, or envs whose spaces differ (`SpaceMismatchError`).
        TypeError: a space that cannot live in shared memory.
        EnvError: an env raised in its constructor.
    """

    metadata: dict
    num_envs: int
    batch_size: int
    horizon: int
    num_segments: int
    num_workers: int
    policy_version: int
    closed: bool

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gymnasium.Env]],
        *,
        backend: str = "multiprocessing",
        num_workers: int | None = None,
        batch_size: int | None = None,
        horizon: int = 128,
        num_segments: int | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        step_fields: dict | None = None,
        segment_fields: dict | None = None,
        value_fn: Callable | None = None,
        context: Any = None,
        restart_failed_envs: bool = False,
        debug: bool = False,
    ):
        self.closed = True  # until construction succeeds: close() is safe at any point
        self._backend = None
        env_fns = list(env_fns)
        num_envs = len(env_fns)
        if num_envs < 1:
            raise ValueError("need at least one env")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
        if backend == "serial":
            if num_workers not in (None, 1):
                raise ValueError("the serial backend runs every env in this process: leave num_workers unset")
            num_workers = 1
        elif num_workers is None:
            num_workers = min(num_envs, os.cpu_count() or 1)
            while num_envs % num_workers:
                num_workers -= 1
        if not isinstance(num_workers, (int, np.integer)) or num_workers < 1 or num_envs % num_workers:
            raise ValueError(
                f"num_envs ({num_envs}) must be a multiple of num_workers ({num_workers}); "
                f"choose num_workers among {[w for w in range(1, num_envs + 1) if num_envs % w == 0]}")
        batch_size = num_envs if batch_size is None else batch_size
        if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= num_envs:
            raise ValueError(f"batch_size must be an int in [1, num_envs={num_envs}], got {batch_size!r}")
        num_segments = 4 * num_envs if num_segments is None else num_segments
        if not isinstance(num_segments, (int, np.integer)) or num_segments < 2 * num_envs:
            raise ValueError(
                f"num_segments must be >= 2 * num_envs = {2 * num_envs} (each env fills one row while its "
                f"previous one waits for its bootstrap value), got {num_segments!r}")
        self.autoreset_mode = _autoreset_mode(autoreset_mode)
        self.num_envs, self.batch_size, self.horizon = num_envs, int(batch_size), int(horizon)
        self.num_segments, self.num_workers = int(num_segments), int(num_workers)
        self.backend_name = backend
        self.value_fn = value_fn
        self.policy_version = 0

        if backend == "serial":
            self._backend = SerialBackend(env_fns, self.autoreset_mode, restart_failed_envs)
        else:
            self._backend = MultiprocessingBackend(env_fns, self.autoreset_mode, self.num_workers, context,
                                                   restart_failed_envs)
        try:
            env_spaces = self._backend.create_envs()
            self.single_observation_space, self.single_action_space = env_spaces[0]
            for index, (obs_space, act_space) in enumerate(env_spaces):
                if not spaces_equal(obs_space, self.single_observation_space):
                    raise SpaceMismatchError(
                        f"env {index} has observation space {obs_space}, env 0 has "
                        f"{self.single_observation_space}: all envs of one SegmentVecEnv must share spaces")
                if not spaces_equal(act_space, self.single_action_space):
                    raise SpaceMismatchError(
                        f"env {index} has action space {act_space}, env 0 has {self.single_action_space}: "
                        "all envs of one SegmentVecEnv must share spaces")
            geometry = Geometry.make(num_envs, self.num_workers, self.num_segments, self.horizon,
                                     self.single_observation_space, self.single_action_space,
                                     step_fields, segment_fields, poison=debug)
            self._storage = self._backend.attach(geometry)
            self.metadata = dict(self._backend_metadata())
        except BaseException:
            self._backend.close(terminate=True)
            raise
        self.metadata["autoreset_mode"] = self.autoreset_mode
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.render_mode = self.metadata.get("render_mode")
        storage = self._storage
        self._obs_layout, self._action_layout = storage.obs_layout, storage.action_layout
        self._state = AsyncState.DEFAULT
        self._pending_reset_ids: np.ndarray | None = None
        self._all_ids = np.arange(num_envs, dtype=np.int32)
        self._pop_buffer = np.zeros(num_envs, np.int32)
        self._truncation_obs: dict[tuple, list] = {}  # (row, env, start_step) -> [(t, leaves)]
        self._truncation_noted = np.zeros(num_envs, bool)  # landed step's truncation noted before recv
        self._reset_requested = np.zeros(num_envs, bool)   # reset at least once (for error messages)
        self._episode_cursor = ffi.new("int64_t *")
        self._step_field_names = frozenset(storage.step_fields)
        self._obs_item_bytes = [leaf.nbytes for leaf in self._obs_layout.leaves]
        # Buffers of the hot path and their C views, made once.
        self._count_out = ffi.new("int32_t *")
        self._pop_buffer_ptr = ffi.from_buffer("int32_t[]", self._pop_buffer)
        self._slots = np.empty(num_envs, np.int64)
        self._slots_ptr = ffi.from_buffer("int64_t[]", self._slots)
        self._row_start = np.empty(num_envs, np.uint8)
        self._row_start_ptr = ffi.from_buffer("uint8_t[]", self._row_start)
        self._stats_out = ffi.new("segvec_stats_t *")
        self._flat_action = self._action_layout.is_flat
        self._action_bounds_cache = self._action_bounds()
        self._segment_field_names = frozenset(storage.segment_fields)
        self.closed = False

    def _backend_metadata(self) -> dict:
        try:
            metadata = self._backend.call("metadata", (), {})[0] if self.backend_name != "serial" \
                else self._backend.envs[0].metadata
        except Exception:  # noqa: BLE001 - metadata is a courtesy
            metadata = {}
        metadata = dict(metadata or {})
        if self.backend_name == "serial":
            metadata.setdefault("render_mode", getattr(self._backend.envs[0], "render_mode", None))
        else:
            metadata.setdefault("render_mode", self._backend.call("render_mode", (), {})[0])
        return metadata

    # ---- helpers --------------------------------------------------------------------------------
    def _assert_open(self) -> None:
        if self.closed:
            raise ClosedEnvironmentError(f"Trying to operate on `{type(self).__name__}`, after a call to `close()`.")

    @property
    def _outstanding(self) -> int:
        """Envs reset or sent and not received yet: read from the core's env states."""
        return self._storage.count_envs(lib.SEGVEC_MASK_OUTSTANDING)

    def _pop(self, count: int, deadline: float | None) -> np.ndarray:
        """Waits for `count` published envs and receives them (HELD)."""
        self._backend.wait(count, deadline)
        n = self._count_out
        check(lib.segvec_pop_ready(self._storage.core, count, self._pop_buffer_ptr, n))
        return self._pop_buffer[:n[0]].copy()

    def _receive_stragglers(self, wait: bool) -> None:
        """Receives envs still outstanding from a call the user gave up on (a timeout, an env error, a
        Ctrl-C) and drops their results, so that the next call starts from envs the learner holds.

        With `wait`, waits until none is outstanding; an env error met meanwhile is logged as a warning
        (that env is FAILED and the caller resets it), not raised.  Without, receives those published now.
        """
        while True:
            outstanding = self._outstanding
            if not outstanding:
                return
            if wait:
                try:
                    self._backend.wait(outstanding, None)
                except EnvError as error:
                    warnings.warn(f"while waiting for envs to finish before a reset: {error}", RuntimeWarning,
                                  stacklevel=3)
                    continue
            ids = self._pop(outstanding, None) if wait else self._pop_published()
            if self.autoreset_mode == AutoresetMode.SAME_STEP:
                self._note_truncations(ids)
            self._build_infos(ids, len(ids))
            if not wait:
                return

    def _pop_published(self) -> np.ndarray:
        """Receives every env published now, without waiting."""
        n = self._count_out
        check(lib.segvec_pop_ready(self._storage.core, self.num_envs, self._pop_buffer_ptr, n))
        return self._pop_buffer[:n[0]].copy()

    def _current_obs(self, env_ids: np.ndarray):
        """Each env's current observation (a copy), gathered from its cursor slot by the C core."""
        storage = self._storage
        count = len(env_ids)
        ids = ffi.from_buffer("int32_t[]", env_ids)
        leaves = []
        for by_slot, item_bytes in zip(storage.obs_by_slot, self._obs_item_bytes):
            out = np.empty((count,) + by_slot.shape[1:], by_slot.dtype)
            check(lib.segvec_gather_current(storage.core, count, ids, ffi.from_buffer(by_slot), item_bytes,
                                            ffi.from_buffer(out, require_writable=True)))
            leaves.append(out)
        return self._obs_layout.structure(leaves)

    def _build_infos(self, env_ids: np.ndarray, size: int, deadline: float | None = None) -> dict:
        """Infos of `env_ids` (positions 0..len-1 of a batch of `size`), gymnasium layout."""
        infos: dict = {}
        storage = self._storage
        flags = storage.env_has_info if env_ids is self._all_ids else storage.env_has_info[env_ids]
        if not flags.any():
            return infos
        env_infos, final_infos = self._backend.infos_for(env_ids, deadline)
        storage.env_has_info[env_ids] = 0
        positions = {int(e): i for i, e in enumerate(env_ids)}
        for env_index, final_info in final_infos.items():
            final_obs = self._obs_layout.structure([leaf[env_index].copy() for leaf in storage.final_obs])
            add_info(infos, {"final_obs": final_obs, "final_info": final_info}, positions[env_index], size)
        for env_index, info in env_infos.items():
            add_info(infos, info, positions[env_index], size)
        return infos

    def _note_truncations(self, env_ids: np.ndarray) -> None:
        """SAME_STEP: keep final observations of truncations (value_fn evaluates them at once).

        Called once per landed step: when the learner receives the env, or earlier when `flush` or a reset
        closes its row before that (the row must not complete without its truncation value).
        """
        storage = self._storage
        noted = self._truncation_noted[env_ids]
        self._truncation_noted[env_ids] = False
        truncated = storage.env_last_truncated[env_ids] & ~storage.env_last_terminated[env_ids] & ~noted
        truncated &= storage.env_last_slot[env_ids] >= 0  # restarted envs carry their truncation value already
        if not truncated.any():
            return
        ids = env_ids[truncated]
        slots = storage.env_last_slot[ids]
        final = [leaf[ids].copy() for leaf in storage.final_obs]
        if self.value_fn is not None:
            values = np.asarray(self.value_fn(self._obs_layout.structure(final)), np.float32).reshape(-1)
            storage.truncation_value.reshape(-1)[slots] = values
            return
        rows, steps = slots // self.horizon, slots % self.horizon
        for i, (row, t) in enumerate(zip(rows.tolist(), steps.tolist())):
            key = (row, int(storage.row_env_id[row]), int(storage.row_start_step[row]))
            self._truncation_obs.setdefault(key, []).append((t, [leaf[i] for leaf in final]))
        if len(self._truncation_obs) > 2 * self.num_segments:  # forget rows that were recycled since
            live = {(r, int(storage.row_env_id[r]), int(storage.row_start_step[r])) for r in range(self.num_segments)}
            for key in [k for k in self._truncation_obs if k not in live]:
                del self._truncation_obs[key]

    def _results(self, env_ids: np.ndarray, size: int, deadline: float | None = None):
        storage = self._storage
        obs = self._current_obs(env_ids)
        select = slice(None) if env_ids is self._all_ids else env_ids  # every env: plain copies
        rewards = storage.env_last_reward[select].astype(np.float64)
        terminated = storage.env_last_terminated[select].copy()
        truncated = storage.env_last_truncated[select].copy()
        if self.autoreset_mode == AutoresetMode.SAME_STEP:
            self._note_truncations(env_ids)
        infos = self._build_infos(env_ids, size, deadline)
        return obs, rewards, terminated, truncated, infos

    def _check_actions(self, actions, count: int) -> list[np.ndarray]:
        leaves = [actions] if self._flat_action else self._action_layout.flatten(actions)
        out = []
        for leaf, space_value in zip(self._action_layout.leaves, leaves):
            array = np.asarray(space_value)
            expected = (count,) + leaf.shape
            if array.shape != expected:
                raise ValueError(f"actions{'/'.join(map(str, leaf.path)) and ' at ' + '/'.join(map(str, leaf.path))}"
                                 f" have shape {array.shape}, expected {expected} for {count} envs")
            if array.dtype != leaf.dtype and not np.can_cast(array.dtype, leaf.dtype, casting="same_kind"):
                if not (np.issubdtype(leaf.dtype, np.integer) and np.issubdtype(array.dtype, np.integer)):
                    raise TypeError(f"actions have dtype {array.dtype}, the action space needs {leaf.dtype}")
            out.append(array)
        self._check_action_bounds(out)
        return out

    def _action_bounds(self) -> list:
        """Per action leaf: ``(space, low, high)`` for discrete spaces, None for Box (envs clip)."""
        bounds = []
        for leaf in self._action_layout.leaves:
            space = self._action_layout.space
            for key in leaf.path:
                space = space[key]
            if isinstance(space, spaces.Discrete):
                bounds.append((space, space.start, space.start + space.n - 1))
            elif isinstance(space, spaces.MultiDiscrete):
                bounds.append((space, space.start, space.start + space.nvec - 1))
            elif isinstance(space, spaces.MultiBinary):
                bounds.append((space, 0, 1))
            else:
                bounds.append(None)
        return bounds

    def _check_action_bounds(self, leaves: list[np.ndarray]) -> None:
        for bound, array in zip(self._action_bounds_cache, leaves):
            if bound is None or not array.size:
                continue
            space, low, high = bound
            if np.isscalar(low):
                values = array if array.dtype == np.int64 and array.flags.c_contiguous else \
                    np.ascontiguousarray(array, dtype=np.int64)
                bad = lib.segvec_first_out_of_range(ffi.from_buffer("int64_t[]", values), values.size,
                                                    int(low), int(high)) >= 0
            else:
                bad = np.any(array < low) or np.any(array > high)
            if bad:
                raise ValueError(f"actions out of the action space {space}: got values in "
                                 f"[{array.min()}, {array.max()}]")

    def _deadline(self, timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    # ---- sending --------------------------------------------------------------------------------
    def _send(self, actions, env_ids: np.ndarray, value=None, logprob=None, fields: dict | None = None) -> None:
        """Checks everything, then writes the send into the core and dispatches it; raises before the core
        changes anything (and rolls the envs back to HELD if writing fails anyway)."""
        storage = self._storage
        count = len(env_ids)
        leaves = self._check_actions(actions, count)
        fields = self._check_fields(fields or {}, count)
        values = None if value is None else self._per_env(value, count, "value")
        logprobs = None if logprob is None else self._per_env(logprob, count, "logprob")
        ids_ptr = ffi.from_buffer("int32_t[]", env_ids)
        slots, row_start = self._slots[:count], self._row_start[:count]
        status = lib.segvec_prepare_send(
            storage.core, count, ids_ptr,
            ffi.NULL if values is None else ffi.from_buffer("float[]", values),
            ffi.NULL if logprobs is None else ffi.from_buffer("float[]", logprobs),
            int(self.policy_version), self._slots_ptr, self._row_start_ptr)
        if status == lib.SEGVEC_ERR_NOT_HELD:
            self._explain_not_held(env_ids)
        if status == lib.SEGVEC_ERR_NO_FREE_ROW:
            raise SegmentBufferExhausted(
                f"no free segment row for the envs that start a new row with this step: every row is filling, "
                f"awaiting its bootstrap or taken by the learner ({self.stats()['segments_taken']} taken so far). "
                "Release the batches you hold (batch.release(), or take them with `with`) and send again, or "
                "raise num_segments. Nothing was sent.")
        check(status, "send")
        try:
            for by_slot, array in zip(storage.action_by_slot, leaves):
                by_slot[slots] = array
            for name, array in fields.items():
                if name in self._step_field_names:
                    storage.step_fields_by_slot[name][slots] = array
                else:
                    starts = row_start.astype(bool)
                    if starts.any():
                        storage.segment_fields[name][storage.env_row[env_ids[starts]]] = array[starts]
        except BaseException:
            check(lib.segvec_cancel_send(storage.core, count, ids_ptr), "send")
            raise
        check(lib.segvec_dispatch(storage.core, count, ids_ptr), "send")
        self._backend.after_dispatch()

    def _check_fields(self, fields: dict, count: int) -> dict[str, np.ndarray]:
        """Learner fields as arrays of shape ``(count, *shape)`` in their declared dtypes.

        Raises:
            TypeError: a field that was not declared, or of a dtype that does not convert.
            ValueError: a field of the wrong shape.
        """
        storage = self._storage
        unknown = set(fields) - self._step_field_names - self._segment_field_names
        if unknown:
            raise TypeError(f"unknown learner fields {sorted(unknown)}; declare them in step_fields/segment_fields")
        out = {}
        for name, value in fields.items():
            target = storage.step_fields[name] if name in self._step_field_names else storage.segment_fields[name]
            expected = (count,) + target.shape[2 if name in self._step_field_names else 1:]
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            try:
                array = np.asarray(value).astype(target.dtype, copy=False, casting="same_kind")
            except (TypeError, ValueError) as error:
                raise TypeError(f"field {name!r} has dtype {np.asarray(value).dtype}, declared {target.dtype}: "
                                f"{error}") from error
            if array.shape != expected:
                raise ValueError(f"field {name!r} has shape {array.shape}, expected {expected} for {count} envs")
            out[name] = array
        return out

    def _explain_not_held(self, env_ids: np.ndarray) -> None:
        """Raises NotReceivedError saying why some of `env_ids` cannot be sent to."""
        states = self._storage.env_state[env_ids]
        never = env_ids[(states == lib.SEGVEC_ENV_NEW) & ~self._reset_requested[env_ids]]
        if len(never):
            raise NotReceivedError(f"envs {never.tolist()} were never reset: call reset() (or async_reset() and "
                                   "recv()) before step() or send()")
        failed = env_ids[states == lib.SEGVEC_ENV_FAILED]
        if len(failed):
            raise NotReceivedError(
                f"envs {failed.tolist()} failed (an EnvError was raised for each): reset them before sending "
                "actions, e.g. reset(options={'reset_mask': mask}) or async_reset()")
        unique, counts = np.unique(env_ids, return_counts=True)
        twice = unique[counts > 1]
        if len(twice):
            raise NotReceivedError(f"env(s) {twice.tolist()}: each appears twice in one send")
        raise NotReceivedError(f"envs {env_ids[states != lib.SEGVEC_ENV_HELD].tolist()} were not received since "
                               "their last send (recv() returns the envs you may send to)")

    @staticmethod
    def _per_env(values, count: int, name: str) -> np.ndarray:
        if hasattr(values, "detach"):
            values = values.detach().cpu().numpy()
        array = np.ascontiguousarray(np.asarray(values, np.float32).reshape(-1))
        if len(array) != count:
            raise ValueError(f"{name} must have one entry per env ({count}), got shape {np.shape(values)}")
        return array

    # ---- gymnasium face -------------------------------------------------------------------------
    def reset(self, *, seed=None, options: dict | None = None):
        """Resets every env (or those of ``options["reset_mask"]``) and returns ``(obs, infos)``.

        Rows in progress of the envs reset are flushed first (closed as partial segments).  An int seed
        gives env i the seed ``seed + i``.  See gymnasium's ``VectorEnv.reset``.
        """
        self.reset_async(seed=seed, options=options)
        return self.reset_wait()

    def reset_async(self, seed=None, options: dict | None = None) -> None:
        """Starts resetting (see `reset`).

        Envs still stepping since a call that raised or timed out (or, on the async face, since their last
        `send`) are waited for first and their results dropped; an env error met meanwhile is a warning.

        Raises:
            AlreadyPendingCallError: a `reset_async`, `step_async` or `call_async` waits for its `*_wait`.
        """
        self._assert_open()
        if self._state not in (AsyncState.DEFAULT, AsyncState.ASYNC):
            raise AlreadyPendingCallError(
                f"Calling `reset_async` while waiting for a pending call to `{self._state.value}` to complete",
                str(self._state.value))
        seeds = self._seeds(seed)
        options = dict(options) if options else None
        env_ids = self._all_ids
        if options is not None and "reset_mask" in options:
            mask = options.pop("reset_mask")
            if not isinstance(mask, np.ndarray):
                raise TypeError(f"`options['reset_mask']` must be a numpy array, got {type(mask)}")
            if mask.shape != (self.num_envs,):
                raise ValueError(f"`options['reset_mask']` must have shape `({self.num_envs},)`, got {mask.shape}")
            if mask.dtype != np.bool_:
                raise TypeError(f"`options['reset_mask']` must have `dtype=np.bool_`, got {mask.dtype}")
            if not mask.any():
                raise ValueError("`options['reset_mask']` must contain at least one True value")
            env_ids = self._all_ids[mask]
            seeds = [seeds[i] for i in env_ids]
        self._receive_stragglers(wait=True)
        self._flush_envs(env_ids)
        check(lib.segvec_begin_resets(self._storage.core, len(env_ids), ffi.from_buffer("int32_t[]", env_ids)),
              "reset")
        self._state = AsyncState.WAITING_RESET
        self._pending_reset_ids = env_ids
        self._reset_requested[env_ids] = True
        self._backend.reset(env_ids, seeds, options)

    def _seeds(self, seed) -> list:
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, (int, np.integer)):
            return [int(seed) + i for i in range(self.num_envs)]
        seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"If seeds are passed as a list the length must match num_envs={self.num_envs} "
                             f"but got length={len(seeds)}.")
        return seeds

    def reset_wait(self, timeout: float | None = None):
        """Waits for `reset_async` and returns ``(obs, infos)`` for every env.

        Raises:
            NoAsyncCallError: no reset is pending.  multiprocessing.TimeoutError: `timeout` seconds passed.
        """
        self._assert_open()
        if self._state != AsyncState.WAITING_RESET:
            raise NoAsyncCallError("Calling `reset_wait` without any prior call to `reset_async`.",
                                   AsyncState.WAITING_RESET.value)
        env_ids = self._pending_reset_ids
        deadline = self._deadline(timeout)
        try:  # whatever happens, the reset is over: envs still resetting are received by the next call
            self._pop(len(env_ids), deadline)
        finally:
            self._state = AsyncState.DEFAULT
        obs = self._current_obs(self._all_ids)
        infos: dict = {}
        if self._storage.env_has_info[env_ids].any():
            batch_infos = self._build_infos(env_ids, len(env_ids), deadline)
            infos = _spread_infos(batch_infos, env_ids, self.num_envs)
        return obs, infos

    def step(self, actions, **learner_fields):
        """Steps every env; returns ``(obs, rewards, terminations, truncations, infos)`` in env order.

        Accepts the learner fields of `send` (``value=``, ``logprob=``, step/segment fields) so that the
        gymnasium face fills segments with them.  Follows ``autoreset_mode`` like gymnasium's vector envs.
        """
        self.step_async(actions, **learner_fields)
        return self.step_wait()

    def step_async(self, actions, **learner_fields) -> None:
        """Sends `actions` for every env.

        Raises:
            AlreadyPendingCallError: a call is pending, envs sent on the async face are in flight, or envs
                still step since a call that raised or timed out (`reset()` waits for those).
            NotReceivedError: an env was never reset, or failed (reset it first).
            SegmentBufferExhausted: the learner holds every row the envs could move to; nothing was sent.
        """
        self._assert_open()
        if self._state == AsyncState.DEFAULT:
            self._receive_stragglers(wait=False)
        if self._state not in (AsyncState.DEFAULT, AsyncState.ASYNC) or self._outstanding:
            raise AlreadyPendingCallError(
                f"Calling `step_async` while waiting for a pending call to `{self._state.value}` to complete "
                f"({self._outstanding} envs in flight).", str(self._state.value))
        value = learner_fields.pop("value", None)
        logprob = learner_fields.pop("logprob", None)
        self._send(actions, self._all_ids, value, logprob, learner_fields)
        self._state = AsyncState.WAITING_STEP

    def step_wait(self, timeout: float | None = None):
        """Waits for `step_async` and returns the results in env order (see `step`)."""
        self._assert_open()
        if self._state != AsyncState.WAITING_STEP:
            raise NoAsyncCallError("Calling `step_wait` without any prior call to `step_async`.",
                                   AsyncState.WAITING_STEP.value)
        deadline = self._deadline(timeout)
        try:
            self._pop(self.num_envs, deadline)
        except multiprocessing.TimeoutError:
            raise  # still pending: step_wait may be called again
        except BaseException:
            self._state = AsyncState.DEFAULT  # the step is over; envs still stepping are received later
            raise
        self._state = AsyncState.DEFAULT
        return self._results(self._all_ids, self.num_envs, deadline)

    def call(self, name: str, *args, **kwargs) -> tuple:
        """Calls `name` (method or attribute) on every env; returns the results in env order."""
        self.call_async(name, *args, **kwargs)
        return self.call_wait()

    def call_async(self, name: str, *args, **kwargs) -> None:
        self._assert_open()
        if self._state not in (AsyncState.DEFAULT, AsyncState.ASYNC):
            raise AlreadyPendingCallError(
                f"Calling `call_async` while waiting for a pending call to `{self._state.value}` to complete.",
                str(self._state.value))
        self._call_request = (name, args, kwargs, self._state)
        self._state = AsyncState.WAITING_CALL

    def call_wait(self, timeout: float | None = None) -> tuple:
        self._assert_open()
        if self._state != AsyncState.WAITING_CALL:
            raise NoAsyncCallError("Calling `call_wait` without any prior call to `call_async`.",
                                   AsyncState.WAITING_CALL.value)
        name, args, kwargs, previous = self._call_request
        self._state = previous
        if self.backend_name == "serial":
            return tuple(self._backend.call(name, args, kwargs))
        return tuple(self._backend.call(name, args, kwargs, timeout=timeout))

    def call_at(self, env_ids, name, *args, **kwargs) -> tuple:
        """Like `call`, on the envs `env_ids` only; returns their results in the order of `env_ids`.

        `name` is a method or attribute name (looked up through wrappers, like `call`), or a picklable
        function, called as ``name(env, *args, **kwargs)`` where the env lives.

        Raises:
            ValueError: an env id outside ``[0, num_envs)``.
            AlreadyPendingCallError: a reset, step or call is pending.
        """
        self._assert_open()
        ids = [int(e) for e in np.asarray(env_ids, dtype=np.int64).reshape(-1)]
        if any(e < 0 or e >= self.num_envs for e in ids):
            raise ValueError(f"env_ids must be in [0, {self.num_envs}), got {ids}")
        if self._state not in (AsyncState.DEFAULT, AsyncState.ASYNC):
            raise AlreadyPendingCallError(
                f"Calling `call_at` while waiting for a pending call to `{self._state.value}` to complete.",
                str(self._state.value))
        if not ids:
            return ()
        return tuple(self._backend.call(name, args, kwargs, env_ids=ids))

    def get_attr(self, name: str) -> tuple:
        """Returns attribute `name` of every env."""
        return self.call(name)

    def set_attr(self, name: str, values) -> None:
        """Sets attribute `name` on every env (one value for all, or a list/tuple of one per env)."""
        self._assert_open()
        if not isinstance(values, (list, tuple)):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError("Values must be a list or tuple with length equal to the number of environments. "
                             f"Got `{len(values)}` values for {self.num_envs} environments.")
        if self._state not in (AsyncState.DEFAULT, AsyncState.ASYNC):
            raise AlreadyPendingCallError(
                f"Calling `set_attr` while waiting for a pending call to `{self._state.value}` to complete.",
                str(self._state.value))
        self._backend.set_attr(name, list(values))

    def render(self):
        """Returns the frames of every env (``call("render")``)."""
        return self.call("render")

    # ---- async face -----------------------------------------------------------------------------
    def async_reset(self, seed=None, options: dict | None = None) -> None:
        """Resets every env without waiting; their first observations come from `recv`.

        Raises:
            ValueError: the autoreset mode is DISABLED (the async face has no way to reset one env).
        """
        self._assert_open()
        if self.autoreset_mode == AutoresetMode.DISABLED:
            raise ValueError("the async face (async_reset/recv/send) needs autoreset: make the envs with "
                             "autoreset_mode NEXT_STEP or SAME_STEP, or use reset()/step() with DISABLED")
        self.reset_async(seed=seed, options=options)
        self._state = AsyncState.ASYNC

    def recv(self, timeout: float | None = None):
        """Returns ``(obs, rewards, terminations, truncations, infos)`` of the first ready envs.

        At most ``batch_size`` envs (fewer only when fewer are outstanding), in any order;
        ``infos["env_id"]`` says which envs the rows are.  Rewards, terminations and truncations are the
        outcome of each env's previous action (0/False right after a reset).

        Raises:
            NoAsyncCallError: nothing is outstanding (call `async_reset` or `send` first).
            EnvError: an env raised (that env is FAILED: reset it; the others go on).
            WorkerDied: a worker died (without restart_failed_envs).
        """
        self._assert_open()
        if self._state == AsyncState.WAITING_RESET:
            self._state = AsyncState.ASYNC
        if self._state not in (AsyncState.ASYNC, AsyncState.DEFAULT):
            raise AlreadyPendingCallError(f"Calling `recv` while a `{self._state.value}` call is pending.",
                                          str(self._state.value))
        if self._outstanding <= 0:
            raise NoAsyncCallError("Calling `recv` with no env outstanding: call `async_reset` or `send` first.",
                                   AsyncState.ASYNC.value)
        self._state = AsyncState.ASYNC
        deadline = self._deadline(timeout)
        env_ids = self._pop(min(self.batch_size, self._outstanding), deadline)
        obs, rewards, terminated, truncated, infos = self._results(env_ids, len(env_ids), deadline)
        infos["env_id"] = env_ids
        return obs, rewards, terminated, truncated, infos

    def send(self, actions, env_ids, value=None, logprob=None, **fields) -> None:
        """Sends actions for `env_ids` (received by `recv`), with the learner's per-step data.

        Args:
            actions: ``[len(env_ids), *action_shape]`` (structured spaces: their batched structure).
            env_ids: the envs, e.g. ``infos["env_id"]`` of the last `recv`.
            value, logprob: ``[len(env_ids)]`` stored at each env's current step (NaN when omitted).
            **fields: step and segment fields declared at construction.

        Raises:
            NotReceivedError: an env was not received since its last send, is named twice, or failed
                (reset it first).
            ValueError/TypeError: actions or fields of the wrong shape, dtype or out of the action space.
            SegmentBufferExhausted: the learner holds every row the envs could move to (release batches and
                send again); nothing was sent.
        """
        self._assert_open()
        if self._state != AsyncState.ASYNC and self._state != AsyncState.DEFAULT:
            raise AlreadyPendingCallError(f"Calling `send` while a `{self._state.value}` call is pending.",
                                          str(self._state.value))
        ids = np.ascontiguousarray(np.asarray(env_ids).reshape(-1), dtype=np.int32)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_envs):
            raise ValueError(f"env_ids must be in [0, {self.num_envs}), got {ids}")
        self._state = AsyncState.ASYNC
        self._send(actions, ids, value, logprob, fields)

    # ---- segments -------------------------------------------------------------------------------
    @property
    def segments_ready(self) -> int:
        """Complete rows not yet taken."""
        return self._storage.stats()["complete_rows"]

    def take_segments(self, n: int | None = None) -> SegmentBatch:
        """Takes `n` complete rows (the oldest), or all complete rows when `n` is None; never blocks.

        Raises:
            ValueError (NotEnoughSegmentsError): `n` is more than `segments_ready`.
        """
        self._assert_open()
        storage = self._storage
        ready = self.segments_ready
        all_rows = n is None
        if all_rows:
            n = ready
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if n > ready:
            raise NotEnoughSegmentsError(f"take_segments({n}) but only {ready} segments are ready "
                                         f"(the buffer has {self.num_segments} rows)")
        while True:
            if all_rows:
                n = self.segments_ready
            rows = np.empty(n, np.int32)
            status = lib.segvec_take(storage.core, n, ffi.from_buffer("int32_t[]", rows, require_writable=True))
            if not (all_rows and status == lib.SEGVEC_ERR_NOT_ENOUGH):
                break  # (a worker may recycle a complete row between the count and the take: count again)
        check(status, "take_segments")
        rows.sort()
        return SegmentBatch(storage, rows, self.autoreset_mode, self._final_obs_of(rows), self._release)

    def _final_obs_of(self, rows: np.ndarray) -> tuple:
        storage = self._storage
        found_obs, positions = [], []
        if self._truncation_obs:
            for i, row in enumerate(rows.tolist()):
                key = (row, int(storage.row_env_id[row]), int(storage.row_start_step[row]))
                for t, leaves in self._truncation_obs.pop(key, ()):
                    if t < storage.row_length[row]:
                        found_obs.append(leaves)
                        positions.append((i, t))
        leaves = [np.stack([entry[j] for entry in found_obs]) if found_obs else
                  np.zeros((0,) + leaf.shape, leaf.dtype) for j, leaf in enumerate(self._obs_layout.leaves)]
        return self._obs_layout.structure(leaves), np.asarray(positions, np.int64).reshape(-1, 2)

    def _release(self, rows: np.ndarray) -> None:
        if self.closed:
            return
        check(lib.segvec_release(self._storage.core, len(rows), ffi.from_buffer("int32_t[]", rows)), "release")

    def flush(self, timeout: float | None = None) -> None:
        """Closes every row in progress as a partial segment, so all stepped data can be taken.

        Waits for envs whose actions are in flight to land first.  The tail bootstrap of a flushed row is
        ``value_fn(current observation)`` when a value_fn is set, else NaN.
        """
        self._assert_open()
        self._wait_landed(self._deadline(timeout))
        self._note_landed_truncations()
        self._flush_envs(self._all_ids)

    def _note_landed_truncations(self) -> None:
        """SAME_STEP: notes truncations of envs that landed but were not received yet (see flush)."""
        if self.autoreset_mode != AutoresetMode.SAME_STEP:
            return
        landed = self._all_ids[(self._storage.env_state == lib.SEGVEC_ENV_READY) & ~self._truncation_noted]
        if len(landed):
            self._note_truncations(landed)
            self._truncation_noted[landed] = True

    def _wait_landed(self, deadline) -> None:
        if self._outstanding:
            self._backend.wait(self._outstanding, deadline)

    def _flush_envs(self, env_ids: np.ndarray) -> None:
        """Closes the rows in progress of `env_ids` (see segvec_flush_envs); all or nothing.

        Raises:
            SegmentBufferExhausted: the new rows cannot be had (the learner holds the rest).
        """
        storage = self._storage
        tails = None
        if self.value_fn is not None:
            tails = np.asarray(self.value_fn(self._current_obs(env_ids)), np.float32).reshape(-1)
        count = len(env_ids)
        copy_from = np.empty(count, np.int64)
        copy_to = np.empty(count, np.int64)
        status = lib.segvec_flush_envs(
            storage.core, count, ffi.from_buffer("int32_t[]", env_ids),
            ffi.NULL if tails is None else ffi.from_buffer("float[]", tails),
            ffi.from_buffer("int64_t[]", copy_from, require_writable=True),
            ffi.from_buffer("int64_t[]", copy_to, require_writable=True))
        if status == lib.SEGVEC_ERR_NO_FREE_ROW:
            raise SegmentBufferExhausted(
                f"no free segment row to start after the rows being closed: every row is filling, awaiting its "
                f"bootstrap or taken by the learner ({self.stats()['segments_taken']} taken so far). Release the "
                "batches you hold (batch.release()) and try again, or raise num_segments. Nothing was flushed.")
        check(status, "flush")
        moved = copy_from >= 0
        if moved.any():
            for by_slot in storage.obs_by_slot:
                by_slot[copy_to[moved]] = by_slot[copy_from[moved]]

    def stats(self) -> dict:
        """Counters: steps, episodes, segments_completed, segments_recycled, segments_taken, nan_rewards,..."""
        self._assert_open()
        return self._storage.stats()

    def episodes(self, max_n: int = 4096) -> dict:
        """Episodes finished since the last call: ``{"env_id", "return", "length"}`` arrays, and ``lost``."""
        self._assert_open()
        env_ids = np.empty(max_n, np.int32)
        returns = np.empty(max_n, np.float64)
        lengths = np.empty(max_n, np.int64)
        n = ffi.new("int32_t *")
        lost = ffi.new("int64_t *")
        check(lib.segvec_read_episodes(
            self._storage.core, self._episode_cursor, max_n, ffi.from_buffer("int32_t[]", env_ids),
            ffi.from_buffer("double[]", returns), ffi.from_buffer("int64_t[]", lengths), n, lost))
        k = n[0]
        return {"env_id": env_ids[:k], "return": returns[:k], "length": lengths[:k], "lost": int(lost[0])}

    # ---- shutdown -------------------------------------------------------------------------------
    def close_extras(self, **kwargs) -> None:
        """Stops the envs (and workers); see `close`."""
        if self._backend is not None:
            self._backend.close(terminate=kwargs.get("terminate", False))

    def close(self, terminate: bool = False, **kwargs) -> None:
        """Closes every env, stops workers and frees shared memory.  Idempotent; safe after errors."""
        if getattr(self, "closed", True) and getattr(self, "_backend", None) is None:
            return
        if not self.closed:
            self.closed = True
        backend, self._backend = self._backend, None
        storage = getattr(self, "_storage", None)
        if storage is not None:
            storage.unregister_from_cuda()
        if backend is not None:
            backend.close(terminate=terminate)

    def __del__(self):
        try:
            self.close(terminate=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return (f"SegmentVecEnv({self.backend_name}, num_envs={self.num_envs}, batch_size={self.batch_size}, "
                f"horizon={self.horizon}, num_segments={self.num_segments})")


def _spread_infos(batch_infos: dict, env_ids: np.ndarray, size: int) -> dict:
    """Re-indexes infos built for positions 0..k-1 of `env_ids` to env positions in a batch of `size`."""
    out: dict = {}
    for key, value in batch_infos.items():
        if isinstance(value, dict):
            out[key] = _spread_infos(value, env_ids, size)
        else:
            array = np.asarray(value)
            full = np.zeros((size,) + array.shape[1:], dtype=array.dtype) if array.dtype != object \
                else np.full(size, None, dtype=object)
            full[env_ids] = array
            out[key] = full
    return out
