"""The hand-off of taken rows: lazy fields, selections of rows (`rows_view`, `minibatches`) and ``to_torch``
copies run by run, against the batch as a plain gather of its rows would build it.

The reference (`gathered`) is the batch built the simplest way: every field a fancy-index gather of the
block's arrays at the batch's rows, made at take time, and ``next_value`` computed in Python from the rules
of docs/api.md (not by the C core).  The driver takes and releases batches in hypothesis-chosen orders, and
holds them while the envs step on, so that taken rows are often not adjacent in the buffer and the lazy
fields are read long after the take.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import segvec
from conftest import backend_options
from envs import DictEnv, TextEnv, counter_fns
from segvec._core import Geometry, Storage
from segvec.segments import SegmentRows

torch = pytest.importorskip("torch")
import segvec.torch_utils as torch_utils  # noqa: E402


@pytest.fixture(autouse=True)
def expected_warnings():
    """The drivers lose rows to recycling while they hold batches, and send no value now and then (GAE warns)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="segvec: complete segments were recycled")
        warnings.filterwarnings("ignore", message="segvec: gae: value is NaN")
        yield


NEXT, SAME = AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP
STEP_FIELDS = {"seen": ((2,), np.float32)}
SEGMENT_FIELDS = {"first": ((3,), np.int16)}


# ---- the reference ----------------------------------------------------------------------------------
def reference_next_value(storage, rows, same_step: bool) -> np.ndarray:
    """next_value by the documented rules, slot by slot in Python."""
    T = storage.geometry.horizon
    out = np.zeros((len(rows), T), np.float32)
    for i, r in enumerate(np.asarray(rows).tolist()):
        length = int(storage.row_length[r])
        for t in range(min(length, T)):
            tv = storage.truncation_value[r, t]
            if storage.terminated[r, t]:
                out[i, t] = 0.0
            elif storage.truncated[r, t] and (same_step or not np.isnan(tv)):
                out[i, t] = tv
            elif t == length - 1:
                out[i, t] = storage.tail_value[r]
            else:
                out[i, t] = storage.value[r, t + 1]
    return out


def gathered(envs, batch) -> dict:
    """Every field of `batch` as a plain gather of the block at its rows (copies), made now."""
    storage, rows = envs._storage, np.asarray(batch.rows)
    objects = storage.objects

    def tree(leaves, object_leaves, layout):
        return layout.structure([leaf[rows] for leaf in leaves], [leaf[rows] for leaf in object_leaves])

    ref = {
        "obs": tree(storage.obs, objects.obs if objects else [], storage.obs_layout),
        "action": tree(storage.action, objects.action if objects else [], storage.action_layout),
    }
    for name in ("value", "logprob", "reward", "terminated", "truncated", "episode_start", "mask", "policy_version"):
        ref[name] = getattr(storage, name)[rows]
    ref["length"], ref["env_id"] = storage.row_length[rows], storage.row_env_id[rows]
    ref["start_step"] = storage.row_start_step[rows]
    for name, array in {**storage.step_fields, **storage.segment_fields}.items():
        ref[name] = array[rows]
    ref["next_value"] = reference_next_value(storage, rows, envs.autoreset_mode == SAME)
    observations, positions = batch.final_obs
    ref["final_obs"] = (_copy(observations), positions.copy())
    return ref


def _copy(value):
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_copy(item) for item in value)
    return np.array(value, copy=True)


def _index(value, index):
    if isinstance(value, dict):
        return {key: _index(item, index) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_index(item, index) for item in value)
    return value[index]


def assert_same(got, want, what: str) -> None:
    """Equal values, shapes and dtypes (NaN equals NaN), through dicts and tuples; tensors as arrays."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), what
        for key in want:
            assert_same(got[key], want[key], f"{what}[{key!r}]")
        return
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{what}[{i}]")
        return
    if isinstance(got, torch.Tensor):
        got = got.cpu().numpy()
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.dtype == object:
        assert got.dtype == object and got.tolist() == want.tolist(), what
        return
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    np.testing.assert_array_equal(got, want, err_msg=what)


def selected(ref: dict, index: np.ndarray) -> dict:
    """The reference of the rows at `index` of a batch: fields indexed, final_obs filtered and renumbered."""
    out = {name: _index(value, index) for name, value in ref.items() if name != "final_obs"}
    observations, positions = ref["final_obs"]
    pairs = [(j, k) for j, i in enumerate(index.tolist()) for k in range(len(positions)) if positions[k, 0] == i]
    ks = np.array([k for _, k in pairs], np.int64)
    out["final_obs"] = (_index(observations, ks),
                        np.array([(j, positions[k, 1]) for j, k in pairs], np.int64).reshape(-1, 2))
    return out


def in_block(tensor, storage) -> bool:
    return storage.address <= tensor.data_ptr() < storage.address + storage.nbytes


# ---- the checks -------------------------------------------------------------------------------------
def check_rows(rows, ref: dict, storage, data) -> None:
    """Every path of `rows` (a batch or a selection) gives the reference: lazy fields (read in a drawn
    order, some only through to_torch), CPU tensors, run-by-run copies, and a meta-device conversion."""
    names = rows.fields()
    assert names[:2] == ["obs", "action"] and "next_value" in names
    first = data.draw(st.sampled_from(["fields", "to_torch", "copy"]), label="first access")
    if first != "fields":
        tensors = rows.to_torch(copy=first == "copy")
        for name in names:
            assert_same(getattr(tensors, name), ref[name], f"to_torch().{name} first")
    for name in data.draw(st.permutations(names), label="field order"):
        assert_same(getattr(rows, name), ref[name], name)
    assert_same(rows.final_obs, ref["final_obs"], "final_obs")
    assert_same(rows.numpy(), ref, "numpy()")
    tensors = rows.to_torch()
    for name in names:
        assert_same(getattr(tensors, name), ref[name], f"to_torch().{name}")
    assert_same(tensors.final_obs, ref["final_obs"], "to_torch().final_obs")
    assert tensors.rows.tolist() == np.asarray(rows.rows).tolist()
    if rows.zero_copy:
        assert all(in_block(getattr(tensors, name), storage) for name in ("reward", "next_value", "mask"))
    # Run by run (as for CUDA), into fresh CPU tensors: every field copied per run, and small fields gathered.
    for threshold in (0, 1 << 40):
        saved = torch_utils.RUN_COPY_MIN_BYTES
        torch_utils.RUN_COPY_MIN_BYTES = threshold
        try:
            copied = rows.to_torch(copy=True)
        finally:
            torch_utils.RUN_COPY_MIN_BYTES = saved
        for name in names:
            tensor = getattr(copied, name)
            assert_same(tensor, ref[name], f"to_torch(copy=True).{name} (threshold {threshold})")
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                assert not in_block(tensor, storage), f"{name} was not copied"
        assert_same(copied.final_obs, ref["final_obs"], "to_torch(copy=True).final_obs")
    subset = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True), label="fields")
    some = rows.to_torch(copy=data.draw(st.booleans()), fields=subset)
    assert set(vars(some)) == set(subset) | {"rows"}
    for name in subset:
        assert_same(getattr(some, name), ref[name], f"to_torch(fields=...).{name}")
    meta = rows.to_torch("meta", fields=["obs", "reward", "next_value", "length"])
    for name in ("obs", "reward", "next_value", "length"):
        for got, want in zip(tensor_leaves(getattr(meta, name)), tensor_leaves(getattr(tensors, name))):
            assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype


def tensor_leaves(value) -> list:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in tensor_leaves(item)]
    if isinstance(value, tuple):
        return [leaf for item in value for leaf in tensor_leaves(item)]
    return [value] if isinstance(value, torch.Tensor) else []


def check_batch(envs, batch, ref: dict, data) -> None:
    """`check_rows` on the batch, on drawn selections of it and on one epoch of minibatches; GAE of each;
    truncation values set through the batch reach the selections made after."""
    storage, n = envs._storage, len(batch)
    runs = batch.runs
    assert runs[:, 2].sum() == n and (np.diff(runs[:, 0]) > 0).all()
    np.testing.assert_array_equal(np.concatenate([np.arange(r, r + k) for _, r, k in runs] or [np.zeros(0)]),
                                  np.asarray(batch.rows))
    assert batch.zero_copy == (n > 0 and len(runs) == 1)
    positions = ref["final_obs"][1]
    if len(positions) and data.draw(st.booleans(), label="truncation values first"):
        values = np.arange(1, len(positions) + 1, dtype=np.float32) * 0.5
        batch.set_truncation_values(values)
        ref["next_value"][positions[:, 0], positions[:, 1]] = values
    check_rows(batch, ref, storage, data)
    if n:
        index = np.asarray(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2 * n), label="index"))
        view = batch.rows_view(index)
        assert isinstance(view, SegmentRows) and len(view) == len(index)
        np.testing.assert_array_equal(view.indices, index)
        check_rows(view, selected(ref, index), storage, data)
        mask = np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="mask"))
        assert_same(batch.rows_view(mask).obs, _index(ref["obs"], np.flatnonzero(mask)), "rows_view(mask).obs")
        assert_same(batch.rows_view(slice(None, None, -1)).reward, ref["reward"][::-1], "rows_view(slice)")
        k = data.draw(st.integers(1, n), label="minibatches")
        seen = []
        advantages, returns = segvec.gae(batch, 0.99, 0.95)
        for minibatch in batch.minibatches(k, generator=data.draw(st.integers(0, 2**31), label="seed")):
            assert n // k <= len(minibatch) <= n // k + 1
            assert (np.diff(minibatch.indices) > 0).all(), "a minibatch's rows come in batch order"
            seen += minibatch.indices.tolist()
            want = selected(ref, minibatch.indices)
            assert_same(minibatch.to_torch(copy=True).obs, want["obs"], "minibatch obs")
            for name in ("reward", "next_value", "mask", "length", "seen", "first"):
                assert_same(getattr(minibatch, name), want[name], f"minibatch {name}")
            assert_same(minibatch.final_obs, want["final_obs"], "minibatch final_obs")
            mb_advantages, mb_returns = segvec.gae(minibatch, 0.99, 0.95)
            np.testing.assert_array_equal(mb_advantages, advantages[minibatch.indices])
            np.testing.assert_array_equal(mb_returns, returns[minibatch.indices])
        assert sorted(seen) == list(range(n)), "one epoch holds every row once"
    if len(positions):
        values = np.arange(len(positions), dtype=np.float32) - 7.0
        batch.set_truncation_values(values)
        ref["next_value"][positions[:, 0], positions[:, 1]] = values
        assert_same(batch.next_value, ref["next_value"], "next_value after set_truncation_values")
        assert_same(batch.to_torch(copy=True).next_value, ref["next_value"], "copied next_value after set")
        index = np.arange(n)[::-1]
        assert_same(batch.rows_view(index).next_value, ref["next_value"][index], "selection after set")


def check_released(batch, selections) -> None:
    """A released batch, and every selection of it (even fields read before), raise on use."""
    for rows in [batch, *selections]:
        for name in ("obs", "reward", "next_value", "final_obs", "seen"):
            with pytest.raises(RuntimeError, match="release"):
                getattr(rows, name)
        for use in (lambda: rows.to_torch(), lambda: rows.to_torch("meta"), lambda: rows.numpy(),
                    lambda: rows.rows_view([0]), lambda: rows.minibatches(1)):
            with pytest.raises(RuntimeError, match="release"):
                use()
    with pytest.raises(RuntimeError, match="release"):
        batch.set_truncation_values([])


# ---- the driver -------------------------------------------------------------------------------------
# Rounds of: step `horizon` times plus a few (every env fills about one row), take some of the complete rows
# and hold them, release one held batch (chosen by index) or none; held batches scatter the free rows.
OPS = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 8), st.integers(-1, 4)), min_size=3, max_size=20)


def drive(backend: str, env: str, mode, num_envs: int, horizon: int, rows_per_env: int, ops, data) -> int:
    """Runs the rounds of `ops` (see OPS), checking each batch when it is released (long after its take,
    the envs having stepped on); returns how many taken batches had non-adjacent rows."""
    if env == "counter":
        fns, options = counter_fns(num_envs, 5), {}
    elif env == "dict":
        fns, options = [lambda: DictEnv(max_length=5)] * num_envs, {}
    else:  # observations with no fixed shape: object leaves
        fns, options = [TextEnv] * num_envs, {"shared_memory": False}
    envs = segvec.make_vec(fns, num_envs=num_envs, horizon=horizon, num_segments=rows_per_env * num_envs,
                           autoreset_mode=mode, step_fields=STEP_FIELDS, segment_fields=SEGMENT_FIELDS,
                           **options, **backend_options(backend, num_envs))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="rng"))
    envs.action_space.seed(int(rng.integers(2**31)))
    held: list = []  # (batch, reference, selections)
    scattered = 0

    def check_and_release(j: int) -> None:
        batch, ref = held.pop(j)
        check_batch(envs, batch, ref, data)
        selection = batch.rows_view(np.arange(len(batch))[::-1]) if len(batch) else batch.rows_view([])
        selection.reward  # noqa: B018 - a field read before the release
        batch.release()
        batch.release()  # idempotent
        check_released(batch, [selection])

    try:
        envs.reset(seed=int(rng.integers(2**31)))
        for extra, take, release in ops:
            for _ in range(horizon + extra):
                sent = rng.random() < 0.9
                value = rng.standard_normal(num_envs).astype(np.float32) if sent else None
                fields = {"seen": rng.standard_normal((num_envs, 2)).astype(np.float32),
                          "first": rng.integers(-9, 9, (num_envs, 3)).astype(np.int16)}
                while True:
                    try:
                        envs.step(envs.action_space.sample(), value=value, logprob=value, **fields)
                        break
                    except segvec.SegmentBufferExhausted:
                        assert held, "only rows the learner holds can run out"
                        check_and_release(0)  # the envs need rows the learner holds
            batch = envs.take_segments(min(take, envs.segments_ready))
            scattered += not batch.zero_copy and len(batch) > 0
            held.append((batch, gathered(envs, batch)))
            if release >= 0 and held:
                check_and_release(release % len(held))
        while held:
            check_and_release(len(held) - 1)
        envs.flush()
        batch = envs.take_segments()
        check_batch(envs, batch, gathered(envs, batch), data)
        batch.release()
    finally:
        envs.close()
    return scattered


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(env=st.sampled_from(["counter", "dict", "text"]), mode=st.sampled_from([NEXT, SAME]),
       num_envs=st.integers(1, 4), horizon=st.integers(1, 9), rows_per_env=st.integers(3, 5), ops=OPS,
       data=st.data())
def test_every_path_gives_the_gathered_batch_serial(env, mode, num_envs, horizon, rows_per_env, ops, data):
    scattered = drive("serial", env, mode, num_envs, horizon, rows_per_env, ops, data)
    event(f"takes of non-adjacent rows: {min(scattered, 3)}{'+' * (scattered >= 3)}")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(env=st.sampled_from(["counter", "dict"]), mode=st.sampled_from([NEXT, SAME]), num_envs=st.sampled_from([2, 4]),
       horizon=st.integers(1, 6), rows_per_env=st.integers(3, 4), ops=OPS, data=st.data())
def test_every_path_gives_the_gathered_batch_multiprocessing(env, mode, num_envs, horizon, rows_per_env, ops, data):
    scattered = drive("multiprocessing", env, mode, num_envs, horizon, rows_per_env, ops, data)
    event(f"takes of non-adjacent rows: {min(scattered, 3)}{'+' * (scattered >= 3)}")


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
@pytest.mark.parametrize("mode", [NEXT, SAME], ids=lambda m: m.name)
def test_held_batches_make_scattered_takes_that_read_the_same(backend, mode, data):
    """A fixed schedule that holds batches while the envs step: takes wrap around the buffer and come in
    several runs, and every path of every batch gives the gathered batch."""
    E, T = 4, 3
    envs = segvec.make_vec(counter_fns(E, 4), num_envs=E, horizon=T, num_segments=3 * E, autoreset_mode=mode,
                           step_fields=STEP_FIELDS, segment_fields=SEGMENT_FIELDS, **backend_options(backend, E))
    rng = np.random.default_rng(3)
    scattered = runs_seen = 0
    held: list = []

    def check_and_release(j):
        batch, ref = held.pop(j)
        check_batch(envs, batch, ref, data)
        batch.release()

    try:
        envs.reset(seed=5)
        for i in range(60):
            fields = {"seen": rng.standard_normal((E, 2)).astype(np.float32),
                      "first": rng.integers(-9, 9, (E, 3)).astype(np.int16)}
            try:
                envs.step(rng.integers(0, 4, E), value=rng.standard_normal(E), logprob=np.zeros(E), **fields)
            except segvec.SegmentBufferExhausted:
                check_and_release(0)
                continue
            if envs.segments_ready >= 3:
                batch = envs.take_segments(3 if i % 3 else envs.segments_ready)
                scattered += not batch.zero_copy
                runs_seen = max(runs_seen, len(batch.runs))
                held.append((batch, gathered(envs, batch)))
            if held and (len(held) > 2 or i % 7 == 6):
                check_and_release(i % len(held))
        while held:
            check_and_release(0)
    finally:
        envs.close()
    assert scattered >= 3 and runs_seen >= 2, (scattered, runs_seen)


def test_a_scattered_batch_gathers_a_field_only_when_read():
    """Taking copies nothing: fields of scattered rows are gathered on first access, once, and kept;
    selections gather their own rows only; to_torch() shares memory with the gathered fields."""
    envs = segvec.make_vec("CartPole-v1", num_envs=2, backend="serial", horizon=4, num_segments=8)
    try:
        envs.reset(seed=0)
        held = []
        for i in range(40):  # takes of one row and of all rows, two batches held: rows get scattered
            for _ in range(4):
                envs.step(np.zeros(2, np.int64), value=np.zeros(2), logprob=np.zeros(2))
            if not envs.segments_ready:
                continue
            batch = envs.take_segments(1 if i % 2 == 0 else envs.segments_ready)
            if len(batch) > 1 and not batch.zero_copy:
                break
            held.append(batch)
            if len(held) > 2:
                held.pop(0).release()
        assert not batch.zero_copy and len(batch.runs) >= 2
        assert "obs" not in batch._data, "nothing gathered at take time"
        view = batch.rows_view([len(batch) - 1])
        assert view.zero_copy and view.obs.base is not None, "one row is one run: a view"
        assert "obs" not in batch._data, "a selection reads the block, not the batch's gather"
        obs = batch.obs
        assert batch.obs is obs, "gathered once"
        tensors = batch.to_torch()
        assert tensors.obs.data_ptr() == obs.ctypes.data
        for other in held:
            other.release()
        batch.release()
        assert not batch._data, "a released batch drops what it gathered"
    finally:
        envs.close()


def test_minibatches_arguments():
    envs = segvec.make_vec("CartPole-v1", num_envs=4, backend="serial", horizon=2)
    try:
        envs.reset(seed=0)
        for _ in range(3):
            envs.step(np.zeros(4, np.int64), value=np.zeros(4))
        with envs.take_segments(4) as batch:
            for bad in (0, 5, 1.5, True, "2"):
                with pytest.raises(ValueError, match="num_minibatches"):
                    batch.minibatches(bad)
            with pytest.raises(TypeError, match="generator"):
                batch.minibatches(2, generator="seed")
            same = [[mb.indices.tolist() for mb in batch.minibatches(2, generator=np.random.default_rng(1))]
                    for _ in range(2)]
            assert same[0] == same[1], "a seeded generator gives the same minibatches"
            by_torch = [mb.indices.tolist() for mb in batch.minibatches(2, generator=torch.Generator().manual_seed(0))]
            assert sorted(sum(by_torch, [])) == [0, 1, 2, 3]
            in_order = [mb.indices.tolist() for mb in batch.minibatches(3, shuffle=False)]
            assert in_order == [[0, 1], [2], [3]]
            with pytest.raises(IndexError):
                batch.rows_view([4])
            with pytest.raises(ValueError, match="1-D"):
                batch.rows_view([[0, 1]])
            with pytest.raises(AttributeError, match="no field 'nope'"):
                batch.to_torch(fields=["nope"])
            assert len(batch.rows_view([])) == 0 and batch.rows_view([]).obs.shape == (0, 3, 4)
    finally:
        envs.close()


# ---- the C kernel of next_value ---------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(T=st.integers(1, 40), S=st.integers(4, 12), seed=st.integers(0, 2**31), same_step=st.booleans(),
       p_end=st.sampled_from([0.0, 0.1, 0.5]), data=st.data())
def test_fill_next_values_follows_the_rules(T, S, seed, same_step, p_end, data):
    """segvec_fill_next_values on arbitrary row contents (NaN truncation values, any length) equals the
    rules slot by slot, into a scratch buffer and into the block's own next_value rows."""
    geometry = Geometry.make(2, 1, S, T, segvec_space(), segvec_space(discrete=True))
    storage = Storage(geometry, shared=False)
    rng = np.random.default_rng(seed)
    storage.row_length[:] = rng.integers(0, T + 1, S)
    storage.terminated[:] = rng.random((S, T)) < p_end
    storage.truncated[:] = rng.random((S, T)) < p_end
    storage.value[:] = rng.standard_normal((S, T))
    storage.truncation_value[:] = np.where(rng.random((S, T)) < 0.5, np.nan, rng.standard_normal((S, T)))
    storage.tail_value[:] = np.where(rng.random(S) < 0.2, np.nan, rng.standard_normal(S))
    rows = np.asarray(data.draw(st.lists(st.integers(0, S - 1), min_size=1, max_size=S)), np.int32)
    out = np.full((len(rows), T), 99.0, np.float32)
    storage.core.fill_next_values(rows, same_step, out)
    np.testing.assert_array_equal(out, reference_next_value(storage, rows, same_step))
    first = int(rows[0])
    storage.core.fill_next_values(rows[:1], same_step, storage.next_value[first:first + 1])
    np.testing.assert_array_equal(storage.next_value[first:first + 1],
                                  reference_next_value(storage, rows[:1], same_step))
    with pytest.raises(ValueError):
        storage.core.fill_next_values(np.array([S], np.int32), same_step, out[:1])


def segvec_space(discrete: bool = False):
    from gymnasium import spaces

    return spaces.Discrete(2) if discrete else spaces.Box(-1, 1, (2,), np.float32)


# ---- CUDA -------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("threshold", [0, 1 << 40])
def test_to_cuda_copies_runs_of_a_scattered_batch(threshold, monkeypatch):
    """to_torch("cuda") of rows in several runs: one device tensor per field, equal to the gathered batch;
    release() waits for the copies that read the block."""
    monkeypatch.setattr(torch_utils, "RUN_COPY_MIN_BYTES", threshold)
    E, T = 2, 4
    envs = segvec.make_vec(counter_fns(E, 4), num_envs=E, backend="serial", horizon=T, num_segments=3 * E,
                           step_fields=STEP_FIELDS, segment_fields=SEGMENT_FIELDS)
    try:
        envs.reset(seed=0)
        rng = np.random.default_rng(0)

        def step():
            envs.step(rng.integers(0, 4, E), value=rng.standard_normal(E),
                      seen=np.ones((E, 2), np.float32), first=np.ones((E, 3), np.int16))

        for _ in range(T + 1):
            step()
        first = envs.take_segments(1)
        for _ in range(2 * T):
            step()
        batch = envs.take_segments(envs.segments_ready)
        assert len(batch.runs) >= 2
        ref = gathered(envs, batch)
        tensors = batch.to_torch("cuda")
        for name in batch.fields():
            tensor = getattr(tensors, name)
            assert tensor.device.type == "cuda"
            assert_same(tensor, ref[name], name)
        minibatch = next(batch.minibatches(2, generator=0))
        assert_same(minibatch.to_torch("cuda").obs, ref["obs"][minibatch.indices], "minibatch on cuda")
        assert batch._before_release, "release waits for the copies"
        batch.release()
        first.release()
    finally:
        envs.close()
