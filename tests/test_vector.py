"""The gymnasium face of `SegmentVecEnv` against `gymnasium.vector.SyncVectorEnv`, step for step."""
from __future__ import annotations

import functools

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import segvec
from envs import DictEnv

MODES = (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED)
STEPS = 300


def cartpole():
    return gymnasium.make("CartPole-v1")


ENV_FNS = {"CartPole-v1": cartpole, "DictEnv": functools.partial(DictEnv, max_length=12)}


def assert_same(expected, actual, path="") -> None:
    """Deep equality of gymnasium results: dicts (same keys), tuples, arrays (same dtype, shape, values)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected a dict, got {type(actual)}"
        assert set(expected) == set(actual), f"{path}: keys {sorted(expected)} != {sorted(actual)}"
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}/{key}")
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(expected) == len(actual), f"{path}: {actual!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{path}[{i}]")
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{path}: expected an array, got {type(actual)}"
        assert expected.dtype == actual.dtype, f"{path}: dtype {actual.dtype}, expected {expected.dtype}"
        assert expected.shape == actual.shape, f"{path}: shape {actual.shape}, expected {expected.shape}"
        if expected.dtype == object:
            for i, (e, a) in enumerate(zip(expected, actual)):
                assert_same(e, a, f"{path}[{i}]")
        else:
            np.testing.assert_array_equal(actual, expected, err_msg=path)
    else:
        assert type(expected) is type(actual) or np.asarray(expected).dtype == np.asarray(actual).dtype, \
            f"{path}: {type(actual)} != {type(expected)}"
        assert expected == actual, f"{path}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("env_name", sorted(ENV_FNS))
def test_drop_in_equality(env_name, mode, backend, make_envs):
    num_envs = 4
    fn = ENV_FNS[env_name]
    reference = SyncVectorEnv([fn] * num_envs, autoreset_mode=mode)
    envs = make_envs(fn, num_envs, backend, autoreset_mode=mode, horizon=16)
    try:
        assert envs.metadata["autoreset_mode"] is mode
        assert envs.metadata["autoreset_mode"] == reference.metadata["autoreset_mode"]
        assert envs.single_observation_space == reference.single_observation_space
        assert envs.single_action_space == reference.single_action_space
        assert envs.observation_space == reference.observation_space
        assert envs.action_space == reference.action_space

        assert_same(reference.reset(seed=123), envs.reset(seed=123), "reset")
        rng = np.random.default_rng(7)
        n_actions = reference.single_action_space.n
        ended_seen = mask_resets = 0
        for step in range(STEPS):
            actions = rng.integers(0, n_actions, num_envs)
            expected = reference.step(actions)
            actual = envs.step(actions)
            assert_same(expected, actual, f"step {step}")
            ended = expected[2] | expected[3]
            ended_seen += int(ended.sum())
            if mode == AutoresetMode.DISABLED and ended.any():
                seed = None if step % 2 else 1000 + step
                options = {"reset_mask": ended.copy()}
                assert_same(reference.reset(seed=seed, options={"reset_mask": ended.copy()}),
                            envs.reset(seed=seed, options=options), f"reset_mask at step {step}")
                mask_resets += 1
        assert ended_seen > 5, "the rollout should end several episodes"
        if mode == AutoresetMode.DISABLED:
            assert mask_resets > 0
    finally:
        reference.close()


def test_int_seed_gives_seed_plus_i(backend, make_envs):
    envs = make_envs(ENV_FNS["DictEnv"], 4, backend)
    obs, _ = envs.reset(seed=40)
    for i in range(4):
        single, _ = DictEnv().reset(seed=40 + i)
        assert_same(single, {k: v[i] for k, v in obs.items()}, f"env {i}")
    envs = make_envs(ENV_FNS["DictEnv"], 4, backend, batch_size=2)
    envs.async_reset(seed=40)
    got = {}
    while len(got) < 4:
        obs, _, _, _, info = envs.recv()
        for j, env_id in enumerate(info["env_id"]):
            got[int(env_id)] = {k: v[j] for k, v in obs.items()}
        envs.send(np.zeros(len(info["env_id"]), np.int64), info["env_id"])
    for i in range(4):
        assert_same(DictEnv().reset(seed=40 + i)[0], got[i], f"async env {i}")


def test_call_get_attr_set_attr(backend, make_envs):
    num_envs = 4
    reference = SyncVectorEnv([ENV_FNS["DictEnv"]] * num_envs)
    envs = make_envs(ENV_FNS["DictEnv"], num_envs, backend)
    envs.reset(seed=0)
    reference.reset(seed=0)
    assert envs.get_attr("speed") == reference.get_attr("speed") == (1.0,) * num_envs
    envs.set_attr("speed", [0.5, 1.5, 2.0, 3.0])
    reference.set_attr("speed", [0.5, 1.5, 2.0, 3.0])
    assert envs.get_attr("speed") == reference.get_attr("speed")
    envs.set_attr("speed", 0.25)
    reference.set_attr("speed", 0.25)
    assert envs.get_attr("speed") == reference.get_attr("speed") == (0.25,) * num_envs
    assert envs.call("speed") == reference.call("speed")
    assert envs.call("_obs")[0].keys() == reference.call("_obs")[0].keys()
    # attributes of an env under gymnasium wrappers (gymnasium.make) are found like gymnasium does
    carts = make_envs("CartPole-v1", 2, backend)
    cart_reference = SyncVectorEnv([cartpole] * 2)
    assert carts.get_attr("gravity") == cart_reference.get_attr("gravity")
    carts.set_attr("gravity", [1.0, 2.0])
    cart_reference.set_attr("gravity", [1.0, 2.0])
    assert carts.get_attr("gravity") == cart_reference.get_attr("gravity") == (1.0, 2.0)
    # results after set_attr follow the changed envs
    actions = np.zeros(num_envs, np.int64)
    assert_same(reference.step(actions), envs.step(actions))
    reference.close()
    cart_reference.close()


def test_step_accepts_learner_fields_and_stamps_policy_version(backend, make_envs):
    envs = make_envs(ENV_FNS["DictEnv"], 2, backend, horizon=3, step_fields={"hidden": ((2,), np.float32)},
                     segment_fields={"memory": ((3,), np.float32)})
    envs.reset(seed=1)
    for step in range(6):
        envs.policy_version = 10 + step
        envs.step(np.ones(2, np.int64), value=np.full(2, step, np.float32), logprob=np.full(2, -step, np.float32),
                  hidden=np.full((2, 2), step, np.float32), memory=np.full((2, 3), step, np.float32))
    batch = envs.take_segments()
    assert len(batch) == 2
    for i in range(2):
        np.testing.assert_array_equal(batch.value[i], [0, 1, 2])
        np.testing.assert_array_equal(batch.logprob[i], [0, -1, -2])
        np.testing.assert_array_equal(batch.policy_version[i], [10, 11, 12])
        np.testing.assert_array_equal(batch.hidden[i], [[0, 0], [1, 1], [2, 2]])
        np.testing.assert_array_equal(batch.memory[i], [0, 0, 0])
    batch.release()
