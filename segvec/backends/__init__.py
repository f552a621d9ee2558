"""Where envs run.  `Backend` (``base.py``) is the one interface the vector env uses; each backend is one
module: ``serial.py`` (in the learner's process), ``multiprocessing.py`` (worker processes, whose own code
is ``worker.py``), ``engine.py`` (the sub-envs of a batched engine: a gymnasium VectorEnv, EnvPool).  A new
backend subclasses `Backend` and is added to ``BACKENDS`` here."""
from __future__ import annotations

from segvec.backends.base import Backend
from segvec.backends.engine import EngineBackend
from segvec.backends.multiprocessing import MultiprocessingBackend
from segvec.backends.serial import SerialBackend

BACKENDS: dict[str, type[Backend]] = {
    "serial": SerialBackend,
    "multiprocessing": MultiprocessingBackend,
    "engine": EngineBackend,
}

__all__ = ["BACKENDS", "Backend", "EngineBackend", "MultiprocessingBackend", "SerialBackend"]
