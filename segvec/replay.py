"""Historical replay of whole segment rows: `SegmentReplay` keeps copies of recent complete rows after the
learner used them, and samples rows back, uniformly or by priority, with importance weights.

The replay owns its memory: ``add`` copies whole rows out of the segment buffer, so a row the envs recycle
(or a field the learner overwrites) never changes a replayed one.  A replayed row keeps everything the batch
had (``obs [T + 1]``, ``action``, ``value``, ``logprob``, ``policy_version``, ``next_value`` bootstraps, masks,
step and segment fields), so ``segvec.gae(rows, gamma, lam, rho_clip=..., c_clip=..., target_logprob=...)``
corrects it for the policy that changed since (V-trace-style clipped importance weights).

Prioritized sampling follows Schaul et al., "Prioritized Experience Replay" (2016), per row: a row of priority
``p`` is drawn with probability ``P = (p + eps) ** alpha / sum_j (p_j + eps) ** alpha`` (a sum-tree, in
vectorized numpy: one pass per tree level for a whole batch of draws), and its importance weight is
``w = (size * P) ** -beta``, divided by the largest weight any stored row could have,
``(size * P_min) ** -beta``, so weights lie in ``(0, 1]``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from segvec.segments import minibatch_indices

_ROW_META = ("row_ids", "weights", "replayed")  # what a sampled batch adds to the fields of its rows


def _leaves(value: Any) -> list:
    """The arrays of a (dict/tuple-nested) field, in a fixed order."""
    if isinstance(value, dict):
        return [leaf for key in value for leaf in _leaves(value[key])]
    if isinstance(value, tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _rebuild(template: Any, leaves: list) -> Any:
    """`template`'s structure with its arrays replaced, in order, by `leaves` (consumed from the front)."""
    if isinstance(template, dict):
        return {key: _rebuild(item, leaves) for key, item in template.items()}
    if isinstance(template, tuple):
        return tuple(_rebuild(item, leaves) for item in template)
    return leaves.pop(0)


class SumTree:
    """Sums of non-negative priorities over a binary tree of ``capacity`` leaves (padded to a power of two).

    ``tree[1]`` is the total; node ``i`` holds ``tree[2i] + tree[2i + 1]``; leaf ``j`` is ``tree[size + j]``.
    Updates and draws take whole arrays: one numpy pass per level.
    """

    def __init__(self, capacity: int):
        self.size = 1 << max(0, int(capacity - 1).bit_length())
        self.tree = np.zeros(2 * self.size, np.float64)

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def leaves(self) -> np.ndarray:
        return self.tree[self.size:]

    def set(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Sets leaves `indices` to `values` (the last value wins for a repeated index) and their ancestors."""
        nodes = np.asarray(indices, np.int64) + self.size
        self.tree[nodes] = values
        nodes = np.unique(nodes // 2)
        while nodes[0] >= 1:
            self.tree[nodes] = self.tree[2 * nodes] + self.tree[2 * nodes + 1]
            if nodes[0] == 1:
                break
            nodes = np.unique(nodes // 2)

    def find(self, targets: np.ndarray) -> np.ndarray:
        """The leaf whose prefix-sum interval ``[sum of leaves before it, + its own)`` holds each target
        (targets in ``[0, total)``); never a leaf of priority 0."""
        targets = np.minimum(np.asarray(targets, np.float64), np.nextafter(self.total, 0.0))
        nodes = np.ones(len(targets), np.int64)
        for _ in range(self.size.bit_length() - 1):  # one pass per level
            left = self.tree[2 * nodes]
            right = targets >= left
            targets = np.where(right, targets - left, targets)
            nodes = 2 * nodes + right
        leaves = nodes - self.size
        zero = self.tree[nodes] <= 0
        if zero.any():  # float rounding at an interval's edge: the nearest leaf before it that has a priority
            nonzero = np.flatnonzero(self.leaves() > 0)
            before = np.clip(np.searchsorted(nonzero, leaves[zero], side="right") - 1, 0, len(nonzero) - 1)
            leaves[zero] = nonzero[before]
        return leaves


class ReplayBatch:
    """Rows sampled from a `SegmentReplay` (or mixed with fresh ones by `SegmentReplay.mix`): the fields of
    a `SegmentBatch` as numpy arrays the batch owns, shaped ``[n, ...]`` (``obs [n, T + 1, ...]``), plus:

    Attributes:
        row_ids: ``[n]`` int64 ids of the replay's rows (for `SegmentReplay.update_priorities`); -1 for fresh
            rows of a `SegmentReplay.mix`.
        weights: ``[n]`` float32 importance weights (1 for uniform sampling and for fresh rows).
        replayed: ``[n]`` bool, True for rows that came from the replay.

    ``segvec.gae`` takes it as it takes a batch.  Nothing of it is shared with the segment buffer or with the
    replay: change it freely.
    """

    def __init__(self, fields: dict, row_ids: np.ndarray, weights: np.ndarray, replayed: np.ndarray):
        self._names = tuple(fields)
        self.__dict__.update(fields)
        self.row_ids, self.weights, self.replayed = row_ids, weights, replayed

    def __len__(self) -> int:
        return len(self.row_ids)

    def __repr__(self) -> str:
        return f"ReplayBatch({len(self)} rows, {int(self.replayed.sum())} replayed)"

    def fields(self) -> list[str]:
        """Names of the rows' fields (those of the batches added), without ``row_ids/weights/replayed``."""
        return list(self._names)

    def rows_view(self, indices) -> "ReplayBatch":
        """The rows at `indices` (ints, a bool mask or a slice), in that order, as a `ReplayBatch` (copies)
        whose ``indices`` attribute holds their positions in this one."""
        positions = np.arange(len(self))[indices]
        if positions.ndim != 1:
            raise ValueError(f"indices must select rows (a 1-D index), got shape {positions.shape}")
        fields = {name: _rebuild(getattr(self, name), [leaf[positions] for leaf in _leaves(getattr(self, name))])
                  for name in self._names}
        view = ReplayBatch(fields, self.row_ids[positions], self.weights[positions], self.replayed[positions])
        view.indices = positions
        return view

    def minibatches(self, num_minibatches: int, generator=None, shuffle: bool = True):
        """One epoch of `num_minibatches` minibatches of whole rows, as `SegmentBatch.minibatches` makes them
        (same arguments, same shuffle for the same generator): `rows_view` of each, ``indices`` ascending.

        Raises:
            ValueError: `num_minibatches` out of range.
        """
        return (self.rows_view(part) for part in minibatch_indices(len(self), num_minibatches, generator, shuffle))

    def to_torch(self, device=None, fields=None):
        """The fields and ``row_ids/weights/replayed`` (or only `fields`) as torch tensors on `device`
        (`segvec.TorchSegments`)."""
        import torch

        from segvec.torch_utils import TorchSegments, _map

        names = self._names + _ROW_META if fields is None else tuple(fields)
        return TorchSegments({name: _map(getattr(self, name), lambda a: torch.as_tensor(a, device=device))
                              for name in names})


class SegmentReplay:
    """Copies of recent complete segment rows, sampled back uniformly or by priority.

    Rows are kept in a ring of `capacity` rows: adding to a full replay evicts the oldest rows first (FIFO).
    Each row added gets an id (0, 1, 2, ... in the order rows were added, never reused); the row with id
    ``i`` is stored while ``i >= added - capacity``.

    Args:
        capacity: rows kept, >= 1.
        prioritized: False: rows are drawn uniformly (weights 1).  True: drawn with probability
            ``(p + eps) ** alpha / sum``, ``p`` the row's priority (see the module docstring).
        alpha, beta, eps: prioritization exponent (0: uniform), importance-weight exponent (0: no
            correction, 1: full), and the priority floor.
        seed: the sampler's seed (or a numpy Generator).

    Example:
        >>> import numpy as np, segvec
        >>> envs = segvec.make_vec("CartPole-v1", num_envs=2, backend="serial", horizon=4)
        >>> replay = segvec.SegmentReplay(capacity=8, prioritized=True, seed=0)
        >>> obs, _ = envs.reset(seed=0)
        >>> for _ in range(5):
        ...     obs = envs.step(np.zeros(2, np.int64), value=np.zeros(2, np.float32))[0]
        >>> with envs.take_segments() as batch:
        ...     ids = replay.add(batch, priority=np.array([1.0, 3.0]))
        >>> rows = replay.sample(4)
        >>> rows.obs.shape, rows.weights.shape, len(replay)
        ((4, 5, 4), (4,), 2)
        >>> replay.update_priorities(rows.row_ids, np.ones(4))
        >>> envs.close()
    """

    capacity: int
    prioritized: bool

    def __init__(self, capacity: int, prioritized: bool = False, alpha: float = 0.6, beta: float = 0.4,
                 eps: float = 1e-6, seed=None):
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        for name, value in (("alpha", alpha), ("beta", beta), ("eps", eps)):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.capacity, self.prioritized = int(capacity), bool(prioritized)
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.added = 0  # rows ever added: the next row's id
        self._template: dict | None = None  # field name -> its structure (None leaves), set by the first add
        self._storage: dict[str, list[np.ndarray]] = {}  # field name -> its leaves, [capacity, ...] each
        self._tree = SumTree(self.capacity) if self.prioritized else None
        self._max_priority = 1.0

    def __len__(self) -> int:
        """Rows stored now (``min(added, capacity)``)."""
        return min(self.added, self.capacity)

    # ---- adding -----------------------------------------------------------------------------------
    def add(self, batch, priority=None) -> np.ndarray:
        """Copies every row of `batch` (a `SegmentBatch`, its `rows_view`/`minibatches`, or a `ReplayBatch`)
        into the replay, evicting the oldest rows when full.  Call it before the batch is released.

        Args:
            batch: the rows; their fields must match those of the first batch added (names, shapes, dtypes).
            priority: ``[n]`` priorities (>= 0) of the rows, e.g. their mean ``|advantage|``; default the
                largest priority given so far (1 at first), so new rows are drawn soon.

        Returns:
            ``[n]`` int64 ids of the rows.

        Raises:
            ValueError: fields that differ from the first batch's, a priority of the wrong size or negative,
                or SAME_STEP truncation bootstraps not filled yet (call ``batch.set_truncation_values``).
        """
        fields = self._fields_of(batch)
        n = len(batch)
        priority = self._check_priority(priority, n)
        ids = np.arange(self.added, self.added + n, dtype=np.int64)
        if n == 0:
            return ids
        if n > self.capacity:  # only the last `capacity` rows would survive: copy just those
            keep = slice(n - self.capacity, n)
            fields = {name: _rebuild(value, [leaf[keep] for leaf in _leaves(value)]) for name, value in fields.items()}
            priority = None if priority is None else priority[keep]
            self.added += n - self.capacity
            return np.concatenate([ids[:n - self.capacity], self._store(fields, priority)])
        return self._store(fields, priority)

    def _store(self, fields: dict, priority: np.ndarray | None) -> np.ndarray:
        n = len(fields["reward"])
        ids = np.arange(self.added, self.added + n, dtype=np.int64)
        slots = ids % self.capacity
        for name, value in fields.items():
            for stored, leaf in zip(self._storage[name], _leaves(value)):
                stored[slots] = leaf  # a copy: the replay owns its memory
        self.added += n
        if self._tree is not None:
            if priority is None:
                priority = np.full(n, self._max_priority)
            self._set_priorities(slots, priority)
        return ids

    def _fields_of(self, batch) -> dict:
        """The batch's fields (``{name: value}``), checked against the replay's; storage allocated at first."""
        final = getattr(batch, "final_obs", None)
        if final is not None and len(final[1]):
            rows, steps = final[1][:, 0], final[1][:, 1]
            if np.isnan(np.asarray(batch.next_value)[rows, steps]).any():
                raise ValueError("the batch has SAME_STEP truncations whose bootstrap is not known (next_value NaN "
                                 "at batch.final_obs): call batch.set_truncation_values(...) before adding it, or "
                                 "give the envs a value_fn")
        names = [name for name in batch.fields() if name not in _ROW_META]
        fields = {name: getattr(batch, name) for name in names}
        if self._template is None:
            # (the structure only: a reference to the batch's arrays would keep views of the segment block alive)
            self._template = {name: _rebuild(value, [None] * len(_leaves(value))) for name, value in fields.items()}
            self._storage = {name: [np.empty((self.capacity,) + np.shape(leaf)[1:], np.asarray(leaf).dtype)
                                    for leaf in _leaves(value)] for name, value in fields.items()}
            return fields
        if set(names) != set(self._template):
            raise ValueError(f"the batch's fields {sorted(names)} differ from the replay's {sorted(self._template)}")
        for name, value in fields.items():
            leaves, stored = _leaves(value), self._storage[name]
            if len(leaves) != len(stored) or any(np.shape(a)[1:] != b.shape[1:] or np.asarray(a).dtype != b.dtype
                                                 for a, b in zip(leaves, stored)):
                raise ValueError(f"field {name!r} of the batch differs in structure, shape or dtype from the rows "
                                 f"the replay holds ({[(b.shape[1:], b.dtype) for b in stored]})")
        return fields

    # ---- priorities ---------------------------------------------------------------------------------
    def _check_priority(self, priority, n: int) -> np.ndarray | None:
        if priority is None:
            return None
        priority = np.asarray(priority, np.float64).reshape(-1)
        if len(priority) != n:
            raise ValueError(f"expected {n} priorities, got {len(priority)}")
        if not np.isfinite(priority).all() or (priority < 0).any():
            raise ValueError("priorities must be finite and >= 0")
        return priority

    def _set_priorities(self, slots: np.ndarray, priority: np.ndarray) -> None:
        self._max_priority = max(self._max_priority, float(priority.max()))
        self._tree.set(slots, (priority + self.eps) ** self.alpha)

    def update_priorities(self, row_ids, priority) -> None:
        """Sets the priorities of rows `row_ids` (e.g. their new mean ``|advantage|`` after training on them).

        Ids of rows evicted since they were sampled are skipped; with uniform sampling this does nothing.

        Raises:
            ValueError: sizes differ, a priority is negative or not finite, or an id was never added.
        """
        row_ids = np.asarray(row_ids, np.int64).reshape(-1)
        priority = self._check_priority(priority, len(row_ids))
        if len(row_ids) and (row_ids.min() < 0 or row_ids.max() >= self.added):
            raise ValueError(f"row ids must be in [0, {self.added}) (ids of rows added), got {row_ids}")
        if self._tree is None:
            return
        live = row_ids >= self.added - self.capacity
        if live.any():
            self._set_priorities(row_ids[live] % self.capacity, priority[live])

    def probabilities(self) -> np.ndarray:
        """``[len(self)]`` the probability of drawing each stored row, in slot order (slot = id % capacity)."""
        size = len(self)
        if self._tree is None:
            return np.full(size, 1.0 / size) if size else np.zeros(0)
        leaves = self._tree.leaves()[:size]
        return leaves / leaves.sum()

    # ---- sampling -----------------------------------------------------------------------------------
    def sample(self, n: int) -> ReplayBatch:
        """Draws `n` rows (with replacement) and copies them into a `ReplayBatch` with their importance weights.

        Raises:
            ValueError: the replay is empty, or `n` is not an int >= 0.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        size = len(self)
        if not size:
            raise ValueError("sample() from an empty replay: add rows first")
        if self._tree is None:
            slots = self.rng.integers(0, size, n)
            weights = np.ones(n, np.float32)
        else:
            slots = self._tree.find(self.rng.random(n) * self._tree.total)
            probability = self._tree.leaves()[slots] / self._tree.total
            smallest = self._tree.leaves()[:size].min() / self._tree.total
            weights = ((size * probability) ** -self.beta / (size * smallest) ** -self.beta).astype(np.float32)
        ids = self._ids_of(slots)
        fields = {name: _rebuild(self._template[name], [leaf[slots] for leaf in self._storage[name]])
                  for name in self._template}
        return ReplayBatch(fields, ids, weights, np.ones(n, bool))

    def _ids_of(self, slots: np.ndarray) -> np.ndarray:
        """The ids of the rows stored in `slots`."""
        newest = self.added - 1
        return newest - (newest - slots) % self.capacity

    def mix(self, batch, replay_ratio: float) -> ReplayBatch:
        """The rows of `batch` (copied), followed by rows drawn from the replay, so that a fraction
        `replay_ratio` of the result is replayed: ``round(n * replay_ratio / (1 - replay_ratio))`` rows for
        `batch`'s ``n`` (none while the replay is empty).  Fresh rows have ``row_ids`` -1, weight 1 and
        ``replayed`` False.  `batch` is not added: `add` it yourself (after the mix, so it is not drawn back
        at once).

        Raises:
            ValueError: `replay_ratio` outside ``[0, 1)``, or fields that differ from the replay's.
        """
        if not 0.0 <= replay_ratio < 1.0:
            raise ValueError(f"replay_ratio must be in [0, 1), got {replay_ratio!r}")
        fresh = self._fields_of(batch)
        n = len(batch)
        k = int(round(n * replay_ratio / (1.0 - replay_ratio))) if len(self) else 0
        replayed = self.sample(k) if k else None
        fields = {}
        for name, value in fresh.items():
            leaves = [np.array(leaf) for leaf in _leaves(value)]  # copies
            if replayed is not None:
                leaves = [np.concatenate([a, b]) for a, b in zip(leaves, _leaves(getattr(replayed, name)))]
            fields[name] = _rebuild(value, leaves)
        empty = ReplayBatch({}, np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, bool))
        other = replayed if replayed is not None else empty
        return ReplayBatch(fields, np.concatenate([np.full(n, -1, np.int64), other.row_ids]),
                           np.concatenate([np.ones(n, np.float32), other.weights]),
                           np.concatenate([np.zeros(n, bool), other.replayed]))
