"""Wrong input raises the documented exception, with a message that says what to change, and leaves the
vector env usable (or, at construction, leaves no process behind)."""
from __future__ import annotations

import functools
import multiprocessing

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError

import segvec
from envs import CounterEnv, DictEnv, GraphEnv, TextEnv, counter_fns


@pytest.fixture(autouse=True)
def children_before():
    """Worker processes alive before the test (another test's), so that `no_children_left` sees only ours."""
    no_children_left.before = {child.pid for child in multiprocessing.active_children()}


def no_children_left() -> bool:
    """True when every worker process this test started is gone (waiting up to 2 s for each)."""
    ours = [child for child in multiprocessing.active_children() if child.pid not in no_children_left.before]
    for child in ours:
        child.join(2.0)
    return not any(child.is_alive() for child in ours)


no_children_left.before = set()


# ---- construction ------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"horizon": 0}, r"horizon must be an int >= 1, got 0"),
    ({"horizon": -3}, r"horizon must be an int >= 1"),
    ({"horizon": 2.5}, r"horizon must be an int >= 1"),
    ({"num_segments": 7}, r"num_segments must be >= 2 \* num_envs = 8"),
    ({"batch_size": 0}, r"batch_size must be an int in \[1, num_envs=4\], got 0"),
    ({"batch_size": 5}, r"batch_size must be an int in \[1, num_envs=4\], got 5"),
    ({"backend": "threads"}, r"backend must be one of \('serial', 'multiprocessing', 'engine'\)"),
])
def test_invalid_sizes(options, message):
    options = {"backend": "serial", **options}
    with pytest.raises(ValueError, match=message):
        segvec.make_vec(CounterEnv, num_envs=4, **options)


def test_num_envs_not_divisible_by_num_workers():
    with pytest.raises(ValueError, match=r"num_envs \(3\) must be a multiple of num_workers \(2\); "
                                         r"choose num_workers among \[1, 3\]"):
        segvec.make_vec(CounterEnv, num_envs=3, backend="multiprocessing", num_workers=2)
    assert no_children_left()


def test_serial_backend_takes_no_workers():
    with pytest.raises(ValueError, match="leave num_workers unset"):
        segvec.make_vec(CounterEnv, num_envs=2, backend="serial", num_workers=2)


def test_mismatched_spaces_across_envs(backend):
    fns = counter_fns(2) + [functools.partial(DictEnv), functools.partial(DictEnv)]
    options = {"num_workers": 2} if backend == "multiprocessing" else {}
    with pytest.raises(ValueError, match=r"\(env 2 has Discrete\(3\)\).*action spaces from all environments "
                                         r"must be equal") as info:
        segvec.make_vec(fns, num_envs=4, backend=backend, **options)
    assert isinstance(info.value, segvec.SpaceMismatchError) and isinstance(info.value, RuntimeError)
    assert no_children_left()


def test_mismatched_action_spaces(backend):
    def wide():
        env = CounterEnv()
        env.action_space = spaces.Discrete(5)
        return env

    options = {"num_workers": 2} if backend == "multiprocessing" else {}
    with pytest.raises(segvec.SpaceMismatchError, match=r"\(env 1 has Discrete\(5\)\)"):
        segvec.make_vec([CounterEnv, wide], num_envs=2, backend=backend, **options)
    assert no_children_left()


@pytest.mark.parametrize("env_fn, name", [(TextEnv, "Text"), (GraphEnv, "Graph")])
def test_unsupported_space(env_fn, name, backend):
    """Under shared_memory=True (the default) a space with no fixed shape is refused with gymnasium's words
    (a TypeError and a ValueError), and the message says how to go on."""
    with pytest.raises(segvec.SharedMemorySpaceError,
                       match=rf"As {name}\(.*has a dynamic shape so its not possible to make a static shared "
                             r"memory\..*shared_memory=False.*FlattenObservation") as info:
        segvec.make_vec(env_fn, num_envs=2, backend=backend)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    assert no_children_left()


def test_wrong_number_of_callables():
    with pytest.raises(ValueError, match=r"got 2 env callables for num_envs=3"):
        segvec.make_vec([CounterEnv, CounterEnv], num_envs=3, backend="serial")


# ---- actions -------------------------------------------------------------------------------------
def test_wrong_action_shape_dtype_and_range(backend, make_envs):
    envs = make_envs(CounterEnv, 2, backend)
    obs, _ = envs.reset(seed=0)
    with pytest.raises(ValueError, match=r"actions have shape \(3,\), expected \(2,\) for 2 envs"):
        envs.step(np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        envs.step(np.zeros((2, 1), np.int64))
    with pytest.raises(TypeError, match=r"actions have dtype float64, the action space needs int64"):
        envs.step(np.array([0.5, 1.0]))
    with pytest.raises(TypeError, match=r"actions must be a batch of 2 \(one per env\), got the scalar 0"):
        envs.step(0)
    # nothing was sent: the envs step normally afterwards
    obs2, reward, term, trunc, _ = envs.step(np.array([1, 2]))
    assert obs2.shape == (2, 4) and (obs2[:, 2] <= 1).all()
    # values outside the space reach the env, as gymnasium's vector envs pass them: the env is the judge
    obs3, reward, *_ = envs.step(np.array([0, 4]))
    np.testing.assert_allclose(reward, obs3[:, 0] + 0.25 * np.array([0, 4]) - obs3[:, 3])


def test_wrong_actions_in_send(backend, make_envs):
    envs = make_envs(DictEnv, 2, backend)
    envs.async_reset(seed=0)
    _, _, _, _, info = envs.recv()
    ids = info["env_id"]
    with pytest.raises(ValueError, match=r"actions have shape \(1,\), expected \(2,\)"):
        envs.send(np.zeros(1, np.int64), ids)
    with pytest.raises(ValueError, match=r"value must have one entry per env \(2\)"):
        envs.send(np.zeros(2, np.int64), ids, value=np.zeros(3))
    with pytest.raises(TypeError, match=r"unknown learner fields \['hidden'\]; declare them in step_fields"):
        envs.send(np.zeros(2, np.int64), ids, hidden=np.zeros(2))
    with pytest.raises(ValueError, match=r"env_ids must be in \[0, 2\)"):
        envs.send(np.zeros(2, np.int64), np.array([0, 2]))
    envs.send(np.zeros(2, np.int64), ids)
    assert len(envs.recv()[4]["env_id"]) == 2


# ---- the async protocol ----------------------------------------------------------------------------
def test_send_for_envs_not_received(backend, make_envs):
    envs = make_envs(CounterEnv, 4, backend, batch_size=2)
    envs.async_reset(seed=0)
    _, _, _, _, info = envs.recv()
    ids = info["env_id"]
    others = np.setdiff1d(np.arange(4), ids)
    with pytest.raises(segvec.NotReceivedError, match=r"not received"):
        envs.send(np.zeros(2, np.int64), others)
    with pytest.raises(segvec.NotReceivedError, match=r"appears twice"):
        envs.send(np.zeros(2, np.int64), np.array([ids[0], ids[0]]))
    assert isinstance(segvec.NotReceivedError("x"), ValueError)
    envs.send(np.zeros(2, np.int64), ids)  # still HELD: a correct send goes through
    with pytest.raises(segvec.NotReceivedError):
        envs.send(np.zeros(2, np.int64), ids)  # sent already
    assert len(envs.recv()[4]["env_id"]) == 2


def test_recv_with_nothing_outstanding(backend, make_envs):
    envs = make_envs(CounterEnv, 2, backend)
    with pytest.raises(NoAsyncCallError, match=r"call `async_reset` or `send` first"):
        envs.recv()
    envs.async_reset(seed=0)
    _, _, _, _, info = envs.recv()
    with pytest.raises(NoAsyncCallError, match=r"call `async_reset` or `send` first"):
        envs.recv()
    envs.send(np.zeros(2, np.int64), info["env_id"])
    envs.recv()


def test_wait_without_async_call(backend, make_envs):
    envs = make_envs(CounterEnv, 2, backend)
    with pytest.raises(NoAsyncCallError, match=r"without any prior call to `step_async`"):
        envs.step_wait()
    with pytest.raises(NoAsyncCallError, match=r"without any prior call to `reset_async`"):
        envs.reset_wait()
    with pytest.raises(NoAsyncCallError, match=r"without any prior call to `call_async`"):
        envs.call_wait()
    envs.reset(seed=0)
    envs.step_async(np.zeros(2, np.int64))
    with pytest.raises(AlreadyPendingCallError, match=r"pending call to `step`"):
        envs.step_async(np.zeros(2, np.int64))
    envs.step_wait()
    with pytest.raises(NoAsyncCallError):
        envs.step_wait()


def test_take_more_segments_than_ready(backend, make_envs):
    envs = make_envs(CounterEnv, 2, backend, horizon=2)
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=r"take_segments\(1\) but only 0 segments are ready") as info:
        envs.take_segments(1)
    assert isinstance(info.value, segvec.NotEnoughSegmentsError)
    for _ in range(3):
        envs.step(np.zeros(2, np.int64))
    assert envs.segments_ready == 2
    with pytest.raises(ValueError, match=r"take_segments\(3\) but only 2 segments are ready"):
        envs.take_segments(3)
    with pytest.raises(ValueError, match=r"n must be a non-negative int"):
        envs.take_segments(-1)
    batch = envs.take_segments(2)
    assert len(batch) == 2
    batch.release()
    with pytest.raises(RuntimeError, match=r"after release"):
        batch.obs  # noqa: B018


def test_reset_mask_errors(backend, make_envs):
    envs = make_envs(CounterEnv, 2, backend)
    envs.reset(seed=0)
    with pytest.raises(TypeError, match=r"must be a numpy array"):
        envs.reset(options={"reset_mask": [True, False]})
    with pytest.raises(ValueError, match=r"must have shape `\(2,\)`"):
        envs.reset(options={"reset_mask": np.ones(3, bool)})
    with pytest.raises(TypeError, match=r"must have `dtype=np.bool_`"):
        envs.reset(options={"reset_mask": np.ones(2, np.int64)})
    with pytest.raises(ValueError, match=r"at least one True value"):
        envs.reset(options={"reset_mask": np.zeros(2, bool)})
    with pytest.raises(ValueError, match=r"length must match num_envs=2"):
        envs.reset(seed=[1, 2, 3])
    envs.reset(seed=0)


# ---- closing -------------------------------------------------------------------------------------
def test_calls_after_close(backend, make_envs):
    envs = make_envs(CounterEnv, 2, backend)
    envs.reset(seed=0)
    envs.close()
    envs.close()  # idempotent
    envs.close(terminate=True)
    assert envs.closed
    calls = {
        "reset": lambda: envs.reset(seed=0),
        "step": lambda: envs.step(np.zeros(2, np.int64)),
        "step_async": lambda: envs.step_async(np.zeros(2, np.int64)),
        "async_reset": lambda: envs.async_reset(),
        "recv": lambda: envs.recv(),
        "send": lambda: envs.send(np.zeros(2, np.int64), np.arange(2)),
        "take_segments": lambda: envs.take_segments(),
        "flush": lambda: envs.flush(),
        "stats": lambda: envs.stats(),
        "call": lambda: envs.call("reset"),
        "get_attr": lambda: envs.get_attr("index"),
        "set_attr": lambda: envs.set_attr("index", 3),
    }
    for name, call in calls.items():
        with pytest.raises(ClosedEnvironmentError, match=r"after a call to `close\(\)`"):
            call()
    if backend == "multiprocessing":
        assert no_children_left()


def test_close_without_reset_and_twice(backend):
    envs = segvec.make_vec(CounterEnv, num_envs=2, backend=backend)
    envs.close()
    envs.close()
    assert no_children_left()


def test_step_or_send_before_reset(backend, make_envs):
    """send() before any reset is an error; step() first resets the envs never reset (as gymnasium's vector
    envs let a step come first), so the step is each env's first transition."""
    envs = make_envs(CounterEnv, 2, backend)
    obs, *_ = envs.step(np.zeros(2, np.int64))
    assert obs[:, 2].tolist() == [1, 1]  # (index, episode, t, noise): one step into the first episode
    obs, _ = envs.reset(seed=0)
    assert envs.step(np.zeros(2, np.int64))[0].shape == (2, 4)
    fresh = make_envs(CounterEnv, 2, backend)
    with pytest.raises(segvec.NotReceivedError, match=r"never reset: call reset\(\)"):
        fresh.send(np.zeros(1, np.int64), np.array([1]))


def test_async_face_needs_autoreset(backend, make_envs):
    envs = make_envs(CounterEnv, 2, backend, autoreset_mode=segvec.AutoresetMode.DISABLED)
    with pytest.raises(ValueError, match=r"async face .* needs autoreset: make the envs with autoreset_mode "
                                         r"NEXT_STEP or SAME_STEP"):
        envs.async_reset(seed=0)
    obs, _ = envs.reset(seed=0)  # the gymnasium face works
    assert envs.step(np.zeros(2, np.int64))[0].shape == (2, 4)


def test_set_attr_needs_one_value_per_env(backend, make_envs):
    envs = make_envs(CounterEnv, 2, backend)
    with pytest.raises(ValueError, match=r"Values must be a list or tuple with length equal to the number of "
                                         r"environments. Got `3` values for 2 environments"):
        envs.set_attr("index", [1, 2, 3])
    envs.set_attr("index", [5, 6])
    assert envs.get_attr("index") == (5, 6)


def test_invalid_autoreset_mode():
    with pytest.raises(ValueError, match=r"autoreset_mode must be one of"):
        segvec.make_vec(CounterEnv, num_envs=2, backend="serial", autoreset_mode="sometimes")
