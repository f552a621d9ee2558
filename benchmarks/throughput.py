"""Env steps per second of segvec next to the usual vector envs, side by side in one run.

For each env (CartPole-v1, the light and the heavy synthetic Atari-shaped env of ``segvec.envs``) and each
number of envs, every method is built and warmed up, then each of ``--repeats`` rounds gives every method
one timed window of ``--seconds`` in turn (interleaved, so that a slow spell of a shared machine lands on
all of them alike), stepping random pre-sampled actions.  The table shows the median steps/s, the spread
of the repeats ((max - min) / median) and the ratio to one env stepped in a plain loop ("raw", measured in
the same rounds).  Then the targets are checked and marked PASS/MISS.

Methods:
    raw            one env, ``env.step`` in a loop with pre-sampled actions, ``reset`` when an episode ends
    gym-sync       gymnasium ``SyncVectorEnv``
    gym-async      gymnasium ``AsyncVectorEnv(shared_memory=True)`` (one process per env)
    sb3            stable-baselines3 ``SubprocVecEnv`` (one process per env; only if installed)
    puffer         PufferLib ``pufferlib.vector.Multiprocessing``, ``--workers`` workers, batch of half the
                   envs (only if installed)
    segvec-serial  segvec, serial backend, ``reset``/``step``
    segvec-sync    segvec, multiprocessing backend, ``--workers`` workers, ``batch_size = num_envs``
    segvec-async   segvec, multiprocessing backend, ``--workers`` workers, ``batch_size = num_envs / 2``,
                   ``recv``/``send`` loop
    segvec-share   segvec-sync with ``learner_share=True``: ``--workers`` counts the learner, which steps
                   worker 0's envs itself (``--workers`` - 1 worker processes)

C envs (``segvec/CartPole-c``, gymnasium's CartPole-v1 in C) at scale, ``--c-envs`` envs (default 4096), in a
second table whose ratios are to a plain C loop (the ceiling: no Python, no segments):
    c-loop           the CartPole of ``native/envs/cartpole.c`` stepped over all envs in one C loop that writes
                     observations, rewards and flags into arrays, autoresets included (compiled on the fly)
    segvec-c-serial  segvec, serial backend, ``step``, taking and releasing every complete round of segments
    segvec-c-sync    the same on the multiprocessing backend, ``--workers`` workers
    segvec-c-async   multiprocessing, ``batch_size = n / 2``, ``recv``/``send``, taking and releasing segments
    envpool-sync     EnvPool's CartPole-v1, ``batch_size = n``, ``--workers`` threads (only if installed)
    envpool-async    EnvPool, ``batch_size = n / 2``, ``recv``/``send`` (only if installed)

Batched engines (``--engines``, default ``ale,envpool``; each only if installed): Pong stepped by the engine
alone and by segvec over the same engine (``segvec.wrap_vector_env``), same number of envs, same engine
settings (``--workers`` threads), each ratio against that engine alone (target: >= 0.9x), in steps per
second and in steps per CPU second of the process (what segvec costs, whatever else runs on the machine):
    ale            ale-py ``AtariVectorEnv("pong")``, ``step`` loop
    segvec-ale     segvec over it, ``step`` loop
    envpool        EnvPool ``Pong-v5``, ``step`` loop
    segvec-envpool segvec over it, ``step`` loop
    envpool-async  EnvPool ``Pong-v5`` in its async mode (``batch_size = num_envs / 2``), ``recv``/``send`` loop
    segvec-envpool-async  segvec's async face over it, ``recv``/``send`` loop

Multi-agent (``--multiagent``, default 8: numbers of PettingZoo envs; 0 skips it): Knights-Archers-Zombies
(``pettingzoo[butterfly]``, vector observations, 4 agents per env) in agent steps per second (one per agent
slot and env step, agents that died included), each ratio against the plain loop, same number of envs:
    ma-raw           one ParallelEnv, ``env.step`` in a loop (ratio 1)
    supersuit        SuperSuit ``concat_vec_envs_v1`` over ``pettingzoo_env_to_vec_env_v1(black_death_v3(env))``,
                     ``--workers`` processes (only if installed)
    puffer-ma        PufferLib's PettingZoo emulation on ``pufferlib.vector.Multiprocessing``, ``--workers``
                     workers (only if installed)
    segvec-ma-sync   ``segvec.make_multiagent``, multiprocessing backend, ``--workers`` workers, ``step`` loop
    segvec-ma-async  the same, ``batch_size`` = half the slots, ``recv``/``send`` loop
Targets: segvec-ma-sync and segvec-ma-async >= 2x SuperSuit and >= 1x PufferLib.

Usage:
    python benchmarks/throughput.py                      # full run (about 20 minutes on 2 cores)
    python benchmarks/throughput.py --envs none --c-envs 0 --engines none --multiagent 8   # multi-agent only
    python benchmarks/throughput.py --quick --envs cartpole --num-envs 8 --c-envs 0 --engines none
    python benchmarks/throughput.py --envs light,heavy --num-envs 8,32 --seconds 3 --repeats 5
    python benchmarks/throughput.py --envs none --c-envs 4096 --engines none  # the C envs' table only
    python benchmarks/throughput.py --envs none --c-envs 0 --engines ale,envpool --num-envs 8   # engines only
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from typing import Callable

import gymnasium
import numpy as np

import segvec
import segvec.envs

PONG_PYTHON = "ALE/Pong-v5+preprocessing"  # ALE Pong as a Python env: see EnvFactory
ENV_ALIASES = {
    "cartpole": "CartPole-v1",
    "light": "segvec/SyntheticAtari-v0",
    "heavy": "segvec/SyntheticAtariHeavy-v0",
    "pong": PONG_PYTHON,
}
LIGHT_ENVS = ("CartPole-v1", "segvec/SyntheticAtari-v0")  # targets against gymnasium Async apply here
HEAVY_ENVS = ("segvec/SyntheticAtariHeavy-v0",)
RAW_CHUNK = 64            # raw steps between two clock reads
ACTION_BANK = 256         # pre-sampled action batches, cycled


class EnvFactory:
    """A picklable ``gymnasium.make(env_id)`` that also works in spawned processes."""

    def __init__(self, env_id: str):
        self.env_id = env_id

    def __call__(self):
        import segvec.envs  # noqa: F401 - registers the synthetic ids in a fresh process
        if self.env_id == PONG_PYTHON:  # the standard Atari preprocessing, each env a Python object
            import ale_py

            gymnasium.register_envs(ale_py)
            env = gymnasium.make("ALE/Pong-v5", frameskip=1)
            env = gymnasium.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84,
                                                        grayscale_obs=True, scale_obs=False)
            return gymnasium.wrappers.FrameStackObservation(env, 4)
        return gymnasium.make(self.env_id)


def _action_bank(space: gymnasium.Space, count: int = ACTION_BANK) -> list:
    space.seed(0)
    return [space.sample() for _ in range(count)]


def _batched(single_space: gymnasium.Space, n: int) -> list[np.ndarray]:
    space = gymnasium.vector.utils.batch_space(single_space, n)
    return _action_bank(space)


# ---- methods: each returns (step, close); step() does some env steps and returns how many ----------
def setup_raw(env_id: str, n: int, workers: int):
    env = EnvFactory(env_id)()
    env.reset(seed=0)
    actions = _action_bank(env.action_space, 4096)
    state = {"i": 0}

    def step() -> int:
        i, env_step, reset = state["i"], env.step, env.reset
        for _ in range(RAW_CHUNK):
            _, _, terminated, truncated, _ = env_step(actions[i & 4095])
            i += 1
            if terminated or truncated:
                reset()
        state["i"] = i
        return RAW_CHUNK

    return step, env.close


def _cycling_steps(envs, actions, n: int):
    """(step, close) for a vector env stepped with a bank of pre-sampled action batches."""
    state = {"i": 0}

    def step() -> int:
        envs.step(actions[state["i"] % ACTION_BANK])
        state["i"] += 1
        return n

    return step, envs.close


def _gym_vector(envs, n: int):
    envs.reset(seed=0)
    return _cycling_steps(envs, _batched(envs.single_action_space, n), n)


def setup_gym_sync(env_id: str, n: int, workers: int):
    return _gym_vector(gymnasium.vector.SyncVectorEnv([EnvFactory(env_id)] * n), n)


def setup_gym_async(env_id: str, n: int, workers: int):
    return _gym_vector(gymnasium.vector.AsyncVectorEnv([EnvFactory(env_id)] * n, shared_memory=True), n)


def setup_sb3(env_id: str, n: int, workers: int):
    from stable_baselines3.common.vec_env import SubprocVecEnv

    envs = SubprocVecEnv([EnvFactory(env_id)] * n, start_method="fork")
    envs.seed(0)
    envs.reset()
    return _cycling_steps(envs, _batched(envs.action_space, n), n)


def _puffer_env(env_id: str, buf=None, seed: int = 0):
    import pufferlib.emulation

    return pufferlib.emulation.GymnasiumPufferEnv(env_creator=EnvFactory(env_id), buf=buf, seed=seed)


def setup_puffer(env_id: str, n: int, workers: int):
    import pufferlib.vector

    batch = n // 2
    envs = pufferlib.vector.make(functools.partial(_puffer_env, env_id), backend=pufferlib.vector.Multiprocessing,
                                 num_envs=n, num_workers=workers, batch_size=batch)
    space = envs.single_action_space
    space.seed(0)
    actions = [np.asarray([space.sample() for _ in range(batch)], np.int32) for _ in range(ACTION_BANK)]
    envs.async_reset(seed=0)
    state = {"i": 0}

    def step() -> int:
        envs.recv()
        envs.send(actions[state["i"] % ACTION_BANK])
        state["i"] += 1
        return batch

    def close() -> None:
        envs.close()
        for process in envs.processes:  # close() only terminates them
            process.join(5)

    return step, close


def _segvec_vector(env_id: str, n: int, **options):
    return _gym_vector(segvec.make_vec(EnvFactory(env_id), num_envs=n, **options), n)


def setup_segvec_serial(env_id: str, n: int, workers: int):
    return _segvec_vector(env_id, n, backend="serial")


def setup_segvec_sync(env_id: str, n: int, workers: int):
    return _segvec_vector(env_id, n, backend="multiprocessing", num_workers=workers)


def setup_segvec_share(env_id: str, n: int, workers: int):
    return _segvec_vector(env_id, n, backend="multiprocessing", num_workers=workers, learner_share=True)


def setup_segvec_async(env_id: str, n: int, workers: int):
    envs = segvec.make_vec(EnvFactory(env_id), num_envs=n, backend="multiprocessing", num_workers=workers,
                           batch_size=n // 2)
    actions = _batched(envs.single_action_space, n)
    envs.async_reset(seed=0)
    state = {"i": 0}

    def step() -> int:
        _, _, _, _, info = envs.recv()
        env_ids = info["env_id"]
        envs.send(actions[state["i"] % ACTION_BANK][:len(env_ids)], env_ids)
        state["i"] += 1
        return len(env_ids)

    return step, envs.close


# ---- batched engines: each method returns (step, close) like the others -------------------------------
ENGINE_GAME = "Pong"
ENGINE_SEGMENT_OPTIONS = {"horizon": 128}  # segvec's defaults otherwise: num_segments = 4 * num_envs


def _ale(n: int, workers: int):
    from ale_py.vector_env import AtariVectorEnv

    return AtariVectorEnv(ENGINE_GAME.lower(), n, num_threads=workers)


def _envpool(n: int, workers: int, batch_size: int | None = None):
    import warnings

    import envpool

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = envpool.make_gymnasium(f"{ENGINE_GAME}-v5", num_envs=n, batch_size=batch_size or n,
                                        num_threads=workers, seed=0)
        engine.single_observation_space  # (built on first use)
    return engine


def _engine_alone(engine, n: int):
    engine.reset(seed=0) if not _is_envpool(engine) else engine.reset()
    return _cycling_steps(engine, _batched(engine.single_action_space, n), n)


def _is_envpool(engine) -> bool:
    return any(cls.__module__.startswith("envpool") for cls in type(engine).__mro__)


def _segvec_engine(engine, n: int):
    import warnings

    envs = segvec.wrap_vector_env(engine, **ENGINE_SEGMENT_OPTIONS)
    actions = _batched(envs.single_action_space, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", segvec.SegvecWarning)  # (EnvPool ignores reset seeds, and says so)
        envs.reset(seed=0)
    # Steady state, as in training after the first rollouts: every row of the block written once.
    i = 0
    while envs.stats()["segments_completed"] < envs.num_segments:
        envs.step(actions[i % ACTION_BANK])
        i += 1
    return _cycling_steps(envs, actions, n)


def setup_ale(env_id: str, n: int, workers: int):
    return _engine_alone(_ale(n, workers), n)


def setup_segvec_ale(env_id: str, n: int, workers: int):
    return _segvec_engine(_ale(n, workers), n)


def setup_envpool(env_id: str, n: int, workers: int):
    return _engine_alone(_envpool(n, workers), n)


def setup_segvec_envpool(env_id: str, n: int, workers: int):
    return _segvec_engine(_envpool(n, workers), n)


def _recv_send_loop(envs, batch: int) -> Callable[[], int]:
    """An ``async_reset``, then one ``recv``/``send`` of `batch` envs per call (EnvPool's async API, which
    segvec's async face shares)."""
    actions = _batched(envs.single_action_space, batch)
    envs.async_reset()
    state = {"i": 0}

    def step() -> int:
        info = envs.recv()[4]
        envs.send(actions[state["i"] % ACTION_BANK], info["env_id"])
        state["i"] += 1
        return batch

    return step


def setup_envpool_async(env_id: str, n: int, workers: int):
    engine = _envpool(n, workers, batch_size=n // 2)
    return _recv_send_loop(engine, n // 2), engine.close


def setup_segvec_envpool_async(env_id: str, n: int, workers: int):
    envs = segvec.wrap_vector_env(_envpool(n, workers, batch_size=n // 2), **ENGINE_SEGMENT_OPTIONS)
    step = _recv_send_loop(envs, n // 2)
    while envs.stats()["segments_completed"] < envs.num_segments:  # steady state (see _segvec_engine)
        step()
    return step, envs.close


ENGINE_METHODS: dict[str, tuple[str, Callable, str | None]] = {
    "ale": ("ale-py AtariVectorEnv", setup_ale, "ale_py"),
    "segvec-ale": ("segvec over AtariVectorEnv", setup_segvec_ale, "ale_py"),
    "envpool": ("EnvPool (sync)", setup_envpool, "envpool"),
    "segvec-envpool": ("segvec over EnvPool (sync)", setup_segvec_envpool, "envpool"),
    "envpool-async": ("EnvPool async (n/2)", setup_envpool_async, "envpool"),
    "segvec-envpool-async": ("segvec async face over EnvPool async", setup_segvec_envpool_async, "envpool"),
}
ENGINES = {  # --engines name: (engine alone, segvec over it) pairs of ENGINE_METHODS
    "ale": [("ale", "segvec-ale")],
    "envpool": [("envpool", "segvec-envpool"), ("envpool-async", "segvec-envpool-async")],
}


# ---- multi-agent: agent slots of PettingZoo envs (Knights-Archers-Zombies) ------------------------------
MA_ENV = "knights_archers_zombies_v11"


def _kaz():
    from pettingzoo.butterfly import knights_archers_zombies_v11

    return knights_archers_zombies_v11.parallel_env(obs_method="vector")


def setup_ma_raw(env_id: str, n: int, workers: int):
    """One env in a plain loop; counts one agent step per possible agent and env step, as the others do."""
    env = _kaz()
    env.reset(seed=0)
    space = env.action_space(env.possible_agents[0])
    actions = [int(a) for a in _action_bank(space)]
    agents = len(env.possible_agents)
    state = {"i": 0}

    def step() -> int:
        if not env.agents:
            env.reset()
        env.step({agent: actions[(state["i"] + k) % ACTION_BANK] for k, agent in enumerate(env.agents)})
        state["i"] += 1
        return agents

    return step, env.close


def setup_supersuit(env_id: str, n: int, workers: int):
    import supersuit

    venv = supersuit.pettingzoo_env_to_vec_env_v1(supersuit.black_death_v3(_kaz()))
    venv = supersuit.concat_vec_envs_v1(venv, n, num_cpus=workers, base_class="gymnasium")
    venv.reset(seed=0)
    return _cycling_steps(venv, _batched(venv.action_space, venv.num_envs), venv.num_envs)


def setup_puffer_ma(env_id: str, n: int, workers: int):
    import pufferlib.emulation
    import pufferlib.vector

    make = functools.partial(pufferlib.emulation.PettingZooPufferEnv, env_creator=_kaz)
    envs = pufferlib.vector.make(make, backend=pufferlib.vector.Multiprocessing, num_envs=n, num_workers=workers)
    envs.reset(seed=0)
    return _cycling_steps(envs, _batched(envs.single_action_space, envs.num_agents), envs.num_agents)


def setup_segvec_ma_sync(env_id: str, n: int, workers: int):
    envs = segvec.make_multiagent(_kaz, num_envs=n, backend="multiprocessing", num_workers=workers)
    return _gym_vector(envs, envs.num_envs)


def setup_segvec_ma_async(env_id: str, n: int, workers: int):
    envs = segvec.make_multiagent(_kaz, num_envs=n, backend="multiprocessing", num_workers=workers,
                                  batch_size=(n // 2) * 4)
    return _recv_send_loop(envs, envs.batch_size), envs.close


MA_METHODS: dict[str, tuple[str, Callable, str | None]] = {
    "ma-raw": ("raw single ParallelEnv (ratio 1)", setup_ma_raw, "pettingzoo"),
    "supersuit": ("SuperSuit concat_vec_envs_v1 (procs)", setup_supersuit, "supersuit"),
    "puffer-ma": ("PufferLib PettingZoo Multiprocessing", setup_puffer_ma, "pufferlib"),
    "segvec-ma-sync": ("segvec make_multiagent sync", setup_segvec_ma_sync, "pettingzoo"),
    "segvec-ma-async": ("segvec make_multiagent async (n/2)", setup_segvec_ma_async, "pettingzoo"),
}


def run_multiagent(counts: list[int], args) -> list[str]:
    """The multi-agent table (agent steps/s, ratios to the plain loop); returns the target lines."""
    methods = list(MA_METHODS)
    results = {n: run_group(MA_ENV, n, methods, args, MA_METHODS) for n in counts}

    def median(n, key):
        rates = results[n][key][0]
        return statistics.median(rates) if rates else None

    raws = {n: median(n, "ma-raw") for n in counts}
    print(f"\n{MA_ENV} (4 agents per env; agent steps/s)   raw single env (measured within each group): "
          + ", ".join(f"{fmt_rate(raws[n])} agent steps/s" if raws[n] else "unavailable" for n in counts), flush=True)
    print(f"  {'method':<40}" + "".join(f"{'n=' + str(n) + ' envs':>27}" for n in counts))
    print(f"  {'':<40}" + "".join(f"{'steps/s spread  x raw':>27}" for _ in counts))
    for key in methods:
        print(f"  {MA_METHODS[key][0]:<40}" + "".join(cell(*results[n][key], raws[n]) for n in counts), flush=True)
    lines = []
    for n in counts:
        for key in ("segvec-ma-sync", "segvec-ma-async"):
            got = median(n, key)
            supersuit, puffer = median(n, "supersuit"), median(n, "puffer-ma")
            lines.append(check(f"{MA_ENV} n={n}: {key}", got, supersuit and 2 * supersuit, ">= 2 x SuperSuit"))
            lines.append(check(f"{MA_ENV} n={n}: {key}", got, puffer, ">= 1 x PufferLib"))
    return lines


METHODS: dict[str, tuple[str, Callable, str | None]] = {
    # key: (label, setup, module that must be importable)
    "raw": ("raw single env (1 env, ratio 1)", setup_raw, None),
    "gym-sync": ("gymnasium SyncVectorEnv", setup_gym_sync, None),
    "gym-async": ("gymnasium AsyncVectorEnv (shm, n procs)", setup_gym_async, None),
    "sb3": ("SB3 SubprocVecEnv (n procs)", setup_sb3, "stable_baselines3"),
    "puffer": ("PufferLib Multiprocessing (async n/2)", setup_puffer, "pufferlib"),
    "segvec-serial": ("segvec serial", setup_segvec_serial, None),
    "segvec-sync": ("segvec multiprocessing sync", setup_segvec_sync, None),
    "segvec-async": ("segvec multiprocessing async (n/2)", setup_segvec_async, None),
    "segvec-share": ("segvec mp sync + learner share", setup_segvec_share, None),
}


# ---- C envs at scale -------------------------------------------------------------------------------------
C_ENV_ID = "segvec/CartPole-c"
C_HORIZON = 128          # segment rows of the C envs' segvec methods (as examples/ppo.py)
C_LOOP_SOURCE = r"""
#include "envs/cartpole.c"   /* the CartPole of segvec/CartPole-c, compiled into the loop */

typedef struct { cartpole_t state; segvec_rng_t rng; int64_t elapsed; } loop_env_t;

int64_t loop_env_bytes(void) { return sizeof(loop_env_t); }

void loop_reset(void *envs, int32_t n, uint64_t seed, float *obs) {
    loop_env_t *e = envs;
    for (int32_t i = 0; i < n; ++i) {
        e[i].rng.state_low = seed + (uint64_t)i; e[i].rng.inc_low = 2 * (uint64_t)i + 1;
        cartpole_reset(&e[i].state, &e[i].rng, 0, obs + 4 * (int64_t)i);
        e[i].elapsed = 0;
    }
}

/* One step of every env: observations, rewards and flags into arrays; an ended episode resets at once. */
void loop_step(void *envs, int32_t n, const int64_t *actions, float *obs, float *rewards, uint8_t *terminated,
               uint8_t *truncated) {
    loop_env_t *e = envs;
    for (int32_t i = 0; i < n; ++i) {
        double reward = 0.0;
        uint8_t term = 0, trunc = 0;
        cartpole_step(&e[i].state, &e[i].rng, &actions[i], obs + 4 * (int64_t)i, &reward, &term, &trunc);
        if (++e[i].elapsed >= 500) trunc = 1;
        rewards[i] = (float)reward;
        terminated[i] = term;
        truncated[i] = trunc;
        if (term || trunc) {
            cartpole_reset(&e[i].state, &e[i].rng, 0, obs + 4 * (int64_t)i);
            e[i].elapsed = 0;
        }
    }
}
"""
_c_loop_lib = None


def c_loop_lib():
    """The plain C loop, compiled on the fly with cffi (once per run, in a temporary directory)."""
    global _c_loop_lib
    if _c_loop_lib is None:
        from cffi import FFI

        import segvec.native

        ffibuilder = FFI()
        ffibuilder.cdef("int64_t loop_env_bytes(void);"
                        "void loop_reset(void *envs, int32_t n, uint64_t seed, float *obs);"
                        "void loop_step(void *envs, int32_t n, const int64_t *actions, float *obs, float *rewards,"
                        "               uint8_t *terminated, uint8_t *truncated);")
        name = f"_segvec_cartpole_loop_{os.getpid()}"
        ffibuilder.set_source(name, C_LOOP_SOURCE, include_dirs=[str(segvec.native.header_dir())],
                              extra_compile_args=["-std=c11", "-O3", "-ffp-contract=off"], libraries=["m"])
        work = tempfile.mkdtemp(prefix="segvec-bench-")
        path = ffibuilder.compile(tmpdir=work, verbose=False)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _c_loop_lib = module
    return _c_loop_lib


def setup_c_loop(env_id: str, n: int, workers: int):
    module = c_loop_lib()
    ffi, lib = module.ffi, module.lib
    memory = ffi.new("char[]", lib.loop_env_bytes() * n)
    obs, rewards = np.zeros((n, 4), np.float32), np.zeros(n, np.float32)
    terminated, truncated = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, 2, n).astype(np.int64) for _ in range(16)]
    pointers = [ffi.from_buffer("int64_t[]", a) for a in actions]
    out = (ffi.from_buffer("float[]", obs), ffi.from_buffer("float[]", rewards),
           ffi.from_buffer("uint8_t[]", terminated), ffi.from_buffer("uint8_t[]", truncated))
    lib.loop_reset(memory, n, 0, out[0])
    state = {"i": 0}

    def step() -> int:
        lib.loop_step(memory, n, pointers[state["i"] & 15], *out)
        state["i"] += 1
        return n

    return step, lambda: None


def _c_actions(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 2, n).astype(np.int64) for _ in range(16)]


def _segvec_c_training(env_id: str, n: int, **options):
    """segvec's ``step`` over C envs, taking and releasing each complete round of segments as training does."""
    envs = segvec.make_vec(env_id, num_envs=n, horizon=C_HORIZON, **options)
    envs.reset(seed=0)
    actions = _c_actions(n)
    state = {"i": 0}

    def step() -> int:
        envs.step(actions[state["i"] & 15])
        state["i"] += 1
        if envs.segments_ready >= n:
            envs.take_segments().release()
        return n

    return step, envs.close


def setup_segvec_c_serial(env_id: str, n: int, workers: int):
    return _segvec_c_training(env_id, n, backend="serial")


def setup_segvec_c_sync(env_id: str, n: int, workers: int):
    return _segvec_c_training(env_id, n, backend="multiprocessing", num_workers=workers)


def setup_segvec_c_async(env_id: str, n: int, workers: int):
    envs = segvec.make_vec(env_id, num_envs=n, backend="multiprocessing", num_workers=workers, batch_size=n // 2,
                           horizon=C_HORIZON)
    actions = _c_actions(n)
    envs.async_reset(seed=0)
    state = {"i": 0}

    def step() -> int:
        _, _, _, _, info = envs.recv()
        env_ids = info["env_id"]
        envs.send(actions[state["i"] & 15][:len(env_ids)], env_ids)
        state["i"] += 1
        if envs.segments_ready >= n // 2:
            envs.take_segments().release()
        return len(env_ids)

    return step, envs.close


def setup_envpool_sync(env_id: str, n: int, workers: int):
    import envpool

    envs = envpool.make("CartPole-v1", env_type="gymnasium", num_envs=n, batch_size=n, num_threads=workers, seed=0)
    envs.reset()
    actions = _c_actions(n)
    state = {"i": 0}

    def step() -> int:
        envs.step(actions[state["i"] & 15])
        state["i"] += 1
        return n

    return step, envs.close


def setup_envpool_async(env_id: str, n: int, workers: int):
    import envpool

    envs = envpool.make("CartPole-v1", env_type="gymnasium", num_envs=n, batch_size=n // 2, num_threads=workers,
                        seed=0)
    envs.async_reset()
    actions = _c_actions(n)
    state = {"i": 0}

    def step() -> int:
        _, _, _, _, info = envs.recv()
        env_ids = info["env_id"]
        envs.send(actions[state["i"] & 15][:len(env_ids)], env_ids)
        state["i"] += 1
        return len(env_ids)

    return step, envs.close


C_METHODS: dict[str, tuple[str, Callable, str | None]] = {
    "c-loop": ("plain C loop, 1 thread (ratio 1)", setup_c_loop, None),
    "segvec-c-serial": ("segvec serial + segments", setup_segvec_c_serial, None),
    "segvec-c-sync": ("segvec multiprocessing sync + segments", setup_segvec_c_sync, None),
    "segvec-c-async": ("segvec mp async (n/2) + segments", setup_segvec_c_async, None),
    "envpool-sync": ("EnvPool sync (workers threads)", setup_envpool_sync, "envpool"),
    "envpool-async": ("EnvPool async (n/2, workers threads)", setup_envpool_async, "envpool"),
}


def measure(step: Callable[[], int], seconds: float, repeats: int, warmup: float,
            cpu_rates: list | None = None) -> list[float]:
    """Steps for `warmup` seconds, then `repeats` windows of `seconds`; returns steps/s of each window.
    With `cpu_rates`, also appends each window's steps per CPU second of this process (all its threads)."""
    clock = time.perf_counter
    end = clock() + warmup
    while clock() < end:
        step()
    rates = []
    for _ in range(repeats):
        steps = 0
        start, cpu_start = clock(), time.process_time()
        end = start + seconds
        while True:
            steps += step()
            now = clock()
            if now >= end:
                break
        rates.append(steps / (now - start))
        if cpu_rates is not None:
            cpu_rates.append(steps / max(time.process_time() - cpu_start, 1e-9))
    return rates


def available(module: str | None) -> bool:
    if module is None:
        return True
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure to import means "not available"
        return False
    return True


def _short(error: BaseException) -> str:
    return f"error: {type(error).__name__}: {error}"[:60]


def run_group(env_id: str, n: int, methods: list[str], args, table: dict | None = None,
              cpu: dict | None = None) -> dict[str, tuple[list[float] | None, str | None]]:
    """Measures every method (of `table`, default `METHODS`) on `n` copies of `env_id`, interleaving their
    timed windows.

    Every method is built and warmed up first; then each repeat gives every method one window in turn, so
    a slow spell of a shared machine lands on all of them alike.  Returns ``{key: (rates, None)}`` or
    ``{key: (None, why not)}``.
    """
    results: dict[str, tuple[list[float] | None, str | None]] = {}
    live: dict[str, tuple[Callable, Callable]] = {}
    table = METHODS if table is None else table
    try:
        for key in methods:
            _, setup, module = table[key]
            if not available(module):
                results[key] = (None, "not installed")
                continue
            close = None
            try:
                step, close = setup(env_id, n, args.workers)
                measure(step, 0.0, 0, args.warmup)
            except Exception as error:  # noqa: BLE001 - one broken method must not end the comparison
                if args.verbose:
                    traceback.print_exc()
                results[key] = (None, _short(error))
                if close is not None:
                    _close_quietly(close)
                continue
            live[key] = (step, close)
            results[key] = ([], None)
        settle = min(args.warmup, 0.5)  # untimed steps before each window: caches, and idle pollers to sleep
        for _ in range(args.repeats):
            for key in list(live):
                step, close = live[key]
                try:
                    cpu_rates = None if cpu is None else cpu.setdefault(key, [])
                    results[key][0].extend(measure(step, args.seconds, 1, settle, cpu_rates))
                except Exception as error:  # noqa: BLE001
                    if args.verbose:
                        traceback.print_exc()
                    results[key] = (None, _short(error))
                    _close_quietly(live.pop(key)[1])
    finally:
        for step, close in live.values():
            _close_quietly(close)
    return results


def _close_quietly(close: Callable) -> None:
    try:
        close()
    except Exception:  # noqa: BLE001 - closing the others matters more
        pass


# ---- report -----------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version_of(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:  # noqa: BLE001
        return "not installed"


def header(args) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    usable = usable_cores()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return "\n".join([
        f"segvec throughput benchmark   {now}",
        f"machine: {cpu_model()}, {os.cpu_count()} logical cores ({usable} usable), {platform.system()} "
        f"{platform.release()}, load average {load}",
        f"python {platform.python_version()}, numpy {np.__version__}, gymnasium {gymnasium.__version__}, "
        f"segvec {segvec.__version__}, stable-baselines3 {version_of('stable_baselines3')}, "
        f"pufferlib {version_of('pufferlib')}, ale-py {version_of('ale_py')}, envpool {version_of('envpool')}",
        f"settings: {args.seconds:g} s x {args.repeats} repeats after {args.warmup:g} s warm-up, "
        f"{args.workers} workers for PufferLib and segvec multiprocessing; gymnasium Async and SB3 use one "
        f"process per env; synthetic work unit {segvec.envs.calibrate_work() * 1e6:.2f} us",
    ])


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _spin(seconds: float, results) -> None:
    """Counts loops of plain Python work for `seconds` (a process of the capacity probe)."""
    end = time.perf_counter() + seconds
    loops = 0
    while time.perf_counter() < end:
        total = 0
        for i in range(1000):
            total += i
        loops += 1
    results.put(loops / seconds)


def parallel_capacity(processes: int, seconds: float = 0.5) -> float:
    """How many single-core speeds `processes` busy processes get together right now (ideal: `processes`).

    Well below the ideal means other programs hold cores, and "2 x raw" is out of reach for everyone.
    """
    import multiprocessing

    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    rates = []
    for count in (1, processes):
        queue = context.Queue()
        workers = [context.Process(target=_spin, args=(seconds, queue)) for _ in range(count)]
        for worker in workers:
            worker.start()
        total = sum(queue.get() for _ in workers)
        for worker in workers:
            worker.join()
        rates.append(total)
    return rates[1] / rates[0]


def capacity_line(workers: int, at: str, seconds: float) -> str:
    capacity = parallel_capacity(workers, seconds)
    return (f"parallel capacity at the {at}: {workers} busy processes run {capacity:.2f}x "
            f"as fast as one (ideal {workers:.2f}x)")


def busy_warning() -> None:
    """Says so when other processes keep the machine busy before we start: the numbers will be noisy."""
    if not hasattr(os, "getloadavg"):
        return
    one_minute = os.getloadavg()[0]
    if one_minute > 1.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {one_minute:.1f} before the run on {os.cpu_count()} cores: other processes "
              "share the machine, so steps/s and ratios are unreliable", flush=True)


def fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}"


def cell(rates: list[float] | None, why: str | None, raw: float | None) -> str:
    if rates is None:
        return f"{why:>27}"
    median = statistics.median(rates)
    spread = (max(rates) - min(rates)) / median * 100 if median else 0.0
    ratio = f"{median / raw:5.2f}x" if raw else "   - "
    return f"{fmt_rate(median):>11} {spread:>4.0f}% {ratio:>7}"


def check(label: str, got: float | None, target: float | None, what: str) -> str:
    if got is None or target is None:
        return f"  {label:<52} {what:<26} {'n/a':>23}   SKIP"
    status = "PASS" if got >= target else "MISS"
    return f"  {label:<52} {what:<26} {fmt_rate(got):>11} / {fmt_rate(target):>9}   {status}"


def print_c_table(counts: list[int], methods: list[str], args) -> None:
    """The C envs' table: every method at each count, ratios to the plain C loop measured in the same rounds."""
    methods = ["c-loop"] + [m for m in methods if m != "c-loop"]
    results = {n: run_group(C_ENV_ID, n, methods, args, C_METHODS) for n in counts}
    loops = {n: statistics.median(results[n]["c-loop"][0]) if results[n]["c-loop"][0] else None for n in counts}
    print(f"\n{C_ENV_ID} (gymnasium's CartPole-v1 in C)   plain C loop (measured within each group): "
          + ", ".join(f"{fmt_rate(loops[n])} steps/s" if loops[n] else "unavailable" for n in counts), flush=True)
    print(f"  {'method':<40}" + "".join(f"{'n=' + str(n):>27}" for n in counts))
    print(f"  {'':<40}" + "".join(f"{'steps/s spread  x loop':>27}" for _ in counts))
    for key in methods:
        print(f"  {C_METHODS[key][0]:<40}" + "".join(cell(*results[n][key], loops[n]) for n in counts), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", default="cartpole,light,heavy",
                        help="comma list of cartpole, light, heavy, pong (ALE Pong with AtariPreprocessing and a 4-frame "
                             "stack, Python envs) or gymnasium ids (default: cartpole,light,heavy), or none")
    parser.add_argument("--c-envs", default="4096",
                        help="comma list of env counts for the C envs' table (default 4096; 0: skip it)")
    parser.add_argument("--c-methods", default=",".join(C_METHODS),
                        help=f"comma list among {', '.join(C_METHODS)} (default: all)")
    parser.add_argument("--engines", default="ale,envpool",
                        help=f"comma list among {', '.join(ENGINES)}, or none: Pong on batched engines, alone and "
                             "under segvec (default: both)")
    parser.add_argument("--num-envs", default="8,32", help="comma list of env counts (default: 8,32)")
    parser.add_argument("--multiagent", default="8",
                        help="comma list of PettingZoo env counts for the multi-agent table (default 8; 0: skip it)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma list among {', '.join(METHODS)} (default: all)")
    parser.add_argument("--seconds", type=float, default=None, help="length of one timed window (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed windows per method (default 3)")
    parser.add_argument("--warmup", type=float, default=None, help="untimed seconds first (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="processes for PufferLib and segvec (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="short windows, one repeat (defaults 0.3 s, 1 repeat, 0.1 s warm-up)")
    parser.add_argument("--cpus", default=None,
                        help="comma list of CPU ids to run on (Linux), e.g. 0,1 to act as a 2-core machine")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")
    args = parser.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})  # children inherit it
    quick = args.quick
    args.seconds = args.seconds if args.seconds is not None else (0.3 if quick else 2.0)
    args.repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (0.1 if quick else 1.0)
    env_ids = [ENV_ALIASES.get(name.strip(), name.strip()) for name in args.envs.split(",")
               if name.strip() and name.strip() != "none"]
    c_counts = [int(c) for c in args.c_envs.split(",") if c.strip() and int(c)]
    c_methods = [m.strip() for m in args.c_methods.split(",") if m.strip()]
    if [m for m in c_methods if m not in C_METHODS]:
        parser.error(f"unknown C methods {[m for m in c_methods if m not in C_METHODS]}; choose among {list(C_METHODS)}")
    for n in c_counts:
        if n < 2 or n % 2 or n % args.workers:
            parser.error(f"--c-envs {n}: needs an even n that is a multiple of --workers")
    ma_counts = [int(c) for c in args.multiagent.split(",") if c.strip() and int(c)]
    for n in ma_counts:
        if n < 2 or n % 2 or n % args.workers:
            parser.error(f"--multiagent {n}: needs an even n that is a multiple of --workers")
    engines = [name.strip() for name in args.engines.split(",") if name.strip() and name.strip() != "none"]
    unknown_engines = [name for name in engines if name not in ENGINES]
    if unknown_engines:
        parser.error(f"unknown engines {unknown_engines}; choose among {list(ENGINES)}")
    counts = [int(c) for c in args.num_envs.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose among {list(METHODS)}")
    for n in counts:
        if n < 2 or n % 2 or n % args.workers:
            parser.error(f"--num-envs {n}: needs an even n that is a multiple of --workers")
        if "puffer" in methods and (n // 2) % (n // args.workers):
            parser.error(f"--num-envs {n}: PufferLib needs n/2 to be a multiple of n/workers")

    print(header(args), flush=True)
    probe_seconds = 0.2 if quick else 0.5
    print(capacity_line(args.workers, "start", probe_seconds), flush=True)
    busy_warning()
    methods = ["raw"] + [m for m in methods if m != "raw"]  # every ratio needs raw, measured in each group
    results: dict[tuple[str, int, str], tuple[list[float] | None, str | None]] = {}
    raw_rates: dict[tuple[str, int], float | None] = {}
    for env_id in env_ids:
        for n in counts:
            for key, outcome in run_group(env_id, n, methods, args).items():
                results[(env_id, n, key)] = outcome
            rates = results[(env_id, n, "raw")][0]
            raw_rates[(env_id, n)] = statistics.median(rates) if rates else None
        raws = [raw_rates[(env_id, n)] for n in counts]
        print(f"\n{env_id}   raw single env (measured within each group): "
              + ", ".join(f"{fmt_rate(r)} steps/s" if r else "unavailable" for r in raws), flush=True)
        print(f"  {'method':<40}" + "".join(f"{'n=' + str(n):>27}" for n in counts))
        print(f"  {'':<40}" + "".join(f"{'steps/s spread  x raw':>27}" for _ in counts))
        for key in methods:
            print(f"  {METHODS[key][0]:<40}" + "".join(
                cell(*results[(env_id, n, key)], raw_rates[(env_id, n)]) for n in counts), flush=True)

    def median(env_id, n, key):
        rates, _ = results.get((env_id, n, key), (None, None))
        return statistics.median(rates) if rates else None

    if c_counts:
        print_c_table(c_counts, c_methods, args)

    engine_lines = run_engines(engines, counts, args, results, median)
    multiagent_lines = run_multiagent(ma_counts, args) if ma_counts else []

    print("\ntargets (got / target steps/s)")
    lines = []
    for env_id in env_ids:
        for n in counts:
            raw = raw_rates.get((env_id, n))
            where = f"{env_id} n={n}"
            for key in ("segvec-sync", "segvec-async", "segvec-share"):
                if key not in methods:
                    continue
                label = f"{where}: {key}"
                if env_id == PONG_PYTHON:
                    lines.append(check(label, median(env_id, n, key), raw and 0.85 * 2 * raw,
                                       ">= 0.85 x (2 x raw)"))
                elif env_id in HEAVY_ENVS:
                    lines.append(check(label, median(env_id, n, key), raw and 0.95 * 2 * raw,
                                       ">= 0.95 x (2 x raw)"))
                else:
                    lines.append(check(label, median(env_id, n, key), raw and 0.75 * 2 * raw,
                                       ">= 0.75 x (2 x raw)"))
                    if env_id in LIGHT_ENVS and "gym-async" in methods:
                        gym_async = median(env_id, n, "gym-async")
                        lines.append(check(label, median(env_id, n, key), gym_async and 10 * gym_async,
                                           ">= 10 x gymnasium Async"))
            if "segvec-serial" in methods and "gym-sync" in methods:
                lines.append(check(f"{where}: segvec-serial", median(env_id, n, "segvec-serial"),
                                   median(env_id, n, "gym-sync"), ">= 1.0 x gymnasium Sync"))
    lines += engine_lines + multiagent_lines
    print("\n".join(lines))
    passed = sum(line.endswith("PASS") for line in lines)
    missed = sum(line.endswith("MISS") for line in lines)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"\n{passed} PASS, {missed} MISS; load average at the end {load} (this run's processes included)",
          flush=True)
    print(capacity_line(args.workers, "end", probe_seconds), flush=True)
    return 0


def run_engines(engines: list[str], counts: list[int], args, results: dict, median) -> list[str]:
    """Pong on each batched engine, alone and under segvec (interleaved windows per number of envs); prints
    one table per engine, each ratio against that engine alone, in steps per second and in steps per CPU
    second of this process (the engines' threads included: on a machine that others share, the CPU ratio
    says what segvec costs, the wall-clock one also what the others took).  Returns the target lines."""
    lines = []
    for engine in engines:
        pairs = ENGINES[engine]
        keys = [key for pair in pairs for key in pair]
        cpu: dict[tuple, list] = {}
        for n in counts:
            per_method: dict[str, list] = {}
            for key, outcome in run_group(f"engine:{engine}", n, keys, args, ENGINE_METHODS, per_method).items():
                results[(f"engine:{engine}", n, key)] = outcome
                cpu[(n, key)] = per_method.get(key) if outcome[0] else None
        print(f"\n{ENGINE_GAME} on {engine}   (ratio: against the same engine alone, same number of envs; "
              f"{args.workers} engine threads)", flush=True)
        print(f"  {'method':<40}" + "".join(f"{'n=' + str(n):>27}" for n in counts))
        print(f"  {'':<40}" + "".join(f"{'steps/s spread  x alone':>27}" for _ in counts))
        for alone, over in pairs:
            for key in (alone, over):
                print(f"  {ENGINE_METHODS[key][0]:<40}" + "".join(
                    cell(*results[(f"engine:{engine}", n, key)], median(f"engine:{engine}", n, alone))
                    for n in counts), flush=True)
        print(f"  {'per CPU second of this process':<40}" + "".join(f"{'steps/cpu-s spread x alone':>27}"
                                                                   for _ in counts))
        for alone, over in pairs:
            for key in (alone, over):
                print(f"  {ENGINE_METHODS[key][0]:<40}" + "".join(
                    cell(cpu[(n, key)], "n/a", statistics.median(cpu[(n, alone)]) if cpu[(n, alone)] else None)
                    for n in counts), flush=True)
            for n in counts:
                base = median(f"engine:{engine}", n, alone)
                lines.append(check(f"{ENGINE_GAME} {engine} n={n}: {over}", median(f"engine:{engine}", n, over),
                                   base and 0.9 * base, f">= 0.9 x {alone}"))
                cpu_over, cpu_alone = cpu[(n, over)], cpu[(n, alone)]
                lines.append(check(f"{ENGINE_GAME} {engine} n={n}: {over} (per CPU second)",
                                   statistics.median(cpu_over) if cpu_over else None,
                                   0.9 * statistics.median(cpu_alone) if cpu_alone else None, f">= 0.9 x {alone}"))
    return lines


if __name__ == "__main__":
    sys.exit(main())
