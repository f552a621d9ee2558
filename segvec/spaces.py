"""How gymnasium spaces are laid out in flat shared memory, and which parts of them cannot be.

A space is flattened into *leaves*: one fixed-shape, fixed-dtype array per Box, Discrete, MultiDiscrete
or MultiBinary found in it (Dict and Tuple nest).  Each leaf gets its own buffer, so a batch of leaves is
an ordinary strided numpy array and a structured observation comes back as a dict/tuple of views.

Parts with no fixed shape (Text, Graph, Sequence, OneOf, user-defined Space subclasses) are *object
leaves*: they travel pickled and live as Python objects in the learner's process (``segvec/objects.py``).
A batch of an object leaf is a tuple of ``n`` values, as gymnasium batches such spaces.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from gymnasium import spaces

from segvec.errors import SharedMemorySpaceError

FIXED_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
DYNAMIC_SPACES = (spaces.Text, spaces.Graph, spaces.Sequence, spaces.OneOf)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One fixed-shape array inside a (possibly nested) space.

    Attributes:
        path: keys/indices from the root space to this leaf, e.g. ``("camera", 0)``; ``()`` for a flat space.
        shape: shape of one element.
        dtype: numpy dtype of one element.
    """

    path: tuple
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class SpaceLayout:
    """The leaves of a space and the way back from leaf values to the space's natural structure.

    Args:
        space: any gymnasium space.  Its fixed-size parts become `leaves`, the others `object_paths`.
        role: "observation" or "action", used in error messages.

    Attributes:
        leaves: the fixed-shape arrays, in the space's order (they live in shared memory).
        object_paths: paths of the parts with no fixed shape, in the space's order (they travel pickled).
    """

    def __init__(self, space: spaces.Space, role: str = "observation"):
        self.space = space
        self.role = role
        self.leaves: list[Leaf] = []
        self.object_paths: list[tuple] = []
        self._object_spaces: list[spaces.Space] = []
        self._collect(space, ())

    def _collect(self, space: spaces.Space, path: tuple) -> None:
        if isinstance(space, spaces.Dict):
            for key, sub in space.spaces.items():
                self._collect(sub, path + (key,))
        elif isinstance(space, spaces.Tuple):
            for index, sub in enumerate(space.spaces):
                self._collect(sub, path + (index,))
        elif isinstance(space, FIXED_SPACES) and space.dtype is not None and space.shape is not None:
            self.leaves.append(Leaf(path, tuple(space.shape), np.dtype(space.dtype)))
        else:
            self.object_paths.append(path)
            self._object_spaces.append(space)

    @property
    def has_objects(self) -> bool:
        """True when a part of the space has no fixed shape (it travels pickled)."""
        return bool(self.object_paths)

    def require_shared_memory(self) -> None:
        """Raises `SharedMemorySpaceError` naming the first part with no fixed shape (shared_memory=True)."""
        if not self.object_paths:
            return
        path, space = self.object_paths[0], self._object_spaces[0]
        where = f" (at {'/'.join(map(str, path))} of the {self.role} space)" if path else ""
        if isinstance(space, DYNAMIC_SPACES):
            detail = f"As {space} has a dynamic shape so its not possible to make a static shared memory."
        else:
            detail = (f"The {self.role} space {type(space).__name__} is not one of gymnasium's fixed-size spaces "
                      "(Box, Discrete, MultiDiscrete, MultiBinary, and Dict/Tuple of them), so it cannot live in "
                      "static shared memory.")
        advice = ("Pass shared_memory=False to send such parts pickled (they are kept as Python objects in the "
                  "learner's process: slower, but every other feature works)")
        if self.role == "observation":
            advice += ", or flatten them with an observation wrapper (e.g. gymnasium.wrappers.FlattenObservation)"
        raise SharedMemorySpaceError(f"{detail}{where} {advice}.")

    @property
    def is_flat(self) -> bool:
        """True when the space is a single fixed leaf (no Dict/Tuple, nothing pickled)."""
        return len(self.leaves) == 1 and self.leaves[0].path == () and not self.object_paths

    def flatten(self, value: Any) -> list:
        """Returns the fixed leaf values of one element (or batch) of the space, in leaf order."""
        if self.is_flat:
            return [value]
        return [_at(value, leaf.path) for leaf in self.leaves]

    def flatten_objects(self, value: Any) -> list:
        """Returns the values of the object leaves of one element (or batch), in order."""
        return [_at(value, path) for path in self.object_paths]

    def structure(self, arrays: Sequence[np.ndarray], objects: Sequence = ()) -> Any:
        """Returns leaf arrays (and object-leaf values) arranged in the space's natural structure."""
        if self.is_flat:
            return arrays[0]
        return _build(self.space, iter(arrays), iter(objects), self)


def _at(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


def _build(space: spaces.Space, arrays, objects, layout: SpaceLayout, path: tuple = ()) -> Any:
    if isinstance(space, spaces.Dict):
        return {key: _build(sub, arrays, objects, layout, path + (key,)) for key, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(_build(sub, arrays, objects, layout, path + (i,)) for i, sub in enumerate(space.spaces))
    if path in layout.object_paths:
        return next(objects)
    return next(arrays)


def spaces_equal(a: spaces.Space, b: spaces.Space) -> bool:
    """Space equality that also compares dtypes and shapes of Discrete-like spaces."""
    return a == b and getattr(a, "dtype", None) == getattr(b, "dtype", None)
