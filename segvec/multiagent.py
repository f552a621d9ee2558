"""Multi-agent envs: every agent of a PettingZoo ``ParallelEnv`` is an *agent slot* with its own row stream.

`make_multiagent` builds ``num_envs`` PettingZoo envs and presents their ``num_envs * num_agents`` agent
slots as the envs of a `SegmentVecEnv` (`MultiAgentVecEnv`): slot ``env_index * num_agents + k`` is agent
``possible_agents[k]`` of env ``env_index``.  Each slot has its own cursor, rows and bootstraps, so every
face works on slots unchanged: ``recv`` returns slots (``info["env_id"]`` holds slot ids), ``send`` takes
actions for slots, ``step`` takes one action per slot, and ``take_segments`` returns rows of one agent each
(``batch.env_id`` holds slot ids) for a policy shared by the agents.

The env source is one seam: to the backends a slot is an env (`AgentSlot`), the factories of one env's slots
share the PettingZoo env they build (so all slots of an env live in the same worker), and `make_runner`
picks `MultiAgentRunner` for them (an `AgentSlot` names it: ``segvec_runner``). The runner steps a
PettingZoo env once the actions of all its slots are in, and writes each agent's outcome through the C core:

- an agent that ends before its env (terminated or truncated, e.g. killed in Knights-Archers-Zombies)
  records that transition once; from then on its slot *sits out* (``segvec_skip_steps``): it comes back to
  the learner with its env's other slots (its last observation, reward 0, not ended) but its actions are
  dropped and nothing is written to its rows, until the env resets;
- when every agent is done the env resets as the autoreset mode says: NEXT_STEP returns the final
  observations and resets at the next step, whose slot is stored with ``mask`` False for every agent (as
  for single-agent envs); SAME_STEP resets at once (final observations in ``info["final_obs"]``), and a slot
  that sat out gets one slot with ``mask`` False that starts its new episode; DISABLED leaves the reset to
  the learner (``reset(options={"reset_mask": ...})`` over whole envs);
- an agent that is not in the env (absent at reset, or joining later) sits out with an observation of
  zeros; when it appears, a slot with ``mask`` False starts its episode.

pettingzoo is imported by `make_multiagent` only (to convert AEC envs): ``import segvec`` never needs it.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
from gymnasium.vector import AutoresetMode

from segvec._core import Storage
from segvec.errors import SpaceMismatchError
from segvec.objects import FINAL_OBS_KEY
from segvec.runner import BatchResult, EnvFailure, EnvRunner, ObservationMismatch
from segvec.spaces import spaces_equal
from segvec.vector import SegmentVecEnv

ENV_EPISODE_KEY = "env_episode"  # info of an env's first slot at its episode's end: {"return", "length"}


def _as_parallel(env):
    """A PettingZoo ParallelEnv from what a factory returned (an AEC env is converted)."""
    if _is_aec(env):
        from pettingzoo.utils.conversions import aec_to_parallel

        return aec_to_parallel(env)
    return env


def _is_aec(env) -> bool:
    try:
        from pettingzoo import AECEnv
    except ImportError:  # pettingzoo is what makes AEC envs
        return False
    return isinstance(env, AECEnv)


class SharedEnv:
    """One PettingZoo env and its agents, shared by its agent slots in the process that runs them."""

    def __init__(self, env, env_index: int):
        self.env = _as_parallel(env)
        self.env_index = env_index
        self.agents: list = list(self.env.possible_agents)
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.env.close()


class EnvFactory:
    """Builds PettingZoo env `env_index` with ``fn()``; its slots' factories share this object (and so
    the env built last), which is why the slots of one env must run in one process."""

    def __init__(self, fn: Callable, env_index: int):
        self.fn, self.env_index = fn, env_index
        self.built: SharedEnv | None = None

    def build(self) -> SharedEnv:
        self.built = SharedEnv(self.fn(), self.env_index)
        return self.built

    def __getstate__(self):
        return {"fn": self.fn, "env_index": self.env_index, "built": None}  # envs never travel


class SlotFactory:
    """The factory of agent slot `agent_index` of an env: the first slot builds the env, the others join it."""

    def __init__(self, factory: EnvFactory, agent_index: int):
        self.factory, self.agent_index = factory, agent_index

    def __call__(self) -> "AgentSlot":
        shared = self.factory.built
        if self.agent_index == 0 or shared is None or shared.closed:
            shared = self.factory.build()
        return AgentSlot(shared, self.agent_index)


class AgentSlot:
    """One agent of a PettingZoo env, as a backend sees an env: its spaces, metadata and attributes.

    ``call``/``get_attr`` on the vector env reach the slot's attributes (``agent``, ``agent_index``,
    ``env_index``) and then the PettingZoo env's (``call("state")``, ``get_attr("agents")``).  It is never
    stepped on its own: `MultiAgentRunner` steps the PettingZoo env.
    """

    def __init__(self, shared: SharedEnv, agent_index: int):
        self.shared = shared
        self.agent_index = agent_index
        self.agent = shared.agents[agent_index]
        self.env_index = shared.env_index
        self.observation_space = shared.env.observation_space(self.agent)
        self.action_space = shared.env.action_space(self.agent)
        self.metadata = dict(getattr(shared.env, "metadata", None) or {})
        self.render_mode = getattr(shared.env, "render_mode", None)

    def get_wrapper_attr(self, name: str):
        if name in ("agent", "agent_index", "env_index", "observation_space", "action_space"):
            return getattr(self, name)
        return getattr(self.shared.env, name)

    def set_wrapper_attr(self, name: str, value) -> None:
        setattr(self.shared.env, name, value)

    def close(self) -> None:
        self.shared.close()


class MultiAgentRunner(EnvRunner):
    """Steps the PettingZoo envs behind agent slots ``first_env ..`` (see the module docstring).

    Slots of one env arrive as the learner's actions come in (a worker may pop an env's slots in two
    batches); the env steps when all of its slots are in.  An env that raises fails (or, with
    ``restart_failed_envs``, restarts) all of its slots together.
    """

    def __init__(self, envs: list, first_env: int, storage: Storage, autoreset_mode: AutoresetMode,
                 env_fns: list | None = None):
        super().__init__(envs, first_env, storage, autoreset_mode, env_fns)
        self.num_agents = len(envs[0].shared.agents)
        self.num_groups = len(envs) // self.num_agents
        self._arrived = np.zeros(len(envs), bool)  # actions in, waiting for the rest of the env's slots
        self._alive = np.zeros(len(envs), bool)    # the agent is in its env now
        self._ended = [False] * self.num_groups    # NEXT_STEP: every agent is done, reset at the next step
        self._totals = [[0.0, 0] for _ in range(self.num_groups)]  # the env episode's return (all agents), steps
        self._zeros = [np.zeros(leaf.shape, leaf.dtype) for leaf in self.obs_layout.leaves]

    def _shared(self, group: int) -> SharedEnv:
        return self.envs[group * self.num_agents].shared

    def _slots(self, group: int) -> range:
        return range(self.first_env + group * self.num_agents, self.first_env + (group + 1) * self.num_agents)

    def _absent_obs(self):
        return self._zeros[0] if self._flat_obs else self.obs_layout.structure(self._zeros)

    def _describe(self, group: int) -> str:
        slots = self._slots(group)
        return f"multi-agent env {self.envs[group * self.num_agents].env_index} (agent slots {slots[0]}..{slots[-1]})"

    # ---- reset ------------------------------------------------------------------------------------
    def reset(self, env_ids: np.ndarray, seeds: list, options: dict | None) -> BatchResult:
        """Resets the envs of `env_ids` (all slots of each, RESETTING); an env gets the seed of its first slot."""
        seed_of = dict(zip(env_ids.tolist(), seeds))
        infos: dict[int, dict] = {}
        failures: list[EnvFailure] = []
        done: list[int] = []
        observations: list = []
        for group in sorted({(e - self.first_env) // self.num_agents for e in env_ids.tolist()}):
            slots = self._slots(group)
            for slot in slots:
                self._pending_restart[slot - self.first_env] = None
            try:
                obs, reset_infos = self._shared(group).env.reset(seed=seed_of.get(slots[0]), options=options)
                self._stage_group(group, obs, reset_infos, observations, infos)
            except Exception as error:  # noqa: BLE001 - reported to the learner with its traceback
                failures.extend(EnvFailure(slot, f"reset of {self._describe(group)}", error) for slot in slots)
                continue
            done.extend(slots)
        ids = np.asarray(done, np.int32)
        if done:
            self._stack_obs(observations, ids)
            self._scatter(self.core.commit_resets(ids))
            self._mark_infos(infos)
        self._fail(failures)
        self.storage.env_sits_out[self._own] = ~self._alive
        return BatchResult(ids, infos, {}, failures)

    def _stage_group(self, group: int, obs: dict, infos: dict, observations: list, out_infos: dict) -> None:
        """A fresh episode of `group`: each agent's first observation (zeros for agents not in the env)."""
        local = group * self.num_agents
        present = set(self._shared(group).env.agents)
        self._ended[group] = False
        self._totals[group] = [0.0, 0]
        self._arrived[local:local + self.num_agents] = False
        for k, agent in enumerate(self._shared(group).agents):
            self._alive[local + k] = agent in present and agent in obs
            observations.append(obs[agent] if self._alive[local + k] else self._absent_obs())
            if infos and infos.get(agent):
                out_infos[self.first_env + local + k] = dict(infos[agent])

    # ---- step -------------------------------------------------------------------------------------
    def step(self, env_ids: np.ndarray) -> BatchResult:
        """Notes the slots whose actions are in; steps each env whose slots are all in (see the class)."""
        self._arrived[env_ids - self.first_env] = True
        return self._run_ready()

    def restart_envs(self, env_ids: np.ndarray, reason: str) -> BatchResult:
        """Slots whose step was lost with a dead worker: their env restarts once all its slots are in."""
        self.mark_for_restart(env_ids, reason)
        self._arrived[np.asarray(env_ids, np.int64) - self.first_env] = True
        return self._run_ready()

    def _run_ready(self) -> BatchResult:
        A = self.num_agents
        complete = self._arrived.reshape(self.num_groups, A).all(axis=1)
        groups = np.flatnonzero(complete).tolist()
        # Per slot, in commit order: (slot, observation, (reward, terminated, truncated, valid, started,
        # needs_reset)); `skipped`: slots that sit this step out.
        commits: list[tuple] = []
        skipped: list[int] = []
        infos: dict[int, dict] = {}
        final_infos: dict[int, dict] = {}
        restarted: list[int] = []
        failures: list[EnvFailure] = []
        if not groups:
            return BatchResult(np.zeros(0, np.int32), infos, final_infos, failures)
        ids = np.concatenate([np.arange(self.first_env + g * A, self.first_env + (g + 1) * A, dtype=np.int32)
                              for g in groups])
        actions = self._actions(ids)
        for position, group in enumerate(groups):
            local = group * A
            self._arrived[local:local + A] = False
            reasons = [self._pending_restart[local + k] for k in range(A)]
            if any(reason is not None for reason in reasons):
                for k in range(A):
                    self._pending_restart[local + k] = None
                self._restart_group(group, next(r for r in reasons if r is not None), False, infos, restarted,
                                    failures)
                continue
            marks = (len(commits), len(skipped))
            try:
                self._step_group(group, actions[position * A:(position + 1) * A], commits, skipped, infos,
                                 final_infos)
            except Exception as error:  # noqa: BLE001 - the whole env fails (or restarts)
                del commits[marks[0]:], skipped[marks[1]:]
                for slot in self._slots(group):
                    infos.pop(slot, None)
                    final_infos.pop(slot, None)
                if self.env_fns is None:
                    failures.extend(EnvFailure(slot, f"step of {self._describe(group)}", error)
                                    for slot in self._slots(group))
                else:
                    self._restart_group(group, error, True, infos, restarted, failures)
        finished = self._commit(commits, skipped, infos, final_infos, failures)
        if infos or final_infos:
            self._mark_infos(infos, final_infos)
        self._fail(failures)
        self.storage.env_sits_out[self._own] = ~self._alive
        finished = np.concatenate([finished, np.asarray(skipped, np.int32), np.asarray(restarted, np.int32)])
        return BatchResult(np.sort(finished).astype(np.int32), infos, final_infos, failures)

    def _step_group(self, group: int, actions, commits: list, skipped: list, infos: dict,
                    final_infos: dict) -> None:
        """Steps (or resets) one env and lists what each of its slots records."""
        shared = self._shared(group)
        env, agents, local, first = shared.env, shared.agents, group * self.num_agents, self.first_env
        mode = self.autoreset_mode
        if mode == AutoresetMode.NEXT_STEP and self._ended[group]:  # the reset step: mask False everywhere
            obs, reset_infos = env.reset()
            observations: list = []
            self._stage_group(group, obs, reset_infos, observations, infos)
            for k in range(self.num_agents):
                commits.append((first + local + k, observations[k], (0.0, 0.0, 0.0, 0.0, 1.0, 0.0)))
            return
        alive = self._alive[local:local + self.num_agents]
        obs, rewards, terms, truncs, step_infos = env.step(
            {agent: actions[k] for k, agent in enumerate(agents) if alive[k]})
        all_done = not env.agents
        totals = self._totals[group]
        totals[0] += float(sum(rewards.values()))
        totals[1] += 1
        if all_done:  # the env's episode: in the info of its first slot's last step
            infos[first + local] = {ENV_EPISODE_KEY: {"return": totals[0], "length": totals[1]}}
            self._totals[group] = [0.0, 0]
        reset_obs = reset_infos = None
        if all_done and mode == AutoresetMode.SAME_STEP:
            reset_obs, reset_infos = env.reset()
        for k, agent in enumerate(agents):
            slot = first + local + k
            info = step_infos.get(agent) if step_infos else None
            if alive[k]:
                reward = float(rewards.get(agent, 0.0))
                term, trunc = bool(terms.get(agent, False)), bool(truncs.get(agent, False))
                ended = term or trunc or agent not in env.agents
                if not (term or trunc) and ended:  # gone without saying so: its episode is cut
                    trunc = True
                final = obs[agent] if agent in obs else self._absent_obs()
                if ended and mode == AutoresetMode.SAME_STEP:
                    self._stage_final_obs(slot, final)
                    final_infos[slot] = {**(info or {}), FINAL_OBS_KEY: final}
                if all_done and mode == AutoresetMode.SAME_STEP:
                    next_obs = self._reset_obs(group, k, reset_obs, reset_infos, infos)
                    commits.append((slot, next_obs, (reward, term, trunc, 1.0, 1.0, 0.0)))
                    continue
                if info:
                    infos[slot] = {**infos.get(slot, {}), **info}
                needs_reset = 1.0 if all_done and mode == AutoresetMode.NEXT_STEP else 0.0
                commits.append((slot, final, (reward, term, trunc, 1.0, 0.0, needs_reset)))
                self._alive[local + k] = not ended
            elif all_done and mode == AutoresetMode.SAME_STEP:  # sat out: its new episode starts now
                commits.append((slot, self._reset_obs(group, k, reset_obs, reset_infos, infos),
                                (0.0, 0.0, 0.0, 0.0, 1.0, 0.0)))
            elif agent in env.agents and agent in obs:  # joins: a new episode starts at its first observation
                commits.append((slot, obs[agent], (0.0, 0.0, 0.0, 0.0, 1.0, 0.0)))
                self._alive[local + k] = True
                if info:
                    infos[slot] = {**infos.get(slot, {}), **info}
            else:
                skipped.append(slot)
        if all_done and mode == AutoresetMode.NEXT_STEP:
            self._ended[group] = True

    def _reset_obs(self, group: int, k: int, reset_obs: dict, reset_infos: dict, infos: dict):
        """SAME_STEP: agent `k`'s first observation of the episode that starts now (zeros if absent)."""
        agent = self._shared(group).agents[k]
        slot, local = self.first_env + group * self.num_agents + k, group * self.num_agents + k
        present = agent in self._shared(group).env.agents and agent in reset_obs
        self._alive[local] = present
        if reset_infos and reset_infos.get(agent):
            infos[slot] = {**infos.get(slot, {}), **reset_infos[agent]}
        return reset_obs[agent] if present else self._absent_obs()

    def _commit(self, commits: list, skipped: list, infos: dict, final_infos: dict, failures: list) -> np.ndarray:
        """Writes the listed outcomes through the core (one call) and scatters their observations; the
        slots in `skipped` sit out and keep their rows as they are.  An observation that does not fit its
        space fails its whole env (its slots leave both lists)."""
        ids = np.asarray([slot for slot, _, _ in commits], np.int32)
        misfits = self._stack_obs([obs for _, obs, _ in commits], ids)
        if misfits:
            A, first = self.num_agents, self.first_env
            groups = {(int(ids[position]) - first) // A for position, _ in misfits}
            for group in groups:
                for slot in self._slots(group):
                    infos.pop(slot, None)
                    final_infos.pop(slot, None)
                    failures.append(EnvFailure(slot, f"step of {self._describe(group)}", misfits[0][1]))
            commits[:] = [c for c in commits if (c[0] - first) // A not in groups]
            skipped[:] = [slot for slot in skipped if (slot - first) // A not in groups]
            ids = np.asarray([slot for slot, _, _ in commits], np.int32)
            self._stack_obs([obs for _, obs, _ in commits], ids)
        if skipped:
            self.core.skip_steps(np.asarray(skipped, np.int32))
        if len(ids):
            self.core.outcomes[:len(ids)] = [outcome for _, _, outcome in commits]
            self.core.commit_steps(ids, self._scatter)
        return ids

    # ---- restarts ---------------------------------------------------------------------------------
    def _restart_group(self, group: int, error, rebuild: bool, infos: dict, restarted: list, failures: list) -> None:
        """Rebuilds (when `rebuild`) and resets env `group`; every slot starts a new episode at its cursor
        (segvec_restart_env: the transition before it is truncated, bootstrapped by the value already sent),
        or, when that fails too, every slot fails."""
        slots = self._slots(group)
        local = group * self.num_agents
        try:
            shared = self._shared(group)
            if rebuild:
                try:
                    shared.close()
                except Exception:  # noqa: BLE001 - the env is broken already
                    pass
                shared = self.env_fns[local].factory.build()
                for k in range(self.num_agents):
                    self.envs[local + k] = AgentSlot(shared, k)
            obs, reset_infos = shared.env.reset()
            observations: list = []
            staged_infos: dict = {}
            self._stage_group(group, obs, reset_infos, observations, staged_infos)
            misfits = self._stack_obs(observations, np.asarray(list(slots), np.int32))
            if misfits:
                raise misfits[0][1]
        except Exception as rebuild_error:  # noqa: BLE001
            cause = error if isinstance(error, BaseException) else None
            for slot in slots:
                failure = EnvFailure(slot, f"step of {self._describe(group)} (and rebuilding it after that)",
                                     rebuild_error)
                failure.__cause__ = cause
                failures.append(failure)
            return
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        for k, slot in enumerate(slots):
            obs_slot = self.core.restart_env(slot)
            for by_slot, out in zip(self.storage.obs_by_slot, self._obs_out):
                by_slot[obs_slot] = out[k]
            infos[slot] = {**staged_infos.get(slot, {}), "env_restarted": True, "env_error": text}
            restarted.append(slot)

    def close(self) -> None:
        for group in range(self.num_groups):
            try:
                self._shared(group).close()
            except Exception:  # noqa: BLE001 - closing must go on for the other envs
                pass


AgentSlot.segvec_runner = MultiAgentRunner  # how make_runner knows the slots' runner


class MultiAgentVecEnv(SegmentVecEnv):
    """A `SegmentVecEnv` over the agent slots of PettingZoo envs (see `make_multiagent`).

    Attributes:
        num_agents: agents per env (``len(possible_agents)``).
        possible_agents: the agents of every env, in slot order.
        num_envs: agent slots, ``num_multiagent_envs * num_agents``.
        num_multiagent_envs: PettingZoo envs.
    """

    num_agents: int
    possible_agents: list
    num_multiagent_envs: int

    def __init__(self, env_fns: list, possible_agents: list, **options):
        self.num_agents = len(possible_agents)
        self.possible_agents = list(possible_agents)
        self.num_multiagent_envs = num_envs = len(env_fns)
        self._agent_index = {agent: k for k, agent in enumerate(self.possible_agents)}
        self._env_episodes: list[tuple] = []  # (env index, return, length) of env episodes received
        fns = []
        for env_index, env_fn in enumerate(env_fns):
            factory = EnvFactory(env_fn, env_index)
            fns.extend(SlotFactory(factory, k) for k in range(self.num_agents))
        super().__init__(fns, **options)

    def agent_slot(self, env_index: int, agent) -> int:
        """The slot id of `agent` (a name of ``possible_agents``) in env `env_index`.

        Raises:
            ValueError: an env index out of range or an unknown agent.
        """
        if not 0 <= int(env_index) < self.num_multiagent_envs:
            raise ValueError(f"env_index must be in [0, {self.num_multiagent_envs}), got {env_index}")
        if agent not in self._agent_index:
            raise ValueError(f"unknown agent {agent!r}; the agents are {self.possible_agents}")
        return int(env_index) * self.num_agents + self._agent_index[agent]

    def slot_agent(self, slot: int) -> tuple[int, Any]:
        """``(env_index, agent)`` of a slot id.

        Raises:
            ValueError: a slot id out of range.
        """
        if not 0 <= int(slot) < self.num_envs:
            raise ValueError(f"slot must be in [0, {self.num_envs}), got {slot}")
        return int(slot) // self.num_agents, self.possible_agents[int(slot) % self.num_agents]

    def _whole_envs(self, slots: np.ndarray, what: str) -> None:
        """Raises ValueError when `slots` name some but not all slots of an env (ids out of range are left to
        the checks of `SegmentVecEnv`)."""
        slots = np.asarray(slots, np.int64)
        slots = slots[(slots >= 0) & (slots < self.num_envs)]
        counts = np.bincount(slots // self.num_agents, minlength=self.num_multiagent_envs)
        partial = np.flatnonzero((counts > 0) & (counts != self.num_agents))
        if len(partial):
            raise ValueError(f"{what} must name every agent slot of an env or none (the slots of env e are "
                             f"e * num_agents .. e * num_agents + {self.num_agents - 1}); envs {partial.tolist()} "
                             "are named in part")

    def send(self, actions, env_ids, value=None, logprob=None, **fields) -> None:
        """`SegmentVecEnv.send` over agent slots; `env_ids` names every slot of each env it names (the env
        steps when all of its agents' actions are in; actions of slots that sit out are dropped).

        Raises:
            ValueError: an env is named in part (and the errors of `SegmentVecEnv.send`).
        """
        self._guard("send")
        self._whole_envs(np.asarray(env_ids).reshape(-1), "send")
        super().send(actions, env_ids, value, logprob, **fields)

    def reset_async(self, seed=None, options: dict | None = None) -> None:
        """`SegmentVecEnv.reset_async`; a ``reset_mask`` covers whole envs (every slot of an env or none).
        Env e is seeded with the seed of its first slot (``seed + e * num_agents`` for an int seed)."""
        if options and "reset_mask" in options:
            self._guard("reset_async")
            mask = np.asarray(options["reset_mask"])
            if mask.shape == (self.num_envs,) and mask.dtype == np.bool_:
                self._whole_envs(np.flatnonzero(mask), "reset_mask")
        super().reset_async(seed=seed, options=options)

    def _received(self, env_ids: np.ndarray, wanted: int, deadline) -> np.ndarray:
        """Whole envs: a worker publishes an env's slots in one call, but another worker's slots may come
        between them in the ready order, so a receive can end in the middle of an env: its other slots are
        received too, and whole envs beyond `wanted` wait in ``_undelivered`` for the next `recv`."""
        A = self.num_agents
        while True:
            counts = np.bincount(env_ids // A, minlength=self.num_multiagent_envs)
            missing = int((A - counts[(counts > 0) & (counts < A)]).sum())
            if not missing:
                break
            env_ids = np.concatenate([env_ids, self._pop(missing, deadline)])
        groups = list(dict.fromkeys((env_ids // A).tolist()))  # in the order received
        keep = np.isin(env_ids // A, groups[:max(1, wanted // A)])
        self._undelivered = np.concatenate([self._undelivered, env_ids[~keep]])
        return env_ids[keep]

    def _results(self, env_ids: np.ndarray, size: int, deadline: float | None = None):
        obs, rewards, terminated, truncated, infos = super()._results(env_ids, size, deadline)
        self._add_active(infos, env_ids)
        ended = infos.get("_" + ENV_EPISODE_KEY)
        if ended is not None and ended.any():
            record = infos[ENV_EPISODE_KEY]
            self._env_episodes.extend(zip((env_ids[ended] // self.num_agents).tolist(),
                                          record["return"][ended].tolist(), record["length"][ended].tolist()))
        return obs, rewards, terminated, truncated, infos

    def reset_wait(self, timeout: float | None = None):
        obs, infos = super().reset_wait(timeout)
        self._add_active(infos, self._all_ids)
        return obs, infos

    def _add_active(self, infos: dict, env_ids: np.ndarray) -> None:
        """``infos["active"]``: the slot's agent is in its env now (its next action is used)."""
        infos["active"] = self._storage.env_sits_out[env_ids] == 0
        infos["_active"] = np.ones(len(env_ids), bool)

    def episodes(self, max_n: int | None = None) -> dict:
        """`SegmentVecEnv.episodes` per agent slot (``env_id`` holds slot ids), with ``env_index`` and
        ``agent_index`` arrays beside it, and ``env_episodes``: the episodes of whole envs received since the
        last call, ``{"env_index", "return", "length"}`` arrays (return: every agent's rewards summed;
        length: env steps), in the order the learner received their last step."""
        episodes = super().episodes(max_n)
        episodes["env_index"] = episodes["env_id"] // self.num_agents
        episodes["agent_index"] = episodes["env_id"] % self.num_agents
        whole, self._env_episodes = self._env_episodes, []
        episodes["env_episodes"] = {
            "env_index": np.asarray([e for e, _, _ in whole], np.int64),
            "return": np.asarray([r for _, r, _ in whole], np.float64),
            "length": np.asarray([n for _, _, n in whole], np.int64)}
        return episodes

    def __repr__(self) -> str:
        return (f"MultiAgentVecEnv({self.backend_name}, envs={self.num_multiagent_envs}, agents={self.num_agents}, "
                f"slots={self.num_envs}, batch_size={self.batch_size}, horizon={self.horizon})")


def make_multiagent(env, num_envs: int = 8, **options) -> MultiAgentVecEnv:
    """Makes a `MultiAgentVecEnv`: `num_envs` PettingZoo envs, one row stream per agent slot.

    Args:
        env: a zero-argument callable returning a PettingZoo ``ParallelEnv`` (e.g.
            ``knights_archers_zombies_v11.parallel_env``) or an ``AECEnv`` (converted with
            ``aec_to_parallel``); or a list of such callables, one per env.  Every agent of ``possible_agents`` must have the same observation space
            and the same action space (else `SpaceMismatchError`: pad them first, e.g. with SuperSuit's
            ``pad_observations_v0`` / ``pad_action_space_v0``).
        num_envs: PettingZoo envs; the vector env has ``num_envs * num_agents`` agent slots.
        **options: see `SegmentVecEnv`, counted in slots: ``batch_size`` (default all slots) must be a
            multiple of ``num_agents``.  ``num_workers`` (processes) must divide `num_envs`, so that all
            slots of an env live in one worker; default ``min(num_envs, cpu count)`` rounded down to a
            divisor.

    One env is built in this process first, to read its agents and their spaces, and closed.

    Raises:
        ValueError: sizes that split an env's slots, or agents whose spaces differ (`SpaceMismatchError`).
        TypeError: `env` is not a callable (or a list of them).

    Example:
        >>> import segvec
        >>> from pettingzoo.butterfly import knights_archers_zombies_v11
        >>> envs = segvec.make_multiagent(knights_archers_zombies_v11.parallel_env, num_envs=2,
        ...                               backend="serial", horizon=8)
        >>> envs.num_agents, envs.num_envs, envs.agent_slot(1, "archer_1"), envs.slot_agent(5)
        (4, 8, 5, (1, 'archer_1'))
        >>> obs, info = envs.reset(seed=0)
        >>> obs.shape
        (8, 27, 5)
        >>> envs.close()
    """
    if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    env_fns = [env] * num_envs if callable(env) else list(env) if isinstance(env, (list, tuple)) else None
    if env_fns is None or not all(callable(fn) for fn in env_fns):
        raise TypeError("env must be a zero-argument callable returning a PettingZoo ParallelEnv (or AECEnv), or "
                        f"a list of such callables (one per env), got {type(env).__name__}")
    if len(env_fns) != num_envs:
        raise ValueError(f"got {len(env_fns)} env callables for num_envs={num_envs}")
    probe = SharedEnv(env_fns[0](), 0)
    try:
        agents = probe.agents
        observation_spaces = [probe.env.observation_space(agent) for agent in agents]
        action_spaces = [probe.env.action_space(agent) for agent in agents]
    finally:
        probe.close()
    if not agents:
        raise ValueError("the env has no possible_agents")
    for agent, obs_space, action_space in zip(agents, observation_spaces, action_spaces):
        if not (spaces_equal(obs_space, observation_spaces[0]) and spaces_equal(action_space, action_spaces[0])):
            raise SpaceMismatchError(
                f"agent {agent!r} has observation space {obs_space} and action space {action_space}, agent "
                f"{agents[0]!r} has {observation_spaces[0]} and {action_spaces[0]}: make_multiagent keeps the "
                "slots of all agents in one buffer, so every agent must have the same spaces. Pad them to one "
                "shape first (SuperSuit's pad_observations_v0 and pad_action_space_v0 wrap a ParallelEnv so), "
                "or wrap the env so that each agent group you train apart is an env of its own.")
    A = len(agents)
    batch_size = options.get("batch_size")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size % A):
        raise ValueError(f"batch_size counts agent slots and must be a multiple of num_agents={A} (an env's "
                         f"slots become ready together), got {batch_size!r}")
    if options.get("backend", "multiprocessing") == "multiprocessing":
        workers = options.get("num_workers")
        if workers is None:
            workers = min(num_envs, os.cpu_count() or 1, options.get("max_concurrency") or num_envs)
            while num_envs % workers:
                workers -= 1
            options["num_workers"] = workers
        elif not isinstance(workers, (int, np.integer)) or workers < 1 or num_envs % workers:
            raise ValueError(f"num_workers must divide num_envs={num_envs} (all agent slots of an env live in one "
                             f"worker), got {workers!r}")
    elif options.get("backend") == "engine":
        raise ValueError("make_multiagent runs PettingZoo envs on the 'serial' or 'multiprocessing' backend")
    return MultiAgentVecEnv(env_fns, agents, **options)
