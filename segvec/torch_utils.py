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

from segvec.advantages import head_axis, check_gae_inputs, warn_unsent


class TorchSegments:
    """Torch tensors of a `SegmentBatch`, one attribute per field (see `batch_to_torch`)."""

    def __init__(self, tensors: dict):
        self.__dict__.update(tensors)

    def __repr__(self) -> str:
        return f"TorchSegments({', '.join(sorted(self.__dict__))})"


_CPU = torch.device("cpu")


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


# Fields whose rows are at least this many bytes are copied run by run from the block; smaller ones, when the
# rows are not one run, are gathered on the host first (a few KiB a row: one copy beats many small ones).
RUN_COPY_MIN_BYTES = 1 << 16


def batch_to_torch(batch, device=None, non_blocking: bool = True, copy: bool = False, fields=None) -> TorchSegments:
    """Returns the fields of a `SegmentBatch` (or of `SegmentRows`, a selection of its rows) as torch tensors,
    in a `TorchSegments`.

    On the CPU (``device`` None or ``"cpu"``) with `copy` False, each tensor is a ``torch.from_numpy`` view of
    the batch's field: of the shared segment buffer itself when ``batch.zero_copy``, else of the field the
    batch gathered (on first access), so the tensors are valid until ``batch.release()``.

    For any other device, and on the CPU with `copy` True, each field becomes one fresh tensor
    ``[n, ...]`` on `device`, filled run by run: every run of adjacent buffer rows (``batch.runs``) is copied
    straight from the block into its place, with no host gather (fields of fewer than `RUN_COPY_MIN_BYTES`
    bytes a row, when the rows are not one run, are gathered on the host first: a small copy).  For CUDA the
    shared block is page-locked once (cudaHostRegister), so these copies are DMA from shared memory,
    asynchronous when `non_blocking` (ordered on the current stream; ``batch.release()`` waits for them);
    what does not live in the block (``final_obs``) is staged through pinned memory.

    Structured observations and actions (Dict/Tuple spaces) come back as dicts/tuples of tensors; parts with
    no fixed shape stay numpy object arrays.  ``final_obs`` comes back as ``(observations, positions)``
    tensors; the batch's buffer row indices as ``rows`` (a CPU tensor).

    Args:
        batch: a live `SegmentBatch` or `SegmentRows` (or any object with ``fields()``, the fields as
            attributes, ``final_obs`` and ``rows``: its arrays are converted one by one).
        device: a torch device, or None for the CPU.
        non_blocking: asynchronous host-to-device copies (CUDA only).
        copy: on the CPU, fresh tensors (copied run by run, as for a device) instead of views.
        fields: the names to convert (default: every name of ``batch.fields()`` and ``final_obs``).

    Returns:
        A `TorchSegments` with one attribute per converted name, plus ``rows``.

    Raises:
        RuntimeError: the batch was released.  AttributeError: a name in `fields` is no field.
    """
    device = _CPU if device is None else torch.device(device)
    check_live = getattr(batch, "_check_live", None)
    if check_live is not None:
        check_live()
    if fields is None:
        names = list(batch.fields()) + ["final_obs"]
    else:
        names, known = list(fields), set(batch.fields()) | {"final_obs"}
        for name in names:
            if name not in known:
                raise AttributeError(f"{type(batch).__name__} has no field {name!r}")
    tensors: dict[str, Any] = {}
    if device.type == "cpu" and not copy:  # views of the fields (the hot path of CPU trainers: kept short)
        arrays = batch._arrays(names) if hasattr(batch, "_arrays") else {name: getattr(batch, name) for name in names}
        for name, array in arrays.items():
            if type(array) is np.ndarray and array.dtype != object:
                tensors[name] = _as_tensor(array)
            elif name == "final_obs":
                tensors[name] = (_map(array[0], _as_tensor), _as_tensor(array[1]))
            else:
                tensors[name] = _map(array, _as_tensor)
        tensors["rows"] = torch.from_numpy(np.asarray(batch.rows))
        return TorchSegments(tensors)
    pin = device.type == "cuda" and torch.cuda.is_available()
    storage = getattr(batch, "_storage", None)
    registered = pin and storage is not None and register_with_cuda(storage)
    block = (storage.address, storage.nbytes) if registered else None

    def stage(array: np.ndarray) -> torch.Tensor:
        """A host array to `device`: pinned first for CUDA, unless it lies in the page-locked block."""
        host = _as_tensor(array)
        if device.type == "cpu":
            return host.clone()
        if pin and not (block is not None and _inside(array, *block)):
            host = host.pin_memory()
        return host.to(device, non_blocking=non_blocking and pin)

    if hasattr(batch, "_block_field"):  # run by run, from the block
        selection = batch._selection
        runs = selection.runs.tolist()
        n = len(selection.rows)
        one_run = len(runs) <= 1
        direct = non_blocking and registered  # asynchronous DMA straight from the page-locked block

        def from_block(array: np.ndarray) -> torch.Tensor:
            """This selection's rows of a block array ``[S, ...]``, as one tensor on `device`."""
            if not one_run and array[0].nbytes < RUN_COPY_MIN_BYTES:
                return stage(selection.gather(array))  # small rows, several runs: one host gather
            out = None
            for position, row, count in runs:
                part = _as_tensor(array[row:row + count])
                if out is None:
                    out = torch.empty((n,) + tuple(part.shape[1:]), dtype=part.dtype, device=device)
                out[position:position + count].copy_(part, non_blocking=direct)
            if out is None:  # no rows
                out = _as_tensor(array[:0]).to(device)
            return out

        for name in names:
            if name == "final_obs":
                continue
            leaves, objects, layout = batch._block_field(name)
            if layout is None:
                tensors[name] = from_block(leaves[0])
            else:
                tensors[name] = layout.structure([from_block(leaf) for leaf in leaves], list(objects))
        if direct and n:
            event = torch.cuda.Event()
            event.record()
            batch._on_release(event.synchronize)  # the rows are read by the copies until the event
    else:  # any other batch: its arrays one by one
        for name in names:
            if name != "final_obs":
                tensors[name] = _map(getattr(batch, name), stage)
    if "final_obs" in names:
        final_obs, positions = batch.final_obs
        tensors["final_obs"] = (_map(final_obs, stage), stage(positions))
    tensors["rows"] = torch.from_numpy(np.asarray(batch.rows))
    return TorchSegments(tensors)


def _kind(tensor: torch.Tensor) -> str:
    """The numpy dtype kind character of a tensor's dtype (``"u"`` and ``"i"`` both read ``"i"``)."""
    dtype = tensor.dtype
    return "b" if dtype == torch.bool else "c" if dtype.is_complex else "f" if dtype.is_floating_point else "i"


def gae_torch(batch, gamma: float, lam: float, rho_clip: float | None = None, c_clip: float | None = None,
              behaviour_logprob=None, target_logprob=None):
    """GAE over ``(n, T)`` (or, with k value heads, ``(n, T, k)``) torch tensors, vectorized across rows
    and heads (a loop over T only).

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
        batch: anything with ``reward, value, next_value`` ``(n, T)`` or ``(n, T, k)``, ``terminated,
            truncated, mask`` ``(n, T)`` and ``length`` ``(n,)`` as tensors (a `TorchSegments`) on any device,
            or as arrays (moved to ``reward``'s device).
        gamma, lam: discount and GAE lambda; with value heads, one number for all or one per head.
        rho_clip, c_clip: clips of the importance ratios (None: no clip).
        behaviour_logprob, target_logprob: ``(n, T)`` log-probabilities of the taken actions.

    Returns:
        ``(advantages, returns)``, float32 tensors of ``reward``'s shape on the batch's device; ``returns =
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
    n, T = reward.shape[:2]
    steps = torch.arange(T, device=device)
    length = x["length"].to(device, torch.long)[:, None]
    valid = mask & (steps < length)
    checked = {"value": value}
    if target_logprob is not None:
        checked["behaviour_logprob"] = x["behaviour_logprob"].to(device, torch.float32)
    for key, array in checked.items():
        nan = torch.isnan(array)
        nan = (nan.any(dim=2) if nan.dim() == 3 else nan) & valid  # (a step counts once, whatever its heads)
        if nan.any():  # (one read back from the device per check)
            warn_unsent(key, int(nan.sum()), int(valid.sum()))
    carries = valid & ~(terminated | truncated | (steps == length - 1))
    per_head = head_axis(reward)  # (n, T) flags and weights -> (n, T, 1) with value heads
    terminated, valid, carries = per_head(terminated), per_head(valid), per_head(carries)
    zero = torch.zeros((), device=device)
    # Same float32 operations, in the same order, as the C kernel.
    if reward.dim() == 3:
        gammas = torch.tensor(np.asarray(gamma, np.float32), device=device)
        carry = torch.tensor(np.asarray(gamma, np.float32) * np.asarray(lam, np.float32), device=device)
        delta = reward + gammas * torch.where(terminated, zero, next_value) - value
        carry = carry.expand(reward.shape)
    else:
        delta = reward + float(np.float32(gamma)) * torch.where(terminated, zero, next_value) - value
        carry = torch.full((n, T), float(np.float32(gamma) * np.float32(lam)), device=device)
    if target_logprob is not None:
        target, behaviour = (x[name].to(device, torch.float32) for name in ("target_logprob", "behaviour_logprob"))
        ratio = per_head(torch.exp(target - behaviour))
        delta = delta * (ratio if rho_clip is None else ratio.clamp(max=rho_clip))
        carry = carry * (ratio if c_clip is None else ratio.clamp(max=c_clip))
    delta = torch.where(valid, delta, zero)
    advantages = torch.zeros(reward.shape, dtype=torch.float32, device=device)
    running = torch.zeros((n,) + tuple(reward.shape[2:]), dtype=torch.float32, device=device)
    for t in range(T - 1, -1, -1):
        running = torch.where(carries[:, t], delta[:, t] + carry[:, t] * running, delta[:, t])
        advantages[:, t] = running
    return advantages, torch.where(valid, advantages + value, zero)
