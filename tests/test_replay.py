"""`SegmentReplay`: FIFO eviction, sampling frequencies that follow priorities, importance weights, rows that
never alias the live segment buffer, and mixes of fresh and replayed rows -- against plain numpy references."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import segvec
from envs import counter_fns, policy, reference_gae, value_of
from segvec.replay import ReplayBatch, SumTree

T = 4


def rows(first_id: int, n: int) -> ReplayBatch:
    """`n` synthetic rows whose every field says which row they are (``mark = first_id + i``)."""
    ids = np.arange(first_id, first_id + n)
    fields = dict(
        obs={"x": np.repeat(ids[:, None], T + 1, 1).astype(np.float32), "y": (ids % 7).astype(np.int64)},
        reward=np.repeat(ids[:, None], T, 1).astype(np.float32), mark=ids.astype(np.int64))
    return ReplayBatch(fields, np.full(n, -1, np.int64), np.ones(n, np.float32), np.zeros(n, bool))


def test_sum_tree_against_prefix_sums():
    rng = np.random.default_rng(0)
    for capacity in (1, 2, 3, 5, 16, 100):
        tree, values = SumTree(capacity), np.zeros(capacity)
        for _ in range(5):
            index = rng.integers(0, capacity, rng.integers(1, capacity + 1))
            new = rng.random(len(index)) * (rng.random(len(index)) < 0.8)  # some zeros
            tree.set(index, new)
            for i, v in zip(index, new):  # (the last value of a repeated index wins)
                values[i] = v
            assert tree.total == pytest.approx(values.sum(), rel=1e-12)
            if values.sum() == 0:
                continue
            targets = rng.random(200) * values.sum()
            found = tree.find(targets)
            expected = np.searchsorted(np.cumsum(values), targets, side="right")
            np.testing.assert_array_equal(found, expected)
            assert (values[found] > 0).all()


def test_eviction_is_first_in_first_out():
    replay = segvec.SegmentReplay(capacity=5, seed=0)
    assert replay.add(rows(0, 3)).tolist() == [0, 1, 2]
    assert replay.add(rows(3, 4)).tolist() == [3, 4, 5, 6]  # evicts rows 0 and 1
    assert len(replay) == 5 and replay.added == 7
    drawn = replay.sample(400)
    assert set(drawn.mark.tolist()) == {2, 3, 4, 5, 6}
    np.testing.assert_array_equal(drawn.row_ids, drawn.mark)  # every id names its own row
    np.testing.assert_array_equal(drawn.reward, np.repeat(drawn.mark[:, None], T, 1))
    np.testing.assert_array_equal(drawn.obs["y"], drawn.mark % 7)
    assert replay.add(rows(7, 8)).tolist() == list(range(7, 15))  # more than the capacity: the last 5 stay
    assert set(replay.sample(400).mark.tolist()) == {10, 11, 12, 13, 14}


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 9), sizes=st.lists(st.integers(0, 12), min_size=1, max_size=8),
       prioritized=st.booleans())
def test_the_replay_holds_the_last_capacity_rows(capacity, sizes, prioritized):
    replay = segvec.SegmentReplay(capacity=capacity, prioritized=prioritized, seed=1)
    added = 0
    for n in sizes:
        ids = replay.add(rows(added, n), priority=np.arange(n) + 1.0 if prioritized else None)
        assert ids.tolist() == list(range(added, added + n))
        added += n
    assert len(replay) == min(added, capacity)
    if added:
        drawn = replay.sample(50)
        np.testing.assert_array_equal(drawn.row_ids, drawn.mark)
        assert drawn.mark.min() >= added - capacity and drawn.mark.max() < added
        assert replay.probabilities().sum() == pytest.approx(1.0)


def test_sampling_frequencies_follow_priorities():
    stats = pytest.importorskip("scipy.stats")
    alpha = 0.7
    replay = segvec.SegmentReplay(capacity=12, prioritized=True, alpha=alpha, eps=0.0, seed=123)
    priority = np.array([0.5, 1, 2, 4, 8, 0.25, 3, 1, 5, 2, 0.1, 6.0])
    replay.add(rows(0, 12), priority=priority)
    draws = np.concatenate([replay.sample(1000).mark for _ in range(40)])
    expected = priority ** alpha / (priority ** alpha).sum()
    np.testing.assert_allclose(replay.probabilities(), expected, rtol=1e-12)
    observed = np.bincount(draws, minlength=12)
    _, p_value = stats.chisquare(observed, expected * len(draws))
    assert p_value > 1e-3, (observed, expected * len(draws))
    # after an update the frequencies follow the new priorities
    priority[[0, 4]] = [10.0, 0.1]
    replay.update_priorities([0, 4], [10.0, 0.1])
    draws = np.concatenate([replay.sample(1000).mark for _ in range(40)])
    expected = priority ** alpha / (priority ** alpha).sum()
    _, p_value = stats.chisquare(np.bincount(draws, minlength=12), expected * len(draws))
    assert p_value > 1e-3


def test_uniform_sampling_frequencies():
    stats = pytest.importorskip("scipy.stats")
    replay = segvec.SegmentReplay(capacity=8, seed=7)
    replay.add(rows(0, 8))
    sample = replay.sample(20000)
    assert (sample.weights == 1).all() and sample.replayed.all()
    _, p_value = stats.chisquare(np.bincount(sample.mark, minlength=8))
    assert p_value > 1e-3


def test_importance_weights_against_numpy():
    alpha, beta, eps = 0.6, 0.4, 1e-3
    replay = segvec.SegmentReplay(capacity=6, prioritized=True, alpha=alpha, beta=beta, eps=eps, seed=3)
    replay.add(rows(0, 4), priority=[1.0, 2.0, 0.0, 4.0])
    replay.add(rows(4, 4), priority=[3.0, 0.5, 7.0, 1.5])  # evicts rows 0 and 1
    replay.update_priorities([2, 7, 0], [2.5, 0.2, 100.0])  # row 0 was evicted: skipped
    priority = {2: 2.5, 3: 4.0, 4: 3.0, 5: 0.5, 6: 7.0, 7: 0.2}
    scaled = {i: (p + eps) ** alpha for i, p in priority.items()}
    total = sum(scaled.values())
    size = len(priority)
    w_max = (size * min(scaled.values()) / total) ** -beta
    drawn = replay.sample(64)
    expected = np.array([(size * scaled[i] / total) ** -beta / w_max for i in drawn.mark.tolist()])
    np.testing.assert_allclose(drawn.weights, expected, rtol=1e-6)
    assert drawn.weights.max() <= 1.0
    # new rows get the largest priority seen so far (here 7.0, from add: the evicted row's 100 never counted)
    replay.add(rows(8, 1))
    assert replay.probabilities()[8 % 6] == pytest.approx((7.0 + eps) ** alpha / (total - scaled[2]
                                                                                  + (7.0 + eps) ** alpha))


def run_rows(envs, obs, steps: int):
    for _ in range(steps):
        obs = envs.step(policy(obs), value=value_of(obs), logprob=np.full(len(obs), -1.0, np.float32))[0]
    return obs


def test_a_replayed_row_never_aliases_the_segment_buffer(make_envs, backend):
    envs = make_envs(counter_fns(4), 4, backend, horizon=T, num_segments=8)
    obs = run_rows(envs, envs.reset(seed=0)[0], T + 1)
    replay = segvec.SegmentReplay(capacity=4, seed=0)
    batch = envs.take_segments(4)
    assert batch.zero_copy  # the batch's fields are views of shared memory
    kept = {name: np.array(getattr(batch, name)) for name in ("obs", "action", "reward", "value", "logprob",
                                                              "next_value", "policy_version", "env_id")}
    replay.add(batch)
    batch.reward[:] = 1234.0  # the learner scribbles on the live rows...
    batch.obs[:] = -1.0
    batch.release()
    run_rows(envs, obs, 4 * T)  # ...and the envs recycle them
    assert envs.stats()["segments_recycled"] > 0
    drawn = replay.sample(200)
    order = np.argsort(kept["env_id"])
    for name, value in kept.items():
        by_env = value[order][drawn.env_id]  # each drawn row against the copy of that env's row
        np.testing.assert_array_equal(getattr(drawn, name), by_env, err_msg=name)
    drawn.reward[:] = 0.0  # a sample is the caller's own: the replay is not changed
    assert (replay.sample(50).reward != 0).any()


def test_replayed_rows_give_the_batch_gae_and_vtrace_corrects_them(make_envs):
    envs = make_envs(counter_fns(4), 4, "serial", horizon=T)
    run_rows(envs, envs.reset(seed=1)[0], 3 * T + 1)
    replay = segvec.SegmentReplay(capacity=16, seed=0)
    with envs.take_segments() as batch:
        replay.add(batch)
        expected = segvec.gae(batch, 0.97, 0.9)
        n = len(batch)
    drawn = replay.sample(n)
    order = drawn.row_ids
    assert drawn.policy_version.shape == drawn.logprob.shape == (n, T)
    adv, ret = segvec.gae(drawn, 0.97, 0.9)
    np.testing.assert_allclose(adv, expected[0][order], rtol=1e-5, atol=1e-6)
    target = drawn.logprob + np.random.default_rng(0).normal(0, 0.5, drawn.logprob.shape).astype(np.float32)
    adv, _ = segvec.gae(drawn, 0.97, 0.9, rho_clip=1.0, c_clip=1.0, target_logprob=target)
    ref_adv, _ = reference_gae(drawn, 0.97, 0.9, rho=np.minimum(1.0, np.exp(target - drawn.logprob)),
                               c=np.minimum(1.0, np.exp(target - drawn.logprob)))
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-4, atol=1e-5)


def test_mix_of_fresh_and_replayed_rows(make_envs):
    envs = make_envs(counter_fns(4), 4, "serial", horizon=T)
    obs = envs.reset(seed=2)[0]
    replay = segvec.SegmentReplay(capacity=32, prioritized=True, seed=0)
    for update in range(3):
        obs = run_rows(envs, obs, T + (update == 0))
        with envs.take_segments(4) as batch:
            mixed = replay.mix(batch, replay_ratio=0.25)
            fresh_reward = np.array(batch.reward)
            replay.add(batch, priority=np.arange(4) + 1.0)
        k = 0 if update == 0 else 1  # round(4 * 0.25 / 0.75) replayed rows once the replay has some
        assert len(mixed) == 4 + k and mixed.replayed.tolist() == [False] * 4 + [True] * k
        np.testing.assert_array_equal(mixed.reward[:4], fresh_reward)
        assert (mixed.row_ids[:4] == -1).all() and (mixed.weights[:4] == 1).all()
        assert (mixed.row_ids[4:] >= 0).all() and (mixed.row_ids[4:] < 4 * update).all()
        assert mixed.obs.shape == (4 + k, T + 1, 4)
    torch = pytest.importorskip("torch")
    tensors = mixed.to_torch()
    assert isinstance(tensors.obs, torch.Tensor) and tensors.weights.shape == (5,) and tensors.replayed.dtype == \
        torch.bool


def test_bad_input(make_envs):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="capacity"):
            segvec.SegmentReplay(capacity=bad)
    with pytest.raises(ValueError, match="alpha"):
        segvec.SegmentReplay(capacity=4, alpha=-1)
    replay = segvec.SegmentReplay(capacity=4, prioritized=True)
    with pytest.raises(ValueError, match="empty"):
        replay.sample(1)
    replay.add(rows(0, 2))
    with pytest.raises(ValueError, match="expected 2 priorities"):
        replay.add(rows(2, 2), priority=[1.0])
    with pytest.raises(ValueError, match=">= 0"):
        replay.add(rows(2, 2), priority=[1.0, -1.0])
    with pytest.raises(ValueError, match="row ids"):
        replay.update_priorities([5], [1.0])
    with pytest.raises(ValueError, match="n must be"):
        replay.sample(-1)
    with pytest.raises(ValueError, match="replay_ratio"):
        replay.mix(rows(2, 2), 1.0)
    other = ReplayBatch({"reward": np.zeros((1, T), np.float64)}, np.zeros(1, np.int64), np.ones(1, np.float32),
                        np.ones(1, bool))
    with pytest.raises(ValueError, match="differ"):
        replay.add(other)
    envs = make_envs(counter_fns(2), 2, "serial", horizon=T, autoreset_mode="SameStep")
    obs = run_rows(envs, envs.reset(seed=0)[0], 6 * T)
    with envs.take_segments() as batch:
        if len(batch.final_obs[1]):
            with pytest.raises(ValueError, match="set_truncation_values"):
                segvec.SegmentReplay(capacity=8).add(batch)
            batch.set_truncation_values(value_of(batch.final_obs[0]))
        segvec.SegmentReplay(capacity=8).add(batch)
