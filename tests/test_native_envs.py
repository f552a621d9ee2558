"""Envs written in C (``segvec.native``, ABI ``native/segvec_env.h``).

- numpy's SeedSequence and PCG64 in C against numpy itself, and the draws envs make with them;
- ``segvec/CartPole-c`` against gymnasium's CartPole-v1, bit for bit, alone and through segvec's vector
  env (both backends, every autoreset mode), unseeded autoresets included;
- NativeEnv as a gymnasium.Env: the env checker, wrappers, copies, seeding, errors;
- which runner steps which envs, and the C envs built into segvec.
"""
from __future__ import annotations

import copy
import pickle

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import segvec
import segvec.envs
from conftest import backend_options
from segvec._core import EnvClass, ffi, lib
from segvec.native import CartPoleEnv, NativeEnv, NativeEnvError, SyntheticAtariEnv
from segvec.runner import EnvRunner, NativeEnvRunner

SEEDS = [0, 1, 7, 42, 12345, 2**31 - 1, 2**32 - 1, 2**32, 2**40 + 17, 2**63 + 5, 2**64 - 1]


# ---- numpy's SeedSequence and PCG64 in C -----------------------------------------------------------------
def c_rng(entropy_words) -> "ffi.CData":
    rng = ffi.new("segvec_rng_t *")
    words = list(entropy_words)
    assert lib.segvec_rng_seed(rng, ffi.new("uint32_t[]", words), len(words)) == 0
    return rng


def words_of(seed: int) -> list[int]:
    """numpy's uint32 words of an int seed (low first, no leading zero words)."""
    words = []
    while True:
        words.append(seed & 0xFFFFFFFF)
        seed >>= 32
        if not seed:
            return words


def c_state(rng) -> dict:
    return {"state": (rng.state_high << 64) | rng.state_low, "inc": (rng.inc_high << 64) | rng.inc_low}


@pytest.mark.parametrize("seed", SEEDS + [2**96 + 3, 2**128 - 1])
def test_seeding_gives_numpys_pcg64_state(seed):
    numpy_state = np.random.PCG64(np.random.SeedSequence(seed)).state
    rng = c_rng(words_of(seed))
    assert c_state(rng) == numpy_state["state"]
    assert (rng.has_uint32, rng.uinteger) == (0, 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_draws_are_numpys(seed):
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
    rng = c_rng(words_of(seed))
    ranges = [(0, 2), (1, 10), (0, 3), (-5, 5), (0, 2**30), (0, 2**32 - 1), (0, 2**32), (7, 2**32 + 8),
              (0, 2**40), (-(2**62), 2**62), (-(2**63), 2**63 - 1), (5, 6)]
    for round_ in range(200):
        assert generator.random() == lib.segvec_rng_draw_random(rng)
        assert generator.uniform(-0.05, 0.05) == lib.segvec_rng_draw_uniform(rng, -0.05, 0.05)
        low, high = ranges[round_ % len(ranges)]
        assert int(generator.integers(low, high)) == lib.segvec_rng_draw_integers(rng, low, high), (low, high)
        assert generator.bit_generator.random_raw() == lib.segvec_rng_draw64(rng)
    state = generator.bit_generator.state
    assert c_state(rng) == state["state"] and (rng.has_uint32, rng.uinteger) == (state["has_uint32"],
                                                                                  state["uinteger"])


def test_unseeded_resets_draw_entropy_from_the_os_as_seedsequence_does():
    first, second = CartPoleEnv(), CartPoleEnv()
    obs_first, _ = first.reset()
    obs_second, _ = second.reset()
    assert obs_first.tobytes() != obs_second.tobytes(), "two unseeded envs start alike"
    entropy = first.np_random_seed
    assert 0 <= entropy < 2**128 and entropy != second.np_random_seed
    replay = gymnasium.make("CartPole-v1")  # the entropy is a seed that gives the same start
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
    np.testing.assert_array_equal(obs_first, generator.uniform(-0.05, 0.05, 4).astype(np.float32))
    replay.close()


# ---- CartPole-c is gymnasium's CartPole-v1 -------------------------------------------------------------
def policy_action(obs, rng, epsilon):
    """A balancing controller, random with probability `epsilon`: long episodes (time limits) and falls."""
    if rng.random() < epsilon:
        return int(rng.integers(2))
    return int(obs[2] + 0.5 * obs[3] + 0.01 * obs[1] > 0)


@pytest.mark.parametrize("epsilon", [0.05, 0.5])
def test_cartpole_c_replays_gymnasium_cartpole_bit_for_bit(epsilon):
    ours, theirs = gymnasium.make("segvec/CartPole-c"), gymnasium.make("CartPole-v1")
    assert type(ours) is CartPoleEnv, "registered without wrappers: a segvec runner steps it in C"
    assert ours.observation_space == theirs.observation_space and ours.action_space == theirs.action_space
    assert ours.observation_space.dtype == theirs.observation_space.dtype
    rng = np.random.default_rng(int(epsilon * 100))
    ends = {"terminated": 0, "truncated": 0, "unseeded": 0, "seeded": 0}
    steps = 0
    for seed in (0, 3, 2**32 + 9, 123456789):
        obs, _ = ours.reset(seed=seed)
        expected, _ = theirs.reset(seed=seed)
        assert obs.tobytes() == expected.tobytes()
        ends["seeded"] += 1
        for _ in range(2500):
            action = policy_action(obs, rng, epsilon)
            got, want = ours.step(action), theirs.step(action)
            steps += 1
            assert got[0].dtype == want[0].dtype == np.float32
            assert got[0].tobytes() == want[0].tobytes(), f"step {steps}: {got[0]} != {want[0]}"
            assert got[1:4] == want[1:4] and type(got[1]) is type(want[1]) is float
            assert type(got[2]) is type(got[3]) is bool
            obs = got[0]
            if got[2] or got[3]:
                ends["terminated" if got[2] else "truncated"] += 1
                obs, _ = ours.reset()  # unseeded: the generator goes on, as gymnasium's does
                assert obs.tobytes() == theirs.reset()[0].tobytes()
                ends["unseeded"] += 1
    assert steps == 10_000 and ends["unseeded"] > 3
    assert ends["truncated" if epsilon < 0.1 else "terminated"] >= 3, ends  # time limits, and falls
    ours.close()
    theirs.close()


def test_stepping_on_after_a_termination_is_gymnasiums_too():
    ours, theirs = gymnasium.make("segvec/CartPole-c"), gymnasium.make("CartPole-v1", disable_env_checker=True)
    ours.reset(seed=5)
    theirs.reset(seed=5)
    with pytest.warns(UserWarning, match="already returned terminated"):
        for _ in range(40):  # always push right: the pole falls, then steps go on
            got, want = ours.step(1), theirs.step(1)
            assert got[0].tobytes() == want[0].tobytes() and got[1:4] == want[1:4]


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED],
                         ids=lambda m: m.name)
def test_vector_cartpole_c_is_gymnasiums_sync_vector_env(backend, mode):
    """Through segvec's vector env (the batched C path, in the learner or in workers) the results are
    gymnasium's SyncVectorEnv of CartPole-v1, bit for bit: autoresets (unseeded), SAME_STEP final
    observations, DISABLED resets by mask."""
    E = 8
    theirs = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make("CartPole-v1")] * E, autoreset_mode=mode)
    ours = segvec.make_vec("segvec/CartPole-c", num_envs=E, autoreset_mode=mode, horizon=16,
                           **backend_options(backend, E))
    try:
        if backend == "serial":
            assert isinstance(ours._backend.runner, NativeEnvRunner)
        obs, _ = ours.reset(seed=11)
        assert obs.tobytes() == theirs.reset(seed=11)[0].tobytes()
        rng = np.random.default_rng(2)
        ended = 0
        for t in range(1200):
            actions = np.array([policy_action(o, rng, 0.2) for o in obs], np.int64)
            got, want = ours.step(actions), theirs.step(actions)
            assert got[0].tobytes() == want[0].tobytes(), t
            for k in (1, 2, 3):
                np.testing.assert_array_equal(got[k], want[k])
            if mode == AutoresetMode.SAME_STEP:
                assert ("final_obs" in got[4]) == ("final_obs" in want[4])
                if "final_obs" in want[4]:
                    np.testing.assert_array_equal(got[4]["_final_obs"], want[4]["_final_obs"])
                    for i in np.nonzero(want[4]["_final_obs"])[0]:
                        assert got[4]["final_obs"][i].tobytes() == want[4]["final_obs"][i].tobytes()
                    assert got[4]["final_info"] == want[4]["final_info"] == {}
                    np.testing.assert_array_equal(got[4]["_final_info"], want[4]["_final_info"])
            else:
                assert got[4] == {}
            obs = got[0]
            done = want[2] | want[3]
            ended += int(done.sum())
            if mode == AutoresetMode.DISABLED and done.any():
                obs = ours.reset(options={"reset_mask": done})[0]
                assert obs.tobytes() == theirs.reset(options={"reset_mask": done})[0].tobytes()
            if ours.segments_ready:
                ours.take_segments().release()
        assert ended > 10
        assert ours.stats()["episodes"] == ended
    finally:
        ours.close()
        theirs.close()


# ---- NativeEnv as a gymnasium.Env ---------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["segvec/CartPole-c", "segvec/SyntheticAtari-c"])
def test_gymnasiums_env_checker_passes(env_id):
    from gymnasium.utils.env_checker import check_env

    env = gymnasium.make(env_id)
    with pytest.warns(UserWarning) if env_id.startswith("segvec/CartPole") else _no_check():
        check_env(env, skip_render_check=True)  # (CartPole-v1's own infinite bounds warn too)
    env.close()


class _no_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_gymnasium_wrappers_work_and_such_envs_step_in_python():
    env = gymnasium.wrappers.RecordEpisodeStatistics(gymnasium.wrappers.TimeLimit(CartPoleEnv(), 30))
    env.reset(seed=0)
    for _ in range(30):
        _, _, terminated, truncated, info = env.step(1)
        if terminated or truncated:
            assert info["episode"]["l"] <= 30
            break
    envs = segvec.make_vec(lambda: gymnasium.wrappers.TimeLimit(CartPoleEnv(), 30), num_envs=2, backend="serial")
    try:
        assert type(envs._backend.runner) is EnvRunner, "a wrapped C env is a Python env to the runner"
        envs.reset(seed=0)
        for _ in range(40):
            envs.step(np.ones(2, np.int64))
    finally:
        envs.close()


def test_copies_and_pickles_continue_the_same_episode():
    env = CartPoleEnv()
    env.reset(seed=4)
    for _ in range(5):
        env.step(0)
    twins = [copy.deepcopy(env), pickle.loads(pickle.dumps(env))]
    expected = [env.step(a)[0].tobytes() for a in (1, 1, 0)]
    after = env.reset()[0].tobytes()
    for twin in twins:
        assert [twin.step(a)[0].tobytes() for a in (1, 1, 0)] == expected
        assert twin.elapsed_steps == 8
        assert twin.reset()[0].tobytes() == after, "the generator is copied too"


def test_np_random_is_a_copy_of_the_env_generator_and_can_be_set():
    env = CartPoleEnv()
    assert env._np_random is None
    env.reset(seed=9)
    generator = env.np_random
    expected = np.random.Generator(np.random.PCG64(np.random.SeedSequence(9)))
    expected.uniform(-0.05, 0.05, 4)  # what reset drew
    assert generator.bit_generator.state == expected.bit_generator.state
    assert env.np_random_seed == 9
    env.np_random = np.random.Generator(np.random.PCG64(77))
    assert env.np_random_seed == -1
    obs, _ = env.reset()  # unseeded: draws from the generator it was given
    np.testing.assert_array_equal(obs, np.random.Generator(np.random.PCG64(77)).uniform(-0.05, 0.05, 4)
                                  .astype(np.float32))


def test_errors_are_gymnasium_like():
    env = CartPoleEnv()
    with pytest.raises(gymnasium.error.ResetNeeded):
        env.step(0)
    env.reset(seed=0)
    for bad in (2, -1):
        with pytest.raises(ValueError, match="outside the action space"):
            env.step(bad)
    with pytest.raises(ValueError, match="one integer"):
        env.step(0.5)
    with pytest.raises(ValueError, match="no reset options"):
        env.reset(options={"low": -0.1})
    for seed in (-1, 2**64, 1.5, "3"):
        with pytest.raises(gymnasium.error.Error):
            env.reset(seed=seed)
    with pytest.raises(TypeError, match="unexpected parameters"):
        CartPoleEnv(gravity=3.0)
    with pytest.raises(ValueError, match="render"):
        CartPoleEnv(render_mode="human")
    with pytest.raises(ValueError, match="min_length"):
        SyntheticAtariEnv(min_length=10, max_length=5)
    with pytest.raises(TypeError, match="native"):
        type("NoClass", (NativeEnv,), {})()
    bad = ffi.new("segvec_env_class_t *")
    bad.abi_version = 99
    with pytest.raises(ValueError, match="ABI version 99"):
        EnvClass(int(ffi.cast("uintptr_t", bad)))


def test_time_limit_is_counted_by_the_core_and_can_be_set_per_env():
    env = CartPoleEnv(max_episode_steps=7)
    assert env.max_episode_steps == 7 and CartPoleEnv().max_episode_steps == 500
    env.reset(seed=1)
    flags = [env.step(i % 2)[2:4] for i in range(7)]
    assert flags[-1] == (False, True) and not any(any(f) for f in flags[:-1])
    assert env.elapsed_steps == 7
    unlimited = CartPoleEnv(max_episode_steps=0)
    unlimited.reset(seed=1)
    assert not any(unlimited.step(i % 2)[3] for i in range(600))


# ---- the runner's choice ------------------------------------------------------------------------------
class PythonStepCartPole(CartPoleEnv):
    """A NativeEnv with a step of its own in Python: the runner must call it."""

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, 2.0 * reward, terminated, truncated, info


def test_the_runner_steps_in_c_only_bare_native_envs_of_one_class():
    cases = [("segvec/CartPole-c", NativeEnvRunner), (PythonStepCartPole, EnvRunner),
             ([CartPoleEnv, SyntheticAtariEnv], None), ("CartPole-v1", EnvRunner)]
    for env, runner_type in cases:
        if runner_type is None:  # different spaces: make_vec refuses before any runner
            with pytest.raises(ValueError):
                segvec.make_vec(env, num_envs=2, backend="serial")
            continue
        envs = segvec.make_vec(env, num_envs=2, backend="serial")
        try:
            assert type(envs._backend.runner) is runner_type, env
            envs.reset(seed=0)
            rewards = envs.step(np.zeros(2, np.int64))[1]
            assert rewards.tolist() == ([2.0, 2.0] if env is PythonStepCartPole else [1.0, 1.0])
        finally:
            envs.close()


def test_workers_step_native_envs_in_c(monkeypatch):
    """In worker processes too: with NativeEnv.step broken in Python (inherited by forked workers),
    the vector env still steps, so no NativeEnv.step ran."""

    def broken(self, action):
        raise AssertionError("NativeEnv.step ran in Python")

    monkeypatch.setattr(NativeEnv, "step", broken)
    envs = segvec.make_vec("segvec/CartPole-c", num_envs=4, backend="multiprocessing", num_workers=2,
                           context="fork")
    try:
        envs.reset(seed=0)
        for _ in range(30):
            envs.step(np.ones(4, np.int64))
        stats = envs.stats()
        assert stats["steps"] > 100 and stats["episodes"] >= 4  # (NEXT_STEP reset steps are not steps)
    finally:
        envs.close()


def test_seeds_reach_each_env_and_np_random_seed_says_so(backend):
    envs = segvec.make_vec("segvec/CartPole-c", num_envs=4, **backend_options(backend, 4))
    try:
        obs, _ = envs.reset(seed=100)
        assert envs.get_attr("np_random_seed") == (100, 101, 102, 103)
        for i in range(4):
            assert obs[i].tobytes() == gymnasium.make("CartPole-v1").reset(seed=100 + i)[0].tobytes()
        with pytest.raises(segvec.EnvError):
            envs.reset(seed=[1, 2, -3, 4])
        obs, _ = envs.reset(seed=[5, None, 6, None])
        assert envs.get_attr("np_random_seed")[0::2] == (5, 6)
    finally:
        envs.close()


def test_an_invalid_action_fails_that_env_only(backend):
    envs = segvec.make_vec("segvec/CartPole-c", num_envs=4, **backend_options(backend, 4))
    try:
        envs.reset(seed=0)
        with pytest.raises(segvec.EnvError, match="outside the action space") as error:
            envs.step(np.array([0, 1, 5, 0]))
        assert error.value.env_index == 2 and isinstance(error.value, ValueError)
        envs.reset(seed=1)
        envs.step(np.array([0, 1, 1, 0]))
    finally:
        envs.close()


# ---- the synthetic Atari-shaped env in C --------------------------------------------------------------
def test_synthetic_atari_c_has_the_python_envs_spaces_and_rules():
    python_env = gymnasium.make("segvec/SyntheticAtari-v0", work_us=0)
    env = gymnasium.make("segvec/SyntheticAtari-c", min_length=3, max_length=9, truncation_prob=0.5)
    assert env.observation_space == python_env.observation_space
    assert env.action_space == python_env.action_space
    obs, _ = env.reset(seed=3)
    assert (obs[..., 0] == obs[..., 3]).all(), "a reset repeats its first frame"
    again, _ = copy.deepcopy(env).reset(seed=3)
    np.testing.assert_array_equal(obs, again)
    rng = np.random.default_rng(0)
    lengths, endings, length = [], set(), 0
    for _ in range(400):
        action = int(rng.integers(6))
        new, reward, terminated, truncated, info = env.step(action)
        length += 1
        np.testing.assert_array_equal(new[..., :3], obs[..., 1:], err_msg="the oldest frame drops out")
        if action == 0:
            np.testing.assert_array_equal(new[..., 3], obs[..., 3], err_msg="action 0 keeps the window")
        assert reward in (0.0, 1.0) and info == {} and not (terminated and truncated)
        obs = new
        if terminated or truncated:
            lengths.append(length)
            endings.add("terminated" if terminated else "truncated")
            length = 0
            obs, _ = env.reset()
    assert lengths and min(lengths) >= 3 and max(lengths) <= 9 and endings == {"terminated", "truncated"}
    python_env.close()
    env.close()


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED],
                         ids=lambda m: m.name)
def test_synthetic_atari_c_runs_in_segvec(backend, mode):
    """Observations of 28 KiB are written straight into their slots: rows (horizon 3: many fill and continue
    in a new row) hold exactly what step() returned; SAME_STEP final observations come in the infos."""
    E = 4
    envs = segvec.make_vec("segvec/SyntheticAtari-c", num_envs=E, horizon=3, autoreset_mode=mode,
                           **backend_options(backend, E), env_kwargs={"min_length": 2, "max_length": 6})
    try:
        obs, _ = envs.reset(seed=0)
        seen, finals, rows = [obs], 0, 0
        for i in range(40):
            new, _, terminated, truncated, infos = envs.step(np.full(E, i % 6))
            ended = terminated | truncated
            for e in range(E):
                if mode == AutoresetMode.SAME_STEP and ended[e]:
                    np.testing.assert_array_equal(infos["final_obs"][e][..., :3], obs[e][..., 1:])
                    finals += 1
                elif not (mode == AutoresetMode.NEXT_STEP and (new[e] == new[e][..., :1]).all()):
                    np.testing.assert_array_equal(new[e][..., :3], obs[e][..., 1:], err_msg="frames shift by one")
            if mode == AutoresetMode.DISABLED and ended.any():
                seen.append(new)
                envs.flush()
                with envs.take_segments() as batch:
                    rows += check_rows(batch, seen)
                new, _ = envs.reset(options={"reset_mask": ended})
                seen[-1] = new  # (the rows of the ended envs closed at the final observation: checked above)
            else:
                seen.append(new)
            obs = new
            if envs.segments_ready:
                with envs.take_segments() as batch:
                    rows += check_rows(batch, seen)
        envs.flush()
        with envs.take_segments() as batch:
            rows += check_rows(batch, seen)
        assert rows >= E * 10 and (finals > 0 or mode != AutoresetMode.SAME_STEP)
    finally:
        envs.close()


def check_rows(batch, seen) -> int:
    """Each row holds the observations step() returned to its env, obs[length] included."""
    for i in range(len(batch)):
        e, start, length = int(batch.env_id[i]), int(batch.start_step[i]), int(batch.length[i])
        np.testing.assert_array_equal(batch.obs[i, :length + 1], np.stack([s[e] for s in seen[start:start + length + 1]]))
    return len(batch)
