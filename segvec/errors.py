"""Exceptions and warnings of segvec.  Gymnasium's own (AlreadyPendingCallError, NoAsyncCallError,
ClosedEnvironmentError) and ``multiprocessing.TimeoutError`` are raised where gymnasium raises them."""
from __future__ import annotations

import os
import sys
import warnings

from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError

__all__ = [
    "AlreadyPendingCallError",
    "ClosedEnvironmentError",
    "EnvError",
    "NoAsyncCallError",
    "NotEnoughSegmentsError",
    "NotReceivedError",
    "SegmentBufferExhausted",
    "SegvecError",
    "SegvecWarning",
    "SharedMemorySpaceError",
    "SpaceMismatchError",
    "WorkerDied",
    "make_env_error",
    "warn",
]


class SegvecError(RuntimeError):
    """Base class of segvec's own runtime errors."""


class EnvError(SegvecError):
    """An env raised in ``reset``/``step``/``__init__``/a ``call``.

    Raised as a subclass of both ``EnvError`` and the original exception's type where possible, so
    ``except ValueError`` still catches a ValueError raised by an env.

    Attributes:
        env_index: index of the env in the vector env; -1 when a batched engine as a whole raised
            (`segvec.wrap_vector_env`), and then ``failed_envs`` lists the envs its call failed.
        worker_traceback: the traceback formatted in the process that ran the env.
        original_type: the original exception's type.
    """

    env_index: int
    worker_traceback: str
    original_type: type

    def __init__(self, message: str, env_index: int = -1, worker_traceback: str = "",
                 original_type: type | None = None):
        super().__init__(message)
        self.env_index = env_index
        self.worker_traceback = worker_traceback
        self.original_type = original_type or Exception

    def __str__(self) -> str:
        text = BaseException.__str__(self)  # not the original type's (KeyError's would quote the message)
        if self.worker_traceback:
            text += "\n\nTraceback in the env's process:\n" + self.worker_traceback.rstrip()
        return text


_ENV_ERROR_TYPES: dict[type, type] = {}


def make_env_error(original: BaseException | type, env_index: int, action: str, worker_traceback: str,
                   detail: str | None = None, source: str | None = None) -> EnvError:
    """Builds an EnvError for an exception of `original`'s type raised by env `env_index` in `action`.

    `source` names what raised when it is not one env (a batched engine: ``env_index`` is then -1)."""
    original_type = original if isinstance(original, type) else type(original)
    detail = detail if detail is not None else f"{original_type.__name__}: {original}"
    message = f"{source or f'env {env_index}'} raised in {action}: {detail}"
    cls = _ENV_ERROR_TYPES.get(original_type)
    if cls is None:
        cls = EnvError
        if issubclass(original_type, Exception) and original_type not in (Exception, EnvError):
            try:  # some types cannot be mixed in (C layouts) or built from one message
                cls = type(f"EnvError[{original_type.__name__}]", (EnvError, original_type), {})
                cls(message)
            except Exception:  # noqa: BLE001 - fall back to a plain EnvError
                cls = EnvError
        _ENV_ERROR_TYPES[original_type] = cls
    # Built through the class's own __new__ (OSError and its subclasses refuse any other).
    error = cls(message)
    error.env_index, error.worker_traceback, error.original_type = env_index, worker_traceback, original_type
    return error


class WorkerDied(SegvecError):
    """A worker process exited (crash, SIGKILL, OOM kill) while the learner needed it.

    Attributes:
        worker_index: which worker; env_indices: the envs it ran; exitcode: its exit code (negative: signal).
    """

    def __init__(self, message: str, worker_index: int = -1, env_indices: tuple = (), exitcode=None):
        super().__init__(message)
        self.worker_index = worker_index
        self.env_indices = tuple(env_indices)
        self.exitcode = exitcode


class SpaceMismatchError(ValueError, RuntimeError):
    """The envs of one vector env disagree on their observation or action space."""


class SharedMemorySpaceError(TypeError, ValueError):
    """A space with no fixed shape (Text, Graph, Sequence, OneOf, a user-defined Space) under
    ``shared_memory=True``; ``shared_memory=False`` sends such parts pickled."""


class SegmentBufferExhausted(SegvecError):
    """Every segment row is taken by the learner and none released: release batches or raise num_segments."""


class NotReceivedError(ValueError):
    """``send`` named an env the learner has not received since its last send (or named one twice)."""


class NotEnoughSegmentsError(ValueError):
    """``take_segments(n)`` asked for more complete segments than ``segments_ready``."""


class SegvecWarning(RuntimeWarning):
    """Something works, but not as the user probably meant: a setting that wastes the machine, data the
    learner loses, advantages that come out NaN.  Each message starts with ``segvec:`` and says how to
    fix the cause; silence them with ``warnings.filterwarnings("ignore", category=segvec.SegvecWarning)``
    (add ``message=`` to silence one kind)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = SegvecWarning) -> None:
    """Issues a warning attributed to the first caller outside the segvec package (the user's line)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
