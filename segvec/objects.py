"""The lane of the parts of a space that have no fixed shape (Text, Graph, Sequence, OneOf, user-defined
spaces): they cannot live in the shared block, so they travel pickled and are kept here, in the learner's
process, slot for slot beside the block's arrays.

Workers attach what the learner must store to the env's info message (private keys below), with the
observation slots the C core gave the step; `collect_infos` hands them to the `ObjectStore`.  Actions of
such parts go the other way in a message sent before the envs are dispatched (see the backends).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from segvec.spaces import SpaceLayout

# Keys of an env's info message that carry the pickled lane; never shown to the user.
OBJECTS_KEY = "segvec.objects"      # (observation slot, chain slot or -1, [value per object leaf])
FINAL_OBS_KEY = "segvec.final_obs"  # SAME_STEP: the ended episode's final observation, exactly as returned


class AsGiven:
    """An env's action exactly as the user passed it, sent pickled beside the slot's copy: the action of
    a flat one-element space given as one number per env (gymnasium's vector envs hand the env that number,
    the slot holds it reshaped to the space)."""

    __slots__ = ("action",)

    def __init__(self, action):
        self.action = action

    def __reduce__(self):
        return AsGiven, (self.action,)


def object_array(values) -> np.ndarray:
    """A 1-D numpy object array of `values` (numpy would build a 2-D array of equal-length sequences)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


class ObjectStore:
    """Object leaves of observations and actions, per slot (``[num_segments, horizon + 1]`` and
    ``[num_segments, horizon]`` each, like the block's leaves), plus each env's last SAME_STEP final
    observation.

    Args:
        obs_layout, action_layout: the spaces' layouts (only their ``object_paths`` are kept here).
        num_segments, horizon, num_envs: the block's geometry.
    """

    def __init__(self, obs_layout: SpaceLayout, action_layout: SpaceLayout, num_segments: int, horizon: int,
                 num_envs: int):
        S, T = num_segments, horizon
        self.obs = [np.full((S, T + 1), None, dtype=object) for _ in obs_layout.object_paths]
        self.obs_by_slot = [a.reshape(-1) for a in self.obs]
        self.action = [np.full((S, T), None, dtype=object) for _ in action_layout.object_paths]
        self.action_by_slot = [a.reshape(-1) for a in self.action]
        self.final: list[Any] = [None] * num_envs  # whole final observations (structured), by env

    def receive(self, env_index: int, message: tuple) -> None:
        """Stores an env's object leaves at the slots a worker reported (`OBJECTS_KEY`)."""
        slot, chain, values = message
        for by_slot, value in zip(self.obs_by_slot, values):
            by_slot[slot] = value
            if chain >= 0:
                by_slot[chain] = value

    def current(self, slots: np.ndarray) -> list[tuple]:
        """The object leaves at observation `slots`, each as a tuple over the batch."""
        return [tuple(by_slot[slots].tolist()) for by_slot in self.obs_by_slot]

    def store_actions(self, slots: np.ndarray, actions: dict, env_ids: np.ndarray) -> None:
        """Keeps the object leaves of sent actions (``{env: [values]}``) at their step `slots`."""
        for j, by_slot in enumerate(self.action_by_slot):
            for slot, e in zip(slots.tolist(), env_ids.tolist()):
                by_slot[slot] = actions[e][j]

    def move(self, copy_from: np.ndarray, copy_to: np.ndarray) -> None:
        """Copies slots as the block's observations are copied when rows in progress are closed."""
        for by_slot in self.obs_by_slot:
            by_slot[copy_to] = by_slot[copy_from]
