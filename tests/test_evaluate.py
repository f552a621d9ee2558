"""`SegmentVecEnv.evaluate`: whole episodes on evaluation envs of their own, training rows untouched.

Training runs `CounterEnv`s (whose observations say ``(env, episode, step)``) through ``step()`` or the async
face with evaluations in between (on the async face also while actions are in flight); every row taken is
compared, slot for slot, with the plain sequential loop `envs.reference_slots` and with the same run without
evaluations.  Evaluation returns are compared with a plain loop over one env per evaluation env.
"""
from __future__ import annotations

import functools

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from hypothesis import given, settings
from hypothesis import strategies as st

import segvec
from conftest import backend_options
from envs import CounterEnv, counter_fns, policy, reference_slots, value_of
from fault_envs import EnvBoom, make_fault_env

E, HORIZON, SEED, STEPS = 4, 5, 3, 23


def reference_episodes(num_episodes: int, num_envs: int, seed: int | None, max_length: int = 9,
                       calls: int = 1) -> dict:
    """The plain loop: evaluation env i (a `CounterEnv` with index i % E), reset with ``seed + i``, runs
    ``(num_episodes + i) // num_envs`` whole episodes of `policy`; `calls` times over the same envs (a
    `CounterEnv` counts its episodes across resets), the episodes of the last call."""
    envs = [CounterEnv(index=i % E, max_length=max_length) for i in range(num_envs)]
    for _ in range(calls):
        returns, lengths, owners = [], [], []
        for i, env in enumerate(envs):
            obs = env.reset(seed=seed + i)[0]
            for episode in range((num_episodes + i) // num_envs):
                total, length, done = 0.0, 0, False
                while not done:
                    obs, reward, terminated, truncated, _ = env.step(int(policy(obs)))
                    total, length, done = total + reward, length + 1, terminated or truncated
                returns.append(total)
                lengths.append(length)
                owners.append(i)
                if episode + 1 < (num_episodes + i) // num_envs:
                    obs = env.reset()[0]
    return {"return": np.array(returns), "length": np.array(lengths), "env_index": np.array(owners)}


def train(backend: str, face: str, evaluate_at=(), num_episodes: int = 5):
    """Runs `STEPS` steps of every env (policy `policy`, values `value_of`), taking every complete row after
    each step; at the steps in `evaluate_at` it evaluates (async face: after the send, with the actions in
    flight).  Flushes at the end and takes the rest.  Returns the rows taken (dicts of copies, in take
    order) and the evaluation results."""
    envs = segvec.make_vec(counter_fns(E), num_envs=E, horizon=HORIZON, num_segments=3 * E,
                           autoreset_mode=AutoresetMode.NEXT_STEP, **backend_options(backend, E))
    rows, results = [], []

    def take():
        with envs.take_segments() as batch:
            for i in range(len(batch)):
                length = int(batch.length[i])
                rows.append(dict(env=int(batch.env_id[i]), start=int(batch.start_step[i]), length=length,
                                 obs=batch.obs[i, :length + 1].copy(), action=batch.action[i, :length].copy(),
                                 reward=batch.reward[i, :length].copy(), mask=batch.mask[i, :length].copy(),
                                 terminated=batch.terminated[i, :length].copy(),
                                 truncated=batch.truncated[i, :length].copy(),
                                 next_value=batch.next_value[i, :length].copy()))

    def evaluate():
        results.append(envs.evaluate(policy, num_episodes=num_episodes, num_envs=3, seed=100))

    try:
        if face == "step":
            obs, _ = envs.reset(seed=SEED)
            for step in range(STEPS):
                if step in evaluate_at:
                    evaluate()
                obs = envs.step(policy(obs), value=value_of(obs))[0]
                take()
        else:
            envs.async_reset(seed=SEED)
            for step in range(STEPS + 1):
                obs, _, _, _, infos = envs.recv(timeout=30)
                if step == STEPS:
                    envs.send(policy(obs), infos["env_id"], value=value_of(obs))  # the tails' bootstraps
                    envs.flush(timeout=30)
                    break
                envs.send(policy(obs), infos["env_id"], value=value_of(obs))
                if step in evaluate_at:
                    evaluate()
                take()
        if face == "step":
            envs.step(policy(obs), value=value_of(obs))  # the tails' bootstraps, then close the rows
            envs.flush(timeout=30)
        take()
    finally:
        envs.close()
    return rows, results


@pytest.mark.parametrize("face", ["step", "async"])
def test_training_rows_chain_through_evaluations_as_the_sequential_loop(backend, face):
    with_eval, results = train(backend, face, evaluate_at=(0, 4, 5, 11, 17))
    without, _ = train(backend, face)
    assert len(results) == 5
    # Evaluations change nothing the learner takes: same rows, same order, same contents.
    assert len(with_eval) == len(without)
    for a, b in zip(with_eval, without):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # And the rows are the plain loop's slots: no gap, no duplicate, no evaluation step.
    slots_total = STEPS + 1
    for env in range(E):
        mine = sorted((r for r in with_eval if r["env"] == env), key=lambda r: r["start"])
        starts = [r["start"] for r in mine]
        assert starts == list(np.cumsum([0] + [r["length"] for r in mine])[:-1]), starts  # chain, no gap
        assert sum(r["length"] for r in mine) == slots_total
        ref = reference_slots(env, [(SEED + env, slots_total)], "NextStep")[0]
        obs = np.concatenate([r["obs"][:-1] for r in mine])
        np.testing.assert_array_equal(obs, ref.obs)
        assert (obs[:, 0] == env).all()  # every observation is this training env's own
        real = np.concatenate([r["mask"] for r in mine])
        np.testing.assert_array_equal(real, ref.real)
        np.testing.assert_array_equal(np.concatenate([r["action"] for r in mine])[real], ref.action[real])
        np.testing.assert_allclose(np.concatenate([r["reward"] for r in mine]), ref.reward, rtol=1e-6)
        np.testing.assert_array_equal(np.concatenate([r["terminated"] for r in mine]), ref.terminated)
        np.testing.assert_array_equal(np.concatenate([r["truncated"] for r in mine]), ref.truncated)
        for before, after in zip(mine, mine[1:]):  # obs[horizon] of a row is obs[0] of the next
            np.testing.assert_array_equal(before["obs"][-1], after["obs"][0])
        # bootstraps of the ends of rows: the value of the next observation (or 0 where terminated)
        for r in mine[:-1]:
            last = r["length"] - 1
            expected = 0.0 if r["terminated"][last] else value_of(r["obs"][-1])
            assert r["next_value"][last] == pytest.approx(expected, rel=1e-6)
    for calls, result in enumerate(results, 1):  # the same envs, reset with the same seed each time
        expected = reference_episodes(5, 3, 100, calls=calls)
        np.testing.assert_allclose(result["return"], expected["return"], rtol=1e-12)
        np.testing.assert_array_equal(result["length"], expected["length"])
        np.testing.assert_array_equal(result["env_index"], expected["env_index"])


@pytest.mark.parametrize("num_episodes, num_envs", [(1, 1), (7, 3), (10, 4), (3, 5)])
def test_returns_match_the_plain_loop_and_every_env_owes_its_share(make_envs, backend, num_episodes, num_envs):
    envs = make_envs(counter_fns(E), E, backend, horizon=HORIZON)
    result = envs.evaluate(policy, num_episodes=num_episodes, num_envs=num_envs, seed=7)
    expected = reference_episodes(num_episodes, num_envs, 7)
    assert result["return"].dtype == np.float64 and result["length"].dtype == np.int64
    np.testing.assert_allclose(result["return"], expected["return"], rtol=1e-12)
    np.testing.assert_array_equal(result["length"], expected["length"])
    np.testing.assert_array_equal(result["env_index"], expected["env_index"])
    counts = np.bincount(result["env_index"], minlength=num_envs)
    assert counts.tolist() == [(num_episodes + i) // num_envs for i in range(num_envs)]
    # The evaluation envs are kept: a second call resets them with the same seeds.
    again = envs.evaluate(policy, num_episodes=num_episodes, num_envs=num_envs, seed=7)
    np.testing.assert_allclose(again["return"], reference_episodes(num_episodes, num_envs, 7, calls=2)["return"],
                               rtol=1e-12)
    unseeded = envs.evaluate(policy, num_episodes=num_episodes, num_envs=num_envs)
    assert len(unseeded["return"]) == num_episodes


@settings(max_examples=30, deadline=None)
@given(num_episodes=st.integers(1, 12), num_envs=st.integers(1, 6), seed=st.integers(0, 1000),
       max_length=st.integers(1, 9))
def test_any_split_of_episodes_matches_the_plain_loop(num_episodes, num_envs, seed, max_length):
    envs = segvec.make_vec(counter_fns(E, max_length), num_envs=E, backend="serial", horizon=HORIZON)
    try:
        result = envs.evaluate(policy, num_episodes=num_episodes, num_envs=num_envs, seed=seed)
    finally:
        envs.close()
    expected = reference_episodes(num_episodes, num_envs, seed, max_length)
    np.testing.assert_allclose(result["return"], expected["return"], rtol=1e-12)
    np.testing.assert_array_equal(result["length"], expected["length"])
    np.testing.assert_array_equal(result["env_index"], expected["env_index"])


def test_evaluation_is_not_biased_toward_short_episodes(make_envs):
    """Env 0 has 1-step episodes, env 1 has 9-step ones: each contributes its share, not whoever ends first."""
    fns = [functools.partial(CounterEnv, index=0, max_length=1), functools.partial(LongCounterEnv, index=1)]
    envs = make_envs(fns, 2, "serial", horizon=HORIZON)
    result = envs.evaluate(policy, num_episodes=6, seed=0)
    assert np.bincount(result["env_index"]).tolist() == [3, 3]
    assert (result["length"][result["env_index"] == 0] == 1).all()
    assert (result["length"][result["env_index"] == 1] == 9).all()


class LongCounterEnv(CounterEnv):
    """A `CounterEnv` whose episodes are always 9 steps long and end truncated."""

    def step(self, action):
        obs, reward, _, _, info = super().step(action)
        return obs, reward, False, self._t >= 9, info


def test_policy_may_return_a_tuple_of_torch_tensors(make_envs):
    torch = pytest.importorskip("torch")

    def torch_policy(obs):
        actions = torch.as_tensor(policy(obs))
        return actions, torch.zeros(len(obs)), torch.zeros(len(obs))

    envs = make_envs(counter_fns(E), E, "serial", horizon=HORIZON)
    result = envs.evaluate(torch_policy, num_episodes=4, num_envs=2, seed=1)
    np.testing.assert_allclose(result["return"], reference_episodes(4, 2, 1)["return"], rtol=1e-12)


def test_structured_observations_are_batched(make_envs):
    from envs import DictEnv

    seen = []

    def dict_policy(obs):
        seen.append({key: value.shape for key, value in obs.items()})
        return np.ones(len(obs["count"]), np.int64)

    envs = make_envs(DictEnv, 2, "serial", horizon=HORIZON)
    result = envs.evaluate(dict_policy, num_episodes=3, seed=0)
    assert len(result["return"]) == 3
    assert seen[0] == {"position": (2, 3), "count": (2,), "flags": (2, 2)}


def test_envs_written_in_c(make_envs):
    envs = make_envs("segvec/CartPole-c", 4, "serial", horizon=HORIZON)
    result = envs.evaluate(lambda obs: (obs[:, 2] > 0).astype(np.int64), num_episodes=4, num_envs=2,
                           seed=0)
    reference = gymnasium.make("segvec/CartPole-c")
    for i in range(2):  # evaluation env i: seed 0 + i, two episodes
        obs = reference.reset(seed=i)[0]
        for episode in range(2):
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = reference.step(int(obs[2] > 0))
                total, done = total + reward, terminated or truncated
            assert result["return"][2 * i + episode] == total
            obs = reference.reset()[0]


def test_a_vector_env_over_an_engine_needs_env_fn():
    engine = gymnasium.vector.SyncVectorEnv([functools.partial(CounterEnv, index=i) for i in range(2)])
    envs = segvec.wrap_vector_env(engine, horizon=HORIZON)
    try:
        with pytest.raises(ValueError, match="env_fn="):
            envs.evaluate(policy, num_episodes=2)
        result = envs.evaluate(policy, num_episodes=3, seed=7, env_fn=functools.partial(CounterEnv, index=0))
        expected = reference_episodes(3, 2, 7)  # both evaluation envs are index 0's: compare env 0's episodes
        np.testing.assert_allclose(result["return"][result["env_index"] == 0],
                                   expected["return"][expected["env_index"] == 0], rtol=1e-12)
    finally:
        envs.close()


def test_bad_input_errors_and_close(make_envs, backend):
    envs = make_envs(counter_fns(E), E, backend, horizon=HORIZON)
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="num_episodes"):
            envs.evaluate(policy, num_episodes=bad)
    with pytest.raises(ValueError, match="num_envs"):
        envs.evaluate(policy, num_envs=0)
    with pytest.raises(TypeError, match="env_fn"):
        envs.evaluate(policy, env_fn=CounterEnv())
    with pytest.raises(ValueError, match="one action per observation"):
        envs.evaluate(lambda obs: policy(obs)[:1], num_episodes=4, num_envs=2)
    with pytest.raises(RuntimeError, match="max_steps"):
        envs.evaluate(policy, num_episodes=50, max_steps=10)
    envs.close()
    envs.close()
    with pytest.raises(segvec.ClosedEnvironmentError):
        envs.evaluate(policy)


def test_an_evaluation_env_that_raises_is_named(make_envs):
    envs = make_envs([functools.partial(make_fault_env, i) for i in range(2)], 2, "serial", horizon=HORIZON)
    broken = functools.partial(make_fault_env, 0, fault="step", at_step=3)
    with pytest.raises(EnvBoom) as caught:
        envs.evaluate(lambda obs: np.zeros(len(obs), np.int64), num_episodes=2, env_fn=broken)
    assert isinstance(caught.value, segvec.EnvError)
    assert "evaluation env 0 raised in step" in str(caught.value) and "fails at step" in str(caught.value)
    obs, _ = envs.reset(seed=0)  # training is not hurt
    envs.step(np.zeros(2, np.int64))


def test_episode_start_tells_a_recurrent_policy_where_episodes_begin(make_envs):
    calls = []

    def recurrent_policy(obs, episode_start):
        assert episode_start.shape == (3,) and episode_start.dtype == bool
        np.testing.assert_array_equal(episode_start, obs[:, 2] == 0)  # CounterEnv: obs[2] is the step in episode
        calls.append(episode_start)
        return policy(obs)

    envs = make_envs(counter_fns(E), E, "serial", horizon=HORIZON)
    result = envs.evaluate(recurrent_policy, num_episodes=8, num_envs=3, seed=5, episode_start=True)
    np.testing.assert_allclose(result["return"], reference_episodes(8, 3, 5)["return"], rtol=1e-12)
    assert calls[0].all() and sum(int(c.sum()) for c in calls) == 8  # each episode's first step, once
