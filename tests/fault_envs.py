"""Envs that misbehave on purpose, for ``test_faults.py`` and ``benchmarks/soak.py``.

Everything here is module-level so that every start method (fork, spawn, forkserver) can pickle the
factories by reference.  `fault_fns` builds one factory per env where only env `target` misbehaves.
"""
from __future__ import annotations

import functools
import os
import time

import gymnasium
import numpy as np
from gymnasium import spaces


class EnvBoom(ValueError):
    """The error a faulty env raises (a ValueError subclass, to check the original type survives)."""


class FaultEnv(gymnasium.Env):
    """A tiny env with a 4-float observation and 2 actions, which can fail in a chosen way.

    Args:
        index: the env's index in its vector env (written into its observations).
        fault: None, or what goes wrong: ``"init"``, ``"reset"``, ``"step"`` (raise EnvBoom),
            ``"hang_step"``, ``"hang_reset"`` (sleep forever), ``"slow_reset"`` (sleep `delay` seconds in
            every reset), ``"bad_shape"``, ``"bad_dtype"`` (return a wrong observation from ``step``),
            ``"nan_reward"`` (reward NaN on every step), ``"reward_shape"`` (a reward of shape (1,)).
        delay: seconds of a slow reset.
        infos: every step returns a non-empty info ``{"t": step in episode}``.
        at_step: the fault happens from this step on (step faults; 0 = the first step).
        times: how many steps are faulty (None: every step from `at_step` on).
        episode_length: steps until ``terminated``.
        obs_dtype: dtype of the observation space.
    """

    metadata = {"render_modes": []}

    def __init__(self, index: int = 0, fault: str | None = None, at_step: int = 0, episode_length: int = 50,
                 obs_dtype=np.float32, delay: float = 0.5, infos: bool = False, times: int | None = None):
        if fault == "init":
            raise EnvBoom(f"env {index} refuses to be built")
        self.index = index
        self.fault = fault
        self.at_step = at_step
        self.times = times
        self.delay = delay
        self.infos = infos
        self.episode_length = episode_length
        self.observation_space = spaces.Box(0, 255, (4,), dtype=obs_dtype)
        self.action_space = spaces.Discrete(2)
        self.steps = 0
        self.t = 0

    def _obs(self):
        return np.full(4, self.index % 256, dtype=self.observation_space.dtype)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if self.fault == "reset":
            raise EnvBoom(f"env {self.index} fails to reset")
        if self.fault == "hang_reset":
            time.sleep(3600)
        if self.fault == "slow_reset":
            time.sleep(self.delay)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        faulty = self.steps >= self.at_step and (self.times is None or self.steps < self.at_step + self.times)
        self.steps += 1
        self.t += 1
        if faulty:
            if self.fault == "step":
                raise EnvBoom(f"env {self.index} fails at step {self.steps - 1}")
            if self.fault == "reward_shape":
                return self._obs(), np.array([1.0]), False, False, {}
            if self.fault == "step_oserror":
                raise FileNotFoundError(2, "No such file or directory", "rom.bin")
            if self.fault == "hang_step":
                time.sleep(3600)
            if self.fault == "bad_shape":
                return np.zeros(5, np.float32), 1.0, False, False, {}
            if self.fault == "bad_dtype":
                return np.full(4, 0.5, np.float64), 1.0, False, False, {}
        reward = float("nan") if faulty and self.fault == "nan_reward" else 1.0
        return self._obs(), reward, self.t >= self.episode_length, False, {"t": self.t} if self.infos else {}

    def slow_call(self, seconds: float) -> int:
        """A method that takes a while (for killing a worker during `call`)."""
        time.sleep(seconds)
        return self.index


def make_fault_env(index: int = 0, fault: str | None = None, **kwargs) -> FaultEnv:
    """Module-level factory: picklable by reference under every start method."""
    return FaultEnv(index, fault, **kwargs)


def fault_fns(num_envs: int, fault: str | None = None, target: int = 0, **kwargs) -> list:
    """One factory per env; env `target` gets `fault`, the others behave."""
    return [functools.partial(make_fault_env, i, fault if i == target else None, **kwargs)
            for i in range(num_envs)]


def pid_env() -> FaultEnv:
    """A well-behaved env (used where the factory itself is under test)."""
    return FaultEnv(os.getpid() % 256)
