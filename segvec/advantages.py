"""GAE over numpy arrays (the C kernel, and its clipped V-trace variant), and the input checks every GAE kernel,
numpy or torch, runs before it computes anything: no array reaches C with a shape it does not expect.

Semantics, shared by every kernel: ``delta[t] = reward[t] + gamma * next_value[t] - value[t]`` (``next_value``
taken as 0 where terminated, even if NaN), ``A[t] = delta[t] + gamma * lam * A[t + 1]``, the recursion stopping
at terminated or truncated steps and at ``t = length - 1``; steps past ``length`` or with ``mask`` False get
advantage and return 0 and restart the recursion, so a NaN (an unknown bootstrap) reaches back to the previous
stop and no further.  ``returns = advantages + value`` on real steps.

Value heads: ``reward, value, next_value`` may be ``(n, T, k)`` (k heads, e.g. ``make_vec(...,
value_shape=(k,))``) with the flags, ``length`` and log-probabilities as without heads; each head runs the
recursion above with its own ``gamma[h]`` and ``lam[h]`` (a single number serves every head), and
importance weights, computed once per step, weigh every head alike.

A ``value`` that is NaN on a real step (the learner sent no value with that action, or its critic returned
NaN), and with importance weights a NaN behaviour log-probability, makes advantages NaN: every kernel then
warns (`segvec.SegvecWarning`, see `warn_unsent`) and still returns them.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import numpy as np

from segvec._core import gae_kernel
from segvec.errors import warn

_KINDS = {"real": ("fiu", "a real-valued array"), "flag": ("biu", "a bool or integer array"),
          "count": ("iu", "an integer array")}
_HEADED = frozenset({"reward", "value", "next_value"})  # (n, T, k) with value heads; the rest (n, T)
_FIELDS = {"reward": "real", "value": "real", "next_value": "real", "terminated": "flag", "truncated": "flag",
           "mask": "flag", "length": "count"}


def _number(name: str, value, wanted: str = "a real number") -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"gae: {name} must be {wanted}, got {type(value).__name__}")
    return float(value)


def _per_head(name: str, value, heads: int):
    """`value` (gamma or lam), a sequence, checked: a tuple of `heads` finite floats."""
    try:
        entries = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"gae: {name} must be a real number or one per value head, got "
                        f"{type(value).__name__}") from error
    if entries.ndim != 1 or entries.dtype.kind not in "fiu":
        raise TypeError(f"gae: {name} must be a real number or a sequence of {heads} real numbers (one per "
                        f"value head), got {type(value).__name__} of shape {entries.shape}")
    if len(entries) != heads:
        raise ValueError(f"gae: {name} has {len(entries)} entries, expected {heads} (one per value head: "
                         f"reward has shape (n, T, {heads}))")
    if not np.isfinite(entries).all():
        raise ValueError(f"gae: {name} must be finite, got {entries.tolist()}")
    return tuple(float(entry) for entry in entries)


def check_gae_inputs(batch, gamma, lam, rho_clip=None, c_clip=None, behaviour_logprob=None,
                     target_logprob=None, asarray: Callable[[Any], Any] = np.asarray,
                     kind: Callable[[Any], str] = lambda array: array.dtype.kind):
    """Reads GAE's inputs from `batch` and checks their types, shapes and values.

    Args:
        batch: any object with attributes ``reward, value, next_value`` of shape ``(n, T)`` or, with k value
            heads, ``(n, T, k)``; ``terminated, truncated, mask`` of shape ``(n, T)`` and ``length`` of shape
            ``(n,)`` (and ``logprob`` ``(n, T)`` when it is the behaviour log-probability of a clipped GAE).
        gamma, lam: discount and GAE lambda, finite real numbers; with k value heads also a sequence (list,
            array, tensor) of k of them, one per head.
        rho_clip, c_clip: None or numbers > 0; given only with `target_logprob`.
        behaviour_logprob, target_logprob: None or ``(n, T)``; `behaviour_logprob` only with `target_logprob`.
        asarray: turns a field into an array (``np.asarray``, ``torch.as_tensor``).
        kind: the numpy dtype kind character of such an array (``"b"``, ``"i"``, ``"u"``, ``"f"``, ...).

    Returns:
        ``(arrays, gamma, lam, rho_clip, c_clip)``: `arrays` maps every field name above (and, with
        `target_logprob`, ``"target_logprob"`` and ``"behaviour_logprob"``) to what `asarray` made of it,
        dtypes unchanged; gamma and lam as floats, or with k heads as tuples of k floats; the clips as floats
        (None when not given).

    Raises:
        TypeError: `batch` lacks a field; a field is not an array of the right kind (real values for
            ``reward, value, next_value`` and log-probabilities, bool or integer flags, integer ``length``);
            a scalar is not a real number.
        ValueError: ``reward`` is not ``(n, T)`` or ``(n, T, k)`` with ``T, k >= 1``; ``value`` or
            ``next_value`` is not exactly ``reward``'s shape, another step field not ``(n, T)`` or ``length``
            not ``(n,)`` (the message names the field, the shape got and the shape expected); ``length`` is
            outside ``[0, T]``; `gamma` or `lam` is not finite, or is a sequence without k entries (or without
            heads); a clip is not > 0; a clip or `behaviour_logprob` is given without `target_logprob`.
    """
    per_head = {}  # gamma / lam given as sequences, checked once the number of heads is known
    if hasattr(gamma, "__len__"):
        per_head["gamma"] = gamma
    else:
        gamma = _number("gamma", gamma)  # (a plain number is checked before the fields, as always)
        if not math.isfinite(gamma):
            raise ValueError(f"gae: gamma must be finite, got {gamma}")
    if hasattr(lam, "__len__"):
        per_head["lam"] = lam
    else:
        lam = _number("lam", lam)
        if not math.isfinite(lam):
            raise ValueError(f"gae: lam must be finite, got {lam}")
    rho_clip, c_clip = (None if clip is None else _number(name, clip, "None or a real number")
                        for name, clip in (("rho_clip", rho_clip), ("c_clip", c_clip)))
    for name, clip in (("rho_clip", rho_clip), ("c_clip", c_clip)):
        if clip is not None and not clip > 0:
            raise ValueError(f"gae: {name} must be None or a number > 0, got {clip}")
    entries = [(name, kind_name, name) for name, kind_name in _FIELDS.items()]  # (key, kind, field name)
    given = {}
    if target_logprob is None:
        for name, value in (("rho_clip", rho_clip), ("c_clip", c_clip), ("behaviour_logprob", behaviour_logprob)):
            if value is not None:
                raise ValueError(f"gae: {name} needs target_logprob (it weighs a clipped GAE)")
    else:
        behaviour_name = "logprob" if behaviour_logprob is None else "behaviour_logprob"
        entries += [("target_logprob", "real", "target_logprob"), ("behaviour_logprob", "real", behaviour_name)]
        given = {"target_logprob": target_logprob, "behaviour_logprob": behaviour_logprob}
    arrays, shape = {}, None
    for key, kind_name, name in entries:
        value = given.get(key)
        if value is None:
            if not hasattr(batch, name):
                raise TypeError(f"gae: batch has no field {name!r}")
            value = getattr(batch, name)
        kinds, description = _KINDS[kind_name]
        try:
            array = asarray(value)
            array_kind = kind(array)
        except (TypeError, ValueError, RuntimeError) as error:
            got = getattr(value, "dtype", type(value).__name__)
            raise TypeError(f"gae: {name} must be {description}, got {got} ({error})") from error
        if array_kind not in kinds:
            raise TypeError(f"gae: {name} must be {description}, got {array.dtype}")
        got = tuple(array.shape)
        if shape is None:
            if len(got) not in (2, 3) or 0 in got[1:]:
                wanted = "(n, T) or (n, T, k) with T, k >= 1" if len(got) in (2, 3) else "(n, T) or (n, T, k)"
                raise ValueError(f"gae: reward has shape {got}, expected {wanted}")
            shape = got
        expected = shape[:1] if key == "length" else shape if key in _HEADED else shape[:2]
        if got != expected:
            what = "" if key == "length" else " (the shape of reward)" if key in _HEADED else " (reward's (n, T))"
            raise ValueError(f"gae: {name} has shape {got}, expected {expected}{what}")
        arrays[key] = array
    heads = shape[2] if len(shape) == 3 else None
    if heads is not None:
        gamma = (gamma,) * heads if "gamma" not in per_head else _per_head("gamma", gamma, heads)
        lam = (lam,) * heads if "lam" not in per_head else _per_head("lam", lam, heads)
    elif per_head:
        raise TypeError(f"gae: {next(iter(per_head))} must be a real number, got "
                        f"{type(next(iter(per_head.values()))).__name__} (one per value head needs rewards of "
                        "shape (n, T, k))")
    length, T = arrays["length"], shape[1]
    if shape[0]:
        for bound in (int(length.min()), int(length.max())):
            if not 0 <= bound <= T:
                raise ValueError(f"gae: length must lie in [0, T={T}], got {bound}")
    return arrays, gamma, lam, rho_clip, c_clip


_UNSENT = {
    "value": ("value", "so their advantages and returns, and those of the steps before them in the same episode, "
              "are NaN. A value is NaN where the learner sent none: pass value= (the critic's value of the "
              "observation each action was chosen on) to step() or send(); if you did, your critic returned NaN."),
    "behaviour_logprob": ("the behaviour log-probability (batch.logprob unless behaviour_logprob= is given)",
                          "so the importance-weighted advantages are NaN. batch.logprob is NaN where the learner "
                          "sent none: pass logprob= to step() or send(), or behaviour_logprob= to gae()."),
}


def warn_unsent(key: str, nan_steps: int, real_steps: int) -> None:
    """Warns that `key` (``"value"`` or ``"behaviour_logprob"``) is NaN at `nan_steps` of `real_steps` real
    steps (nothing when `nan_steps` is 0).  One text for "every" and one for "some" real steps, so Python's
    default filter shows each once per line of the caller."""
    if nan_steps:
        what, consequence = _UNSENT[key]
        where = "every real step" if nan_steps == real_steps else "some real steps"
        warn(f"segvec: gae: {what} is NaN at {where}, {consequence}")


def _real_steps(mask, length, T: int) -> np.ndarray:
    """``(n, T)`` bool: the steps GAE computes (``mask`` and before ``length``)."""
    return np.asarray(mask, bool) & (np.arange(T) < np.asarray(length, np.int64)[:, None])


def _check_sent(x: dict, value, mask, length) -> None:
    """Warns about NaN values (and behaviour log-probabilities, when weighed) on real steps."""
    arrays = {"value": value}
    if "behaviour_logprob" in x:
        arrays["behaviour_logprob"] = np.asarray(x["behaviour_logprob"])
    real = None
    for key, array in arrays.items():
        nan = np.isnan(array) if array.dtype.kind == "f" else None
        if nan is None or not nan.any():
            continue
        if real is None:
            real = _real_steps(mask, length, array.shape[1])
        if nan.ndim == 3:  # value heads: a step counts once, whichever heads are NaN
            nan = nan.any(axis=2)
        warn_unsent(key, int((nan & real).sum()), int(real.sum()))


def head_axis(reward) -> Callable:
    """For ``(n, T, k)`` rewards, a function that gives ``(n, T)`` flags and weights a head axis of 1 (so
    they broadcast over the heads); for ``(n, T)`` rewards, the identity."""
    return (lambda array: array[..., None]) if reward.ndim == 3 else (lambda array: array)


def gae_numpy(batch, gamma: float, lam: float, rho_clip: float | None = None, c_clip: float | None = None,
              behaviour_logprob=None, target_logprob=None):
    """GAE of a numpy batch by the C kernel (by `gae_numpy_clipped` when `target_logprob` is given).

    Args:
        batch: a `SegmentBatch`, or any object with numpy-convertible ``reward, value, next_value``
            ``(n, T)`` or ``(n, T, k)`` (k value heads), ``terminated, truncated, mask`` ``(n, T)`` and
            ``length`` ``(n,)``.
        gamma, lam: discount and GAE lambda; with value heads, one number for all or one per head.
        rho_clip, c_clip, behaviour_logprob, target_logprob: as `gae_numpy_clipped`.

    Returns:
        ``(advantages, returns)``, each float32 of ``reward``'s shape.

    Raises:
        TypeError, ValueError: as `check_gae_inputs`.

    Example:
        >>> import types
        >>> ones, no = np.ones((1, 3), np.float32), np.zeros((1, 3), bool)
        >>> batch = types.SimpleNamespace(reward=ones, value=0 * ones, next_value=0 * ones, terminated=no,
        ...                               truncated=no, mask=~no, length=np.array([3]))
        >>> gae_numpy(batch, gamma=0.5, lam=1.0)[0]
        array([[1.75, 1.5 , 1.  ]], dtype=float32)
    """
    if target_logprob is not None:
        return gae_numpy_clipped(batch, gamma, lam, rho_clip, c_clip, behaviour_logprob, target_logprob)
    x, gamma, lam, _, _ = check_gae_inputs(batch, gamma, lam, rho_clip, c_clip, behaviour_logprob)
    real = {name: np.ascontiguousarray(x[name], np.float32) for name in ("reward", "value", "next_value")}
    flag = {name: np.ascontiguousarray(x[name], bool).view(np.uint8) for name in ("terminated", "truncated", "mask")}
    length = np.ascontiguousarray(x["length"], np.int32)
    shape = real["reward"].shape
    _check_sent(x, real["value"], flag["mask"], length)
    advantages, returns = np.empty(shape, np.float32), np.empty(shape, np.float32)
    gae_kernel(real["reward"], real["value"], real["next_value"], flag["terminated"], flag["truncated"],
               flag["mask"], length, gamma, lam, advantages, returns)
    return advantages, returns


def gae_numpy_clipped(batch, gamma: float, lam: float, rho_clip: float | None = None,
                      c_clip: float | None = None, behaviour_logprob=None, target_logprob=None):
    """Clipped (V-trace style) GAE of a numpy batch, vectorized across rows (a loop over T only).

    ``rho[t] = min(rho_clip, pi/mu)`` weighs ``delta[t]`` and ``c[t] = min(c_clip, pi/mu)`` the recursion:
    ``A[t] = rho[t] * delta[t] + gamma * lam * c[t] * A[t + 1]`` (stops and masks as in the module
    docstring), ``pi`` from `target_logprob`, ``mu`` from `behaviour_logprob` (default ``batch.logprob``).
    Without `target_logprob` the weights are 1: plain GAE.

    Args:
        batch: as `gae_numpy`.
        gamma, lam: discount and GAE lambda (with value heads: one for all, or one per head).
        rho_clip, c_clip: clips of the importance ratio (None: no clip).
        behaviour_logprob, target_logprob: ``(n, T)`` log-probabilities of the taken actions; with value
            heads the weights of a step weigh every head.

    Returns:
        ``(advantages, returns)``, each float32 of ``reward``'s shape.

    Raises:
        TypeError, ValueError: as `check_gae_inputs`.
    """
    x, gamma, lam, rho_clip, c_clip = check_gae_inputs(batch, gamma, lam, rho_clip, c_clip, behaviour_logprob,
                                                       target_logprob)
    f32 = np.float32
    reward, value, next_value = (np.asarray(x[name], f32) for name in ("reward", "value", "next_value"))
    terminated, truncated, mask = (np.asarray(x[name], bool) for name in ("terminated", "truncated", "mask"))
    n, T = reward.shape[:2]
    steps = np.arange(T)
    length = np.asarray(x["length"], np.int64)[:, None]
    valid = mask & (steps < length)
    _check_sent(x, value, mask, length[:, 0])
    carries = valid & ~(terminated | truncated | (steps == length - 1))
    per_head = head_axis(reward)  # (n, T) flags and weights -> (n, T, 1) with value heads
    terminated, valid, carries = per_head(terminated), per_head(valid), per_head(carries)
    gamma, lam = np.asarray(gamma, f32), np.asarray(lam, f32)  # () or (k,): broadcast over the head axis
    delta = reward + gamma * np.where(terminated, f32(0), next_value) - value
    carry = np.broadcast_to(gamma * lam, reward.shape)
    if target_logprob is not None:
        ratio = per_head(np.exp(np.asarray(x["target_logprob"], f32) - np.asarray(x["behaviour_logprob"], f32)))
        delta = delta * (ratio if rho_clip is None else np.minimum(ratio, f32(rho_clip)))
        carry = carry * (ratio if c_clip is None else np.minimum(ratio, f32(c_clip)))
    delta = np.where(valid, delta, f32(0))
    advantages = np.zeros(reward.shape, f32)
    running = np.zeros((n,) + reward.shape[2:], f32)
    for t in range(T - 1, -1, -1):
        running = np.where(carries[:, t], delta[:, t] + carry[:, t] * running, delta[:, t])
        advantages[:, t] = running
    return advantages, np.where(valid, advantages + value, f32(0))
