"""Value heads (``value_shape=(k,)``): k values, bootstraps and rewards per step, GAE per head.

Everything is checked against plain references: a sequential rollout of the same envs with the same seeds
and policy (rewards per head, bootstraps per head, then plain Python GAE per head with its own gamma and
lam), and hypothesis batches for the kernels (C and torch, plain and clipped).
"""
from __future__ import annotations

import functools
import os
import pathlib
import re
import subprocess
import sys
import types

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from hypothesis import given, settings
from hypothesis import strategies as st

import segvec
from conftest import BACKENDS
from envs import CounterEnv, policy, reference_gae, value_of

try:
    import torch
except ImportError:
    torch = None

requires_torch = pytest.mark.skipif(torch is None, reason="needs torch")
K = 3
GAMMAS, LAMS = (0.99, 0.9, 0.5), (0.95, 1.0, 0.8)


# ---- envs with rewards per head, and the plain sequential reference -------------------------------------
def head_rewards(obs_before, action: int, obs_after, reward: float) -> np.ndarray:
    """The k rewards of a step: the env's reward, an auxiliary signal of the new observation, the action."""
    return np.array([reward, np.cos(obs_after[2]) + obs_after[3], 0.5 * action - obs_before[3]], np.float32)


class VectorRewardEnv(CounterEnv):
    """`CounterEnv` whose step returns the k rewards as its reward, an array of shape ``(k,)``."""

    def step(self, action):
        before = self._obs()
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, head_rewards(before, int(action), obs, reward), terminated, truncated, info


class InfoRewardEnv(CounterEnv):
    """`CounterEnv` whose step keeps its scalar reward and gives k rewards in ``info["rewards"]`` (head 0
    is not the scalar reward here: the scalar is what episode statistics count)."""

    def step(self, action):
        before = self._obs()
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated, truncated, {"rewards": head_rewards(before, int(action), obs, reward + 1)}


def head_values(obs) -> np.ndarray:
    """The k values of each observation ``[..., 4]``: ``[..., k]`` float32."""
    v = value_of(obs)
    return np.stack([v, 0.5 * v + 1.0, -v], axis=-1).astype(np.float32)


def env_fns(env_cls, num_envs: int, max_length: int = 7) -> list:
    return [functools.partial(env_cls, index=i, max_length=max_length) for i in range(num_envs)]


def reference_rollout(env_cls, index: int, seed: int, slots: int, mode: AutoresetMode, max_length: int = 7):
    """The plain loop over one env: reset with `seed`, then `slots` slots with `policy` (NEXT_STEP: the
    reset step after an ended episode is a slot, its action ignored, reward 0).  Per slot: the observation
    the policy saw, the k rewards, the flags, whether it is a real transition, and the k bootstraps (0
    where terminated, else the values of the observation the step returned: the final one when it ended);
    and the returns of the episodes that ended, as episode statistics count them (the scalar reward, or
    head 0 of a vector reward)."""
    env = env_cls(index=index, max_length=max_length)
    obs = env.reset(seed=seed)[0]
    out = {key: [] for key in ("obs", "reward", "terminated", "truncated", "real", "next_value")}
    pending, episode_return, returns = False, 0.0, []
    for _ in range(slots):
        if mode == AutoresetMode.NEXT_STEP and pending:
            before, obs, pending = obs, env.reset()[0], False
            row = (before, np.zeros(K), False, False, False, head_values(obs))
        else:
            action = int(policy(obs))
            next_obs, reward, terminated, truncated, info = env.step(action)
            rewards = reward if np.ndim(reward) else info.get("rewards", np.full(K, reward))
            bootstrap = np.zeros(K, np.float32) if terminated else head_values(next_obs)
            row = (obs, rewards, terminated, truncated, True, bootstrap)
            ended = terminated or truncated
            episode_return += float(rewards[0]) if np.ndim(reward) else reward
            if ended:
                returns.append(episode_return)
                episode_return = 0.0
            obs = env.reset()[0] if ended and mode == AutoresetMode.SAME_STEP else next_obs
            pending = ended and mode == AutoresetMode.NEXT_STEP
        for key, value in zip(out, row):
            out[key].append(value)
    return {key: np.asarray(value) for key, value in out.items()} | {"returns": np.asarray(returns)}


def rollout(envs, steps: int, seed: int):
    """Steps `envs` synchronously with `policy` and `head_values`, then takes every complete row."""
    obs, _ = envs.reset(seed=seed)
    for _ in range(steps):
        obs, rewards, terminated, truncated, _ = envs.step(policy(obs), value=head_values(obs))
        assert rewards.shape == (envs.num_envs, K)
    return envs.take_segments()


# ---- a rollout against the sequential reference -----------------------------------------------------------
@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP], ids=lambda m: m.value)
@pytest.mark.parametrize("env_cls", [VectorRewardEnv, InfoRewardEnv, CounterEnv], ids=lambda c: c.__name__)
def test_heads_match_the_sequential_reference(make_envs, backend, env_cls, mode):
    num_envs, horizon, steps, seed = 4, 5, 23, 11
    envs = make_envs(env_fns(env_cls, num_envs), num_envs, backend, horizon=horizon, autoreset_mode=mode,
                     value_shape=(K,), value_fn=head_values)
    with rollout(envs, steps, seed) as batch:
        n = len(batch)
        assert n >= num_envs * (steps // horizon - 1)
        for name in ("value", "reward", "next_value"):
            assert getattr(batch, name).shape == (n, horizon, K), name
        for name in ("terminated", "truncated", "mask", "logprob"):
            assert getattr(batch, name).shape == (n, horizon), name
        refs = {e: reference_rollout(env_cls, e, seed + e, steps, mode) for e in range(num_envs)}
        expected = {key: np.zeros((n, horizon, K), np.float32) for key in ("reward", "next_value")}
        flags = {key: np.zeros((n, horizon), bool) for key in ("terminated", "truncated", "mask")}
        for i in range(n):
            ref, start, length = refs[int(batch.env_id[i])], int(batch.start_step[i]), int(batch.length[i])
            span = slice(start, start + length)
            np.testing.assert_array_equal(batch.obs[i, :length], ref["obs"][span])
            np.testing.assert_array_equal(batch.value[i, :length], head_values(ref["obs"][span]))
            expected["reward"][i, :length] = ref["reward"][span]
            expected["next_value"][i, :length] = ref["next_value"][span]
            for key, ref_key in (("terminated", "terminated"), ("truncated", "truncated"), ("mask", "real")):
                flags[key][i, :length] = ref[ref_key][span]
        for key, array in flags.items():
            np.testing.assert_array_equal(getattr(batch, key), array, err_msg=key)
        episodes = envs.episodes()
        for e, ref in refs.items():
            np.testing.assert_allclose(episodes["return"][episodes["env_id"] == e], ref["returns"], rtol=1e-6)
        real = flags["mask"]
        np.testing.assert_allclose(batch.reward[real], expected["reward"][real], rtol=1e-6)
        np.testing.assert_allclose(batch.next_value[real], expected["next_value"][real], rtol=1e-6)
        # GAE per head: the plain Python GAE of head h, with that head's gamma and lam, on the reference
        advantages, returns = segvec.gae(batch, GAMMAS, LAMS)
        assert advantages.shape == returns.shape == (n, horizon, K)
        for h in range(K):
            plain = types.SimpleNamespace(reward=expected["reward"][..., h], value=head_values(batch.obs[:, :-1])[..., h],
                                          next_value=expected["next_value"][..., h], length=batch.length, **flags)
            ref_adv, ref_ret = reference_gae(plain, GAMMAS[h], LAMS[h])
            np.testing.assert_allclose(advantages[..., h], ref_adv, rtol=1e-5, atol=1e-5, err_msg=f"head {h}")
            np.testing.assert_allclose(returns[..., h], ref_ret, rtol=1e-5, atol=1e-5, err_msg=f"head {h}")
            if torch is not None:
                torch_adv, torch_ret = segvec.gae(batch.to_torch(), GAMMAS, LAMS)
                np.testing.assert_allclose(torch_adv.numpy()[..., h], ref_adv, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(torch_ret.numpy()[..., h], ref_ret, rtol=1e-5, atol=1e-5)


def test_truncation_values_per_head_without_value_fn(make_envs):
    """SAME_STEP without value_fn: final observations come with the batch, and ``set_truncation_values``
    takes ``[k, heads]``; the bootstraps then equal the reference's."""
    num_envs, horizon, steps, seed = 2, 6, 30, 3
    envs = make_envs(env_fns(VectorRewardEnv, num_envs), num_envs, "serial", horizon=horizon,
                     autoreset_mode=AutoresetMode.SAME_STEP, value_shape=(K,))
    with rollout(envs, steps, seed) as batch:
        final, positions = batch.final_obs
        assert len(positions), "the seed gives no truncation"
        assert np.isnan(batch.next_value[positions[:, 0], positions[:, 1]]).all()
        with pytest.raises(ValueError, match="one per final observation and value head"):
            batch.set_truncation_values(np.zeros(len(positions), np.float32))
        batch.set_truncation_values(head_values(final))
        for i in range(len(batch)):
            ref = reference_rollout(VectorRewardEnv, int(batch.env_id[i]), seed + int(batch.env_id[i]), steps,
                                    AutoresetMode.SAME_STEP)
            start, length = int(batch.start_step[i]), int(batch.length[i])
            np.testing.assert_allclose(batch.next_value[i, :length], ref["next_value"][start:start + length])


# ---- the other faces and sources ----------------------------------------------------------------------------
def test_async_face_sends_and_returns_per_head(make_envs, backend):
    """recv returns ``(n, k)`` rewards; send takes ``value=(n, k)``; the rows hold what was sent."""
    envs = make_envs(env_fns(VectorRewardEnv, 4), 4, backend, batch_size=2, horizon=4, value_shape=(K,))
    envs.async_reset(seed=0)
    sent = {}
    for step in range(20):
        obs, rewards, _, _, info = envs.recv()
        assert rewards.shape == (2, K) and rewards.dtype == np.float64
        values = head_values(obs) + step
        for e, v in zip(info["env_id"].tolist(), values):
            sent.setdefault(e, []).append(v)
        envs.send(policy(obs), info["env_id"], value=values)
    with envs.take_segments() as batch:
        for i in range(len(batch)):
            e, start, length = int(batch.env_id[i]), int(batch.start_step[i]), int(batch.length[i])
            np.testing.assert_array_equal(batch.value[i, :length], np.asarray(sent[e][start:start + length]))
            last = length - 1  # the tail bootstrap is the value sent for the env's next observation
            if length == 4 and not (batch.terminated[i, last] or batch.truncated[i, last]):
                np.testing.assert_array_equal(batch.next_value[i, last], sent[e][start + length])


def test_native_env_scalar_reward_in_every_head():
    """A native C env (CartPole-c): its scalar reward goes to every head, its rows bootstrap per head."""
    envs = segvec.make_vec("segvec/CartPole-c", num_envs=4, backend="serial", horizon=8, value_shape=(2,))
    try:
        obs, _ = envs.reset(seed=0)
        for t in range(40):
            values = np.stack([obs[:, 0], obs[:, 1] + t], axis=1)
            obs, rewards, *_ = envs.step(np.zeros(4, np.int64), value=values)
            assert rewards.shape == (4, 2) and (rewards[:, 0] == rewards[:, 1]).all()
        with envs.take_segments() as batch:
            assert batch.reward.shape == batch.next_value.shape == (len(batch), 8, 2)
            np.testing.assert_array_equal(batch.reward[..., 0], batch.reward[..., 1])
            inside = batch.mask[:, :-1] & ~batch.terminated[:, :-1]
            np.testing.assert_array_equal(batch.next_value[:, :-1][inside], batch.value[:, 1:][inside])
            assert (batch.next_value[batch.terminated] == 0).all()
    finally:
        envs.close()


def test_wrap_vector_env_reads_info_rewards_like_the_serial_backend():
    """A gymnasium SyncVectorEnv whose envs put the k rewards in ``info["rewards"]`` gives the same rows as
    the same envs on the serial backend."""
    batches = []
    for source in ("engine", "serial"):
        fns = env_fns(InfoRewardEnv, 3)
        if source == "engine":
            envs = segvec.wrap_vector_env(gymnasium.vector.SyncVectorEnv(fns), horizon=5, value_shape=(K,))
        else:
            envs = segvec.make_vec(fns, num_envs=3, backend="serial", horizon=5, value_shape=(K,))
        try:
            with rollout(envs, 17, seed=2) as batch:
                batches.append({name: getattr(batch, name).copy() for name in
                                ("reward", "value", "next_value", "terminated", "truncated", "mask", "env_id")})
        finally:
            envs.close()
    engine, serial = batches
    for name in engine:
        np.testing.assert_array_equal(engine[name], serial[name], err_msg=name)
    assert not np.array_equal(engine["reward"][..., 1], engine["reward"][..., 0])


@requires_torch
def test_to_torch_keeps_the_head_axis(make_envs):
    envs = make_envs(env_fns(VectorRewardEnv, 2), 2, "serial", horizon=4, value_shape=(K,))
    with rollout(envs, 9, seed=1) as batch:
        tensors = batch.to_torch()
        for name in ("value", "reward", "next_value"):
            assert tuple(getattr(tensors, name).shape) == (len(batch), 4, K)
            np.testing.assert_array_equal(getattr(tensors, name).numpy(), getattr(batch, name))
        adv_np, ret_np = segvec.gae(batch, GAMMAS, 0.9)
        adv_t, ret_t = segvec.gae(tensors, torch.tensor(GAMMAS), 0.9)
        np.testing.assert_allclose(adv_t.numpy(), adv_np, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ret_t.numpy(), ret_np, rtol=1e-5, atol=1e-6)


@requires_torch
@pytest.mark.skipif(torch is None or not torch.cuda.is_available(), reason="needs CUDA")
def test_heads_on_the_device_match_the_host(make_envs):
    """``to_torch("cuda")`` keeps the head axis; GAE per head on the device equals the C kernel's."""
    envs = make_envs(env_fns(VectorRewardEnv, 4), 4, "serial", horizon=5, value_shape=(K,))
    with rollout(envs, 16, seed=4) as batch:
        tensors = batch.to_torch("cuda")
        torch.cuda.synchronize()
        for name in ("value", "reward", "next_value"):
            assert getattr(tensors, name).device.type == "cuda"
            np.testing.assert_array_equal(getattr(tensors, name).cpu().numpy(), getattr(batch, name))
        behaviour = np.zeros(batch.mask.shape, np.float32)
        target = np.random.default_rng(0).normal(0, 0.5, batch.mask.shape).astype(np.float32)
        adv, ret = segvec.gae(batch, GAMMAS, LAMS, rho_clip=1.0, c_clip=1.0, behaviour_logprob=behaviour,
                              target_logprob=target)
        adv_t, ret_t = segvec.gae(tensors, GAMMAS, LAMS, rho_clip=1.0, c_clip=1.0,
                                  behaviour_logprob=torch.from_numpy(behaviour).cuda(),
                                  target_logprob=torch.from_numpy(target).cuda())
        assert adv_t.device.type == "cuda"
        np.testing.assert_allclose(adv_t.cpu().numpy(), adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret_t.cpu().numpy(), ret, rtol=1e-5, atol=1e-5)


def test_one_head_gives_the_numbers_of_no_heads(make_envs, backend):
    """``value_shape=(1,)`` stores and bootstraps exactly what ``value_shape=()`` does, with a head axis."""
    batches = {}
    for value_shape in ((), (1,)):
        envs = make_envs(env_fns(CounterEnv, 2), 2, backend, horizon=4, value_shape=value_shape,
                         autoreset_mode=AutoresetMode.SAME_STEP, value_fn=lambda obs: value_of(obs).reshape(
                             (-1,) + value_shape))
        obs, _ = envs.reset(seed=9)
        for _ in range(17):
            obs, *_ = envs.step(policy(obs), value=value_of(obs).reshape((-1,) + value_shape))
        with envs.take_segments() as batch:
            batches[value_shape] = {name: np.array(getattr(batch, name)) for name in ("value", "reward", "next_value")}
            batches[value_shape]["gae"] = np.stack(segvec.gae(batch, [0.9] if value_shape else 0.9, 0.8))
    for name, array in batches[()].items():
        np.testing.assert_array_equal(batches[(1,)][name][..., 0], array, err_msg=name)


def test_restarted_env_truncates_with_every_head(make_envs):
    """restart_failed_envs: the transition before a failed step is truncated, bootstrapped head by head by
    the values already sent for the observation the env failed on."""
    from fault_envs import FaultEnv

    fn = functools.partial(FaultEnv, index=0, fault="step", at_step=5, times=1)
    envs = make_envs([fn], 1, "serial", horizon=8, num_segments=4, value_shape=(2,), restart_failed_envs=True)
    obs, _ = envs.reset(seed=0)
    for step in range(12):
        obs, _, _, truncated, info = envs.step(np.zeros(1, np.int64), value=np.array([[step, 100.0 + step]]))
    envs.flush()
    with envs.take_segments() as batch:
        cuts = np.argwhere(batch.truncated & batch.mask)  # (a rebuilt env fails again at its step 5)
        assert len(cuts) >= 1
        for i, t in cuts:
            np.testing.assert_array_equal(batch.next_value[i, t], batch.value[i, t] + 1)  # sent for the failed step
            assert not np.array_equal(batch.next_value[i, t], batch.value[i, t + 1])      # not the new episode's


# ---- the kernels on random batches -----------------------------------------------------------------------
@st.composite
def head_batches(draw):
    """Random ``[n, T, k]`` batches with random flags, lengths and NaN bootstraps at some row ends."""
    n, T, k = draw(st.integers(1, 5)), draw(st.integers(1, 12)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    f32 = np.float32
    b = types.SimpleNamespace(
        reward=rng.standard_normal((n, T, k)).astype(f32),
        value=rng.standard_normal((n, T, k)).astype(f32),
        next_value=rng.standard_normal((n, T, k)).astype(f32),
        logprob=-rng.exponential(size=(n, T)).astype(f32),
        terminated=rng.random((n, T)) < draw(st.sampled_from([0.0, 0.1, 0.4])),
        truncated=rng.random((n, T)) < draw(st.sampled_from([0.0, 0.1, 0.4])),
        mask=rng.random((n, T)) >= draw(st.sampled_from([0.0, 0.2])),
        length=rng.integers(0, T + 1, n).astype(np.int32) if draw(st.booleans()) else np.full(n, T, np.int32),
    )
    flushed = (rng.random(n) < 0.5) & (b.length > 0)
    b.next_value[flushed, b.length[flushed] - 1, rng.integers(0, k)] = np.nan
    b.target = (b.logprob + rng.normal(0, 0.7, (n, T))).astype(f32)
    gammas = [draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0])) for _ in range(k)]
    lams = [draw(st.sampled_from([0.0, 0.5, 0.95, 1.0])) for _ in range(k)]
    return b, gammas, lams


def head(b, h: int):
    """Head h of a batch, as a plain ``[n, T]`` batch."""
    return types.SimpleNamespace(**{name: value[..., h] if name in ("reward", "value", "next_value") else value
                                    for name, value in vars(b).items()})


def assert_same(actual, expected, tolerance):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg="NaN positions differ")
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance)


@settings(max_examples=150, deadline=None)
@given(head_batches(), st.sampled_from([None, (None, None), (0.5, 1.0), (2.0, 0.5)]))
def test_kernels_match_plain_gae_head_by_head(drawn, clips):
    """C (numpy) and torch kernels, plain and V-trace-clipped, against the plain Python GAE of each head."""
    b, gammas, lams = drawn
    options = {} if clips is None else {"rho_clip": clips[0], "c_clip": clips[1], "target_logprob": b.target}
    weights = {}
    if clips is not None:
        ratio = np.exp(b.target.astype(np.float64) - b.logprob)
        weights = {"rho": ratio if clips[0] is None else np.minimum(ratio, clips[0]),
                   "c": ratio if clips[1] is None else np.minimum(ratio, clips[1])}
    adv, ret = segvec.gae(b, gammas, lams, **options)
    assert adv.shape == ret.shape == b.reward.shape
    for h in range(b.reward.shape[2]):
        ref_adv, ref_ret = reference_gae(head(b, h), gammas[h], lams[h], **weights)
        assert_same(adv[..., h], ref_adv, 1e-4)
        assert_same(ret[..., h], ref_ret, 1e-4)
    if torch is not None:
        tensors = types.SimpleNamespace(**{name: torch.as_tensor(value) for name, value in vars(b).items()})
        torch_options = dict(options, target_logprob=tensors.target) if clips is not None else {}
        adv_t, ret_t = segvec.gae(tensors, gammas, lams, **torch_options)
        assert_same(adv_t.numpy(), adv, 1e-5)
        assert_same(ret_t.numpy(), ret, 1e-5)


@settings(max_examples=60, deadline=None)
@given(head_batches())
def test_one_head_is_the_scalar_gae(drawn):
    """``[n, T, 1]`` with one gamma equals the ``[n, T]`` GAE bit for bit, in C and torch."""
    b, gammas, lams = drawn
    one = head(b, 0)
    expanded = types.SimpleNamespace(**{name: value[..., None] if name in ("reward", "value", "next_value")
                                        else value for name, value in vars(one).items()})
    adv, ret = segvec.gae(one, gammas[0], lams[0])
    adv1, ret1 = segvec.gae(expanded, [gammas[0]], [lams[0]])
    np.testing.assert_array_equal(adv1[..., 0], adv)
    np.testing.assert_array_equal(ret1[..., 0], ret)


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value_shape", [(0,), (2, 3), 3, "ab", (1.5,), (True,)])
def test_bad_value_shape_raises(value_shape):
    with pytest.raises(ValueError, match="value_shape must be"):
        segvec.make_vec("CartPole-v1", num_envs=2, backend="serial", value_shape=value_shape)


@pytest.mark.parametrize("value, shape", [(np.zeros(2), (2,)), (np.zeros((2, K + 1)), (2, K + 1)),
                                          (np.zeros((2, K, 1)), (2, K, 1))])
def test_wrong_value_shape_in_send_raises_and_sends_nothing(make_envs, value, shape):
    envs = make_envs(env_fns(VectorRewardEnv, 2), 2, "serial", horizon=4, value_shape=(K,))
    obs, _ = envs.reset(seed=0)
    with pytest.raises(ValueError, match=rf"value must have shape \(2, {K}\).*got shape {re.escape(str(shape))}"):
        envs.step(policy(obs), value=value)
    envs.step(policy(obs), value=head_values(obs))  # nothing was sent: the envs are still the learner's


def test_scalar_envs_reject_head_values(make_envs):
    envs = make_envs(env_fns(CounterEnv, 2), 2, "serial", horizon=4)
    obs, _ = envs.reset(seed=0)
    with pytest.raises(ValueError, match="value must have one entry per env"):
        envs.step(policy(obs), value=head_values(obs))


@pytest.mark.parametrize("env_cls, message", [(VectorRewardEnv, "returned reward of shape"),
                                               (InfoRewardEnv, "returned info\\['rewards'\\] of shape")])
def test_rewards_of_the_wrong_length_name_the_env(make_envs, env_cls, message):
    envs = make_envs(env_fns(env_cls, 2), 2, "serial", horizon=4, value_shape=(K + 1,))
    obs, _ = envs.reset(seed=0)
    with pytest.raises(segvec.EnvError, match=message) as caught:
        envs.step(policy(obs), value=np.zeros((2, K + 1)))
    assert caught.value.env_index in (0, 1) and f"env {caught.value.env_index} returned" in str(caught.value)


@pytest.mark.parametrize("gamma, lam, error, message", [
    ((0.9, 0.9), 0.95, ValueError, "gamma has 2 entries, expected 3"),
    (0.9, [0.9] * 4, ValueError, "lam has 4 entries, expected 3"),
    ([[0.9] * 3], 0.95, TypeError, "gamma must be a real number or a sequence of 3"),
    ((0.9, float("nan"), 0.9), 0.95, ValueError, "gamma must be finite"),
    (("a", "b", "c"), 0.95, TypeError, "gamma must be a real number or a sequence of 3"),
])
def test_bad_per_head_gamma_or_lam_raises(gamma, lam, error, message):
    n, T = 2, 4
    f32 = np.float32
    b = types.SimpleNamespace(reward=np.zeros((n, T, K), f32), value=np.zeros((n, T, K), f32),
                              next_value=np.zeros((n, T, K), f32), terminated=np.zeros((n, T), bool),
                              truncated=np.zeros((n, T), bool), mask=np.ones((n, T), bool),
                              length=np.full(n, T, np.int32))
    with pytest.raises(error, match=re.escape("gae: " + message)):
        segvec.gae(b, gamma, lam)
    if torch is not None:
        tensors = types.SimpleNamespace(**{name: torch.as_tensor(value) for name, value in vars(b).items()})
        with pytest.raises(error, match=re.escape("gae: " + message)):
            segvec.gae(tensors, gamma, lam)


def test_per_head_gamma_needs_heads():
    n, T = 2, 3
    b = types.SimpleNamespace(reward=np.zeros((n, T), np.float32), value=np.zeros((n, T), np.float32),
                              next_value=np.zeros((n, T), np.float32), terminated=np.zeros((n, T), bool),
                              truncated=np.zeros((n, T), bool), mask=np.ones((n, T), bool),
                              length=np.full(n, T, np.int32))
    with pytest.raises(TypeError, match="gae: gamma must be a real number"):
        segvec.gae(b, [0.9, 0.9], 0.95)


def test_head_fields_must_share_the_reward_shape():
    n, T = 2, 3
    b = types.SimpleNamespace(reward=np.zeros((n, T, K), np.float32), value=np.zeros((n, T), np.float32),
                              next_value=np.zeros((n, T, K), np.float32), terminated=np.zeros((n, T), bool),
                              truncated=np.zeros((n, T), bool), mask=np.ones((n, T), bool),
                              length=np.full(n, T, np.int32))
    with pytest.raises(ValueError, match=re.escape(f"gae: value has shape {(n, T)}, expected {(n, T, K)}")):
        segvec.gae(b, 0.9, 0.95)
    b.value, b.mask = np.zeros((n, T, K), np.float32), np.ones((n, T, K), bool)
    with pytest.raises(ValueError, match=re.escape(f"gae: mask has shape {(n, T, K)}, expected {(n, T)}")):
        segvec.gae(b, 0.9, 0.95)


def test_sb3_adapter_refuses_heads():
    pytest.importorskip("stable_baselines3")
    from segvec.integrations.sb3 import SB3VecEnv

    with pytest.raises(ValueError, match="SB3 trains one value head"):
        SB3VecEnv(env_fns(CounterEnv, 2), value_shape=(2,), backend="serial")
    envs = segvec.make_vec(env_fns(CounterEnv, 2), num_envs=2, backend="serial", value_shape=(2,),
                           autoreset_mode=AutoresetMode.SAME_STEP)
    try:
        with pytest.raises(ValueError, match="SB3 trains one value head"):
            SB3VecEnv(envs)
    finally:
        envs.close()


# ---- the example -----------------------------------------------------------------------------------------------
@requires_torch
def test_value_heads_example_trains_both_heads(tmp_path):
    """examples/value_heads.py runs a few updates as a user would run it, and reports both heads' losses."""
    root = pathlib.Path(__file__).resolve().parent.parent
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(root / "examples" / "value_heads.py"), "--total-timesteps", "512",
                          "--num-envs", "4", "--horizon", "32", "--update-epochs", "1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120, env=environment)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    losses = [float(v) for v in re.findall(r"^losses/aux_value_loss (\S+)$", out.stdout, re.MULTILINE)]
    assert len(losses) >= 2 and all(np.isfinite(losses)), out.stdout[-2000:]
