"""Infos in gymnasium's vector layout: one array per key over the batch, plus a ``_key`` mask of the envs
that have it.  Envs flag a non-empty info in the block (``env_has_info``); the info itself comes from the
backend (a pipe message, or the serial runner's dict)."""
from __future__ import annotations

import numpy as np

from segvec.objects import FINAL_OBS_KEY, OBJECTS_KEY


def add_info(infos: dict, env_info: dict, index: int, size: int) -> dict:
    """Adds one env's info at batch position `index` to batched `infos` (of batch `size`); returns it."""
    for key, value in env_info.items():
        if key == "final_obs":
            array = infos.get("final_obs")
            if array is None:
                array = np.full(size, None, dtype=object)
            array[index] = value
        elif isinstance(value, dict):
            array = add_info(infos.get(key, {}), value, index, size)
        else:
            array = infos.get(key)
            if array is None:
                if type(value) in (int, float, bool) or issubclass(type(value), np.number):
                    array = np.zeros(size, dtype=type(value))
                elif isinstance(value, np.ndarray):
                    array = np.zeros((size, *value.shape), dtype=value.dtype)
                else:
                    array = np.full(size, None, dtype=object)
            array[index] = value
        mask = infos.get(f"_{key}")
        if mask is None:
            mask = np.zeros(size, dtype=np.bool_)
        mask[index] = True
        infos[key], infos[f"_{key}"] = array, mask
    return infos


def spread_infos(batch_infos: dict, env_ids: np.ndarray, size: int) -> dict:
    """Re-indexes infos built for positions 0..k-1 of `env_ids` to env positions in a batch of `size`."""
    out: dict = {}
    for key, value in batch_infos.items():
        if isinstance(value, dict):
            out[key] = spread_infos(value, env_ids, size)
        else:
            array = np.asarray(value)
            full = np.zeros((size,) + array.shape[1:], dtype=array.dtype) if array.dtype != object \
                else np.full(size, None, dtype=object)
            full[env_ids] = array
            out[key] = full
    return out


def collect_infos(backend, storage, env_ids: np.ndarray, size: int, deadline: float | None = None) -> dict:
    """The infos of `env_ids` (at batch positions 0..len-1 of a batch of `size`), their flags cleared.

    SAME_STEP envs whose episode ended get ``final_obs`` (the env's own object) and ``final_info``.  The
    parts of observations with no fixed shape go to ``storage.objects`` on the way.
    """
    infos: dict = {}
    every_env = len(env_ids) == len(storage.env_has_info)  # (then a slice: no gather of the flags)
    if not (storage.env_has_info if every_env else storage.env_has_info[env_ids]).any():
        return infos
    batched = backend.batched_infos(env_ids, size, deadline)
    if batched is not None:  # a batched engine's own infos, already in this layout
        storage.env_has_info[env_ids] = 0
        return batched
    env_infos, final_infos = backend.infos_for(env_ids, deadline)
    storage.env_has_info[env_ids] = 0
    positions = {int(e): i for i, e in enumerate(env_ids)}
    for env_index, final_info in final_infos.items():
        final_info = dict(final_info)
        final_obs = final_info.pop(FINAL_OBS_KEY, None)
        if storage.objects is not None:
            storage.objects.final[env_index] = final_obs
        add_info(infos, {"final_obs": final_obs, "final_info": final_info}, positions[env_index], size)
    for env_index, info in env_infos.items():
        if OBJECTS_KEY in info:
            info = dict(info)
            storage.objects.receive(env_index, info.pop(OBJECTS_KEY))
            if not info:
                continue
        add_info(infos, info, positions[env_index], size)
    return infos
