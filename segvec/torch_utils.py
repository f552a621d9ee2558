"""Torch hand-off of segment batches, and GAE over torch tensors or with clipped importance weights.

torch is optional for segvec: this module is imported only by ``SegmentBatch.to_torch`` and by `segvec.gae`
when it is given torch tensors or target log-probabilities.

Layouts are the batch's own, segment-major: ``obs`` ``[n, T + 1, *obs_shape]``, per-step fields ``[n, T]``,
per-row fields ``[n]``.  A trainer that wants time-major data views them with ``.transpose(0, 1)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from segvec.segments import TorchSegments


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing memory with `array` (a contiguous copy only if torch cannot view it)."""
    try:
        return torch.from_numpy(array)
    except (TypeError, ValueError, RuntimeError):  # negative strides, dtypes torch lacks
        return torch.from_numpy(np.ascontiguousarray(array))


def _inside(array: np.ndarray, pointer, nbytes: int) -> bool:
    """True when `array`'s memory lies within the block at `pointer` (so it is page-locked already)."""
    from segvec._core import ffi

    start = int(ffi.cast("uintptr_t", pointer))
    address = array.__array_interface__["data"][0]
    return start <= address and address + array.nbytes <= start + nbytes


def _map(value: Any, fn):
    """Applies `fn` to every array of a (possibly dict/tuple-nested) value."""
    if isinstance(value, dict):
        return {key: _map(item, fn) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_map(item, fn) for item in value)
    return fn(value)


def batch_to_torch(batch, device=None, non_blocking: bool = True) -> TorchSegments:
    """Returns every field of a `SegmentBatch` as torch tensors, in a `TorchSegments`.

    On the CPU (``device`` None or ``"cpu"``) each tensor is a ``torch.from_numpy`` view: it shares memory
    with the batch (with the shared segment buffer itself when ``batch.zero_copy``), so nothing is copied
    and the tensors are valid until ``batch.release()``.  For a CUDA device, the shared block is page-locked
    once (cudaHostRegister) and zero-copy views are copied straight from it to the device; other arrays
    are staged through pinned memory.  Copies are asynchronous when `non_blocking` (ordered on the current
    stream, so kernels launched afterwards on it see the data; release the batch only after they ran).

    Structured observations and actions (Dict/Tuple spaces) come back as dicts/tuples of tensors.
    ``final_obs`` comes back as ``(observations, positions)`` tensors; the batch's buffer row indices as
    ``rows``.

    Args:
        batch: a live `SegmentBatch`.
        device: a torch device, or None for the CPU.
        non_blocking: asynchronous host-to-device copies (CUDA only).

    Returns:
        A `TorchSegments` with one attribute per name of ``batch.fields()``, plus ``final_obs`` and ``rows``.

    Raises:
        RuntimeError: the batch was released.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu":
        convert = _as_tensor
    else:
        pin = device.type == "cuda" and torch.cuda.is_available()
        # Zero-copy views lie in the shared block: page-lock it once and copy straight from it.
        storage = getattr(batch, "_storage", None)
        registered = pin and storage is not None and storage.register_with_cuda()
        block = (storage.pointer, storage.nbytes) if registered else None

        def convert(array: np.ndarray) -> torch.Tensor:
            host = _as_tensor(array)
            if pin and not (block is not None and _inside(array, *block)):
                host = host.pin_memory()
            return host.to(device, non_blocking=non_blocking and pin)

    arrays = batch.numpy() if hasattr(batch, "numpy") else {}  # one liveness check, not one per field
    tensors = {name: _map(arrays[name] if name in arrays else getattr(batch, name), convert)
               for name in batch.fields()}
    final_obs, positions = batch.final_obs
    tensors["final_obs"] = (_map(final_obs, convert), convert(positions))
    tensors["rows"] = torch.from_numpy(np.asarray(batch.rows))
    return TorchSegments(tensors)


def _clipped_ratios(ratio, rho_clip, c_clip, clip):
    """``(rho, c)`` = ``(min(rho_clip, ratio), min(c_clip, ratio))``; no clip where a clip is None."""
    rho = ratio if rho_clip is None else clip(ratio, rho_clip)
    c = ratio if c_clip is None else clip(ratio, c_clip)
    return rho, c


def gae_torch(batch, gamma: float, lam: float, rho_clip: float | None = None, c_clip: float | None = None,
              behaviour_logprob=None, target_logprob=None):
    """GAE over ``[n, T]`` torch tensors, vectorized across rows (a loop over T only).

    Same semantics as the C kernel behind `segvec.gae`: ``delta[t] = reward[t] + gamma * next_value[t] -
    value[t]`` (``next_value`` taken as 0 where terminated), ``A[t] = delta[t] + gamma * lam * A[t + 1]``,
    the recursion stopping at terminated or truncated steps and at ``t = length - 1``; steps past
    ``length`` or with ``mask`` False get advantage and return 0.

    With `target_logprob`, V-trace-style clipped importance weights for data from older policies:
    ``rho[t] = min(rho_clip, pi/mu)`` multiplies ``delta[t]`` and ``c[t] = min(c_clip, pi/mu)`` multiplies
    the recursion (``A[t] = rho[t] delta[t] + gamma * lam * c[t] * A[t + 1]``), ``mu`` being
    `behaviour_logprob` (default ``batch.logprob``).  With ratios 1 and clips >= 1 this is plain GAE.

    Args:
        batch: anything with ``reward, value, next_value, terminated, truncated, mask`` ``[n, T]`` and
            ``length`` ``[n]`` as tensors (a `TorchSegments`), on any device.
        gamma, lam: discount and GAE lambda.
        rho_clip, c_clip: clips of the importance ratios (None: no clip).
        behaviour_logprob, target_logprob: ``[n, T]`` log-probabilities of the taken actions.

    Returns:
        ``(advantages, returns)``, ``[n, T]`` float32 tensors on the batch's device; ``returns =
        advantages + value`` on real steps.
    """
    reward = torch.as_tensor(batch.reward).float()
    device = reward.device
    value = torch.as_tensor(batch.value, device=device).float()
    next_value = torch.as_tensor(batch.next_value, device=device).float()
    terminated = torch.as_tensor(batch.terminated, device=device).bool()
    truncated = torch.as_tensor(batch.truncated, device=device).bool()
    mask = torch.as_tensor(batch.mask, device=device).bool()
    length = torch.as_tensor(batch.length, device=device).long()
    n, T = reward.shape
    steps = torch.arange(T, device=device)
    valid = mask & (steps[None, :] < length[:, None])
    stop = terminated | truncated | (steps[None, :] == (length[:, None] - 1))
    next_value = torch.where(terminated, torch.zeros_like(next_value), next_value)
    # Same float32 operations, in the same order, as the C kernel.
    delta = reward + float(np.float32(gamma)) * next_value - value
    decay = float(np.float32(gamma) * np.float32(lam))
    carry = torch.where(stop, torch.zeros_like(value), torch.full_like(value, decay))
    if target_logprob is not None:
        behaviour = batch.logprob if behaviour_logprob is None else behaviour_logprob
        target = torch.as_tensor(target_logprob, device=device).float()
        behaviour = torch.as_tensor(behaviour, device=device).float()
        rho, c = _clipped_ratios(torch.exp(target - behaviour), rho_clip, c_clip,
                                 lambda ratio, most: ratio.clamp(max=float(most)))
        delta = rho * delta
        carry = carry * c
    delta = torch.where(valid, delta, torch.zeros_like(delta))
    carry = torch.where(valid, carry, torch.zeros_like(carry))
    advantages = torch.zeros((n, T), dtype=torch.float32, device=device)
    running = torch.zeros(n, dtype=torch.float32, device=device)
    for t in range(T - 1, -1, -1):
        running = delta[:, t] + carry[:, t] * running
        advantages[:, t] = running
    returns = torch.where(valid, advantages + value, torch.zeros_like(value))
    return advantages, returns


def gae_numpy_clipped(batch, gamma: float, lam: float, rho_clip: float | None = None,
                      c_clip: float | None = None, behaviour_logprob=None, target_logprob=None):
    """`gae_torch`'s clipped GAE on numpy arrays (a `SegmentBatch`), vectorized across rows.

    Args and returns as `gae_torch`, with numpy ``[n, T]`` float32 arrays.  Without `target_logprob` the
    weights are 1 (plain GAE, as the C kernel computes it).
    """
    reward = np.asarray(batch.reward, np.float32)
    value = np.asarray(batch.value, np.float32)
    next_value = np.asarray(batch.next_value, np.float32)
    terminated = np.asarray(batch.terminated, bool)
    truncated = np.asarray(batch.truncated, bool)
    mask = np.asarray(batch.mask, bool)
    length = np.asarray(batch.length, np.int64)
    n, T = reward.shape
    steps = np.arange(T)
    valid = mask & (steps[None, :] < length[:, None])
    stop = terminated | truncated | (steps[None, :] == (length[:, None] - 1))
    next_value = np.where(terminated, np.float32(0), next_value)
    delta = reward + np.float32(gamma) * next_value - value
    carry = np.where(stop, np.float32(0), np.float32(gamma) * np.float32(lam)).astype(np.float32)
    if target_logprob is not None:
        behaviour = batch.logprob if behaviour_logprob is None else behaviour_logprob
        ratio = np.exp(np.asarray(target_logprob, np.float32) - np.asarray(behaviour, np.float32))
        rho, c = _clipped_ratios(ratio, rho_clip, c_clip, lambda r, most: np.minimum(r, np.float32(most)))
        delta = rho * delta
        carry = carry * c
    delta = np.where(valid, delta, np.float32(0)).astype(np.float32)
    carry = np.where(valid, carry, np.float32(0)).astype(np.float32)
    advantages = np.zeros((n, T), np.float32)
    running = np.zeros(n, np.float32)
    for t in range(T - 1, -1, -1):
        running = delta[:, t] + carry[:, t] * running
        advantages[:, t] = running
    returns = np.where(valid, advantages + value, np.float32(0)).astype(np.float32)
    return advantages, returns
