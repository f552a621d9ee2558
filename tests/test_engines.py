"""Batched engines as env sources (`segvec.wrap_vector_env`): the sub-envs of gymnasium's SyncVectorEnv and
AsyncVectorEnv, ale-py's AtariVectorEnv and EnvPool, through all three faces, against plain references.

- `CounterEnv`s (observations that say ``(env, episode, step)``) in Sync/Async vector envs go through the
  driver and the checker of ``test_segments.py``: every transition exactly once, slot for slot against the
  sequential reference, with exact bootstraps and GAE, in each autoreset mode, on both faces.
- Real engines (Pong on AtariVectorEnv and EnvPool, EnvPool's CartPole) are replayed: the same engine,
  alone, with the same seeds and each env's same actions, gives the sequence that the taken rows of that
  env must concatenate to (observations, rewards, flags, masks, bootstraps, episodes).
"""
from __future__ import annotations

import functools
import multiprocessing
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segvec
from envs import CounterEnv, DictEnv, counter_fns, policy, reference_slots, value_of
from test_segments import OPS, Config, _cycle, check, drive

NEXT, SAME, DISABLED = AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED
pytestmark = pytest.mark.filterwarnings("ignore:.*precision lowered by casting:UserWarning")  # (EnvPool's spaces)


# ---- CounterEnvs in gymnasium's vector envs, through the driver of test_segments.py --------------------
def sync_counters(num_envs: int, max_length: int, mode: AutoresetMode):
    return SyncVectorEnv(counter_fns(num_envs, max_length), autoreset_mode=mode)


def async_counters(num_envs: int, max_length: int, mode: AutoresetMode):
    return AsyncVectorEnv(counter_fns(num_envs, max_length), autoreset_mode=mode, context="fork")


def over(engine_fn, cfg: Config):
    """`drive`'s ``make``: segvec over the engine `engine_fn` builds for `cfg`."""
    def make(num_envs, **options):
        return segvec.wrap_vector_env(engine_fn(num_envs, cfg.max_length, cfg.mode), **options)
    return make


def waiting_for_others(envs) -> bool:
    """Envs sent actions that wait for the rest (an engine that steps every env at once)."""
    return bool(envs._backend._pending.any())


def engine_config_strategy(max_envs: int, max_iterations: int):
    @st.composite
    def build(draw):
        num_envs = draw(st.integers(1, max_envs))
        face = draw(st.sampled_from(["async", "step"]))
        modes = [NEXT, SAME, DISABLED] if face == "step" else [NEXT, SAME]
        return Config(
            backend="engine", mode=draw(st.sampled_from(modes)), face=face, num_envs=num_envs,
            batch_size=draw(st.integers(1, num_envs)), horizon=draw(st.integers(1, 40)),
            segments_per_env=draw(st.integers(4, 6)), seed=draw(st.integers(0, 10_000)),
            max_length=draw(st.integers(1, 12)), use_value_fn=draw(st.booleans()),
            iterations=draw(st.integers(1, max_iterations)))
    return build()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=engine_config_strategy(5, 120), data=st.data())
def test_exactly_once_over_sync_vector_env(cfg, data):
    run = drive(cfg, lambda k: data.draw(st.integers(0, k)), lambda: data.draw(OPS), make=over(sync_counters, cfg),
                pending=waiting_for_others)
    check(cfg, run)


@pytest.mark.parametrize("mode, face, batch_size, use_value_fn", [
    (NEXT, "step", 4, False), (SAME, "step", 4, False), (DISABLED, "step", 4, True),
    (NEXT, "async", 2, True), (SAME, "async", 4, False), (SAME, "async", 1, True),
], ids=lambda v: getattr(v, "name", str(v)))
def test_exactly_once_over_async_vector_env(mode, face, batch_size, use_value_fn):
    cfg = Config("engine", mode, face, num_envs=4, batch_size=batch_size, horizon=5, segments_per_env=4, seed=7,
                 max_length=6, use_value_fn=use_value_fn, iterations=70)
    run = drive(cfg, _cycle(0, 2, 1, 0, 3, 1, 0, 4), make=over(async_counters, cfg), pending=waiting_for_others)
    check(cfg, run)


def test_gae_over_whole_episodes_of_a_sync_vector_env():
    """With rows longer than the run, a row is the env's whole sequence: GAE inside it is the textbook one."""
    from test_segments import GAMMA, LAM, whole_episode_gae

    E, T = 3, 100
    envs = segvec.wrap_vector_env(sync_counters(E, 7, SAME), horizon=T, value_fn=value_of)
    try:
        obs, _ = envs.reset(seed=21)
        for _ in range(60):
            obs = envs.step(policy(obs), value=value_of(obs))[0]
        envs.flush()
        with envs.take_segments() as batch:
            advantages, _ = segvec.gae(batch, GAMMA, LAM)
            for i, e in enumerate(batch.env_id.tolist()):
                slots = reference_slots(e, [(21 + e, 60)], "SameStep", 7)[0]
                np.testing.assert_allclose(advantages[i, :60], whole_episode_gae(slots, GAMMA, LAM), rtol=1e-5,
                                           atol=1e-5)
    finally:
        envs.close()


# ---- the faces over an engine that steps every env at once --------------------------------------------
def test_the_async_face_returns_one_engine_step_in_batches():
    engine = sync_counters(4, 9, NEXT)
    steps, step = [], engine.step
    engine.step = lambda actions: steps.append(actions.copy()) or step(actions)
    envs = segvec.wrap_vector_env(engine, horizon=8, batch_size=2)
    try:
        envs.async_reset(seed=0)
        seen = []
        for i in range(6):
            obs, _, _, _, info = envs.recv()
            seen.append(info["env_id"].tolist())
            envs.send(policy(obs), info["env_id"])
            assert len(steps) == (i + 1) // 2, "the engine steps once every env has its action"
        for first, second in zip(seen[::2], seen[1::2]):
            assert sorted(first + second) == [0, 1, 2, 3]
        envs.flush()
        with envs.take_segments() as batch:
            assert batch.length.sum() == 3 * 4
    finally:
        envs.close()


def test_a_recv_returns_fewer_when_the_rest_needs_actions_first():
    """3 envs in batches of 2 on an engine that steps all at once: the second recv of every step has only
    one env to return (the others wait for it), so it returns that one."""
    envs = segvec.wrap_vector_env(sync_counters(3, 9, NEXT), horizon=8, batch_size=2)
    try:
        envs.async_reset(seed=0)
        sizes = []
        for _ in range(8):
            obs, _, _, _, info = envs.recv()
            sizes.append(len(info["env_id"]))
            envs.send(policy(obs), info["env_id"])
        assert sizes == [2, 1] * 4
    finally:
        envs.close()


def test_a_timeout_never_cuts_an_engine_call_short():
    """AsyncVectorEnv gives a timed-out step up (its results would reach the next call): the engine's call
    runs to its end, and the step comes back whole."""
    from envs import SlowResetEnv

    engine = AsyncVectorEnv([functools.partial(SlowResetEnv, i, 0.0) for i in range(2)], context="fork")
    envs = segvec.wrap_vector_env(engine, horizon=4)
    try:
        obs, _ = envs.reset(seed=0)
        envs.step_async(np.array([2, 2]))  # SlowResetEnv sleeps action / 10 s in its step
        obs2 = envs.step_wait(timeout=0.05)[0]
        np.testing.assert_array_equal(obs2[:, :2], obs[:, :2])
        assert (obs2[:, 2] == 1).all()  # (an ending step returns the final observation: step 1 too)
        with pytest.raises(multiprocessing.TimeoutError):  # a deadline already past: nothing is asked
            envs.step_async(np.array([0, 0]))
            envs.step_wait(timeout=0)
        envs.step_wait()
    finally:
        envs.close(terminate=True)


def test_a_send_of_some_envs_waits_for_the_others_and_says_so():
    envs = segvec.wrap_vector_env(sync_counters(4, 9, NEXT), horizon=8, batch_size=2)
    try:
        envs.async_reset(seed=0)
        obs, _, _, _, info = envs.recv()
        held = int(info["env_id"][1])
        envs.send(policy(obs[:1]), info["env_id"][:1])  # one of the two received
        obs, _, _, _, info = envs.recv()                 # the two not received yet
        envs.send(policy(obs), info["env_id"])
        with pytest.raises(segvec.SegvecError, match=rf"steps all its 4 envs at once.*\[{held}\]"):
            envs.recv()
        with pytest.raises(ValueError, match="wait for the other envs"):  # a reset that keeps them
            envs.async_reset(options={"reset_mask": np.array([e == held for e in range(4)])})
        envs.async_reset(seed=1)  # a reset of every env drops the waiting actions: they were never applied
        assert envs.stats()["steps"] == 0
        got = np.concatenate([envs.recv()[4]["env_id"] for _ in range(2)])
        assert sorted(got.tolist()) == [0, 1, 2, 3]
    finally:
        envs.close()


def test_reset_with_seeds_and_a_mask_reaches_the_engine():
    envs = segvec.wrap_vector_env(sync_counters(3, 9, NEXT), horizon=4)
    try:
        obs, _ = envs.reset(seed=[10, 20, 30])
        for e, seed in enumerate((10, 20, 30)):
            np.testing.assert_array_equal(obs[e], CounterEnv(e).reset(seed=seed)[0])
        envs.step(np.zeros(3, np.int64))
        before = envs.step(np.zeros(3, np.int64))[0]
        obs, _ = envs.reset(seed=[None, 5, None], options={"reset_mask": np.array([False, True, False])})
        reset_obs = CounterEnv(1).reset(seed=5)[0]
        np.testing.assert_array_equal(obs[1][[0, 2, 3]], reset_obs[[0, 2, 3]])  # (its episode count goes on)
        np.testing.assert_array_equal(obs[[0, 2]], before[[0, 2]])
    finally:
        envs.close()


def test_dict_observations_and_same_step_final_obs():
    E, T = 3, 4
    engine = SyncVectorEnv([DictEnv] * E, autoreset_mode=SAME)
    envs = segvec.wrap_vector_env(engine, horizon=T, num_segments=40 * E)
    try:
        obs, _ = envs.reset(seed=3)
        seen, truncations = [obs], {}
        rng = np.random.default_rng(0)
        for k in range(25):
            obs, _, term, trunc, infos = envs.step(rng.integers(0, 3, E))
            seen.append(obs)
            for e in np.flatnonzero(trunc & ~term):
                truncations[(int(e), k)] = infos["final_obs"][e]
        envs.flush()
        with envs.take_segments() as batch:
            final_obs, positions = batch.final_obs
            assert set(batch.obs) == {"position", "count", "flags"} and len(positions) == len(truncations) > 0
            for e in range(E):
                rows = sorted(np.flatnonzero(batch.env_id == e), key=lambda i: batch.start_step[i])
                for key in batch.obs:
                    stream = np.concatenate([batch.obs[key][i, :batch.length[i]] for i in rows]
                                            + [batch.obs[key][rows[-1], batch.length[rows[-1]]][None]])
                    np.testing.assert_array_equal(stream, np.stack([o[key][e] for o in seen]), err_msg=key)
            for j, (i, t) in enumerate(positions.tolist()):
                expected = truncations[(int(batch.env_id[i]), int(batch.start_step[i] + t))]
                for key in final_obs:
                    np.testing.assert_array_equal(final_obs[key][j], expected[key])
    finally:
        envs.close()


def test_infos_are_the_engines_own():
    class Tagged(CounterEnv):
        def step(self, action):
            obs, reward, terminated, truncated, _ = super().step(action)
            return obs, reward, terminated, truncated, {"tag": self.index * 10 + self._t}

    engine = SyncVectorEnv([functools.partial(Tagged, i, 4) for i in range(4)], autoreset_mode=SAME)
    envs = segvec.wrap_vector_env(engine, horizon=4, batch_size=2)
    endings = 0
    try:
        envs.async_reset(seed=0)
        for _ in range(30):
            obs, _, terminated, truncated, info = envs.recv()
            ids, ended = info["env_id"], terminated | truncated
            if "tag" in info:  # the step's info; an ended env's is in final_info (its info is the reset's)
                np.testing.assert_array_equal(info["_tag"], ~ended)
                np.testing.assert_array_equal(info["tag"][~ended], ids[~ended] * 10 + obs[~ended, 2])
            if ended.any():
                endings += int(ended.sum())
                assert info["_final_info"][ended].all() and not info["_final_info"][~ended].any()
                final_steps = np.array([f[2] for f in info["final_obs"][ended]])
                np.testing.assert_array_equal(info["final_info"]["tag"][ended], ids[ended] * 10 + final_steps)
            envs.send(policy(obs), ids)
        assert endings > 0
    finally:
        envs.close()


def test_calls_reach_the_sub_envs_of_a_sync_vector_env():
    engine = sync_counters(3, 9, NEXT)
    envs = segvec.wrap_vector_env(engine, horizon=4)
    try:
        assert envs.engine is engine and envs.num_envs == 3 and envs.num_workers == 1
        assert envs.get_attr("index") == (0, 1, 2)
        assert envs.call_at([2, 0], "index") == (2, 0)
        envs.set_attr("max_length", [4, 5, 6])
        assert envs.get_attr("max_length") == (4, 5, 6)
        assert envs.metadata["autoreset_mode"] == NEXT
    finally:
        envs.close()
    assert engine.closed, "the engine is closed with the vector env"


# ---- errors -----------------------------------------------------------------------------------------
class FailsOnce(CounterEnv):
    """A `CounterEnv` whose `fail_at`-th step raises (once per process)."""

    failed = False

    def __init__(self, index: int = 0, fail_at: int = 3):
        super().__init__(index)
        self.fail_at, self.steps = fail_at, 0

    def step(self, action):
        self.steps += 1
        if self.steps == self.fail_at and not FailsOnce.failed:
            FailsOnce.failed = True
            raise ValueError("boom in the engine")
        return super().step(action)


def test_an_engine_that_raises_fails_its_envs_until_reset():
    FailsOnce.failed = False
    engine = SyncVectorEnv([functools.partial(FailsOnce, i, 3 + i) for i in range(3)])
    envs = segvec.wrap_vector_env(engine, horizon=4)
    try:
        obs, _ = envs.reset(seed=0)
        for _ in range(2):
            obs = envs.step(policy(obs))[0]
        with pytest.raises(segvec.EnvError) as caught:
            envs.step(policy(obs))
        error = caught.value
        assert isinstance(error, ValueError) and error.env_index == -1 and error.failed_envs == [0, 1, 2]
        assert "SyncVectorEnv raised in step" in str(error) and "boom in the engine" in error.worker_traceback
        with pytest.raises(segvec.NotReceivedError, match="failed"):
            envs.step(policy(obs))
        obs, _ = envs.reset(seed=1)  # the engine can reset: everything goes on
        for _ in range(5):
            obs = envs.step(policy(obs), value=value_of(obs))[0]
        envs.flush()
        with envs.take_segments() as batch:  # the failed step is written nowhere
            assert batch.length.sum() == (2 + 5) * 3
    finally:
        envs.close()


def test_an_async_vector_env_that_raises_names_the_engine():
    FailsOnce.failed = False
    engine = AsyncVectorEnv([functools.partial(FailsOnce, i, 2) for i in range(2)], context="fork")
    envs = segvec.wrap_vector_env(engine, horizon=4)
    try:
        obs, _ = envs.reset(seed=0)
        obs = envs.step(policy(obs))[0]
        with pytest.raises(segvec.EnvError, match="AsyncVectorEnv raised in step"):
            envs.step(policy(obs))
    finally:
        envs.close(terminate=True)


def test_what_does_not_apply_to_an_engine_is_refused():
    with pytest.raises(TypeError, match="batched engine"):
        segvec.wrap_vector_env(gymnasium.make("CartPole-v1"))
    for options, match in (({"restart_failed_envs": True}, "rebuilt one by one"),
                           ({"num_workers": 2}, "num_workers"),
                           ({"autoreset_mode": "SameStep"}, "autoresets in NEXT_STEP"),
                           ({"backend": "serial"}, "engine")):
        engine = sync_counters(2, 9, NEXT)
        with pytest.raises(ValueError, match=match):
            segvec.wrap_vector_env(engine, **options)
        engine.close()


# ---- real engines, replayed ---------------------------------------------------------------------------
def frame_value(obs) -> np.ndarray:
    """A value function of any batch of observations (deterministic, float32)."""
    flat = np.asarray(obs).reshape(len(obs), -1).astype(np.float64)
    return (flat[:, ::37].sum(1) % 1000 / 100).astype(np.float32)


def action_of(env: int, k: int, n: int) -> int:
    """Env `env`'s action at its `k`-th step (of `n` actions): the same in the replay and the reference."""
    return (env * 5 + k * 3 + k // 7) % n


def reference_run(engine, steps: int, reset: dict, n_actions: int) -> dict:
    """The engine alone, every env stepped in lockstep with `action_of`: per env, the observations
    (reset first), rewards, flags and final observations of each step."""
    E = engine.num_envs
    obs, info = engine.reset(**reset)
    order = np.argsort(info["env_id"]) if "env_id" in info else np.arange(E)
    out = {"obs": [np.asarray(obs)[order]], "reward": [], "terminated": [], "truncated": [], "final": []}
    for k in range(steps):
        actions = np.array([action_of(e, k, n_actions) for e in range(E)], np.int64)
        obs, reward, terminated, truncated, info = engine.step(actions)
        order = np.argsort(info["env_id"]) if "env_id" in info else np.arange(E)
        out["obs"].append(np.asarray(obs)[order])
        for key, value in (("reward", reward), ("terminated", terminated), ("truncated", truncated)):
            out[key].append(np.asarray(value)[order])
        final = info.get("final_obs")
        out["final"].append(None if final is None else np.asarray(final)[order])
    engine.close()
    return {key: (np.stack(value, 1) if key != "final" else value) for key, value in out.items()}


def replay(envs, steps: int, n_actions: int, face: str, take_every: int = 5) -> tuple[dict, np.ndarray, dict]:
    """Runs segvec with `action_of`; returns (rows by env, slots each env filled, episodes)."""
    E = envs.num_envs
    rows = {e: [] for e in range(E)}
    sends = np.zeros(E, np.int64)

    def take():
        with envs.take_segments() as batch:
            for i in range(len(batch)):
                n = int(batch.length[i])
                rows[int(batch.env_id[i])].append({key: getattr(batch, key)[i].copy() for key in (
                    "obs", "reward", "terminated", "truncated", "mask", "next_value", "value")}
                    | {"start": int(batch.start_step[i]), "length": n})

    if face == "step":
        obs, _ = envs.reset(seed=0)
        for k in range(steps):
            actions = np.array([action_of(e, k, n_actions) for e in range(E)], np.int64)
            obs = envs.step(actions, value=frame_value(obs))[0]
            sends += 1
            if k % take_every == 0:
                take()
    else:
        envs.async_reset(seed=0)
        while sends.min() < steps:
            obs, _, _, _, info = envs.recv()
            ids = info["env_id"]
            if "players" in info:  # EnvPool's own infos, gathered for these envs
                np.testing.assert_array_equal(info["players"]["env_id"], ids)
                assert len(info["elapsed_step"]) == len(ids)
            actions = np.array([action_of(e, int(sends[e]), n_actions) for e in ids.tolist()], np.int64)
            envs.send(actions, ids, value=frame_value(obs))
            sends[ids] += 1
            if sends.sum() % (take_every * E) < len(ids):
                take()
    envs.flush()
    take()
    return rows, sends, envs.episodes()


def check_replay(rows: dict, sends: np.ndarray, episodes: dict, ref: dict, mode: AutoresetMode) -> None:
    """The rows of each env concatenate to the engine's own sequence, with exact bootstraps and episodes."""
    for e, env_rows in rows.items():
        env_rows.sort(key=lambda r: r["start"])
        n = int(sends[e])
        assert [r["start"] for r in env_rows] == list(np.cumsum([0] + [r["length"] for r in env_rows])[:-1])
        assert sum(r["length"] for r in env_rows) == n, f"env {e}: rows hold every slot once"
        last = env_rows[-1]
        obs = np.concatenate([r["obs"][:r["length"]] for r in env_rows] + [last["obs"][last["length"]][None]])
        np.testing.assert_array_equal(obs, ref["obs"][e, :n + 1], err_msg=f"env {e}: observations")
        cat = {key: np.concatenate([r[key][:r["length"]] for r in env_rows]) for key in
               ("reward", "terminated", "truncated", "mask", "next_value", "value")}
        ended = ref["terminated"][e, :n] | ref["truncated"][e, :n]
        real = np.ones(n, bool)
        if mode == NEXT:
            real[1:] = ~ended[:-1]  # the step after an ending is the engine's reset step
        np.testing.assert_array_equal(cat["mask"], real, err_msg=f"env {e}: mask")
        np.testing.assert_array_equal(cat["reward"][real], ref["reward"][e, :n][real].astype(np.float32))
        np.testing.assert_array_equal(cat["terminated"], ref["terminated"][e, :n])
        np.testing.assert_array_equal(cat["truncated"], ref["truncated"][e, :n])
        np.testing.assert_array_equal(cat["value"], frame_value(ref["obs"][e, :n]))
        expected = frame_value(ref["obs"][e, 1:n + 1])  # V(next observation): NEXT_STEP's final one included
        expected[ref["terminated"][e, :n]] = 0.0
        if mode == SAME:
            for k in np.flatnonzero(ref["truncated"][e, :n] & ~ref["terminated"][e, :n]):
                expected[k] = frame_value(ref["final"][k][e][None])[0]
        np.testing.assert_array_equal(cat["next_value"][real], expected[real], err_msg=f"env {e}: next_value")
        returns, lengths, total, length = [], [], 0.0, 0
        for k in np.flatnonzero(real):
            total, length = total + float(ref["reward"][e, k]), length + 1
            if ended[k]:
                returns.append(total)
                lengths.append(length)
                total, length = 0.0, 0
        mine = episodes["env_id"] == e
        np.testing.assert_allclose(episodes["return"][mine], returns, err_msg=f"env {e}: episode returns")
        np.testing.assert_array_equal(episodes["length"][mine], lengths, err_msg=f"env {e}: episode lengths")


def ale_pong(num_envs: int, mode: AutoresetMode = NEXT, **kwargs):
    from ale_py.vector_env import AtariVectorEnv

    return AtariVectorEnv("pong", num_envs, autoreset_mode=mode, num_threads=2, max_num_frames_per_episode=120,
                          **kwargs)


@pytest.mark.parametrize("mode, face", [(NEXT, "step"), (SAME, "step"), (NEXT, "async")],
                         ids=lambda v: getattr(v, "name", v))
def test_atari_vector_env_pong_replays_exactly(mode, face):
    pytest.importorskip("ale_py")
    E, steps = 4, 70
    envs = segvec.wrap_vector_env(ale_pong(E, mode), horizon=16, value_fn=frame_value,
                                  batch_size=2 if face == "async" else None)
    try:
        assert envs.single_observation_space.shape == (4, 84, 84)
        rows, sends, episodes = replay(envs, steps, 6, face)
    finally:
        envs.close()
    ref = reference_run(ale_pong(E, mode), int(sends.max()), {"seed": 0}, 6)
    assert ref["truncated"].any(), "the run must cross episode ends"
    check_replay(rows, sends, episodes, ref, mode)


def test_atari_vector_env_seeds_and_infos():
    pytest.importorskip("ale_py")
    envs = segvec.wrap_vector_env(ale_pong(3), horizon=8)
    try:
        obs, info = envs.reset(seed=11)
        reference = ale_pong(3)
        np.testing.assert_array_equal(obs, reference.reset(seed=11)[0])
        reference.close()
        obs, _, _, _, info = envs.step(np.ones(3, np.int64))
        assert {"lives", "frame_number", "episode_frame_number"} <= set(info)
        with pytest.raises(AttributeError, match="envs.engine"):
            envs.get_attr("lives")
    finally:
        envs.close()
    with pytest.raises(ValueError, match="async mode"):
        segvec.wrap_vector_env(ale_pong(4, batch_size=2))


def envpool_make(name: str, num_envs: int, **kwargs):
    envpool = pytest.importorskip("envpool")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (gymnasium's Box precision warnings)
        return envpool.make_gymnasium(name, num_envs=num_envs, seed=3, **kwargs)


@pytest.mark.parametrize("name, batch_size, face, steps", [
    ("CartPole-v1", None, "step", 120), ("CartPole-v1", 3, "async", 120), ("CartPole-v1", None, "async", 60),
    ("Pong-v5", None, "step", 40), ("Pong-v5", 2, "async", 40),
])
def test_envpool_replays_exactly(name, batch_size, face, steps):
    E = 6 if name == "CartPole-v1" else 4
    extra = {"max_episode_steps": 25} if name == "CartPole-v1" else {"max_episode_steps": 30}
    options = {} if batch_size is None else {"batch_size": batch_size}
    envs = segvec.wrap_vector_env(envpool_make(name, E, **options, **extra), horizon=16, value_fn=frame_value)
    try:
        assert envs.batch_size == (batch_size or E)
        with pytest.warns(segvec.SegvecWarning, match="EnvPool fixes"):
            rows, sends, episodes = replay(envs, steps, envs.single_action_space.n, face)
    finally:
        envs.close()
    ref = reference_run(envpool_make(name, E, **extra), int(sends.max()), {}, envs.single_action_space.n)
    assert ref["truncated"].any() or ref["terminated"].any()
    check_replay(rows, sends, episodes, ref, NEXT)


def test_envpool_async_mode_refuses_what_it_cannot_return():
    envs = segvec.wrap_vector_env(envpool_make("CartPole-v1", 4, batch_size=2), horizon=8)
    try:
        envs.async_reset()
        obs, _, _, _, info = envs.recv()
        assert len(info["env_id"]) == 2
        envs.send(np.zeros(1, np.int64), info["env_id"][:1])  # one of the two
        with pytest.raises(ValueError, match="whole batches"):
            envs.async_reset(options={"reset_mask": np.array([True, False, False, False])})
    finally:
        envs.close()
    with pytest.raises(ValueError, match="multiple"):
        segvec.wrap_vector_env(envpool_make("CartPole-v1", 5, batch_size=2))
