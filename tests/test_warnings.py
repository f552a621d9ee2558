"""What segvec says instead of staying silent: `SegvecWarning`s, each once and pointing at the user's line, and
an action-space error that fits actions."""
from __future__ import annotations

import contextlib
import os
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces

import segvec
from conftest import backend_options
from envs import counter_fns, policy, value_of
from segvec.backends.multiprocessing import MultiprocessingBackend
from segvec.spaces import SpaceLayout

try:
    import torch
except ImportError:
    torch = None


@contextlib.contextmanager
def no_segvec_warnings():
    """A context in which a SegvecWarning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", segvec.SegvecWarning)
        yield


# ---- a num_envs that leaves cores idle ---------------------------------------------------------------
@pytest.mark.parametrize("num_envs, cpus, workers", [(3, 2, 1), (7, 2, 1), (13, 8, 1), (9, 8, 3)])
def test_a_default_worker_count_far_below_the_cores_warns(monkeypatch, num_envs, cpus, workers):
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    with pytest.warns(segvec.SegvecWarning, match=rf"num_envs={num_envs} runs on {workers} worker.*{cpus} CPUs.*"
                                                  rf"multiple of {cpus}.*num_workers explicitly") as caught:
        assert MultiprocessingBackend.resolve_num_workers(num_envs, None) == workers
    assert len(caught) == 1


@pytest.mark.parametrize("num_envs, cpus, num_workers", [
    (3, 2, 1),      # chosen explicitly
    (7, 1, None),   # one CPU
    (1, 8, None),   # one env
    (8, 2, None), (6, 4, None), (5, 8, None), (12, 8, None),  # the default uses at least half the usable cores
])
def test_no_worker_count_warning_when_it_is_chosen_or_cannot_be_better(monkeypatch, num_envs, cpus, num_workers):
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    with no_segvec_warnings():
        MultiprocessingBackend.resolve_num_workers(num_envs, num_workers)


def test_the_worker_count_warning_points_at_the_users_line(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.warns(segvec.SegvecWarning, match="runs on 1 worker process") as caught:
        envs = segvec.make_vec(counter_fns(3), num_envs=3, backend="multiprocessing")
    envs.close()
    assert envs.num_workers == 1 and caught[0].filename == __file__


# ---- GAE on values never sent -------------------------------------------------------------------------
def rollout(send_values: bool, send_logprobs: bool = True):
    envs = segvec.make_vec(counter_fns(2), num_envs=2, backend="serial", horizon=4)
    obs, _ = envs.reset(seed=0)
    for _ in range(5):
        fields = {"value": value_of(obs)} if send_values else {}
        if send_logprobs:
            fields["logprob"] = np.full(2, -0.5, np.float32)
        obs = envs.step(policy(obs), **fields)[0]
    return envs, envs.take_segments()


@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_gae_without_sent_values_warns(as_torch):
    if as_torch and torch is None:
        pytest.skip("needs torch")
    envs, batch = rollout(send_values=False)
    data = batch.to_torch() if as_torch else batch
    with pytest.warns(segvec.SegvecWarning, match=r"value is NaN at every real step.*pass value=.*step\(\) or send"):
        advantages, _ = segvec.gae(data, 0.99, 0.95)
    assert np.isnan(np.asarray(advantages)[batch.mask]).all()  # still returned, as documented
    batch.release()
    envs.close()


@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_gae_with_sent_values_is_quiet_and_weighted_gae_names_missing_logprobs(as_torch):
    if as_torch and torch is None:
        pytest.skip("needs torch")
    envs, batch = rollout(send_values=True)
    data = batch.to_torch() if as_torch else batch
    target = data.logprob * 0 - 0.4
    with no_segvec_warnings():
        segvec.gae(data, 0.99, 0.95)
        segvec.gae(data, 0.99, 0.95, rho_clip=1.0, target_logprob=target)
    batch.release()
    envs.close()
    envs, batch = rollout(send_values=True, send_logprobs=False)
    data = batch.to_torch() if as_torch else batch
    with pytest.warns(segvec.SegvecWarning, match=r"behaviour log-probability.*NaN at every real step.*logprob="):
        segvec.gae(data, 0.99, 0.95, rho_clip=1.0, target_logprob=data.value * 0 - 0.4)
    with no_segvec_warnings():  # with the behaviour log-probabilities given, nothing is missing
        segvec.gae(data, 0.99, 0.95, rho_clip=1.0, target_logprob=data.value * 0 - 0.4,
                   behaviour_logprob=data.value * 0 - 0.5)
    batch.release()
    envs.close()


def test_gae_warns_about_some_nan_values_once_per_line():
    envs, batch = rollout(send_values=True)
    data = {name: np.array(getattr(batch, name)) for name in
            ("reward", "value", "next_value", "terminated", "truncated", "mask", "length")}
    data["value"][0, 1] = np.nan
    batch.release()
    envs.close()
    nan_batch = type("Batch", (), data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            segvec.gae(nan_batch, 0.99, 0.95)
    assert len(caught) == 1 and "value is NaN at some real steps" in str(caught[0].message)
    assert caught[0].filename == __file__


# ---- recycled segments --------------------------------------------------------------------------------
def step_on(envs, obs, steps: int):
    for _ in range(steps):
        obs = envs.step(policy(obs), value=value_of(obs))[0]
    return obs


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_recycled_segments_warn_once_and_only_a_learner_that_takes(backend):
    E, T = 2, 2
    envs = segvec.make_vec(counter_fns(E), num_envs=E, horizon=T, num_segments=6 * E, **backend_options(backend, E))
    try:
        obs, _ = envs.reset(seed=0)
        with no_segvec_warnings():
            obs = step_on(envs, obs, 20)  # the gymnasium face alone: rows are recycled, nobody is told
            assert envs.stats()["segments_recycled"] > 0
            envs.take_segments().release()  # the first take: what was recycled before it is no news
            recycled = envs.stats()["segments_recycled"]
            obs = step_on(envs, obs, 2 * T)  # rows complete, none recycled
            assert envs.stats()["segments_recycled"] == recycled and envs.segments_ready >= E
            envs.take_segments().release()
        recycled = envs.stats()["segments_recycled"]
        obs = step_on(envs, obs, 20)
        assert envs.stats()["segments_recycled"] > recycled
        with pytest.warns(segvec.SegvecWarning, match=r"segvec: complete segments were recycled .*rows since the "
                                                      r"previous take_segments.*num_segments") as caught:
            envs.take_segments(E).release()
        assert len(caught) == 1 and caught[0].filename == __file__
        with no_segvec_warnings():  # once per vector env
            obs = step_on(envs, obs, 20)
            envs.take_segments().release()
    finally:
        envs.close()


def test_the_recycling_warning_can_be_silenced_by_its_message():
    envs = segvec.make_vec(counter_fns(2), num_envs=2, horizon=2, num_segments=4, backend="serial")
    obs, _ = envs.reset(seed=0)
    envs.take_segments().release()
    obs = step_on(envs, obs, 20)
    with no_segvec_warnings():
        warnings.filterwarnings("ignore", message="segvec: complete segments were recycled")
        envs.take_segments().release()
    envs.close()


# ---- episodes the record lost -------------------------------------------------------------------------
def short_cartpole():
    return gymnasium.make("CartPole-v1", max_episode_steps=2)


def test_episode_capacity_is_configurable_and_lost_episodes_warn_once():
    envs = segvec.make_vec(short_cartpole, num_envs=2, backend="serial", horizon=4, episode_capacity=4)
    try:
        assert envs.episode_capacity == 4
        envs.reset(seed=0)
        for _ in range(6):  # 2 episodes of 2 steps per env, a NEXT_STEP reset step after each: 4 episodes
            envs.step(np.zeros(2, np.int64))
        with no_segvec_warnings():
            episodes = envs.episodes()
        assert len(episodes["env_id"]) == 4 and episodes["lost"] == 0
        for _ in range(9):  # 6 more episodes: the record keeps 4
            envs.step(np.zeros(2, np.int64))
        with pytest.warns(segvec.SegvecWarning, match=r"segvec: 2 finished episodes were lost.*keeps the last 4 "
                                                      r"\(episode_capacity\)") as caught:
            episodes = envs.episodes()
        assert caught[0].filename == __file__
        assert len(episodes["env_id"]) == 4 and episodes["lost"] == 2
        for _ in range(9):
            envs.step(np.zeros(2, np.int64))
        with no_segvec_warnings():  # once per vector env; `lost` still counts
            assert envs.episodes()["lost"] == 2
    finally:
        envs.close()


def test_episodes_default_reads_all_the_record_holds_and_max_n_limits():
    envs = segvec.make_vec(short_cartpole, num_envs=2, backend="serial", horizon=4)
    try:
        assert envs.episode_capacity == 1024
        envs.reset(seed=0)
        for _ in range(3 * 700):  # 1400 episodes: more than the record holds
            envs.step(np.zeros(2, np.int64))
        with pytest.warns(segvec.SegvecWarning, match="376 finished episodes were lost"):
            episodes = envs.episodes()
        assert len(episodes["env_id"]) == 1024 and episodes["lost"] == 1400 - 1024
        for _ in range(3 * 5):
            envs.step(np.zeros(2, np.int64))
        assert len(envs.episodes(max_n=4)["env_id"]) == 4 and len(envs.episodes()["env_id"]) == 6
        with pytest.raises(ValueError, match="max_n"):
            envs.episodes(max_n=-1)
    finally:
        envs.close()
    assert segvec.make_vec(short_cartpole, num_envs=300, backend="serial").episode_capacity == 1200
    with pytest.raises(ValueError, match="episode_capacity must be an int >= 1"):
        segvec.make_vec(short_cartpole, num_envs=2, backend="serial", episode_capacity=0)


# ---- an action space shared memory cannot hold ---------------------------------------------------------
class TextActionEnv(gymnasium.Env):
    observation_space = spaces.Box(-1, 1, (1,), np.float32)
    action_space = spaces.Text(8)

    def reset(self, *, seed=None, options=None):
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 0.0, False, False, {}


def test_a_text_action_space_travels_pickled_and_its_error_fits_actions():
    """Actions with no fixed shape travel pickled whatever shared_memory says (as gymnasium's AsyncVectorEnv
    sends every action through a pipe); an action space's message never suggests an observation wrapper."""
    envs = segvec.make_vec(TextActionEnv, num_envs=2, backend="serial")
    envs.reset(seed=0)
    obs, *_ = envs.step(("go", "stop"))
    assert obs.shape == (2, 1)
    envs.close()
    with pytest.raises(TypeError, match=r"As Text\(.*dynamic shape.*shared_memory=False") as raised:
        SpaceLayout(spaces.Text(8), "action").require_shared_memory()
    assert "FlattenObservation" not in str(raised.value) and "shared_memory=False" in str(raised.value)
    with pytest.raises(TypeError, match=r"As Text\(.*shared_memory=False.*FlattenObservation"):
        SpaceLayout(spaces.Text(8), "observation").require_shared_memory()
