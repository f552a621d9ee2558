"""segvec: vectorized gymnasium environments whose workers write straight into shared segment memory.

Start with `make_vec`, `wrap_vector_env` over a batched engine, or `make_multiagent` over PettingZoo envs
(one row stream per agent slot); the design of the core is in
``native/segvec.h``, envs written in C are `segvec.native` (their ABI: ``native/segvec_env.h``).  torch is
optional: ``segvec.TorchSegments`` (from `segvec.torch_utils`) is imported on first use.
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
    SegvecWarning,
    SharedMemorySpaceError,
    SpaceMismatchError,
    WorkerDied,
)
from segvec.replay import ReplayBatch, SegmentReplay
from segvec.segments import SegmentBatch, gae
from segvec.vector import SegmentVecEnv, make_vec, wrap_vector_env
from segvec.multiagent import MultiAgentVecEnv, make_multiagent
from segvec import native  # noqa: E402 - envs written in C; registers segvec/CartPole-c, segvec/SyntheticAtari-c

native.register_envs()

__version__ = "0.1.0"

__all__ = [
    "AlreadyPendingCallError",
    "AutoresetMode",
    "ClosedEnvironmentError",
    "EnvError",
    "MultiAgentVecEnv",
    "NoAsyncCallError",
    "NotEnoughSegmentsError",
    "NotReceivedError",
    "ReplayBatch",
    "SegmentBatch",
    "SegmentBufferExhausted",
    "SegmentReplay",
    "SegmentVecEnv",
    "SegvecError",
    "SegvecWarning",
    "SharedMemorySpaceError",
    "SpaceMismatchError",
    "WorkerDied",
    "gae",
    "make_multiagent",
    "make_vec",
    "native",
    "wrap_vector_env",
]


def __getattr__(name: str):
    if name == "TorchSegments":  # needs torch: imported when first asked for
        from segvec.torch_utils import TorchSegments

        return TorchSegments
    raise AttributeError(f"module 'segvec' has no attribute {name!r}")
