"""The env side of a step: run envs, write their results into the segment block, publish them.

`EnvRunner` is the code every backend runs for the envs it owns: the serial backend calls it in the
learner's process, a multiprocessing worker calls it in its own.  It reads each env's action from the
env's current slot, steps the env, records the outcome with one call into the C core for the whole batch,
scatters the new observations into their slots (and the finished row's ``obs[horizon]``), and publishes.

`NativeEnvRunner` does the same for envs written in C (``segvec.native``): one C call steps, commits and
scatters the whole batch.  Backends build their runner with `make_runner`, which picks it when every env is
a bare `NativeEnv` of one class.
"""
from __future__ import annotations

import dataclasses
import traceback
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode

from segvec._core import EnvBatch, EnvClass, Scatter, Storage
from segvec.native import NativeEnv, check_seed, env_error
from segvec.objects import FINAL_OBS_KEY, OBJECTS_KEY, AsGiven


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


@dataclasses.dataclass(slots=True)
class BatchResult:
    """What a runner did with a batch of envs.

    Attributes:
        finished: the envs to publish (stepped, reset or restarted), int32.
        infos: non-empty step/reset infos by env index.
        final_infos: SAME_STEP envs whose episode ended: the info of the ending step (their final
            observation is in ``storage.final_obs``).
        failures: envs that raised and were not restarted (FAILED in the core).
        interrupt: a KeyboardInterrupt (or other BaseException) that stopped the batch, to re-raise.
    """

    finished: np.ndarray
    infos: dict
    final_infos: dict
    failures: list
    interrupt: BaseException | None = None


class EnvRunner:
    """Steps envs ``first_env .. first_env + len(envs) - 1`` of a vector env.

    Args:
        envs: the env objects, in env-index order.
        first_env: index of ``envs[0]`` in the vector env.
        storage: views of the segment block.
        autoreset_mode: a gymnasium ``AutoresetMode``.
        env_fns: the envs' factories; when given, an env that raises in ``step`` is rebuilt and reset
            instead of failing (the transition before it becomes truncated; see `_restart`).
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
        self._heads = storage.geometry.value_shape  # (k,): rewards per value head (see _head_reward)
        n = len(envs)
        self.core = storage.core
        self._own = slice(first_env, first_env + n)  # this runner's envs in [E] arrays
        self._obs_out = [np.zeros((n,) + leaf.shape, leaf.dtype) for leaf in self.obs_layout.leaves]
        self._pending_restart: list = [None] * n  # reason: rebuild the env instead of its next step
        self._restarts_marked = False
        self._flat_obs = self.obs_layout.is_flat
        self._flat_action = self.action_layout.is_flat
        self._obs_checks = [(leaf.shape, leaf.dtype) for leaf in self.obs_layout.leaves]
        # Observations of 1 KiB and more go straight to their slots (see _write_obs_in_place).
        self._direct_obs = self._flat_obs and self.obs_layout.leaves[0].nbytes >= 1024
        self._scatter = Scatter(self._obs_out, storage.obs_by_slot)
        # Parts of spaces with no fixed shape travel pickled (segvec/objects.py): observations' object leaves
        # of each staged position, and the object leaves of actions the learner sent ahead, by env index.
        self._object_obs = self.obs_layout.has_objects
        self._objects_out: list = [None] * n
        self._object_actions: dict[int, list] = {}
        # 0-d float actions reach the env as float64 scalars (a Python float subclass, as the float64 array a
        # user passes to gymnasium's vector envs gives them), whatever the space's float dtype.
        self._widen = [leaf.shape == () and leaf.dtype.kind == "f" for leaf in self.action_layout.leaves]

    # ---- writing observations ---------------------------------------------------------------------
    def _put_obs(self, i: int, obs: Any, env_index: int) -> None:
        values = (obs,) if self._flat_obs else self.obs_layout.flatten(obs)
        if self._object_obs:
            self._objects_out[i] = self.obs_layout.flatten_objects(obs)
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

    def _stack_obs(self, observations: list, env_ids) -> list[tuple[int, ObservationMismatch]]:
        """Stacks observations into the per-batch leaf buffers, checking shapes and dtypes.

        Returns ``(position, ObservationMismatch)`` for each observation that does not fit (empty when all
        do; those positions are left unwritten).
        """
        count = len(observations)
        if not count:
            return []
        if self._flat_obs:
            # Fast path: numpy refuses a ragged list, casting="no" refuses an observation of another dtype
            # (it makes the whole list convert to that dtype), and the first one's shape is checked.
            shape, dtype = self._obs_checks[0]
            first = observations[0]
            if type(first) is np.ndarray and first.shape == shape:
                try:
                    np.copyto(self._obs_out[0][:count], observations, casting="no")
                    return []
                except (ValueError, TypeError):
                    pass
        misfits = []
        for position, obs in enumerate(observations):  # slow path: find the culprits, or structured obs
            try:
                self._put_obs(position, obs, int(env_ids[position]))
            except (ObservationMismatch, KeyError, IndexError, TypeError, ValueError) as error:
                if not isinstance(error, ObservationMismatch):
                    error = ObservationMismatch(
                        f"env {int(env_ids[position])} returned an observation that does not fit its space: {error!r}")
                misfits.append((position, error))
        return misfits

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

    # ---- reset ------------------------------------------------------------------------------------
    def reset(self, env_ids: np.ndarray, seeds: list, options: dict | None) -> BatchResult:
        """Resets `env_ids` (RESETTING: the learner has flushed their rows) and writes their observations.

        An env that raises is marked FAILED in the core and reported in ``failures``; the others go on.
        The caller sends the infos and failures to the learner, then publishes ``finished``.
        """
        infos: dict[int, dict] = {}
        failures: list[EnvFailure] = []
        done: list[int] = []
        for i, env_index in enumerate(env_ids.tolist()):
            local = env_index - self.first_env
            self._pending_restart[local] = None  # a reset supersedes a restart owed by a dead worker
            try:
                obs, info = self.envs[local].reset(seed=seeds[i], options=options)
                self._put_obs(len(done), obs, env_index)
            except Exception as error:  # noqa: BLE001 - reported to the learner with its traceback
                failures.append(EnvFailure(env_index, "reset", error))
                continue
            if info:
                infos[env_index] = info
            done.append(env_index)
        ids = np.asarray(done, np.int32)
        if done:
            slots = self.core.commit_resets(ids)
            self._scatter(slots)
            if self._object_obs:
                self._attach_objects(infos, ids, slots)
            self._mark_infos(infos)
        self._fail(failures)
        return BatchResult(ids, infos, {}, failures)

    # ---- step -------------------------------------------------------------------------------------
    def _actions(self, env_ids: np.ndarray):
        """The actions the learner stored at the current slots of `env_ids` (IN_FLIGHT), one per env: an
        array for flat spaces, else a list of structured actions."""
        slots = self.core.cursor_slots(env_ids)
        leaves = [by_slot[slots].astype(np.float64) if widen else by_slot[slots]
                  for by_slot, widen in zip(self.storage.action_by_slot, self._widen)]
        if self._flat_action:
            actions = leaves[0]
            if self._object_actions:  # actions the user gave in another form than the slot's (AsGiven)
                actions = list(actions)
                for i, e in enumerate(env_ids.tolist()):
                    given = self._object_actions.pop(e, None)
                    if isinstance(given, AsGiven):
                        actions[i] = given.action
            return actions
        if self.action_layout.has_objects:
            pending = self._object_actions
            return [self.action_layout.structure([leaf[i] for leaf in leaves], pending.pop(int(e)))
                    for i, e in enumerate(env_ids.tolist())]
        return [self.action_layout.structure([leaf[i] for leaf in leaves]) for i in range(len(env_ids))]

    def step(self, env_ids: np.ndarray) -> BatchResult:
        """Steps `env_ids` (IN_FLIGHT) with the actions stored at their current slots, and records the results.

        An env that raises (or returns an observation or reward that does not fit) is restarted when the
        runner has the factories, else marked FAILED in the core and reported in ``failures``; the other
        envs of the batch go on.  A KeyboardInterrupt (or any BaseException) inside an env stops the batch:
        the envs stepped so far are recorded, the interrupted env is FAILED, the envs not stepped yet go
        back to the learner (HELD, actions unapplied), and the interrupt is returned in ``interrupt`` for
        the caller to re-raise once it has published ``finished``.
        """
        storage = self.storage
        count = len(env_ids)
        actions = self._actions(env_ids)
        same_step = self.autoreset_mode == AutoresetMode.SAME_STEP
        next_step = self.autoreset_mode == AutoresetMode.NEXT_STEP
        needs_reset = storage.env_needs_reset[self._own].tolist() if next_step else None  # by local index
        infos: dict[int, dict] = {}
        final_infos: dict[int, dict] = {}
        envs, first, pending_restart = self.envs, self.first_env, self._pending_restart
        check_restarts = any(reason is not None for reason in pending_restart) if self._restarts_marked else False
        # Per-env results go to plain lists (cheaper than numpy item writes), converted once below.  Most
        # steps are real transitions that neither start nor end an episode; `specials` holds the others as
        # (index in the lists, (valid, episode_started, needs_reset)), see segvec_outcome_t.  `skipped`:
        # batch positions with no entry in the lists (restarted or failed envs).
        observations, rewards, terminated, truncated, specials, skipped = [], [], [], [], [], []
        head_rewards: dict[int, np.ndarray] = {}  # value heads: env -> its step's rewards per head
        restarted: list[int] = []
        failures: list[EnvFailure] = []
        interrupt = None
        ids_list = env_ids.tolist()
        for position, (env_index, action) in enumerate(zip(ids_list, actions)):
            local = env_index - first
            if check_restarts and pending_restart[local] is not None:
                reason, pending_restart[local] = pending_restart[local], None
                self._restart_in_batch(env_index, reason, False, infos, restarted, failures)
                skipped.append(position)
                continue
            env = envs[local]
            try:
                if next_step and needs_reset[local]:
                    obs, info = env.reset()
                    reward, term, trunc = 0.0, False, False
                    specials.append((len(observations), (0.0, 1.0, 0.0)))
                else:
                    obs, reward, term, trunc, info = env.step(action)
                    if self._heads:
                        reward = self._head_reward(reward, info, env_index, head_rewards)
                    elif type(reward) is not float:
                        reward = _scalar_reward(reward, env_index)
                    if term or trunc:
                        if same_step:
                            self._stage_final_obs(env_index, obs)
                            final_infos[env_index] = {**info, FINAL_OBS_KEY: obs}
                            obs, info = env.reset()
                            specials.append((len(observations), (1.0, 1.0, 0.0)))
                        elif next_step:
                            specials.append((len(observations), (1.0, 0.0, 1.0)))
            except Exception as error:  # noqa: BLE001 - reported to the learner with its traceback
                final_infos.pop(env_index, None)
                head_rewards.pop(env_index, None)
                if specials and specials[-1][0] == len(observations):
                    specials.pop()
                self._env_failed(env_index, error, infos, restarted, failures)
                skipped.append(position)
                continue
            except BaseException as error:  # KeyboardInterrupt: stop here, hand everything back
                final_infos.pop(env_index, None)
                head_rewards.pop(env_index, None)
                if specials and specials[-1][0] == len(observations):
                    specials.pop()
                interrupt = error
                failures.append(EnvFailure(env_index, "step (interrupted)", error))
                unstepped = np.asarray(ids_list[position + 1:], np.int32)
                if len(unstepped):
                    self.core.return_envs(unstepped)
                skipped.extend(range(position, count))
                break
            observations.append(obs)
            rewards.append(reward)
            terminated.append(term)
            truncated.append(trunc)
            if info:
                infos[env_index] = info
        id_array = np.delete(env_ids, skipped).astype(np.int32) if skipped else env_ids
        staged = None  # large observations: positions whose observation still waits in the staging buffer
        if self._direct_obs and observations and self._write_obs_in_place(observations, id_array):
            staged = self._staged
        else:
            misfits = self._stack_obs(observations, id_array)
            if misfits:
                ids = id_array.tolist()
                for position, error in misfits:
                    final_infos.pop(ids[position], None)
                    head_rewards.pop(ids[position], None)
                    infos.pop(ids[position], None)
                    self._env_failed(ids[position], error, infos, restarted, failures)
                bad = {position for position, _ in misfits}
                keep = [i for i in range(len(ids)) if i not in bad]
                specials = [(keep.index(i), special) for i, special in specials if i not in bad]
                id_array = id_array[keep]
                observations, rewards, terminated, truncated = (
                    [column[i] for i in keep] for column in (observations, rewards, terminated, truncated))
                self._stack_obs(observations, id_array)
        done = len(id_array)
        if done:
            outcomes = self.core.outcomes
            outcomes[:done, 0] = rewards
            outcomes[:done, 1] = terminated
            outcomes[:done, 2] = truncated
            outcomes[:done, 3:] = (1.0, 0.0, 0.0)  # valid, not an episode start, no reset pending
            for index, special in specials:
                outcomes[index, 3:] = special
            obs_slots, chain_slots = self.core.commit_steps(id_array, self._scatter if staged is None else None)
            if staged is not None and len(staged):  # rows that filled: their new row is known now
                index = np.asarray(staged, np.int64)
                self._scatter(obs_slots[index], chain_slots[index], leaves=(0,))
            if self._object_obs:
                self._attach_objects(infos, id_array, obs_slots, chain_slots)
            if head_rewards:
                storage.write_head_rewards(np.fromiter(head_rewards, np.int32, len(head_rewards)),
                                           np.stack(list(head_rewards.values())))
        if infos or final_infos:
            self._mark_infos(infos, final_infos)
        self._fail(failures)
        finished = np.concatenate([id_array, np.asarray(restarted, np.int32)]) if restarted else id_array
        return BatchResult(finished, infos, final_infos, failures, interrupt)

    def _head_reward(self, reward, info: dict, env_index: int, head_rewards: dict) -> float:
        """Value heads: the scalar reward the core counts in episode statistics, and the step's reward per
        head into ``head_rewards[env_index]`` when the env gives one: a reward of shape ``(k,)`` (head 0
        counts), or ``info["rewards"]`` of shape ``(k,)`` beside a scalar reward (which counts).  A scalar
        reward alone goes to every head (the core writes it).  ValueError for anything else."""
        if np.ndim(reward) == 1:
            head_rewards[env_index] = vector = head_reward_vector(reward, self._heads, env_index, "reward")
            return float(vector[0])
        scalar = reward if type(reward) is float else _scalar_reward(reward, env_index)
        if info and HEAD_REWARDS_KEY in info:
            head_rewards[env_index] = head_reward_vector(info[HEAD_REWARDS_KEY], self._heads, env_index,
                                                         f"info[{HEAD_REWARDS_KEY!r}]")
        return scalar

    def _env_failed(self, env_index: int, error, infos: dict, restarted: list, failures: list) -> None:
        """An env raised in the middle of a batch: restart it (restart_failed_envs) or report it."""
        if self.env_fns is None:
            failures.append(EnvFailure(env_index, "step", error))
        else:
            self._restart_in_batch(env_index, error, True, infos, restarted, failures)

    def _restart_in_batch(self, env_index: int, error, rebuild: bool, infos: dict, restarted: list,
                          failures: list) -> None:
        try:
            infos[env_index] = self._restart(env_index, error, rebuild=rebuild)
        except EnvFailure as fatal:
            failures.append(fatal)
            return
        restarted.append(env_index)

    def _fail(self, failures: list) -> None:
        """Marks the envs of `failures` FAILED in the core (the learner owns them until it resets them)."""
        if failures:
            self.core.fail_envs([f.env_index for f in failures])

    def mark_for_restart(self, env_ids, reason: str) -> None:
        """The learner holds these envs of a dead worker: restart each instead of its next step."""
        for env_index in env_ids:
            self._pending_restart[int(env_index) - self.first_env] = reason
            self._restarts_marked = True

    def restart_envs(self, env_ids: np.ndarray, reason: str) -> BatchResult:
        """Restarts envs whose step was lost with a dead worker (rolled back; this replacement built them)."""
        infos: dict[int, dict] = {}
        restarted: list[int] = []
        failures: list[EnvFailure] = []
        for env_index in env_ids.tolist():
            self._restart_in_batch(env_index, reason, False, infos, restarted, failures)
        self._fail(failures)
        return BatchResult(np.asarray(restarted, np.int32), infos, {}, failures)

    def _restart(self, env_index: int, error, rebuild: bool = True) -> dict:
        """Rebuilds env `env_index` (when `rebuild`) and resets it in place of its step; returns its info.

        The new episode starts at the env's current slot, in the same row: the transition before it is
        marked truncated, bootstrapped by the value already sent for the observation the env failed on
        (see segvec_restart_env).  The learner sees ``truncated=True`` with the new observation and
        ``info["env_restarted"]``.

        Raises:
            EnvFailure: rebuilding or resetting the env failed too.
        """
        storage, local = self.storage, env_index - self.first_env
        if rebuild:
            try:
                self.envs[local].close()
            except Exception:  # noqa: BLE001 - the env is broken already
                pass
        try:
            env = self.env_fns[local]() if rebuild else self.envs[local]
            obs, info = env.reset()
            self.envs[local] = env
            self._put_obs(0, obs, env_index)
        except Exception as rebuild_error:  # noqa: BLE001
            failure = EnvFailure(env_index, "step (and rebuilding it after that)", rebuild_error)
            failure.__cause__ = error if isinstance(error, BaseException) else None
            raise failure from None
        slot = self.core.restart_env(env_index)
        for by_slot, out in zip(storage.obs_by_slot, self._obs_out):
            by_slot[slot] = out[0]
        storage.env_has_info[env_index] = 1
        info = dict(info)
        if self._object_obs:
            info[OBJECTS_KEY] = (slot, -1, self._objects_out[0])
        info["env_restarted"] = True
        info["env_error"] = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return info

    def _attach_objects(self, infos: dict, env_ids: np.ndarray, slots: np.ndarray, chain_slots=None) -> None:
        """Adds each env's object leaves, with the slots they belong at, to its info message (the k-th env
        of `env_ids` is the k-th observation staged)."""
        for k, env_index in enumerate(env_ids.tolist()):
            chain = -1 if chain_slots is None else int(chain_slots[k])
            infos[env_index] = {**infos.get(env_index, {}), OBJECTS_KEY: (int(slots[k]), chain, self._objects_out[k])}

    def put_object_actions(self, actions: dict) -> None:
        """Keeps the object leaves of actions (or whole actions `AsGiven`) that the learner sent ahead of
        dispatching them, by env index."""
        self._object_actions.update(actions)

    def lacks_object_actions(self, env_ids: np.ndarray) -> bool:
        """True when an env of `env_ids` was dispatched before its object leaves arrived (read on)."""
        if not self.action_layout.has_objects:
            return False
        return any(int(e) not in self._object_actions for e in env_ids)

    def _mark_infos(self, infos: dict, final_infos: dict | None = None) -> None:
        flags = self.storage.env_has_info
        for env_index in infos:
            flags[env_index] = 1
        for env_index in final_infos or ():
            flags[env_index] = 1

    def publish(self, env_ids: np.ndarray) -> None:
        """Hands `env_ids` to the learner (their observations and infos must be in place)."""
        self.core.publish(env_ids)

    def close(self) -> None:
        """Closes every env, ignoring errors of individual envs' close()."""
        close_envs(self.envs)


def close_envs(envs) -> None:
    """Closes every env of `envs`, whatever one of them raises: the others are closed all the same."""
    for env in envs:
        try:
            env.close()
        except Exception:  # noqa: BLE001 - closing must go on for the other envs
            pass


def make_runner(envs: list, first_env: int, storage: Storage, autoreset_mode: AutoresetMode,
                env_fns: list | None = None) -> EnvRunner:
    """The runner for `envs`: the class their ``segvec_runner`` attribute names, for env sources that bring
    their own (the agent slots of ``segvec.multiagent``: `MultiAgentRunner`); a `NativeEnvRunner` when they
    are all bare `NativeEnv`s of one class whose spaces are the block's; else an `EnvRunner`.  All have the
    same interface."""
    runner_class = getattr(envs[0], "segvec_runner", None) if envs else None
    if runner_class is not None:  # an env source that brings its own runner (segvec.multiagent's agent slots)
        return runner_class(envs, first_env, storage, autoreset_mode, env_fns)
    env_class = native_class_of(envs, storage)
    if env_class is None:
        return EnvRunner(envs, first_env, storage, autoreset_mode, env_fns)
    return NativeEnvRunner(envs, first_env, storage, autoreset_mode, env_fns, env_class)


def native_class_of(envs: list, storage: Storage) -> EnvClass | None:
    """The C class of `envs` when each is a NativeEnv of that class with no wrapper (and no reset or step of
    its own in Python) and the block lays out its observation and action as the class writes and reads
    them; else None."""
    if not envs or not isinstance(envs[0], NativeEnv):
        return None
    kind = type(envs[0])
    if kind.step is not NativeEnv.step or kind.reset is not NativeEnv.reset:
        return None
    if any(type(env) is not kind for env in envs):
        return None
    env_class = kind.native
    obs, action = storage.obs_layout, storage.action_layout
    if not (obs.is_flat and action.is_flat):
        return None
    if (obs.leaves[0].shape, obs.leaves[0].dtype) != (env_class.obs_shape, env_class.obs_dtype):
        return None
    expected = ((), np.dtype(np.int64)) if env_class.discrete else ((env_class.action_size,), np.dtype(np.float32))
    if (action.leaves[0].shape, action.leaves[0].dtype) != expected:
        return None
    return env_class


class NativeEnvRunner(EnvRunner):
    """Steps envs written in C (bare `NativeEnv`s of one class): one C call per batch
    (``segvec_env_step_batch``) reads the actions from the slots, steps or resets every env, fills the
    outcomes, commits them with ``segvec_commit_steps`` and scatters the observations with
    ``segvec_scatter_obs``, as `EnvRunner` does in Python.  Seeded resets are one C call too.

    Failures (a status from the C env, or a rebuilt env that raises), restarts (restart_failed_envs, and the
    envs of a dead worker), SAME_STEP final observations and infos, and `close` behave as for Python envs:
    the rest is `EnvRunner`'s own code, on the NativeEnv objects.
    """

    def __init__(self, envs: list, first_env: int, storage: Storage, autoreset_mode: AutoresetMode,
                 env_fns: list | None, env_class: EnvClass):
        kind = type(envs[0])
        if env_fns is not None:  # a rebuilt env must be of the same C class, or its restart fails
            env_fns = [_SameKind(fn, kind) for fn in env_fns]
        super().__init__(envs, first_env, storage, autoreset_mode, env_fns)
        self.env_class = env_class
        self._same_step = autoreset_mode == AutoresetMode.SAME_STEP
        self._batch = EnvBatch(env_class, first_env, [env._memory for env in envs], storage, autoreset_mode,
                               self._obs_out[0])
        self._seeds = np.zeros(len(envs), np.uint64)
        self._seeded = np.zeros(len(envs), np.uint8)

    def _error(self, env_index: int, status: int, action: str) -> Exception:
        return env_error(self.env_class, status, action)

    def reset(self, env_ids: np.ndarray, seeds: list, options: dict | None) -> BatchResult:
        if options:  # C envs take no options: each reset fails as NativeEnv.reset says
            return super().reset(env_ids, seeds, options)
        failures: list[EnvFailure] = []
        ids = []
        first = self.first_env
        count = 0
        for env_index, seed in zip(env_ids.tolist(), seeds):
            self._pending_restart[env_index - first] = None  # a reset supersedes a restart owed by a dead worker
            try:
                self._seeds[count] = 0 if seed is None else check_seed(seed)
            except Exception as error:  # noqa: BLE001 - reported like an env's own error
                failures.append(EnvFailure(env_index, "reset", error))
                continue
            self._seeded[count] = seed is not None
            ids.append(env_index)
            count += 1
        done, failed = self.core.env_reset_batch(self._batch, np.asarray(ids, np.int32), self._seeds[:count],
                                                 self._seeded[:count])
        failures.extend(EnvFailure(e, "reset", self._error(e, status, "reset")) for e, status in failed)
        self._fail(failures)
        return BatchResult(done, {}, {}, failures)

    def step(self, env_ids: np.ndarray) -> BatchResult:
        if self._object_actions:  # actions given in another form (AsGiven): C envs read the slots
            self._object_actions.clear()
        infos: dict[int, dict] = {}
        final_infos: dict[int, dict] = {}
        restarted: list[int] = []
        failures: list[EnvFailure] = []
        if self._restarts_marked:
            first, pending = self.first_env, self._pending_restart
            marked = [e for e in env_ids.tolist() if pending[e - first] is not None]
            for env_index in marked:  # envs of a dead worker: restarted in place of their step
                reason, pending[env_index - first] = pending[env_index - first], None
                self._restart_in_batch(env_index, reason, False, infos, restarted, failures)
            if marked:
                env_ids = env_ids[~np.isin(env_ids, marked)]
            self._restarts_marked = any(reason is not None for reason in pending)  # (no scan once all are done)
        done, failed, ended = self.core.env_step_batch(self._batch, env_ids)
        if ended is not None:  # SAME_STEP: gymnasium's final_obs / final_info of each ended episode
            final = self.storage.final_obs[0][ended]
            for k, env_index in enumerate(ended.tolist()):
                final_infos[env_index] = {FINAL_OBS_KEY: final[k]}
        for env_index, status in failed:
            self._env_failed(env_index, self._error(env_index, status, "step"), infos, restarted, failures)
        if infos or final_infos:
            self._mark_infos(infos, final_infos)
        self._fail(failures)
        finished = np.concatenate([done, np.asarray(restarted, np.int32)]) if restarted else done
        return BatchResult(finished, infos, final_infos, failures)

    def _restart(self, env_index: int, error, rebuild: bool = True) -> dict:
        info = super()._restart(env_index, error, rebuild)
        local = env_index - self.first_env
        self._batch.set_env(local, self.envs[local]._memory)
        return info


class _SameKind:
    """An env factory whose env must be a bare NativeEnv of `kind` (a restart of a C env's batch)."""

    def __init__(self, fn, kind: type):
        self.fn, self.kind = fn, kind

    def __call__(self):
        env = self.fn()
        if type(env) is not self.kind:
            try:
                env.close()
            except Exception:  # noqa: BLE001
                pass
            raise TypeError(f"the env factory built a {type(env).__name__} to replace a {self.kind.__name__}: "
                            "envs stepped in C are rebuilt as the same bare NativeEnv class")
        return env


HEAD_REWARDS_KEY = "rewards"  # info key of an env's rewards per value head, shape (k,)


def head_reward_vector(rewards, value_shape: tuple, env_index: int, what: str) -> np.ndarray:
    """`rewards` as a float32 array of `value_shape` ``(k,)``; ValueError naming the env otherwise."""
    array = np.asarray(rewards)
    if array.shape != value_shape or array.dtype.kind not in "biuf":
        raise ValueError(f"env {env_index} returned {what} of shape {array.shape} and dtype {array.dtype}; "
                         f"with value_shape={value_shape} it must be {value_shape} real numbers (one per value "
                         "head), or the reward a single number (it goes to every head)")
    return array.astype(np.float32)


def _scalar_reward(reward, env_index: int) -> float:
    """A reward as a float; ValueError when the env returned something that is not one real number."""
    if type(reward) in (int, bool) or (np.ndim(reward) == 0 and np.isrealobj(reward)):
        try:
            return float(reward)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"env {env_index} returned a reward of type {type(reward).__name__} and shape "
                     f"{np.shape(reward)}; a reward must be one real number")
