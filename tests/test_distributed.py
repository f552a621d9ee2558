"""`segvec.distributed.RayRollouts` on a real local Ray cluster (127.0.0.1 only, started by the module fixture).

Every row that reaches the learner is checked against the plain sequential loop of `tests/envs.py`, for the
runner, the runner's life (incarnation) and the env it names: exactly once, in order, bootstraps exact.
"""
from __future__ import annotations

import glob
import os
import time

import numpy as np
import pytest

# Test clusters listen on the loopback interface only: with this, Ray takes 127.0.0.1 as the node address
# (set before ray is imported: the driver reads it at import, the cluster's processes inherit it).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e .[ray])")

import segvec  # noqa: E402
from gymnasium.vector import AutoresetMode  # noqa: E402

import envs as test_envs  # noqa: E402
from fault_envs import EnvBoom, fault_fns  # noqa: E402
from segvec.distributed import RayRollouts, RunnerError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HORIZON, ENVS, RUNNERS = 8, 3, 2
SMALL = {"num_cpus": 0.25}  # runner actors of the tests: many fit the 2-CPU test cluster


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster on 127.0.0.1 with 2 CPUs; runner processes import the test envs from here."""
    root, before = os.path.dirname(HERE), os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([root, HERE, before or ""])  # (the cluster's processes inherit it)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # a new cluster
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield
    ray.shutdown()


def counter_policy():
    """The tests' deterministic policy: the action and value of `tests/envs.py`, a log-probability that
    encodes the weights' version (``-(1 + version) / 10``), and weights that can be loaded."""
    return CounterPolicy()


class CounterPolicy:
    def __init__(self):
        self.version = 0

    def load_state_dict(self, state):
        self.version = int(state["version"])

    def __call__(self, obs):
        logprob = np.full(len(obs), -(1 + self.version) / 10, np.float32)
        return test_envs.policy(obs), test_envs.value_of(obs), logprob


def make_rollouts(request=None, **options) -> RayRollouts:
    options = {"num_runners": RUNNERS, "envs_per_runner": ENVS, "policy": counter_policy, "horizon": HORIZON,
               "runner_resources": SMALL, **options}
    return RayRollouts(test_envs.counter_fns(ENVS), **options)


def seed_of(runner: int, incarnation: int, env: int, seed: int = 0) -> int:
    """The documented seed of env `env` of `runner` in its life `incarnation`."""
    return seed + (incarnation * RUNNERS + runner) * ENVS + env


def take_all(rollouts: RayRollouts, n: int, count: int) -> list:
    """`count` takes of `n` rows, as lists of per-row dicts (the batches released)."""
    rows = []
    for _ in range(count):
        with rollouts.take_segments(n, timeout=60) as batch:
            fields = batch.numpy()
            rows += [{name: value[i] for name, value in fields.items()} for i in range(len(batch))]
    return rows


def check_against_reference(rows: list, mode: str) -> None:
    """Rows of each (runner, incarnation, env) chain without gaps from step 0, appear once, and hold the
    plain sequential loop's transitions with exact values and bootstraps."""
    chains: dict = {}
    for row in rows:
        key = (int(row["runner_id"]), int(row["incarnation"]), int(row["env_id"]))
        chains.setdefault(key, []).append(row)
    for (runner, incarnation, env), chain in chains.items():
        chain.sort(key=lambda row: int(row["start_step"]))
        starts = [int(row["start_step"]) for row in chain]
        assert starts == [HORIZON * k for k in range(len(chain))], (runner, incarnation, env, starts)
        assert all(int(row["length"]) == HORIZON for row in chain)  # never half a row
        n = HORIZON * len(chain)
        ref = test_envs.reference_slots(env, [(seed_of(runner, incarnation, env), n)], mode)[0]
        cat = {name: np.concatenate([row[name] for row in chain]) for name in
               ("action", "value", "reward", "terminated", "truncated", "mask", "next_value")}
        obs = np.concatenate([row["obs"][:HORIZON] for row in chain])
        np.testing.assert_array_equal(obs, ref.obs)
        np.testing.assert_array_equal(chain[-1]["obs"][HORIZON], ref.after[-1])  # the chain's tail observation
        real = ref.real
        np.testing.assert_array_equal(cat["mask"], real)
        np.testing.assert_array_equal(cat["action"][real], ref.action[real])
        np.testing.assert_allclose(cat["reward"], ref.reward.astype(np.float32), rtol=1e-6)
        np.testing.assert_array_equal(cat["terminated"], ref.terminated)
        np.testing.assert_array_equal(cat["truncated"], ref.truncated)
        np.testing.assert_array_equal(cat["value"][real], test_envs.value_of(ref.obs)[real])
        expected = np.where(ref.terminated, np.float32(0), test_envs.value_of(ref.next_obs))
        np.testing.assert_array_equal(cat["next_value"][real], expected[real])


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_rows_from_every_runner_match_the_sequential_loop_exactly_once(cluster, mode):
    rollouts = make_rollouts(autoreset_mode=mode)
    try:
        rows = take_all(rollouts, 4, 3)  # takes of 4 rows split the chunks of 3
        deadline = time.monotonic() + 60
        while {int(row["runner_id"]) for row in rows} != {0, 1}:  # (a runner may start seconds later)
            assert time.monotonic() < deadline, "a runner never shipped rows"
            rows += take_all(rollouts, 4, 1)
        check_against_reference(rows, mode.value)
        stats = rollouts.stats()
        assert stats["rows_taken"] == len(rows)
        assert stats["rows_received"] == stats["rows_taken"] + stats["rows_queued"]
        assert stats["segments_taken"] == stats["rows_received"]  # the runners' counts: every row shipped arrived
    finally:
        rollouts.close()


def test_gae_of_taken_rows_equals_the_reference(cluster):
    rollouts = make_rollouts()
    try:
        with rollouts.take_segments(6, timeout=60) as batch:
            advantages, returns = segvec.gae(batch, 0.9, 0.8)
            ref_adv, ref_ret = test_envs.reference_gae(batch, 0.9, 0.8)
            np.testing.assert_allclose(advantages, ref_adv, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(returns, ref_ret, rtol=1e-5, atol=1e-5)
            tensors = batch.to_torch()
            for name in ("obs", "reward", "next_value", "runner_id"):
                np.testing.assert_array_equal(getattr(tensors, name).numpy(), getattr(batch, name))
        with pytest.raises(RuntimeError, match="after release"):
            batch.reward
    finally:
        rollouts.close()


@pytest.mark.parametrize("when", ["busy", "idle"])
def test_a_killed_runner_restarts_and_no_row_is_duplicated_or_partial(cluster, when):
    rollouts = make_rollouts(max_restarts=2)
    try:
        rows = take_all(rollouts, 3, 4)
        deadline = time.monotonic() + 60
        while {int(row["runner_id"]) for row in rows} != {0, 1}:  # (a runner killed before it shipped
            assert time.monotonic() < deadline, "a runner never shipped rows"  # anything needs no new life)
            rows += take_all(rollouts, 3, 1)
        runner = rollouts.runners[0]
        if when == "idle":  # every runner at its bound: no call in flight
            deadline = time.monotonic() + 60
            while rollouts.stats()["calls_in_flight"]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            life = ray.get(runner.info.remote(), timeout=30)["life"]
        ray.kill(runner, no_restart=False)
        if when == "idle":  # the learner's next call (issued for the old incarnation) meets the new life
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline
                try:
                    if ray.get(runner.info.remote(), timeout=30)["life"] != life:
                        break
                except ray.exceptions.RayActorError:
                    time.sleep(0.1)
        deadline = time.monotonic() + 120
        while not any(int(row["runner_id"]) == 0 and int(row["incarnation"]) == 1 for row in rows):
            assert time.monotonic() < deadline, "the killed runner never came back"
            time.sleep(0.2)  # (leaves the CPUs to the restarting actor: runner 1 waits, bounded, meanwhile)
            rows += take_all(rollouts, 3, 1)
        rows += take_all(rollouts, 3, 2)
        keys = [(int(r["runner_id"]), int(r["incarnation"]), int(r["env_id"]), int(r["start_step"])) for r in rows]
        assert len(keys) == len(set(keys))
        check_against_reference(rows, "NextStep")  # each life's rows: whole, in order, its own seeds
        stats = rollouts.stats()
        assert stats["runner_restarts"] == 1
        if when == "idle":  # its rows (the old incarnation's seeds, again) were dropped, not delivered
            assert stats["rows_dropped_restart"] == 3
        assert stats["rows_taken"] == len(rows)
        assert stats["rows_received"] == (stats["rows_taken"] + stats["rows_queued"] + stats["rows_dropped_stale"]
                                          + stats["rows_dropped_restart"])
        assert {int(r["incarnation"]) for r in rows if int(r["runner_id"]) == 1} == {0}  # the other went on
    finally:
        rollouts.close()


def wait_until_bounded(rollouts: RayRollouts) -> None:
    """Waits until no call is in flight: every runner has its `max_rows_ahead` rows at the learner."""
    deadline = time.monotonic() + 60
    while rollouts.stats()["calls_in_flight"]:
        assert time.monotonic() < deadline, "runners never reached their bound"
        time.sleep(0.05)


def test_runners_stop_max_rows_ahead_of_the_learner(cluster):
    rollouts = make_rollouts(max_rows_ahead=2 * ENVS)
    try:
        assert rollouts.take_segments(ENVS, timeout=60)
        wait_until_bounded(rollouts)
        time.sleep(0.5)  # a runner that ran ahead would complete rows meanwhile
        completed = [ray.get(runner.info.remote(), timeout=30)["stats"]["segments_completed"]
                     for runner in rollouts.runners]
        stats = rollouts.stats()
        assert stats["rows_queued"] == RUNNERS * 2 * ENVS  # each runner's bound, waiting at the learner
        assert sum(completed) == stats["rows_received"] == stats["rows_taken"] + stats["rows_queued"]
        assert max(completed) <= 3 * ENVS  # the rows taken (from one runner at most) plus its bound
        episodes = rollouts.episodes()  # every runner's finished episodes, as their rows reported them
        assert len(episodes["return"]) == stats["episodes"] > 0 and set(episodes["runner_id"]) == {0, 1}
        assert rollouts.segments_ready == stats["rows_queued"]
        rollouts.take_segments(ENVS, timeout=60)
        wait_until_bounded(rollouts)
        assert sum(ray.get(runner.info.remote(), timeout=30)["stats"]["segments_completed"]
                   for runner in rollouts.runners) == sum(completed) + ENVS  # one call more, no further
    finally:
        rollouts.close()


def test_a_runner_that_dies_more_than_max_restarts_is_an_error(cluster):
    rollouts = make_rollouts(num_runners=1, max_restarts=0)
    try:
        rollouts.take_segments(ENVS, timeout=60)
        ray.kill(rollouts.runners[0], no_restart=False)
        with pytest.raises(RunnerError, match="runner 0 died 1 times, more than max_restarts=0"):
            for _ in range(20):
                rollouts.take_segments(ENVS, timeout=60)
    finally:
        rollouts.close()


def test_rows_carry_the_version_that_acted_and_stale_rows_are_dropped(cluster):
    rollouts = make_rollouts(max_policy_lag=0)
    try:
        first = take_all(rollouts, 6, 1)
        assert all((row["policy_version"] == 0).all() for row in first)
        rollouts.update_policy({"version": 1}, 1)
        later = take_all(rollouts, 6, 2)
        for row in later:  # every step acted on by version 1's weights, and says so
            assert (row["policy_version"] == 1).all()
            np.testing.assert_allclose(row["logprob"], -0.2)
        stats = rollouts.stats()
        assert stats["rows_dropped_stale"] > 0  # the calls issued before the update acted with version 0
        assert stats["rows_received"] == stats["rows_taken"] + stats["rows_queued"] + stats["rows_dropped_stale"]
        with pytest.raises(ValueError, match="version"):
            rollouts.update_policy({"version": 0}, 0)
    finally:
        rollouts.close()


def test_vtrace_on_stale_rows_matches_a_numpy_reference(cluster):
    rollouts = make_rollouts()  # no lag limit: rows of versions 0 and 1 come mixed
    try:
        take_all(rollouts, 6, 1)
        rollouts.update_policy({"version": 1}, 1)
        with rollouts.take_segments(12, timeout=60) as batch:
            versions = batch.policy_version
            np.testing.assert_allclose(batch.logprob, -(1 + versions) / 10, rtol=1e-6)
            assert (versions == 0).any()  # stale rows are here, corrected below
            target = np.full(batch.logprob.shape, -0.2, np.float32)  # the learner's current policy
            advantages, returns = segvec.gae(batch, 0.9, 0.95, rho_clip=1.0, c_clip=0.9, target_logprob=target)
            ratio = np.exp(target.astype(np.float64) - batch.logprob)
            ref_adv, ref_ret = test_envs.reference_gae(batch, 0.9, 0.95, rho=np.minimum(ratio, 1.0),
                                                       c=np.minimum(ratio, 0.9))
            np.testing.assert_allclose(advantages, ref_adv, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(returns, ref_ret, rtol=1e-5, atol=1e-5)
    finally:
        rollouts.close()


def test_an_env_error_names_runner_and_env_with_its_traceback(cluster):
    rollouts = RayRollouts(fault_fns(ENVS, "step", target=1, at_step=5), num_runners=1, envs_per_runner=ENVS,
                           policy=counter_policy_for_faults, horizon=HORIZON, runner_resources=SMALL)
    try:
        with pytest.raises(segvec.EnvError) as caught:
            take_all(rollouts, 3, 4)
        error = caught.value
        assert isinstance(error, EnvBoom)  # the env's own type survives the trip
        assert error.env_index == 1
        assert "runner 0, env 1 raised in step" in str(error)
        assert "EnvBoom" in error.worker_traceback and "fails at step 5" in error.worker_traceback
        assert rollouts.stats()["env_errors"] == 1
    finally:
        rollouts.close()


def counter_policy_for_faults():
    return lambda obs: (np.zeros(len(obs), np.int64), np.zeros(len(obs), np.float32), np.zeros(len(obs), np.float32))


def test_a_policy_error_is_a_runner_error(cluster):
    rollouts = make_rollouts(num_runners=1, policy=broken_policy)
    try:
        with pytest.raises(RunnerError, match="(?s)runner 0 raised.*ZeroDivisionError"):
            rollouts.take_segments(3, timeout=60)
    finally:
        rollouts.close()


def broken_policy():
    def policy(obs):
        return 1 / 0
    return policy


def shm_files() -> set:
    return set(glob.glob("/dev/shm/segvec-*"))


def test_close_leaves_no_actor_process_or_shared_memory(cluster):
    before = shm_files()
    rollouts = make_rollouts(backend="multiprocessing", num_workers=ENVS)
    runners = list(rollouts.runners)
    take_all(rollouts, 3, 1)
    infos = ray.get([runner.info.remote() for runner in runners], timeout=30)
    env_pids = [pid for info in infos for pid in info["env_pids"]]
    assert len(env_pids) == RUNNERS * ENVS
    rollouts.close()
    rollouts.close()  # idempotent
    deadline = time.monotonic() + 30
    for runner in runners:  # (ray.kill is asynchronous: a call may still reach the actor for a moment)
        while True:
            try:
                ray.get(runner.info.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "a runner actor outlived close()"
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in env_pids + [info["pid"] for info in infos]):
        assert time.monotonic() < deadline, "runner processes outlived close()"
        time.sleep(0.1)
    assert shm_files() <= before
    with pytest.raises(segvec.ClosedEnvironmentError):
        rollouts.take_segments(1)
    with pytest.raises(segvec.ClosedEnvironmentError):
        rollouts.update_policy(None, 1)


def test_bad_arguments_raise_before_any_actor_starts(cluster):
    for options, match in (({"num_runners": 0}, "num_runners"), ({"envs_per_runner": 2.5}, "envs_per_runner"),
                           ({"max_rows_ahead": 4}, "multiple"), ({"max_policy_lag": -1}, "max_policy_lag"),
                           ({"max_restarts": -1}, "max_restarts"), ({"backend": "threads"}, "backend")):
        with pytest.raises(ValueError, match=match):
            make_rollouts(**options)
    rollouts = make_rollouts(num_runners=1)
    try:
        with pytest.raises(ValueError, match="n must be"):
            rollouts.take_segments(0)
        with pytest.raises(ValueError, match="n must be"):
            rollouts.take_segments(1000)
        with pytest.raises(TimeoutError):
            rollouts.take_segments(6, timeout=0.01)  # the runner has not even started its envs yet
    finally:
        rollouts.close()
