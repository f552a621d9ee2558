"""The learner's inputs, checked before the core sees any of them: sizes, actions, learner fields, values,
reset masks and seeds.  Every check raises ValueError (wrong value or shape) or TypeError (wrong type or
dtype) with a message that says what to change; none changes anything."""
from __future__ import annotations

import os

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from segvec.spaces import SpaceLayout


def observation_mode(mode) -> None:
    """``"same"``, ``"different"``, or a tuple ``(observation_space, single_observation_space)``."""
    if isinstance(mode, tuple) and len(mode) == 2:
        if not all(isinstance(space, spaces.Space) for space in mode):
            raise TypeError(f"Expected both elements of observation_mode to be Spaces, got {type(mode[0])} and "
                            f"{type(mode[1])}")
        return
    if not (isinstance(mode, str) and mode in ("same", "different")):
        raise ValueError("Invalid `observation_mode`, expected: 'same' or 'different' or tuple of single and batch "
                         f"observation space, actual got {mode}")


def max_concurrency(limit, num_envs: int, num_workers, backend: str):
    """The ``num_workers`` that keeps at most `limit` envs stepping at once (each worker steps one env at a
    time): the largest divisor of `num_envs` within `limit` and the CPU count, unless given."""
    if limit is None:
        return num_workers
    if not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"`max_concurrency` must be a positive int or None, got {limit!r}")
    if backend != "multiprocessing":
        return num_workers  # one env steps at a time already
    if num_workers is not None:
        if num_workers > limit:
            raise ValueError(f"num_workers={num_workers} would step more envs at once than max_concurrency={limit}")
        return num_workers
    cap = min(int(limit), os.cpu_count() or 1, num_envs)
    return max(w for w in range(1, cap + 1) if num_envs % w == 0)


def learner_share(share, backend: str) -> dict:
    """The backend keyword of ``learner_share`` (only the multiprocessing backend takes it)."""
    if not isinstance(share, (bool, np.bool_)):
        raise ValueError(f"`learner_share` must be True or False, got {share!r}")
    if not share:
        return {}
    if backend != "multiprocessing":
        raise ValueError(f"learner_share=True steps worker 0's envs in this process beside worker processes: it "
                         f"needs backend='multiprocessing', got backend={backend!r} (the {backend!r} backend "
                         f"steps {'every env in this process already' if backend != 'engine' else 'its engine'})")
    return {"learner_share": True}


def autoreset_mode(mode) -> AutoresetMode:
    """Accepts an AutoresetMode, its value ("NextStep") or its name in any case ("next_step")."""
    if isinstance(mode, AutoresetMode):
        return mode
    if isinstance(mode, str):
        for member in AutoresetMode:
            if mode in (member.value, member.name) or mode.replace("-", "_").upper() == member.name:
                return member
    raise ValueError(f"autoreset_mode must be one of {[m.name for m in AutoresetMode]}, got {mode!r}")


def sizes(num_envs: int, horizon, batch_size, num_segments) -> tuple[int, int, int]:
    """``(horizon, batch_size, num_segments)`` with their defaults, checked against `num_envs`."""
    if num_envs < 1:
        raise ValueError("need at least one env")
    if not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
    batch_size = num_envs if batch_size is None else batch_size
    if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= num_envs:
        raise ValueError(f"batch_size must be an int in [1, num_envs={num_envs}], got {batch_size!r}")
    num_segments = 4 * num_envs if num_segments is None else num_segments
    if not isinstance(num_segments, (int, np.integer)) or num_segments < 2 * num_envs:
        raise ValueError(
            f"num_segments must be >= 2 * num_envs = {2 * num_envs} (each env fills one row while its "
            f"previous one waits for its bootstrap value), got {num_segments!r}")
    return int(horizon), int(batch_size), int(num_segments)


class ActionCheck:
    """Checks a batch of actions against the action space's layout: ``check(actions, count) -> leaf arrays``.

    Shapes must be ``(count, *leaf_shape)`` (one number per env is accepted for a one-element leaf, as
    gymnasium's vector envs accept it); dtypes must cast safely (same kind, or any integer for an integer
    space).  Values are not checked against the space: like gymnasium's vector envs, segvec hands every
    action to its env, which is the judge of what it accepts (its error comes back with its traceback).
    """

    def __init__(self, layout: SpaceLayout):
        self.layout = layout
        self.flat = layout.is_flat
        self.reshaped = False  # the last call took one number per env for a flat one-element space

    def __call__(self, actions, count: int) -> list[np.ndarray]:
        leaves = [actions] if self.flat else self.layout.flatten(actions)
        self.reshaped = False
        out = []
        for leaf, space_value in zip(self.layout.leaves, leaves):
            array = np.asarray(space_value)
            expected = (count,) + leaf.shape
            if array.ndim == 0:
                raise TypeError(f"actions must be a batch of {count} (one per env), got the scalar {space_value!r}")
            if array.shape != expected:
                if array.shape == (count,) and int(np.prod(leaf.shape)) == 1:
                    array = array.reshape(expected)  # one number per env for a one-element leaf
                    self.reshaped = self.flat
                else:
                    where = f" at {'/'.join(map(str, leaf.path))}" if leaf.path else ""
                    raise ValueError(f"actions{where} have shape {array.shape}, expected {expected} for {count} envs")
            if array.dtype != leaf.dtype and not np.can_cast(array.dtype, leaf.dtype, casting="same_kind"):
                if not (np.issubdtype(leaf.dtype, np.integer) and np.issubdtype(array.dtype, np.integer)):
                    raise TypeError(f"actions have dtype {array.dtype}, the action space needs {leaf.dtype}")
            out.append(array)
        return out


def learner_fields(fields: dict, storage, count: int) -> dict[str, np.ndarray]:
    """Learner fields as arrays of shape ``(count, *shape)`` in their declared dtypes.

    Raises:
        TypeError: a field that was not declared, or of a dtype that does not convert.
        ValueError: a field of the wrong shape.
    """
    if not fields:
        return {}
    unknown = set(fields) - set(storage.step_fields) - set(storage.segment_fields)
    if unknown:
        raise TypeError(f"unknown learner fields {sorted(unknown)}; declare them in step_fields/segment_fields")
    out = {}
    for name, value in fields.items():
        per_step = name in storage.step_fields
        target = storage.step_fields[name] if per_step else storage.segment_fields[name]
        expected = (count,) + target.shape[2 if per_step else 1:]
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        try:
            array = np.asarray(value).astype(target.dtype, copy=False, casting="same_kind")
        except (TypeError, ValueError) as error:
            raise TypeError(f"field {name!r} has dtype {np.asarray(value).dtype}, declared {target.dtype}: "
                            f"{error}") from error
        if array.shape != expected:
            raise ValueError(f"field {name!r} has shape {array.shape}, expected {expected} for {count} envs")
        out[name] = array
    return out


def per_env(values, count: int, name: str, item_shape: tuple = ()) -> np.ndarray:
    """One float32 per env (e.g. value, logprob), or one `item_shape` ``(k,)`` item per env (values of k
    heads, shape ``(count, k)``), from numpy, a sequence or a torch tensor; C-contiguous."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    if not item_shape:
        array = np.ascontiguousarray(np.asarray(values, np.float32).reshape(-1))
        if len(array) != count:
            raise ValueError(f"{name} must have one entry per env ({count}), got shape {np.shape(values)}")
        return array
    array = np.asarray(values, np.float32)
    if array.shape != (count,) + item_shape:
        raise ValueError(f"{name} must have shape {(count,) + item_shape} (one entry per env and value head), "
                         f"got shape {array.shape}")
    return np.ascontiguousarray(array)


def reset_mask(mask, num_envs: int) -> np.ndarray:
    """The envs a ``reset(options={"reset_mask": mask})`` resets."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"`options['reset_mask']` must be a numpy array, got {type(mask)}")
    if mask.shape != (num_envs,):
        raise ValueError(f"`options['reset_mask']` must have shape `({num_envs},)`, got {mask.shape}")
    if mask.dtype != np.bool_:
        raise TypeError(f"`options['reset_mask']` must have `dtype=np.bool_`, got {mask.dtype}")
    if not mask.any():
        raise ValueError("`options['reset_mask']` must contain a boolean array with at least one True value, "
                         f"got reset_mask={mask}")
    return np.flatnonzero(mask).astype(np.int32)


def seeds(seed, num_envs: int) -> list:
    """Per-env seeds: None for all, an int i gives env e the seed i + e, or a list of one per env."""
    if seed is None:
        return [None] * num_envs
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(num_envs)]
    seeds_ = list(seed)
    if len(seeds_) != num_envs:
        raise ValueError(f"If seeds are passed as a list the length must match num_envs={num_envs} "
                         f"but got length={len(seeds_)}.")
    return seeds_
