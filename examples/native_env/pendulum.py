"""A C env of your own, in two files: ``pendulum.c`` (the env: gymnasium's Pendulum-v1) and this one
(build it, wrap it, give it an id).  Copy both and edit.

    python examples/native_env/pendulum.py        # builds (once, cached), then steps 256 envs in C

Importing this module compiles ``pendulum.c`` the first time (``segvec.native.build``: cffi and a C
compiler; later imports load the cached build, in worker processes too) and registers
``example/Pendulum-c``; ``segvec.make_vec("example/Pendulum-c", ...)`` then steps whole batches of it in
one C call, with all three faces (gymnasium, async, segments) as for any env.
"""
from __future__ import annotations

import pathlib

import numpy as np

import segvec
import segvec.native

HERE = pathlib.Path(__file__).resolve().parent
MODULE = segvec.native.build("pendulum_example", [HERE / "pendulum.c"])


class PendulumEnv(segvec.native.NativeEnv):
    """gymnasium's Pendulum-v1 in C.  Parameter: ``g`` (gravity, default 10.0), e.g. ``PendulumEnv(g=9.81)``."""

    native = MODULE.env_class("pendulum")


segvec.native.register("example/Pendulum-c", PendulumEnv)


def main(num_envs: int = 256, steps: int = 400) -> None:
    envs = segvec.make_vec("example/Pendulum-c", num_envs=num_envs, backend="serial", horizon=64)
    rng = np.random.default_rng(0)
    obs, _ = envs.reset(seed=0)
    for _ in range(steps):
        obs, rewards, terminated, truncated, _ = envs.step(rng.uniform(-2, 2, (num_envs, 1)).astype(np.float32))
    batch = envs.take_segments()
    episodes = envs.episodes()
    print(f"{len(batch)} segments of {envs.horizon} steps; {len(episodes['return'])} episodes, mean return "
          f"{episodes['return'].mean():.1f} (random torques)")
    batch.release()
    envs.close()


if __name__ == "__main__":
    main()
