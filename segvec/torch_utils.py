"""Everything of segvec that needs torch: the hand-off of segment batches (`TorchSegments`) and GAE over
torch tensors.

torch is optional for segvec: this module is the only one that imports it at module level, and it is imported
only by ``SegmentBatch.to_torch``, by `segvec.gae` when it is given torch tensors, and by
``segvec.TorchSegments``.

Layouts are the batch's own, segment-major: ``obs`` ``[n, T + 1, *obs_shape]``, per-step fields ``[n, T]``,
per-row fields ``[n]``.  A trainer that wants time-major data views them with ``.transpose(0, 1)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from segvec.advantages import check_gae_inputs, warn_unsent


class TorchSegments:
    """Torch tensors of a `SegmentBatch`, one attribute per field (see `batch_to_torch`)."""

    def __init__(self, tensors: dict):
        self.__dict__.update(tensors)

    def __repr__(self) -> str:
        return f"TorchSegments({', '.join(sorted(self.__dict__))})"


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing memory with `array` (a contiguous copy only if torch cannot view it)."""
    try:
        return torch.from_numpy(array)
    except (TypeError, ValueError, RuntimeError):  # negative strides, dtypes torch lacks
        return torch.from_numpy(np.ascontiguousarray(array))


def _inside(array: np.ndarray, start: int, nbytes: int) -> bool:
    """True when `array`'s memory lies within the block at address `start` (so it is page-locked already)."""
    address = array.__array_interface__["data"][0]
    return start <= address and address + array.nbytes <= start + nbytes


def register_with_cuda(storage) -> bool:
    """Page-locks a whole segment block for CUDA (once), so that host-to-device copies of zero-copy batch
    views are asynchronous DMA with no staging copy; the block unregisters itself when it closes.  Returns
    False when CUDA is absent or refuses (then callers stage through pinned memory)."""
    registered = getattr(storage, "cuda_registered", None)
    if registered is None:
        registered = False
        try:
            if torch.cuda.is_available():
                status = torch.cuda.cudart().cudaHostRegister(storage.address, storage.nbytes, 0)
                registered = int(getattr(status, "value", status)) == 0
        except Exception:  # noqa: BLE001 - any failure means: stage through pinned memory
            registered = False
        if registered:
            storage.close_callbacks.append(lambda: torch.cuda.cudart().cudaHostUnregister(storage.address))
        storage.cuda_registered = registered
    return registered


def _map(value: Any, fn):
    """Applies `fn` to every array of a (possibly dict/tuple-nested) value; arrays of Python objects (parts
    of a space with no fixed shape) stay numpy object arrays."""
    if isinstance(value, dict):
        return {key: _map(item, fn) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_map(item, fn) for item in value)
    if isinstance(value, np.ndarray) and value.dtype == object:
        return value
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
        registered = pin and storage is not None and register_with_cuda(storage)
        block = (storage.address, storage.nbytes) if registered else None

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


def _kind(tensor: torch.Tensor) -> str:
    """The numpy dtype kind character of a tensor's dtype (``"u"`` and ``"i"`` both read ``"i"``)."""
    dtype = tensor.dtype
    return "b" if dtype == torch.bool else "c" if dtype.is_complex else "f" if dtype.is_floating_point else "i"


def gae_torch(batch, gamma: float, lam: float, rho_clip: float | None = None, c_clip: float | None = None,
              behaviour_logprob=None, target_logprob=None):
    """GAE over ``(n, T)`` torch tensors, vectorized across rows (a loop over T only).

    Same semantics and, without clips, the same float32 operations in the same order as the C kernel behind
    `segvec.gae` (see `segvec.advantages`): ``delta[t] = reward[t] + gamma * next_value[t] - value[t]``
    (``next_value`` taken as 0 where terminated, even if NaN), ``A[t] = delta[t] + gamma * lam * A[t + 1]``,
    the recursion stopping at terminated or truncated steps and at ``t = length - 1``; steps past ``length``
    or with ``mask`` False get advantage and return 0 and restart the recursion.  The recursion is cut with
    ``torch.where``, never by multiplying with 0, so a NaN stays within its episode as in the C kernel.

    A NaN ``value`` on a real step (none was sent) or, with `target_logprob`, a NaN behaviour log-probability
    warns (`segvec.SegvecWarning`): the advantages it reaches are NaN.

    With `target_logprob`, V-trace-style clipped importance weights for data from older policies:
    ``rho[t] = min(rho_clip, pi/mu)`` multiplies ``delta[t]`` and ``c[t] = min(c_clip, pi/mu)`` multiplies
    the recursion (``A[t] = rho[t] delta[t] + gamma * lam * c[t] * A[t + 1]``), ``mu`` being
    `behaviour_logprob` (default ``batch.logprob``).  With ratios 1 and clips >= 1 this is plain GAE.

    Args:
        batch: anything with ``reward, value, next_value, terminated, truncated, mask`` ``(n, T)`` and
            ``length`` ``(n,)`` as tensors (a `TorchSegments`) on any device, or as arrays (moved to
            ``reward``'s device).
        gamma, lam: discount and GAE lambda.
        rho_clip, c_clip: clips of the importance ratios (None: no clip).
        behaviour_logprob, target_logprob: ``(n, T)`` log-probabilities of the taken actions.

    Returns:
        ``(advantages, returns)``, ``(n, T)`` float32 tensors on the batch's device; ``returns =
        advantages + value`` on real steps, 0 elsewhere.

    Raises:
        TypeError, ValueError: as `segvec.advantages.check_gae_inputs` (a field's shape, kind or range, the
            scalars).
    """
    x, gamma, lam, rho_clip, c_clip = check_gae_inputs(batch, gamma, lam, rho_clip, c_clip, behaviour_logprob,
                                                       target_logprob, asarray=torch.as_tensor, kind=_kind)
    device = x["reward"].device
    reward, value, next_value = (x[name].to(device, torch.float32) for name in ("reward", "value", "next_value"))
    terminated, truncated, mask = (x[name].to(device, torch.bool) for name in ("terminated", "truncated", "mask"))
    n, T = reward.shape
    steps = torch.arange(T, device=device)
    length = x["length"].to(device, torch.long)[:, None]
    valid = mask & (steps < length)
    checked = {"value": value}
    if target_logprob is not None:
        checked["behaviour_logprob"] = x["behaviour_logprob"].to(device, torch.float32)
    for key, array in checked.items():
        nan = torch.isnan(array) & valid
        if nan.any():  # (one read back from the device per check)
            warn_unsent(key, int(nan.sum()), int(valid.sum()))
    carries = valid & ~(terminated | truncated | (steps == length - 1))
    zero = torch.zeros((), device=device)
    # Same float32 operations, in the same order, as the C kernel.
    delta = reward + float(np.float32(gamma)) * torch.where(terminated, zero, next_value) - value
    carry = torch.full((n, T), float(np.float32(gamma) * np.float32(lam)), device=device)
    if target_logprob is not None:
        target, behaviour = (x[name].to(device, torch.float32) for name in ("target_logprob", "behaviour_logprob"))
        ratio = torch.exp(target - behaviour)
        delta = delta * (ratio if rho_clip is None else ratio.clamp(max=rho_clip))
        carry = carry * (ratio if c_clip is None else ratio.clamp(max=c_clip))
    delta = torch.where(valid, delta, zero)
    advantages = torch.zeros((n, T), dtype=torch.float32, device=device)
    running = torch.zeros(n, dtype=torch.float32, device=device)
    for t in range(T - 1, -1, -1):
        running = torch.where(carries[:, t], delta[:, t] + carry[:, t] * running, delta[:, t])
        advantages[:, t] = running
    return advantages, torch.where(valid, advantages + value, zero)
