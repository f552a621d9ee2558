/* segvec.h -- the segment core of segvec: the design, in one header.
 *
 * Data flow of one step:
 *
 *   learner send -> env cursor -> worker step -> segment row -> completed queue -> learner take
 *
 * The core lives in ONE block of memory (shared memory for the multiprocessing backend, plain memory for
 * the serial one) that every process maps.  The block holds the bookkeeping below and the fixed-dtype
 * per-step arrays; observations, actions and user fields (whose dtypes depend on the spaces) are laid out
 * by Python right after it.  Every array is segment-major:
 *
 *   row r of the buffer = `horizon` consecutive steps of ONE env;  slot (r, t) = step t of row r.
 *
 *   terminated, truncated, mask, episode_start,
 *   logprob, policy_version                              [num_segments, horizon]
 *   reward, value, truncation_value, next_value          [num_segments, horizon, value_heads]
 *   row_env_id, row_length, row_start_step               [num_segments]
 *   tail_value                                           [num_segments, value_heads]
 *   observations (Python)                                [num_segments, horizon + 1, *obs_shape]
 *
 * Value heads: every value the learner sends, every bootstrap and every reward is a vector of
 * `value_heads` (H) floats, head-minor (slot (r, t) head h at (r * T + t) * H + h).  The bootstrap rules
 * hold head by head; the env's own scalar reward (the outcome a worker commits) goes to every head and
 * counts in the episode statistics; a runner with one reward per head overwrites the heads after the
 * commit, before it publishes the env.  H = 1 is the plain scalar case: the same bytes as a [S, T] array.
 *
 * Ownership is handed over, never shared: an env is owned by the learner (NEW, HELD, SENDING, FAILED) or
 * by its worker (RESETTING, IN_FLIGHT) until the worker publishes it (READY), and only the owner touches
 * the env's cursor and current slot.  The hand-over goes through per-worker queues with release/acquire
 * ordering, so the cursor itself needs no atomics:
 *   - the action queue of worker w (single producer: learner, single consumer: worker w),
 *   - the ready queue of worker w (single producer: worker w, single consumer: learner); each entry has
 *     a stamp from one global counter, and the learner receives envs in stamp order across the queues.
 *
 * Rows: only the learner allocates, completes, takes and releases rows (the row pool, its FIFOs and
 * counters are the learner's, guarded by a mutex of the learner's process for learners with threads).
 * Workers never wait for a row and never hold a lock: when a send hands an env its action for the last
 * slot of its row, the learner reserves the env's next row first (a spare), and the worker that fills the
 * row moves the env's cursor onto that spare.  A worker that dies, at any instruction, therefore leaves
 * nothing locked; the learner rolls its envs back to the slot they were sent at (see
 * segvec_recover_worker) and a replacement restarts them.  New rows come from the free FIFO, else the
 * oldest complete row nobody took is recycled; a row completed by the same call is recycled only when the
 * learner holds no taken row.  A send (or flush) that needs rows the learner holds fails
 * (SEGVEC_ERR_NO_FREE_ROW) before it changes anything: release, then send again.
 *
 * A row's life:  FREE -> RESERVED -> FILLING -> AWAITING_BOOTSTRAP -> COMPLETE -> TAKEN -> FREE
 *   - RESERVED: the spare of an env that is about to fill its current row.
 *   - FILLING: an env writes step after step into it.
 *   - AWAITING_BOOTSTRAP: all `horizon` steps are written; the tail bootstrap (the value the learner sends
 *     for the env's next observation) is not known yet.  The learner's next send for that env completes it.
 *   - COMPLETE: in the completed FIFO; `take` hands it out, or an allocation that finds no free row
 *     recycles the oldest one (counted in `segments_recycled`), so a learner that never takes never
 *     blocks the envs.
 *   - TAKEN: the learner holds it until `release`.
 * A flush (and every reset) closes a FILLING row early as a partial segment (FILLING -> COMPLETE).
 *
 * An env's life:  NEW -> RESETTING -> READY -> HELD -> SENDING -> IN_FLIGHT -> READY -> HELD ...
 *   - an env whose reset or step raises becomes FAILED (its cursor untouched); only a reset revives it;
 *   - an agent slot whose agent is gone from its multi-agent env sits its steps out (segvec_skip_steps):
 *     IN_FLIGHT -> READY with nothing written to its rows, until its env resets;
 *   - a step the serial backend could not run (Ctrl-C) returns the env to HELD, its action unapplied.
 *
 * Waiting: a short spin, then up to 50 us of checks that yield the core between them (a hand-over that
 * comes soon needs no wake-up), then a futex on a 32-bit sequence word (Linux; elsewhere a short sleep),
 * always in slices of at most ~500 ms so the caller can look after dead processes and Ctrl-C.  Nobody
 * burns a core while idle.
 *
 * Every function returns an int status (SEGVEC_OK or a negative code, see segvec_strerror); out
 * parameters come last.  "learner only" / "worker w only" / "any process" say who may call a function.
 */
#ifndef SEGVEC_H
#define SEGVEC_H

#include <stdatomic.h>
#include <stdint.h>

/* SEGVEC_CDEF_BEGIN */

enum {
    SEGVEC_VERSION = 4,
    SEGVEC_MAX_WORKERS = 1024,
    SEGVEC_POISON_REWARD_MILLI = -42420   /* debug builds fill fresh rewards with -42.42 */
};

enum segvec_status {
    SEGVEC_OK = 0,
    SEGVEC_ERR_INVALID = -1,         /* a size or argument out of range */
    SEGVEC_ERR_LAYOUT = -2,          /* the memory block is too small or not a segvec block */
    SEGVEC_ERR_NO_FREE_ROW = -3,     /* every row is held (taken by the learner and not released) */
    SEGVEC_ERR_NOT_HELD = -4,        /* the env is not the caller's now (not received, failed, or named twice) */
    SEGVEC_ERR_NOT_ENOUGH = -5,      /* take asked for more complete rows than there are */
    SEGVEC_ERR_ROW_STATE = -6,       /* release of a row that is not taken */
    SEGVEC_ERR_TIMEOUT = -7,         /* a wait ran out of time */
    SEGVEC_ERR_INTERRUPTED = -8,     /* a wait was interrupted by a signal (Ctrl-C) */
    SEGVEC_ERR_ALERT = -9,           /* a wait was cut short: a worker posted an error */
    SEGVEC_ERR_SHUTDOWN = -10        /* a wait was cut short: the learner is closing the envs */
};

enum segvec_row_state {
    SEGVEC_ROW_FREE = 0,
    SEGVEC_ROW_FILLING = 1,
    SEGVEC_ROW_AWAITING_BOOTSTRAP = 2,
    SEGVEC_ROW_COMPLETE = 3,
    SEGVEC_ROW_TAKEN = 4,
    SEGVEC_ROW_RESERVED = 5
};

enum segvec_env_state {
    SEGVEC_ENV_NEW = 0,        /* never reset (learner) */
    SEGVEC_ENV_HELD = 1,       /* received by the learner, waiting for its action (learner) */
    SEGVEC_ENV_SENDING = 2,    /* action being written by the learner, between prepare and dispatch */
    SEGVEC_ENV_IN_FLIGHT = 3,  /* its worker steps it (worker) */
    SEGVEC_ENV_READY = 4,      /* published in its worker's ready queue, not yet received */
    SEGVEC_ENV_RESETTING = 5,  /* its worker resets it (worker) */
    SEGVEC_ENV_FAILED = 6      /* its reset or step raised; the learner owns it until it resets it */
};

/* Bit masks of env states, for segvec_count_envs: 1 << state. */
enum segvec_env_mask {
    SEGVEC_MASK_OUTSTANDING = (1 << 3) | (1 << 4) | (1 << 5)   /* IN_FLIGHT | READY | RESETTING */
};

/* Sizes of one core; fixed for its life. */
typedef struct segvec_config {
    int32_t num_envs;
    int32_t num_workers;        /* num_envs % num_workers == 0; worker w owns envs [w*k, (w+1)*k) */
    int32_t num_segments;       /* >= 2 * num_envs */
    int32_t horizon;            /* >= 1 */
    int32_t episode_capacity;   /* finished-episode ring; >= 1 */
    int32_t poison;             /* 1: fill fresh rows' rewards with -42.42 (debug) */
    int32_t value_heads;        /* H >= 1: values, bootstraps and rewards per step are H-vectors */
} segvec_config_t;

/* The arrays of the block other processes and languages view (their list is SEGVEC_ARRAYS below the
 * declarations): element types and shape kinds, and where array i lies for a given config. */
enum segvec_dtype { SEGVEC_FLOAT32 = 0, SEGVEC_FLOAT64 = 1, SEGVEC_INT32 = 2, SEGVEC_INT64 = 3, SEGVEC_BOOL = 4 };
enum segvec_dims {             /* S = num_segments, T = horizon, E = num_envs, K = episode_capacity,
                                * H = value_heads */
    SEGVEC_DIMS_ST = 0,        /* [S, T]: one item per step slot */
    SEGVEC_DIMS_S = 1,         /* [S]: one per row */
    SEGVEC_DIMS_E = 2,         /* [E]: one per env */
    SEGVEC_DIMS_K = 3,         /* [K]: one per entry of the finished-episode ring */
    SEGVEC_DIMS_STH = 4,       /* [S, T, H]: one item per step slot and value head */
    SEGVEC_DIMS_SH = 5,        /* [S, H]: one per row and value head */
    SEGVEC_DIMS_EH = 6         /* [E, H]: one per env and value head */
};
typedef struct segvec_array_info {
    const char *name;          /* the array's name, e.g. "reward" */
    int64_t offset;            /* bytes from the block's start (64-byte aligned) */
    int32_t dtype;             /* enum segvec_dtype */
    int32_t dims;              /* enum segvec_dims */
} segvec_array_info_t;
/* The byte offsets of every array (see SEGVEC_ARRAYS), and the size of the core's part of the block. */
typedef struct segvec_layout segvec_layout_t;

/* Counters of a core, read with segvec_read_stats (any process).  A worker killed by a signal between
 * committing a step and publishing it may leave that step counted in `steps`/`episodes` although its
 * transition is rolled back (the rows never hold it). */
typedef struct segvec_stats {
    int64_t steps;                /* real transitions committed */
    int64_t episodes;             /* episodes finished (terminated or truncated) */
    int64_t segments_completed;   /* rows that became COMPLETE */
    int64_t segments_recycled;    /* complete rows reused because nobody took them */
    int64_t segments_taken;
    int64_t nan_rewards;          /* transitions whose reward was NaN (passed through) */
    int64_t episodes_written;     /* tickets handed out in the finished-episode ring */
    int64_t restarts;             /* envs rebuilt after a failure (restart_failed_envs) */
    int64_t complete_rows;        /* rows COMPLETE now (segments_ready) */
    int64_t free_rows;            /* rows FREE now */
    int64_t taken_rows;           /* rows TAKEN now (held by the learner) */
    int64_t rolled_back;          /* steps of dead workers undone by segvec_recover_worker */
} segvec_stats_t;

/* A process-local handle: pointers into one mapped block, and the learner's pool mutex.  Owned by the
 * process that opened it. */
typedef struct segvec_core segvec_core_t;

/* ---- set-up (any process) ---------------------------------------------------------------------- */
const char *segvec_strerror(int status);
int segvec_compute_layout(const segvec_config_t *config, segvec_layout_t *layout_out);
/* Bytes of the core's part of a block for `config` (64-byte aligned; other arrays may follow it). */
int segvec_block_bytes(const segvec_config_t *config, int64_t *bytes_out);
/* How many arrays SEGVEC_ARRAYS lists, and array `index`'s name, offset, element type and shape kind. */
int segvec_num_arrays(void);
int segvec_array_info(const segvec_config_t *config, int32_t index, segvec_array_info_t *info_out);
/* learner only, once: writes a fresh core into `block` (which must be zeroed or fresh). */
int segvec_format(void *block, int64_t block_bytes, const segvec_config_t *config);
/* any process: a handle on a formatted block; free it with segvec_detach (the block stays). */
int segvec_attach(void *block, int64_t block_bytes, segvec_core_t **core_out);
int segvec_detach(segvec_core_t *core);
int segvec_read_stats(segvec_core_t *core, segvec_stats_t *stats_out);
/* *count_out = number of envs whose state bit (1 << state) is in `state_mask` (a snapshot). */
int segvec_count_envs(segvec_core_t *core, int32_t state_mask, int32_t *count_out);

/* ---- learner only ------------------------------------------------------------------------------- */
/* Close each env's filling row at its cursor (rows of length 0 are kept, not closed), complete its row
 * that awaits a bootstrap, and start a new row.  The envs must be the learner's (NEW, HELD or FAILED) or
 * landed (READY), else SEGVEC_ERR_NOT_HELD; when the new rows cannot all be had, SEGVEC_ERR_NO_FREE_ROW; in both cases
 * nothing changed.  The tail bootstraps (the values of the env's current observation) are `tail_values`
 * [n, H], or with `tail_values` NULL the values the learner already sent for that observation (NaN if
 * none).  For each env, `copy_from_out[i]` and `copy_to_out[i]` are observation slots (r * (T + 1) + t): copy the
 * current observation from one to the other (-1 when there is nothing to copy).  Used by flush() and
 * before every reset. */
int segvec_flush_envs(segvec_core_t *core, int32_t n, const int32_t *env_ids, const float *tail_values,
                      int64_t *copy_from_out, int64_t *copy_to_out);
/* Hand flushed envs (cursor at a row's slot 0; NEW, HELD or FAILED) to their workers for a reset:
 * state -> RESETTING. */
int segvec_begin_resets(segvec_core_t *core, int32_t n, const int32_t *env_ids);
/* Wait until at least `min_count` envs are published (or fewer if fewer are still outstanding), at most
 * `timeout_ms` (< 0: up to a slice of ~500 ms, then SEGVEC_ERR_TIMEOUT so the caller can check its
 * workers and signals).  Returns SEGVEC_ERR_ALERT when a worker posted an error. */
int segvec_wait_ready(segvec_core_t *core, int32_t min_count, int32_t timeout_ms, int32_t *ready_out);
/* Pop up to `max_n` published envs (READY -> HELD), oldest publication first. */
int segvec_pop_ready(segvec_core_t *core, int32_t max_n, int32_t *env_ids_out, int32_t *n_out);
/* Validate and stamp a send: each env must be HELD (not twice in one call), else SEGVEC_ERR_NOT_HELD;
 * when the spare rows it needs cannot all be had, SEGVEC_ERR_NO_FREE_ROW; in both cases nothing changed.
 * Writes value (`values` is [n, H]; NULL: NaN), logprob (NULL: NaN) and policy_version into the env's
 * current slot, completes its row awaiting a bootstrap with that value, and reserves a spare row for each
 * env that is at its row's last slot.  `slot_out[i]` = r * T + t, the step slot where the caller writes the action and step fields;
 * `row_start_out[i]` = 1 when t == 0 (the caller writes segment fields).  State HELD -> SENDING. */
int segvec_prepare_send(segvec_core_t *core, int32_t n, const int32_t *env_ids, const float *values,
                        const float *logprobs, int64_t policy_version, int64_t *slot_out,
                        uint8_t *row_start_out);
/* Undo the state change of a prepared send that will not be dispatched (SENDING -> HELD).  What it wrote
 * stays: the value of the current observation, the completed rows and the spares. */
int segvec_cancel_send(segvec_core_t *core, int32_t n, const int32_t *env_ids);
/* Hand the envs to their workers (SENDING -> IN_FLIGHT) and wake the workers that got work. */
int segvec_dispatch(segvec_core_t *core, int32_t n, const int32_t *env_ids);
/* The bootstrap of every step and head of taken rows, into out[(i * T + t) * H + h] (out may be the block's
 * own next_value rows, for zero-copy batches): 0 where terminated; where truncated, the truncation value
 * (always with `same_step`, else when it is known); value[t + 1] inside the row; the tail value at
 * t = length - 1; 0 past the length.  Head by head: a NaN truncation value of one head leaves only that
 * head's bootstrap to the rule after it. */
int segvec_fill_next_values(segvec_core_t *core, int32_t n, const int32_t *rows, int32_t same_step, float *out);
/* Take `n` rows from the completed FIFO, oldest first (COMPLETE -> TAKEN). */
int segvec_take(segvec_core_t *core, int32_t n, int32_t *rows_out);
/* Give taken rows back (TAKEN -> FREE); all or nothing. */
int segvec_release(segvec_core_t *core, int32_t n, const int32_t *rows);
/* Ask every worker to stop, and wake them all. */
int segvec_shutdown(segvec_core_t *core);
/* Wake worker w so that it looks at its command pipe. */
int segvec_kick_worker(segvec_core_t *core, int32_t worker);
/* Worker w died (the caller has seen the process gone).  Forgets its queued actions and takes back its
 * envs that it held: each env that was IN_FLIGHT, or READY but never fully published, is rolled back to
 * the slot it was sent at (whatever the dead worker committed of that step is undone, the row it filled
 * reopened, its spare reserved again) and stays IN_FLIGHT for the replacement to restart; RESETTING envs
 * stay RESETTING for the replacement to reset.  `lost_out[i]` (capacity: envs per worker) lists the
 * IN_FLIGHT ones.  Envs fully published stay in the ready queue. */
int segvec_recover_worker(segvec_core_t *core, int32_t worker, int32_t *lost_out, int32_t *n_lost_out);

/* ---- any process -------------------------------------------------------------------------------- */
/* Wake the learner from another process or thread: it returns SEGVEC_ERR_ALERT from its wait. */
int segvec_post_alert(segvec_core_t *core);
/* Copy finished episodes with tickets >= *cursor (at most max_n) and advance the cursor; entries that
 * were overwritten before being read are skipped and counted in `lost_out`.  `end_steps_out[i]` (may be
 * NULL) is the number of slots the env had filled when the episode ended, its last step included: every
 * env fills one slot per send, so in synchronous stepping all envs count alike and (end step, env id)
 * orders episodes the same way in every run, whatever order the workers recorded them in. */
int segvec_read_episodes(segvec_core_t *core, int64_t *cursor, int32_t max_n, int32_t *env_ids_out,
                         double *returns_out, int64_t *lengths_out, int64_t *end_steps_out, int32_t *n_out,
                         int64_t *lost_out);

/* ---- worker side (worker w only, for its own envs; the serial backend calls them in-process) ------ */
/* Wait until worker w has actions, a kick, or shutdown (SEGVEC_ERR_SHUTDOWN).  Timeout as above. */
int segvec_worker_wait(segvec_core_t *core, int32_t worker, int32_t timeout_ms);
/* Pop up to `max_n` envs whose actions are in, in dispatch order. */
int segvec_worker_pop(segvec_core_t *core, int32_t worker, int32_t max_n, int32_t *env_ids_out,
                      int32_t *n_out);
/* One env step's outcome as a worker hands it to the core: a row of an [n, 6] float64 array, so a
 * batch is built from Python with one conversion. */
typedef struct segvec_outcome {
    double reward;
    double terminated;       /* 0 or 1 */
    double truncated;        /* 0 or 1 */
    double valid;            /* 1: a real transition; 0: the NEXT_STEP reset step whose action was ignored */
    double episode_started;  /* 1: the new observation is an episode's first (autoreset) */
    double needs_reset;      /* 1: NEXT_STEP, the episode ended and the env's next action will be ignored */
} segvec_outcome_t;

/* Record each IN_FLIGHT env's outcome at its cursor slot (r, t): reward (into every head, and the env's
 * last reward of every head; episode statistics count it once), terminated, truncated,
 * mask = valid, episode statistics; advance the cursor, onto the env's spare row when this one is full
 * (the row then awaits its bootstrap).  Never waits.  An env that is not IN_FLIGHT (SEGVEC_ERR_NOT_HELD)
 * or at its row's last slot without a spare (SEGVEC_ERR_NO_FREE_ROW) fails the call before it changes
 * anything.  `obs_slot_out[i]` is the slot of the new
 * observation; `chain_slot_out[i]` is the finished row's obs[horizon] slot that must hold the same
 * observation, else -1. */
int segvec_commit_steps(segvec_core_t *core, int32_t n, const int32_t *env_ids, const segvec_outcome_t *outcomes,
                        int64_t *obs_slot_out, int64_t *chain_slot_out);
/* Record a reset of each RESETTING env at its cursor (a row's slot 0, after segvec_flush_envs):
 * episode_start = 1, previous-action outcome = 0, episode id + 1.  `obs_slot_out[i]` is where the reset
 * observation goes. */
int segvec_commit_resets(segvec_core_t *core, int32_t n, const int32_t *env_ids, int64_t *obs_slot_out);
/* A rebuilt env (restart_failed_envs) starts a new episode at its cursor slot t, in the same row: the
 * transition before it (slot t - 1, when it is a real one in this row and not terminated) becomes
 * truncated with the values already sent for slot t as its truncation values, head by head (unless slot t
 * already starts an episode: an autoreset, or an earlier restart here, whose cut stands); slot t gets episode_start
 * and its value is cleared (the learner sends the value of the new observation).  The learner sees the
 * env with truncated = 1.  `obs_slot_out` is where the new observation goes.  The env is IN_FLIGHT. */
int segvec_restart_env(segvec_core_t *core, int32_t env_id, int64_t *obs_slot_out);
/* Envs whose reset or step raised (not restarted): IN_FLIGHT / RESETTING -> FAILED, cursor untouched.
 * The caller reports the error to the learner. */
int segvec_fail_envs(segvec_core_t *core, int32_t n, const int32_t *env_ids);
/* Envs the caller will not step after all (the serial backend interrupted by Ctrl-C): IN_FLIGHT -> HELD,
 * their actions unapplied.  In the learner's process only. */
int segvec_return_envs(segvec_core_t *core, int32_t n, const int32_t *env_ids);
/* IN_FLIGHT envs that sit this step out (an agent slot whose agent is gone from its multi-agent env until
 * that env resets): their actions are dropped and nothing is written to any row; the cursor stays (its
 * observation is the last one the env had), and the outcome of the previous action reads 0 / not ended,
 * so the learner sees an ended episode once.  The caller publishes them with the env's other slots.
 * State stays IN_FLIGHT until that publish. */
int segvec_skip_steps(segvec_core_t *core, int32_t n, const int32_t *env_ids);
/* Publish envs to the learner (-> READY) after their observations are written; wakes it if it waits. */
int segvec_publish(segvec_core_t *core, int32_t n, const int32_t *env_ids);

/* ---- cursors (the process that owns the envs) ----------------------------------------------------- */
enum segvec_slot_kind {
    SEGVEC_STEP_SLOT = 0,   /* r * T + t: index into [S, T] arrays (actions, values, step fields) */
    SEGVEC_OBS_SLOT = 1     /* r * (T + 1) + t: index into [S, T + 1] observation arrays */
};
/* slots_out[i] = the current slot of env_ids[i], of the given kind. */
int segvec_cursor_slots(segvec_core_t *core, int32_t n, const int32_t *env_ids, int32_t kind, int64_t *slots_out);
/* dst[i] = src[current observation slot of env_ids[i]], items of `item_bytes` (one observation leaf). */
int segvec_gather_current(segvec_core_t *core, int32_t n, const int32_t *env_ids, const void *src,
                          int64_t item_bytes, void *dst);

/* ---- kernels (any process, no core needed) ------------------------------------------------------ */
/* Copies observation i (items of `item_bytes`) to dst[obs_slots[i]], and to dst[chain_slots[i]] when that is
 * >= 0 (a finished row's obs[horizon]): the scatter after segvec_commit_steps, one call per leaf. */
int segvec_scatter_obs(const void *obs, int64_t item_bytes, int32_t n, const int64_t *obs_slots,
                       const int64_t *chain_slots, void *dst);
/* GAE over rows of length T for `heads` value heads at once: reward, value, next_value and the outputs
 * are contiguous [n, T, heads], the flags [n, T], gamma and lam [heads] (the caller checks the shapes).
 * Per head h: delta = r + gamma[h] * next_value * (1 - term) - v; the recursion (factor gamma[h] * lam[h])
 * stops at terminated or truncated steps, at t = length - 1, and skips masked-out steps (advantage 0).
 * returns = advantages + value. */
int segvec_gae(int32_t n, int32_t horizon, int32_t heads, const float *reward, const float *value,
               const float *next_value, const uint8_t *terminated, const uint8_t *truncated, const uint8_t *mask,
               const int32_t *length, const float *gamma, const float *lam, float *advantages_out,
               float *returns_out);

/* SEGVEC_CDEF_END */

/* The block's arrays, each listed once: X(name, element C type, dtype, dims, doc).  This list generates
 * the layout's offsets, their placement, the handle's pointers and segvec_array_info (so Python's views). */
#define SEGVEC_ARRAYS(X)                                                                                   \
    X(reward, float, SEGVEC_FLOAT32, SEGVEC_DIMS_STH, "outcome of action[t]")                              \
    X(terminated, uint8_t, SEGVEC_BOOL, SEGVEC_DIMS_ST, "")                                                \
    X(truncated, uint8_t, SEGVEC_BOOL, SEGVEC_DIMS_ST, "")                                                 \
    X(mask, uint8_t, SEGVEC_BOOL, SEGVEC_DIMS_ST, "1: a real transition")                                  \
    X(episode_start, uint8_t, SEGVEC_BOOL, SEGVEC_DIMS_ST, "1: obs[t] is an episode's first observation")  \
    X(value, float, SEGVEC_FLOAT32, SEGVEC_DIMS_STH, "sent by the learner, NaN until sent")                \
    X(logprob, float, SEGVEC_FLOAT32, SEGVEC_DIMS_ST, "sent by the learner, NaN until sent")               \
    X(policy_version, int64_t, SEGVEC_INT64, SEGVEC_DIMS_ST, "stamped at send")                            \
    X(truncation_value, float, SEGVEC_FLOAT32, SEGVEC_DIMS_STH,                                             \
      "value of the final obs of a truncation whose next slot does not hold it (SAME_STEP autoreset, "     \
      "restarted envs), else NaN")                                                                         \
    X(next_value, float, SEGVEC_FLOAT32, SEGVEC_DIMS_STH, "bootstraps, filled by segvec_fill_next_values") \
    X(tail_value, float, SEGVEC_FLOAT32, SEGVEC_DIMS_SH, "value of obs[length] (next_value at length - 1)") \
    X(row_env_id, int32_t, SEGVEC_INT32, SEGVEC_DIMS_S, "")                                                \
    X(row_length, int32_t, SEGVEC_INT32, SEGVEC_DIMS_S, "steps written")                                   \
    X(row_state, int32_t, SEGVEC_INT32, SEGVEC_DIMS_S, "enum segvec_row_state")                            \
    X(row_start_step, int64_t, SEGVEC_INT64, SEGVEC_DIMS_S, "slots this env filled before the row's first") \
    X(row_episode_id, int64_t, SEGVEC_INT64, SEGVEC_DIMS_S, "episode id of the row's first slot")          \
    X(env_row, int32_t, SEGVEC_INT32, SEGVEC_DIMS_E, "row the env fills now")                              \
    X(env_step, int32_t, SEGVEC_INT32, SEGVEC_DIMS_E, "current slot: obs[env_row, env_step] is its obs")   \
    X(env_state, atomic_int, SEGVEC_INT32, SEGVEC_DIMS_E, "enum segvec_env_state (the hand-over flag)")    \
    X(env_needs_reset, uint8_t, SEGVEC_BOOL, SEGVEC_DIMS_E, "NEXT_STEP: the last step ended an episode")   \
    X(env_last_reward, double, SEGVEC_FLOAT64, SEGVEC_DIMS_EH, "outcome of the env's previous action")     \
    X(env_last_terminated, uint8_t, SEGVEC_BOOL, SEGVEC_DIMS_E, "")                                        \
    X(env_last_truncated, uint8_t, SEGVEC_BOOL, SEGVEC_DIMS_E, "")                                         \
    X(env_episode_id, int64_t, SEGVEC_INT64, SEGVEC_DIMS_E, "episodes started by this env")                \
    X(env_last_slot, int64_t, SEGVEC_INT64, SEGVEC_DIMS_E, "step slot of the last committed step, -1")     \
    X(episode_env_id, int32_t, SEGVEC_INT32, SEGVEC_DIMS_K, "finished-episode ring")                       \
    X(episode_return, double, SEGVEC_FLOAT64, SEGVEC_DIMS_K, "")                                           \
    X(episode_length, int64_t, SEGVEC_INT64, SEGVEC_DIMS_K, "")                                           \
    X(episode_end_step, int64_t, SEGVEC_INT64, SEGVEC_DIMS_K, "slots the env had filled at the episode's end")

#define SEGVEC_OFFSET_FIELD(name, ctype, dtype, dims, doc) int64_t name;
struct segvec_layout {
    int64_t total_bytes;
    SEGVEC_ARRAYS(SEGVEC_OFFSET_FIELD)
};
#undef SEGVEC_OFFSET_FIELD

#endif /* SEGVEC_H */
