"""Evaluation on envs of its own: `Evaluator` runs whole episodes of a policy on separate instances of the
training envs, built from the same constructors in the learner's process, so the training envs, their rows
and their bootstraps are never touched (`SegmentVecEnv.evaluate` is the face).

Episodes are spread over the evaluation envs before any runs: env ``i`` of ``k`` owes
``(num_episodes + i) // k`` episodes and only its first that many count, so short episodes never crowd out
long ones (counting the first ``num_episodes`` to finish anywhere would favour them).
"""
from __future__ import annotations

import traceback
from typing import Callable, Sequence

import gymnasium
import numpy as np
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate

from segvec.errors import make_env_error
from segvec.runner import close_envs


class Evaluator:
    """Evaluation envs built from `env_fns` (env ``i`` from ``env_fns[i % len(env_fns)]``), kept between runs.

    Attributes:
        num_envs: evaluation envs (built on the first `run` that needs them; a run asking for another number
            rebuilds them).
    """

    num_envs: int

    def __init__(self, env_fns: Sequence[Callable[[], gymnasium.Env]]):
        self.env_fns = list(env_fns)
        self._envs: list[gymnasium.Env] = []
        self.num_envs = 0

    def _build(self, num_envs: int) -> list[gymnasium.Env]:
        if len(self._envs) != num_envs:
            self.close()
            for index in range(num_envs):
                try:
                    self._envs.append(self.env_fns[index % len(self.env_fns)]())
                except Exception as error:
                    raise make_env_error(error, index, "__init__", traceback.format_exc(),
                                         source=f"evaluation env {index}") from error
            self.num_envs = num_envs
        return self._envs

    def run(self, policy: Callable, num_episodes: int, num_envs: int, seed: int | None,
            max_steps: int | None, episode_start: bool = False) -> dict:
        """Runs `num_episodes` whole episodes (see `SegmentVecEnv.evaluate` for the arguments and result)."""
        envs = self._build(num_envs)
        obs_space, action_space = envs[0].observation_space, envs[0].action_space
        batched_actions = batch_space(action_space, num_envs)
        owed = np.array([(num_episodes + i) // num_envs for i in range(num_envs)], np.int64)
        obs = [self._call(i, "reset", seed=None if seed is None else seed + i)[0] for i in range(num_envs)]
        returns: list[list[float]] = [[] for _ in range(num_envs)]
        lengths: list[list[int]] = [[] for _ in range(num_envs)]
        episode_return, episode_length = np.zeros(num_envs), np.zeros(num_envs, np.int64)
        starts = np.ones(num_envs, bool)  # obs[i] is the first observation of an episode
        steps = 0
        while (owed > 0).any():
            if max_steps is not None and steps >= max_steps:
                raise RuntimeError(f"evaluate: {steps} steps (max_steps) and {int(owed.sum())} of the "
                                   f"{num_episodes} episodes still running: raise max_steps, or make sure the "
                                   "env's episodes end (a TimeLimit)")
            batch = concatenate(obs_space, obs, create_empty_array(obs_space, n=num_envs))  # the policy's own
            actions = policy(batch, starts.copy()) if episode_start else policy(batch)
            if isinstance(actions, tuple):  # (actions, values, logprobs, ...): the actions come first
                actions = actions[0]
            if type(actions).__module__.startswith("torch"):
                actions = actions.detach().cpu().numpy()
            if not isinstance(actions, (dict, tuple)):
                actions = np.asarray(actions)
                if actions.shape[:1] != (num_envs,):
                    raise ValueError(f"evaluate: the policy returned actions of shape {actions.shape} for "
                                     f"{num_envs} observations; it must return one action per observation")
            starts[:] = False
            for i, action in enumerate(iterate(batched_actions, actions)):
                if not owed[i]:
                    continue  # this env's episodes are done: it waits (its observation stays in the batch)
                next_obs, reward, terminated, truncated, _ = self._call(i, "step", action)
                steps += 1
                episode_return[i] += float(reward)
                episode_length[i] += 1
                if terminated or truncated:
                    returns[i].append(float(episode_return[i]))
                    lengths[i].append(int(episode_length[i]))
                    episode_return[i], episode_length[i] = 0.0, 0
                    owed[i] -= 1
                    if owed[i]:
                        next_obs = self._call(i, "reset")[0]
                        starts[i] = True
                obs[i] = next_obs
        env_index = np.concatenate([np.full(len(r), i, np.int64) for i, r in enumerate(returns)])
        return {"return": np.array(sum(returns, []), np.float64), "length": np.array(sum(lengths, []), np.int64),
                "env_index": env_index}

    def _call(self, index: int, method: str, *args, **kwargs):
        """``env.method(*args, **kwargs)`` of evaluation env `index`; an error becomes an EnvError naming it."""
        try:
            return getattr(self._envs[index], method)(*args, **kwargs)
        except Exception as error:
            raise make_env_error(error, index, method, traceback.format_exc(),
                                 source=f"evaluation env {index}") from error

    def close(self) -> None:
        """Closes the evaluation envs (idempotent)."""
        envs, self._envs, self.num_envs = self._envs, [], 0
        close_envs(envs)
