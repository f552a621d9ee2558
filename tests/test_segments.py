"""Segments against a plain sequential reference: every transition exactly once, in order, with the right
bootstraps and the right GAE.

The driver runs `CounterEnv`s (whose observations say ``(env, episode, step)``) through the async face or
``step()`` in NEXT_STEP, SAME_STEP or (``step()`` only) DISABLED mode; between steps it takes segments (and
releases them at once), flushes, or resets with a new seed; at the end it flushes and takes the rest.  The
checker rebuilds each env's stream of slots from the taken rows alone and compares it, slot for slot, with
`envs.reference_slots` of that env (same seeds, same deterministic policy): observations, actions, rewards,
terminations, truncations, masks, values, bootstraps (``next_value``), GAE, and what recv/step returned.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segvec
from conftest import backend_options
from envs import counter_fns, policy, reference_slots, value_of

NEXT, SAME, DISABLED = AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED
POISON = np.float32(-42.42)
GAMMA, LAM = 0.97, 0.9


def batched_value(obs) -> np.ndarray:
    """The `value_fn` given to segvec: the same function as `value_of`, counted to prove it was used."""
    batched_value.calls += 1
    return value_of(obs)


batched_value.calls = 0


@dataclasses.dataclass
class Config:
    backend: str
    mode: AutoresetMode
    face: str               # "async" (async_reset/recv/send) or "step" (reset/step)
    num_envs: int
    batch_size: int
    horizon: int
    segments_per_env: int   # num_segments = segments_per_env * num_envs
    seed: int
    max_length: int
    use_value_fn: bool
    iterations: int


@dataclasses.dataclass
class Run:
    """What the driver saw: rows taken (per env), what each env was given, sends, flush points, phases."""

    rows: dict            # env -> list of dicts (one per taken row)
    received: dict        # env -> list of (phase, slot in phase, obs, reward, terminated, truncated, final_obs)
    sends: np.ndarray     # [E] actions sent to each env (= slots it filled)
    flush_points: dict    # env -> set of slot counts at which a flush or reset closed its rows
    phases: dict          # env -> list of (seed, first slot): a reset with a seed starts a phase
    stats: dict


def collect(batch, run: Run) -> None:
    """Copies every row of `batch` (filling SAME_STEP truncation values from `final_obs`), then releases."""
    final_obs, positions = batch.final_obs
    if len(positions):
        assert np.isnan(batch.next_value[positions[:, 0], positions[:, 1]]).all(), \
            "next_value must be NaN where the truncation value is not known yet"
        batch.set_truncation_values(value_of(final_obs))
    advantages, returns = segvec.gae(batch, GAMMA, LAM)
    assert advantages.shape == returns.shape == batch.reward.shape == batch.mask.shape
    assert batch.obs.shape[1] == batch.reward.shape[1] + 1
    for i in range(len(batch)):
        length = int(batch.length[i])
        # learner fields land where they were sent: step fields per slot, segment fields at slot 0
        np.testing.assert_array_equal(batch.seen[i, :length], batch.obs[i, :length])
        np.testing.assert_array_equal(batch.first_seen[i], batch.obs[i, 0])
        assert (np.diff(batch.policy_version[i, :length]) >= 0).all()
        finals = {int(t): final_obs[j].copy() for j, (row, t) in enumerate(positions) if row == i}
        run.rows[int(batch.env_id[i])].append(dict(
            start=int(batch.start_step[i]), length=length, obs=batch.obs[i, :length + 1].copy(),
            action=batch.action[i, :length].copy(), reward=batch.reward[i, :length].copy(),
            terminated=batch.terminated[i, :length].copy(), truncated=batch.truncated[i, :length].copy(),
            mask=batch.mask[i].copy(), value=batch.value[i, :length].copy(),
            next_value=batch.next_value[i, :length].copy(), episode_start=batch.episode_start[i, :length].copy(),
            advantages=advantages[i].copy(), returns=returns[i].copy(), finals=finals))
    batch.release()
    with pytest.raises(RuntimeError):
        batch.reward  # noqa: B018 - a released batch cannot be read


def drive(cfg: Config, choose, choose_op=None, env_fns=None, make=None, pending=None) -> Run:
    """Runs the envs of `cfg`; ``choose(k)`` picks an int in [0, k] (hypothesis data or a fixed schedule),
    ``choose_op()`` what the learner does after a step: 0 nothing, 1 take some, 2 take all, 3 flush,
    4 reset with a new seed (default ``choose(4)``).  `env_fns`: the envs' factories (default
    ``counter_fns``; any env that behaves as `CounterEnv` does, e.g. its C port).

    Between steps the learner takes some or all complete rows, flushes, or resets every env with a new
    seed; in DISABLED mode it resets ended envs with ``reset_mask`` after every step.

    ``make(**options)`` builds the vector env of `CounterEnv`s (default: `segvec.make_vec` on
    ``cfg.backend``).  ``pending(envs)``: True while sent envs cannot land before others are sent (an
    engine that steps every env at once); the async face then goes on receiving and sending before a flush.
    """
    E = cfg.num_envs
    options = dict(
        num_envs=E, autoreset_mode=cfg.mode, horizon=cfg.horizon,
        batch_size=cfg.batch_size, num_segments=cfg.segments_per_env * E, debug=True,
        value_fn=batched_value if cfg.use_value_fn else None, step_fields={"seen": ((4,), np.float64)},
        segment_fields={"first_seen": ((4,), np.float64)})
    if make is None:
        envs = segvec.make_vec(env_fns or counter_fns(E, cfg.max_length), **options, **backend_options(cfg.backend, E))
    else:
        envs = make(**options)
    run = Run(rows={e: [] for e in range(E)}, received={e: [] for e in range(E)}, sends=np.zeros(E, np.int64),
              flush_points={e: set() for e in range(E)}, phases={e: [(cfg.seed + e, 0)] for e in range(E)},
              stats={})
    S = envs.num_segments
    reseeds = iter(range(cfg.seed + 1000, cfg.seed + 10 ** 6, 1000))

    def note(env_ids, obs, rewards, terminated, truncated, infos):
        for j, e in enumerate(np.asarray(env_ids).tolist()):
            final = None
            if "_final_obs" in infos and infos["_final_obs"][j]:
                final = np.asarray(infos["final_obs"][j])
            phase = len(run.phases[e]) - 1
            slot = int(run.sends[e]) - run.phases[e][-1][1]
            run.received[e].append((phase, slot, obs[j].copy(), float(rewards[j]), bool(terminated[j]),
                                    bool(truncated[j]), final))

    def closed_rows(env_ids):
        for e in env_ids:
            run.flush_points[e].add(int(run.sends[e]))

    def maybe_take():
        """Returns the new observations after a reset (step face), else None."""
        choice = choose_op() if choose_op is not None else choose(4)
        ready = envs.segments_ready
        if ready > S - 4 * E and choice < 2:  # keep room: a learner that does not take loses its oldest
            choice = 2  # rows (by design); between two takes an env can fill two rows (one step in flight)
        if choice == 1 and ready:
            collect(envs.take_segments(choose(ready)), run)
        elif choice == 2:
            collect(envs.take_segments(), run)
            assert envs.segments_ready == 0
        elif choice == 3:
            collect(envs.take_segments(), run)
            settle()
            envs.flush()
            closed_rows(range(E))
            collect(envs.take_segments(), run)
        elif choice == 4:
            collect(envs.take_segments(), run)
            seed = next(reseeds)
            settle()
            for e in range(E):
                run.phases[e].append((seed + e, int(run.sends[e])))
            closed_rows(range(E))
            if cfg.face == "async":
                envs.async_reset(seed=seed)
            else:
                obs, infos = envs.reset(seed=seed)
                note(np.arange(E), obs, np.zeros(E), np.zeros(E, bool), np.zeros(E, bool), infos)
                collect(envs.take_segments(), run)
                return obs
            collect(envs.take_segments(), run)
        return None

    def async_step():
        obs, rewards, terminated, truncated, infos = envs.recv()
        env_ids = infos["env_id"]
        assert 1 <= len(env_ids) <= cfg.batch_size and len(set(env_ids.tolist())) == len(env_ids)
        note(env_ids, obs, rewards, terminated, truncated, infos)
        envs.policy_version += 1
        envs.send(policy(obs), env_ids, value=value_of(obs), seen=obs, first_seen=obs)
        run.sends[env_ids] += 1

    def settle():
        while cfg.face == "async" and pending is not None and pending(envs):
            async_step()

    try:
        if cfg.face == "async":
            envs.async_reset(seed=cfg.seed)
            for _ in range(cfg.iterations):
                async_step()
                maybe_take()
        else:
            obs, infos = envs.reset(seed=cfg.seed)
            note(np.arange(E), obs, np.zeros(E), np.zeros(E, bool), np.zeros(E, bool), infos)
            for _ in range(cfg.iterations):
                envs.policy_version += 1
                result = envs.step(policy(obs), value=value_of(obs), seen=obs, first_seen=obs)
                run.sends += 1
                obs = result[0]
                note(np.arange(E), *result)
                ended = result[2] | result[3]
                if cfg.mode == DISABLED and ended.any():
                    collect(envs.take_segments(), run)
                    closed_rows(np.nonzero(ended)[0].tolist())
                    obs, _ = envs.reset(options={"reset_mask": ended})
                    collect(envs.take_segments(), run)
                reset_obs = maybe_take()
                if reset_obs is not None:
                    obs = reset_obs
        collect(envs.take_segments(), run)
        settle()
        envs.flush()
        closed_rows(range(E))
        collect(envs.take_segments(), run)
        assert envs.segments_ready == 0
        with pytest.raises(ValueError, match="ready"):
            envs.take_segments(1)
        run.stats = envs.stats()
    finally:
        envs.close()
    return run


def check(cfg: Config, run: Run) -> None:
    E, T = cfg.num_envs, cfg.horizon
    total_real = total_episodes = 0
    for e in range(E):
        rows = sorted(run.rows[e], key=lambda r: r["start"])
        n = int(run.sends[e])
        # ---- the rows of an env chain without gaps or overlaps ----
        starts = [r["start"] for r in rows]
        assert len(set(starts)) == len(starts), f"env {e}: two rows start at the same step"
        held = sum(r["length"] for r in rows)
        assert held == n, f"env {e}: rows hold {held} slots, sent {n}"
        position = 0
        for row in rows:
            assert 1 <= row["length"] <= T
            assert row["start"] == position, f"env {e}: row starts at {row['start']}, expected {position}"
            position += row["length"]
            assert not row["mask"][row["length"]:].any(), "mask must be False past length"
        if n == 0:
            continue
        ends = np.cumsum([r["length"] for r in rows])
        # ---- the reference, slot for slot (one phase per reset with a seed) ----
        bounds = [first for _, first in run.phases[e]] + [n]
        phases = [(seed, bounds[p + 1] - bounds[p]) for p, (seed, _) in enumerate(run.phases[e])]
        ref_phases = reference_slots(e, phases, cfg.mode.value, cfg.max_length)
        for p, first in enumerate(bounds[1:-1]):
            assert first in {0, *ends.tolist()}, f"env {e}: a reset at slot {first} did not close its row"
        ref = {key: np.concatenate([getattr(r, key) for r in ref_phases]) for key in
               ("obs", "action", "reward", "terminated", "truncated", "real", "next_obs", "after")}
        cat = {key: np.concatenate([r[key] for r in rows]) for key in
               ("action", "reward", "terminated", "truncated", "value", "next_value", "episode_start")}
        cat["mask"] = np.concatenate([r["mask"][:r["length"]] for r in rows])
        cat["advantages"] = np.concatenate([r["advantages"][:r["length"]] for r in rows])
        cat["returns"] = np.concatenate([r["returns"][:r["length"]] for r in rows])
        obs = np.concatenate([r["obs"][:-1] for r in rows])
        after_rows = np.asarray([r["obs"][-1] for r in rows])
        real = ref["real"]
        np.testing.assert_array_equal(obs, ref["obs"], err_msg=f"env {e}: observations differ from the reference")
        np.testing.assert_array_equal(after_rows, ref["after"][ends - 1],
                                      err_msg=f"env {e}: obs[length] of a row is not the env's next observation")
        np.testing.assert_array_equal(cat["mask"], real, err_msg=f"env {e}: mask")
        np.testing.assert_array_equal(cat["action"][real], ref["action"][real], err_msg=f"env {e}: actions")
        np.testing.assert_array_equal(cat["reward"][real], ref["reward"][real].astype(np.float32),
                                      err_msg=f"env {e}: rewards")
        np.testing.assert_array_equal(cat["terminated"], ref["terminated"], err_msg=f"env {e}: terminated")
        np.testing.assert_array_equal(cat["truncated"], ref["truncated"], err_msg=f"env {e}: truncated")
        assert not (cat["reward"][real] == POISON).any(), f"env {e}: a poison reward survived into a segment"
        assert (cat["reward"][~real] == 0).all()
        np.testing.assert_array_equal(cat["episode_start"], obs[:, 2] == 0, err_msg=f"env {e}: episode_start")
        np.testing.assert_array_equal(cat["value"], value_of(obs), err_msg=f"env {e}: value")
        total_real += int(real.sum())
        total_episodes += int((ref["terminated"] | ref["truncated"]).sum())
        # ---- bootstraps: 0 at terminations, V(final obs) at truncations, V(next obs) elsewhere ----
        flushed_ends = {int(x) for x in ends} & run.flush_points[e]
        exp_next = np.full(n, np.nan)
        for k in np.nonzero(real)[0]:
            if ref["terminated"][k]:
                exp_next[k] = 0.0
            elif ref["truncated"][k] and cfg.mode == SAME:
                exp_next[k] = value_of(ref["next_obs"][k])
            elif k + 1 in flushed_ends and not cfg.use_value_fn:
                exp_next[k] = np.nan  # a flushed row's tail is unknown without value_fn
            else:
                exp_next[k] = value_of(ref["after"][k])
        np.testing.assert_array_equal(cat["next_value"][real], exp_next[real].astype(np.float32),
                                      err_msg=f"env {e}: next_value")
        # ---- SAME_STEP final observations of truncations (no value_fn) ----
        if cfg.mode == SAME and not cfg.use_value_fn:
            found = {int(ends[a] - r["length"] + t): o for a, r in enumerate(rows) for t, o in r["finals"].items()}
            wanted = np.nonzero(real & ref["truncated"] & ~ref["terminated"])[0].tolist()
            assert sorted(found) == wanted, f"env {e}: final_obs positions {sorted(found)} != {wanted}"
            for k in wanted:
                np.testing.assert_array_equal(found[k], ref["next_obs"][k])
        # ---- GAE: a plain Python recursion over the reference, cut where the rows end ----
        adv = np.zeros(n)
        running = 0.0
        row_end = set(int(x) - 1 for x in ends)
        for k in range(n - 1, -1, -1):
            if not real[k]:
                running = 0.0
                continue
            bootstrap = 0.0 if ref["terminated"][k] else exp_next[k]
            delta = ref["reward"][k] + GAMMA * bootstrap - value_of(ref["obs"][k])
            stop = ref["terminated"][k] or ref["truncated"][k] or k in row_end
            running = delta + (0.0 if stop else GAMMA * LAM * running)
            adv[k] = running
        np.testing.assert_allclose(cat["advantages"], adv, rtol=1e-5, atol=1e-5, err_msg=f"env {e}: GAE")
        np.testing.assert_allclose(cat["returns"][real], (adv + cat["value"])[real], rtol=1e-5, atol=1e-5)
        assert (cat["advantages"][~real] == 0).all()
        # ---- what recv/step returned: the state after k slots of a phase ----
        for phase, k, got_obs, reward, term, trunc, final in run.received[e]:
            slots = ref_phases[phase]
            if k == 0:
                np.testing.assert_array_equal(got_obs, slots.start_obs, err_msg=f"env {e}: reset observation")
                assert (reward, term, trunc) == (0.0, False, False)
                continue
            np.testing.assert_array_equal(got_obs, slots.after[k - 1], err_msg=f"env {e}: observation returned")
            assert (reward, term, trunc) == (slots.reward[k - 1], slots.terminated[k - 1], slots.truncated[k - 1])
            ended = slots.terminated[k - 1] or slots.truncated[k - 1]
            assert (final is not None) == (cfg.mode == SAME and ended), f"env {e}: final_obs info at {k}"
            if final is not None:
                np.testing.assert_array_equal(final, slots.next_obs[k - 1])
    assert run.stats["segments_recycled"] == 0
    assert run.stats["steps"] == total_real
    assert run.stats["episodes"] == total_episodes


def config_strategy(backend: str, max_envs: int, max_iterations: int):
    @st.composite
    def build(draw):
        num_envs = draw(st.integers(1, max_envs))
        face = draw(st.sampled_from(["async", "step"]))
        modes = [NEXT, SAME, DISABLED] if face == "step" else [NEXT, SAME]  # DISABLED: gymnasium face only
        return Config(
            backend=backend, mode=draw(st.sampled_from(modes)), face=face,
            num_envs=num_envs, batch_size=draw(st.integers(1, num_envs)), horizon=draw(st.integers(1, 64)),
            segments_per_env=draw(st.integers(4, 6)), seed=draw(st.integers(0, 10_000)),
            max_length=draw(st.integers(1, 12)), use_value_fn=draw(st.booleans()),
            iterations=draw(st.integers(1, max_iterations)))
    return build()


OPS = st.sampled_from([0] * 12 + [1] * 3 + [2] * 2 + [3] + [4])  # mostly stepping on; rows fill up


def _exactly_once(cfg, data):
    run = drive(cfg, lambda k: data.draw(st.integers(0, k)), lambda: data.draw(OPS))
    check(cfg, run)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy("serial", 6, 150), data=st.data())
def test_exactly_once_serial(cfg, data):
    _exactly_once(cfg, data)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy("multiprocessing", 6, 120), data=st.data())
def test_exactly_once_multiprocessing(cfg, data):
    _exactly_once(cfg, data)


def _cycle(*choices):
    """A fixed take/flush schedule for `drive`: cycles through `choices` (clipped to [0, k])."""
    state = {"i": 0}

    def choose(k):
        value = choices[state["i"] % len(choices)]
        state["i"] += 1
        return min(value, k)
    return choose


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_gae_next_step_via_step(backend):
    cfg = Config(backend, NEXT, "step", num_envs=4, batch_size=4, horizon=7, segments_per_env=4, seed=3,
                 max_length=6, use_value_fn=False, iterations=90)
    run = drive(cfg, _cycle(0, 2, 0, 1, 1))
    check(cfg, run)


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_gae_same_step_async_with_value_fn(backend):
    batched_value.calls = 0
    cfg = Config(backend, SAME, "async", num_envs=4, batch_size=2, horizon=5, segments_per_env=4, seed=11,
                 max_length=5, use_value_fn=True, iterations=150)
    run = drive(cfg, _cycle(2, 0, 1, 1, 3, 0))
    check(cfg, run)
    assert batched_value.calls > 0, "value_fn must give the truncation values"


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_same_step_without_value_fn_exposes_final_obs(backend):
    cfg = Config(backend, SAME, "step", num_envs=2, batch_size=2, horizon=6, segments_per_env=4, seed=5,
                 max_length=4, use_value_fn=False, iterations=60)
    E = cfg.num_envs
    envs = segvec.make_vec(counter_fns(E, cfg.max_length), num_envs=E, autoreset_mode=SAME, horizon=cfg.horizon,
                           num_segments=4 * E, **backend_options(backend, E))
    try:
        obs, _ = envs.reset(seed=cfg.seed)
        truncations = 0
        for _ in range(cfg.iterations):
            obs, _, term, trunc, _ = envs.step(policy(obs), value=value_of(obs))
            truncations += int((trunc & ~term).sum())
        batch = envs.take_segments()
        final_obs, positions = batch.final_obs
        assert truncations > 0 and 0 < len(positions) <= truncations
        rows, ts = positions[:, 0], positions[:, 1]
        assert batch.truncated[rows, ts].all() and not batch.terminated[rows, ts].any()
        assert np.isnan(batch.next_value[rows, ts]).all()
        known = batch.mask & ~(batch.truncated & ~batch.terminated)
        known[:, -1] = False  # tails come from the next send; all known here, but keep the check local
        assert not np.isnan(batch.next_value[known]).any()
        assert (final_obs[:, 2] > 0).all(), "final observations are never an episode's first"
        batch.set_truncation_values(value_of(final_obs))
        np.testing.assert_array_equal(batch.next_value[rows, ts], value_of(final_obs))
        with pytest.raises(ValueError, match="truncation values"):
            batch.set_truncation_values(np.zeros(len(positions) + 1))
        batch.release()
    finally:
        envs.close()


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_a_learner_that_never_takes_never_blocks(backend):
    E, T = 2, 3
    envs = segvec.make_vec(counter_fns(E), num_envs=E, horizon=T, num_segments=2 * E, **backend_options(backend, E))
    try:
        obs, _ = envs.reset(seed=0)
        for _ in range(60):
            obs = envs.step(policy(obs), value=value_of(obs))[0]
        stats = envs.stats()
        assert stats["segments_recycled"] > 0
        assert envs.segments_ready <= envs.num_segments
        assert stats["segments_completed"] - stats["segments_recycled"] == envs.segments_ready
        batch = envs.take_segments()  # the newest rows survive, whole
        for i in range(len(batch)):
            assert batch.length[i] == T and batch.mask[i].any()
        starts = sorted(zip(batch.env_id.tolist(), batch.start_step.tolist()))
        assert all(start % T == 0 for _, start in starts)
        batch.release()
    finally:
        envs.close()


@pytest.mark.parametrize("mode", [NEXT, SAME], ids=lambda m: m.name)
@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_structured_observations_in_segments(backend, mode):
    """Dict observations: rows hold what step() returned, leaf by leaf; SAME_STEP final_obs is a dict."""
    from envs import DictEnv

    E, T = 2, 5
    envs = segvec.make_vec(DictEnv, num_envs=E, horizon=T, autoreset_mode=mode, num_segments=40 * E,
                           **backend_options(backend, E))
    try:
        obs, _ = envs.reset(seed=3)
        seen = [obs]
        truncations = {}  # (env, slot) -> final observation
        rng = np.random.default_rng(0)
        for k in range(30):
            obs, _, term, trunc, infos = envs.step(rng.integers(0, 3, E))
            seen.append(obs)
            for e in np.nonzero(trunc & ~term)[0]:
                if mode == SAME:
                    truncations[(int(e), k)] = infos["final_obs"][e]
        envs.flush()
        batch = envs.take_segments()
        assert isinstance(batch.obs, dict) and set(batch.obs) == {"position", "count", "flags"}
        for key, leaf in batch.obs.items():
            assert leaf.shape[:2] == (len(batch), T + 1)
            assert leaf.dtype == envs.single_observation_space[key].dtype
        final_obs, positions = batch.final_obs
        assert isinstance(final_obs, dict) and len(positions) == len(truncations)
        for e in range(E):
            rows = sorted(np.nonzero(batch.env_id == e)[0], key=lambda i: batch.start_step[i])
            for key in batch.obs:
                stream = np.concatenate([batch.obs[key][i, :batch.length[i]] for i in rows]
                                        + [batch.obs[key][rows[-1], batch.length[rows[-1]]][None]])
                np.testing.assert_array_equal(stream, np.stack([o[key][e] for o in seen]), err_msg=key)
            for j, (i, t) in enumerate(positions.tolist()):
                if batch.env_id[i] == e:
                    expected = truncations[(e, int(batch.start_step[i] + t))]
                    for key in final_obs:
                        np.testing.assert_array_equal(final_obs[key][j], expected[key])
        batch.release()
    finally:
        envs.close()


def whole_episode_gae(slots, gamma: float, lam: float) -> np.ndarray:
    """The textbook recursion over whole episodes of a reference rollout (real transitions only):
    bootstrap 0 at terminations, V(final observation) at truncations, V(next observation) at the end of
    the data; the advantage flows back through each episode and stops at its end."""
    real = np.nonzero(slots.real)[0]
    advantages = np.zeros(len(real))
    running = 0.0
    for i in range(len(real) - 1, -1, -1):
        k = real[i]
        ended = slots.terminated[k] or slots.truncated[k]
        bootstrap = 0.0 if slots.terminated[k] else float(value_of(slots.next_obs[k]))
        delta = slots.reward[k] + gamma * bootstrap - float(value_of(slots.obs[k]))
        running = delta + (0.0 if ended or i == len(real) - 1 else gamma * lam * running)
        advantages[i] = running
    return advantages


@pytest.mark.parametrize("mode, face", [(NEXT, "step"), (SAME, "async")], ids=["NEXT_STEP-step", "SAME_STEP-async"])
@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_gae_equals_whole_episode_gae_when_a_row_holds_the_run(backend, mode, face):
    """With rows longer than the run, GAE inside a row is GAE over whole reference episodes."""
    E, T = 2, 170  # more slots than either env can fill: one row per env
    envs = segvec.make_vec(counter_fns(E, 7), num_envs=E, horizon=T, autoreset_mode=mode, value_fn=value_of,
                           batch_size=1 if face == "async" else E, **backend_options(backend, E))
    try:
        if face == "step":
            obs, _ = envs.reset(seed=21)
            for _ in range(80):
                obs = envs.step(policy(obs), value=value_of(obs))[0]
        else:
            envs.async_reset(seed=21)
            for _ in range(160):
                obs, _, _, _, info = envs.recv()
                envs.send(policy(obs), info["env_id"], value=value_of(obs))
        envs.flush()
        batch = envs.take_segments()
        assert sorted(batch.env_id.tolist()) == list(range(E)), "one row per env"
        advantages, returns = segvec.gae(batch, GAMMA, LAM)
        for i, e in enumerate(batch.env_id.tolist()):
            length = int(batch.length[i])
            slots = reference_slots(e, [(21 + e, length)], mode.value, 7)[0]
            mask = batch.mask[i, :length]
            np.testing.assert_array_equal(mask, slots.real)
            assert (slots.terminated | slots.truncated).sum() >= 3, "several whole episodes"
            expected = whole_episode_gae(slots, GAMMA, LAM)
            np.testing.assert_allclose(advantages[i, :length][mask], expected, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(returns[i, :length][mask], expected + batch.value[i, :length][mask],
                                       rtol=1e-5, atol=1e-5)
        batch.release()
    finally:
        envs.close()


def assert_rows_consistent(batch) -> None:
    """Rows of `CounterEnv`s, SAME_STEP: each slot follows from the one before (same env, next step of the
    episode, or the first step of the next episode after an ending)."""
    for i in range(len(batch)):
        length = int(batch.length[i])
        obs = batch.obs[i, :length + 1]
        assert (obs[:, 0] == batch.env_id[i]).all(), "a row holds steps of one env"
        for t in range(length):
            ended = batch.terminated[i, t] or batch.truncated[i, t]
            expected = (obs[t, 1] + 1, 0) if ended else (obs[t, 1], obs[t, 2] + 1)
            assert (obs[t + 1, 1], obs[t + 1, 2]) == expected, f"row {i}: slot {t + 1} does not follow slot {t}"
        assert batch.mask[i, :length].all() and not (batch.reward[i, :length] == POISON).any()


@pytest.mark.parametrize("face", ["async", "step"])
@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_a_learner_holding_every_row_pauses_the_envs(backend, face):
    """While the learner holds the rows the envs need, they pause (no worker waits, nothing hangs): the send
    that would need one raises SegmentBufferExhausted saying to release, having sent nothing, and after a
    release the same send goes through."""
    E = 4
    envs = segvec.make_vec(counter_fns(E, 5), num_envs=E, horizon=3, num_segments=2 * E, autoreset_mode=SAME,
                           batch_size=1 if face == "async" else E, debug=True, **backend_options(backend, E))
    held: list = []

    def release_all():
        for batch in held:
            assert_rows_consistent(batch)
            batch.release()
        held.clear()

    def retrying(call):
        for _ in range(2):
            try:
                return call()
            except segvec.SegmentBufferExhausted as error:
                assert held and "release" in str(error).lower()
                retrying.raised += 1
                release_all()
        raise AssertionError("a release must let the envs go on")

    retrying.raised = 0
    try:
        if face == "async":
            envs.async_reset(seed=4)
            for i in range(120):
                obs, _, _, _, info = retrying(envs.recv)
                retrying(lambda: envs.send(policy(obs), info["env_id"], value=value_of(obs)))
                if envs.segments_ready:
                    held.append(envs.take_segments())  # held across the next steps
                if i % 40 == 39:
                    release_all()
        else:
            obs, _ = envs.reset(seed=4)
            for i in range(60):
                obs = retrying(lambda: envs.step(policy(obs), value=value_of(obs)))[0]
                if envs.segments_ready:
                    held.append(envs.take_segments())
                if i % 20 == 19:
                    release_all()
        release_all()
        envs.flush()
        batch = envs.take_segments()
        assert_rows_consistent(batch)
        batch.release()
        stats = envs.stats()
        assert retrying.raised > 0, "the scenario must run out of rows"
        assert stats["rolled_back"] == 0
        assert stats["segments_taken"] + stats["segments_recycled"] == stats["segments_completed"]
    finally:
        envs.close()
