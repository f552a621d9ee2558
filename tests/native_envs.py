"""C ports of the test envs (``tests/native/counter_envs.c``), built with `segvec.native.build` on import.

- `NativeCounterEnv`: `envs.CounterEnv` in C, draw for draw, so `envs.reference_slots` is its reference.
- `NativeCountingEnv`: `storm.CountingEnv` in C (obs ``[env_index, build, episode, step]``, fails every
  `fail_every` steps), for the restart and kill-storm checks.
"""
from __future__ import annotations

import functools
import os
import pathlib

import segvec.native

HERE = pathlib.Path(__file__).resolve().parent
MODULE = segvec.native.build("segvec_test_envs", [HERE / "native" / "counter_envs.c"])


class NativeCounterEnv(segvec.native.NativeEnv):
    native = MODULE.env_class("counter")


class NativeCountingEnv(segvec.native.NativeEnv):
    """`storm.CountingEnv` in C; `build` is unique to each construction, in any process."""

    native = MODULE.env_class("counting")
    builds: dict = {}

    def __init__(self, env_index: int, fail_every: int = 0, episode_length: int = 7):
        count = NativeCountingEnv.builds.get((os.getpid(), env_index), 0)
        NativeCountingEnv.builds[(os.getpid(), env_index)] = count + 1
        super().__init__(env_index=env_index, fail_every=fail_every, episode_length=episode_length,
                         build=os.getpid() * 1000 + count)

    @property
    def build(self) -> int:
        return int(self.params["build"])


def native_counter_fns(num_envs: int, max_length: int = 9) -> list:
    """One `NativeCounterEnv` factory per env, each knowing its index."""
    return [functools.partial(NativeCounterEnv, index=i, max_length=max_length) for i in range(num_envs)]


def native_counting_factory(env_index: int, fail_every: int):
    return functools.partial(NativeCountingEnv, env_index, fail_every)
