"""The Python side of the C segment core: the memory block, numpy views of it, and thin calls into C.

See ``native/segvec.h`` for the design.  This module adds what C does not know: the arrays whose dtypes
depend on the spaces (observations, actions, learner fields), laid out in the same block right after the
core's own part.
"""
from __future__ import annotations

import dataclasses
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
SHM_PREFIX = "/segvec-"
SHM_DIR = "/dev/shm"


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

    @classmethod
    def make(cls, num_envs, num_workers, num_segments, horizon, observation_space, action_space,
             step_fields=None, segment_fields=None, poison=False):
        return cls(
            num_envs, num_workers, num_segments, horizon, max(1024, 4 * num_envs), bool(poison),
            observation_space, action_space,
            tuple(_field_specs(step_fields, "step field")), tuple(_field_specs(segment_fields, "segment field")),
        )

    def config(self):
        config = ffi.new("segvec_config_t *")
        config.num_envs = self.num_envs
        config.num_workers = self.num_workers
        config.num_segments = self.num_segments
        config.horizon = self.horizon
        config.episode_capacity = self.episode_capacity
        config.poison = int(self.poison)
        return config


class Storage:
    """Numpy views of every array in a block, plus the handle of the C core on it.

    Layouts (S = num_segments, T = horizon, E = num_envs):
        obs leaves            # [S, T + 1, *leaf_shape]
        action leaves         # [S, T, *leaf_shape]
        step fields           # [S, T, *shape]
        segment fields        # [S, *shape]
        final_obs leaves      # [E, *leaf_shape]  SAME_STEP final observation of each env's last step
        env_has_info          # [E] uint8         1: the env's last step produced a non-empty info
        reward, terminated, truncated, mask, episode_start, value, logprob, policy_version,
        truncation_value      # [S, T]
        tail_value, row_env_id, row_length, row_state, row_start_step, row_episode_id   # [S]
        env_row, env_step, ...                                                          # [E]
    """

    @staticmethod
    def plan(geometry: Geometry):
        """Returns ``(core_layout, python_arrays, nbytes)``: where every array of the block goes."""
        g = geometry
        obs_layout = SpaceLayout(g.observation_space, "observation")
        action_layout = SpaceLayout(g.action_space, "action")
        layout = ffi.new("segvec_layout_t *")
        check(lib.segvec_compute_layout(g.config(), layout), "segment geometry")
        S, T, E = g.num_segments, g.horizon, g.num_envs
        offset = _align(layout.total_bytes)
        plan = []  # (group, name, shape, dtype, offset)

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
        return layout, plan, _align(offset)

    def __init__(self, geometry: Geometry, block: MemoryBlock | None = None, shared: bool = False,
                 format_block: bool = True):
        self.geometry = g = geometry
        self.obs_layout = SpaceLayout(g.observation_space, "observation")
        self.action_layout = SpaceLayout(g.action_space, "action")
        config = g.config()
        layout, plan, self.nbytes = self.plan(g)
        S, T, E = g.num_segments, g.horizon, g.num_envs

        self.block = block if block is not None else MemoryBlock(self.nbytes, shared=shared)
        self.pointer = ffi.from_buffer(self.block.buffer)
        raw = np.frombuffer(self.block.buffer, dtype=np.uint8, count=self.nbytes)
        if format_block:
            check(lib.segvec_format(self.pointer, self.nbytes, config), "formatting the segment core")
        handle = ffi.new("segvec_core_t **")
        check(lib.segvec_attach(self.pointer, self.nbytes, handle), "attaching the segment core")
        self.core = ffi.gc(handle[0], lib.segvec_detach)

        def view(offset, shape, dtype):
            dtype = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            return raw[offset:offset + count].view(dtype).reshape(shape)

        ST, SS, EE = (S, T), (S,), (E,)
        self.reward = view(layout.reward, ST, np.float32)
        self.terminated = view(layout.terminated, ST, np.bool_)
        self.truncated = view(layout.truncated, ST, np.bool_)
        self.mask = view(layout.mask, ST, np.bool_)
        self.episode_start = view(layout.episode_start, ST, np.bool_)
        self.value = view(layout.value, ST, np.float32)
        self.logprob = view(layout.logprob, ST, np.float32)
        self.policy_version = view(layout.policy_version, ST, np.int64)
        self.truncation_value = view(layout.truncation_value, ST, np.float32)
        self.next_value = view(layout.next_value, ST, np.float32)
        self.tail_value = view(layout.tail_value, SS, np.float32)
        self.row_env_id = view(layout.row_env_id, SS, np.int32)
        self.row_length = view(layout.row_length, SS, np.int32)
        self.row_state = view(layout.row_state, SS, np.int32)
        self.row_start_step = view(layout.row_start_step, SS, np.int64)
        self.row_episode_id = view(layout.row_episode_id, SS, np.int64)
        self.env_row = view(layout.env_row, EE, np.int32)
        self.env_step = view(layout.env_step, EE, np.int32)
        self.env_state = view(layout.env_state, EE, np.int32)
        self.env_needs_reset = view(layout.env_needs_reset, EE, np.bool_)
        self.env_last_reward = view(layout.env_last_reward, EE, np.float64)
        self.env_last_terminated = view(layout.env_last_terminated, EE, np.bool_)
        self.env_last_truncated = view(layout.env_last_truncated, EE, np.bool_)
        self.env_episode_id = view(layout.env_episode_id, EE, np.int64)
        self.env_last_slot = view(layout.env_last_slot, EE, np.int64)

        self.obs, self.action, self.final_obs = [], [], []
        self.step_fields, self.segment_fields = {}, {}
        for group, name, shape, dtype, at in plan:
            array = view(at, shape, dtype)
            if group == "obs":
                self.obs.append(array)
            elif group == "action":
                self.action.append(array)
            elif group == "final_obs":
                self.final_obs.append(array)
            elif group == "step_field":
                self.step_fields[name] = array
            elif group == "segment_field":
                self.segment_fields[name] = array
            else:
                self.env_has_info = array
        # Flat views: one item per slot, for gathers and scatters by slot index.
        self.obs_by_slot = [a.reshape((S * (T + 1),) + a.shape[2:]) for a in self.obs]
        self.action_by_slot = [a.reshape((S * T,) + a.shape[2:]) for a in self.action]
        self.step_fields_by_slot = {k: a.reshape((S * T,) + a.shape[2:]) for k, a in self.step_fields.items()}

    # ---- CUDA ------------------------------------------------------------------------------------
    def register_with_cuda(self) -> bool:
        """Page-locks the whole block for CUDA (once), so that host-to-device copies of zero-copy batch
        views are asynchronous DMA with no staging copy.  Returns False when CUDA is absent or refuses
        (then callers stage through pinned memory).  `unregister_from_cuda` undoes it."""
        if getattr(self, "_cuda_registered", None) is None:
            self._cuda_registered = False
            try:
                import torch

                if torch.cuda.is_available():
                    address = int(ffi.cast("uintptr_t", self.pointer))
                    status = torch.cuda.cudart().cudaHostRegister(address, self.nbytes, 0)
                    self._cuda_registered = int(getattr(status, "value", status)) == 0
            except Exception:  # noqa: BLE001 - any failure means: stage through pinned memory
                self._cuda_registered = False
        return self._cuda_registered

    def unregister_from_cuda(self) -> None:
        if getattr(self, "_cuda_registered", False):
            self._cuda_registered = None
            import torch

            torch.cuda.cudart().cudaHostUnregister(int(ffi.cast("uintptr_t", self.pointer)))

    def stats(self) -> dict:
        out = ffi.new("segvec_stats_t *")
        check(lib.segvec_read_stats(self.core, out))
        return {name: int(getattr(out, name)) for name in (
            "steps", "episodes", "segments_completed", "segments_recycled", "segments_taken", "nan_rewards",
            "episodes_written", "restarts", "complete_rows", "free_rows", "taken_rows", "rolled_back")}

    def count_envs(self, state_mask: int) -> int:
        """Number of envs whose state bit ``1 << state`` is in `state_mask` (a snapshot)."""
        out = ffi.new("int32_t *")
        check(lib.segvec_count_envs(self.core, state_mask, out))
        return int(out[0])
