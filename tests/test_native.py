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

    def obtainable(self, needed: int, completing: int) -> bool:
        """Rows free or complete before the call come first; rows the call completes are recycled only
        while the learner holds no taken row."""
        return needed <= self.available() or (not self.taken and needed <= self.available() + completing)

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
        self.core = self.storage.core.handle
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
        if not m.obtainable(len(needs_spare), awaiting):
            assert status == lib.SEGVEC_ERR_NO_FREE_ROW, "a send that needs rows nobody can give must fail"
            assert (self.storage.env_state[ids] == lib.SEGVEC_ENV_HELD).all(), "and change nothing"
            self.check()
            return False
        assert status == 0
        if len(needs_spare) <= m.available():  # spares first, so the rows this send completes stay
            for e in needs_spare:
                m.spare[e] = m.reserve(e)
            needs_spare = []
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
        needed = [e for e in env_ids if m.env_step[e] > 0 and m.spare[e] is None]
        if not m.obtainable(len(needed), sum(m.awaiting[e] is not None for e in env_ids) + len(needed)):
            assert status == lib.SEGVEC_ERR_NO_FREE_ROW, "a flush that needs rows nobody can give must fail"
            self.check()  # ... and change nothing
            return False
        assert status == 0
        if len(needed) <= m.available():  # new rows first, so the rows this flush closes stay
            for e in needed:
                m.spare[e] = m.reserve(e)
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
    h = Harness(E=2, S=7, T=1)
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


def test_a_learner_that_never_takes_never_blocks():
    """With no row taken, a send may recycle the rows it completes itself (S = 2E, T = 1: nothing else)."""
    h = Harness(E=2, S=4, T=1)
    for _ in range(10):
        assert h.step([0, 1], [True, True])
    assert h.model.recycled > 0


def test_release_of_a_row_named_twice_fails_and_changes_nothing():
    h = Harness(E=1, S=3, T=1)
    assert h.step([0], [True])
    assert h.flush([0])
    h.take(1)
    row = sorted(h.model.taken)[0]
    h.release([row, row])  # the harness expects SEGVEC_ERR_ROW_STATE and an unchanged core
    h.release([row])
    assert h.step([0], [True]) and h.step([0], [True])




# ---- env states across workers ----------------------------------------------------------------------
class Core:
    """A bare core with `W` workers for driving env states by hand."""

    def __init__(self, E=4, W=2, S=16, T=2):
        geometry = Geometry.make(E, W, S, T, spaces.Box(-1, 1, (2,), np.float32), spaces.Discrete(2), poison=True)
        self.storage = Storage(geometry, shared=False)
        self.core, self.E, self.W, self.T = self.storage.core.handle, E, W, T
        ids = i32(range(E))
        assert lib.segvec_begin_resets(self.core, E, ffi.from_buffer("int32_t[]", ids)) == 0
        assert lib.segvec_commit_resets(self.core, E, ffi.from_buffer("int32_t[]", ids),
                                        ffi.from_buffer("int64_t[]", np.empty(E, np.int64))) == 0

    def call(self, fn, env_ids, *args):
        ids = i32(env_ids)
        return fn(self.core, len(ids), ffi.from_buffer("int32_t[]", ids), *args)

    def pop(self, max_n):
        out, n = np.empty(self.E, np.int32), ffi.new("int32_t *")
        assert lib.segvec_pop_ready(self.core, max_n, ffi.from_buffer("int32_t[]", out, require_writable=True), n) == 0
        return out[:n[0]].tolist()

    def send(self, env_ids, values):
        n = len(env_ids)
        slots, starts = np.empty(n, np.int64), np.empty(n, np.uint8)
        status = self.call(lib.segvec_prepare_send, env_ids, ffi.from_buffer("float[]", np.float32(values)),
                           ffi.NULL, 0, ffi.from_buffer("int64_t[]", slots), ffi.from_buffer("uint8_t[]", starts))
        if status == 0:
            assert self.call(lib.segvec_dispatch, env_ids) == 0
        return status, slots

    def commit(self, env_ids, terminated=False):
        n = len(env_ids)
        outcomes = ffi.new("segvec_outcome_t[]", n)
        for i in range(n):
            outcomes[i].reward, outcomes[i].valid, outcomes[i].terminated = 1.0, 1.0, float(terminated)
        obs, chain = np.empty(n, np.int64), np.empty(n, np.int64)
        assert self.call(lib.segvec_commit_steps, env_ids, outcomes, ffi.from_buffer("int64_t[]", obs),
                         ffi.from_buffer("int64_t[]", chain)) == 0
        return obs

    def state(self, e):
        return int(self.storage.env_state[e])


def test_envs_come_out_in_publication_order_across_workers():
    c = Core(E=6, W=3)
    for order in ([4, 0, 2, 5, 1, 3], [1, 5, 3, 0, 4, 2]):
        for e in order:  # one env at a time, from different workers' queues
            assert c.call(lib.segvec_publish, [e]) == 0
        assert c.pop(2) + c.pop(1) + c.pop(6) == order
        assert all(c.state(e) == lib.SEGVEC_ENV_HELD for e in order)
        for e in order:
            assert c.send([e], [0.0])[0] == 0
        for w in range(3):  # each worker gets its envs' actions in dispatch order
            popped, n = ffi.new("int32_t[]", 6), ffi.new("int32_t *")
            assert lib.segvec_worker_pop(c.core, w, 6, popped, n) == 0
            assert list(popped[0:n[0]]) == [e for e in order if e // 2 == w]
        c.commit(order)


def test_a_failed_env_is_the_learners_until_it_is_reset():
    c = Core()
    assert c.call(lib.segvec_publish, [0, 1, 2, 3]) == 0 and c.pop(4) == [0, 1, 2, 3]
    assert c.send([0, 1, 2, 3], [0, 0, 0, 0])[0] == 0
    c.commit([0, 2, 3])
    assert c.call(lib.segvec_fail_envs, [1]) == 0
    assert c.state(1) == lib.SEGVEC_ENV_FAILED
    counted = ffi.new("int32_t *")
    assert lib.segvec_count_envs(c.core, lib.SEGVEC_MASK_OUTSTANDING, counted) == 0 and counted[0] == 3
    assert c.send([1], [0.0])[0] == lib.SEGVEC_ERR_NOT_HELD, "no action for a failed env"
    out = np.empty(1, np.int64)
    assert c.call(lib.segvec_flush_envs, [1], ffi.NULL, ffi.from_buffer("int64_t[]", out),
                  ffi.from_buffer("int64_t[]", np.empty(1, np.int64))) == 0
    assert c.call(lib.segvec_begin_resets, [1]) == 0 and c.state(1) == lib.SEGVEC_ENV_RESETTING
    assert c.call(lib.segvec_flush_envs, [1], ffi.NULL, ffi.from_buffer("int64_t[]", out),
                  ffi.from_buffer("int64_t[]", np.empty(1, np.int64))) == lib.SEGVEC_ERR_NOT_HELD, \
        "a resetting env's cursor is its worker's: a retried reset must not flush it"


def test_returned_envs_are_held_again_with_their_actions_unapplied():
    c = Core()
    assert c.call(lib.segvec_publish, [0, 1]) == 0 and c.pop(2) == [0, 1]
    status, slots = c.send([0, 1], [0.5, 0.5])
    assert status == 0 and c.call(lib.segvec_return_envs, [0, 1]) == 0
    assert [c.state(0), c.state(1)] == [lib.SEGVEC_ENV_HELD] * 2
    status, again = c.send([0, 1], [0.7, 0.7])
    assert status == 0 and (again == slots).all(), "the same slots: nothing was applied"


def test_a_restart_in_place_truncates_the_transition_before_it():
    c = Core(E=2, W=1, T=4)
    assert c.call(lib.segvec_publish, [0, 1]) == 0 and c.pop(2) == [0, 1]
    s = c.storage
    for value in (10.0, 11.0):  # two steps: slots 0 and 1 of env 0's row
        assert c.send([0], [value])[0] == 0
        c.commit([0])
        assert c.call(lib.segvec_publish, [0]) == 0 and c.pop(1) == [0]
    assert c.send([0], [12.0])[0] == 0  # the action at slot 2 meets a broken env: restart instead
    row, obs_slot = int(s.env_row[0]), np.empty(1, np.int64)
    assert lib.segvec_restart_env(c.core, 0, ffi.from_buffer("int64_t[]", obs_slot)) == 0
    assert obs_slot[0] == row * 5 + 2 and int(s.env_step[0]) == 2, "same row, same slot"
    assert s.truncated[row, 1] and s.truncation_value[row, 1] == 12.0 and s.episode_start[row, 2]
    assert np.isnan(s.value[row, 2]) and s.env_last_truncated[0]
    next_values = np.empty(4, np.float32)
    s.row_length[row] = 3  # as if the row were closed after the restarted env's next step
    assert lib.segvec_fill_next_values(c.core, 1, ffi.from_buffer("int32_t[]", i32([row])), 0,
                                       ffi.from_buffer("float[]", next_values)) == 0
    assert next_values[0] == 11.0 and next_values[1] == 12.0, "the cut episode bootstraps from the value sent"
    s.row_length[row] = 0
    assert lib.segvec_restart_env(c.core, 0, ffi.from_buffer("int64_t[]", obs_slot)) == 0
    assert s.truncation_value[row, 1] == 12.0, "a second restart at the same slot keeps the first cut"


def test_a_skipped_step_writes_nothing_and_reports_no_outcome():
    """segvec_skip_steps (an agent slot that sits out): the cursor and rows stay as they are, the previous
    outcome reads 0 / not ended, and sends after it overwrite the same slot without reserving a second spare."""
    c = Core(E=2, W=1, T=2)
    assert c.call(lib.segvec_publish, [0, 1]) == 0 and c.pop(2) == [0, 1]
    s = c.storage
    assert c.call(lib.segvec_skip_steps, [0]) == lib.SEGVEC_ERR_NOT_HELD, "only an env in flight can sit out"
    assert c.send([0], [1.0])[0] == 0
    c.commit([0], terminated=True)  # slot 0 ends the agent's episode; the cursor is at the row's last slot
    assert c.call(lib.segvec_publish, [0]) == 0 and c.pop(1) == [0]
    row, steps, free = int(s.env_row[0]), s.stats()["steps"], []
    for value in (2.0, 3.0):
        assert c.send([0], [value])[0] == 0
        free.append(s.stats()["free_rows"])
        assert c.call(lib.segvec_skip_steps, [0]) == 0
        assert (int(s.env_row[0]), int(s.env_step[0])) == (row, 1), "the cursor stays"
        assert not s.env_last_terminated[0] and s.env_last_reward[0] == 0.0 and s.env_last_slot[0] == -1
        assert c.call(lib.segvec_publish, [0]) == 0 and c.pop(1) == [0]
    assert s.value[row, 1] == 3.0 and not s.mask[row, 1], "the last send's value, no transition"
    assert s.stats()["steps"] == steps and free[0] == free[1], "one spare row, however many sends"


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 3), steps=st.integers(0, 6), stage=st.sampled_from(["queued", "committed", "published",
                                                                              "half_published", "resetting"]))
def test_a_dead_workers_envs_roll_back_to_the_slot_they_were_sent_at(T, steps, stage):
    """Whatever a worker did with a step before dying, recover_worker puts the env back at the slot it was
    sent at (or keeps it, when it was published whole), and the bookkeeping after that is as if the lost
    step never happened."""
    c = Core(E=2, W=2, S=8, T=T)
    s = c.storage
    assert c.call(lib.segvec_publish, [0, 1]) == 0 and c.pop(2) == [0, 1]
    for _ in range(steps):
        assert c.send([1], [1.0])[0] == 0
        c.commit([1])
        assert c.call(lib.segvec_publish, [1]) == 0 and c.pop(1) == [1]
    before = (int(s.env_row[1]), int(s.env_step[1]), s.row_state.copy(), s.row_length.copy())
    if stage == "resetting":
        assert c.call(lib.segvec_begin_resets, [1]) == 0 or int(s.env_step[1]) != 0
        if c.state(1) != lib.SEGVEC_ENV_RESETTING:
            return
    else:
        assert c.send([1], [2.0])[0] == 0
        before = (int(s.env_row[1]), int(s.env_step[1]), s.row_state.copy(), s.row_length.copy())
        if stage != "queued":
            c.commit([1])
        if stage == "published":
            assert c.call(lib.segvec_publish, [1]) == 0
        if stage == "half_published":
            s.env_state[1] = lib.SEGVEC_ENV_READY  # died between the state store and the queue's tail
    lost, n = np.empty(1, np.int32), ffi.new("int32_t *")
    assert lib.segvec_recover_worker(c.core, 1, ffi.from_buffer("int32_t[]", lost), n) == 0
    if stage in ("published", "resetting"):
        assert n[0] == 0 and c.state(1) == (lib.SEGVEC_ENV_READY if stage == "published" else lib.SEGVEC_ENV_RESETTING)
        return
    assert n[0] == 1 and lost[0] == 1 and c.state(1) == lib.SEGVEC_ENV_IN_FLIGHT
    row, step, states, lengths = before
    assert (int(s.env_row[1]), int(s.env_step[1])) == (row, step)
    spare = set(np.nonzero(s.row_state == RESERVED)[0].tolist())
    assert (s.row_state[[r for r in range(8) if r not in spare]] == states[[r for r in range(8) if r not in spare]]).all()
    assert (s.row_length == lengths).all() and not s.mask[row, step]
    obs_slot = np.empty(1, np.int64)
    assert lib.segvec_restart_env(c.core, 1, ffi.from_buffer("int64_t[]", obs_slot)) == 0
    assert obs_slot[0] == row * (T + 1) + step
    assert c.call(lib.segvec_publish, [1]) == 0 and c.pop(2) == [1]
    for _ in range(2 * T + 1):  # the env goes on through row switches as if nothing happened
        assert c.send([1], [3.0])[0] == 0
        c.commit([1])
        assert c.call(lib.segvec_publish, [1]) == 0 and c.pop(1) == [1]
    starts = sorted((int(s.row_start_step[r]), int(s.row_length[r])) for r in range(8)
                    if s.row_env_id[r] == 1 and s.row_state[r] in (AWAITING, COMPLETE))
    for (a, la), (b, _) in zip(starts, starts[1:]):
        assert b == a + la, "rows of the env chain without gap or overlap"
