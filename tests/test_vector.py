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
            if step == STEPS // 2:  # a reset in the middle of episodes (and of segment rows)
                assert_same(reference.reset(seed=77), envs.reset(seed=77), "reset mid-run")
                continue
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
            got.setdefault(int(env_id), {k: v[j] for k, v in obs.items()})  # the first receipt: the reset
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


def test_mixing_faces_while_actions_are_in_flight(backend, make_envs):
    envs = make_envs(DictEnv, 4, backend, batch_size=2)
    envs.async_reset(seed=0)
    _, _, _, _, info = envs.recv()
    envs.send(np.zeros(2, np.int64), info["env_id"])
    with pytest.raises(segvec.AlreadyPendingCallError):
        envs.step(np.zeros(4, np.int64))
    envs.reset(seed=0)
    envs.step_async(np.zeros(4, np.int64))
    with pytest.raises(segvec.AlreadyPendingCallError):
        envs.recv()
    with pytest.raises(segvec.AlreadyPendingCallError):
        envs.send(np.zeros(4, np.int64), np.arange(4))
    with pytest.raises(segvec.AlreadyPendingCallError):
        envs.reset_async(seed=0)
    obs, *_ = envs.step_wait()
    assert obs["position"].shape == (4, 3)


def test_reset_mask_is_prompt(backend, make_envs):
    """Resetting a few envs (a message to their worker) answers at once, not after a wait slice."""
    import time

    envs = make_envs(DictEnv, 4, backend, autoreset_mode=AutoresetMode.DISABLED)
    envs.reset(seed=0)
    mask = np.array([True, False, False, True])
    start = time.monotonic()
    for i in range(40):
        envs.step(np.zeros(4, np.int64))
        envs.reset(options={"reset_mask": mask if i % 2 else ~mask})
    assert time.monotonic() - start < 4.0, "each reset_mask reset should take milliseconds"


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_drop_in_with_other_start_methods(context, make_envs):
    fn = ENV_FNS["DictEnv"]
    reference = SyncVectorEnv([fn] * 2, autoreset_mode=AutoresetMode.SAME_STEP)
    envs = make_envs(fn, 2, "multiprocessing", context=context, autoreset_mode=AutoresetMode.SAME_STEP)
    assert_same(reference.reset(seed=5), envs.reset(seed=5))
    rng = np.random.default_rng(1)
    for step in range(60):
        actions = rng.integers(0, 3, 2)
        assert_same(reference.step(actions), envs.step(actions), f"step {step}")
    reference.close()


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP], ids=lambda m: m.name)
def test_returned_arrays_are_not_overwritten_by_later_steps(backend, mode, make_envs):
    """What step()/recv() return belongs to the caller (gymnasium copies too), even as rows are reused."""
    fn = ENV_FNS["DictEnv"]
    reference = SyncVectorEnv([fn] * 2, autoreset_mode=mode)
    envs = make_envs(fn, 2, backend, autoreset_mode=mode, horizon=2, num_segments=4)
    kept, expected = [envs.reset(seed=9)], [reference.reset(seed=9)]
    rng = np.random.default_rng(3)
    for _ in range(40):
        actions = rng.integers(0, 3, 2)
        kept.append(envs.step(actions))
        expected.append(reference.step(actions))
    for step, (e, a) in enumerate(zip(expected, kept)):
        assert_same(e, a, f"result {step} after 40 more steps")
    reference.close()


def info_of(infos: dict, j: int) -> dict:
    """The info of position `j` in gymnasium's batched layout (values where the ``_key`` mask is set)."""
    out = {}
    for key, value in infos.items():
        if key.startswith("_") or f"_{key}" not in infos or not infos[f"_{key}"][j]:
            continue
        out[key] = info_of(value, j) if isinstance(value, dict) else value[j]
    return out


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP], ids=lambda m: m.name)
def test_async_face_matches_single_envs(backend, mode, make_envs):
    """recv() in any order: each env's observations, outcomes and infos are those of a plain single env."""
    E = 4
    envs = make_envs(ENV_FNS["DictEnv"], E, backend, autoreset_mode=mode, batch_size=2)
    singles = [DictEnv(max_length=12) for _ in range(E)]
    pending = [False] * E   # NEXT_STEP: the env's last step ended an episode
    received = [0] * E
    last_action: dict = {}
    envs.async_reset(seed=50)
    for _ in range(200):
        obs, rewards, terms, truncs, infos = envs.recv()
        assert len(infos["env_id"]) == 2
        actions = []
        for j, e in enumerate(infos["env_id"].tolist()):
            got = ({k: v[j] for k, v in obs.items()}, rewards[j], terms[j], truncs[j], info_of(infos, j))
            single = singles[e]
            if received[e] == 0:
                o, info = single.reset(seed=50 + e)
                expected = (o, 0.0, False, False, info)
            elif mode == AutoresetMode.NEXT_STEP and pending[e]:
                o, info = single.reset()
                expected = (o, 0.0, False, False, info)
                pending[e] = False
            else:
                o, r, term, trunc, info = single.step(last_action[e])
                if term or trunc:
                    if mode == AutoresetMode.SAME_STEP:
                        final = {"final_obs": o, "final_info": info}
                        o, info = single.reset()
                        info = {**final, **info}
                    else:
                        pending[e] = True
                expected = (o, r, term, trunc, info)
            assert_same(expected[0], got[0], f"env {e} receipt {received[e]} obs")
            assert (float(got[1]), bool(got[2]), bool(got[3])) == (float(expected[1]), expected[2], expected[3])
            assert_info_same(expected[4], got[4], f"env {e} receipt {received[e]} info")
            received[e] += 1
            actions.append((e * 7 + received[e]) % 3)
        last_action.update(zip(infos["env_id"].tolist(), actions))
        envs.send(np.asarray(actions), infos["env_id"])
    assert min(received) > 20


def assert_info_same(expected: dict, actual: dict, path: str) -> None:
    """One env's info: same keys, same values (numbers compare by value, arrays and dicts deeply)."""
    assert set(expected) == set(actual), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
    for key, value in expected.items():
        if isinstance(value, dict):
            if key == "final_obs":
                assert_same(value, actual[key], f"{path}/{key}")
            else:
                assert_info_same(value, actual[key], f"{path}/{key}")
        else:
            np.testing.assert_array_equal(np.asarray(actual[key]), np.asarray(value), err_msg=f"{path}/{key}")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_structured_actions_and_tuple_observations(backend, mode, make_envs):
    from envs import TupleEnv

    num_envs = 2
    reference = SyncVectorEnv([TupleEnv] * num_envs, autoreset_mode=mode)
    envs = make_envs(TupleEnv, num_envs, backend, autoreset_mode=mode, horizon=4, num_segments=40)
    assert envs.single_action_space == reference.single_action_space
    assert_same(reference.reset(seed=2), envs.reset(seed=2))
    space = envs.action_space
    space.seed(8)
    sent = []
    for step in range(30):
        actions = space.sample()
        sent.append(actions)
        expected, actual = reference.step(actions), envs.step(actions)
        assert_same(expected, actual, f"step {step}")
        if mode == AutoresetMode.DISABLED and (expected[2] | expected[3]).any():
            ended = expected[2] | expected[3]
            assert_same(reference.reset(options={"reset_mask": ended.copy()}),
                        envs.reset(options={"reset_mask": ended.copy()}), f"reset_mask {step}")
    envs.flush()
    batch = envs.take_segments()
    assert set(batch.action) == {"force", "gear", "lights"}
    for e in range(num_envs):
        rows = sorted(np.nonzero(batch.env_id == e)[0], key=lambda i: batch.start_step[i])
        for key in ("force", "gear", "lights"):
            stored = np.concatenate([batch.action[key][i, :batch.length[i]] for i in rows])
            assert stored.dtype == envs.single_action_space[key].dtype
            expected = np.stack([a[key][e] for a in sent])
            mask = np.concatenate([batch.mask[i, :batch.length[i]] for i in rows])
            np.testing.assert_array_equal(stored[mask], expected[mask], err_msg=key)
    batch.release()
    reference.close()
