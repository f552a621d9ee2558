"""A PettingZoo ParallelEnv whose behaviour follows from its seed, and the plain sequential reference of
what segvec must store for each agent slot.

Everything is module-level so that worker processes (any start method) can pickle the factories.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from tests.envs import policy, value_of

AGENTS = ("a0", "a1", "a2")
ZERO = np.zeros(4, np.float64)


class CounterParallelEnv(ParallelEnv):
    """Agents ``a0, a1, a2``; agent k's observation is ``[index * 10 + k, episode, step, noise]`` (the step
    of the env), so every transition says which env, agent, episode and step it comes from.

    Each episode draws its length (1..`max_length`); each agent may die before it (terminated or truncated
    at a drawn step); the agents left at the end end terminated, truncated or both.  With `late_joins`,
    agent ``a2`` is absent at some resets and joins at a drawn step.  Action 3 adds 0.75 to the reward.
    ``fail_at``: (episode, step) at which `step` raises RuntimeError.
    """

    metadata = {"name": "counter_parallel_v0", "render_modes": []}

    def __init__(self, index: int = 0, max_length: int = 9, late_joins: bool = True, fail_at=None):
        self.index = index
        self.max_length = max_length
        self.late_joins = late_joins
        self.fail_at = fail_at
        self.possible_agents = list(AGENTS)
        self.agents = []
        self._episode = -1
        self._rng = np.random.default_rng()

    def observation_space(self, agent):
        return spaces.Box(-np.inf, np.inf, (4,), np.float64)

    def action_space(self, agent):
        return spaces.Discrete(4)

    def _obs(self, k):
        return np.array([self.index * 10 + k, self._episode, self._t, self._noise[k]], np.float64)

    def reset(self, seed=None, options=None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        rng = self._rng
        self._episode += 1
        self._t = 0
        self._length = int(rng.integers(1, self.max_length + 1))
        self._ending = int(rng.integers(0, 3))  # 0 terminated, 1 truncated, 2 both
        self._death = {a: (int(rng.integers(1, self.max_length + 1)), bool(rng.integers(0, 2))) for a in AGENTS}
        self._join = int(rng.integers(1, self.max_length + 1)) if self.late_joins and rng.random() < 0.3 else 0
        self._noise = rng.random(3)
        self.agents = [a for a in AGENTS if not (a == "a2" and self._join)]
        return {a: self._obs(AGENTS.index(a)) for a in self.agents}, {a: {"episode": self._episode} for a in self.agents}

    def step(self, actions):
        if self.fail_at == (self._episode, self._t):
            raise RuntimeError(f"env {self.index} fails at step {self._t}")
        self._t += 1
        self._noise = self._rng.random(3)
        obs, rewards, terms, truncs, infos = {}, {}, {}, {}, {}
        for a in self.agents:
            k = AGENTS.index(a)
            rewards[a] = float(self.index + k + 0.75 * (int(actions[a]) == 3) - self._noise[k])
            obs[a] = self._obs(k)
            dies_at, by_termination = self._death[a]
            if self._t >= self._length:
                terms[a], truncs[a] = self._ending in (0, 2), self._ending in (1, 2)
            elif self._t == dies_at:
                terms[a], truncs[a] = by_termination, not by_termination
            else:
                terms[a] = truncs[a] = False
            infos[a] = {"t": self._t} if self._t % 3 == 0 else {}
        self.agents = [a for a in self.agents if not (terms[a] or truncs[a])]
        if self._join and self._t == self._join and self._t < self._length and "a2" not in obs:
            self.agents.append("a2")
            obs["a2"] = self._obs(2)
            rewards["a2"], terms["a2"], truncs["a2"], infos["a2"] = 0.0, False, False, {}
        return obs, rewards, terms, truncs, infos


def counter_fns(num_envs: int, max_length: int = 9, **kwargs) -> list:
    """One `CounterParallelEnv` factory per env, each knowing its index."""
    return [functools.partial(CounterParallelEnv, i, max_length, **kwargs) for i in range(num_envs)]


@dataclasses.dataclass
class Stream:
    """One agent slot's slots, as segvec should store them (``real`` False: a slot with mask False)."""

    obs: list
    action: list
    reward: list
    terminated: list
    truncated: list
    real: list
    final: list    # the observation the step returned (the final one when it ended)
    after: list    # the slot's observation after this slot (what recv returns for it next)


def reference_streams(index: int, seed: int, sends: int, mode: str, max_length: int, late_joins: bool = True) -> dict:
    """The plain loop over one `CounterParallelEnv`: reset with `seed`, then `sends` steps of the env with
    `policy` for every agent in it; returns ``({agent: Stream}, [(return, length) of each env episode])``
    (return: the rewards of every agent summed, length: env steps).  `mode` is ``"NextStep"`` or ``"SameStep"``.

    Per agent: a step it takes part in is a real slot; an agent that is not in the env stores nothing; when
    the env resets, NEXT_STEP stores a slot with mask False for every agent (the reset step), SAME_STEP
    resets at once and stores one for each agent that was not in the env; an agent that joins stores one.
    """
    env = CounterParallelEnv(index, max_length, late_joins)
    obs, _ = env.reset(seed=seed)
    current = {a: obs.get(a, ZERO) for a in AGENTS}
    streams = {a: Stream([], [], [], [], [], [], [], []) for a in AGENTS}

    def put(agent, obs, action=-1, reward=0.0, term=False, trunc=False, real=False, final=None, after=None):
        s = streams[agent]
        for name, value in (("obs", obs), ("action", action), ("reward", reward), ("terminated", term),
                            ("truncated", trunc), ("real", real), ("final", final), ("after", after)):
            getattr(s, name).append(value)

    pending_reset = False
    totals, env_episodes = [0.0, 0], []
    for _ in range(sends):
        if pending_reset:
            obs, _ = env.reset()
            for a in AGENTS:
                put(a, current[a], after=obs.get(a, ZERO))
                current[a] = obs.get(a, ZERO)
            pending_reset = False
            continue
        alive = list(env.agents)
        actions = {a: int(policy(current[a])) for a in alive}
        obs, rewards, terms, truncs, _ = env.step(actions)
        done = not env.agents
        totals = [totals[0] + sum(rewards.values()), totals[1] + 1]
        if done:
            env_episodes.append(tuple(totals))
            totals = [0.0, 0]
        fresh = env.reset()[0] if done and mode == "SameStep" else None
        for a in AGENTS:
            if a in alive:
                after = fresh.get(a, ZERO) if fresh is not None else obs[a]
                put(a, current[a], actions[a], rewards[a], terms[a], truncs[a], True, obs[a], after)
                current[a] = after
            elif fresh is not None:
                put(a, current[a], after=fresh.get(a, ZERO))
                current[a] = fresh.get(a, ZERO)
            elif a in obs:  # joins
                put(a, current[a], after=obs[a])
                current[a] = obs[a]
        if done and mode == "NextStep":
            pending_reset = True
    return streams, env_episodes


__all__ = ["AGENTS", "CounterParallelEnv", "Stream", "counter_fns", "reference_streams", "value_of"]
