"""segvec: vectorized gymnasium environments whose workers write straight into shared segment memory.

Start with `make_vec`; the design of the core is in ``native/segvec.h``.
"""
from gymnasium.vector import AutoresetMode

from segvec.errors import (
    AlreadyPendingCallError,
    ClosedEnvironmentError,
    EnvError,
    NoAsyncCallError,
    NotEnoughSegmentsError,
    NotReceivedError,
    SegmentBufferExhausted,
    SegvecError,
    SpaceMismatchError,
    WorkerDied,
)
from segvec.segments import SegmentBatch, TorchSegments, gae
from segvec.vector import SegmentVecEnv, make_vec

__version__ = "0.1.0"

__all__ = [
    "AlreadyPendingCallError",
    "AutoresetMode",
    "ClosedEnvironmentError",
    "EnvError",
    "NoAsyncCallError",
    "NotEnoughSegmentsError",
    "NotReceivedError",
    "SegmentBatch",
    "SegmentBufferExhausted",
    "SegmentVecEnv",
    "SegvecError",
    "SpaceMismatchError",
    "TorchSegments",
    "WorkerDied",
    "gae",
    "make_vec",
]
