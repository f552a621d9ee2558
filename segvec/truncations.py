"""Truncation bootstraps under SAME_STEP autoreset, where the final observation of a truncated episode is
not in the row (the next slot holds the reset observation).

With a ``value_fn`` the final observations are evaluated as the envs land and the values go straight into
the block's ``truncation_value``.  Without one, `TruncationLedger` keeps the final observations of the rows
in progress, at most one entry per row (a row that was recycled since replaces its entry), and hands them
to the batch that takes the row, as ``final_obs`` with their positions.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from segvec._core import EnvState, Storage
from segvec.checks import per_env
from segvec.objects import object_array


class TruncationLedger:
    """Final observations of SAME_STEP truncations, noted once per landed step of an env.

    Args:
        storage: the block's views.
        value_fn: ``obs_batch -> values``, or None to keep the observations for the learner.
    """

    def __init__(self, storage: Storage, value_fn: Callable | None):
        self.storage = storage
        self.value_fn = value_fn
        self.horizon = storage.geometry.horizon
        self._rows: dict[int, tuple] = {}  # row -> ((env, start_step), [(t, leaves)])
        self._noted = np.zeros(storage.geometry.num_envs, bool)  # landed step noted before it was received

    def _identity(self, row: int) -> tuple[int, int]:
        return int(self.storage.row_env_id[row]), int(self.storage.row_start_step[row])

    def note(self, env_ids: np.ndarray) -> None:
        """Notes the truncations of the steps that landed for `env_ids` (as the learner receives them)."""
        storage = self.storage
        noted = self._noted[env_ids]
        self._noted[env_ids] = False
        truncated = storage.env_last_truncated[env_ids] & ~storage.env_last_terminated[env_ids] & ~noted
        truncated &= storage.env_last_slot[env_ids] >= 0  # restarted envs carry their truncation value already
        if not truncated.any():
            return
        ids = env_ids[truncated]
        slots = storage.env_last_slot[ids]
        final = [leaf[ids].copy() for leaf in storage.final_obs]
        objects = self._final_objects(ids)
        if self.value_fn is not None:
            structured = storage.obs_layout.structure(final, [tuple(column) for column in zip(*objects)])
            value_shape = storage.geometry.value_shape
            values = per_env(self.value_fn(structured), len(ids), "value_fn's values", value_shape)
            storage.truncation_value.reshape((-1,) + value_shape)[slots] = values
            return
        for i, (row, t) in enumerate(zip((slots // self.horizon).tolist(), (slots % self.horizon).tolist())):
            identity = self._identity(row)
            entry = self._rows.get(row)
            if entry is None or entry[0] != identity:
                entry = self._rows[row] = (identity, [])
            entry[1].append((t, [leaf[i] for leaf in final], objects[i]))

    def _final_objects(self, env_ids: np.ndarray) -> list[list]:
        """Per env, the final observation's parts with no fixed shape (``[]`` when the space has none), as
        the env's info message brought them.  An env noted before the learner received it (a flush, or a
        partial reset of the async face) has None there: its message is still on its way."""
        store, layout = self.storage.objects, self.storage.obs_layout
        if store is None:
            return [[] for _ in env_ids]
        out = []
        for e in env_ids.tolist():
            whole, store.final[e] = store.final[e], None
            out.append(layout.flatten_objects(whole) if whole is not None else [None] * len(layout.object_paths))
        return out

    def note_early(self, env_ids: np.ndarray) -> None:
        """Notes the truncations of landed steps before the learner receives them (their rows may close
        first); the note at receipt then skips them."""
        env_ids = env_ids[~self._noted[env_ids]]
        if len(env_ids):
            self.note(env_ids)
            self._noted[env_ids] = True

    def note_landed(self) -> None:
        """Notes the truncations of envs that landed but were not received yet (before their rows close)."""
        self.note_early(np.flatnonzero(self.storage.env_state == EnvState.READY).astype(np.int32))

    def take(self, rows: np.ndarray) -> tuple:
        """``(final observations [k, ...], positions [k, 2] as (index in rows, t))`` of taken `rows`."""
        storage, layout = self.storage, self.storage.obs_layout
        found, positions = [], []
        for i, row in enumerate(rows.tolist()):
            entry = self._rows.pop(row, None)
            if entry is None or entry[0] != self._identity(row):
                continue
            for t, leaves, objects in entry[1]:
                if t < storage.row_length[row]:
                    found.append((leaves, objects))
                    positions.append((i, t))
        leaves = [np.stack([entry[0][j] for entry in found]) if found else np.zeros((0,) + leaf.shape, leaf.dtype)
                  for j, leaf in enumerate(layout.leaves)]
        objects = [object_array([entry[1][j] for entry in found]) for j in range(len(layout.object_paths))]
        return layout.structure(leaves, objects), np.asarray(positions, np.int64).reshape(-1, 2)
