"""SegmentVecEnv in the place of gymnasium's AsyncVectorEnv: its constructor arguments, spaces with no fixed
shape (``shared_memory=False``), seeding, errors, timeouts and calls out of order behave as AsyncVectorEnv's
do, and the segments stay exact when parts of the spaces travel pickled."""
from __future__ import annotations

import functools
import multiprocessing
import re
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_differing_spaces

import segvec
from envs import (AnythingEnv, CounterEnv, NamedCounterEnv, ScalarActionEnv, SlowResetEnv, named_counter_fns,
                  policy)

MODES = [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP]


def name_of(counter) -> str:
    index, episode, t = (int(v) for v in counter[:3])
    return f"{index}/{episode}/{t}"


def words_for(step: int, num_envs: int) -> tuple:
    return tuple(f"w{(step * 7 + e) % 100}" for e in range(num_envs))


# ---- spaces with no fixed shape ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_pickled_parts_land_in_the_slots_of_the_shared_ones(backend, make_envs, mode):
    """Text/Sequence observation parts and Text action parts are kept slot for slot beside the shared
    parts: in every taken row (flushed ones included) each name matches its counter, each echoed word is
    the word sent one step before, and each action's word is the one sent at that step."""
    num_envs, horizon = 4, 5
    envs = make_envs(named_counter_fns(num_envs), num_envs, backend, shared_memory=False, horizon=horizon,
                     autoreset_mode=mode, num_segments=8 * num_envs)
    obs, _ = envs.reset(seed=3)
    assert obs["name"] == tuple(name_of(c) for c in obs["counter"])
    sent = {}  # (env, its step count) -> word
    for step in range(23):
        if step in (7, 16):
            envs.flush()  # rows in progress close; the current observations move to new rows
        words = words_for(step, num_envs)
        for e in range(num_envs):
            sent[(e, step)] = words[e]
        obs, _, terminated, truncated, infos = envs.step((policy(obs["counter"]), words))
        assert obs["name"] == tuple(name_of(c) for c in obs["counter"])
        assert isinstance(obs["word"], tuple) and len(obs["word"]) == num_envs
        if mode == AutoresetMode.SAME_STEP and "final_obs" in infos:
            for e in np.flatnonzero(infos["_final_obs"]):
                final = infos["final_obs"][e]
                assert type(final) is dict and final["name"] == name_of(final["counter"])
                assert final["word"] == tuple(ord(c) for c in words[e])
    envs.flush()
    rows = 0
    with envs.take_segments() as batch:
        counters, names, word_obs = batch.obs["counter"], batch.obs["name"], batch.obs["word"]
        assert names.dtype == object and names.shape == (len(batch), horizon + 1)
        action_words = batch.action[1]
        assert action_words.dtype == object and action_words.shape == (len(batch), horizon)
        for i in range(len(batch)):
            length, env, start = int(batch.length[i]), int(batch.env_id[i]), int(batch.start_step[i])
            rows += 1
            for t in range(length + 1):
                assert names[i, t] == name_of(counters[i, t])
            for t in range(length):
                assert action_words[i, t] == sent[(env, start + t)]
                if batch.mask[i, t] and not (batch.terminated[i, t] or batch.truncated[i, t]):
                    assert word_obs[i, t + 1] == tuple(ord(c) for c in sent[(env, start + t)])
        final_obs, positions = batch.final_obs
        for k in range(len(positions)):
            assert final_obs["name"][k] == name_of(final_obs["counter"][k])
    assert rows >= num_envs * 23 // horizon


def test_pickled_parts_on_the_async_face(backend, make_envs):
    envs = make_envs(named_counter_fns(4), 4, backend, shared_memory=False, batch_size=2)
    envs.async_reset(seed=0)
    for step in range(12):
        obs, _, _, _, infos = envs.recv()
        ids = infos["env_id"]
        assert len(ids) == 2 and obs["name"] == tuple(name_of(c) for c in obs["counter"])
        envs.send((policy(obs["counter"]), tuple(f"s{step}e{e}" for e in ids)), ids)


def test_a_user_defined_space_travels_pickled(backend, make_envs):
    with pytest.raises(segvec.SharedMemorySpaceError, match=r"not one of gymnasium's fixed-size spaces"):
        segvec.make_vec(AnythingEnv, num_envs=2, backend=backend)
    envs = make_envs(AnythingEnv, 2, backend, shared_memory=False)
    assert isinstance(envs.action_space, spaces.Tuple)
    obs, _ = envs.reset(seed=5)
    assert obs == ({"started": 5}, {"started": 6})
    obs, *_ = envs.step(("a", {"b": 1}))
    assert obs == (["got", "a"], ["got", {"b": 1}])


def test_pickled_parts_survive_a_restart(make_envs):
    """An env rebuilt after raising (restart_failed_envs) reports its new observation's pickled parts at
    the slot the restart put it."""
    envs = make_envs([functools.partial(FailingNamedEnv, i) for i in range(2)], 2, "multiprocessing",
                     shared_memory=False, horizon=4, restart_failed_envs=True)
    obs, _ = envs.reset(seed=1)
    for step in range(10):
        obs, _, _, truncated, infos = envs.step((policy(obs["counter"]), words_for(step, 2)))
        assert obs["name"] == tuple(name_of(c) for c in obs["counter"])
    assert envs.stats()["restarts"] >= 1
    envs.flush()
    with envs.take_segments() as batch:
        for i in range(len(batch)):
            for t in range(int(batch.length[i]) + 1):
                assert batch.obs["name"][i, t] == name_of(batch.obs["counter"][i, t])


class FailingNamedEnv(NamedCounterEnv):
    """Raises at its 5th step (once per process)."""

    failed = False

    def __init__(self, index=0):
        super().__init__(index, max_length=50)
        self.steps = 0

    def step(self, action):
        self.steps += 1
        if self.steps == 5 and not FailingNamedEnv.failed:
            FailingNamedEnv.failed = True
            raise RuntimeError("boom")
        return super().step(action)


def test_to_torch_leaves_pickled_parts_as_object_arrays(make_envs):
    torch = pytest.importorskip("torch")
    envs = make_envs(named_counter_fns(2), 2, "serial", shared_memory=False, horizon=3)
    obs, _ = envs.reset(seed=0)
    for step in range(4):
        obs, *_ = envs.step((policy(obs["counter"]), words_for(step, 2)))
    with envs.take_segments(2) as batch:
        tensors = batch.to_torch()
        assert isinstance(tensors.obs["counter"], torch.Tensor)
        assert tensors.obs["name"].dtype == object and tensors.obs["name"][0, 0] == batch.obs["name"][0, 0]


# ---- AsyncVectorEnv's constructor arguments ------------------------------------------------------------
def test_constructor_arguments_of_async_vector_env(make_envs):
    fns = [functools.partial(CounterEnv, i) for i in range(4)]
    with pytest.raises(ValueError, match=r"custom `worker` function is not supported"):
        segvec.SegmentVecEnv(fns, worker=lambda *args: None)
    envs = segvec.SegmentVecEnv(fns, copy=False, daemon=False, num_workers=2)
    try:
        assert [p.daemon for p in envs._backend.processes] == [False, False]
        first, _ = envs.reset(seed=0)
        second, *_ = envs.step(np.zeros(4, np.int64))
        assert not np.shares_memory(first, second)  # copy=False still returns arrays no call overwrites
    finally:
        envs.close()
    capped = segvec.SegmentVecEnv(fns, max_concurrency=1)
    assert capped.num_workers == 1
    capped.close()
    with pytest.raises(ValueError, match=r"max_concurrency=1"):
        segvec.SegmentVecEnv(fns, num_workers=2, max_concurrency=1)
    with pytest.raises(ValueError, match=r"`max_concurrency` must be a positive int"):
        segvec.SegmentVecEnv(fns, max_concurrency=0)


class BoxEnv(gymnasium.Env):
    action_space = spaces.Discrete(2)

    def __init__(self, observation_space):
        self.observation_space = observation_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def box_fns(highs, shape=(3,)):
    return [functools.partial(BoxEnv, spaces.Box(0, high, shape)) for high in highs]


def test_observation_mode(backend):
    different = [spaces.Box(0, high, (3,)) for high in (1, 2)]
    with pytest.raises(ValueError, match=re.escape("Invalid `observation_mode`, expected: 'same' or 'different' "
                                                   "or tuple of single and batch observation space, actual got x")):
        segvec.SegmentVecEnv(box_fns((1, 2)), backend=backend, observation_mode="x")
    with pytest.raises(RuntimeError, match=r"observation spaces are not equivalent\. .*If this is intentional, use "
                                           r"`observation_mode='different'` instead\."):
        segvec.SegmentVecEnv(box_fns((1, 2)), backend=backend)
    envs = segvec.SegmentVecEnv(box_fns((1, 2)), backend=backend, observation_mode="different")
    assert envs.observation_space == batch_differing_spaces(different)
    assert envs.single_observation_space == different[0]
    obs, _ = envs.reset(seed=0)
    assert obs in envs.observation_space
    envs.close()
    custom = (spaces.Box(0, 5, (2, 3)), spaces.Box(0, 5, (3,)))
    envs = segvec.SegmentVecEnv(box_fns((1, 2)), backend=backend, observation_mode=custom)
    assert envs.observation_space is custom[0] and envs.single_observation_space is custom[1]
    envs.close()
    with pytest.raises(RuntimeError, match=r"do not share a common shape and dtype"):
        segvec.SegmentVecEnv(box_fns((1, 2), shape=(2,)), backend=backend, observation_mode=custom)


# ---- seeding, errors, calls out of order ---------------------------------------------------------------
def test_np_random_seed_is_every_envs_seed(backend, make_envs):
    def seeded(i):
        env = CounterEnv(i)
        env.reset(seed=100 + i)
        return env

    envs = make_envs([functools.partial(seeded, i) for i in range(4)], 4, backend)
    assert envs.np_random_seed == (100, 101, 102, 103)  # as each env was made
    envs.reset(seed=42)
    assert envs.np_random_seed == (42, 43, 44, 45)
    envs.reset()
    assert envs.np_random_seed == (42, 43, 44, 45)  # an unseeded reset keeps them
    assert len(envs.np_random) == 4 and all(isinstance(g, np.random.Generator) for g in envs.np_random)


def test_closing_with_a_pending_call_warns(backend):
    envs = segvec.make_vec(CounterEnv, num_envs=2, backend=backend)
    envs.reset_async(seed=0)
    with pytest.warns(UserWarning, match=re.escape("Calling `close` while waiting for a pending call to `reset` "
                                                   "to complete.")):
        envs.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        envs.close()  # closed already: nothing to say


def test_reset_mask_messages(backend, make_envs):
    envs = make_envs(CounterEnv, 3, backend)
    with pytest.raises(ValueError, match=re.escape("`options['reset_mask']` must contain a boolean array with at "
                                                   "least one True value, got reset_mask=[False False False]")):
        envs.reset(options={"reset_mask": np.zeros(3, bool)})
    with pytest.raises(TypeError, match=re.escape("`options['reset_mask']` must have `dtype=np.bool_`, got int64")):
        envs.reset(options={"reset_mask": np.array([1, 1, 0])})


@pytest.mark.timeout(60)
def test_timeouts_leave_a_usable_env():
    envs = segvec.make_vec([functools.partial(SlowResetEnv, i) for i in range(2)], num_envs=2, num_workers=2)
    try:
        envs.reset_async(seed=0)
        with pytest.raises(multiprocessing.TimeoutError):
            envs.reset_wait(timeout=0.05)
        obs, _ = envs.reset(seed=1)  # waits for the resets still under way, then resets again
        assert obs[:, 1].tolist() == [1, 1]  # the second episode of each env
        envs.step_async(np.array([0, 5]))
        with pytest.raises(multiprocessing.TimeoutError):
            envs.step_wait(timeout=0.1)
        obs, *_ = envs.step_wait()  # the step is still pending: wait again
        assert obs[:, 2].tolist() == [1, 1]
    finally:
        envs.close()


def test_envs_get_actions_as_gymnasiums_vector_envs_hand_them(backend, make_envs):
    """A 0-d float Box action reaches the env as a float64 scalar (a Python float, as ``time.sleep``
    wants); one number per env for a one-element Box reaches the env as the number given."""
    envs = make_envs(ScalarActionEnv, 2, backend)
    envs.reset()
    *_, infos = envs.step(np.array([0.25, 0.5], np.float32))
    assert infos["action_type"].tolist() == ["float64", "float64"] and infos["action"].tolist() == [0.25, 0.5]
    envs = make_envs(functools.partial(ScalarActionEnv, shape=(1,)), 2, backend)
    envs.reset()
    *_, infos = envs.step([0, 1])
    assert infos["action_type"].tolist() == ["int", "int"] and infos["action"].tolist() == [0, 1]
    *_, infos = envs.step(np.array([[0.5], [1.0]], np.float32))
    assert infos["action_type"].tolist() == ["ndarray", "ndarray"]


def test_final_obs_and_final_info_are_the_envs_own_objects(backend, make_envs):
    class DiscreteEnv(gymnasium.Env):
        observation_space = spaces.Discrete(5)
        action_space = spaces.Discrete(5)

        def reset(self, *, seed=None, options=None):
            return 0, {}

        def step(self, action):
            return int(action), 1.0, int(action) >= 3, False, {"got": int(action)}

    envs = make_envs(DiscreteEnv, 2, backend, autoreset_mode=AutoresetMode.SAME_STEP)
    envs.reset()
    obs, _, terminated, _, infos = envs.step([3, 1])
    assert terminated.tolist() == [True, False] and obs.tolist() == [0, 1]
    assert infos["final_obs"].dtype == object and infos["_final_obs"].tolist() == [True, False]
    assert type(infos["final_obs"][0]) is int and infos["final_obs"][0] == 3 and infos["final_obs"][1] is None
    assert infos["final_info"]["got"][0] == 3 and infos["final_info"]["_got"].tolist() == [True, False]
