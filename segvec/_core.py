"""The only module that speaks to the compiled C core: the memory block, numpy views of it, and `Core`.

See ``native/segvec.h`` for the design.  `Core` has one typed method per C call (numpy arrays in and out,
its own preallocated output buffers), and `check` is the one place where a C status becomes an exception.
Envs written in C (``native/segvec_env.h``) are reached here too: `EnvClass` (a class and what it declares),
`EnvMemory` (one env: its memory and one-env calls), `EnvBatch` (a runner's envs, for `Core.env_step_batch`).
This module also lays out what C does not know: the arrays whose dtypes depend on the spaces
(observations, actions, learner fields), placed in the same block right after the core's own part.
"""
from __future__ import annotations

import dataclasses
import enum
import errno
import mmap
import os
import secrets

import numpy as np

try:
    from segvec._native import ffi, lib
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError(
        "segvec's compiled core (segvec._native) is missing. Install the package so that its C core is "
        "built, e.g. `pip install -e .` from the source tree."
    ) from error

try:
    import _posixshmem
except ImportError:  # pragma: no cover - non-POSIX platforms
    _posixshmem = None

from segvec.errors import (
    NotEnoughSegmentsError,
    NotReceivedError,
    SegmentBufferExhausted,
    SegvecError,
)
from segvec.spaces import SpaceLayout

ALIGN = 64
_DTYPES = {lib.SEGVEC_FLOAT32: np.dtype(np.float32), lib.SEGVEC_FLOAT64: np.dtype(np.float64),
           lib.SEGVEC_INT32: np.dtype(np.int32), lib.SEGVEC_INT64: np.dtype(np.int64),
           lib.SEGVEC_BOOL: np.dtype(np.bool_)}
SHM_PREFIX = "/segvec-"
SHM_DIR = "/dev/shm"


class EnvState(enum.IntEnum):
    """An env's state in the core (``enum segvec_env_state``): who owns its cursor now."""

    NEW = lib.SEGVEC_ENV_NEW
    HELD = lib.SEGVEC_ENV_HELD
    SENDING = lib.SEGVEC_ENV_SENDING
    IN_FLIGHT = lib.SEGVEC_ENV_IN_FLIGHT
    READY = lib.SEGVEC_ENV_READY
    RESETTING = lib.SEGVEC_ENV_RESETTING
    FAILED = lib.SEGVEC_ENV_FAILED


class RowState(enum.IntEnum):
    """A row's state in the core (``enum segvec_row_state``)."""

    FREE = lib.SEGVEC_ROW_FREE
    FILLING = lib.SEGVEC_ROW_FILLING
    AWAITING_BOOTSTRAP = lib.SEGVEC_ROW_AWAITING_BOOTSTRAP
    COMPLETE = lib.SEGVEC_ROW_COMPLETE
    TAKEN = lib.SEGVEC_ROW_TAKEN
    RESERVED = lib.SEGVEC_ROW_RESERVED


OUTSTANDING = lib.SEGVEC_MASK_OUTSTANDING  # env states of envs sent or reset and not received yet
POISON_REWARD = lib.SEGVEC_POISON_REWARD_MILLI / 1000


class Wait(enum.Enum):
    """How a wait of the core ended (the statuses that are no error)."""

    DONE = lib.SEGVEC_OK
    TIMEOUT = lib.SEGVEC_ERR_TIMEOUT
    ALERT = lib.SEGVEC_ERR_ALERT            # a worker posted an error
    INTERRUPTED = lib.SEGVEC_ERR_INTERRUPTED
    SHUTDOWN = lib.SEGVEC_ERR_SHUTDOWN


_WAITS = {member.value: member for member in Wait}  # (a dict lookup: Wait(status) costs more on a hot path)


def check(status: int, context: str = "") -> int:
    """Turns a C status code into an exception (the only place that does); returns non-error codes."""
    if status >= 0:
        return status
    message = ffi.string(lib.segvec_strerror(status)).decode()
    if context:
        message = f"{context}: {message}"
    if status == lib.SEGVEC_ERR_NO_FREE_ROW:
        raise SegmentBufferExhausted(message)
    if status == lib.SEGVEC_ERR_NOT_HELD:
        raise NotReceivedError(message)
    if status == lib.SEGVEC_ERR_NOT_ENOUGH:
        raise NotEnoughSegmentsError(message)
    if status in (lib.SEGVEC_ERR_INVALID, lib.SEGVEC_ERR_ROW_STATE):
        raise ValueError(message)
    raise SegvecError(message)


def _reserve(fd: int, nbytes: int) -> None:
    """Sizes a new shared-memory object and reserves its pages now.

    ``ftruncate`` alone succeeds on a /dev/shm that is too small (the pages are allocated on first touch),
    and a worker would then die of SIGBUS in the middle of a step.  Raises OSError (ENOSPC) naming the
    size and the free space instead.
    """
    os.ftruncate(fd, nbytes)
    try:
        free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize
    except OSError:  # pragma: no cover - no /dev/shm to look at
        free = None
    try:
        if free is not None and nbytes > free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise
        free_text = "unknown" if free is None else f"{free / 2**20:.1f} MiB"
        raise OSError(error.errno, (
            f"cannot reserve {nbytes / 2**20:.1f} MiB of shared memory in {SHM_DIR} ({free_text} free): "
            f"lower num_segments, horizon or num_envs, or give {SHM_DIR} more room (e.g. docker run "
            f"--shm-size=...)")) from error


def _align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


class MemoryBlock:
    """One block of memory that every process of a vector env maps.

    ``shared=False`` gives anonymous memory (serial backend).  ``shared=True`` gives a POSIX shared-memory
    object with an unguessable name, created owner-only (0600); the owner unlinks it as soon as every
    worker has mapped it (at once with fork), so nothing is left in /dev/shm even if the process is killed.

    Attributes:
        name: the shared-memory name while it is linked, else None.
        buffer: the mmap object.
    """

    def __init__(self, nbytes: int, shared: bool, name: str | None = None, fd: int | None = None):
        self.nbytes = nbytes
        self.name = None
        self.fd = None  # owner: a descriptor kept to hand the block to replacement workers
        self._owner = name is None and fd is None
        if fd is not None:  # a descriptor received from the owner
            try:
                self.buffer = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
            return
        if not shared:
            self.buffer = mmap.mmap(-1, nbytes)
            return
        if _posixshmem is None:  # pragma: no cover
            raise OSError("shared memory needs a POSIX system")
        if name is None:
            name = SHM_PREFIX + secrets.token_hex(16)
            fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
            self.name = name
            try:
                _reserve(fd, nbytes)
                self.buffer = mmap.mmap(fd, nbytes)
                self.fd = os.dup(fd)
            except BaseException:
                self.unlink()
                raise
            finally:
                os.close(fd)
        else:
            fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
            try:
                self.buffer = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Unlinks the name and closes the kept descriptor (idempotent); mappings stay valid until dropped."""
        self.unlink()
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def unlink(self) -> None:
        """Removes the shared-memory name (idempotent); mappings stay valid until dropped."""
        if self._owner and self.name is not None:
            name, self.name = self.name, None
            try:
                _posixshmem.shm_unlink(name)
            except FileNotFoundError:
                pass


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """A learner field: per step (``[S, T, *shape]``) or per segment (``[S, *shape]``)."""

    name: str
    shape: tuple
    dtype: np.dtype


def _field_specs(fields: dict | None, kind: str) -> list[FieldSpec]:
    specs = []
    for name, spec in (fields or {}).items():
        try:
            shape, dtype = spec
            shape = tuple(int(s) for s in ((shape,) if np.isscalar(shape) else shape))
            dtype = np.dtype(dtype)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{kind} {name!r} must be given as (shape, dtype), got {spec!r}") from error
        if not name.isidentifier() or name in RESERVED_FIELD_NAMES:
            raise ValueError(f"{kind} name {name!r} is not a free identifier (reserved: {sorted(RESERVED_FIELD_NAMES)})")
        if dtype.hasobject:
            raise TypeError(f"{kind} {name!r}: object dtypes cannot live in shared memory")
        specs.append(FieldSpec(name, shape, dtype))
    return specs


RESERVED_FIELD_NAMES = frozenset(
    "obs action value logprob reward terminated truncated next_value episode_start mask length env_id "
    "start_step policy_version final_obs rows".split()
)


def default_episode_capacity(num_envs: int) -> int:
    """Entries of the finished-episode ring when the user does not choose: ``max(1024, 4 * num_envs)``."""
    return max(1024, 4 * num_envs)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Everything that fixes the block's layout; picklable, so workers can rebuild the same views."""

    num_envs: int
    num_workers: int
    num_segments: int
    horizon: int
    episode_capacity: int
    poison: bool
    observation_space: object
    action_space: object
    step_fields: tuple
    segment_fields: tuple
    value_shape: tuple = ()   # () one value per step; (k,) k value heads (the core's value_heads = k)

    @property
    def value_heads(self) -> int:
        """Value heads of the core: 1 for ``value_shape=()``, else ``value_shape[0]``."""
        return self.value_shape[0] if self.value_shape else 1

    @classmethod
    def make(cls, num_envs, num_workers, num_segments, horizon, observation_space, action_space,
             step_fields=None, segment_fields=None, poison=False, episode_capacity=None, value_shape=()):
        value_shape = check_value_shape(value_shape)
        if episode_capacity is None:
            episode_capacity = default_episode_capacity(num_envs)
        elif (not isinstance(episode_capacity, (int, np.integer)) or isinstance(episode_capacity, bool)
              or not 1 <= episode_capacity < 2**31):
            raise ValueError(f"episode_capacity must be an int >= 1, got {episode_capacity!r}")
        return cls(
            num_envs, num_workers, num_segments, horizon, int(episode_capacity), bool(poison),
            observation_space, action_space,
            tuple(_field_specs(step_fields, "step field")), tuple(_field_specs(segment_fields, "segment field")),
            value_shape,
        )

    def config(self):
        config = ffi.new("segvec_config_t *")
        config.num_envs = self.num_envs
        config.num_workers = self.num_workers
        config.num_segments = self.num_segments
        config.horizon = self.horizon
        config.episode_capacity = self.episode_capacity
        config.poison = int(self.poison)
        config.value_heads = self.value_heads
        return config


def check_value_shape(value_shape) -> tuple:
    """`value_shape` as a tuple: ``()`` (one value per step) or ``(k,)`` with ``k >= 1`` value heads.

    Raises:
        ValueError: anything else (more than one dimension, a size below 1, a non-integer).
    """
    try:
        shape = tuple(value_shape)
    except TypeError:
        shape = None
    if shape is None or len(shape) > 1 or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool)
                                                   and 1 <= k < 2**16 for k in shape):
        raise ValueError(f"value_shape must be () (one value per step) or (k,) with k >= 1 value heads, "
                         f"got {value_shape!r}")
    return tuple(int(k) for k in shape)


def _i32(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.int32)


class Core:
    """One process's handle on the C core of a block: one method per C call, numpy arrays in and out.

    Methods that return arrays return views of buffers the Core owns, valid until the same method is called
    again.  Which process may call what is in ``native/segvec.h``: "learner" methods here are the learner's
    (and the serial backend's runner, which runs in the learner's process), "worker" methods the runner's.
    """

    def __init__(self, pointer, nbytes: int, geometry: "Geometry", format_block: bool):
        if format_block:
            check(lib.segvec_format(pointer, nbytes, geometry.config()), "formatting the segment core")
        handle = ffi.new("segvec_core_t **")
        check(lib.segvec_attach(pointer, nbytes, handle), "attaching the segment core")
        self._core = ffi.gc(handle[0], lib.segvec_detach)
        E = geometry.num_envs
        self.address = int(ffi.cast("uintptr_t", pointer))
        self._count = ffi.new("int32_t *")
        self._cursor = ffi.new("int64_t *")
        self._stats = ffi.new("segvec_stats_t *")
        self._stat_names = [name for name, _ in ffi.typeof("segvec_stats_t").fields]
        self._ids, self._ids_ptr = self._buffer(E, np.int32)
        self._slots, self._slots_ptr = self._buffer(E, np.int64)
        self._row_start, self._row_start_ptr = self._buffer(E, np.uint8)
        self._obs_slots, self._obs_slots_ptr = self._buffer(E, np.int64)
        self._chain_slots, self._chain_slots_ptr = self._buffer(E, np.int64)
        self._copy_from, self._copy_from_ptr = self._buffer(E, np.int64)
        self._copy_to, self._copy_to_ptr = self._buffer(E, np.int64)
        self._outcomes = np.zeros((E, 6), np.float64)  # segvec_outcome_t rows, see native/segvec.h
        self._id_views: dict[int, tuple] = {}
        self._pop_views = [self._ids[:n] for n in range(E + 1)]  # worker_pop's results, one view per length
        self._obs_leaves: list = []
        self._outcomes_ptr = ffi.cast("segvec_outcome_t *", ffi.from_buffer(self._outcomes))

    @property
    def handle(self):
        """The raw ``segvec_core_t *`` (for tests that drive the C calls themselves)."""
        return self._core

    def _env_ids(self, env_ids: np.ndarray):
        """A C view of an int32 array of env ids.  The views of the arrays that come back step after step
        (every env's ids, the views `worker_pop` returns) are kept, by identity (the cache holds the arrays,
        so an id is never reused while cached); anything else is viewed afresh."""
        entry = self._id_views.get(id(env_ids))
        if entry is None:
            if len(self._id_views) >= 64:
                self._id_views.clear()
            entry = self._id_views[id(env_ids)] = (env_ids, ffi.from_buffer("int32_t[]", env_ids))
        return entry[1]

    def watch_observations(self, obs_by_slot: list[np.ndarray]) -> None:
        """The block's observation leaves (``[S * (T + 1), *leaf_shape]``), for `gather_current`."""
        self._obs_leaves = [(ffi.from_buffer(leaf), leaf[0].nbytes, leaf.shape[1:], leaf.dtype) for leaf in obs_by_slot]

    @staticmethod
    def _buffer(n: int, dtype):
        array = np.zeros(n, dtype)
        ctype = {np.int32: "int32_t[]", np.int64: "int64_t[]", np.uint8: "uint8_t[]"}[dtype]
        return array, ffi.from_buffer(ctype, array, require_writable=True)

    # ---- any process ------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """The core's counters (``segvec_stats_t``) by name."""
        check(lib.segvec_read_stats(self._core, self._stats))
        return {name: int(getattr(self._stats, name)) for name in self._stat_names}

    def count_envs(self, state_mask: int) -> int:
        """Number of envs whose state bit ``1 << state`` is in `state_mask` (a snapshot)."""
        check(lib.segvec_count_envs(self._core, state_mask, self._count))
        return int(self._count[0])

    def complete_rows(self) -> int:
        """Rows complete and not taken now (one counter of `stats`)."""
        check(lib.segvec_read_stats(self._core, self._stats))
        return int(self._stats.complete_rows)

    def post_alert(self) -> None:
        lib.segvec_post_alert(self._core)

    def read_episodes(self, cursor: list, max_n: int) -> dict:
        """Finished episodes from ticket ``cursor[0]`` on (which advances), in the order they were recorded:
        env_id, return, length, end_step, lost."""
        env_ids, returns, lengths = np.empty(max_n, np.int32), np.empty(max_n, np.float64), np.empty(max_n, np.int64)
        end_steps = np.empty(max_n, np.int64)
        self._cursor[0] = cursor[0]
        lost = ffi.new("int64_t *")
        check(lib.segvec_read_episodes(self._core, self._cursor, max_n, ffi.from_buffer("int32_t[]", env_ids),
                                       ffi.from_buffer("double[]", returns), ffi.from_buffer("int64_t[]", lengths),
                                       ffi.from_buffer("int64_t[]", end_steps), self._count, lost))
        cursor[0] = int(self._cursor[0])
        k = self._count[0]
        return {"env_id": env_ids[:k], "return": returns[:k], "length": lengths[:k], "end_step": end_steps[:k],
                "lost": int(lost[0])}

    def cursor_slots(self, env_ids: np.ndarray, observation: bool = False) -> np.ndarray:
        """Each env's current slot: step slots (r * T + t), or observation slots (r * (T + 1) + t)."""
        kind = lib.SEGVEC_OBS_SLOT if observation else lib.SEGVEC_STEP_SLOT
        check(lib.segvec_cursor_slots(self._core, len(env_ids), self._env_ids(env_ids), kind, self._slots_ptr))
        return self._slots[:len(env_ids)]

    def gather_current(self, env_ids: np.ndarray) -> list[np.ndarray]:
        """Each env's current observation, per leaf (fresh arrays ``[len(env_ids), *leaf_shape]``)."""
        n, ids = len(env_ids), self._env_ids(env_ids)
        out = []
        for src, item_bytes, shape, dtype in self._obs_leaves:
            leaf = np.empty((n,) + shape, dtype)
            check(lib.segvec_gather_current(self._core, n, ids, src, item_bytes, ffi.from_buffer(leaf, require_writable=True)))
            out.append(leaf)
        return out

    # ---- learner ----------------------------------------------------------------------------------
    def flush_envs(self, env_ids: np.ndarray, tail_values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Closes the envs' rows in progress; returns ``(copy_from, copy_to)`` observation slots (-1: none).
        `tail_values`: None (the values already sent), or float32 ``[n, *value_shape]``, C-contiguous."""
        n = len(env_ids)
        check(lib.segvec_flush_envs(
            self._core, n, ffi.from_buffer("int32_t[]", env_ids),
            ffi.NULL if tail_values is None else ffi.from_buffer("float[]", tail_values),
            self._copy_from_ptr, self._copy_to_ptr), "flush")
        return self._copy_from[:n], self._copy_to[:n]

    def begin_resets(self, env_ids: np.ndarray) -> None:
        check(lib.segvec_begin_resets(self._core, len(env_ids), ffi.from_buffer("int32_t[]", env_ids)), "reset")

    def wait_ready(self, min_count: int, timeout_ms: int) -> tuple[Wait, int]:
        """Waits (at most `timeout_ms`, and ~500 ms at a time) for `min_count` published envs."""
        status = lib.segvec_wait_ready(self._core, min_count, timeout_ms, self._count)
        return _WAITS[status], int(self._count[0])

    def pop_ready(self, max_n: int) -> np.ndarray:
        """Receives up to `max_n` published envs, oldest publication first (a copy)."""
        check(lib.segvec_pop_ready(self._core, max_n, self._ids_ptr, self._count))
        return self._ids[:self._count[0]].copy()

    def prepare_send(self, env_ids: np.ndarray, values, logprobs, policy_version: int) -> tuple[np.ndarray, np.ndarray]:
        """Stamps a send; returns ``(step slots, row starts as uint8)``.  All or nothing.  `values`: None or
        float32 ``[n, *value_shape]`` and `logprobs` None or float32 ``[n]``, C-contiguous.

        Raises:
            NotReceivedError: an env is not held (not received, failed, or named twice).
            SegmentBufferExhausted: the spare rows it needs are held by the learner.
        """
        n = len(env_ids)
        check(lib.segvec_prepare_send(
            self._core, n, self._env_ids(env_ids),
            ffi.NULL if values is None else ffi.from_buffer("float[]", values),
            ffi.NULL if logprobs is None else ffi.from_buffer("float[]", logprobs),
            int(policy_version), self._slots_ptr, self._row_start_ptr), "send")
        return self._slots[:n], self._row_start[:n]

    def cancel_send(self, env_ids: np.ndarray) -> None:
        check(lib.segvec_cancel_send(self._core, len(env_ids), ffi.from_buffer("int32_t[]", env_ids)), "send")

    def dispatch(self, env_ids: np.ndarray) -> None:
        check(lib.segvec_dispatch(self._core, len(env_ids), self._env_ids(env_ids)), "send")

    def fill_next_values(self, rows: np.ndarray, same_step: bool, out: np.ndarray) -> None:
        """Bootstraps of every step of taken `rows` into `out` ([n, T, *value_shape] float32, C-contiguous)."""
        check(lib.segvec_fill_next_values(self._core, len(rows), ffi.from_buffer("int32_t[]", rows), int(same_step),
                                          ffi.from_buffer("float[]", out, require_writable=True)), "next_value")

    def take(self, n: int) -> np.ndarray | None:
        """Takes the `n` oldest complete rows; None when fewer are complete now."""
        rows = np.empty(n, np.int32)
        status = lib.segvec_take(self._core, n, ffi.from_buffer("int32_t[]", rows, require_writable=True))
        if status == lib.SEGVEC_ERR_NOT_ENOUGH:
            return None
        check(status, "take_segments")
        return rows

    def release(self, rows: np.ndarray) -> None:
        check(lib.segvec_release(self._core, len(rows), ffi.from_buffer("int32_t[]", rows)), "release")

    def shutdown(self) -> None:
        lib.segvec_shutdown(self._core)

    def kick_worker(self, worker: int) -> None:
        lib.segvec_kick_worker(self._core, int(worker))

    def recover_worker(self, worker: int) -> np.ndarray:
        """Takes back a dead worker's envs; returns those rolled back to their sent slot (a copy)."""
        check(lib.segvec_recover_worker(self._core, int(worker), self._ids_ptr, self._count))
        return self._ids[:self._count[0]].copy()

    # ---- worker -----------------------------------------------------------------------------------
    def worker_wait(self, worker: int, timeout_ms: int) -> Wait:
        return _WAITS[lib.segvec_worker_wait(self._core, worker, timeout_ms)]

    def worker_pop(self, worker: int) -> np.ndarray:
        """The envs whose actions are in for `worker`, in dispatch order (a view)."""
        check(lib.segvec_worker_pop(self._core, worker, len(self._ids), self._ids_ptr, self._count))
        return self._pop_views[self._count[0]]

    @property
    def outcomes(self) -> np.ndarray:
        """``[E, 6]`` float64 rows of ``segvec_outcome_t`` that `commit_steps` reads."""
        return self._outcomes

    def commit_steps(self, env_ids: np.ndarray, scatter: "Scatter | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """Records ``outcomes[:n]``; returns ``(new observation slots, finished rows' obs[horizon] slots)``.
        With `scatter`, also copies the staged observations to those slots."""
        n = len(env_ids)
        check(lib.segvec_commit_steps(self._core, n, self._env_ids(env_ids), self._outcomes_ptr,
                                      self._obs_slots_ptr, self._chain_slots_ptr), "commit")
        if scatter is not None:
            scatter.run(n, self._obs_slots_ptr, self._chain_slots_ptr)
        return self._obs_slots[:n], self._chain_slots[:n]

    def commit_resets(self, env_ids: np.ndarray) -> np.ndarray:
        """Records resets; returns the observation slots of the first observations."""
        n = len(env_ids)
        check(lib.segvec_commit_resets(self._core, n, ffi.from_buffer("int32_t[]", env_ids), self._obs_slots_ptr),
              "reset")
        self._chain_slots[:n] = -1
        return self._obs_slots[:n]

    def restart_env(self, env_id: int) -> int:
        """A rebuilt env starts a new episode at its cursor; returns the observation slot."""
        check(lib.segvec_restart_env(self._core, env_id, self._cursor), "restart")
        return int(self._cursor[0])

    def fail_envs(self, env_ids) -> None:
        ids = _i32(env_ids)
        check(lib.segvec_fail_envs(self._core, len(ids), ffi.from_buffer("int32_t[]", ids)), "fail")

    def return_envs(self, env_ids) -> None:
        ids = _i32(env_ids)
        check(lib.segvec_return_envs(self._core, len(ids), ffi.from_buffer("int32_t[]", ids)), "return")

    def skip_steps(self, env_ids) -> None:
        """Envs that sit this step out (see segvec_skip_steps): no row changes; publish them next."""
        ids = _i32(env_ids)
        if len(ids):
            check(lib.segvec_skip_steps(self._core, len(ids), ffi.from_buffer("int32_t[]", ids)), "skip")

    def publish(self, env_ids: np.ndarray) -> None:
        """Hands `env_ids` (a contiguous int32 array) to the learner."""
        if len(env_ids):
            check(lib.segvec_publish(self._core, len(env_ids), self._env_ids(env_ids)), "publish")

    # ---- worker: envs written in C (native/segvec_env.h) -------------------------------------------
    def env_step_batch(self, batch: "EnvBatch", env_ids: np.ndarray) -> tuple[np.ndarray, list, np.ndarray | None]:
        """Steps `env_ids` (IN_FLIGHT, all C envs of `batch`) in one C loop and commits them.

        Returns ``(committed env ids (a view), [(env, status)] of those that failed, SAME_STEP env ids whose
        episode ended (their final observations are in the block's final_obs) or None)``."""
        n = len(env_ids)
        counts = batch.counts
        check(lib.segvec_env_step_batch(self._core, batch.c, n, self._env_ids(env_ids), counts, batch.failed_ptr,
                                        batch.status_ptr, counts + 1, batch.ended_ptr, counts + 2), "native step")
        return batch.done_views[counts[0]], batch.failures(counts[1]), batch.ended[:counts[2]].copy() if counts[2] else None

    def env_reset_batch(self, batch: "EnvBatch", env_ids: np.ndarray, seeds: np.ndarray,
                        seeded: np.ndarray) -> tuple[np.ndarray, list]:
        """Resets `env_ids` (RESETTING, all C envs of `batch`; ``seeded[i]``: with ``seeds[i]``) and commits
        them.  Returns ``(committed env ids (a view), [(env, status)] of those that failed)``."""
        n = len(env_ids)
        counts = batch.counts
        check(lib.segvec_env_reset_batch(self._core, batch.c, n, ffi.from_buffer("int32_t[]", env_ids),
                                         ffi.from_buffer("uint64_t[]", seeds), ffi.from_buffer("uint8_t[]", seeded),
                                         counts, batch.failed_ptr, batch.status_ptr, counts + 1), "native reset")
        return batch.done_views[counts[0]], batch.failures(counts[1])


# ---- kernels (no core) ------------------------------------------------------------------------------
class Scatter:
    """Copies a batch's staged observation leaves to their slots (and finished rows' obs[horizon]) in C.

    Args:
        staging: per leaf, ``[n_max, *leaf_shape]`` arrays (the batch's observations, in order), or None
            when every batch comes in arrays of its own (see `bind`).
        by_slot: per leaf, ``[S * (T + 1), *leaf_shape]`` views of the block's observations.
    """

    def __init__(self, staging: list[np.ndarray] | None, by_slot: list[np.ndarray]):
        self._dst = [(ffi.from_buffer(dst, require_writable=True), dst[0].nbytes) for dst in by_slot]
        self._plan: list = []
        self._sources: list = []
        if staging is not None:
            self.bind(staging)

    def bind(self, staging: list[np.ndarray]) -> "Scatter":
        """Reads the next batches from `staging`: per leaf, a C-contiguous ``[n, *leaf_shape]`` array of the
        leaf's dtype (e.g. the arrays a batched engine returned).  Returns the scatter."""
        self._sources = staging  # (kept alive while the plan points into them)
        self._plan = [(ffi.from_buffer(out), dst, item_bytes) for out, (dst, item_bytes) in zip(staging, self._dst)]
        return self

    def __call__(self, obs_slots: np.ndarray, chain_slots: np.ndarray | None = None, leaves=None) -> None:
        self.run(len(obs_slots), ffi.from_buffer("int64_t[]", obs_slots),
                 ffi.NULL if chain_slots is None else ffi.from_buffer("int64_t[]", chain_slots), leaves)

    def run(self, n: int, obs_ptr, chain_ptr, leaves=None) -> None:
        for i, (src, dst, item_bytes) in enumerate(self._plan):
            if leaves is None or i in leaves:
                lib.segvec_scatter_obs(src, item_bytes, n, obs_ptr, chain_ptr, dst)



# ---- envs written in C (native/segvec_env.h) -----------------------------------------------------------
ENV_DTYPES = {lib.SEGVEC_ENV_UINT8: np.dtype(np.uint8), lib.SEGVEC_ENV_INT32: np.dtype(np.int32),
              lib.SEGVEC_ENV_INT64: np.dtype(np.int64), lib.SEGVEC_ENV_FLOAT32: np.dtype(np.float32),
              lib.SEGVEC_ENV_FLOAT64: np.dtype(np.float64)}
AUTORESET_CODES = {"NextStep": lib.SEGVEC_AUTORESET_NEXT_STEP, "SameStep": lib.SEGVEC_AUTORESET_SAME_STEP,
                   "Disabled": lib.SEGVEC_AUTORESET_DISABLED}
ENV_ERR_ACTION, ENV_ERR_NOT_RESET = lib.SEGVEC_ENV_ERR_ACTION, lib.SEGVEC_ENV_ERR_NOT_RESET
ENV_ALIGN = 64  # one env's memory starts on a 64-byte boundary (so does its state: the header is 128 bytes)


class EnvClass:
    """A C env class (``segvec_env_class_t``): what it declares, and one env's calls.

    Args:
        address: where the class struct lies in this process (a module of C envs holds it).
        keepalive: the object that keeps that module loaded.

    Raises:
        ValueError: the struct is not a valid class of this ABI version.
    """

    def __init__(self, address: int, keepalive=None):
        self.address = int(address)
        self._keepalive = keepalive
        c = self.c = ffi.cast("const segvec_env_class_t *", self.address)
        if lib.segvec_env_check_class(c) != 0:
            version = c.abi_version if c != ffi.NULL else None
            raise ValueError(f"not a valid C env class (ABI version {version}, this segvec reads "
                             f"{lib.SEGVEC_ENV_ABI_VERSION}; see native/segvec_env.h)")
        self.name = ffi.string(c.name).decode()
        self.obs_dtype = ENV_DTYPES[c.obs_dtype]
        self.obs_shape = tuple(int(c.obs_shape[d]) for d in range(c.obs_ndim))
        size = int(np.prod(self.obs_shape, dtype=np.int64))
        self.obs_bounds = tuple(
            None if pointer == ffi.NULL else np.frombuffer(ffi.buffer(pointer, 8 * size), np.float64).reshape(self.obs_shape).copy()
            for pointer in (c.obs_low, c.obs_high))
        self.discrete = c.action_kind == lib.SEGVEC_ENV_DISCRETE
        self.action_size = int(c.action_size)
        self.action_bounds = tuple(
            None if pointer == ffi.NULL else np.frombuffer(ffi.buffer(pointer, 4 * self.action_size), np.float32).copy()
            for pointer in (c.action_low, c.action_high))
        self.max_episode_steps = int(c.max_episode_steps)
        self.state_bytes = int(c.state_bytes)
        self.env_bytes = int(lib.segvec_env_bytes(c))
        self.params = {ffi.string(c.param_names[i]).decode(): float(c.param_defaults[i]) for i in range(c.n_params)}

    @classmethod
    def builtin(cls, name: str) -> "EnvClass":
        """A class built into segvec (``cartpole``, ``synthetic_atari``)."""
        index = 0
        while (pointer := lib.segvec_builtin_env_class(index)) != ffi.NULL:
            if ffi.string(pointer.name).decode() == name:
                return cls(int(ffi.cast("uintptr_t", pointer)))
            index += 1
        raise KeyError(f"no C env class {name!r} is built into segvec")

    def strerror(self, status: int) -> str:
        return ffi.string(lib.segvec_env_strerror(self.c, status)).decode()

    def new_env(self, params: list[float], max_episode_steps: int | None) -> "EnvMemory":
        """One fresh env: zeroed memory, the header, then the class's init.

        Raises:
            ValueError: the class's init failed (its message).
        """
        memory = EnvMemory(self)
        status = lib.segvec_env_init(self.c, memory.pointer, ffi.new("double[]", list(params) or [0.0]),
                                     -1 if max_episode_steps is None else int(max_episode_steps))
        if status != 0:
            raise ValueError(f"{self.name}: {self.strerror(status)}")
        return memory


class EnvMemory:
    """One C env's memory (header + state) in a numpy buffer, 64-byte aligned (``raw``: a copy's bytes), and
    its own action and observation arrays for one-env calls: `action` (int64 ``()`` or float32 ``(k,)``),
    which `step` reads, and `obs`, which `reset` and `step` write."""

    def __init__(self, env_class: EnvClass, raw: bytes | None = None):
        self.env_class = env_class
        n = env_class.env_bytes
        self._buffer = np.zeros(n + ENV_ALIGN, np.uint8)
        start = (-self._buffer.ctypes.data) % ENV_ALIGN
        self.bytes = self._buffer[start:start + n]
        if raw is not None:
            self.bytes[:] = np.frombuffer(raw, np.uint8)
        self.pointer = ffi.from_buffer(self.bytes, require_writable=True)
        self.header = ffi.cast("segvec_env_header_t *", self.pointer)
        self._result = ffi.new("segvec_env_result_t *")
        self._seed = ffi.new("uint64_t *")
        self.obs = np.zeros(env_class.obs_shape, env_class.obs_dtype)
        self.action = np.zeros((), np.int64) if env_class.discrete else np.zeros(env_class.action_size, np.float32)
        self._obs_ptr = ffi.from_buffer(self.obs, require_writable=True)
        self._action_ptr = ffi.from_buffer(self.action)

    def reset(self, seed: int | None) -> int:
        """The core's reset of this env (seed None: no seed) into `obs`; returns the status."""
        if seed is None:
            return lib.segvec_env_reset(self.env_class.c, self.pointer, ffi.NULL, self._obs_ptr)
        self._seed[0] = seed
        return lib.segvec_env_reset(self.env_class.c, self.pointer, self._seed, self._obs_ptr)

    def step(self) -> tuple[int, float, bool, bool]:
        """The core's step of this env with `action`, into `obs`: ``(status, reward, terminated, truncated)``."""
        result = self._result
        status = lib.segvec_env_step(self.env_class.c, self.pointer, self._action_ptr, self._obs_ptr, result)
        return status, result.reward, bool(result.terminated), bool(result.truncated)

    # ---- the generator (numpy's PCG64) -----------------------------------------------------------------
    def entropy(self) -> int | None:
        """SeedSequence.entropy of the last seeding; None: never seeded; -1: set from a numpy state."""
        words = self.header.entropy_words
        if words == 0:
            return None
        if words < 0:
            return -1
        return sum(int(self.header.entropy[i]) << (32 * i) for i in range(words))

    def seed_from_os(self) -> None:
        """Seeds the generator with 128 bits of OS entropy, as SeedSequence(None) does."""
        header = self.header
        if lib.segvec_rng_seed_os(ffi.addressof(header, "rng"), header.entropy, ffi.addressof(header, "entropy_words")):
            raise OSError("no entropy from the OS")

    def rng_state(self) -> dict:
        """The generator's state as numpy's ``PCG64().state`` writes it."""
        rng = self.header.rng
        return {"bit_generator": "PCG64",
                "state": {"state": (int(rng.state_high) << 64) | int(rng.state_low),
                          "inc": (int(rng.inc_high) << 64) | int(rng.inc_low)},
                "has_uint32": int(rng.has_uint32), "uinteger": int(rng.uinteger)}

    def set_rng_state(self, state: dict | None) -> None:
        """Sets the generator from numpy's PCG64 state (None: unseeded, the next reset seeds it)."""
        header = self.header
        if state is None:
            header.entropy_words = 0
            return
        if state.get("bit_generator") != "PCG64":
            raise ValueError(f"a C env's generator is numpy's PCG64, got a {state.get('bit_generator')} state")
        mask = (1 << 64) - 1
        value, inc = int(state["state"]["state"]), int(state["state"]["inc"])
        rng = header.rng
        rng.state_high, rng.state_low = value >> 64, value & mask
        rng.inc_high, rng.inc_low = inc >> 64, inc & mask
        rng.has_uint32, rng.uinteger = int(state["has_uint32"]), int(state["uinteger"])
        header.entropy_words = -1


class EnvBatch:
    """The C envs of one runner (one class) with pointers into the block, for `Core.env_step_batch`.

    Args:
        env_class: their class.
        first_env: env id of ``memories[0]``.
        memories: each env's `EnvMemory`, in env order.
        storage: the block's views.
        autoreset_mode: gymnasium's AutoresetMode.
        staging: ``[len(memories), *obs_shape]`` scratch for observations (the runner's own).
    """

    def __init__(self, env_class: EnvClass, first_env: int, memories: list, storage: "Storage", autoreset_mode,
                 staging: np.ndarray):
        n = len(memories)
        self.c = c = ffi.new("segvec_env_batch_t *")
        self._envs = ffi.new("void *[]", n)
        self._memories = list(memories)
        for i, memory in enumerate(memories):
            self._envs[i] = memory.pointer
        outcomes = np.zeros((n, 6), np.float64)
        slots = [np.zeros(n, np.int64) for _ in range(3)]
        self.done = np.zeros(n, np.int32)
        self.done_views = [self.done[:k] for k in range(n + 1)]  # stable objects: Core caches their C views
        self.failed, self.status, self.ended = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        self.counts = ffi.new("int32_t[3]")
        self._keep = [staging, outcomes, slots]
        c.cls = env_class.c
        c.first_env = first_env
        c.n_envs = n
        c.envs = self._envs
        c.autoreset_mode = AUTORESET_CODES[autoreset_mode.value]
        c.horizon = storage.geometry.horizon
        c.obs_bytes = storage.obs_layout.leaves[0].nbytes
        c.action_bytes = storage.action_layout.leaves[0].nbytes
        c.obs = ffi.from_buffer(storage.obs_by_slot[0], require_writable=True)
        c.actions = ffi.from_buffer(storage.action_by_slot[0])
        c.final_obs = ffi.from_buffer(storage.final_obs[0], require_writable=True)
        c.env_needs_reset = ffi.from_buffer("uint8_t[]", storage.env_needs_reset)
        c.staging = ffi.from_buffer(staging, require_writable=True)
        c.outcomes = ffi.cast("segvec_outcome_t *", ffi.from_buffer(outcomes, require_writable=True))
        c.slots, c.obs_slots, c.chain_slots = (ffi.from_buffer("int64_t[]", a, require_writable=True) for a in slots)
        c.done = ffi.from_buffer("int32_t[]", self.done, require_writable=True)
        self.failed_ptr = ffi.from_buffer("int32_t[]", self.failed, require_writable=True)
        self.status_ptr = ffi.from_buffer("int32_t[]", self.status, require_writable=True)
        self.ended_ptr = ffi.from_buffer("int32_t[]", self.ended, require_writable=True)

    def set_env(self, local: int, memory: EnvMemory) -> None:
        """Env ``first_env + local`` is now `memory` (a rebuilt env)."""
        self._memories[local] = memory
        self._envs[local] = memory.pointer

    def failures(self, count: int) -> list[tuple[int, int]]:
        return list(zip(self.failed[:count].tolist(), self.status[:count].tolist())) if count else []


def gae_kernel(reward, value, next_value, terminated, truncated, mask, length, gamma, lam,
               advantages: np.ndarray, returns: np.ndarray) -> None:
    """The C GAE kernel on checked, C-contiguous arrays (see `segvec.advantages.gae_numpy`): reward, value,
    next_value and the outputs ``[n, T]`` or ``[n, T, k]``; the flags ``[n, T]``; gamma and lam floats for
    ``[n, T]``, sequences of k floats for ``[n, T, k]`` (each rounded to float32)."""
    n, T = reward.shape[:2]
    heads = reward.shape[2] if reward.ndim == 3 else 1
    check(lib.segvec_gae(n, T, heads, *(ffi.from_buffer("float[]", a) for a in (reward, value, next_value)),
                         *(ffi.from_buffer("uint8_t[]", a) for a in (terminated, truncated, mask)),
                         ffi.from_buffer("int32_t[]", length),
                         ffi.new("float[]", gamma if reward.ndim == 3 else (gamma,)),
                         ffi.new("float[]", lam if reward.ndim == 3 else (lam,)),
                         ffi.from_buffer("float[]", advantages, require_writable=True),
                         ffi.from_buffer("float[]", returns, require_writable=True)), "gae")


class Storage:
    """Numpy views of every array in a block, plus the handle of the C core on it.

    Layouts (S = num_segments, T = horizon, E = num_envs):
        obs leaves            # [S, T + 1, *leaf_shape]
        action leaves         # [S, T, *leaf_shape]
        step fields           # [S, T, *shape]
        segment fields        # [S, *shape]
        final_obs leaves      # [E, *leaf_shape]  SAME_STEP final observation of each env's last step
        env_has_info          # [E] uint8         1: the env's last step produced a non-empty info
        env_sits_out          # [E] uint8         1: an agent slot that sat out its last step (segvec_skip_steps)
        the core's arrays     # each an attribute of its name: reward, terminated, ..., env_state, ...
                              # reward, value, truncation_value, next_value [S, T, *value_shape],
                              # tail_value [S, *value_shape], env_last_reward [E, *value_shape]
                              # (SEGVEC_ARRAYS in native/segvec.h lists them with their shapes)
    """

    @staticmethod
    def plan(geometry: Geometry):
        """Returns ``(plan, nbytes)``: where every array of the block goes, as ``(group, name, shape,
        dtype, offset)``; the core's arrays (group "core") come from its own list (``segvec_array_info``)."""
        g = geometry
        obs_layout = SpaceLayout(g.observation_space, "observation")
        action_layout = SpaceLayout(g.action_space, "action")
        config = g.config()
        core_bytes, info = ffi.new("int64_t *"), ffi.new("segvec_array_info_t *")
        check(lib.segvec_block_bytes(config, core_bytes), "segment geometry")
        S, T, E = g.num_segments, g.horizon, g.num_envs
        V = g.value_shape  # the head axis: absent for value_shape=(), so scalar values keep [S, T]
        shapes = {lib.SEGVEC_DIMS_ST: (S, T), lib.SEGVEC_DIMS_S: (S,), lib.SEGVEC_DIMS_E: (E,),
                  lib.SEGVEC_DIMS_K: (g.episode_capacity,), lib.SEGVEC_DIMS_STH: (S, T) + V,
                  lib.SEGVEC_DIMS_SH: (S,) + V, lib.SEGVEC_DIMS_EH: (E,) + V}
        plan = []  # (group, name, shape, dtype, offset)
        for index in range(lib.segvec_num_arrays()):
            check(lib.segvec_array_info(config, index, info))
            plan.append(("core", ffi.string(info.name).decode(), shapes[info.dims], _DTYPES[info.dtype], info.offset))
        offset = _align(core_bytes[0])

        def place(group, name, shape, dtype):
            nonlocal offset
            dtype = np.dtype(dtype)
            plan.append((group, name, shape, dtype, offset))
            offset = _align(offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)

        for i, leaf in enumerate(obs_layout.leaves):
            place("obs", i, (S, T + 1) + leaf.shape, leaf.dtype)
        for i, leaf in enumerate(action_layout.leaves):
            place("action", i, (S, T) + leaf.shape, leaf.dtype)
        for spec in g.step_fields:
            place("step_field", spec.name, (S, T) + spec.shape, spec.dtype)
        for spec in g.segment_fields:
            place("segment_field", spec.name, (S,) + spec.shape, spec.dtype)
        for i, leaf in enumerate(obs_layout.leaves):
            place("final_obs", i, (E,) + leaf.shape, leaf.dtype)
        place("misc", "env_has_info", (E,), np.uint8)
        place("misc", "env_sits_out", (E,), np.uint8)
        return plan, _align(offset)

    def __init__(self, geometry: Geometry, block: MemoryBlock | None = None, shared: bool = False,
                 format_block: bool = True):
        self.geometry = g = geometry
        self.obs_layout = SpaceLayout(g.observation_space, "observation")
        self.action_layout = SpaceLayout(g.action_space, "action")
        plan, self.nbytes = self.plan(g)
        S, T = g.num_segments, g.horizon

        self.block = block if block is not None else MemoryBlock(self.nbytes, shared=shared)
        raw = np.frombuffer(self.block.buffer, dtype=np.uint8, count=self.nbytes)
        self.core = Core(ffi.from_buffer(self.block.buffer), self.nbytes, g, format_block)
        self.address = self.core.address  # where the block starts in this process's memory
        self.close_callbacks: list = []   # run by close(): e.g. torch unregistering the block from CUDA
        self.objects = None  # the learner's ObjectStore (segvec/objects.py) when a space has parts that
        # travel pickled; None in workers and for spaces that live wholly in the block

        def view(offset, shape, dtype):
            dtype = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            return raw[offset:offset + count].view(dtype).reshape(shape)

        self.obs, self.action, self.final_obs = [], [], []
        self.step_fields, self.segment_fields = {}, {}
        for group, name, shape, dtype, at in plan:
            array = view(at, shape, dtype)
            if group == "core":
                setattr(self, name, array)
            elif group == "obs":
                self.obs.append(array)
            elif group == "action":
                self.action.append(array)
            elif group == "final_obs":
                self.final_obs.append(array)
            elif group == "step_field":
                self.step_fields[name] = array
            elif group == "segment_field":
                self.segment_fields[name] = array
            else:  # "misc": env_has_info, env_sits_out
                setattr(self, name, array)
        # Flat views: one item per slot, for gathers and scatters by slot index.
        self.obs_by_slot = [a.reshape((S * (T + 1),) + a.shape[2:]) for a in self.obs]
        self.action_by_slot = [a.reshape((S * T,) + a.shape[2:]) for a in self.action]
        self.step_fields_by_slot = {k: a.reshape((S * T,) + a.shape[2:]) for k, a in self.step_fields.items()}
        self.core.watch_observations(self.obs_by_slot)

    def stats(self) -> dict[str, int]:
        return self.core.stats()

    def write_head_rewards(self, env_ids: np.ndarray, rewards: np.ndarray) -> None:
        """Value heads: overwrites the per-head rewards of each env's last committed step (which the commit
        filled with the env's scalar reward in every head) with ``rewards[i]`` (``[len(env_ids), k]``).  The
        runner of `env_ids` calls it after `commit_steps` and before it publishes them."""
        slots = self.env_last_slot[env_ids]
        self.reward.reshape((-1,) + self.geometry.value_shape)[slots] = rewards
        self.env_last_reward[env_ids] = rewards

    def close(self) -> None:
        """Runs the close callbacks (once); the mapping stays valid while views of it live."""
        callbacks, self.close_callbacks = self.close_callbacks, []
        for callback in callbacks:
            callback()

