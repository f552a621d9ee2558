"""The C core's row bookkeeping, driven through cffi against a plain Python model of it.

Random sequences of send+step (commit), flush, take and release on one core; after every operation the
row states, counters, FIFO order and the contents of taken rows must match the model.  Then the env
states: failures, returns, restarts in place, and a dead worker's envs rolled back by recover_worker.
"""
from __future__ import annotations

import numpy as np
from gymnasium import spaces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segvec._core import Geometry, Storage
from segvec._native import ffi, lib

FREE, FILLING, AWAITING, COMPLETE, TAKEN, RESERVED = (
    lib.SEGVEC_ROW_FREE, lib.SEGVEC_ROW_FILLING, lib.SEGVEC_ROW_AWAITING_BOOTSTRAP, lib.SEGVEC_ROW_COMPLETE,
    lib.SEGVEC_ROW_TAKEN, lib.SEGVEC_ROW_RESERVED)
POISON = np.float32(lib.SEGVEC_POISON_REWARD_MILLI / 1000)


def i32(values) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.int32)


def reward_code(env: int, step: int) -> float:
    """A reward that names its env and slot, exact in float32."""
    return float(env * 10_000 + step)


class Model:
    """What the core should hold: per row its state and contents, the two FIFOs, each env's cursor and
    spare row (reserved at the send of a row's last slot)."""

    def __init__(self, E: int, S: int, T: int):
        self.E, self.S, self.T = E, S, T
        self.state = {r: FREE for r in range(S)}
        self.free = list(range(S))
        self.complete: list[int] = []
        self.taken: set[int] = set()
        self.content: dict[int, dict] = {}
        self.env_row, self.env_step = {}, {}
        self.awaiting: dict[int, int | None] = {}
        self.spare: dict[int, int | None] = {e: None for e in range(E)}
        self.steps_done = {e: 0 for e in range(E)}
        self.recycled = self.completed = self.taken_count = 0
        for e in range(E):
            self.env_row[e] = self.start(e, self.reserve(e))
            self.env_step[e] = 0
            self.awaiting[e] = None

    def available(self) -> int:
        return len(self.free) + len(self.complete)

    def reserve(self, env: int) -> int:
        if self.free:
            row = self.free.pop(0)
        else:
            row = self.complete.pop(0)
            self.recycled += 1
        self.state[row] = RESERVED
        self.content.pop(row, None)
        return row

    def start(self, env: int, row: int) -> int:
        self.state[row] = FILLING
        self.content[row] = {"env": env, "start": self.steps_done[env], "rewards": [], "tail": None}
        return row

    def complete_row(self, row: int, tail) -> None:
        self.state[row] = COMPLETE
        self.content[row]["tail"] = tail
        self.complete.append(row)
        self.completed += 1


class Harness:
    """One core (plain memory, one worker) and its model; every operation checks the invariants."""

    def __init__(self, E: int, S: int, T: int):
        geometry = Geometry.make(E, 1, S, T, spaces.Box(-1, 1, (2,), np.float32), spaces.Discrete(2), poison=True)
        self.storage = Storage(geometry, shared=False)
        self.core = self.storage.core
        self.model = Model(E, S, T)
        self.E, self.S, self.T = E, S, T
        self.snapshots: dict[int, tuple] = {}
        ids = i32(range(E))
        slots = np.empty(E, np.int64)
        assert lib.segvec_begin_resets(self.core, E, ffi.from_buffer("int32_t[]", ids)) == 0
        assert lib.segvec_commit_resets(self.core, E, ffi.from_buffer("int32_t[]", ids),
                                        ffi.from_buffer("int64_t[]", slots, require_writable=True)) == 0
        np.testing.assert_array_equal(slots, np.arange(E) * (T + 1))  # env e starts in row e
        assert lib.segvec_publish(self.core, E, ffi.from_buffer("int32_t[]", ids)) == 0
        self._pop_ready(E)
        self.check()

    def _pop_ready(self, n: int) -> np.ndarray:
        out = np.empty(self.E, np.int32)
        count = ffi.new("int32_t *")
        assert lib.segvec_pop_ready(self.core, self.E, ffi.from_buffer("int32_t[]", out, require_writable=True),
                                    count) == 0
        assert count[0] == n
        return out[:n]

    # ---- operations ------------------------------------------------------------------------------
    def step(self, env_ids: list[int], valid: list[bool]) -> bool:
        """Sends to `env_ids` and commits one step each; False when the core (rightly) ran out of rows."""
        m, core, n = self.model, self.core, len(env_ids)
        ids = i32(env_ids)
        ids_ptr = ffi.from_buffer("int32_t[]", ids)
        values = np.asarray([0.5 + e for e in env_ids], np.float32)
        slots, starts = np.empty(n, np.int64), np.empty(n, np.uint8)
        status = lib.segvec_prepare_send(core, n, ids_ptr, ffi.from_buffer("float[]", values), ffi.NULL, 7,
                                         ffi.from_buffer("int64_t[]", slots, require_writable=True),
                                         ffi.from_buffer("uint8_t[]", starts, require_writable=True))
        needs_spare = [e for e in env_ids if m.env_step[e] == self.T - 1 and m.spare[e] is None]
        awaiting = sum(m.awaiting[e] is not None for e in env_ids)
        if len(needs_spare) > m.available() + awaiting:
            assert status == lib.SEGVEC_ERR_NO_FREE_ROW, "a send that needs rows nobody can give must fail"
            assert (self.storage.env_state[ids] == lib.SEGVEC_ENV_HELD).all(), "and change nothing"
            self.check()
            return False
        assert status == 0
        for i, e in enumerate(env_ids):
            assert slots[i] == m.env_row[e] * self.T + m.env_step[e]
            assert starts[i] == (m.env_step[e] == 0)
            if m.awaiting[e] is not None:
                m.complete_row(m.awaiting[e], float(values[i]))
                m.awaiting[e] = None
        for e in needs_spare:
            m.spare[e] = m.reserve(e)
        assert lib.segvec_dispatch(core, n, ids_ptr) == 0
        popped = np.empty(self.E, np.int32)
        count = ffi.new("int32_t *")
        assert lib.segvec_worker_pop(core, 0, self.E, ffi.from_buffer("int32_t[]", popped, require_writable=True),
                                     count) == 0
        np.testing.assert_array_equal(popped[:count[0]], ids)  # dispatch order
        outcomes = ffi.new("segvec_outcome_t[]", n)
        for i, e in enumerate(env_ids):
            outcomes[i].reward = reward_code(e, m.steps_done[e]) if valid[i] else 0.0
            outcomes[i].terminated = float(m.steps_done[e] % 3 == 0)
            outcomes[i].valid = float(valid[i])
        obs_slots, chain = np.empty(n, np.int64), np.empty(n, np.int64)
        # the model, env by env in call order: a full row waits for its bootstrap, the env moves to its spare
        expected_chain = []
        for i, e in enumerate(env_ids):
            row, t = m.env_row[e], m.env_step[e]
            m.content[row]["rewards"].append(outcomes[i].reward)
            m.steps_done[e] += 1
            if t + 1 == self.T:
                m.state[row] = AWAITING
                m.awaiting[e] = row
                m.env_row[e], m.env_step[e] = m.start(e, m.spare[e]), 0
                m.spare[e] = None
                expected_chain.append(row * (self.T + 1) + self.T)
            else:
                m.env_step[e] = t + 1
                expected_chain.append(-1)
        status = lib.segvec_commit_steps(core, n, ids_ptr, outcomes,
                                         ffi.from_buffer("int64_t[]", obs_slots, require_writable=True),
                                         ffi.from_buffer("int64_t[]", chain, require_writable=True))
        assert status == 0, "a worker's commit never fails (nor waits) once the send went through"
        np.testing.assert_array_equal(chain, expected_chain)
        for i, e in enumerate(env_ids):
            assert obs_slots[i] == m.env_row[e] * (self.T + 1) + m.env_step[e]
        assert lib.segvec_publish(core, n, ids_ptr) == 0
        np.testing.assert_array_equal(self._pop_ready(n), ids)  # publication order
        self.check()
        return True

    def flush(self, env_ids: list[int]) -> bool:
        m, n = self.model, len(env_ids)
        ids = i32(env_ids)
        tails = np.asarray([100.0 + e for e in env_ids], np.float32)
        copy_from, copy_to = np.empty(n, np.int64), np.empty(n, np.int64)
        status = lib.segvec_flush_envs(self.core, n, ffi.from_buffer("int32_t[]", ids),
                                       ffi.from_buffer("float[]", tails),
                                       ffi.from_buffer("int64_t[]", copy_from, require_writable=True),
                                       ffi.from_buffer("int64_t[]", copy_to, require_writable=True))
        needed = sum(m.env_step[e] > 0 and m.spare[e] is None for e in env_ids)
        if needed > m.available() + sum(m.awaiting[e] is not None for e in env_ids):
            assert status == lib.SEGVEC_ERR_NO_FREE_ROW, "a flush that needs rows nobody can give must fail"
            self.check()  # ... and change nothing
            return False
        assert status == 0
        expected = []
        for i, e in enumerate(env_ids):
            if m.awaiting[e] is not None:
                m.complete_row(m.awaiting[e], float(tails[i]))
                m.awaiting[e] = None
            row, t = m.env_row[e], m.env_step[e]
            if t == 0:
                expected.append((-1, -1))
                continue
            m.complete_row(row, float(tails[i]))
            fresh = m.spare[e] if m.spare[e] is not None else m.reserve(e)
            m.spare[e] = None
            m.env_row[e], m.env_step[e] = m.start(e, fresh), 0
            expected.append((row * (self.T + 1) + t, m.env_row[e] * (self.T + 1)))
        assert list(zip(copy_from.tolist(), copy_to.tolist())) == expected
        self.check()
        return True

    def take(self, n: int) -> None:
        m = self.model
        rows = np.empty(max(n, 1), np.int32)
        status = lib.segvec_take(self.core, n, ffi.from_buffer("int32_t[]", rows, require_writable=True))
        if n > len(m.complete):
            assert status == lib.SEGVEC_ERR_NOT_ENOUGH
            self.check()
            return
        assert status == 0
        expected, m.complete = m.complete[:n], m.complete[n:]
        assert rows[:n].tolist() == expected, "take must hand out the oldest complete rows first"
        for row in expected:
            m.state[row] = TAKEN
            m.taken.add(row)
            self.snapshots[row] = self._snapshot(row)
        m.taken_count += n
        self.check()

    def release(self, rows: list[int]) -> None:
        m = self.model
        status = lib.segvec_release(self.core, len(rows), ffi.from_buffer("int32_t[]", i32(rows)))
        if not all(r in m.taken for r in rows) or len(set(rows)) != len(rows):
            # a row that is not taken, or one named twice (its second release finds it free): nothing changes
            assert status == lib.SEGVEC_ERR_ROW_STATE, "release of a row that is not taken must fail"
            self.check()
            return
        assert status == 0
        for row in rows:
            m.taken.discard(row)
            m.state[row] = FREE
            m.free.append(row)
            del self.snapshots[row]
        self.check()

    # ---- invariants ------------------------------------------------------------------------------
    def _snapshot(self, row: int) -> tuple:
        s = self.storage
        return (int(s.row_env_id[row]), int(s.row_start_step[row]), int(s.row_length[row]),
                s.reward[row].copy(), float(s.tail_value[row]))

    def check(self) -> None:
        m, s = self.model, self.storage
        stats = s.stats()
        states = s.row_state.copy()
        assert set(np.unique(states).tolist()) <= {FREE, FILLING, AWAITING, COMPLETE, TAKEN, RESERVED}
        assert states.tolist() == [m.state[r] for r in range(self.S)], "row states differ from the model"
        counts = {k: int((states == k).sum()) for k in (FREE, FILLING, AWAITING, COMPLETE, TAKEN, RESERVED)}
        assert sum(counts.values()) == self.S
        assert counts[FREE] == len(m.free) == stats["free_rows"]
        assert counts[COMPLETE] == len(m.complete) == stats["complete_rows"]
        assert counts[FILLING] == self.E
        assert counts[AWAITING] == sum(r is not None for r in m.awaiting.values())
        assert counts[TAKEN] == len(m.taken)
        assert counts[RESERVED] == sum(r is not None for r in m.spare.values())
        assert all(s.row_env_id[r] == e for e, r in m.spare.items() if r is not None)
        assert stats["segments_recycled"] == m.recycled
        assert stats["segments_completed"] == m.completed
        assert stats["segments_taken"] == m.taken_count
        for e in range(self.E):
            row = m.env_row[e]
            assert int(s.env_row[e]) == row and int(s.env_step[e]) == m.env_step[e]
            assert s.row_state[row] == FILLING and s.row_env_id[row] == e
            assert (s.reward[row, m.env_step[e]:] == POISON).all(), "a filling row's fresh slots hold poison"
        for row, content in m.content.items():
            if m.state[row] in (COMPLETE, TAKEN, AWAITING):
                length = len(content["rewards"])
                assert s.row_env_id[row] == content["env"] and s.row_start_step[row] == content["start"]
                assert s.row_length[row] == length
                np.testing.assert_array_equal(s.reward[row, :length], np.float32(content["rewards"]))
                if m.state[row] != AWAITING:
                    assert float(s.tail_value[row]) == content["tail"]
        for row in m.taken:  # taken rows are never recycled nor written
            env, start, length, reward, tail = self.snapshots[row]
            assert (int(s.row_env_id[row]), int(s.row_start_step[row]), int(s.row_length[row])) == (env, start, length)
            np.testing.assert_array_equal(s.reward[row], reward)
            assert float(s.tail_value[row]) == tail


@st.composite
def scenarios(draw):
    E = draw(st.integers(1, 4))
    S = draw(st.integers(2 * E, 4 * E + 2))
    T = draw(st.integers(1, 5))
    ops = draw(st.lists(st.tuples(st.sampled_from(["step", "step", "step", "flush", "take", "release"]),
                                  st.integers(0, 2 ** 16)), max_size=80))
    return E, S, T, ops


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_row_bookkeeping_matches_model(scenario):
    E, S, T, ops = scenario
    h = Harness(E, S, T)
    for op, arg in ops:
        rng = np.random.default_rng(arg)
        if op == "step":
            ids = sorted(rng.choice(E, size=int(rng.integers(1, E + 1)), replace=False).tolist())
            rng.shuffle(ids)
            if not h.step(ids, (rng.random(len(ids)) < 0.8).tolist()):
                return  # out of rows: every row is held by the learner or an env (reported, as it must be)
        elif op == "flush":
            ids = rng.choice(E, size=int(rng.integers(1, E + 1)), replace=False).tolist()
            if not h.flush(ids):
                return
        elif op == "take":
            h.take(int(rng.integers(0, len(h.model.complete) + 2)))
        elif h.model.taken or arg % 5 == 0:
            pool = sorted(h.model.taken) or [int(arg % S)]
            rows = rng.choice(pool, size=int(rng.integers(1, len(pool) + 1)), replace=False).tolist()
            if arg % 4 == 0:
                rows.append(rows[0])  # twice in one call
            h.release(rows)


def test_take_is_fifo_and_taken_rows_survive_recycling():
    """A learner holding rows while envs run on: only untaken complete rows are recycled, oldest first."""
    h = Harness(E=2, S=5, T=1)
    h.step([0, 1], [True, True])
    h.step([0, 1], [True, True])  # rows of step 0 complete (bootstrap known)
    h.take(1)
    taken = sorted(h.model.taken)
    for _ in range(6):
        assert h.step([1, 0], [True, True])
    assert h.model.recycled > 0
    assert sorted(h.model.taken) == taken
    h.release(taken)
    h.release(taken)  # twice: the rows are free now


def test_out_of_rows_is_reported_by_the_send_that_needs_a_row():
    h = Harness(E=1, S=2, T=1)
    assert h.step([0], [True])  # row 0 waits for its bootstrap, row 1 fills
    assert h.flush([0])         # row 0 completes (row 1 has no step yet: kept)
    h.take(1)                   # the learner holds row 0
    assert not h.step([0], [True]), "row 1's last slot needs a spare and none is free: the send must say so"
    h.release(sorted(h.model.taken))
    assert h.step([0], [True]), "after a release the same send goes through"


def test_release_of_a_row_named_twice_fails_and_changes_nothing():
    h = Harness(E=1, S=3, T=1)
    assert h.step([0], [True])
    assert h.flush([0])
    h.take(1)
    row = sorted(h.model.taken)[0]
    h.release([row, row])  # the harness expects SEGVEC_ERR_ROW_STATE and an unchanged core
    h.release([row])
    assert h.step([0], [True]) and h.step([0], [True])


