"""Tests of segvec/torch_utils.py: the torch hand-off, torch GAE, clipped GAE, and recurrent replay."""
from __future__ import annotations

import types

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import segvec  # noqa: E402
from envs import reference_gae  # noqa: E402
from segvec.advantages import gae_numpy_clipped  # noqa: E402
from segvec.torch_utils import gae_torch  # noqa: E402


def rollout(envs, steps, rng, **fields):
    envs.reset(seed=0)
    for _ in range(steps):
        actions = envs.action_space.sample()
        envs.step(actions, value=rng.standard_normal(envs.num_envs).astype(np.float32),
                  logprob=rng.standard_normal(envs.num_envs).astype(np.float32), **fields)


# ---- hand-off ---------------------------------------------------------------------------------------
def test_to_torch_is_zero_copy_on_cpu():
    rng = np.random.default_rng(0)
    envs = segvec.make_vec("CartPole-v1", num_envs=4, backend="serial", horizon=8)
    try:
        rollout(envs, 9, rng)
        batch = envs.take_segments(4)
        assert batch.zero_copy
        tensors = batch.to_torch()
        for name in batch.fields():
            array, tensor = getattr(batch, name), getattr(tensors, name)
            assert tensor.shape == array.shape, name
            assert tensor.device.type == "cpu"
            assert tensor.data_ptr() == array.ctypes.data, f"{name} was copied"
            np.testing.assert_array_equal(tensor.numpy(), array)
        # Writes through the tensor are seen by the batch (same memory).
        tensors.reward[0, 0] = 123.0
        assert batch.reward[0, 0] == 123.0
        assert tensors.obs.shape == (4, 9, 4)
        assert tensors.terminated.dtype == torch.bool and tensors.mask.dtype == torch.bool
        batch.release()
    finally:
        envs.close()


def test_to_torch_non_contiguous_rows_are_views_of_the_gathered_batch():
    rng = np.random.default_rng(1)
    envs = segvec.make_vec("CartPole-v1", num_envs=2, backend="serial", horizon=4, num_segments=6)
    try:
        rollout(envs, 5, rng)
        first = envs.take_segments(1)
        rollout_more = 8
        for _ in range(rollout_more):
            envs.step(envs.action_space.sample(), value=np.zeros(2), logprob=np.zeros(2))
        batch = envs.take_segments(envs.segments_ready)
        tensors = batch.to_torch()
        for name in batch.fields():
            array, tensor = getattr(batch, name), getattr(tensors, name)
            np.testing.assert_array_equal(tensor.numpy(), array)
            assert tensor.data_ptr() == array.ctypes.data, f"{name} was copied again"
        first.release()
        batch.release()
    finally:
        envs.close()


class DictObsEnv(gymnasium.Env):
    """A Dict observation (image + vector) to check structured hand-off."""

    def __init__(self):
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, (3, 5, 5), np.uint8),
            "state": spaces.Box(-1.0, 1.0, (2,), np.float32),
        })
        self.action_space = spaces.Discrete(2)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def _obs(self):
        return {"image": np.full((3, 5, 5), self.t % 256, np.uint8),
                "state": np.array([self.t / 100.0, -self.t / 100.0], np.float32)}

    def step(self, action):
        self.t += 1
        return self._obs(), 1.0, False, self.t >= 50, {}


def test_to_torch_structured_obs():
    rng = np.random.default_rng(2)
    envs = segvec.make_vec(DictObsEnv, num_envs=2, backend="serial", horizon=4)
    try:
        rollout(envs, 5, rng)
        batch = envs.take_segments(2)
        tensors = batch.to_torch()
        assert isinstance(tensors.obs, dict) and set(tensors.obs) == {"image", "state"}
        assert tensors.obs["image"].shape == (2, 5, 3, 5, 5) and tensors.obs["image"].dtype == torch.uint8
        assert tensors.obs["state"].shape == (2, 5, 2) and tensors.obs["state"].dtype == torch.float32
        for key in ("image", "state"):
            np.testing.assert_array_equal(tensors.obs[key].numpy(), batch.obs[key])
            assert tensors.obs[key].data_ptr() == batch.obs[key].ctypes.data
        np.testing.assert_array_equal(tensors.obs["image"][:, :, 0, 0, 0].numpy(), [[0, 1, 2, 3, 4]] * 2)
        batch.release()
    finally:
        envs.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_torch_cuda_matches_host():
    rng = np.random.default_rng(3)
    envs = segvec.make_vec("CartPole-v1", num_envs=4, backend="serial", horizon=8)
    try:
        rollout(envs, 9, rng)
        batch = envs.take_segments(4)
        tensors = batch.to_torch("cuda")
        torch.cuda.synchronize()
        for name in batch.fields():
            tensor = getattr(tensors, name)
            assert tensor.device.type == "cuda"
            np.testing.assert_array_equal(tensor.cpu().numpy(), getattr(batch, name))
        advantages, returns = segvec.gae(tensors, 0.99, 0.95)
        expected = segvec.gae(batch, 0.99, 0.95)
        np.testing.assert_allclose(advantages.cpu().numpy(), expected[0], rtol=1e-5, atol=1e-5)
        batch.release()
    finally:
        envs.close()


# ---- GAE --------------------------------------------------------------------------------------------
@st.composite
def random_batches(draw):
    n = draw(st.integers(1, 6))
    T = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return types.SimpleNamespace(
        reward=rng.standard_normal((n, T)).astype(f32),
        value=rng.standard_normal((n, T)).astype(f32),
        next_value=rng.standard_normal((n, T)).astype(f32),
        logprob=-rng.exponential(size=(n, T)).astype(f32),
        terminated=rng.random((n, T)) < draw(st.sampled_from([0.0, 0.1, 0.5])),
        truncated=rng.random((n, T)) < draw(st.sampled_from([0.0, 0.1, 0.5])),
        mask=rng.random((n, T)) > draw(st.sampled_from([0.0, 0.1, 0.5])),
        length=rng.integers(0, T + 1, n).astype(np.int32) if draw(st.booleans()) else np.full(n, T, np.int32),
    )


def as_torch(b):
    return types.SimpleNamespace(**{k: torch.from_numpy(np.asarray(v)) for k, v in vars(b).items()})


@settings(max_examples=200, deadline=None)
@given(random_batches(), st.sampled_from([0.0, 0.9, 0.99, 1.0]), st.sampled_from([0.0, 0.5, 0.95, 1.0]))
def test_gae_torch_equals_c_gae(b, gamma, lam):
    adv_c, ret_c = segvec.gae(b, gamma, lam)
    adv_t, ret_t = gae_torch(as_torch(b), gamma, lam)
    np.testing.assert_allclose(adv_t.numpy(), adv_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret_t.numpy(), ret_c, rtol=1e-5, atol=1e-5)
    adv_ref, ret_ref = reference_gae(b, gamma, lam)
    np.testing.assert_allclose(adv_c, adv_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ret_c, ret_ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=100, deadline=None)
@given(random_batches(), st.sampled_from([0.9, 0.99]), st.sampled_from([0.9, 0.95]),
       st.sampled_from([1.0, 1.5, None]), st.sampled_from([1.0, 2.0, None]))
def test_clipped_gae_with_unit_ratios_is_plain_gae(b, gamma, lam, rho_clip, c_clip):
    adv_c, ret_c = segvec.gae(b, gamma, lam)
    same = b.logprob.copy()
    adv_n, ret_n = segvec.gae(b, gamma, lam, rho_clip=rho_clip, c_clip=c_clip, target_logprob=same)
    np.testing.assert_allclose(adv_n, adv_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret_n, ret_c, rtol=1e-5, atol=1e-5)
    adv_t, ret_t = segvec.gae(as_torch(b), gamma, lam, rho_clip=rho_clip, c_clip=c_clip,
                              target_logprob=torch.from_numpy(same))
    np.testing.assert_allclose(adv_t.numpy(), adv_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret_t.numpy(), ret_c, rtol=1e-5, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(random_batches(), st.sampled_from([0.5, 1.0]), st.sampled_from([0.5, 1.0]))
def test_clipped_gae_matches_vtrace_reference(b, rho_clip, c_clip):
    rng = np.random.default_rng(int(b.length.sum()))
    target = (b.logprob + rng.normal(0, 0.7, b.logprob.shape)).astype(np.float32)
    ratio = np.exp(target.astype(np.float64) - b.logprob)
    rho, c = np.minimum(ratio, rho_clip), np.minimum(ratio, c_clip)
    adv_ref, ret_ref = reference_gae(b, 0.99, 0.95, rho=rho, c=c)
    adv_n, ret_n = gae_numpy_clipped(b, 0.99, 0.95, rho_clip, c_clip, None, target)
    adv_t, ret_t = gae_torch(as_torch(b), 0.99, 0.95, rho_clip, c_clip, None, torch.from_numpy(target))
    np.testing.assert_allclose(adv_n, adv_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ret_n, ret_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(adv_t.numpy(), adv_n, rtol=1e-5, atol=1e-5)


def test_gae_on_real_segments_numpy_and_torch_agree():
    rng = np.random.default_rng(4)
    envs = segvec.make_vec("CartPole-v1", num_envs=4, backend="serial", horizon=32)
    try:
        rollout(envs, 200, rng)
        batch = envs.take_segments(envs.segments_ready)
        adv_c, ret_c = segvec.gae(batch, 0.99, 0.95)
        adv_t, ret_t = segvec.gae(batch.to_torch(), 0.99, 0.95)
        np.testing.assert_allclose(adv_t.numpy(), adv_c, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret_t.numpy(), ret_c, rtol=1e-5, atol=1e-5)
        batch.release()
    finally:
        envs.close()


# ---- recurrent policies -----------------------------------------------------------------------------
class TinyLSTMPolicy(torch.nn.Module):
    def __init__(self, obs_dim, hidden, num_actions):
        super().__init__()
        self.cell = torch.nn.LSTMCell(obs_dim, hidden)
        self.head = torch.nn.Linear(hidden, num_actions + 1)

    def forward(self, obs, state, episode_start):
        keep = (~episode_start).float()[:, None]
        h, c = self.cell(obs, (state[0] * keep, state[1] * keep))
        out = self.head(h)
        return out[:, :-1].log_softmax(-1), out[:, -1], (h, c)


@pytest.mark.parametrize("autoreset_mode", ["NextStep", "SameStep"])
def test_recurrent_rows_replay_from_their_stored_state(autoreset_mode):
    """segment_fields hold the LSTM state at each row's first step; with episode_start a row replays exactly."""
    torch.manual_seed(0)
    hidden, num_envs, horizon = 8, 3, 10
    policy = TinyLSTMPolicy(4, hidden, 2)
    envs = segvec.make_vec(
        "CartPole-v1", num_envs=num_envs, backend="serial", horizon=horizon, autoreset_mode=autoreset_mode,
        num_segments=64, segment_fields={"h": ((hidden,), np.float32), "c": ((hidden,), np.float32)})
    same_step = autoreset_mode == "SameStep"
    try:
        obs, _ = envs.reset(seed=0)
        state = (torch.zeros(num_envs, hidden), torch.zeros(num_envs, hidden))
        episode_start = torch.ones(num_envs, dtype=torch.bool)
        needs_reset = np.zeros(num_envs, bool)
        with torch.no_grad():
            for _ in range(120):
                logits, value, new_state = policy(torch.as_tensor(obs), state, episode_start)
                action = torch.distributions.Categorical(logits=logits).sample()
                logprob = logits.gather(1, action[:, None])[:, 0]
                obs, _, terminated, truncated, _ = envs.step(
                    action.numpy(), value=value.numpy(), logprob=logprob.numpy(),
                    h=state[0].numpy(), c=state[1].numpy())
                state = new_state
                done = terminated | truncated
                # SAME_STEP: the observation after a done step starts an episode; NEXT_STEP: one step later.
                episode_start = torch.as_tensor(done if same_step else needs_reset)
                needs_reset = done
        batch = envs.take_segments(envs.segments_ready)
        assert len(batch) >= 2 * num_envs
        assert batch.episode_start[:, 0].any() and batch.episode_start[:, 1:].any()
        seg = batch.to_torch()
        replay_state = (seg.h, seg.c)
        logprobs, values = [], []
        with torch.no_grad():
            for t in range(horizon):
                logits, value, replay_state = policy(seg.obs[:, t], replay_state, seg.episode_start[:, t])
                logprobs.append(logits.gather(1, seg.action[:, t, None].long())[:, 0])
                values.append(value)
        logprobs, values = torch.stack(logprobs, 1), torch.stack(values, 1)
        # Equal up to float32 rounding: the replay runs the rows in a batch of another size.
        real = seg.mask
        torch.testing.assert_close(logprobs[real], seg.logprob[real], rtol=0, atol=1e-6)
        torch.testing.assert_close(values[real], seg.value[real], rtol=0, atol=1e-6)
        batch.release()
    finally:
        envs.close()
