"""Completed segments as the learner sees them: `SegmentBatch` (and `SegmentRows`, a selection of its rows),
and `gae` over them (numpy or torch).

A batch is a set of rows of the segment buffer, each ``horizon`` consecutive steps of one env.  It holds the
rows' indices and reads the block's own arrays: taking rows copies nothing.  Fields are built on first
access and kept: when the rows sit next to each other in the buffer (the usual case for synchronous rollouts
taken in multiples of ``num_envs``: rows are recycled in FIFO order) every field is a view of shared memory;
otherwise a field is gathered (one copy of whole rows) the first time it is read.  A trainer that works on
minibatches of rows (`SegmentRows.minibatches`, `SegmentRows.rows_view`) gathers each minibatch from the block,
at minibatch size, and never pays a gather of the whole batch; ``to_torch(device)`` copies runs of adjacent
rows straight from the block into one device tensor.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
from gymnasium.vector import AutoresetMode

from segvec.advantages import gae_numpy

if TYPE_CHECKING:
    from segvec.torch_utils import TorchSegments

_STEP_FIELDS = ("value", "logprob", "reward", "terminated", "truncated", "episode_start", "mask", "policy_version")
_ROW_FIELDS = (("length", "row_length"), ("env_id", "row_env_id"), ("start_step", "row_start_step"))


class _Field:
    """Where one field of a batch lives: arrays of the block whose first axis is the buffer row.

    Attributes:
        leaves: the block's arrays (``[S, ...]``), one per leaf of the space (one for plain fields).
        objects: the learner's object arrays (``[S, ...]``) of the parts of a space with no fixed shape.
        layout: the `SpaceLayout` that arranges leaves and objects (obs, action), else None.
        copy: always hand out a copy, never a view (the per-row fields ``length, env_id, start_step``).
    """

    __slots__ = ("name", "leaves", "objects", "layout", "copy")

    def __init__(self, name: str, leaves: list, objects: list = (), layout=None, copy: bool = False):
        self.name, self.leaves, self.objects, self.layout, self.copy = name, list(leaves), list(objects), layout, copy


class _Plan:
    """Every field of a batch, in the order of ``fields()``, and where it lives; built once per block."""

    def __init__(self, storage):
        objects = self.objects = storage.objects

        def tree(name, leaves, object_leaves, layout):  # a flat space is one plain array
            if layout.is_flat and not len(object_leaves):
                return _Field(name, leaves)
            return _Field(name, leaves, object_leaves, layout)

        fields = [
            tree("obs", storage.obs, objects.obs if objects is not None else (), storage.obs_layout),
            tree("action", storage.action, objects.action if objects is not None else (), storage.action_layout),
            *(_Field(name, [getattr(storage, name)]) for name in _STEP_FIELDS),
            *(_Field(name, [getattr(storage, source)], copy=True) for name, source in _ROW_FIELDS),
            *(_Field(name, [array]) for name, array in storage.step_fields.items()),
            *(_Field(name, [array]) for name, array in storage.segment_fields.items()),
            _Field("next_value", [storage.next_value]),  # filled for the taken rows by SegmentBatch
        ]
        self.fields = {field.name: field for field in fields}
        self.names = tuple(self.fields)


def plan_of(storage) -> _Plan:
    """The field plan of a block (kept on the storage as ``batch_plan``, rebuilt if its object store changed)."""
    plan = getattr(storage, "batch_plan", None)
    if plan is None or plan.objects is not storage.objects:
        plan = storage.batch_plan = _Plan(storage)
    return plan


class _Selection:
    """Buffer rows in the order of a batch, and their runs of adjacent rows."""

    __slots__ = ("rows", "slice", "_runs", "_index")

    def __init__(self, rows: np.ndarray, ascending_unique: bool = False):
        self.rows = rows
        self._runs = self._index = None
        n = len(rows)
        self.slice: slice | None = slice(0, 0)
        if n:
            first = int(rows[0])
            if ascending_unique:  # (a take: sorted, each row once) one comparison says it
                adjacent = int(rows[-1]) - first + 1 == n
            else:
                adjacent = n == 1 or bool((np.diff(rows) == 1).all())
            self.slice = slice(first, first + n) if adjacent else None

    @property
    def runs(self) -> np.ndarray:
        """``[k, 3]`` int64: (position in the batch, first buffer row, number of rows) of each run."""
        if self._runs is None:
            rows, n = self.rows, len(self.rows)
            if self.slice is not None:
                runs = np.array([[0, self.slice.start, n]] if n else [], np.int64).reshape(-1, 3)
            else:
                breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
                starts, ends = [0] + breaks, breaks + [n]
                runs = np.array([(start, int(rows[start]), end - start) for start, end in zip(starts, ends)],
                                np.int64).reshape(-1, 3)
            runs.flags.writeable = False
            self._runs = runs
        return self._runs

    def gather(self, array: np.ndarray) -> np.ndarray:
        """`array`'s rows of the selection: a view when they are one run, else one gather (a copy)."""
        if self.slice is not None:
            return array[self.slice]
        if self._index is None:
            self._index = self.rows.astype(np.intp)  # (numpy indexes with intp: converted once, not per field)
        return array[self._index]


def _index(value: Any, index: np.ndarray) -> Any:
    """``value[index]`` for every array of a (dict/tuple-nested) value."""
    if isinstance(value, dict):
        return {key: _index(item, index) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_index(item, index) for item in value)
    return value[index]


def _permutation(n: int, generator) -> np.ndarray:
    """A random permutation of ``range(n)`` from a numpy Generator or RandomState, a torch Generator, a seed,
    or (None) fresh entropy."""
    if generator is None or isinstance(generator, (int, np.integer)):
        return np.random.default_rng(generator).permutation(n)
    if type(generator).__module__.startswith("torch"):
        import torch

        return torch.randperm(n, generator=generator).numpy()
    if hasattr(generator, "permutation"):
        return np.asarray(generator.permutation(n))
    raise TypeError(f"generator must be None, an int seed, a numpy Generator or a torch Generator, "
                    f"got {type(generator).__name__}")


def minibatch_indices(n: int, num_minibatches: int, generator=None, shuffle: bool = True) -> list[np.ndarray]:
    """`num_minibatches` sorted index arrays that split ``range(n)`` (after a shuffle by `generator`, see
    `SegmentRows.minibatches`), of ``n // num_minibatches`` or one more each.

    Raises:
        ValueError: `num_minibatches` is not an int in ``[1, max(n, 1)]``.
    """
    if (isinstance(num_minibatches, bool) or not isinstance(num_minibatches, (int, np.integer))
            or not 1 <= num_minibatches <= max(n, 1)):
        raise ValueError(f"num_minibatches must be an int in [1, {max(n, 1)}], got {num_minibatches!r}")
    order = _permutation(n, generator) if shuffle else np.arange(n)
    return [np.sort(part) for part in np.array_split(order, int(num_minibatches))]


class SegmentRows:
    """Segment rows of a taken batch, read from the block's own arrays (`SegmentBatch` is one; a selection
    of a batch's rows, from `rows_view` or `minibatches`, is another).

    Fields are the attributes listed by `SegmentBatch` (``obs``, ``action``, ``reward``, ..., ``next_value``,
    ``final_obs``), shaped ``[len(self), ...]``.  Each is built when first read and then kept: a view of
    shared memory when the rows are one run of adjacent buffer rows (``zero_copy``), else a gather of those
    rows (one copy, at the size of this selection).  ``length``, ``env_id`` and ``start_step`` are always
    copies.  Reading a field after the batch was released raises RuntimeError.

    Attributes:
        rows: ``[n]`` the buffer rows, in this selection's order.
        zero_copy: True when the rows are one run of adjacent buffer rows (every field is a view).
        indices: ``[n]`` positions of the rows in the batch (or selection) they were selected from
            (selections only).
    """

    def __init__(self, storage, plan: _Plan, selection: _Selection, owner: "SegmentBatch | None",
                 parent: "SegmentRows | None" = None, indices: np.ndarray | None = None):
        self._storage = storage
        self._plan = plan
        self._selection = selection
        self._owner = owner  # the batch whose release ends these rows (None: this is that batch)
        self._parent = parent
        self._data: dict[str, Any] = {}
        self.rows = selection.rows
        self.zero_copy = len(selection.rows) > 0 and selection.slice is not None
        if indices is not None:
            self.indices = indices

    # ---- access ---------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        data = self.__dict__.get("_data")
        if data is None:
            raise AttributeError(name)
        value = data.get(name)
        if value is None:
            if name not in self._plan.fields and name != "final_obs":
                raise AttributeError(f"{type(self).__name__} has no field {name!r}")
            self._check_live(name)
            value = data[name] = self._load(name)
            return value
        self._check_live(name)
        return value

    def _load(self, name: str):
        """Builds field `name` from the block (views for one run, else a gather)."""
        if name == "final_obs":
            return self._load_final_obs()
        field, selection = self._plan.fields[name], self._selection
        if field.layout is None:
            array = selection.gather(field.leaves[0])
            return array.copy() if field.copy and selection.slice is not None else array
        return field.layout.structure([selection.gather(leaf) for leaf in field.leaves],
                                      [selection.gather(leaf) for leaf in field.objects])

    def _load_final_obs(self) -> tuple:
        """The parent's ``final_obs`` entries of these rows, positions renumbered to this selection."""
        observations, positions = self._parent.final_obs
        match = positions[:, 0][None, :] == self.indices[:, None]  # [n, k]
        mine, theirs = np.nonzero(match)
        return _index(observations, theirs), np.stack([mine, positions[theirs, 1]], axis=1).astype(np.int64)

    def _check_live(self, name: str | None = None) -> None:
        batch = self._owner if self._owner is not None else self
        if batch._released:
            what = f"{type(self).__name__}.{name}" if name else type(self).__name__
            raise RuntimeError(f"{what} used after release(): its rows belong to the envs again")

    def _block_field(self, name: str) -> tuple:
        """``(leaves, objects, layout)`` of field `name`: the block's arrays ``[S, ...]`` (this selection's
        rows of them are the field), the object leaves already selected, and the layout (None: one array)."""
        field = self._plan.fields[name]
        return field.leaves, [self._selection.gather(leaf) for leaf in field.objects], field.layout

    def _on_release(self, callback: Callable[[], None]) -> None:
        """Runs `callback` before the rows go back to the envs (e.g. waiting for copies that read them)."""
        batch = self._owner if self._owner is not None else self
        batch._before_release.append(callback)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        runs = len(self._selection.runs)
        return f"{type(self).__name__}({len(self)} rows in {runs} run{'s' * (runs != 1)}, zero_copy={self.zero_copy})"

    @property
    def runs(self) -> np.ndarray:
        """``[k, 3]`` int64, one line per run of adjacent buffer rows: (position of its first row in this
        selection, its first buffer row, number of rows).  One line when ``zero_copy``."""
        return self._selection.runs

    def fields(self) -> list[str]:
        """Names of every array attribute."""
        return list(self._plan.names)

    def numpy(self, fields=None) -> dict:
        """Returns the fields as a dict of arrays (every field and ``final_obs`` when `fields` is None);
        gathers those not built yet.  Numpy arrays support ``__dlpack__`` for other frameworks."""
        names = list(self._plan.names) + ["final_obs"] if fields is None else list(fields)
        for name in names:
            if name not in self._plan.fields and name != "final_obs":
                raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        return self._arrays(names)

    def _arrays(self, names) -> dict:
        """The fields `names` (known names), built now where they were not yet; one liveness check."""
        self._check_live()
        data, load, out = self._data, self._load, {}
        for name in names:
            value = data.get(name)
            if value is None:
                value = data[name] = load(name)
            out[name] = value
        return out

    # ---- selections -----------------------------------------------------------------------------
    def rows_view(self, indices) -> "SegmentRows":
        """The rows at `indices` (positions in this batch: ints, a bool mask or a slice), in that order, as
        `SegmentRows` reading the same block: nothing is copied until a field is read, and then only these
        rows (a view when they are adjacent in the buffer).

        Raises:
            IndexError: an index out of range.  RuntimeError: the batch was released.
        """
        self._check_live()
        if not isinstance(indices, slice):
            indices = np.asarray(indices)
            if indices.size == 0 and indices.dtype != bool:
                indices = indices.astype(np.intp)  # ([] reads as float64)
        positions = np.arange(len(self))[indices]
        if positions.ndim != 1:
            raise ValueError(f"indices must select rows (a 1-D index), got shape {positions.shape}")
        return SegmentRows(self._storage, self._plan, _Selection(self.rows[positions]),
                           self._owner if self._owner is not None else self, parent=self, indices=positions)

    def minibatches(self, num_minibatches: int, generator=None, shuffle: bool = True) -> Iterator["SegmentRows"]:
        """Splits the rows into `num_minibatches` minibatches of whole rows, one epoch.

        Each minibatch is a `SegmentRows` (see `rows_view`) of ``len(self) // num_minibatches`` or one more
        rows, in batch order (``mb.indices`` ascending: index your own per-row arrays, e.g. advantages, with
        it); reading its fields, or ``mb.to_torch()``, gathers that minibatch's rows from the block, once.

        Args:
            num_minibatches: 1 to ``len(self)``.
            generator: the shuffle's randomness: a numpy Generator (or RandomState), a torch Generator, an int
                seed, or None (fresh entropy).
            shuffle: False keeps the rows in batch order (minibatch i holds the i-th slice).

        Raises:
            ValueError: `num_minibatches` out of range.  RuntimeError: the batch was released.
        """
        self._check_live()
        return (self.rows_view(part) for part in minibatch_indices(len(self), num_minibatches, generator, shuffle))

    # ---- hand-off -------------------------------------------------------------------------------
    def to_torch(self, device=None, non_blocking: bool = True, copy: bool = False, fields=None) -> "TorchSegments":
        """Returns the rows as torch tensors (same attribute names; structured obs as dict/tuple).

        On the CPU (and `copy` False) the tensors share memory with the fields: views of shared memory when
        ``zero_copy``, else the gathered fields (gathered now if they were not yet).  For another device
        (or `copy` True), each run of adjacent rows is copied straight from the block into its place in one
        tensor per field; for CUDA the block is page-locked once, the copies are asynchronous when
        `non_blocking`, and `release()` waits for them.  `fields` limits the conversion to those names
        (``"final_obs"`` included); see `segvec.torch_utils.batch_to_torch`.
        """
        self._check_live()
        from segvec.torch_utils import batch_to_torch

        return batch_to_torch(self, device=device, non_blocking=non_blocking, copy=copy, fields=fields)


class SegmentBatch(SegmentRows):
    """``n`` complete segment rows, shaped ``[n, horizon, ...]`` (observations ``[n, horizon + 1, ...]``).

    Attributes:
        obs: ``[n, T + 1, *obs_shape]`` (dict/tuple of arrays for structured spaces); ``obs[:, t]`` is what
            the policy saw at step t, ``obs[i, length[i]]`` the observation after the row's last step.
            Parts of the space with no fixed shape (``shared_memory=False``) are ``[n, T + 1]`` numpy
            object arrays of the values the envs returned (``to_torch`` leaves them as they are); so are
            such parts of ``action`` (``[n, T]``, the values sent).
        action, value, logprob, reward, terminated, truncated: ``[n, T]``; step t's outcome is
            ``reward[t]``, ``terminated[t]``, ``truncated[t]``.
        next_value: ``[n, T]`` float32, the bootstrap of every step: 0 where terminated, the value of the
            final observation where truncated, ``value[t + 1]`` inside the row, the tail value at
            ``length - 1``; NaN where not known (see `final_obs` and `set_truncation_values`).
        Value heads (``value_shape=(k,)``): ``value``, ``reward`` and ``next_value`` are ``[n, T, k]``, the
            rules above holding head by head; the flags, ``logprob`` and the rest keep their shapes.
        episode_start: ``[n, T]`` bool, True where ``obs[t]`` is an episode's first observation.
        mask: ``[n, T]`` bool, True on real transitions (False past ``length`` and on NEXT_STEP reset steps).
        length, env_id, start_step: ``[n]``; policy_version: ``[n, T]``.
        final_obs: ``(observations [k, ...], positions [k, 2] as (row in batch, t))`` of SAME_STEP
            truncations whose value is not known (no ``value_fn``).
        rows: ``[n]`` the buffer rows (sorted).
        zero_copy: the rows are adjacent in the buffer: every field is a view of shared memory.
        runs: ``[k, 3]`` the runs of adjacent rows (see `SegmentRows.runs`).
        Every step field and segment field is an attribute of the same name.

    Taking a batch copies nothing (its ``next_value`` rows are computed into the block).  A field is built on
    first access and kept: a view when ``zero_copy``, else a gather of the rows (one copy of the whole
    field).  Trainers that train on minibatches of rows use `minibatches` or `rows_view`, which gather each
    minibatch from the block instead, and ``to_torch(device)`` copies runs of rows to the device directly.

    Using a released batch raises RuntimeError.  ``with envs.take_segments() as batch:`` releases on exit.
    """

    def __init__(self, storage, rows: np.ndarray, autoreset_mode: AutoresetMode, final_obs: tuple,
                 release: Callable[[np.ndarray], None]):
        self._released = False
        self._release_rows = release
        self._before_release: list = []
        selection = _Selection(rows, ascending_unique=True)
        super().__init__(storage, plan_of(storage), selection, None)
        self._data["final_obs"] = final_obs
        self._positions_of_final = final_obs[1]
        # next_value, by the C core, into the block's own rows (the batch holds them): one call per run.
        if len(rows):
            same_step = autoreset_mode == AutoresetMode.SAME_STEP
            next_value, core = storage.next_value, storage.core
            if selection.slice is not None:
                core.fill_next_values(rows, same_step, next_value[selection.slice])
            else:
                for position, row, count in selection.runs.tolist():
                    core.fill_next_values(rows[position:position + count], same_step, next_value[row:row + count])

    def set_truncation_values(self, values) -> None:
        """Fills ``next_value`` at the positions of `final_obs` (SAME_STEP truncations without value_fn).

        Selections (`rows_view`, `minibatches`) whose ``next_value`` was read before keep what they read.

        Args:
            values: ``[k]`` values of ``final_obs[0]``, in the same order (with value heads ``[k, heads]``).
        """
        self._check_live()
        positions = self._positions_of_final
        value_shape = self._storage.geometry.value_shape
        if value_shape:
            values = np.asarray(values, np.float32)
            if values.shape != (len(positions),) + value_shape:
                raise ValueError(f"expected truncation values of shape {(len(positions),) + value_shape} (one per "
                                 f"final observation and value head), got {values.shape}")
        else:
            values = np.asarray(values, np.float32).reshape(-1)
            if len(values) != len(positions):
                raise ValueError(f"expected {len(positions)} truncation values, got {len(values)}")
        rows, steps = positions[:, 0], positions[:, 1]
        self._storage.next_value[self.rows[rows], steps] = values
        gathered = self._data.get("next_value")
        if gathered is not None and not self.zero_copy:
            gathered[rows, steps] = values

    def release(self) -> None:
        """Gives the rows back to the envs (idempotent).  Views taken from the batch become invalid; device
        copies still reading the rows are waited for first."""
        if not self._released:
            callbacks, self._before_release = self._before_release, []
            for callback in callbacks:
                callback()
            self._released = True
            self._data.clear()  # (gathered fields go with the batch, unless the caller holds them)
            self._release_rows(self.rows)

    def __enter__(self) -> "SegmentBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def gae(batch, gamma: float, lam: float, rho_clip: float | None = None, c_clip: float | None = None,
        behaviour_logprob=None, target_logprob=None):
    """Generalized advantage estimation within each row, bootstrapped by ``next_value``.

    ``delta[t] = reward[t] + gamma * next_value[t] - value[t]`` (``next_value`` is 0 where terminated);
    ``A[t] = delta[t] + gamma * lam * A[t + 1]``, the recursion stopping at terminated or truncated steps
    and at the row's last step; masked-out steps get 0.  A NaN (an unknown bootstrap) reaches back to the
    step after the previous stop, no further.  A ``value`` that is NaN on a real step (the learner sent
    none with that action) warns (`segvec.SegvecWarning`), as does a NaN behaviour log-probability of a
    weighted GAE.  Numpy batches never need torch.

    With value heads (``reward, value, next_value`` of shape ``(n, T, k)``, as batches of
    ``make_vec(..., value_shape=(k,))`` have them) every head runs its own recursion at once, with its own
    gamma and lam; importance weights (one per step) weigh every head alike.

    Args:
        batch: a `SegmentBatch` or any object with ``reward, value, next_value`` ``(n, T)`` or
            ``(n, T, k)``, ``terminated, truncated, mask`` ``(n, T)`` and ``length`` ``(n,)`` (numpy:
            `segvec.advantages.gae_numpy`, the C kernel), or a `TorchSegments` / torch tensors
            (`segvec.torch_utils.gae_torch`, on the tensors' device).
        gamma, lam: discount and GAE lambda, finite; with value heads, a number for every head or a
            sequence of k numbers (one per head).
        rho_clip, c_clip: with `target_logprob` given, V-trace-style clipped importance weights
            ``rho = min(rho_clip, pi/mu)`` on delta and ``c = lam * min(c_clip, pi/mu)`` in the recursion,
            where ``mu`` is ``batch.logprob`` (or `behaviour_logprob`) — for data from older policy versions.
        behaviour_logprob, target_logprob: ``(n, T)`` log-probabilities.

    Returns:
        ``(advantages, returns)``, each float32 of ``reward``'s shape (arrays or tensors, as the batch);
        ``returns = advantages + value`` on real steps, 0 elsewhere.

    Raises:
        TypeError: a field is missing or of the wrong kind, or a scalar is not a real number.
        ValueError: a field's shape differs from what ``reward`` asks (``value``, ``next_value``: its shape;
            flags and log-probabilities: its ``(n, T)``; ``length``: ``(n,)``), ``length`` lies outside
            ``[0, T]``, `gamma` or `lam` is not finite or has not one entry per head, a clip is not > 0, or
            a clip is given without `target_logprob` (see `segvec.advantages.check_gae_inputs`).

    Example:
        >>> import types
        >>> ones, no = np.ones((1, 3, 2), np.float32), np.zeros((1, 3), bool)
        >>> batch = types.SimpleNamespace(reward=ones, value=0 * ones, next_value=0 * ones, terminated=no,
        ...                               truncated=no, mask=~no, length=np.array([3]))
        >>> gae(batch, gamma=[0.5, 1.0], lam=1.0)[0][0]   # [T, heads]
        array([[1.75, 3.  ],
               [1.5 , 2.  ],
               [1.  , 1.  ]], dtype=float32)
    """
    if _is_torch(getattr(batch, "reward", None)):
        from segvec.torch_utils import gae_torch

        return gae_torch(batch, gamma, lam, rho_clip, c_clip, behaviour_logprob, target_logprob)
    return gae_numpy(batch, gamma, lam, rho_clip, c_clip, behaviour_logprob, target_logprob)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")
