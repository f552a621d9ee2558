"""Tests of segvec/integrations/sb3.py: `SB3VecEnv` behaves like SB3's own `DummyVecEnv`.

The reference is SB3's `DummyVecEnv` over the same envs, seeds and actions: observations, rewards, dones,
``terminal_observation``, ``TimeLimit.truncated``, every other info key and ``reset_infos`` must match step
for step.  Then SB3's VecEnv contract as DummyVecEnv keeps it: the per-index env access
(``env_method/get_attr/set_attr/env_is_wrapped``, negative indices, IndexError), ``set_attr`` on the outermost
wrapper, one action per env for Dict/Tuple action spaces, factories that return one env object refused,
``seed/render/close`` and SB3's VecEnv wrappers; the ``env_fns`` constructor through SB3's ``make_vec_env``;
and short PPO runs end to end.
"""
from __future__ import annotations

import functools
import multiprocessing
import subprocess
import sys

import gymnasium
import numpy as np
import pytest

pytest.importorskip("stable_baselines3", reason="stable-baselines3 is not installed (pip install -e .[sb3])")
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.monitor import Monitor  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack, VecNormalize  # noqa: E402

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


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_set_attr_sets_the_outermost_wrapper_like_sb3(backend):
    """``set_attr`` sets the attribute on the outermost wrapper, as SB3's VecEnvs do: ``get_attr`` then finds
    it there, and the env under the wrappers keeps its own; ``set_wrapper_attr`` reaches that one."""
    ref = DummyVecEnv([cartpole] * NUM_ENVS)
    ours = SB3VecEnv([cartpole] * NUM_ENVS, horizon=8, **backend_options(backend, NUM_ENVS))
    try:
        for env in (ref, ours):
            assert not env.has_attr("dummy")
            assert env.set_attr("gravity", 2.0, indices=[1]) is None
            env.set_attr("dummy", 12)
        assert ours.get_attr("gravity") == ref.get_attr("gravity") == [9.8, 2.0, 9.8, 9.8]
        assert ours.get_attr("dummy") == ref.get_attr("dummy") == [12] * NUM_ENVS and ours.has_attr("dummy")
        # the Monitor carries them; CartPole under it is unchanged
        assert [env.unwrapped.gravity for env in ref.envs] == [9.8] * NUM_ENVS
        assert [env.gravity for env in ours.env_method("get_wrapper_attr", "unwrapped")] == [9.8] * NUM_ENVS
        assert ours.env_method("__getattribute__", "gravity", indices=1) == [2.0]  # Monitor's own
        assert ours.env_method("set_wrapper_attr", "_max_episode_steps", 7, indices=[0]) == [True]
        assert ours.get_attr("_max_episode_steps") == [7, 30, 30, 30]  # TimeLimit's
        # keyword arguments reach the method whatever their names
        assert ours.env_method("get_wrapper_attr", name="dummy", indices=2) == [12]
        assert ours.env_method("set_wrapper_attr", name="gravity", value=3.0, indices=2) == [True]
        assert ours.env_method("get_wrapper_attr", "unwrapped", indices=2)[0].gravity == 3.0  # where it lives
    finally:
        ref.close()
        ours.close()


def indexed_env(index: int) -> gymnasium.Env:
    """A DictEnv whose ``max_length`` says which env it is, every other one under a Monitor."""
    env = DictEnv(max_length=10 + index)
    return Monitor(env) if index % 2 else env


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_indices_mean_what_they_mean_for_a_list(backend):
    """Negative indices count from the end, ranges and arrays work, and an index out of range raises
    IndexError before any env is touched: as with DummyVecEnv."""
    fns = [functools.partial(indexed_env, i) for i in range(NUM_ENVS)]
    ref = DummyVecEnv(fns)
    ours = SB3VecEnv(fns, horizon=8, **backend_options(backend, NUM_ENVS))
    try:
        for indices in (None, 2, -1, -NUM_ENVS, [0, -1], [-1, 0, -1], range(1, 3), range(-2, 0), (3, 1),
                        np.array([-3, 2]), []):
            assert ours.get_attr("max_length", indices) == ref.get_attr("max_length", indices), indices
            assert ours.env_method("get_wrapper_attr", "max_length", indices=indices) == \
                ref.env_method("get_wrapper_attr", "max_length", indices=indices), indices
            assert ours.env_is_wrapped(Monitor, indices) == ref.env_is_wrapped(Monitor, indices), indices
        assert ours.env_is_wrapped(Monitor) == [False, True, False, True]
        assert ours.get_attr("max_length", np.int64(-2)) == [12]  # a numpy integer is one index too
        for env in (ref, ours):
            env.set_attr("speed", 4.0, indices=-1)
            env.set_attr("speed", 2.0, indices=[0, -2])
        assert ours.get_attr("speed") == ref.get_attr("speed") == [2.0, 1.0, 2.0, 4.0]
        for bad in (NUM_ENVS, -NUM_ENVS - 1, [0, NUM_ENVS], [-NUM_ENVS - 1], range(NUM_ENVS + 1)):
            for env in (ref, ours):
                with pytest.raises(IndexError):
                    env.get_attr("speed", indices=bad)
                with pytest.raises(IndexError):
                    env.env_method("get_wrapper_attr", "speed", indices=bad)
                with pytest.raises(IndexError):
                    env.env_is_wrapped(Monitor, indices=bad)
                with pytest.raises(IndexError):
                    env.set_attr("speed", 9.0, indices=bad)
        assert ours.get_attr("speed") == [2.0, 1.0, 2.0, 4.0]  # the envs in range were not set either
        with pytest.raises(TypeError):
            ours.get_attr("speed", indices=[1.0])
    finally:
        ref.close()
        ours.close()


class EchoEnv(gymnasium.Env):
    """Observes the action it was given (observation space = action space); never ends."""

    def __init__(self, space: gymnasium.spaces.Space):
        self.observation_space = self.action_space = space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.action_space.seed(seed)
        return self.action_space.sample(), {}

    def step(self, action):
        return action, 0.0, False, False, {}


ECHO_SPACES = {
    "dict": gymnasium.spaces.Dict({"move": gymnasium.spaces.Discrete(3),
                                   "force": gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32),
                                   "grip": gymnasium.spaces.MultiBinary(2)}),
    # two parts for two envs: a list of two tuples could be either layout but for its leaves
    "tuple": gymnasium.spaces.Tuple((gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32),
                                     gymnasium.spaces.MultiDiscrete([2, 5]))),
}


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
@pytest.mark.parametrize("kind", sorted(ECHO_SPACES))
def test_step_async_takes_sb3_and_batched_actions_for_dict_and_tuple_spaces(backend, kind):
    """A list of one action per env (SB3's layout, what DummyVecEnv takes) and the batched layout (a dict or
    tuple of arrays) step the envs alike."""
    space, num_envs = ECHO_SPACES[kind], 2
    fns = [functools.partial(EchoEnv, space)] * num_envs
    ref = DummyVecEnv(fns)
    ours = SB3VecEnv(fns, horizon=8, **backend_options(backend, num_envs))
    try:
        space.seed(0)
        for env in (ref, ours):
            env.seed(1)
        assert_same(dict(enumerate(ref.reset())) if kind == "tuple" else ref.reset(),
                    dict(enumerate(ours.reset())) if kind == "tuple" else ours.reset(), "reset")
        for step in range(3):
            per_env = [space.sample() for _ in range(num_envs)]  # a list of dicts or of tuples
            obs_ref = ref.step(per_env)[0]
            obs, rewards, dones, infos = ours.step(per_env)
            if kind == "tuple":
                assert isinstance(obs, tuple)
                obs_ref, obs = dict(enumerate(obs_ref)), dict(enumerate(obs))
            assert_same(obs_ref, obs, f"step {step}, one action per env")
            if kind == "dict":
                batched = {key: np.stack([action[key] for action in per_env]) for key in space.spaces}
            else:
                batched = tuple(np.stack([action[i] for action in per_env]) for i in range(len(space.spaces)))
            again = ours.step(batched)[0]
            assert_same(obs, dict(enumerate(again)) if kind == "tuple" else again, f"step {step}, batched")
        with pytest.raises(ValueError):
            ours.step([space.sample()] * (num_envs + 1))  # one action too many, in either layout
    finally:
        ref.close()
        ours.close()


def test_step_async_stacks_nested_per_env_actions():
    """One action per env of a Tuple space nested in a Dict space, as SB3 would pass them."""
    space = gymnasium.spaces.Dict({"arm": gymnasium.spaces.Tuple((gymnasium.spaces.Discrete(4),
                                                                  gymnasium.spaces.MultiBinary(3))),
                                   "speed": gymnasium.spaces.Box(0.0, 1.0, (1,), np.float32)})
    env = SB3VecEnv([functools.partial(EchoEnv, space)] * 3, backend="serial", horizon=8)
    try:
        env.reset()
        space.seed(2)
        actions = [space.sample() for _ in range(3)]
        obs = env.step(actions)[0]
        assert obs["arm"][0].tolist() == [int(action["arm"][0]) for action in actions]
        np.testing.assert_array_equal(obs["arm"][1], np.stack([action["arm"][1] for action in actions]))
        np.testing.assert_array_equal(obs["speed"], np.stack([action["speed"] for action in actions]))
    finally:
        env.close()


def one_env_for_all(env: gymnasium.Env) -> gymnasium.Env:
    """The mistaken factory: returns the env it was given, the same object on every call."""
    return env


def test_factories_returning_one_env_object_are_refused():
    """Like DummyVecEnv, ValueError when the factories return one and the same env; wherever the envs live
    together (this process, or one worker process), and whether Monitor-wrapped or not."""
    shared = DictEnv()
    same = functools.partial(one_env_for_all, shared)
    with pytest.raises(ValueError):
        DummyVecEnv([same] * 3)
    children = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="same env object"):
        SB3VecEnv([same] * 3, backend="serial", horizon=8)
    with pytest.raises(ValueError, match="same env object"):
        SB3VecEnv([same] * 2, backend="multiprocessing", num_workers=1, horizon=8)
    with pytest.raises(ValueError, match="same env object"):
        make_vec_env(same, n_envs=2, vec_env_cls=SB3VecEnv, vec_env_kwargs={"backend": "serial", "horizon": 8})
    with pytest.raises(ValueError, match="same env object"):
        make_sb3_vec_env(same, 2, backend="serial", horizon=8)
    assert set(multiprocessing.active_children()) <= children  # what SB3VecEnv made, it closed
    given = segvec.make_vec([same] * 2, num_envs=2, backend="serial", horizon=8,
                            autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP)
    try:
        with pytest.raises(ValueError, match=r"envs \[0, 1\]"):
            SB3VecEnv(given)
        assert not given.closed  # what it was given stays the caller's
    finally:
        given.close()
    distinct = SB3VecEnv([DictEnv] * 2, backend="multiprocessing", num_workers=1, horizon=8)
    distinct.close()


def test_constructor_arguments():
    """Env factories with segvec options and start_method, or a SegmentVecEnv alone (also as ``vec_env=``)."""
    made = segvec.make_vec("CartPole-v1", num_envs=2, backend="serial", horizon=8,
                           autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP)
    try:
        with pytest.raises(TypeError, match="no other arguments"):
            SB3VecEnv(made, backend="serial")
        with pytest.raises(TypeError, match="no other arguments"):
            SB3VecEnv(made, "fork")
        env = SB3VecEnv(vec_env=made)
        assert env.vec_env is made and env.num_envs == 2
    finally:
        made.close()
    for wrong in ("CartPole-v1", [cartpole, "CartPole-v1"], None, 3, DummyVecEnv([cartpole])):
        with pytest.raises(TypeError):
            SB3VecEnv(wrong)
    with pytest.raises(ValueError, match="SAME_STEP"):
        SB3VecEnv([cartpole], backend="serial", autoreset_mode="next_step")
    with pytest.raises(ValueError, match="cannot find context for 'illegal_method'"):
        SB3VecEnv([cartpole], start_method="illegal_method")
    with pytest.raises(TypeError, match="start_method or context"):
        SB3VecEnv([cartpole], start_method="fork", context="fork")
    with pytest.raises(TypeError):
        SB3VecEnv([cartpole], backend="serial", no_such_option=1)
    env = SB3VecEnv([cartpole] * 2, backend="serial", horizon=8,
                    autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP)
    assert env.vec_env.backend_name == "serial" and env.vec_env.horizon == 8
    env.close()


def test_start_method_starts_the_workers():
    """``start_method`` is segvec's ``context``: here the workers are spawned (and import only gymnasium)."""
    env = SB3VecEnv([functools.partial(gymnasium.make, "CartPole-v1")] * 2, "spawn", num_workers=2, horizon=8)
    try:
        assert env.vec_env._backend.context.get_start_method() == "spawn"
        env.seed(0)
        assert env.reset().shape == (2, 4)
        assert env.step(np.array([0, 1]))[0].shape == (2, 4)
    finally:
        env.close()


def test_make_vec_env_with_sb3_vec_env_then_ppo_learns():
    """SB3's make_vec_env builds an SB3VecEnv (Monitor-wrapped envs, seeded) that starts where DummyVecEnv
    starts; PPO learns on it end to end."""
    torch = pytest.importorskip("torch")
    ref = make_vec_env("CartPole-v1", n_envs=NUM_ENVS, seed=3)
    env = make_vec_env("CartPole-v1", n_envs=NUM_ENVS, seed=3, vec_env_cls=SB3VecEnv,
                       vec_env_kwargs={"num_workers": 2, "horizon": 16})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert isinstance(env, SB3VecEnv) and env.vec_env.num_workers == 2
        assert env.env_is_wrapped(Monitor) == [True] * NUM_ENVS
        assert env.render_mode == "rgb_array"  # make_vec_env's default for ids
        assert_same(ref.reset(), env.reset(), "first reset")
        model = PPO("MlpPolicy", env, n_steps=32, batch_size=64, n_epochs=1, seed=0, device="cpu")
        model.learn(total_timesteps=256)
        assert model.num_timesteps == 256 and len(model.ep_info_buffer) > 0
    finally:
        torch.set_num_threads(threads)
        ref.close()
        env.close()


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_seed_render_wrappers_and_close_like_sb3(backend):
    """``seed`` returns the seeds of the next reset, ``render`` follows SB3's modes, SB3's VecEnv wrappers
    see the same envs as over DummyVecEnv, and ``close`` may be called twice."""
    fns = [functools.partial(FramedEnv, render_mode="rgb_array")] * 2
    ref = DummyVecEnv(fns)
    ours = SB3VecEnv(fns, horizon=8, **backend_options(backend, 2))
    try:
        assert ours.seed(5) == ref.seed(5) == [5, 6]
        seeds = ours.seed()
        assert len(seeds) == 2 and seeds[1] == seeds[0] + 1 and all(isinstance(s, int) for s in seeds)
        ours.reset(), ref.reset()
        assert ours.reset_infos == ref.reset_infos == [{}, {}]
        np.testing.assert_array_equal(ours.render(), ref.render(mode="rgb_array"))
        np.testing.assert_array_equal(ours.render(), ours.render(mode="rgb_array"))
        with pytest.warns(UserWarning):
            assert ours.render(mode="something_else") is None
    finally:
        ref.close()
        ours.close()
    ours.close()
    ref, ours = (VecNormalize(VecFrameStack(DummyVecEnv([cartpole] * 2), n_stack=2)),
                 VecNormalize(VecFrameStack(SB3VecEnv([cartpole] * 2, horizon=8, **backend_options(backend, 2)),
                                            n_stack=2)))
    try:
        ref.seed(4), ours.seed(4)
        assert_same(ref.reset(), ours.reset(), "reset")
        for step in range(40):
            actions = np.array([step % 2, (step // 3) % 2])
            for a, b in zip(ref.step(actions), ours.step(actions)):
                if isinstance(a, np.ndarray):
                    np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=f"step {step}")
        assert ours.env_is_wrapped(Monitor) == [True, True]
    finally:
        ref.close()
        ours.close()


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
