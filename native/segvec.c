/* segvec.c -- the segment core.  The design and every function's contract are in segvec.h. */
#define _GNU_SOURCE
#include "segvec.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

#ifdef SEGVEC_DEBUG
#include <assert.h>
#define SEGVEC_ASSERT(cond) assert(cond)
#else
#define SEGVEC_ASSERT(cond) ((void)0)
#endif

#define SEGVEC_MAGIC 0x5345475645433032ull /* "SEGVEC02" */
/* The counter of stats field `name` (segvec_stats_t), in the shared block `sh`. */
#define COUNTER(sh, name) (&(sh)->counters[offsetof(segvec_stats_t, name) / sizeof(int64_t)])
#define CACHE_LINE 64
#define WAIT_SLICE_MS 500
#define SPIN_CHECKS 64
/* After the spin, a waiter keeps checking for this long, yielding the core between checks, before it
 * sleeps on its futex: a hand-over that comes soon (the learner's turn-around, a worker's batch) then needs
 * no wake-up, while a process that has work runs whenever it wants the core. */
#define YIELD_WINDOW_NS 50000

/* ---- the shared block ------------------------------------------------------------------------- */

/* One entry of a worker's ready queue; `stamp` orders entries across the queues. */
typedef struct {
    int32_t env;
    int32_t unused;
    uint64_t stamp;
} ready_entry_t;

/* Everything one worker shares with the learner.  Each counter has exactly one writer. */
typedef struct {
    _Alignas(CACHE_LINE) atomic_uint seq;   /* futex word: bumped on every push, kick and shutdown */
    atomic_uint waiting;                    /* 1 while the worker sleeps on `seq` */
    unsigned seen_seq;                      /* worker w only: `seq` when its last wait returned, so a
                                             * kick that lands between two waits is not lost */
    atomic_uint_fast64_t queue_tail;        /* action queue; written by the learner */
    _Alignas(CACHE_LINE) atomic_uint_fast64_t queue_head; /* action queue; written by worker w */
    atomic_uint_fast64_t ready_tail;        /* ready queue; written by worker w */
    _Alignas(CACHE_LINE) atomic_uint_fast64_t ready_head; /* ready queue; written by the learner */
} worker_slot_t;

/* The arrays only C touches, each listed once: X(name, element C type, element count). */
#define INTERNAL_ARRAYS(X)                                                                                 \
    X(free_ring, int32_t, S)             /* free FIFO, indexed by counter % S (learner only) */           \
    X(complete_ring, int32_t, S)         /* completed FIFO (learner only) */                              \
    X(workers, worker_slot_t, W)                                                                           \
    X(action_rings, int32_t, E)          /* [W, E / W] per-worker action queue */                          \
    X(ready_rings, ready_entry_t, E)     /* [W, E / W] per-worker ready queue */                           \
    X(awaiting_row, int32_t, E)          /* row waiting for its tail bootstrap, -1 if none */              \
    X(env_spare, int32_t, E)             /* RESERVED row the env moves to when its row fills, -1 if none */ \
    X(env_sent_slot, int64_t, E)         /* step slot the env was last sent (or reset) at: where a dead    \
                                          * worker's env is rolled back to */                              \
    X(env_steps_done, int64_t, E)        /* slots filled by the env so far */                              \
    X(env_return, double, E)             /* running episode return */                                      \
    X(env_length, int64_t, E)            /* running episode length */                                      \
    X(episode_seq, atomic_uint_fast64_t, K) /* finished-episode ring: ticket + 1 once the entry is written */

#define OFFSET_FIELD(name, ctype, count) int64_t name;
typedef struct { INTERNAL_ARRAYS(OFFSET_FIELD) } internal_offsets_t;
#undef OFFSET_FIELD

/* The row pool: the free FIFO and the completed FIFO of row indices (learner only, under the learner's pool
 * mutex).  Counters grow forever; the ring index is counter % S.  A FIFO (not a stack) for free rows keeps
 * rows of one round adjacent, so a synchronous rollout is usually taken as one contiguous slab. */
typedef struct {
    int64_t free_head, free_tail;
    int64_t complete_head, complete_tail;
} row_pool_t;

/* How the workers reach the learner: the stamps that order the ready queues, the learner's futex word and
 * what it waits for, alerts (a worker posted an error) and the shutdown flag the workers wait on. */
typedef struct {
    atomic_uint_fast64_t publish_stamp;
    _Alignas(CACHE_LINE) atomic_uint ready_seq;  /* futex word of the learner */
    atomic_uint learner_waiting;                 /* 1 while the learner sleeps on ready_seq */
    atomic_int learner_wanted;                   /* wake it when this many envs are ready */
    atomic_uint alert_seq;                       /* bumped by segvec_post_alert */
    atomic_uint shutdown;
} learner_signals_t;

_Static_assert(sizeof(atomic_int_fast64_t) == sizeof(int64_t), "one 64-bit counter per segvec_stats_t field");

/* The start of every block: what it is, where its arrays lie, and the small types above. */
typedef struct {
    uint64_t magic;
    int32_t version;
    segvec_config_t config;
    segvec_layout_t layout;
    internal_offsets_t internal;

    _Alignas(CACHE_LINE) row_pool_t pool;
    _Alignas(CACHE_LINE) learner_signals_t signals;
    /* Counters: one per field of segvec_stats_t (the header lists them once), read by segvec_read_stats. */
    _Alignas(CACHE_LINE) atomic_int_fast64_t counters[sizeof(segvec_stats_t) / sizeof(int64_t)];
} shared_t;

struct segvec_core {
    shared_t *shared;
    char *base;
    int32_t E, W, S, T, K, H, envs_per_worker;   /* K: episode ring entries, H: value heads */
    pthread_mutex_t pool_mutex;   /* the learner's threads take turns on the row pool */
    /* every array of the block (see SEGVEC_ARRAYS and INTERNAL_ARRAYS) */
#define POINTER_FIELD(name, ctype, ...) ctype *name;
    SEGVEC_ARRAYS(POINTER_FIELD)
    INTERNAL_ARRAYS(POINTER_FIELD)
#undef POINTER_FIELD
    uint32_t alert_seen;
};

const char *segvec_strerror(int status) {
    switch (status) {
    case SEGVEC_OK: return "ok";
    case SEGVEC_ERR_INVALID: return "invalid size or argument";
    case SEGVEC_ERR_LAYOUT: return "memory block is too small or is not a segvec core";
    case SEGVEC_ERR_NO_FREE_ROW:
        return "no free segment row: every row is taken and not released (release batches, or raise num_segments)";
    case SEGVEC_ERR_NOT_HELD: return "env is not the learner's now (not received, failed, or named twice)";
    case SEGVEC_ERR_NOT_ENOUGH: return "fewer complete segments than asked for";
    case SEGVEC_ERR_ROW_STATE: return "row is not taken (released twice?)";
    case SEGVEC_ERR_TIMEOUT: return "timed out";
    case SEGVEC_ERR_INTERRUPTED: return "interrupted by a signal";
    case SEGVEC_ERR_ALERT: return "a worker posted an error";
    case SEGVEC_ERR_SHUTDOWN: return "shutting down";
    default: return "unknown segvec status";
    }
}

/* ---- layout ----------------------------------------------------------------------------------- */

static int64_t align_up(int64_t x) { return (x + CACHE_LINE - 1) & ~(int64_t)(CACHE_LINE - 1); }

static int config_is_valid(const segvec_config_t *c) {
    if (c->num_envs < 1 || c->num_workers < 1 || c->num_workers > SEGVEC_MAX_WORKERS) return 0;
    if (c->num_envs % c->num_workers != 0) return 0;
    if (c->horizon < 1 || c->episode_capacity < 1 || c->value_heads < 1) return 0;
    if ((int64_t)c->num_segments < 2 * (int64_t)c->num_envs) return 0;
    return 1;
}

/* Elements of an array of shape kind `dims` (enum segvec_dims). */
static int64_t dims_count(const segvec_config_t *c, int32_t dims) {
    switch (dims) {
    case SEGVEC_DIMS_ST: return (int64_t)c->num_segments * c->horizon;
    case SEGVEC_DIMS_S: return c->num_segments;
    case SEGVEC_DIMS_E: return c->num_envs;
    case SEGVEC_DIMS_STH: return (int64_t)c->num_segments * c->horizon * c->value_heads;
    case SEGVEC_DIMS_SH: return (int64_t)c->num_segments * c->value_heads;
    case SEGVEC_DIMS_EH: return (int64_t)c->num_envs * c->value_heads;
    default: return c->episode_capacity;
    }
}

/* Places every array after the shared header, 64-byte aligned, in list order. */
static void compute_offsets(const segvec_config_t *c, segvec_layout_t *L, internal_offsets_t *I) {
    int64_t S = c->num_segments, E = c->num_envs, W = c->num_workers, K = c->episode_capacity;
    int64_t at = align_up((int64_t)sizeof(shared_t));
#define PLACE_PUBLIC(name, ctype, dtype, dims, doc) L->name = at; at = align_up(at + dims_count(c, dims) * (int64_t)sizeof(ctype));
#define PLACE_INTERNAL(name, ctype, count) I->name = at; at = align_up(at + (int64_t)(count) * (int64_t)sizeof(ctype));
    SEGVEC_ARRAYS(PLACE_PUBLIC)
    INTERNAL_ARRAYS(PLACE_INTERNAL)
#undef PLACE_PUBLIC
#undef PLACE_INTERNAL
    L->total_bytes = at;
}

int segvec_compute_layout(const segvec_config_t *config, segvec_layout_t *layout_out) {
    internal_offsets_t internal;
    if (!config || !layout_out || !config_is_valid(config)) return SEGVEC_ERR_INVALID;
    compute_offsets(config, layout_out, &internal);
    return SEGVEC_OK;
}

int segvec_block_bytes(const segvec_config_t *config, int64_t *bytes_out) {
    segvec_layout_t layout;
    int status = segvec_compute_layout(config, &layout);
    if (status == SEGVEC_OK) *bytes_out = layout.total_bytes;
    return status;
}

#define ARRAY_INFO(name, ctype, dtype, dims, doc) {#name, offsetof(segvec_layout_t, name), dtype, dims},
static const struct { const char *name; size_t field; int32_t dtype, dims; } ARRAY_TABLE[] = {
    SEGVEC_ARRAYS(ARRAY_INFO)
};
#undef ARRAY_INFO

int segvec_num_arrays(void) { return (int)(sizeof(ARRAY_TABLE) / sizeof(ARRAY_TABLE[0])); }

int segvec_array_info(const segvec_config_t *config, int32_t index, segvec_array_info_t *info_out) {
    segvec_layout_t layout;
    if (index < 0 || index >= segvec_num_arrays()) return SEGVEC_ERR_INVALID;
    int status = segvec_compute_layout(config, &layout);
    if (status != SEGVEC_OK) return status;
    info_out->name = ARRAY_TABLE[index].name;
    info_out->offset = *(const int64_t *)((const char *)&layout + ARRAY_TABLE[index].field);
    info_out->dtype = ARRAY_TABLE[index].dtype;
    info_out->dims = ARRAY_TABLE[index].dims;
    return SEGVEC_OK;
}

static void bind(segvec_core_t *c, shared_t *sh) {
    const segvec_layout_t *L = &sh->layout;
    const internal_offsets_t *I = &sh->internal;
    char *b = (char *)sh;
    c->shared = sh;
    c->base = b;
    c->E = sh->config.num_envs;
    c->W = sh->config.num_workers;
    c->S = sh->config.num_segments;
    c->T = sh->config.horizon;
    c->K = sh->config.episode_capacity;
    c->H = sh->config.value_heads;
    c->envs_per_worker = c->E / c->W;
#define BIND_PUBLIC(name, ctype, ...) c->name = (ctype *)(b + L->name);
#define BIND_INTERNAL(name, ctype, count) c->name = (ctype *)(b + I->name);
    SEGVEC_ARRAYS(BIND_PUBLIC)
    INTERNAL_ARRAYS(BIND_INTERNAL)
#undef BIND_PUBLIC
#undef BIND_INTERNAL
    c->alert_seen = atomic_load(&sh->signals.alert_seq);
}

/* ---- env states ------------------------------------------------------------------------------- */

/* An env's state is the hand-over flag between its owners: the new owner reads it with acquire, the old
 * one writes it with release after its last write to the env's cursor and slots. */
static inline int env_state(const segvec_core_t *c, int32_t e) {
    return atomic_load_explicit(&c->env_state[e], memory_order_acquire);
}

static inline void set_env_state(segvec_core_t *c, int32_t e, int state) {
    atomic_store_explicit(&c->env_state[e], state, memory_order_release);
}

static inline int learner_owns(int state) {
    return state == SEGVEC_ENV_NEW || state == SEGVEC_ENV_HELD || state == SEGVEC_ENV_FAILED;
}

static inline int valid_env(const segvec_core_t *c, int32_t e) { return e >= 0 && e < c->E; }

int segvec_count_envs(segvec_core_t *c, int32_t state_mask, int32_t *count_out) {
    int32_t n = 0;
    for (int32_t e = 0; e < c->E; ++e)
        if (state_mask & (1 << atomic_load_explicit(&c->env_state[e], memory_order_relaxed))) ++n;
    *count_out = n;
    return SEGVEC_OK;
}

/* ---- row pool (learner only; callers hold the pool mutex unless noted) ------------------------- */

static void pool_lock(segvec_core_t *c) { pthread_mutex_lock(&c->pool_mutex); }
static void pool_unlock(segvec_core_t *c) { pthread_mutex_unlock(&c->pool_mutex); }

/* Fresh contents of a row about to be filled (no lock needed: the caller owns the row). */
static void reset_row_data(segvec_core_t *c, int32_t row) {
    int64_t base = (int64_t)row * c->T, head_base = base * c->H, head_count = (int64_t)c->T * c->H;
    float fresh_reward = c->shared->config.poison ? (float)SEGVEC_POISON_REWARD_MILLI / 1000.0f : 0.0f;
    for (int32_t t = 0; t < c->T; ++t) {
        c->logprob[base + t] = NAN;
        c->policy_version[base + t] = 0;
    }
    for (int64_t k = 0; k < head_count; ++k) {
        c->reward[head_base + k] = fresh_reward;
        c->value[head_base + k] = NAN;
        c->truncation_value[head_base + k] = NAN;
    }
    memset(c->terminated + base, 0, (size_t)c->T);
    memset(c->truncated + base, 0, (size_t)c->T);
    memset(c->mask + base, 0, (size_t)c->T);
    memset(c->episode_start + base, 0, (size_t)c->T);
    for (int32_t h = 0; h < c->H; ++h) c->tail_value[(int64_t)row * c->H + h] = NAN;
    c->row_length[row] = 0;
}

static int64_t rows_available_locked(const segvec_core_t *c) {
    const shared_t *sh = c->shared;
    return (sh->pool.free_tail - sh->pool.free_head) + (sh->pool.complete_tail - sh->pool.complete_head);
}

/* Can `needed` new rows be had by a call that also completes `completing` rows?  Rows free or complete
 * before the call come first.  Rows the call itself completes are recycled only as a last resort and only
 * when the learner holds no taken row (a learner that never takes never blocks the envs); while it holds
 * rows it is told to release them instead of losing rows it had no chance to take. */
static int rows_obtainable_locked(const segvec_core_t *c, int64_t needed, int64_t completing) {
    int64_t available = rows_available_locked(c);
    if (needed <= available) return 1;
    return atomic_load(COUNTER(c->shared, taken_rows)) == 0 && needed <= available + completing;
}

/* A row for env `env`, RESERVED with fresh contents: the oldest free row, else the oldest complete row
 * nobody took (recycled).  Callers check rows_available_locked first. */
static int32_t reserve_row_locked(segvec_core_t *c, int32_t env) {
    shared_t *sh = c->shared;
    int32_t row;
    if (sh->pool.free_head < sh->pool.free_tail) {
        row = c->free_ring[sh->pool.free_head % c->S];
        sh->pool.free_head++;
        atomic_fetch_sub(COUNTER(sh, free_rows), 1);
    } else {
        SEGVEC_ASSERT(sh->pool.complete_head < sh->pool.complete_tail);
        row = c->complete_ring[sh->pool.complete_head % c->S];
        sh->pool.complete_head++;
        atomic_fetch_sub(COUNTER(sh, complete_rows), 1);
        atomic_fetch_add(COUNTER(sh, segments_recycled), 1);
    }
    SEGVEC_ASSERT(c->row_state[row] == SEGVEC_ROW_FREE || c->row_state[row] == SEGVEC_ROW_COMPLETE);
    reset_row_data(c, row);
    c->row_state[row] = SEGVEC_ROW_RESERVED;
    c->row_env_id[row] = env;
    return row;
}

/* Env `env` starts filling its RESERVED row `row` at the env's current counts (no lock: the row is the
 * env's owner's). */
static void start_row(segvec_core_t *c, int32_t env, int32_t row) {
    SEGVEC_ASSERT(c->row_state[row] == SEGVEC_ROW_RESERVED && c->row_env_id[row] == env);
    c->row_start_step[row] = c->env_steps_done[env];
    c->row_episode_id[row] = c->env_episode_id[env];
    c->row_state[row] = SEGVEC_ROW_FILLING;
}

static void complete_row_locked(segvec_core_t *c, int32_t row) {
    shared_t *sh = c->shared;
    SEGVEC_ASSERT(c->row_state[row] == SEGVEC_ROW_FILLING || c->row_state[row] == SEGVEC_ROW_AWAITING_BOOTSTRAP);
    c->row_state[row] = SEGVEC_ROW_COMPLETE;
    c->complete_ring[sh->pool.complete_tail % c->S] = row;
    sh->pool.complete_tail++;
    atomic_fetch_add(COUNTER(sh, complete_rows), 1);
    atomic_fetch_add(COUNTER(sh, segments_completed), 1);
}

static void free_row_locked(segvec_core_t *c, int32_t row) {
    shared_t *sh = c->shared;
    c->row_state[row] = SEGVEC_ROW_FREE;
    c->free_ring[sh->pool.free_tail % c->S] = row;
    sh->pool.free_tail++;
    atomic_fetch_add(COUNTER(sh, free_rows), 1);
}

/* ---- set-up ----------------------------------------------------------------------------------- */

static int init_handle(segvec_core_t *c, shared_t *sh) {
    bind(c, sh);
    return pthread_mutex_init(&c->pool_mutex, NULL) == 0 ? SEGVEC_OK : SEGVEC_ERR_INVALID;
}

int segvec_format(void *block, int64_t block_bytes, const segvec_config_t *config) {
    segvec_layout_t layout;
    internal_offsets_t internal;
    if (!block || !config || !config_is_valid(config)) return SEGVEC_ERR_INVALID;
    compute_offsets(config, &layout, &internal);
    if (block_bytes < layout.total_bytes) return SEGVEC_ERR_LAYOUT;
    memset(block, 0, (size_t)layout.total_bytes);
    shared_t *sh = (shared_t *)block;
    sh->version = SEGVEC_VERSION;
    sh->config = *config;
    sh->layout = layout;
    sh->internal = internal;

    segvec_core_t core;
    bind(&core, sh);
    for (int32_t r = 0; r < core.S; ++r) {
        core.row_state[r] = SEGVEC_ROW_FREE;
        core.row_env_id[r] = -1;
        core.free_ring[r] = r;
    }
    sh->pool.free_head = 0;
    sh->pool.free_tail = core.S;
    atomic_store(COUNTER(sh, free_rows), core.S);
    /* Env e starts in row e: the first round of a synchronous rollout is rows [0, E). */
    for (int32_t e = 0; e < core.E; ++e) {
        int32_t row = reserve_row_locked(&core, e);
        start_row(&core, e, row);
        core.env_row[e] = row;
        core.env_step[e] = 0;
        atomic_store(&core.env_state[e], SEGVEC_ENV_NEW);
        core.awaiting_row[e] = -1;
        core.env_spare[e] = -1;
        core.env_sent_slot[e] = (int64_t)row * core.T;
        core.env_last_slot[e] = -1;
    }
    atomic_thread_fence(memory_order_release);
    sh->magic = SEGVEC_MAGIC;
    return SEGVEC_OK;
}

int segvec_attach(void *block, int64_t block_bytes, segvec_core_t **core_out) {
    if (!block || !core_out) return SEGVEC_ERR_INVALID;
    shared_t *sh = (shared_t *)block;
    if (block_bytes < (int64_t)sizeof(shared_t) || sh->magic != SEGVEC_MAGIC || sh->version != SEGVEC_VERSION)
        return SEGVEC_ERR_LAYOUT;
    if (block_bytes < sh->layout.total_bytes) return SEGVEC_ERR_LAYOUT;
    segvec_core_t *core = (segvec_core_t *)calloc(1, sizeof(segvec_core_t));
    if (!core) return SEGVEC_ERR_INVALID;
    if (init_handle(core, sh) != SEGVEC_OK) {
        free(core);
        return SEGVEC_ERR_INVALID;
    }
    *core_out = core;
    return SEGVEC_OK;
}

int segvec_detach(segvec_core_t *core) {
    if (core) pthread_mutex_destroy(&core->pool_mutex);
    free(core);
    return SEGVEC_OK;
}

int segvec_read_stats(segvec_core_t *core, segvec_stats_t *out) {
    shared_t *sh = core->shared;
    int64_t *values = (int64_t *)out;
    for (size_t i = 0; i < sizeof(segvec_stats_t) / sizeof(int64_t); ++i) values[i] = atomic_load(&sh->counters[i]);
    return SEGVEC_OK;
}

/* ---- waiting ---------------------------------------------------------------------------------- */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Sleep while *word == expected, at most timeout_ms.  Returns 0 (woken or value changed), ETIMEDOUT or EINTR. */
static int futex_wait(atomic_uint *word, unsigned expected, int timeout_ms) {
#if defined(__linux__)
    struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
    long rc = syscall(SYS_futex, (unsigned *)word, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (rc == 0) return 0;
    if (errno == ETIMEDOUT) return ETIMEDOUT;
    if (errno == EINTR) return EINTR;
    return 0; /* EAGAIN: the word changed before we slept */
#else
    if (atomic_load(word) != expected) return 0;
    struct timespec ts = {0, 200000L};
    nanosleep(&ts, NULL);
    (void)timeout_ms;
    return atomic_load(word) != expected ? 0 : ETIMEDOUT;
#endif
}

static void futex_wake_all(atomic_uint *word) {
#if defined(__linux__)
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
#else
    (void)word;
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The one wait of the core.  `check(c, arg)` says whether the wait is over: KEEP_WAITING, or the status
 * to return.  A short spin, then YIELD_WINDOW_NS of checks that yield the core between them, then sleeps
 * on the futex `word` (announced in `*sleeping` so that wakers know to wake) in slices of at most
 * WAIT_SLICE_MS, until `timeout_ms` (< 0: one slice) has passed: SEGVEC_ERR_TIMEOUT, so the caller can look
 * after dead processes and signals.  The check runs again after `*sleeping` is set and before sleeping,
 * and the futex sleeps only while the word still holds the value read before that check, so a wake-up
 * between the two is never lost. */
#define KEEP_WAITING 1
typedef int (*wait_check_t)(segvec_core_t *c, void *arg);

static int wait_for(segvec_core_t *c, atomic_uint *word, atomic_uint *sleeping, int32_t timeout_ms,
                    wait_check_t check, void *arg) {
    int64_t deadline = now_ms() + (timeout_ms < 0 ? WAIT_SLICE_MS : timeout_ms);
    int64_t yield_until = now_ns() + YIELD_WINDOW_NS;
    for (int pass = 0;; ++pass) {
        for (int spin = 0;; ++spin) {
            int status = check(c, arg);
            if (status != KEEP_WAITING) return status;
            if (spin < SPIN_CHECKS) cpu_relax();
            else if (pass == 0 && now_ns() < yield_until) sched_yield();
            else break;
        }
        int64_t left = deadline - now_ms();
        if (left <= 0) return SEGVEC_ERR_TIMEOUT;
        unsigned seen = atomic_load_explicit(word, memory_order_seq_cst);
        atomic_store_explicit(sleeping, 1, memory_order_seq_cst);
        int status = check(c, arg);
        int rc = 0;
        if (status == KEEP_WAITING) rc = futex_wait(word, seen, (int)(left < WAIT_SLICE_MS ? left : WAIT_SLICE_MS));
        atomic_store_explicit(sleeping, 0, memory_order_relaxed);
        if (status != KEEP_WAITING) return status;
        if (rc == EINTR) return SEGVEC_ERR_INTERRUPTED;
    }
}

/* ---- ready queues (one SPSC queue per worker, merged by stamp) -------------------------------- */

static inline ready_entry_t *ready_entry(segvec_core_t *c, int32_t w, uint64_t index) {
    return &c->ready_rings[(int64_t)w * c->envs_per_worker + (int64_t)(index % (uint64_t)c->envs_per_worker)];
}

/* Envs published and not yet received, over every worker's queue. */
static int32_t ready_available(segvec_core_t *c) {
    int64_t n = 0;
    for (int32_t w = 0; w < c->W; ++w) {
        worker_slot_t *ws = &c->workers[w];
        n += (int64_t)(atomic_load_explicit(&ws->ready_tail, memory_order_acquire) -
                       atomic_load_explicit(&ws->ready_head, memory_order_relaxed));
    }
    return (int32_t)n;
}

int segvec_publish(segvec_core_t *c, int32_t n, const int32_t *env_ids) {
    shared_t *sh = c->shared;
    for (int32_t i = 0; i < n; ++i)
        if (!valid_env(c, env_ids[i])) return SEGVEC_ERR_INVALID;
    /* One claim of stamps for the whole call: the counter is shared by every worker. */
    uint64_t stamp = n ? atomic_fetch_add_explicit(&sh->signals.publish_stamp, (uint64_t)n, memory_order_relaxed) : 0;
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        int32_t w = e / c->envs_per_worker;
        worker_slot_t *ws = &c->workers[w];
        atomic_store_explicit(&c->env_state[e], SEGVEC_ENV_READY, memory_order_relaxed);
        uint64_t tail = atomic_load_explicit(&ws->ready_tail, memory_order_relaxed);
        ready_entry_t *entry = ready_entry(c, w, tail);
        entry->env = e;
        entry->stamp = stamp + (uint64_t)i;
        /* The entry, the env's slots and its state become the learner's with this store. */
        atomic_store_explicit(&ws->ready_tail, tail + 1, memory_order_release);
    }
    atomic_fetch_add_explicit(&sh->signals.ready_seq, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&sh->signals.learner_waiting, memory_order_seq_cst) &&
        ready_available(c) >= atomic_load(&sh->signals.learner_wanted))
        futex_wake_all(&sh->signals.ready_seq);
    return SEGVEC_OK;
}

/* The learner's wait is over when `min_count` envs are published, or a worker posted an alert. */
static int ready_or_alert(segvec_core_t *c, void *min_count) {
    if (ready_available(c) >= *(int32_t *)min_count) return SEGVEC_OK;
    if (atomic_load_explicit(&c->shared->signals.alert_seq, memory_order_acquire) != c->alert_seen) {
        c->alert_seen = atomic_load(&c->shared->signals.alert_seq);
        return SEGVEC_ERR_ALERT;
    }
    return KEEP_WAITING;
}

int segvec_wait_ready(segvec_core_t *c, int32_t min_count, int32_t timeout_ms, int32_t *ready_out) {
    shared_t *sh = c->shared;
    if (min_count > c->E) min_count = c->E;
    int32_t ready = ready_available(c);
    if (ready >= min_count) { *ready_out = ready; return SEGVEC_OK; } /* (no store to the workers' line) */
    atomic_store(&sh->signals.learner_wanted, min_count);
    int status = wait_for(c, &sh->signals.ready_seq, &sh->signals.learner_waiting, timeout_ms, ready_or_alert, &min_count);
    *ready_out = ready_available(c);
    return status;
}

int segvec_pop_ready(segvec_core_t *c, int32_t max_n, int32_t *env_ids_out, int32_t *n_out) {
    /* The workers whose queues have entries (at most W); each step takes the entry with the smallest
     * stamp among their heads, so envs come out in publication order. */
    int32_t active[SEGVEC_MAX_WORKERS];
    uint64_t head[SEGVEC_MAX_WORKERS], tail[SEGVEC_MAX_WORKERS];
    int32_t n_active = 0, n = 0;
    for (int32_t w = 0; w < c->W; ++w) {
        worker_slot_t *ws = &c->workers[w];
        head[w] = atomic_load_explicit(&ws->ready_head, memory_order_relaxed);
        tail[w] = atomic_load_explicit(&ws->ready_tail, memory_order_acquire);
        if (head[w] < tail[w]) active[n_active++] = w;
    }
    while (n < max_n && n_active > 0) {
        int32_t best = 0;
        for (int32_t i = 1; i < n_active; ++i)
            if (ready_entry(c, active[i], head[active[i]])->stamp < ready_entry(c, active[best], head[active[best]])->stamp)
                best = i;
        int32_t w = active[best];
        int32_t e = ready_entry(c, w, head[w])->env;
        SEGVEC_ASSERT(valid_env(c, e) && env_state(c, e) == SEGVEC_ENV_READY);
        set_env_state(c, e, SEGVEC_ENV_HELD);
        env_ids_out[n++] = e;
        if (++head[w] == tail[w]) active[best] = active[--n_active];
    }
    for (int32_t w = 0; w < c->W; ++w) /* only the queues it took from: the others' lines stay put */
        if (head[w] != atomic_load_explicit(&c->workers[w].ready_head, memory_order_relaxed))
            atomic_store_explicit(&c->workers[w].ready_head, head[w], memory_order_release);
    *n_out = n;
    return SEGVEC_OK;
}

int segvec_post_alert(segvec_core_t *c) {
    shared_t *sh = c->shared;
    atomic_fetch_add_explicit(&sh->signals.alert_seq, 1, memory_order_release);
    atomic_fetch_add_explicit(&sh->signals.ready_seq, 1, memory_order_seq_cst);
    futex_wake_all(&sh->signals.ready_seq);
    return SEGVEC_OK;
}

/* ---- learner: send ---------------------------------------------------------------------------- */

/* Marks env_ids SENDING if each is HELD and named once; else restores them and returns NOT_HELD. */
static int claim_for_send(segvec_core_t *c, int32_t n, const int32_t *env_ids) {
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        if (!valid_env(c, e) || env_state(c, e) != SEGVEC_ENV_HELD) {
            for (int32_t j = 0; j < i; ++j) set_env_state(c, env_ids[j], SEGVEC_ENV_HELD);
            return SEGVEC_ERR_NOT_HELD;
        }
        set_env_state(c, e, SEGVEC_ENV_SENDING); /* so a second mention fails its check */
    }
    return SEGVEC_OK;
}

/* dst[h] = src[h] for every value head. */
static inline void copy_heads(const segvec_core_t *c, float *dst, const float *src) {
    for (int32_t h = 0; h < c->H; ++h) dst[h] = src[h];
}

int segvec_prepare_send(segvec_core_t *c, int32_t n, const int32_t *env_ids, const float *values,
                        const float *logprobs, int64_t policy_version, int64_t *slot_out,
                        uint8_t *row_start_out) {
    int status = claim_for_send(c, n, env_ids);
    if (status != SEGVEC_OK) return status;
    int32_t spares_needed = 0, awaiting = 0;
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        spares_needed += c->env_step[e] == c->T - 1 && c->env_spare[e] < 0;
        awaiting += c->awaiting_row[e] >= 0;
    }
    int locked = spares_needed || awaiting;
    if (locked) {
        pool_lock(c);
        if (!rows_obtainable_locked(c, spares_needed, awaiting)) {
            pool_unlock(c);
            for (int32_t i = 0; i < n; ++i) set_env_state(c, env_ids[i], SEGVEC_ENV_HELD);
            return SEGVEC_ERR_NO_FREE_ROW;
        }
        if (spares_needed <= rows_available_locked(c)) { /* spares first: the rows this send completes stay */
            for (int32_t i = 0; i < n; ++i) {
                int32_t e = env_ids[i];
                if (c->env_step[e] == c->T - 1 && c->env_spare[e] < 0) c->env_spare[e] = reserve_row_locked(c, e);
            }
            spares_needed = 0;
        }
    }
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        int64_t slot = (int64_t)c->env_row[e] * c->T + c->env_step[e];
        const float *v = values ? values + (int64_t)i * c->H : NULL;
        for (int32_t h = 0; h < c->H; ++h) c->value[slot * c->H + h] = v ? v[h] : NAN;
        c->logprob[slot] = logprobs ? logprobs[i] : NAN;
        c->policy_version[slot] = policy_version;
        c->env_sent_slot[e] = slot;
        slot_out[i] = slot;
        row_start_out[i] = c->env_step[e] == 0;
        if (c->awaiting_row[e] >= 0) {
            copy_heads(c, c->tail_value + (int64_t)c->awaiting_row[e] * c->H, c->value + slot * c->H);
            complete_row_locked(c, c->awaiting_row[e]);
            c->awaiting_row[e] = -1;
        }
    }
    if (spares_needed)
        for (int32_t i = 0; i < n; ++i) {
            int32_t e = env_ids[i];
            if (c->env_step[e] == c->T - 1 && c->env_spare[e] < 0) c->env_spare[e] = reserve_row_locked(c, e);
        }
    if (locked) pool_unlock(c);
    return SEGVEC_OK;
}

int segvec_cancel_send(segvec_core_t *c, int32_t n, const int32_t *env_ids) {
    for (int32_t i = 0; i < n; ++i)
        if (!valid_env(c, env_ids[i]) || env_state(c, env_ids[i]) != SEGVEC_ENV_SENDING) return SEGVEC_ERR_NOT_HELD;
    for (int32_t i = 0; i < n; ++i) set_env_state(c, env_ids[i], SEGVEC_ENV_HELD);
    return SEGVEC_OK;
}

static void wake_worker(worker_slot_t *ws) {
    atomic_fetch_add_explicit(&ws->seq, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&ws->waiting, memory_order_seq_cst)) futex_wake_all(&ws->seq);
}

int segvec_dispatch(segvec_core_t *c, int32_t n, const int32_t *env_ids) {
    uint64_t touched[(SEGVEC_MAX_WORKERS + 63) / 64];
    memset(touched, 0, sizeof(touched));
    for (int32_t i = 0; i < n; ++i)
        if (!valid_env(c, env_ids[i]) || env_state(c, env_ids[i]) != SEGVEC_ENV_SENDING) return SEGVEC_ERR_NOT_HELD;
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        int32_t w = e / c->envs_per_worker;
        worker_slot_t *ws = &c->workers[w];
        atomic_store_explicit(&c->env_state[e], SEGVEC_ENV_IN_FLIGHT, memory_order_relaxed);
        uint64_t tail = atomic_load_explicit(&ws->queue_tail, memory_order_relaxed);
        c->action_rings[(int64_t)w * c->envs_per_worker + (int64_t)(tail % c->envs_per_worker)] = e;
        /* The action, the env's slots and its state become worker w's with this store. */
        atomic_store_explicit(&ws->queue_tail, tail + 1, memory_order_release);
        touched[w / 64] |= 1ull << (w % 64);
    }
    for (int32_t w = 0; w < c->W; ++w)
        if (touched[w / 64] & (1ull << (w % 64))) wake_worker(&c->workers[w]);
    return SEGVEC_OK;
}

int segvec_kick_worker(segvec_core_t *c, int32_t w) {
    if (w < 0 || w >= c->W) return SEGVEC_ERR_INVALID;
    atomic_fetch_add_explicit(&c->workers[w].seq, 1, memory_order_seq_cst);
    futex_wake_all(&c->workers[w].seq);
    return SEGVEC_OK;
}

int segvec_shutdown(segvec_core_t *c) {
    atomic_store(&c->shared->signals.shutdown, 1);
    for (int32_t w = 0; w < c->W; ++w) segvec_kick_worker(c, w);
    return SEGVEC_OK;
}

/* ---- learner: a dead worker's envs ------------------------------------------------------------ */

/* Undo whatever a dead worker committed of env e's step since it was sent at env_sent_slot[e]: the
 * cursor goes back to that slot, a row it filled reopens, the spare it moved onto is reserved again,
 * and the slot's outcome is cleared.  The counts of the slots filled follow the cursor. */
static void roll_back(segvec_core_t *c, int32_t e) {
    int64_t slot = c->env_sent_slot[e];
    int32_t r = (int32_t)(slot / c->T), t = (int32_t)(slot % c->T);
    int32_t current = c->env_row[e];
    int32_t spare = current != r ? current : c->env_spare[e];
    if (spare >= 0 && spare != r) {
        reset_row_data(c, spare);
        c->row_state[spare] = SEGVEC_ROW_RESERVED;
        c->row_env_id[spare] = e;
        c->env_spare[e] = spare;
    }
    if (c->awaiting_row[e] == r) c->awaiting_row[e] = -1;
    c->row_state[r] = SEGVEC_ROW_FILLING;
    c->row_length[r] = 0;
    for (int32_t h = 0; h < c->H; ++h)
        c->reward[slot * c->H + h] = c->shared->config.poison ? (float)SEGVEC_POISON_REWARD_MILLI / 1000.0f : 0.0f;
    c->terminated[slot] = c->truncated[slot] = c->mask[slot] = 0;
    c->env_row[e] = r;
    c->env_step[e] = t;
    c->env_steps_done[e] = c->row_start_step[r] + t;
}

int segvec_recover_worker(segvec_core_t *c, int32_t w, int32_t *lost_out, int32_t *n_lost_out) {
    if (w < 0 || w >= c->W) return SEGVEC_ERR_INVALID;
    worker_slot_t *ws = &c->workers[w];
    int32_t k = c->envs_per_worker, first = w * k, n_lost = 0;
    atomic_store(&ws->queue_head, atomic_load(&ws->queue_tail));
    ws->seen_seq = atomic_load(&ws->seq);
    atomic_store(&ws->waiting, 0);
    /* Envs in the ready queue were published whole; a READY env that is not there died mid-publish. */
    uint64_t head = atomic_load_explicit(&ws->ready_head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&ws->ready_tail, memory_order_acquire);
    for (int32_t e = first; e < first + k; ++e) {
        int state = env_state(c, e);
        int published = 0;
        if (state == SEGVEC_ENV_READY)
            for (uint64_t i = head; i < tail && !published; ++i) published = ready_entry(c, w, i)->env == e;
        if (state == SEGVEC_ENV_IN_FLIGHT || (state == SEGVEC_ENV_READY && !published)) {
            roll_back(c, e);
            set_env_state(c, e, SEGVEC_ENV_IN_FLIGHT);
            atomic_fetch_add(COUNTER(c->shared, rolled_back), 1);
            lost_out[n_lost++] = e;
        }
    }
    *n_lost_out = n_lost;
    return SEGVEC_OK;
}

/* ---- learner: flush, reset, take, release ----------------------------------------------------- */

int segvec_flush_envs(segvec_core_t *c, int32_t n, const int32_t *env_ids, const float *tail_values,
                      int64_t *copy_from_out, int64_t *copy_to_out) {
    int32_t needed = 0, awaiting = 0;
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        if (!valid_env(c, e)) return SEGVEC_ERR_INVALID;
        int state = env_state(c, e);
        if (!learner_owns(state) && state != SEGVEC_ENV_READY) return SEGVEC_ERR_NOT_HELD;
        needed += c->env_step[e] > 0 && c->env_spare[e] < 0;
        awaiting += c->awaiting_row[e] >= 0;
    }
    pool_lock(c);
    if (!rows_obtainable_locked(c, needed, awaiting + needed)) {
        pool_unlock(c);
        return SEGVEC_ERR_NO_FREE_ROW;
    }
    if (needed <= rows_available_locked(c)) /* new rows first: the rows this flush closes stay */
        for (int32_t i = 0; i < n; ++i) {
            int32_t e = env_ids[i];
            if (c->env_step[e] > 0 && c->env_spare[e] < 0) c->env_spare[e] = reserve_row_locked(c, e);
        }
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        const float *tail = tail_values ? tail_values + (int64_t)i * c->H
                                        : c->value + ((int64_t)c->env_row[e] * c->T + c->env_step[e]) * c->H;
        copy_from_out[i] = -1;
        copy_to_out[i] = -1;
        if (c->awaiting_row[e] >= 0) {
            copy_heads(c, c->tail_value + (int64_t)c->awaiting_row[e] * c->H, tail);
            complete_row_locked(c, c->awaiting_row[e]);
            c->awaiting_row[e] = -1;
        }
        int32_t row = c->env_row[e], t = c->env_step[e];
        if (t == 0) continue; /* nothing written in this row yet: keep it */
        c->row_length[row] = t;
        copy_heads(c, c->tail_value + (int64_t)row * c->H, tail);
        complete_row_locked(c, row);
        int32_t fresh = c->env_spare[e] >= 0 ? c->env_spare[e] : reserve_row_locked(c, e);
        c->env_spare[e] = -1;
        start_row(c, e, fresh);
        /* the current observation moves to slot 0 of the fresh row, its episode_start flag with it */
        c->episode_start[(int64_t)fresh * c->T] = c->episode_start[(int64_t)row * c->T + t];
        c->env_row[e] = fresh;
        c->env_step[e] = 0;
        copy_from_out[i] = (int64_t)row * (c->T + 1) + t;
        copy_to_out[i] = (int64_t)fresh * (c->T + 1);
    }
    pool_unlock(c);
    return SEGVEC_OK;
}

int segvec_begin_resets(segvec_core_t *c, int32_t n, const int32_t *env_ids) {
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        if (!valid_env(c, e)) return SEGVEC_ERR_INVALID;
        if (!learner_owns(env_state(c, e))) return SEGVEC_ERR_NOT_HELD;
        if (c->env_step[e] != 0) return SEGVEC_ERR_INVALID;
    }
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        c->env_sent_slot[e] = (int64_t)c->env_row[e] * c->T;
        set_env_state(c, e, SEGVEC_ENV_RESETTING);
    }
    return SEGVEC_OK;
}

/* The bootstraps of head h of row r into o[t * H + h] (see segvec_fill_next_values).  Always inlined, so
 * the call with H = 1 and h = 0 compiles to the plain scalar loops. */
static inline __attribute__((always_inline)) void fill_row_head(const segvec_core_t *c, int32_t r,
                                                                int32_t same_step, int32_t H, int32_t h,
                                                                float *o) {
    const int32_t T = c->T;
    int64_t base = (int64_t)r * T;
    int32_t len = c->row_length[r];
    const uint8_t *term = c->terminated + base, *trunc = c->truncated + base;
    const float *value = c->value + base * H + h, *tv = c->truncation_value + base * H + h;
    o += h;
    /* Steps inside the row (t < len - 1): value[t + 1], or 0 where terminated (a branch-free loop the
     * compiler vectorizes); then, in rows with a truncation, the truncation value where it is known (or,
     * with same_step, always).  Truncation values are read only in those rows. */
    int32_t inside = len - 1 < T ? len - 1 : T;
    uint8_t any_truncated = 0;
    for (int32_t t = 0; t < inside; ++t) {
        float next = value[(int64_t)(t + 1) * H];
        any_truncated |= trunc[t];
        o[(int64_t)t * H] = term[t] != 0 ? 0.0f : next;
    }
    if (any_truncated) {
        for (int32_t t = 0; t < inside; ++t)
            if (trunc[t] && !term[t] && (same_step || !isnan(tv[(int64_t)t * H]))) o[(int64_t)t * H] = tv[(int64_t)t * H];
    }
    if (len >= 1 && len <= T) { /* the row's last step: the tail value */
        int32_t t = len - 1;
        float x = tv[(int64_t)t * H];
        float nv = (trunc[t] && (same_step || !isnan(x))) ? x : c->tail_value[(int64_t)r * H + h];
        o[(int64_t)t * H] = term[t] ? 0.0f : nv;
    }
    for (int32_t t = len < 0 ? 0 : len; t < T; ++t) o[(int64_t)t * H] = 0.0f; /* past the length */
}

int segvec_fill_next_values(segvec_core_t *c, int32_t n, const int32_t *rows, int32_t same_step, float *out) {
    const int64_t row_items = (int64_t)c->T * c->H;
    same_step = same_step != 0;
    for (int32_t i = 0; i < n; ++i)
        if (rows[i] < 0 || rows[i] >= c->S) return SEGVEC_ERR_INVALID;
    for (int32_t i = 0; i < n; ++i) {
        float *o = out + (int64_t)i * row_items;
        if (c->H == 1)
            fill_row_head(c, rows[i], same_step, 1, 0, o);
        else
            for (int32_t h = 0; h < c->H; ++h) fill_row_head(c, rows[i], same_step, c->H, h, o);
    }
    return SEGVEC_OK;
}

int segvec_take(segvec_core_t *c, int32_t n, int32_t *rows_out) {
    shared_t *sh = c->shared;
    if (n < 0) return SEGVEC_ERR_INVALID;
    pool_lock(c);
    if (sh->pool.complete_tail - sh->pool.complete_head < n) {
        pool_unlock(c);
        return SEGVEC_ERR_NOT_ENOUGH;
    }
    for (int32_t i = 0; i < n; ++i) {
        int32_t row = c->complete_ring[sh->pool.complete_head % c->S];
        sh->pool.complete_head++;
        SEGVEC_ASSERT(c->row_state[row] == SEGVEC_ROW_COMPLETE);
        c->row_state[row] = SEGVEC_ROW_TAKEN;
        rows_out[i] = row;
    }
    atomic_fetch_sub(COUNTER(sh, complete_rows), n);
    atomic_fetch_add(COUNTER(sh, segments_taken), n);
    atomic_fetch_add(COUNTER(sh, taken_rows), n);
    pool_unlock(c);
    return SEGVEC_OK;
}

int segvec_release(segvec_core_t *c, int32_t n, const int32_t *rows) {
    pool_lock(c);
    for (int32_t i = 0; i < n; ++i) {
        if (rows[i] < 0 || rows[i] >= c->S || c->row_state[rows[i]] != SEGVEC_ROW_TAKEN) {
            for (int32_t j = 0; j < i; ++j) c->row_state[rows[j]] = SEGVEC_ROW_TAKEN; /* undo */
            pool_unlock(c);
            return SEGVEC_ERR_ROW_STATE;
        }
        c->row_state[rows[i]] = SEGVEC_ROW_FREE; /* so a row named twice fails its second check */
    }
    for (int32_t i = 0; i < n; ++i) free_row_locked(c, rows[i]);
    atomic_fetch_sub(COUNTER(c->shared, taken_rows), n);
    pool_unlock(c);
    return SEGVEC_OK;
}

/* The finished-episode ring is a seqlock per entry: the writer zeroes the entry's sequence word, writes
 * the fields, then stores ticket + 1; a reader copies the fields between two reads of the word and keeps
 * the copy only if both read ticket + 1.  The fields are read and written as relaxed atomics, and an
 * acquire fence keeps the copy before the second read. */
int segvec_read_episodes(segvec_core_t *c, int64_t *cursor, int32_t max_n, int32_t *env_ids_out,
                         double *returns_out, int64_t *lengths_out, int64_t *end_steps_out, int32_t *n_out,
                         int64_t *lost_out) {
    shared_t *sh = c->shared;
    uint64_t end = atomic_load_explicit(COUNTER(sh, episodes_written), memory_order_acquire);
    uint64_t at = (uint64_t)*cursor;
    int64_t lost = 0;
    int32_t n = 0;
    if (end > at + (uint64_t)c->K) { lost += (int64_t)(end - (uint64_t)c->K - at); at = end - (uint64_t)c->K; }
    while (at < end && n < max_n) {
        uint64_t k = at % (uint64_t)c->K;
        uint64_t seq = atomic_load_explicit(&c->episode_seq[k], memory_order_acquire);
        if (seq != at + 1) {
            if (seq > at + 1) { ++lost; ++at; continue; } /* overwritten by a later episode */
            break;                                      /* not written yet: read it next time */
        }
        __atomic_load(&c->episode_env_id[k], &env_ids_out[n], __ATOMIC_RELAXED);
        __atomic_load(&c->episode_return[k], &returns_out[n], __ATOMIC_RELAXED);
        __atomic_load(&c->episode_length[k], &lengths_out[n], __ATOMIC_RELAXED);
        if (end_steps_out) __atomic_load(&c->episode_end_step[k], &end_steps_out[n], __ATOMIC_RELAXED);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&c->episode_seq[k], memory_order_relaxed) != at + 1) { ++lost; ++at; continue; }
        ++n;
        ++at;
    }
    *cursor = (int64_t)at;
    *n_out = n;
    *lost_out = lost;
    return SEGVEC_OK;
}

/* ---- worker side ------------------------------------------------------------------------------ */

/* Worker w's wait is over at shutdown, or when it was kicked or got actions since its last wait. */
static int work_or_shutdown(segvec_core_t *c, void *slot) {
    worker_slot_t *ws = (worker_slot_t *)slot;
    if (atomic_load_explicit(&c->shared->signals.shutdown, memory_order_acquire)) return SEGVEC_ERR_SHUTDOWN;
    unsigned now = atomic_load_explicit(&ws->seq, memory_order_acquire);
    if (now != ws->seen_seq || atomic_load_explicit(&ws->queue_tail, memory_order_acquire) !=
                                   atomic_load_explicit(&ws->queue_head, memory_order_relaxed)) {
        ws->seen_seq = now; /* a kick that lands between two waits is not lost */
        return SEGVEC_OK;
    }
    return KEEP_WAITING;
}

int segvec_worker_wait(segvec_core_t *c, int32_t w, int32_t timeout_ms) {
    if (w < 0 || w >= c->W) return SEGVEC_ERR_INVALID;
    worker_slot_t *ws = &c->workers[w];
    return wait_for(c, &ws->seq, &ws->waiting, timeout_ms, work_or_shutdown, ws);
}

int segvec_worker_pop(segvec_core_t *c, int32_t w, int32_t max_n, int32_t *env_ids_out, int32_t *n_out) {
    if (w < 0 || w >= c->W) return SEGVEC_ERR_INVALID;
    worker_slot_t *ws = &c->workers[w];
    uint64_t head = atomic_load_explicit(&ws->queue_head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&ws->queue_tail, memory_order_acquire);
    int32_t n = 0;
    while (head < tail && n < max_n) {
        env_ids_out[n++] = c->action_rings[(int64_t)w * c->envs_per_worker + (int64_t)(head % c->envs_per_worker)];
        ++head;
    }
    atomic_store_explicit(&ws->queue_head, head, memory_order_release);
    *n_out = n;
    return SEGVEC_OK;
}

/* Writes env e's finished episode into the ring entry of `ticket` (claimed by the caller). */
static void record_episode(segvec_core_t *c, int32_t e, uint64_t ticket) {
    uint64_t k = ticket % (uint64_t)c->K;
    atomic_store_explicit(&c->episode_seq[k], 0, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    __atomic_store(&c->episode_env_id[k], &e, __ATOMIC_RELAXED);
    __atomic_store(&c->episode_return[k], &c->env_return[e], __ATOMIC_RELAXED);
    __atomic_store(&c->episode_length[k], &c->env_length[e], __ATOMIC_RELAXED);
    int64_t end_step = c->env_steps_done[e] + 1; /* (called before the step is counted) */
    __atomic_store(&c->episode_end_step[k], &end_step, __ATOMIC_RELAXED);
    atomic_store_explicit(&c->episode_seq[k], ticket + 1, memory_order_release);
}

int segvec_commit_steps(segvec_core_t *c, int32_t n, const int32_t *env_ids, const segvec_outcome_t *outcomes,
                        int64_t *obs_slot_out, int64_t *chain_slot_out) {
    shared_t *sh = c->shared;
    int64_t real_steps = 0, nan_rewards = 0, ended = 0;
    /* Checks first (nothing changes on an error), and counts the episodes that end: their tickets in the
     * finished-episode ring are claimed with one atomic add, not one per episode. */
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        if (!valid_env(c, e) || atomic_load_explicit(&c->env_state[e], memory_order_relaxed) != SEGVEC_ENV_IN_FLIGHT)
            return SEGVEC_ERR_NOT_HELD;
        if (c->env_step[e] == c->T - 1 && c->env_spare[e] < 0) return SEGVEC_ERR_NO_FREE_ROW; /* the send reserves it */
        const segvec_outcome_t *o = &outcomes[i];
        ended += o->valid != 0.0 && (o->terminated != 0.0 || o->truncated != 0.0);
    }
    uint64_t ticket = ended ? atomic_fetch_add_explicit(COUNTER(sh, episodes_written), (uint64_t)ended,
                                                        memory_order_relaxed) : 0;
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        int32_t row = c->env_row[e], t = c->env_step[e];
        SEGVEC_ASSERT(row >= 0 && t < c->T && c->row_env_id[row] == e && c->row_state[row] == SEGVEC_ROW_FILLING);
        int64_t slot = (int64_t)row * c->T + t;
        const segvec_outcome_t *o = &outcomes[i];
        double r = o->reward;
        uint8_t term = o->terminated != 0.0, trunc = o->truncated != 0.0, real = o->valid != 0.0;
        uint8_t started = o->episode_started != 0.0;
        for (int32_t h = 0; h < c->H; ++h) c->reward[slot * c->H + h] = (float)r;
        c->env_last_slot[e] = slot;
        c->terminated[slot] = term;
        c->truncated[slot] = trunc;
        c->mask[slot] = real;
        for (int32_t h = 0; h < c->H; ++h) c->env_last_reward[(int64_t)e * c->H + h] = r;
        c->env_last_terminated[e] = term;
        c->env_last_truncated[e] = trunc;
        c->env_needs_reset[e] = o->needs_reset != 0.0;
        if (real) {
            ++real_steps;
            if (isnan(r)) ++nan_rewards;
            c->env_return[e] += r;
            c->env_length[e] += 1;
            if (term || trunc) {
                record_episode(c, e, ticket++);
                c->env_return[e] = 0.0;
                c->env_length[e] = 0;
            }
        }
        if (started) {
            c->env_episode_id[e] += 1;
            c->env_return[e] = 0.0;
            c->env_length[e] = 0;
        }
        c->env_steps_done[e] += 1;
        ++t;
        chain_slot_out[i] = -1;
        if (t == c->T) {
            /* The row awaits its bootstrap; the env moves onto its spare.  The cursor is written last, so
             * segvec_recover_worker can tell how far a worker killed here got. */
            int32_t fresh = c->env_spare[e];
            c->row_length[row] = c->T;
            c->row_state[row] = SEGVEC_ROW_AWAITING_BOOTSTRAP;
            c->awaiting_row[e] = row;
            start_row(c, e, fresh);
            chain_slot_out[i] = (int64_t)row * (c->T + 1) + c->T;
            c->env_row[e] = fresh;
            c->env_step[e] = 0;
            c->env_spare[e] = -1;
            row = fresh;
            t = 0;
        } else {
            c->env_step[e] = t;
        }
        obs_slot_out[i] = (int64_t)row * (c->T + 1) + t;
        c->episode_start[(int64_t)row * c->T + t] = started;
    }
    atomic_fetch_add_explicit(COUNTER(sh, steps), real_steps, memory_order_relaxed);
    if (ended) atomic_fetch_add_explicit(COUNTER(sh, episodes), ended, memory_order_relaxed);
    if (nan_rewards) atomic_fetch_add_explicit(COUNTER(sh, nan_rewards), nan_rewards, memory_order_relaxed);
    return SEGVEC_OK;
}

/* A new episode starts at env e's cursor (shared by resets and restarts). */
static void begin_episode(segvec_core_t *c, int32_t e, int64_t *obs_slot_out) {
    int32_t row = c->env_row[e], t = c->env_step[e];
    c->episode_start[(int64_t)row * c->T + t] = 1;
    for (int32_t h = 0; h < c->H; ++h) c->env_last_reward[(int64_t)e * c->H + h] = 0.0;
    c->env_last_slot[e] = -1;
    c->env_last_terminated[e] = 0;
    c->env_last_truncated[e] = 0;
    c->env_needs_reset[e] = 0;
    c->env_episode_id[e] += 1;
    if (t == 0) c->row_episode_id[row] = c->env_episode_id[e];
    c->env_return[e] = 0.0;
    c->env_length[e] = 0;
    *obs_slot_out = (int64_t)row * (c->T + 1) + t;
}

int segvec_commit_resets(segvec_core_t *c, int32_t n, const int32_t *env_ids, int64_t *obs_slot_out) {
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        if (!valid_env(c, e) || atomic_load_explicit(&c->env_state[e], memory_order_relaxed) != SEGVEC_ENV_RESETTING)
            return SEGVEC_ERR_NOT_HELD;
        if (c->env_step[e] != 0) return SEGVEC_ERR_INVALID;
    }
    for (int32_t i = 0; i < n; ++i) begin_episode(c, env_ids[i], &obs_slot_out[i]);
    return SEGVEC_OK;
}

int segvec_restart_env(segvec_core_t *c, int32_t e, int64_t *obs_slot_out) {
    if (!valid_env(c, e) || atomic_load_explicit(&c->env_state[e], memory_order_relaxed) != SEGVEC_ENV_IN_FLIGHT)
        return SEGVEC_ERR_NOT_HELD;
    int64_t slot = (int64_t)c->env_row[e] * c->T + c->env_step[e];
    /* The observation at slot t continues the transition at t - 1 unless it already starts an episode
     * (an autoreset, or an earlier restart at this same slot, whose cut stands). */
    if (c->env_step[e] > 0 && !c->episode_start[slot] && c->mask[slot - 1] && !c->terminated[slot - 1]) {
        c->truncated[slot - 1] = 1;
        copy_heads(c, c->truncation_value + (slot - 1) * c->H, c->value + slot * c->H);
    }
    for (int32_t h = 0; h < c->H; ++h) c->value[slot * c->H + h] = NAN;
    c->logprob[slot] = NAN;
    begin_episode(c, e, obs_slot_out);
    c->env_last_truncated[e] = 1;
    atomic_fetch_add(COUNTER(c->shared, restarts), 1);
    return SEGVEC_OK;
}

int segvec_fail_envs(segvec_core_t *c, int32_t n, const int32_t *env_ids) {
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        if (!valid_env(c, e)) return SEGVEC_ERR_INVALID;
        int state = atomic_load_explicit(&c->env_state[e], memory_order_relaxed);
        if (state != SEGVEC_ENV_IN_FLIGHT && state != SEGVEC_ENV_RESETTING) return SEGVEC_ERR_NOT_HELD;
    }
    for (int32_t i = 0; i < n; ++i) set_env_state(c, env_ids[i], SEGVEC_ENV_FAILED);
    return SEGVEC_OK;
}

int segvec_skip_steps(segvec_core_t *c, int32_t n, const int32_t *env_ids) {
    for (int32_t i = 0; i < n; ++i)
        if (!valid_env(c, env_ids[i]) ||
            atomic_load_explicit(&c->env_state[env_ids[i]], memory_order_relaxed) != SEGVEC_ENV_IN_FLIGHT)
            return SEGVEC_ERR_NOT_HELD;
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        c->env_last_reward[e] = 0.0;
        c->env_last_terminated[e] = 0;
        c->env_last_truncated[e] = 0;
        c->env_last_slot[e] = -1;
    }
    return SEGVEC_OK;
}

int segvec_return_envs(segvec_core_t *c, int32_t n, const int32_t *env_ids) {
    for (int32_t i = 0; i < n; ++i)
        if (!valid_env(c, env_ids[i]) ||
            atomic_load_explicit(&c->env_state[env_ids[i]], memory_order_relaxed) != SEGVEC_ENV_IN_FLIGHT)
            return SEGVEC_ERR_NOT_HELD;
    for (int32_t i = 0; i < n; ++i) set_env_state(c, env_ids[i], SEGVEC_ENV_HELD);
    return SEGVEC_OK;
}

/* ---- cursors ---------------------------------------------------------------------------------- */

/* Runs LOOP(size) with `size` a constant for the small item sizes of common observations (a copy the
 * compiler inlines), else with the variable `bytes`. */
#define SMALL_ITEM_SWITCH(bytes, LOOP)                                                                      \
    switch (bytes) {                                                                                        \
    case 4: LOOP(4) break;                                                                                  \
    case 8: LOOP(8) break;                                                                                  \
    case 16: LOOP(16) break;                                                                                \
    case 32: LOOP(32) break;                                                                                \
    default: LOOP(bytes) break;                                                                             \
    }

int segvec_cursor_slots(segvec_core_t *c, int32_t n, const int32_t *env_ids, int32_t kind, int64_t *slots_out) {
    int64_t width = kind == SEGVEC_OBS_SLOT ? c->T + 1 : c->T;
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        if (e < 0 || e >= c->E) return SEGVEC_ERR_INVALID;
        slots_out[i] = (int64_t)c->env_row[e] * width + c->env_step[e];
    }
    return SEGVEC_OK;
}

int segvec_gather_current(segvec_core_t *c, int32_t n, const int32_t *env_ids, const void *src,
                          int64_t item_bytes, void *dst) {
    const char *s = (const char *)src;
    char *d = (char *)dst;
    for (int32_t i = 0; i < n; ++i)
        if (env_ids[i] < 0 || env_ids[i] >= c->E) return SEGVEC_ERR_INVALID;
#define GATHER(size)                                                                                        \
    for (int32_t i = 0; i < n; ++i) {                                                                       \
        int64_t slot = (int64_t)c->env_row[env_ids[i]] * (c->T + 1) + c->env_step[env_ids[i]];             \
        memcpy(d + (int64_t)i * (size), s + slot * (size), (size_t)(size));                                 \
    }
    SMALL_ITEM_SWITCH(item_bytes, GATHER)
#undef GATHER
    return SEGVEC_OK;
}

/* ---- kernels ---------------------------------------------------------------------------------- */

int segvec_scatter_obs(const void *obs, int64_t item_bytes, int32_t n, const int64_t *obs_slots,
                       const int64_t *chain_slots, void *dst) {
    const char *s = (const char *)obs;
    char *d = (char *)dst;
#define SCATTER(size)                                                                                       \
    for (int32_t i = 0; i < n; ++i) {                                                                       \
        memcpy(d + obs_slots[i] * (size), s + (int64_t)i * (size), (size_t)(size));                         \
        if (chain_slots && chain_slots[i] >= 0)                                                             \
            memcpy(d + chain_slots[i] * (size), s + (int64_t)i * (size), (size_t)(size));                   \
    }
    SMALL_ITEM_SWITCH(item_bytes, SCATTER)
#undef SCATTER
    return SEGVEC_OK;
}

/* GAE of head h of row i (see segvec_gae): flags at base + t, head values at (base + t) * H + h.  Always
 * inlined, so heads = 1 compiles to the scalar loop. */
static inline __attribute__((always_inline)) void gae_row_head(
        int64_t base, int32_t T, int32_t H, int32_t h, int32_t len, const float *reward, const float *value,
        const float *next_value, const uint8_t *terminated, const uint8_t *truncated, const uint8_t *mask,
        float gamma, float lam, float *adv, float *ret) {
    float running = 0.0f; /* advantage of the step after t, 0 when the recursion stops */
    for (int32_t t = T - 1; t >= 0; --t) {
        int64_t f = base + t, k = f * H + h;
        if (t >= len || !mask[f]) {
            adv[k] = 0.0f;
            ret[k] = 0.0f;
            running = 0.0f;
            continue;
        }
        float nv = terminated[f] ? 0.0f : next_value[k];
        float delta = reward[k] + gamma * nv - value[k];
        int stop = terminated[f] || truncated[f] || t == len - 1;
        running = delta + (stop ? 0.0f : gamma * lam * running);
        adv[k] = running;
        ret[k] = running + value[k];
    }
}

int segvec_gae(int32_t n, int32_t T, int32_t H, const float *reward, const float *value, const float *next_value,
               const uint8_t *terminated, const uint8_t *truncated, const uint8_t *mask,
               const int32_t *length, const float *gamma, const float *lam, float *adv, float *ret) {
    if (n < 0 || T < 1 || H < 1) return SEGVEC_ERR_INVALID;
    for (int32_t i = 0; i < n; ++i) {
        int64_t base = (int64_t)i * T;
#define GAE_ROW(H_, h_) gae_row_head(base, T, H_, h_, length[i], reward, value, next_value, terminated, truncated, \
                                     mask, gamma[h_], lam[h_], adv, ret)
        if (H == 1)
            GAE_ROW(1, 0);
        else
            for (int32_t h = 0; h < H; ++h) GAE_ROW(H, h);
#undef GAE_ROW
    }
    return SEGVEC_OK;
}
