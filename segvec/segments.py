"""Completed segments as the learner sees them: `SegmentBatch`, and `gae` over it (numpy or torch).

A batch is a set of rows of the segment buffer, each ``horizon`` consecutive steps of one env.  When the
taken rows sit next to each other in the buffer (the usual case for synchronous rollouts taken in
multiples of ``num_envs``: rows are recycled in FIFO order), every array is a zero-copy view of shared
memory; otherwise each array is one gather of whole row slabs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from gymnasium.vector import AutoresetMode

from segvec.advantages import gae_numpy

if TYPE_CHECKING:
    from segvec.torch_utils import TorchSegments

class SegmentBatch:
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
        episode_start: ``[n, T]`` bool, True where ``obs[t]`` is an episode's first observation.
        mask: ``[n, T]`` bool, True on real transitions (False past ``length`` and on NEXT_STEP reset steps).
        length, env_id, start_step: ``[n]``; policy_version: ``[n, T]``.
        final_obs: ``(observations [k, ...], positions [k, 2] as (row in batch, t))`` of SAME_STEP
            truncations whose value is not known (no ``value_fn``).
        rows: ``[n]`` the buffer rows (sorted).
        Every step field and segment field is an attribute of the same name.

    Using a released batch raises RuntimeError.  ``with envs.take_segments() as batch:`` releases on exit.
    """

    def __init__(self, storage, rows: np.ndarray, autoreset_mode: AutoresetMode, final_obs: tuple,
                 release: Callable[[np.ndarray], None]):
        self._released = False
        self._release_rows = release
        self._storage = storage
        self.rows = rows
        n = len(rows)
        contiguous = n > 0 and int(rows[-1]) - int(rows[0]) + 1 == n
        select: Any = slice(int(rows[0]), int(rows[0]) + n) if contiguous else rows
        self.zero_copy = contiguous
        T = storage.geometry.horizon

        def take(array):
            return array[select]

        data: dict[str, Any] = {}
        objects = [take(a) for a in storage.objects.obs] if storage.objects is not None else ()
        data["obs"] = storage.obs_layout.structure([take(a) for a in storage.obs], objects)
        objects = [take(a) for a in storage.objects.action] if storage.objects is not None else ()
        data["action"] = storage.action_layout.structure([take(a) for a in storage.action], objects)
        for name in ("value", "logprob", "reward", "terminated", "truncated", "episode_start", "mask",
                     "policy_version"):
            data[name] = take(getattr(storage, name))
        data["length"] = storage.row_length[rows].copy()
        data["env_id"] = storage.row_env_id[rows].copy()
        data["start_step"] = storage.row_start_step[rows].copy()
        for name, array in storage.step_fields.items():
            data[name] = take(array)
        for name, array in storage.segment_fields.items():
            data[name] = take(array)

        # next_value, by the C core: into the block's own rows when they are adjacent (a view), else fresh.
        next_value = take(storage.next_value) if contiguous else np.empty((n, T), np.float32)
        if n:
            storage.core.fill_next_values(rows, autoreset_mode == AutoresetMode.SAME_STEP, next_value)
        data["next_value"] = next_value
        data["final_obs"] = final_obs
        self._data = data
        self._positions_of_final = final_obs[1]

    # ---- access ---------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        data = self.__dict__.get("_data")
        if data is None or name not in data:
            raise AttributeError(f"SegmentBatch has no field {name!r}")
        if self.__dict__.get("_released"):
            raise RuntimeError(f"SegmentBatch.{name} used after release(): its rows belong to the envs again")
        return data[name]

    def __len__(self) -> int:
        return len(self.rows)

    def fields(self) -> list[str]:
        """Names of every array attribute."""
        return [k for k in self._data if k != "final_obs"]

    def set_truncation_values(self, values) -> None:
        """Fills ``next_value`` at the positions of `final_obs` (SAME_STEP truncations without value_fn).

        Args:
            values: ``[k]`` values of ``final_obs[0]``, in the same order.
        """
        self._check_live()
        positions = self._positions_of_final
        values = np.asarray(values, np.float32).reshape(-1)
        if len(values) != len(positions):
            raise ValueError(f"expected {len(positions)} truncation values, got {len(values)}")
        self._data["next_value"][positions[:, 0], positions[:, 1]] = values

    def _check_live(self):
        if self._released:
            raise RuntimeError("SegmentBatch used after release()")

    def release(self) -> None:
        """Gives the rows back to the envs (idempotent).  Views taken from the batch become invalid."""
        if not self._released:
            self._released = True
            self._release_rows(self.rows)

    def __enter__(self) -> "SegmentBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- hand-off -------------------------------------------------------------------------------
    def to_torch(self, device=None, non_blocking: bool = True) -> "TorchSegments":
        """Returns the batch as torch tensors (same attribute names; structured obs as dict/tuple).

        On the CPU the tensors share memory with the batch (zero-copy).  For a CUDA device, host data is
        pinned and copied asynchronously when `non_blocking`.
        """
        self._check_live()
        from segvec.torch_utils import batch_to_torch

        return batch_to_torch(self, device=device, non_blocking=non_blocking)

    def numpy(self) -> dict:
        """Returns the arrays as a dict (numpy arrays support ``__dlpack__`` for other frameworks)."""
        self._check_live()
        return dict(self._data)


def gae(batch, gamma: float, lam: float, rho_clip: float | None = None, c_clip: float | None = None,
        behaviour_logprob=None, target_logprob=None):
    """Generalized advantage estimation within each row, bootstrapped by ``next_value``.

    ``delta[t] = reward[t] + gamma * next_value[t] - value[t]`` (``next_value`` is 0 where terminated);
    ``A[t] = delta[t] + gamma * lam * A[t + 1]``, the recursion stopping at terminated or truncated steps
    and at the row's last step; masked-out steps get 0.  A NaN (an unknown bootstrap) reaches back to the
    step after the previous stop, no further.  A ``value`` that is NaN on a real step (the learner sent
    none with that action) warns (`segvec.SegvecWarning`), as does a NaN behaviour log-probability of a
    weighted GAE.  Numpy batches never need torch.

    Args:
        batch: a `SegmentBatch` or any object with ``reward, value, next_value, terminated, truncated, mask``
            ``(n, T)`` and ``length`` ``(n,)`` (numpy: `segvec.advantages.gae_numpy`, the C kernel), or a
            `TorchSegments` / torch tensors (`segvec.torch_utils.gae_torch`, on the tensors' device).
        gamma, lam: discount and GAE lambda, finite.
        rho_clip, c_clip: with `target_logprob` given, V-trace-style clipped importance weights
            ``rho = min(rho_clip, pi/mu)`` on delta and ``c = lam * min(c_clip, pi/mu)`` in the recursion,
            where ``mu`` is ``batch.logprob`` (or `behaviour_logprob`) — for data from older policy versions.
        behaviour_logprob, target_logprob: ``(n, T)`` log-probabilities.

    Returns:
        ``(advantages, returns)``, each ``(n, T)`` float32 (arrays or tensors, as the batch);
        ``returns = advantages + value`` on real steps, 0 elsewhere.

    Raises:
        TypeError: a field is missing or of the wrong kind, or a scalar is not a real number.
        ValueError: a field's shape differs from ``reward``'s ``(n, T)`` (``length``: ``(n,)``), ``length``
            lies outside ``[0, T]``, `gamma` or `lam` is not finite, a clip is not > 0, or a clip is given
            without `target_logprob` (see `segvec.advantages.check_gae_inputs`).
    """
    if _is_torch(getattr(batch, "reward", None)):
        from segvec.torch_utils import gae_torch

        return gae_torch(batch, gamma, lam, rho_clip, c_clip, behaviour_logprob, target_logprob)
    return gae_numpy(batch, gamma, lam, rho_clip, c_clip, behaviour_logprob, target_logprob)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")
