"""How gymnasium spaces are laid out in flat shared memory.

A space is flattened into *leaves*: one fixed-shape, fixed-dtype array per Box, Discrete, MultiDiscrete
or MultiBinary found in it (Dict and Tuple nest).  Each leaf gets its own buffer, so a batch of leaves is
an ordinary strided numpy array and a structured observation comes back as a dict/tuple of views.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from gymnasium import spaces


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
    """The leaves of a space and the way back from leaf arrays to the space's natural structure.

    Args:
        space: a Box, Discrete, MultiDiscrete, MultiBinary, or a Dict/Tuple nesting of these.
        role: "observation" or "action", used in error messages.

    Raises:
        TypeError: the space (or a part of it) cannot live in shared memory; the message names it.
    """

    def __init__(self, space: spaces.Space, role: str = "observation"):
        self.space = space
        self.role = role
        self.leaves: list[Leaf] = []
        self._collect(space, ())

    def _collect(self, space: spaces.Space, path: tuple) -> None:
        if isinstance(space, spaces.Dict):
            for key, sub in space.spaces.items():
                self._collect(sub, path + (key,))
        elif isinstance(space, spaces.Tuple):
            for index, sub in enumerate(space.spaces):
                self._collect(sub, path + (index,))
        elif isinstance(space, (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)):
            if space.dtype is None or space.shape is None:
                raise TypeError(f"{self.role} space {space} has no fixed dtype/shape; segvec cannot place it.")
            self.leaves.append(Leaf(path, tuple(space.shape), np.dtype(space.dtype)))
        else:
            where = f" at {'/'.join(map(str, path))}" if path else ""
            raise TypeError(
                f"segvec cannot place the {self.role} space {type(space).__name__}{where} ({space}) in shared "
                "memory: supported are Box, Discrete, MultiDiscrete, MultiBinary and Dict/Tuple of them. "
                + ("Wrap the env to flatten it (e.g. gymnasium.wrappers.FlattenObservation)." if self.role != "action"
                   else "Wrap the env in a gymnasium.ActionWrapper whose action space is one of these (e.g. a "
                   "Discrete index into the actions the env takes) and whose action() turns it into the env's.")
            )

    @property
    def is_flat(self) -> bool:
        """True when the space is a single leaf (no Dict/Tuple)."""
        return len(self.leaves) == 1 and self.leaves[0].path == ()

    def flatten(self, value: Any) -> list:
        """Returns the leaf values of one element (or batch) of the space, in leaf order."""
        if self.is_flat:
            return [value]
        out = []
        for leaf in self.leaves:
            item = value
            for key in leaf.path:
                item = item[key]
            out.append(item)
        return out

    def structure(self, arrays: Sequence[np.ndarray]) -> Any:
        """Returns leaf arrays arranged in the space's natural structure (dict/tuple nesting)."""
        if self.is_flat:
            return arrays[0]
        return _build(self.space, iter(arrays))


def _build(space: spaces.Space, arrays) -> Any:
    if isinstance(space, spaces.Dict):
        return {key: _build(sub, arrays) for key, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(_build(sub, arrays) for sub in space.spaces)
    return next(arrays)


def spaces_equal(a: spaces.Space, b: spaces.Space) -> bool:
    """Space equality that also compares dtypes and shapes of Discrete-like spaces."""
    return a == b and getattr(a, "dtype", None) == getattr(b, "dtype", None)
