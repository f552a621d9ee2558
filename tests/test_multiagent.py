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
                                  **({"num_workers": 1} if cfg.backend == "multiprocessing" else {}))
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
        streams = reference_streams(e, cfg.seed + e * A, cfg.sends, "NextStep" if cfg.mode == "next_step" else "SameStep",
                                    cfg.max_length, cfg.late_joins)
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


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy("serial", 40))
def test_agent_slots_match_the_sequential_reference_serial(cfg):
    check(cfg, *drive(cfg))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy("multiprocessing", 30))
def test_agent_slots_match_the_sequential_reference_multiprocessing(cfg):
    check(cfg, *drive(cfg))
