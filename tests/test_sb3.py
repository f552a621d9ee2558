"""Tests of segvec/integrations/sb3.py: `SB3VecEnv` behaves like SB3's own `DummyVecEnv`.

The reference is SB3's `DummyVecEnv` over the same envs, seeds and actions: observations, rewards, dones,
``terminal_observation``, ``TimeLimit.truncated``, every other info key and ``reset_infos`` must match step
for step.  Then the per-index env access (``env_method/get_attr/set_attr/env_is_wrapped``), and a short
PPO run end to end.
"""
from __future__ import annotations

import functools
import subprocess
import sys

import gymnasium
import numpy as np
import pytest

pytest.importorskip("stable_baselines3", reason="stable-baselines3 is not installed (pip install -e .[sb3])")
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.monitor import Monitor  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv  # noqa: E402

import segvec  # noqa: E402
from segvec.integrations.sb3 import SB3VecEnv, make_sb3_vec_env  # noqa: E402

from conftest import backend_options  # noqa: E402
from envs import DictEnv  # noqa: E402

NUM_ENVS = 4


def cartpole(max_episode_steps: int = 30) -> gymnasium.Env:
    """CartPole-v1 with a short time limit, so that truncations happen within a few hundred steps."""
    return Monitor(gymnasium.make("CartPole-v1", max_episode_steps=max_episode_steps))


def assert_same(a, b, where: str) -> None:
    """Observations (arrays or dicts of arrays) or info values are equal."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)


def assert_infos_same(ref: list[dict], ours: list[dict], where: str) -> None:
    """Per-env info dicts are equal; of Monitor's ``episode`` only return and length (``t`` is wall time)."""
    assert len(ref) == len(ours)
    for i, (a, b) in enumerate(zip(ref, ours)):
        episode_a, episode_b = a.get("episode"), b.get("episode")
        assert (episode_a is None) == (episode_b is None), f"{where} env {i}: {a} != {b}"
        if episode_a is not None:
            assert (episode_a["r"], episode_a["l"]) == (episode_b["r"], episode_b["l"]), f"{where} env {i}"
        assert_same({k: v for k, v in a.items() if k != "episode"}, {k: v for k, v in b.items() if k != "episode"},
                    f"{where} env {i}")


def run_both(ref, ours, steps: int, seed: int, action_space) -> dict:
    """Steps both vec envs with the same seeded random actions, checking every output; returns counts."""
    counts = {"terminated": 0, "truncated": 0}
    rng = np.random.default_rng(seed)
    for step in range(steps):
        actions = rng.integers(0, action_space.n, NUM_ENVS)
        obs_ref, rew_ref, done_ref, info_ref = ref.step(actions)
        obs, rew, done, info = ours.step(actions)
        where = f"step {step}"
        assert_same(obs_ref, obs, where)
        np.testing.assert_array_equal(rew_ref, rew, err_msg=where)
        np.testing.assert_array_equal(done_ref, done, err_msg=where)
        assert rew.dtype == np.float32 and done.dtype == np.bool_ and rew.shape == done.shape == (NUM_ENVS,)
        assert_infos_same(info_ref, info, where)
        assert_infos_same(ref.reset_infos, ours.reset_infos, f"{where} reset_infos")
        for i in np.nonzero(done)[0]:
            assert "terminal_observation" in info[i]
            counts["truncated" if info[i]["TimeLimit.truncated"] else "terminated"] += 1
    return counts


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_matches_dummy_vec_env_on_cartpole(backend):
    ref = DummyVecEnv([cartpole] * NUM_ENVS)
    ours = SB3VecEnv(segvec.make_vec(cartpole, num_envs=NUM_ENVS, horizon=16,
                                     autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP,
                                     **backend_options(backend, NUM_ENVS)))
    try:
        assert ours.observation_space == ref.observation_space and ours.action_space == ref.action_space
        assert ours.num_envs == NUM_ENVS and ours.render_mode is None
        assert ref.seed(7) == ours.seed(7)
        assert_same(ref.reset(), ours.reset(), "reset")
        assert_infos_same(ref.reset_infos, ours.reset_infos, "reset_infos")
        counts = run_both(ref, ours, 300, seed=1, action_space=ref.action_space)
        assert counts["terminated"] > 5 and counts["truncated"] > 5, counts
        ref.seed(11), ours.seed(11)  # a second seeded reset mid-run restarts both identically
        assert_same(ref.reset(), ours.reset(), "second reset")
        run_both(ref, ours, 50, seed=2, action_space=ref.action_space)
    finally:
        ref.close()
        ours.close()


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_matches_dummy_vec_env_with_dict_obs_and_infos(backend):
    """Dict observations, step and reset infos, episodes that end terminated, truncated or both."""
    ref = DummyVecEnv([DictEnv] * NUM_ENVS)
    ours = make_sb3_vec_env(DictEnv, NUM_ENVS, monitor=False, horizon=8, **backend_options(backend, NUM_ENVS))
    try:
        ref.seed(3), ours.seed(3)
        assert_same(ref.reset(), ours.reset(), "reset")
        assert_infos_same(ref.reset_infos, ours.reset_infos, "reset_infos")
        counts = run_both(ref, ours, 200, seed=4, action_space=ref.action_space)
        assert counts["terminated"] > 5 and counts["truncated"] > 5, counts
    finally:
        ref.close()
        ours.close()


def test_reset_with_per_env_options_and_seeds():
    """``set_options`` with different options per env resets each group with its options and seeds."""
    ref = DummyVecEnv([cartpole] * NUM_ENVS)
    ours = make_sb3_vec_env(cartpole, NUM_ENVS, monitor=False, backend="serial", horizon=8)
    try:
        options = [{"low": -0.01, "high": 0.01}, {}, {"low": -0.2, "high": 0.2}, {"low": -0.01, "high": 0.01}]
        for env in (ref, ours):
            env.seed(5)
            env.set_options(options)
        obs_ref, obs = ref.reset(), ours.reset()
        assert_same(obs_ref, obs, "reset with options")
        assert np.abs(obs[[0, 3]]).max() <= 0.01 < np.abs(obs[2]).max()
        run_both(ref, ours, 20, seed=6, action_space=ref.action_space)
        obs_ref, obs = ref.reset(), ours.reset()  # options and seeds are used once
        assert np.abs(obs).max() <= 0.05
    finally:
        ref.close()
        ours.close()


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_env_method_get_attr_set_attr_with_indices(backend):
    ref = DummyVecEnv([DictEnv] * NUM_ENVS)
    ours = make_sb3_vec_env(DictEnv, NUM_ENVS, monitor=False, horizon=8, **backend_options(backend, NUM_ENVS))
    try:
        ref.seed(0), ours.seed(0)
        ref.reset(), ours.reset()
        for env in (ref, ours):
            env.set_attr("speed", 3.0, indices=[0, 2])
            env.set_attr("speed", 0.5, indices=3)
        assert ours.get_attr("speed") == ref.get_attr("speed") == [3.0, 1.0, 3.0, 0.5]
        assert ours.get_attr("speed", indices=[3, 1]) == [0.5, 1.0]
        assert ours.get_attr("max_length", indices=np.array([2])) == [12]
        assert ours.env_method("get_wrapper_attr", "speed", indices=(2, 3)) == [3.0, 0.5]
        # a method with side effects runs on the chosen envs only: resetting env 1 leaves the others alone
        (obs_ref, info_ref), = ref.env_method("reset", seed=99, indices=[1])
        (obs, info), = ours.env_method("reset", seed=99, indices=[1])
        assert_same(obs_ref, obs, "env_method reset")
        assert info_ref == info
        # the new speeds act on the dynamics, and the envs not reset keep their episodes
        run_both(ref, ours, 40, seed=8, action_space=ref.action_space)
        assert ours.has_attr("speed") and not ours.has_attr("no_such_attribute")
        with pytest.raises(AttributeError):
            ours.get_attr("no_such_attribute", indices=[0])
        # after errors on some envs, every worker still answers the next call with its own reply
        assert ours.env_is_wrapped(Monitor) == [False] * NUM_ENVS
        assert ours.get_attr("speed", indices=[2, 0]) == [3.0, 3.0]
    finally:
        ref.close()
        ours.close()


def test_set_attr_reaches_the_env_under_wrappers():
    """``set_attr`` sets an attribute where it lives in the wrapper stack (gymnasium's set_wrapper_attr)."""
    env = make_sb3_vec_env("CartPole-v1", NUM_ENVS, backend="serial", horizon=8)
    try:
        env.set_attr("gravity", 2.0, indices=[1])
        assert env.get_attr("gravity") == [9.8, 2.0, 9.8, 9.8]
        assert env.env_method("get_wrapper_attr", "unwrapped", indices=1)[0].gravity == 2.0
        assert env.env_is_wrapped(Monitor) == [True] * NUM_ENVS
        assert env.env_is_wrapped(gymnasium.wrappers.TimeLimit, indices=[0, 3]) == [True, True]
        assert env.env_is_wrapped(gymnasium.wrappers.RecordEpisodeStatistics, indices=2) == [False]
    finally:
        env.close()


def test_rejects_what_it_cannot_wrap():
    next_step = segvec.make_vec("CartPole-v1", num_envs=2, backend="serial", horizon=8)
    try:
        with pytest.raises(ValueError, match="SAME_STEP"):
            SB3VecEnv(next_step)
    finally:
        next_step.close()
    with pytest.raises(TypeError, match="SegmentVecEnv"):
        SB3VecEnv(DummyVecEnv([cartpole]))
    with pytest.raises(ValueError, match="SAME_STEP"):
        make_sb3_vec_env("CartPole-v1", 2, backend="serial", autoreset_mode="NextStep")
    with pytest.raises(ValueError, match="env_kwargs"):
        make_sb3_vec_env(functools.partial(gymnasium.make, "CartPole-v1"), 2, backend="serial",
                         env_kwargs={"max_episode_steps": 5})


class FramedEnv(gymnasium.Env):
    """A one-step env that renders a 4x6 frame filled with its reset count."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode: str | None = "rgb_array"):
        self.render_mode = render_mode
        self.observation_space = gymnasium.spaces.Box(0.0, 1.0, (1,), np.float32)
        self.action_space = gymnasium.spaces.Discrete(2)
        self.resets = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.resets += 1
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 1.0, True, False, {}

    def render(self):
        return np.full((4, 6, 3), self.resets, np.uint8)


def test_render_and_images():
    env = make_sb3_vec_env(FramedEnv, 2, backend="serial", horizon=8)
    try:
        assert env.render_mode == "rgb_array"
        env.reset()
        env.env_method("reset", indices=1)
        images = env.get_images()
        assert [image.shape for image in images] == [(4, 6, 3)] * 2
        assert [int(image[0, 0, 0]) for image in images] == [1, 2]
        assert env.render(mode="rgb_array").shape == (8, 6, 3)  # tiled 2 x 1
    finally:
        env.close()
    quiet = make_sb3_vec_env(functools.partial(FramedEnv, render_mode=None), 2, backend="serial", horizon=8)
    try:
        with pytest.warns(UserWarning):
            assert quiet.get_images() == [None, None]
    finally:
        quiet.close()


def test_ppo_learns_through_sb3_vec_env():
    """A short PPO run end to end on the multiprocessing backend, then SB3's evaluate_policy."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP runs fastest on one thread
    env = make_sb3_vec_env("CartPole-v1", NUM_ENVS, **backend_options("multiprocessing", NUM_ENVS), horizon=32)
    try:
        model = PPO("MlpPolicy", env, n_steps=32, batch_size=64, n_epochs=1, seed=0, device="cpu")
        model.learn(total_timesteps=256)
        assert model.num_timesteps == 256
        assert len(model.ep_info_buffer) > 0  # Monitor's episode infos came through
        mean_return, _ = evaluate_policy(model, env, n_eval_episodes=2, warn=True)
        assert mean_return > 0
    finally:
        env.close()
        torch.set_num_threads(threads)
    env.close()  # idempotent


def test_segvec_imports_without_stable_baselines3():
    code = (
        "import sys; sys.modules['stable_baselines3'] = None\n"
        "import segvec, segvec.integrations\n"
        "try:\n"
        "    import segvec.integrations.sb3\n"
        "except ImportError as error:\n"
        "    assert 'pip install stable-baselines3' in str(error), error\n"
        "else:\n"
        "    raise SystemExit('segvec.integrations.sb3 imported without stable_baselines3')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
