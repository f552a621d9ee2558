"""The env side of a step: run envs, write their results into the segment block, publish them.

`EnvRunner` is the code every backend runs for the envs it owns: the serial backend calls it in the
learner's process, a multiprocessing worker calls it in its own.  It reads each env's action from the
env's current slot, steps the env, records the outcome with one call into the C core for the whole batch,
scatters the new observations into their slots (and the finished row's ``obs[horizon]``), and publishes.
"""
from __future__ import annotations

import traceback
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode

from segvec._core import Storage, check, ffi, lib


class EnvFailure(Exception):
    """An env raised; carries what the learner needs to rebuild the error in its own process."""

    def __init__(self, env_index: int, action: str, error: BaseException):
        super().__init__(env_index, action, repr(error))
        self.env_index = env_index
        self.action = action
        self.error = error
        self.worker_traceback = "".join(traceback.format_exception(type(error), error, error.__traceback__))


class ObservationMismatch(ValueError):
    """An env returned an observation that does not fit its space's shape/dtype."""


class EnvRunner:
    """Steps envs ``first_env .. first_env + len(envs) - 1`` of a vector env.

    Args:
        envs: the env objects, in env-index order.
        first_env: index of ``envs[0]`` in the vector env.
        storage: views of the segment block.
        autoreset_mode: a gymnasium ``AutoresetMode``.
    """

    def __init__(self, envs: list, first_env: int, storage: Storage, autoreset_mode: AutoresetMode):
        self.envs = envs
        self.first_env = first_env
        self.storage = storage
        self.autoreset_mode = autoreset_mode
        self.obs_layout = storage.obs_layout
        self.action_layout = storage.action_layout
        self.horizon = storage.geometry.horizon
        n = len(envs)
        self._rewards = np.zeros(n, np.float64)
        self._terminated = np.zeros(n, np.uint8)
        self._truncated = np.zeros(n, np.uint8)
        self._valid = np.zeros(n, np.uint8)
        self._started = np.zeros(n, np.uint8)
        self._needs_reset = np.zeros(n, np.uint8)
        self._obs_slots = np.zeros(n, np.int64)
        self._chain_slots = np.zeros(n, np.int64)
        self._obs_out = [np.zeros((n,) + leaf.shape, leaf.dtype) for leaf in self.obs_layout.leaves]
        self._pending_reset = np.zeros(n, bool)  # NEXT_STEP: the env's last step ended an episode
        self._flat_obs = self.obs_layout.is_flat
        self._obs_checks = [(leaf.shape, leaf.dtype) for leaf in self.obs_layout.leaves]

    # ---- writing observations ---------------------------------------------------------------------
    def _put_obs(self, i: int, obs: Any, env_index: int) -> None:
        values = (obs,) if self._flat_obs else self.obs_layout.flatten(obs)
        for out, value, (shape, dtype) in zip(self._obs_out, values, self._obs_checks):
            array = np.asarray(value)
            if array.shape != shape:
                raise ObservationMismatch(
                    f"env {env_index} returned an observation of shape {array.shape}, its space says {shape}")
            if array.dtype != dtype and not np.can_cast(array.dtype, dtype, casting="same_kind"):
                raise ObservationMismatch(
                    f"env {env_index} returned an observation of dtype {array.dtype}, its space says {dtype}")
            out[i] = array

    def _scatter_obs(self, count: int) -> None:
        slots = self._obs_slots[:count]
        chain = self._chain_slots[:count]
        has_chain = chain >= 0
        for by_slot, out in zip(self.storage.obs_by_slot, self._obs_out):
            by_slot[slots] = out[:count]
            if has_chain.any():
                by_slot[chain[has_chain]] = out[:count][has_chain]

    def _publish(self, env_ids: np.ndarray) -> None:
        check(lib.segvec_publish(self.storage.core, len(env_ids), ffi.from_buffer("int32_t[]", env_ids)))

    # ---- reset ------------------------------------------------------------------------------------
    def reset(self, env_ids: np.ndarray, seeds: list, options: dict | None) -> dict[int, dict]:
        """Resets `env_ids` (whose rows the learner has flushed), writes and publishes their observations.

        Returns:
            ``{env_index: info}`` for the envs whose reset info is not empty.
        Raises:
            EnvFailure: an env raised; the envs reset before it are published, it and later ones are not.
        """
        infos: dict[int, dict] = {}
        done = 0
        failure = None
        for i, env_index in enumerate(env_ids):
            local = env_index - self.first_env
            try:
                obs, info = self.envs[local].reset(seed=seeds[i], options=options)
                self._put_obs(i, obs, int(env_index))
            except Exception as error:  # noqa: BLE001 - reported to the learner with its traceback
                failure = EnvFailure(int(env_index), "reset", error)
                break
            self._pending_reset[local] = False
            if info:
                infos[int(env_index)] = info
            done += 1
        ids = np.ascontiguousarray(env_ids[:done], dtype=np.int32)
        if done:
            check(lib.segvec_commit_resets(self.storage.core, done, ffi.from_buffer("int32_t[]", ids),
                                           ffi.from_buffer("int64_t[]", self._obs_slots)))
            self._chain_slots[:done] = -1
            self._scatter_obs(done)
            self._mark_infos(ids, infos)
        if failure is not None:
            raise failure
        return infos

    # ---- step -------------------------------------------------------------------------------------
    def step(self, env_ids: np.ndarray) -> tuple[dict[int, dict], dict[int, dict]]:
        """Steps `env_ids` with the actions stored at their current slots, and records the results.

        The caller publishes them (after sending infos) with `publish`.

        Returns:
            ``(infos, final_infos)``: non-empty step/reset infos, and for SAME_STEP envs whose episode
            ended, the info of the ending step (their final observation is in ``storage.final_obs``).
        Raises:
            EnvFailure: an env raised; the envs stepped before it are committed (not published).
        """
        storage = self.storage
        count = len(env_ids)
        slots = storage.env_row[env_ids].astype(np.int64) * self.horizon + storage.env_step[env_ids]
        if self.action_layout.is_flat:
            actions = storage.action_by_slot[0][slots]
        else:
            leaves = [by_slot[slots] for by_slot in storage.action_by_slot]
        mode = self.autoreset_mode
        infos: dict[int, dict] = {}
        final_infos: dict[int, dict] = {}
        envs, first = self.envs, self.first_env
        rewards, terminated, truncated = self._rewards, self._terminated, self._truncated
        valid, started, needs_reset, pending = self._valid, self._started, self._needs_reset, self._pending_reset
        done = 0
        failure = None
        for i in range(count):
            env_index = int(env_ids[i])
            local = env_index - first
            env = envs[local]
            try:
                if mode == AutoresetMode.NEXT_STEP and pending[local]:
                    obs, info = env.reset()
                    rewards[i] = 0.0
                    terminated[i] = truncated[i] = valid[i] = 0
                    started[i] = 1
                    pending[local] = False
                else:
                    action = actions[i] if self.action_layout.is_flat else \
                        self.action_layout.structure([leaf[i] for leaf in leaves])
                    obs, reward, term, trunc, info = env.step(action)
                    rewards[i] = reward
                    terminated[i] = term
                    truncated[i] = trunc
                    valid[i] = 1
                    started[i] = 0
                    if term or trunc:
                        if mode == AutoresetMode.SAME_STEP:
                            values = (obs,) if self._flat_obs else self.obs_layout.flatten(obs)
                            for staging, value in zip(storage.final_obs, values):
                                staging[env_index] = value
                            final_infos[env_index] = info
                            obs, info = env.reset()
                            started[i] = 1
                        elif mode == AutoresetMode.NEXT_STEP:
                            pending[local] = True
                needs_reset[i] = pending[local]
                self._put_obs(i, obs, env_index)
            except Exception as error:  # noqa: BLE001 - reported to the learner with its traceback
                failure = EnvFailure(env_index, "step", error)
                break
            if info:
                infos[env_index] = info
            done += 1
        if done:
            ids = env_ids if done == count else env_ids[:done]
            check(lib.segvec_commit_steps(
                storage.core, done, ffi.from_buffer("int32_t[]", ids),
                ffi.from_buffer("double[]", rewards), ffi.from_buffer("uint8_t[]", terminated),
                ffi.from_buffer("uint8_t[]", truncated), ffi.from_buffer("uint8_t[]", valid),
                ffi.from_buffer("uint8_t[]", started), ffi.from_buffer("uint8_t[]", needs_reset),
                ffi.from_buffer("int64_t[]", self._obs_slots), ffi.from_buffer("int64_t[]", self._chain_slots)))
            self._scatter_obs(done)
            if infos or final_infos:
                self._mark_infos(ids, infos, final_infos)
        if failure is not None:
            failure.committed = done
            raise failure
        return infos, final_infos

    def _mark_infos(self, env_ids, infos, final_infos=None) -> None:
        flags = self.storage.env_has_info
        for env_index in infos:
            flags[env_index] = 1
        for env_index in final_infos or ():
            flags[env_index] = 1

    def publish(self, env_ids: np.ndarray) -> None:
        """Hands `env_ids` to the learner (their observations and infos must be in place)."""
        if len(env_ids):
            self._publish(np.ascontiguousarray(env_ids, dtype=np.int32))

    def close(self) -> None:
        """Closes every env, ignoring errors of individual envs' close()."""
        for env in self.envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - closing must go on for the other envs
                pass
