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
        env_fns: the envs' factories; when given, an env that raises in ``step`` is rebuilt and reset
            instead of failing the batch (its row is closed as a truncated partial segment).
    """

    def __init__(self, envs: list, first_env: int, storage: Storage, autoreset_mode: AutoresetMode,
                 env_fns: list | None = None):
        self.envs = envs
        self.env_fns = env_fns  # set: rebuild an env that raises in step (restart_failed_envs)
        self.first_env = first_env
        self.storage = storage
        self.autoreset_mode = autoreset_mode
        self.obs_layout = storage.obs_layout
        self.action_layout = storage.action_layout
        self.horizon = storage.geometry.horizon
        n = len(envs)
        self._outcomes = np.zeros((n, 6), np.float64)  # segvec_outcome_t rows, see native/segvec.h
        self._obs_slots = np.zeros(n, np.int64)
        self._chain_slots = np.zeros(n, np.int64)
        self._action_slots = np.zeros(n, np.int64)
        self._obs_out = [np.zeros((n,) + leaf.shape, leaf.dtype) for leaf in self.obs_layout.leaves]
        self._pending_reset = [False] * n  # NEXT_STEP: the env's last step ended an episode
        self._pending_restart: list = [None] * n  # reason: rebuild the env instead of its next step
        self._restarts_marked = False
        self._flat_obs = self.obs_layout.is_flat
        self._flat_action = self.action_layout.is_flat
        self._obs_checks = [(leaf.shape, leaf.dtype) for leaf in self.obs_layout.leaves]
        # Observations of 1 KiB and more go straight to their slots (see _write_obs_in_place).
        self._direct_obs = self._flat_obs and self.obs_layout.leaves[0].nbytes >= 1024
        # C views of the per-batch arrays, made once.
        self._outcomes_ptr = ffi.cast("segvec_outcome_t *", ffi.from_buffer(self._outcomes))
        self._obs_slots_ptr = ffi.from_buffer("int64_t[]", self._obs_slots)
        self._chain_slots_ptr = ffi.from_buffer("int64_t[]", self._chain_slots)
        self._action_slots_ptr = ffi.from_buffer("int64_t[]", self._action_slots)
        self._scatter_plan = [(out, ffi.from_buffer(out), ffi.from_buffer(by_slot, require_writable=True), leaf.nbytes)
                              for out, by_slot, leaf in zip(self._obs_out, storage.obs_by_slot, self.obs_layout.leaves)]

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

    def _stage_final_obs(self, env_index: int, obs: Any) -> None:
        """SAME_STEP: keeps the final observation of an ended episode where the learner finds it."""
        values = (obs,) if self._flat_obs else self.obs_layout.flatten(obs)
        for staging, value in zip(self.storage.final_obs, values):
            staging[env_index] = value

    def _stack_obs(self, observations: list, env_ids: np.ndarray):
        """Stacks observations into the per-batch leaf buffers, checking shapes and dtypes.

        Returns None, or ``(position, ObservationMismatch)`` for the first observation that does not fit.
        """
        count = len(observations)
        if not count:
            return None
        if self._flat_obs:
            # Fast path: numpy refuses a ragged list, casting="no" refuses an observation of another dtype
            # (it makes the whole list convert to that dtype), and the first one's shape is checked.
            shape, dtype = self._obs_checks[0]
            first = observations[0]
            if type(first) is np.ndarray and first.shape == shape:
                try:
                    np.copyto(self._obs_out[0][:count], observations, casting="no")
                    return None
                except (ValueError, TypeError):
                    pass
        for position, obs in enumerate(observations):  # slow path: find the culprit, or structured obs
            try:
                self._put_obs(position, obs, int(env_ids[position]))
            except (ObservationMismatch, KeyError, IndexError, TypeError, ValueError) as error:
                if not isinstance(error, ObservationMismatch):
                    error = ObservationMismatch(
                        f"env {int(env_ids[position])} returned an observation that does not fit its space: {error!r}")
                return position, error
        return None

    def _write_obs_in_place(self, observations: list, ids: np.ndarray) -> bool:
        """Large observations: writes each straight into its next slot, one copy instead of a staging copy
        plus a scatter.  Envs whose row fills with this step get their new row at commit: those are staged
        (positions in ``self._staged``) and scattered after it.  Returns False, having written nothing,
        when an observation is not an array of the space's shape and dtype (the checked path decides)."""
        shape, dtype = self._obs_checks[0]
        for obs in observations:
            if type(obs) is not np.ndarray or obs.shape != shape or obs.dtype != dtype:
                return False
        storage, horizon = self.storage, self.horizon
        steps = storage.env_step[ids]
        next_slots = storage.env_row[ids].astype(np.int64) * (horizon + 1) + steps + 1
        by_slot, staging = storage.obs_by_slot[0], self._obs_out[0]
        staged = []
        for position, (obs, slot, step) in enumerate(zip(observations, next_slots.tolist(), steps.tolist())):
            if step + 1 < horizon:
                by_slot[slot] = obs
            else:
                staging[len(staged)] = obs
                staged.append(position)
        self._staged = staged
        return True

    def _scatter_staged(self, positions: list) -> None:
        """Scatters the staged observations of `positions` (rows that filled) after the commit."""
        index = np.asarray(positions, np.int64)
        obs_slots = np.ascontiguousarray(self._obs_slots[index])
        chain_slots = np.ascontiguousarray(self._chain_slots[index])
        out, out_ptr, by_slot_ptr, item_bytes = self._scatter_plan[0]
        lib.segvec_scatter_obs(out_ptr, item_bytes, len(index), ffi.from_buffer("int64_t[]", obs_slots),
                               ffi.from_buffer("int64_t[]", chain_slots), by_slot_ptr)

    def _scatter_obs(self, count: int) -> None:
        """Copies the batch's observations to their slots (and finished rows' obs[horizon]) in C."""
        for out, out_ptr, by_slot_ptr, item_bytes in self._scatter_plan:
            lib.segvec_scatter_obs(out_ptr, item_bytes, count, self._obs_slots_ptr, self._chain_slots_ptr,
                                   by_slot_ptr)

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
        check(lib.segvec_cursor_slots(storage.core, count, ffi.from_buffer("int32_t[]", env_ids),
                                      lib.SEGVEC_STEP_SLOT, self._action_slots_ptr))
        slots = self._action_slots[:count]
        if self._flat_action:
            actions = storage.action_by_slot[0][slots]
        else:
            leaves = [by_slot[slots] for by_slot in storage.action_by_slot]
            actions = [self.action_layout.structure([leaf[i] for leaf in leaves]) for i in range(count)]
        same_step = self.autoreset_mode == AutoresetMode.SAME_STEP
        next_step = self.autoreset_mode == AutoresetMode.NEXT_STEP
        infos: dict[int, dict] = {}
        final_infos: dict[int, dict] = {}
        envs, first, pending, pending_restart = self.envs, self.first_env, self._pending_reset, self._pending_restart
        check_restarts = any(reason is not None for reason in pending_restart) if self._restarts_marked else False
        # Per-env results go to plain lists (cheaper than numpy item writes), converted once below.  Most
        # steps are real transitions that neither start nor end an episode; the others are noted in
        # `specials` as (position, valid, episode_started, needs_reset), see segvec_outcome_t.
        observations, rewards, terminated, truncated, specials = [], [], [], [], []
        restarted, skipped = [], []  # env indices rebuilt instead of stepped, and their batch positions
        failure = None
        end = count
        for position, (env_index, action) in enumerate(zip(env_ids.tolist(), actions)):
            local = env_index - first
            if check_restarts and pending_restart[local] is not None:
                reason, pending_restart[local] = pending_restart[local], None
                failure = self._restart_in_batch(env_index, reason, False, infos, restarted)
                if failure is not None:
                    end = position
                    break
                skipped.append(position)
                continue
            env = envs[local]
            try:
                if next_step and pending[local]:
                    obs, info = env.reset()
                    reward, term, trunc = 0.0, False, False
                    pending[local] = False
                    specials.append((len(observations), 0.0, 1.0, 0.0))
                else:
                    obs, reward, term, trunc, info = env.step(action)
                    if term or trunc:
                        if same_step:
                            self._stage_final_obs(env_index, obs)
                            final_infos[env_index] = info
                            obs, info = env.reset()
                            specials.append((len(observations), 1.0, 1.0, 0.0))
                        elif next_step:
                            pending[local] = True
                            specials.append((len(observations), 1.0, 0.0, 1.0))
            except Exception as error:  # noqa: BLE001 - reported to the learner with its traceback
                failure = EnvFailure(env_index, "step", error) if self.env_fns is None else \
                    self._restart_in_batch(env_index, error, True, infos, restarted)
                if failure is not None:
                    end = position
                    break
                skipped.append(position)
                continue
            observations.append(obs)
            rewards.append(reward)
            terminated.append(term)
            truncated.append(trunc)
            if info:
                infos[env_index] = info
        done = len(observations)
        ids = env_ids[:end]
        if skipped:
            ids = np.delete(ids, skipped)
        staged = None  # large observations: positions whose observation still waits in the staging buffer
        if self._direct_obs and done and self._write_obs_in_place(observations, ids):
            staged = self._staged
            bad = None
        else:
            bad = self._stack_obs(observations, ids)
        if bad is not None:
            index, error = bad
            failure = EnvFailure(int(ids[index]), "step", error)
            done = index
            ids = ids[:done]
        if done:
            outcomes = self._outcomes
            outcomes[:done, 0] = rewards[:done]
            outcomes[:done, 1] = terminated[:done]
            outcomes[:done, 2] = truncated[:done]
            outcomes[:done, 3:] = (1.0, 0.0, 0.0)  # valid, not an episode start, no reset pending
            for position, valid, started, needs_reset in specials:
                if position < done:
                    outcomes[position, 3:] = (valid, started, needs_reset)
            check(lib.segvec_commit_steps(storage.core, done, ffi.from_buffer("int32_t[]", ids),
                                          self._outcomes_ptr, self._obs_slots_ptr, self._chain_slots_ptr))
            if staged is None:
                self._scatter_obs(done)
            elif len(staged):
                self._scatter_staged(staged)
            if infos or final_infos:
                self._mark_infos(ids, infos, final_infos)
        if failure is not None:
            failure.finished = np.asarray(list(ids[:done]) + restarted, np.int32)
            raise failure
        return infos, final_infos

    def _restart_in_batch(self, env_index: int, error, rebuild: bool, infos: dict, restarted: list):
        """Restarts `env_index` in the middle of a batch; returns the EnvFailure if that fails too."""
        try:
            infos[env_index] = self._restart(env_index, error, rebuild=rebuild)
        except EnvFailure as fatal:
            return fatal
        restarted.append(env_index)
        return None

    def mark_for_restart(self, env_ids, reason: str) -> None:
        """The learner holds these envs of a dead worker: restart each instead of its next step."""
        for env_index in env_ids:
            self._pending_restart[int(env_index) - self.first_env] = reason
            self._restarts_marked = True

    def restart_envs(self, env_ids: np.ndarray, reason: str) -> dict[int, dict]:
        """Restarts envs whose step was lost with a dead worker (this replacement built them fresh)."""
        return {int(e): self._restart(int(e), reason, rebuild=False) for e in env_ids}

    def _restart(self, env_index: int, error, rebuild: bool = True) -> dict:
        """Rebuilds env `env_index` after it raised `error` in step; returns the info to report.

        Its last transition is marked truncated and its row closed as a partial segment (tail bootstrap:
        the value already sent for its current observation); the fresh env's first observation starts a
        new row.  The learner sees ``truncated=True`` with that observation and ``info["env_restarted"]``.
        """
        storage, local = self.storage, env_index - self.first_env
        if rebuild:
            try:
                self.envs[local].close()
            except Exception:  # noqa: BLE001 - the env is broken already
                pass
        ids = np.array([env_index], np.int32)
        check(lib.segvec_note_restart(storage.core, env_index))
        copy_from, copy_to = np.empty(1, np.int64), np.empty(1, np.int64)
        check(lib.segvec_flush_envs(storage.core, 1, ffi.from_buffer("int32_t[]", ids), ffi.NULL,
                                    ffi.from_buffer("int64_t[]", copy_from), ffi.from_buffer("int64_t[]", copy_to)))
        try:
            env = self.env_fns[local]() if rebuild else self.envs[local]
            obs, info = env.reset()
            self.envs[local] = env
            self._put_obs(0, obs, env_index)
        except Exception as rebuild_error:  # noqa: BLE001
            raise EnvFailure(env_index, "step (and rebuilding it after that)", rebuild_error) \
                from (error if isinstance(error, BaseException) else None)
        self._pending_reset[local] = False
        slot = np.empty(1, np.int64)
        check(lib.segvec_commit_resets(storage.core, 1, ffi.from_buffer("int32_t[]", ids),
                                       ffi.from_buffer("int64_t[]", slot)))
        for by_slot, out in zip(storage.obs_by_slot, self._obs_out):
            by_slot[slot[0]] = out[0]
        storage.env_last_truncated[env_index] = True
        storage.env_has_info[env_index] = 1
        info = dict(info)
        info["env_restarted"] = True
        info["env_error"] = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return info

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
