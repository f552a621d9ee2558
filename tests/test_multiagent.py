"""Multi-agent envs (segvec/multiagent.py): agent slots against a plain per-agent sequential reference."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segvec
from tests.envs import policy, value_of
from tests.multiagent_envs import AGENTS, CounterParallelEnv, counter_fns, reference_streams

pytest.importorskip("pettingzoo")

GAMMA, LAM = 0.97, 0.9
A = len(AGENTS)


@dataclasses.dataclass
class Config:
    backend: str
    mode: str
    face: str
    num_envs: int
    batch_envs: int
    horizon: int
    sends: int
    seed: int
    max_length: int
    late_joins: bool


def drive(cfg: Config):
    """Runs the vector env: every env gets `cfg.sends` sends of `policy` (values of `value_of`); returns
    the rows taken (with their GAE), the terminations recv/step reported per slot, and the stats."""
    envs = segvec.make_multiagent(counter_fns(cfg.num_envs, cfg.max_length, late_joins=cfg.late_joins),
                                  num_envs=cfg.num_envs, backend=cfg.backend, horizon=cfg.horizon,
                                  autoreset_mode=cfg.mode, value_fn=value_of, batch_size=cfg.batch_envs * A,
                                  **({"num_workers": cfg.num_envs} if cfg.backend == "multiprocessing" else {}))
    rows, reported_ends = [], np.zeros(envs.num_envs, np.int64)
    episodes = []

    def take():
        batch = envs.take_segments()
        advantages, returns = segvec.gae(batch, GAMMA, LAM)
        for i in range(len(batch.env_id)):
            rows.append({key: np.array(getattr(batch, key)[i]) for key in (
                "obs", "action", "reward", "terminated", "truncated", "mask", "value", "next_value",
                "episode_start", "env_id", "length", "start_step")} | {"advantages": advantages[i]})
        batch.release()
        episodes.append(envs.episodes())

    try:
        assert envs.num_envs == cfg.num_envs * A and envs.num_agents == A
        if cfg.face == "step":
            obs, info = envs.reset(seed=cfg.seed)
            assert info["active"].dtype == bool
            for _ in range(cfg.sends):
                obs, reward, term, trunc, info = envs.step(policy(obs), value=value_of(obs))
                reported_ends += term | trunc
                take()
        else:
            envs.async_reset(seed=cfg.seed)
            sent = np.zeros(cfg.num_envs, np.int64)
            while sent.min() < cfg.sends or envs._outstanding:
                obs, reward, term, trunc, info = envs.recv(timeout=20)
                ids = info["env_id"]
                assert len(ids) % A == 0 and len(ids) <= cfg.batch_envs * A
                reported_ends[ids] += term | trunc
                groups = ids.reshape(-1, A)
                assert (groups == groups[:, :1] + np.arange(A)).all(), "an env's slots come together, in order"
                wanted = np.repeat(sent[groups[:, 0] // A] < cfg.sends, A)
                if wanted.any():
                    envs.send(policy(obs[wanted]), ids[wanted], value=value_of(obs[wanted]))
                    sent[groups[wanted[::A], 0] // A] += 1
                take()
                if sent.min() >= cfg.sends and not envs._outstanding:
                    break
        envs.flush()
        take()
        stats = envs.stats()
    finally:
        envs.close()
    return rows, reported_ends, stats, episodes


def check(cfg: Config, rows, reported_ends, stats, episodes):
    total_real = 0
    episode_count = np.zeros(cfg.num_envs * A, np.int64)
    for record in episodes:
        np.add.at(episode_count, record["env_id"], 1)
        np.testing.assert_array_equal(record["env_index"], record["env_id"] // A)
    for e in range(cfg.num_envs):
        streams, env_episodes = reference_streams(e, cfg.seed + e * A, cfg.sends,
                                                  "NextStep" if cfg.mode == "next_step" else "SameStep",
                                                  cfg.max_length, cfg.late_joins)
        whole = [(r, n) for record in episodes for i, r, n in zip(*(record["env_episodes"][k] for k in (
            "env_index", "return", "length"))) if i == e]
        assert [n for _, n in whole] == [n for _, n in env_episodes], f"env {e}: env episode lengths"
        np.testing.assert_allclose([r for r, _ in whole], [r for r, _ in env_episodes], rtol=1e-12,
                                   err_msg=f"env {e}: env episode returns")
        for k, agent in enumerate(AGENTS):
            slot = e * A + k
            ref = streams[agent]
            mine = sorted((r for r in rows if r["env_id"] == slot and r["length"] > 0), key=lambda r: r["start_step"])
            where = f"env {e} agent {agent}"
            position = 0
            for r in mine:
                assert r["start_step"] == position, f"{where}: rows do not chain"
                position += r["length"]
            n = len(ref.obs)
            assert position == n, f"{where}: rows hold {position} slots, the reference {n}"
            if not n:
                continue
            cat = {key: np.concatenate([r[key][:r["length"]] for r in mine]) for key in (
                "action", "reward", "terminated", "truncated", "mask", "value", "next_value", "advantages")}
            obs = np.concatenate([r["obs"][:r["length"]] for r in mine])
            real = np.asarray(ref.real, bool)
            np.testing.assert_array_equal(obs, np.asarray(ref.obs), err_msg=f"{where}: observations")
            np.testing.assert_array_equal(cat["mask"], real, err_msg=f"{where}: mask")
            np.testing.assert_array_equal(cat["action"][real], np.asarray(ref.action)[real], err_msg=f"{where}: actions")
            np.testing.assert_array_equal(cat["reward"], np.asarray(ref.reward, np.float32), err_msg=f"{where}: reward")
            terminated, truncated = np.asarray(ref.terminated, bool), np.asarray(ref.truncated, bool)
            np.testing.assert_array_equal(cat["terminated"], terminated, err_msg=f"{where}: terminated")
            np.testing.assert_array_equal(cat["truncated"], truncated, err_msg=f"{where}: truncated")
            ends = np.cumsum([r["length"] for r in mine])
            np.testing.assert_array_equal(np.asarray([r["obs"][r["length"]] for r in mine]),
                                          np.asarray(ref.after)[ends - 1], err_msg=f"{where}: obs[length]")
            # bootstraps: 0 at terminations, V(final obs) at truncations, V(next observation) elsewhere
            expected = np.zeros(n, np.float32)
            for t in np.flatnonzero(real):
                if terminated[t]:
                    continue
                expected[t] = value_of(ref.final[t]) if truncated[t] else value_of(ref.after[t])
            np.testing.assert_array_equal(cat["next_value"][real], expected[real], err_msg=f"{where}: next_value")
            # GAE: a plain recursion over the reference, cut where the rows end
            advantages, running, row_ends = np.zeros(n), 0.0, set((ends - 1).tolist())
            for t in range(n - 1, -1, -1):
                if not real[t]:
                    running = 0.0
                    continue
                delta = ref.reward[t] + GAMMA * float(expected[t]) - float(value_of(ref.obs[t]))
                stop = terminated[t] or truncated[t] or t in row_ends
                running = delta + (0.0 if stop else GAMMA * LAM * running)
                advantages[t] = running
            np.testing.assert_allclose(cat["advantages"], advantages, rtol=1e-5, atol=1e-5, err_msg=f"{where}: GAE")
            ended = int((real & (terminated | truncated)).sum())
            assert reported_ends[slot] == ended, f"{where}: recv/step reported {reported_ends[slot]} ends, not {ended}"
            assert episode_count[slot] == ended, f"{where}: episodes() has {episode_count[slot]} episodes"
            total_real += int(real.sum())
    assert stats["steps"] == total_real
    assert stats["segments_recycled"] == 0


def config_strategy(backend: str, max_sends: int):
    @st.composite
    def build(draw):
        num_envs = draw(st.integers(1, 3))
        return Config(backend=backend, mode=draw(st.sampled_from(["next_step", "same_step"])),
                      face=draw(st.sampled_from(["step", "async"])), num_envs=num_envs,
                      batch_envs=draw(st.integers(1, num_envs)), horizon=draw(st.integers(1, 12)),
                      sends=draw(st.integers(1, max_sends)), seed=draw(st.integers(0, 10_000)),
                      max_length=draw(st.integers(1, 10)), late_joins=draw(st.booleans()))
    return build()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy("serial", 60))
def test_agent_slots_match_the_sequential_reference_serial(cfg):
    check(cfg, *drive(cfg))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy("multiprocessing", 30))
def test_agent_slots_match_the_sequential_reference_multiprocessing(cfg):
    check(cfg, *drive(cfg))


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_disabled_autoreset_leaves_the_reset_to_the_learner(backend):
    """DISABLED: an env whose agents are all done waits for a reset_mask reset over its slots; rows then hold
    only real transitions, each agent's episodes start where the learner reset."""
    envs = segvec.make_multiagent(counter_fns(2, 6, late_joins=False), num_envs=2, backend=backend, horizon=8,
                                  autoreset_mode="disabled", num_segments=256)
    try:
        obs, info = envs.reset(seed=5)
        ends = resets = 0
        for _ in range(40):
            obs, reward, term, trunc, info = envs.step(policy(obs), value=value_of(obs))
            ends += int((term | trunc).sum())
            done = ~info["active"].reshape(2, A).any(axis=1)
            if done.any():
                obs, info = envs.reset(options={"reset_mask": np.repeat(done, A)})
                assert info["active"][np.repeat(done, A)].all() and (obs[np.repeat(done, A), 2] == 0).all()
                resets += int(done.sum())
        envs.flush()
        batch = envs.take_segments()
        real = batch.mask & (np.arange(8) < batch.length[:, None])
        assert resets > 0 and (batch.mask == (np.arange(8) < batch.length[:, None])).all(), "no mask-False slot"
        stats = envs.stats()
        assert stats["segments_recycled"] == 0
        assert stats["steps"] == int(real.sum()) and stats["episodes"] == ends
        batch.release()
    finally:
        envs.close()


def test_a_receive_that_ends_inside_an_env_completes_it():
    """Slots of one env published in one call can still be popped in two (another worker's slots between
    them in the ready order): recv completes the env, and whole envs past batch_size wait for the next recv."""
    envs = segvec.make_multiagent(counter_fns(3), num_envs=3, backend="serial", horizon=4, batch_size=A)
    try:
        envs.async_reset(seed=0)
        first = envs._core.pop_ready(A + 1)  # env 0 and one slot of env 1, as a pop between publications could
        got = envs._received(first, A, None)
        assert got.tolist() == [0, 1, 2] and envs._undelivered.tolist() == [3, 4, 5]
        obs, *_, info = envs.recv()
        assert info["env_id"].tolist() == [3, 4, 5], "the env held back comes first"
        obs, *_, info = envs.recv()
        assert info["env_id"].tolist() == [6, 7, 8]
    finally:
        envs.close()


# ---- real PettingZoo envs ------------------------------------------------------------------------------
def kaz():
    from pettingzoo.butterfly import knights_archers_zombies_v11

    return knights_archers_zombies_v11.parallel_env(max_cycles=300, spawn_delay=5)


def kaz_aec():
    from pettingzoo.butterfly import knights_archers_zombies_v11

    return knights_archers_zombies_v11.env(max_cycles=120)


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_knights_archers_zombies_agents_that_die_sit_out(backend):
    """Killed agents report terminated once, then write nothing until their env resets; every row holds one
    agent; to_torch and gae work on the slots."""
    torch = pytest.importorskip("torch")
    envs = segvec.make_multiagent(kaz, num_envs=2, backend=backend, horizon=32, num_segments=160,
                                  **({"num_workers": 2} if backend == "multiprocessing" else {}))
    try:
        assert (envs.num_agents, envs.num_envs) == (4, 8)
        assert envs.agent_slot(1, "knight_0") == 6 and envs.slot_agent(6) == (1, "knight_0")
        obs, info = envs.reset(seed=3)
        assert obs.shape == (8, 27, 5) and info["active"].all()
        rng = np.random.default_rng(0)
        active, sat_out = info["active"], 0
        for _ in range(400):
            obs, reward, term, trunc, info = envs.step(rng.integers(0, 6, 8), value=np.zeros(8, np.float32))
            sitting = ~active & ~info["active"]  # out before and after the step: not a reset step
            assert not (term | trunc)[sitting].any(), "an agent that sat out reported its end again"
            assert (reward[sitting] == 0).all()
            sat_out += int(sitting.sum())
            active = info["active"]
        envs.flush()
        batch = envs.take_segments()
        assert sat_out > 0, "no agent died alone in 400 steps of Knights-Archers-Zombies"
        assert set(batch.env_id.tolist()) == set(range(8))
        episodes = envs.episodes()
        assert len(episodes["env_id"]) > 0 and set(episodes["agent_index"].tolist()) <= set(range(4))
        mask = batch.mask.copy()
        # a slot that sat out wrote nothing: the rows hold every send but those
        assert envs.stats()["segments_recycled"] == 0
        assert int(batch.length.sum()) == 400 * 8 - sat_out
        assert envs.stats()["steps"] == int(mask.sum())
        tensors = batch.to_torch()
        assert tuple(tensors.obs.shape) == (len(batch.env_id), 33, 27, 5)
        assert torch.equal(tensors.mask, torch.from_numpy(mask))
        advantages, _ = segvec.gae(batch, 0.99, 0.95)
        assert advantages.shape == mask.shape and (advantages[~mask] == 0).all()
        batch.release()
    finally:
        envs.close()
    envs.close()  # idempotent


def test_an_aec_factory_is_converted_to_parallel():
    envs = segvec.make_multiagent(kaz_aec, num_envs=1, backend="serial", horizon=8)
    try:
        obs, info = envs.reset(seed=0)
        assert envs.possible_agents == ["archer_0", "archer_1", "knight_0", "knight_1"]
        envs.step(np.zeros(4, np.int64))
    finally:
        envs.close()


class ParallelView:
    """One segvec env of a `MultiAgentVecEnv` (of one PettingZoo env) seen as a PettingZoo ParallelEnv:
    what the learner gets from segvec's gymnasium face, turned back into per-agent dicts."""

    metadata = {"name": "segvec_view"}

    def __init__(self, envs):
        self.envs = envs
        self.possible_agents = list(envs.possible_agents)
        self.agents = []
        self._spaces = (envs.single_observation_space, envs.single_action_space)

    @property
    def unwrapped(self):
        return self

    def observation_space(self, agent):
        return self._spaces[0]

    def action_space(self, agent):
        return self._spaces[1]

    def reset(self, seed=None, options=None):
        obs, info = self.envs.reset(seed=seed)
        self.agents = [a for k, a in enumerate(self.possible_agents) if info["active"][k]]
        return {a: obs[k] for k, a in enumerate(self.possible_agents) if a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        live = list(self.agents)
        batch = np.array([actions.get(a, 0) for a in self.possible_agents])
        obs, reward, term, trunc, info = self.envs.step(batch)
        active = info["active"]
        present = [a for k, a in enumerate(self.possible_agents) if a in live or active[k]]
        self.agents = [a for k, a in enumerate(self.possible_agents) if active[k]]
        index = {a: k for k, a in enumerate(self.possible_agents)}
        return ({a: obs[index[a]] for a in present}, {a: float(reward[index[a]]) for a in present},
                {a: bool(term[index[a]]) for a in present}, {a: bool(trunc[index[a]]) for a in present},
                {a: {} for a in present})

    def close(self):
        self.envs.close()


@pytest.mark.parametrize("factory", [kaz, counter_fns(1, 6)[0]], ids=["knights_archers_zombies", "counter"])
def test_pettingzoo_parallel_api_test_through_segvec(factory):
    from pettingzoo.test import parallel_api_test

    view = ParallelView(segvec.make_multiagent(factory, num_envs=1, backend="serial", horizon=16))
    try:
        parallel_api_test(view, num_cycles=200)
    finally:
        view.close()


# ---- faults -----------------------------------------------------------------------------------------
def failing_fns(num_envs: int, bad: int, fail_at=(0, 1)):
    from tests.multiagent_envs import CounterParallelEnv
    import functools

    return [functools.partial(CounterParallelEnv, i, 50, False, fail_at if i == bad else None)
            for i in range(num_envs)]


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_an_env_that_raises_names_its_env_and_slots(backend):
    envs = segvec.make_multiagent(failing_fns(2, bad=1), num_envs=2, backend=backend, horizon=8)
    try:
        obs, _ = envs.reset(seed=0)
        envs.step(policy(obs))
        with pytest.raises(segvec.EnvError, match=r"multi-agent env 1 \(agent slots 3\.\.5\)") as caught:
            envs.step(policy(obs))
        assert isinstance(caught.value, RuntimeError)
        assert "env 1 fails at step 1" in caught.value.worker_traceback
        assert caught.value.env_index in (3, 4, 5)
        obs, _ = envs.reset(seed=1)  # the step raised the error of each of the env's slots, the last one last
        envs.step(policy(obs))
    finally:
        envs.close()


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_restart_failed_envs_restarts_every_slot_of_the_env(backend):
    envs = segvec.make_multiagent(failing_fns(2, bad=0, fail_at=(0, 2)), num_envs=2, backend=backend,
                                  horizon=16, restart_failed_envs=True)
    try:
        obs, _ = envs.reset(seed=0)
        restarted = 0
        for _ in range(6):
            obs, reward, term, trunc, info = envs.step(policy(obs), value=value_of(obs))
            if info.get("env_restarted") is not None and info["_env_restarted"].any():
                assert info["_env_restarted"].tolist() == [True] * A + [False] * A
                assert trunc[:A].all() and not trunc[A:].any()
                assert (obs[:A, 1] == 0).all(), "the rebuilt env starts at its episode 0 again"
                restarted += 1
        assert restarted >= 1
        assert envs.stats()["restarts"] == restarted * A
        envs.flush()
        batch = envs.take_segments()
        for slot in range(A):  # the transition cut by the restart is truncated, bootstrapped by V(obs it failed on)
            rows = np.flatnonzero(batch.env_id == slot)
            t = np.flatnonzero(batch.truncated[rows[0]])
            assert len(t) >= 1 and np.isfinite(batch.next_value[rows[0], t]).all()
        batch.release()
    finally:
        envs.close()


def test_a_killed_worker_is_replaced_and_its_envs_restart():
    import os
    import signal

    envs = segvec.make_multiagent(counter_fns(2, 50, late_joins=False), num_envs=2, backend="multiprocessing",
                                  num_workers=2, horizon=8, restart_failed_envs=True)
    try:
        obs, _ = envs.reset(seed=0)
        obs, *_ = envs.step(policy(obs))
        os.kill(envs._backend.processes[1].pid, signal.SIGKILL)
        seen = False
        for _ in range(20):
            obs, reward, term, trunc, info = envs.step(policy(obs))
            if "_env_restarted" in info and info["_env_restarted"].any():
                assert info["_env_restarted"][A:].all() and not info["_env_restarted"][:A].any()
                seen = True
        assert seen
    finally:
        envs.close()


# ---- bad input --------------------------------------------------------------------------------------
class Uneven(CounterParallelEnv):
    def observation_space(self, agent):
        return super().observation_space(agent) if agent != "a1" else __import__("gymnasium").spaces.Discrete(3)


def test_bad_input_gets_clear_errors():
    with pytest.raises(segvec.SpaceMismatchError, match="pad_observations_v0"):
        segvec.make_multiagent(Uneven, num_envs=2, backend="serial")
    with pytest.raises(ValueError, match="multiple of num_agents=3"):
        segvec.make_multiagent(counter_fns(2)[0], num_envs=2, backend="serial", batch_size=4)
    with pytest.raises(ValueError, match="num_workers must divide num_envs=3"):
        segvec.make_multiagent(counter_fns(3)[0], num_envs=3, backend="multiprocessing", num_workers=2)
    with pytest.raises(TypeError, match="zero-argument callable"):
        segvec.make_multiagent(CounterParallelEnv(), num_envs=2)
    envs = segvec.make_multiagent(counter_fns(2), num_envs=2, backend="serial", horizon=4)
    try:
        with pytest.raises(ValueError, match="env_index must be in"):
            envs.agent_slot(2, "a0")
        with pytest.raises(ValueError, match="unknown agent"):
            envs.agent_slot(0, "b0")
        with pytest.raises(ValueError, match="slot must be in"):
            envs.slot_agent(6)
        envs.async_reset(seed=0)
        obs, *_, info = envs.recv()
        with pytest.raises(ValueError, match=r"envs \[1\] are named in part"):
            envs.send(policy(obs[:4]), info["env_id"][:4])
        envs.send(policy(obs), info["env_id"])  # nothing was sent by the refused call
        envs.recv()
        with pytest.raises(ValueError, match="reset_mask"):
            envs.reset(options={"reset_mask": np.array([1, 1, 0, 0, 0, 0], bool)})
    finally:
        envs.close()
    with pytest.raises(segvec.ClosedEnvironmentError):
        envs.step(np.zeros(6, np.int64))


def test_sb3_adapter_presents_agent_slots_as_envs():
    pytest.importorskip("stable_baselines3")
    from segvec.integrations.sb3 import SB3VecEnv

    envs = segvec.make_multiagent(counter_fns(2, 6), num_envs=2, backend="serial", horizon=8,
                                  autoreset_mode="same_step")
    venv = SB3VecEnv(envs)
    try:
        assert venv.num_envs == 6
        obs = venv.reset()
        assert obs.shape == (6, 4)
        ends = 0
        for _ in range(30):
            venv.step_async(policy(obs))
            obs, rewards, dones, infos = venv.step_wait()
            ends += int(dones.sum())
            assert all("terminal_observation" in infos[i] for i in np.flatnonzero(dones))
        assert ends > 0
    finally:
        venv.close()
