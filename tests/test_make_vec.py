"""`make_vec`'s `env`: a gymnasium id, an EnvSpec, factories; an env instance is refused with a clear message."""
from __future__ import annotations

import pickle

import gymnasium
import numpy as np
import pytest

import segvec
from segvec.vector import _as_env_fns


@pytest.mark.parametrize("kind", ["registry spec", "instance's spec"])
def test_an_env_spec_is_made_in_each_worker(kind, backend, make_envs):
    spec = gymnasium.spec("CartPole-v1") if kind == "registry spec" else gymnasium.make("CartPole-v1").spec
    envs = make_envs(spec, 2, backend, horizon=4, env_kwargs={"max_episode_steps": 3})
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 4) and envs.single_action_space == gymnasium.spaces.Discrete(2)
    for _ in range(3):
        _, _, terminated, truncated, _ = envs.step(np.zeros(2, np.int64))
    assert (terminated | truncated).all()  # env_kwargs reached gymnasium.make: episodes of at most 3 steps
    assert envs.call("spec")[0].id == "CartPole-v1"


def test_spec_factories_pickle():
    fn = _as_env_fns(gymnasium.spec("CartPole-v1"), 1, {"max_episode_steps": 5})[0]
    env = pickle.loads(pickle.dumps(fn))()
    assert env.spec.id == "CartPole-v1" and env.spec.max_episode_steps == 5
    env.close()


def test_an_env_instance_is_refused_with_what_to_pass_instead():
    env = gymnasium.make("CartPole-v1")
    for given in (env, [env, env]):
        with pytest.raises(TypeError, match=r"env instance.*callable.*id.*EnvSpec") as raised:
            segvec.make_vec(given, num_envs=2, backend="serial")
        assert "not iterable" not in str(raised.value)
    env.close()


def test_anything_else_names_what_is_accepted():
    with pytest.raises(TypeError, match=r"gymnasium id, a gymnasium EnvSpec, a callable.*got int"):
        segvec.make_vec(3, num_envs=2, backend="serial")
    with pytest.raises(ValueError, match="env_kwargs only applies to a gymnasium id or EnvSpec"):
        segvec.make_vec(lambda: gymnasium.make("CartPole-v1"), num_envs=2, backend="serial",
                        env_kwargs={"max_episode_steps": 3})
