/* driver.c -- a threaded stress driver of the segvec core (native/segvec.c), for the sanitizers.
 *
 *   driver <seconds> <num_envs> <num_workers> <horizon> <num_segments> <seed> [value_heads]
 *
 * One block of plain memory holds the core (segvec_format); every thread attaches its own handle.
 *
 *   - the LEARNER thread runs the learner side of segvec.h: flush + begin_resets of every env, then a loop of
 *     wait_ready / pop_ready (random max_n), prepare_send (sometimes cancel_send and prepare again) /
 *     dispatch, take / fill_next_values / release (rows sometimes held for a while), flushes of held envs
 *     and of landed (READY) envs, resets of failed envs, read_episodes, count_envs and read_stats.  It also
 *     kills a worker now and then and replaces it (segvec_recover_worker).
 *   - W WORKER threads run the worker side: worker_wait / worker_pop, then per env a step
 *     (segvec_commit_steps), a failure (segvec_fail_envs) or a restart in place (segvec_restart_env); resets
 *     (segvec_commit_resets); observations written at obs_slot_out / chain_slot_out; segvec_publish.
 *
 * The driver's own arrays stand in for what Python lays out after the core: `obs` [S, T + 1] (an int64
 * observation per slot) and `act` [S, T] (an int64 action per step slot).  They are plain memory: the
 * core's hand-overs (the action and ready queues, the env states) are the only thing that orders the
 * threads' accesses to them, so ThreadSanitizer checks the header's ownership rules on them too.  The
 * stand-ins for the command pipe (reset orders) and the error pipe (failure notes) are mutexes.
 *
 * A fake env: observation = obs_code(env, counter), where the counter of the env goes up by one for each new
 * observation (step, reset, restart) and never goes back.  The reward of a step names the env and the
 * counter of the observation it leads to; the learner's value of an observation names the env and its
 * counter (with value heads, head h sends head_value(h, that value), so every head is checked against head 0);
 * the action the learner writes is the code of the observation it acted on.  Envs with an even id
 * follow SAME_STEP autoreset (an episode's last step starts the next episode), odd ones NEXT_STEP (the step
 * after an episode's end is a reset step with valid = 0).
 *
 * A "dead" worker is a thread that returns between two of its calls into the core, at a random point of its
 * protocol; the learner joins it, calls segvec_recover_worker and starts a replacement that restarts the lost
 * envs (segvec_restart_env + publish) and resets the RESETTING ones.
 *
 * Every check that fails prints a VIOLATION line (the first 20) and makes the exit status 1.  The last line
 * of stdout is a one-line summary.
 */
#define _POSIX_C_SOURCE 200809L
#include "segvec.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_ENVS 64          /* keeps reward and value codes exact in float32 */
#define EPISODE_CAPACITY 32  /* small, so that the finished-episode ring overwrites entries */
#define MAX_EPISODE_LEN 40
#define MAX_HEADS 4          /* value heads (the optional last argument) */

/* ---- checks ----------------------------------------------------------------------------------- */

static atomic_long g_violations;

static void violation(const char *fmt, ...) {
    long n = atomic_fetch_add(&g_violations, 1);
    if (n >= 20) return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "VIOLATION: %s\n", line);
}

#define CHECK(cond, ...) do { if (!(cond)) violation(__VA_ARGS__); } while (0)
/* A call that must return SEGVEC_OK. */
#define OK(call) do {                                                                                   \
        int rc_ = (call);                                                                               \
        if (rc_ != SEGVEC_OK)                                                                           \
            violation("line %d: %s returned %d (%s)", __LINE__, #call, rc_, segvec_strerror(rc_));     \
    } while (0)

/* ---- random numbers (one generator per thread) ------------------------------------------------ */

typedef struct { uint64_t s; } rng_t;

static rng_t rng_make(uint64_t seed, uint64_t stream) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + stream * 0xBF58476D1CE4E5B9ull + 0x94D049BB133111EBull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    rng_t r = {z ? z : 1};
    return r;
}
static uint64_t rnd(rng_t *r) {
    uint64_t x = r->s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->s = x;
    return x * 0x2545F4914F6CDD1Dull;
}
static uint32_t rndn(rng_t *r, uint32_t n) { return n ? (uint32_t)((rnd(r) >> 32) % n) : 0; }
static int chance(rng_t *r, double p) { return (double)(rnd(r) >> 11) * (1.0 / 9007199254740992.0) < p; }

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- the fake env's codes ------------------------------------------------------------------------ */

#define CTR_MASK ((INT64_C(1) << 40) - 1)
static int64_t obs_code(int32_t e, int64_t ctr) { return ((int64_t)(e + 1) << 40) | ctr; }
static int32_t obs_env(int64_t code) { return (int32_t)(code >> 40) - 1; }
static int64_t obs_ctr(int64_t code) { return code & CTR_MASK; }
/* reward of the step that leads to the observation with counter `ctr` */
static float reward_of(int32_t e, int64_t ctr) { return (float)(e * 65536 + (int32_t)(ctr & 0xffff)); }
/* the learner's value of the observation with counter `ctr` */
static float value_of(int32_t e, int64_t ctr) { return (float)(e * 65536 + (int32_t)(ctr & 0xffff)) + 0.25f; }
/* the learner's value of head h, from head 0's value v (exact in float32: odd heads negate it) */
static float head_value(int32_t h, float v) { return h % 2 ? -v : v; }
static int same_step_env(int32_t e) { return e % 2 == 0; }
static int same_float(float a, float b) { return (isnan(a) && isnan(b)) || a == b; }

/* ---- shared state ----------------------------------------------------------------------------- */

static struct {
    int32_t E, W, S, T, k, H;   /* H: value heads (values, rewards and bootstraps are [.., H], head-minor) */
    uint64_t seed;
    void *block;
    int64_t block_bytes;
    segvec_layout_t L;
    int64_t *obs;        /* [S, T + 1] the "observations" (Python's part of the block) */
    int64_t *act;        /* [S, T] the "actions" */
    int64_t *pubseq;     /* [E] publication number of the env within its worker (written before publish) */
    /* views of the block's public arrays, read where the header lets their reader read them */
    float *reward, *value, *truncation_value, *next_value, *tail_value;
    uint8_t *terminated, *truncated, *mask, *episode_start, *env_needs_reset;
    int64_t *policy_version, *row_start_step;
    int32_t *row_env_id, *row_length;
    atomic_int *env_state;
    double *env_last_reward;
    atomic_int stop;
} G;

/* The fake env objects: touched only by the thread that serves the env's worker index (a replacement
 * starts after its predecessor was joined). */
typedef struct {
    int64_t ctr;          /* counter of the env's current observation */
    int32_t ep_len;
    int32_t needs_reset;  /* NEXT_STEP: the next step is a reset step */
} env_model_t;
static env_model_t *g_model;

typedef struct {
    pthread_t thread;
    int running;               /* learner only */
    int generation;            /* written by the learner before it starts the thread */
    atomic_int dead;           /* the thread "died" (returned between two calls) */
    atomic_int die_countdown;  /* > 0: die at that many protocol points from now (set by the learner) */
    pthread_mutex_t mu;        /* the command pipe's stand-in: reset orders */
    int32_t *resets;
    int32_t n_resets;
    /* start-up orders of a replacement (written before pthread_create) */
    int32_t *lost, n_lost, *resetting, n_resetting;
    /* the worker thread's own (read by the learner after join) */
    int64_t pub_counter, real_steps, episodes, restarts, steps_served, failures;
} worker_t;
static worker_t *g_workers;

/* The error pipe's stand-in: envs a worker marked FAILED. */
static pthread_mutex_t g_fail_mu = PTHREAD_MUTEX_INITIALIZER;
static int32_t *g_fail_list;
static int32_t g_fail_n;

/* ================================================================================================ */
/* Worker threads                                                                                   */
/* ================================================================================================ */

/* A protocol point: the worker dies here when the learner asked it to (die_countdown reaches 0). */
static int die_now(worker_t *wk) {
    if (atomic_load_explicit(&wk->die_countdown, memory_order_relaxed) <= 0) return 0;
    return atomic_fetch_sub(&wk->die_countdown, 1) == 1;
}
#define DIE_POINT() do { if (die_now(wk)) return 1; } while (0)

/* Publishes `ids` in random chunks (several publish calls, a protocol point between them).  The
 * publication number is written before the env is handed over. */
static int publish_chunks(segvec_core_t *core, worker_t *wk, rng_t *rng, int32_t n, int32_t *ids) {
    while (n > 0) {
        int32_t m = 1 + (int32_t)rndn(rng, (uint32_t)n);
        for (int32_t i = 0; i < m; ++i) G.pubseq[ids[i]] = ++wk->pub_counter;
        OK(segvec_publish(core, m, ids));
        ids += m;
        n -= m;
        if (n > 0) DIE_POINT();
    }
    return 0;
}

/* Failure notes go to the learner (the error pipe), then the alert (as the Python workers do). */
static void report_failures(segvec_core_t *core, int32_t n, const int32_t *ids) {
    pthread_mutex_lock(&g_fail_mu);
    for (int32_t i = 0; i < n; ++i) {
        if (g_fail_n < G.E) g_fail_list[g_fail_n++] = ids[i];
        else violation("failure list overflow (env %d failed twice without a reset?)", ids[i]);
    }
    pthread_mutex_unlock(&g_fail_mu);
    OK(segvec_post_alert(core));
}

/* Resets ordered by the learner (RESETTING envs, cursor at a row's slot 0); some fail. */
static int serve_resets(segvec_core_t *core, worker_t *wk, rng_t *rng, int32_t n, const int32_t *ids) {
    int32_t ok[MAX_ENVS], bad[MAX_ENVS], n_ok = 0, n_bad = 0;
    int64_t slots[MAX_ENVS], codes[MAX_ENVS];
    for (int32_t i = 0; i < n; ++i) {
        if (chance(rng, 0.02)) bad[n_bad++] = ids[i];
        else ok[n_ok++] = ids[i];
    }
    DIE_POINT();
    if (n_bad) {
        /* segvec_fail_envs: RESETTING -> FAILED; the learner owns them until it resets them again */
        OK(segvec_fail_envs(core, n_bad, bad));
        wk->failures += n_bad;
        DIE_POINT();
        report_failures(core, n_bad, bad);
    }
    if (!n_ok) return 0;
    OK(segvec_commit_resets(core, n_ok, ok, slots));
    DIE_POINT();
    for (int32_t i = 0; i < n_ok; ++i) {
        int32_t e = ok[i];
        /* segvec_commit_resets: the reset observation goes to the cursor, a row's slot 0 */
        CHECK(slots[i] >= 0 && slots[i] % (G.T + 1) == 0, "commit_resets: obs slot %lld of env %d is not a slot 0",
              (long long)slots[i], e);
        env_model_t *m = &g_model[e];
        m->ctr++;
        m->ep_len = 0;
        m->needs_reset = 0;
        codes[i] = obs_code(e, m->ctr);
    }
    OK(segvec_scatter_obs(codes, 8, n_ok, slots, NULL, G.obs));
    DIE_POINT();
    return publish_chunks(core, wk, rng, n_ok, ok);
}

/* segvec_restart_env: the new episode starts at the cursor slot, in the same row; the driver writes its
 * first observation there. */
static void restart_one(segvec_core_t *core, worker_t *wk, int32_t e) {
    int64_t slot, cursor;
    OK(segvec_cursor_slots(core, 1, &e, SEGVEC_OBS_SLOT, &cursor));
    OK(segvec_restart_env(core, e, &slot));
    wk->restarts++;
    CHECK(slot == cursor, "restart_env(%d): obs slot %lld is not the cursor %lld", e, (long long)slot,
          (long long)cursor);
    env_model_t *m = &g_model[e];
    m->ctr++;
    m->ep_len = 0;
    m->needs_reset = 0;
    G.obs[slot] = obs_code(e, m->ctr);
}

/* Envs whose step died with the previous worker (rolled back, IN_FLIGHT): restarted in place. */
static int restart_lost(segvec_core_t *core, worker_t *wk, rng_t *rng, int32_t n, int32_t *ids) {
    for (int32_t i = 0; i < n; ++i) {
        DIE_POINT();
        restart_one(core, wk, ids[i]);
    }
    DIE_POINT();
    return publish_chunks(core, wk, rng, n, ids);
}

/* Envs popped from the action queue: each is stepped, failed or restarted; then published. */
static int serve_steps(segvec_core_t *core, worker_t *wk, rng_t *rng, int32_t n, const int32_t *ids) {
    int64_t step_slots[MAX_ENVS], cur[MAX_ENVS], obs_slots[MAX_ENVS], chain[MAX_ENVS], codes[MAX_ENVS];
    int32_t stepped[MAX_ENVS], failed[MAX_ENVS], restarted[MAX_ENVS], publish[MAX_ENVS];
    int32_t n_step = 0, n_fail = 0, n_restart = 0, n_pub = 0;
    segvec_outcome_t out[MAX_ENVS];
    int64_t new_ctr[MAX_ENVS];
    DIE_POINT();
    OK(segvec_cursor_slots(core, n, ids, SEGVEC_STEP_SLOT, step_slots));
    OK(segvec_gather_current(core, n, ids, G.obs, 8, cur));
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = ids[i];
        env_model_t *m = &g_model[e];
        int64_t expect = obs_code(e, m->ctr);
        /* ownership hand-over (dispatch -> worker_pop): the env's current observation is the one the worker
         * wrote last, and the action at its cursor slot is the one the learner wrote for that observation */
        CHECK(cur[i] == expect, "worker: env %d's current observation is (env %d, ctr %lld), expected ctr %lld", e,
              obs_env(cur[i]), (long long)obs_ctr(cur[i]), (long long)m->ctr);
        CHECK(G.act[step_slots[i]] == expect,
              "worker: the action at env %d's cursor slot %lld was written for (env %d, ctr %lld), not ctr %lld", e,
              (long long)step_slots[i], obs_env(G.act[step_slots[i]]), (long long)obs_ctr(G.act[step_slots[i]]),
              (long long)m->ctr);
        CHECK(G.env_needs_reset[e] == m->needs_reset, "worker: env_needs_reset[%d] = %d, expected %d", e,
              G.env_needs_reset[e], m->needs_reset);
        if (chance(rng, 0.004)) failed[n_fail++] = e;
        else if (chance(rng, 0.005)) restarted[n_restart++] = e;
        else stepped[n_step++] = e;
    }
    wk->steps_served += n;
    if (n_fail) {
        /* segvec_fail_envs: IN_FLIGHT -> FAILED, cursor untouched */
        OK(segvec_fail_envs(core, n_fail, failed));
        wk->failures += n_fail;
        DIE_POINT();
        report_failures(core, n_fail, failed);
    }
    for (int32_t i = 0; i < n_restart; ++i) {
        int32_t e = restarted[i];
        restart_one(core, wk, e);
        publish[n_pub++] = e;
        DIE_POINT();
    }
    if (n_step) {
        int64_t before[MAX_ENVS];
        OK(segvec_cursor_slots(core, n_step, stepped, SEGVEC_STEP_SLOT, before));
        for (int32_t i = 0; i < n_step; ++i) {
            int32_t e = stepped[i];
            env_model_t *m = &g_model[e];
            segvec_outcome_t *o = &out[i];
            new_ctr[i] = m->ctr + 1;
            if (!same_step_env(e) && m->needs_reset) {
                /* NEXT_STEP: the reset step; its action is ignored (valid = 0) */
                *o = (segvec_outcome_t){0.0, 0.0, 0.0, 0.0, 1.0, 0.0};
            } else {
                int term = chance(rng, 0.03);
                int trunc = !term && (chance(rng, 0.02) || m->ep_len + 1 >= MAX_EPISODE_LEN);
                int end = term || trunc;
                *o = (segvec_outcome_t){reward_of(e, new_ctr[i]), term, trunc, 1.0,
                                        end && same_step_env(e) ? 1.0 : 0.0, end && !same_step_env(e) ? 1.0 : 0.0};
            }
        }
        OK(segvec_commit_steps(core, n_step, stepped, out, obs_slots, chain));
        for (int32_t i = 0; i < n_step; ++i) {
            int32_t e = stepped[i];
            env_model_t *m = &g_model[e];
            const segvec_outcome_t *o = &out[i];
            int64_t r = before[i] / G.T, t = before[i] % G.T;
            /* segvec_commit_steps: the cursor advances by one slot, onto the spare row at the row's end,
             * and the finished row's obs[horizon] slot is named for the chained observation */
            if (t < G.T - 1)
                CHECK(obs_slots[i] == r * (G.T + 1) + t + 1 && chain[i] == -1,
                      "commit_steps(%d): obs slot %lld / chain %lld after step slot %lld", e, (long long)obs_slots[i],
                      (long long)chain[i], (long long)before[i]);
            else
                CHECK(obs_slots[i] % (G.T + 1) == 0 && obs_slots[i] / (G.T + 1) != r && chain[i] == r * (G.T + 1) + G.T,
                      "commit_steps(%d): obs slot %lld / chain %lld after the last step slot %lld", e,
                      (long long)obs_slots[i], (long long)chain[i], (long long)before[i]);
            if (o->valid != 0.0) {
                wk->real_steps++;
                if (o->terminated != 0.0 || o->truncated != 0.0) wk->episodes++;
            }
            m->ctr = new_ctr[i];
            m->needs_reset = o->needs_reset != 0.0;
            m->ep_len = o->episode_started != 0.0 ? 0 : m->ep_len + 1;
            codes[i] = obs_code(e, m->ctr);
        }
        DIE_POINT();
        OK(segvec_scatter_obs(codes, 8, n_step, obs_slots, chain, G.obs));
        DIE_POINT();
        for (int32_t i = 0; i < n_step; ++i) publish[n_pub++] = stepped[i];
    }
    /* shuffle, so publication order differs from pop order */
    for (int32_t i = n_pub - 1; i > 0; --i) {
        int32_t j = (int32_t)rndn(rng, (uint32_t)i + 1), tmp = publish[i];
        publish[i] = publish[j];
        publish[j] = tmp;
    }
    return publish_chunks(core, wk, rng, n_pub, publish);
}

/* Calls any process may make, made by workers now and then while the learner runs. */
static void worker_side_reads(segvec_core_t *core, rng_t *rng, int64_t *ep_cursor) {
    segvec_stats_t st;
    int32_t count, ids[8], n;
    double returns[8];
    int64_t lengths[8], lost;
    /* each counter is read atomically, but not all of them at one instant: while the learner moves rows,
     * only the learner (their one writer) can compare them with each other */
    OK(segvec_read_stats(core, &st));
    CHECK(st.steps >= 0 && st.segments_completed >= 0 && st.free_rows >= 0 && st.free_rows <= G.S,
          "worker: stats out of range (steps %lld, completed %lld, free %lld)", (long long)st.steps,
          (long long)st.segments_completed, (long long)st.free_rows);
    OK(segvec_count_envs(core, SEGVEC_MASK_OUTSTANDING, &count));
    CHECK(count >= 0 && count <= G.E, "worker: count_envs = %d", count);
    OK(segvec_read_episodes(core, ep_cursor, 1 + (int32_t)rndn(rng, 8), ids, returns, lengths, NULL, &n, &lost));
    for (int32_t i = 0; i < n; ++i)
        CHECK(ids[i] >= 0 && ids[i] < G.E && lengths[i] >= 1, "worker: bad episode entry (env %d, length %lld)", ids[i],
              (long long)lengths[i]);
}

static void *worker_main(void *arg) {
    int32_t w = (int32_t)(intptr_t)arg;
    worker_t *wk = &g_workers[w];
    rng_t rng = rng_make(G.seed, 1000u + (uint64_t)w * 131u + (uint64_t)wk->generation * 7919u);
    segvec_core_t *core = NULL;
    int32_t ids[MAX_ENVS], n;
    int64_t ep_cursor = 0;
    int died = 0;
    OK(segvec_attach(G.block, G.block_bytes, &core));
    if (!core) return NULL;
    /* a replacement: restart the envs whose step was lost, reset the ones its predecessor was resetting */
    if (wk->n_lost && restart_lost(core, wk, &rng, wk->n_lost, wk->lost)) { died = 1; goto out; }
    if (wk->n_resetting && serve_resets(core, wk, &rng, wk->n_resetting, wk->resetting)) { died = 1; goto out; }
    while (!atomic_load(&G.stop)) {
        static const int32_t timeouts[] = {0, 1, 10, -1};
        if (die_now(wk)) { died = 1; goto out; }
        int rc = segvec_worker_wait(core, w, timeouts[rndn(&rng, 4)]);
        if (rc == SEGVEC_ERR_SHUTDOWN) break;
        CHECK(rc == SEGVEC_OK || rc == SEGVEC_ERR_TIMEOUT, "worker_wait returned %d", rc);
        /* reset orders (the command pipe) */
        pthread_mutex_lock(&wk->mu);
        n = wk->n_resets;
        memcpy(ids, wk->resets, (size_t)n * sizeof(int32_t));
        wk->n_resets = 0;
        pthread_mutex_unlock(&wk->mu);
        if (n && serve_resets(core, wk, &rng, n, ids)) { died = 1; goto out; }
        if (die_now(wk)) { died = 1; goto out; }
        OK(segvec_worker_pop(core, w, 1 + (int32_t)rndn(&rng, (uint32_t)G.k), ids, &n));
        CHECK(n >= 0 && n <= G.k, "worker_pop returned %d envs", n);
        for (int32_t i = 0; i < n; ++i)
            CHECK(ids[i] / G.k == w, "worker %d popped env %d of another worker", w, ids[i]);
        if (n && serve_steps(core, wk, &rng, n, ids)) { died = 1; goto out; }
        if (chance(&rng, 0.01)) worker_side_reads(core, &rng, &ep_cursor);
    }
out:
    segvec_detach(core);
    if (died) atomic_store_explicit(&wk->dead, 1, memory_order_release);
    return NULL;
}

/* ================================================================================================ */
/* The learner                                                                                      */
/* ================================================================================================ */

enum { L_OUT = 0, L_HELD = 1, L_FAILED = 2 };

static struct {
    segvec_core_t *core;
    rng_t rng;
    int64_t it;                /* iteration; the policy version of its sends is it + 1 */
    int8_t *lstate;            /* [E] the learner's view of each env */
    int64_t *last_ctr;         /* [E] counter of the observation it last acted on (send or reset order) */
    int32_t out;               /* envs handed to workers and not received back (L_OUT) */
    int32_t n_held_envs;
    int64_t *last_pubseq;      /* [W] */
    uint8_t *held;             /* [S] rows taken and not released */
    int32_t *held_rows;
    int64_t *held_until;
    uint64_t *held_sum;
    int32_t n_held;
    int64_t *end_step, *end_ctr; /* [E] end of the env's last taken row: step count, counter of obs[length] */
    int32_t *pending;          /* envs known FAILED, to reset */
    int32_t n_pending;
    float *nv;                 /* [S * T * H] scratch for fill_next_values */
    int64_t ep_cursor;
    segvec_stats_t last;
    /* tallies for the summary */
    int64_t taken, rows_checked, resets, failures, deaths, lost_envs, flushes, landed_flushes, sends, cancels,
        no_free_row, episodes_read, episodes_lost, negative_checks, pops;
} Lr;

/* Element (k, h) of a head-minor array: k a step slot (or a row, for tail_value), h a value head. */
#define HEAD(array, k, h) ((array)[(int64_t)(k) * G.H + (h)])

static int env_state_now(int32_t e) { return atomic_load_explicit(&G.env_state[e], memory_order_acquire); }

/* A hash of everything a taken row holds (the next_value row excepted: fill_next_values may write it). */
static uint64_t row_sum(int32_t r) {
    uint64_t h = 1469598103934665603ull;
#define MIX(ptr, bytes) do {                                                      \
        const unsigned char *p_ = (const unsigned char *)(ptr);                   \
        for (size_t i_ = 0; i_ < (size_t)(bytes); ++i_) h = (h ^ p_[i_]) * 1099511628211ull; \
    } while (0)
    int64_t T = G.T, b = (int64_t)r * T;
    MIX(G.reward + b * G.H, 4 * T * G.H);
    MIX(G.value + b * G.H, 4 * T * G.H);
    MIX(G.truncation_value + b * G.H, 4 * T * G.H);
    MIX(G.policy_version + b, 8 * T);
    MIX(G.terminated + b, T);
    MIX(G.truncated + b, T);
    MIX(G.mask + b, T);
    MIX(G.episode_start + b, T);
    MIX(G.tail_value + (int64_t)r * G.H, 4 * G.H);
    MIX(G.row_env_id + r, 4);
    MIX(G.row_length + r, 4);
    MIX(G.row_start_step + r, 8);
    MIX(G.obs + (int64_t)r * (T + 1), 8 * (T + 1));
#undef MIX
    return h;
}

/* The contents of a row just taken (COMPLETE -> TAKEN), against the fake env and the segvec.h layout docs. */
static void check_row(int32_t r) {
    const int32_t T = G.T;
    int32_t e = G.row_env_id[r], L = G.row_length[r];
    Lr.rows_checked++;
    if (e < 0 || e >= G.E || L < 1 || L > T) {
        violation("taken row %d: env %d, length %d (complete rows have 1..horizon steps)", r, e, L);
        return;
    }
    int64_t c[T + 1];
    const int64_t *o = G.obs + (int64_t)r * (T + 1);
    for (int32_t t = 0; t <= L; ++t) {
        CHECK(obs_env(o[t]) == e, "row %d (env %d): obs[%d] belongs to env %d", r, e, t, obs_env(o[t]));
        c[t] = obs_ctr(o[t]);
    }
    /* segvec_fill_next_values, into scratch or into the block's own next_value row (zero-copy use) */
    float *nv = chance(&Lr.rng, 0.5) ? G.next_value + (int64_t)r * T * G.H : Lr.nv;
    OK(segvec_fill_next_values(Lr.core, 1, &r, 0, nv));
    float tail = HEAD(G.tail_value, r, 0);
    int64_t base = (int64_t)r * T;
    for (int32_t t = 0; t < T; ++t) {
        int64_t k = base + t;
        if (t >= L) {
            /* past the length nothing was committed (a flush closes the row at the cursor) */
            CHECK(!G.mask[k] && !G.terminated[k] && HEAD(G.reward, k, 0) == 0.0f, "row %d (env %d, length %d): slot %d is written",
                  r, e, L, t);
            CHECK(HEAD(nv, t, 0) == 0.0f, "row %d: next_value[%d] past the length is %g", r, t, HEAD(nv, t, 0));
            continue;
        }
        int jump = c[t + 1] != c[t] + 1;
        /* the learner sent value_of(obs[t]) for every slot it acted on, stamped with its policy version */
        CHECK(HEAD(G.value, k, 0) == value_of(e, c[t]), "row %d (env %d): value[%d] = %g, expected %g for ctr %lld", r, e, t,
              HEAD(G.value, k, 0), value_of(e, c[t]), (long long)c[t]);
        CHECK(G.policy_version[k] >= 1 && G.policy_version[k] <= Lr.it + 1 &&
                  (t == 0 || G.policy_version[k] >= G.policy_version[k - 1]),
              "row %d: policy_version[%d] = %lld", r, t, (long long)G.policy_version[k]);
        CHECK(!(G.terminated[k] && G.truncated[k]), "row %d: slot %d both terminated and truncated", r, t);
        if (G.mask[k]) {
            /* a real transition: its reward names the observation the step led to (counter + 1) */
            CHECK(HEAD(G.reward, k, 0) == reward_of(e, c[t] + 1), "row %d (env %d): reward[%d] = %g, expected %g (ctr %lld)", r, e,
                  t, HEAD(G.reward, k, 0), reward_of(e, c[t] + 1), (long long)c[t]);
        } else {
            /* NEXT_STEP reset step (valid = 0): no reward, no episode end, the next obs starts an episode */
            CHECK(!same_step_env(e) && HEAD(G.reward, k, 0) == 0.0f && !G.terminated[k] && !G.truncated[k],
                  "row %d (env %d): masked slot %d has reward %g term %d trunc %d", r, e, t, HEAD(G.reward, k, 0),
                  G.terminated[k], G.truncated[k]);
            if (t + 1 < T)
                CHECK(G.episode_start[k + 1], "row %d (env %d): no episode_start after the reset step at %d", r, e, t);
        }
        if (jump) {
            /* the counter goes up by one per step; it jumps only where the env was restarted in place
             * (segvec_restart_env: episode_start at the slot; the real transition before it truncated with the
             * value already sent for the observation it led to as truncation value, unless that observation
             * already started an episode: a SAME_STEP autoreset, whose truncation value is the learner's to
             * write (this driver writes none: NaN), or an earlier restart at the slot, whose cut stands) */
            CHECK(c[t + 1] > c[t] + 1 && t + 1 < T && G.episode_start[k + 1],
                  "row %d (env %d): obs counter goes %lld -> %lld at slot %d without a restart", r, e, (long long)c[t],
                  (long long)c[t + 1], t + 1);
            if (G.mask[k] && !G.terminated[k])
                CHECK(G.truncated[k] && (HEAD(G.truncation_value, k, 0) == value_of(e, c[t] + 1) ||
                                         (same_step_env(e) && isnan(HEAD(G.truncation_value, k, 0)))),
                      "row %d (env %d): restart at slot %d: truncated[%d] = %d, truncation_value = %g, expected %g", r, e,
                      t + 1, t, G.truncated[k], HEAD(G.truncation_value, k, 0), value_of(e, c[t] + 1));
        } else {
            CHECK(isnan(HEAD(G.truncation_value, k, 0)), "row %d (env %d): truncation_value[%d] = %g without a restart", r, e, t,
                  HEAD(G.truncation_value, k, 0));
            if (G.mask[k] && (G.terminated[k] || G.truncated[k])) {
                if (same_step_env(e) && t + 1 < T)
                    CHECK(G.episode_start[k + 1], "row %d (env %d): SAME_STEP episode end at %d, no episode_start", r, e, t);
                if (!same_step_env(e) && t + 1 < L)
                    CHECK(!G.mask[k + 1], "row %d (env %d): NEXT_STEP episode end at %d, next step is real", r, e, t);
            }
        }
        /* segvec_fill_next_values' contract, then what it means here */
        float expect;
        if (G.terminated[k]) expect = 0.0f;
        else if (G.truncated[k] && !isnan(HEAD(G.truncation_value, k, 0))) expect = HEAD(G.truncation_value, k, 0);
        else if (t == L - 1) expect = tail;
        else expect = HEAD(G.value, k + 1, 0);
        CHECK(same_float(HEAD(nv, t, 0), expect), "row %d: next_value[%d] = %g, expected %g", r, t, HEAD(nv, t, 0), expect);
        if (G.mask[k] && !G.terminated[k] && !jump && !(t == L - 1 && isnan(tail)))
            CHECK(HEAD(nv, t, 0) == value_of(e, c[t + 1]), "row %d (env %d): next_value[%d] = %g is not the value %g of obs[%d]", r,
                  e, t, HEAD(nv, t, 0), value_of(e, c[t + 1]), t + 1);
    }
    /* the tail bootstrap is the value of obs[length] (sent with the env's next action, or given to the
     * flush), or NaN when a flush had none */
    CHECK(isnan(tail) || tail == value_of(e, c[L]), "row %d (env %d, length %d): tail value %g, obs[length] has ctr %lld",
          r, e, L, tail, (long long)c[L]);
    /* every other head: the learner sent head_value(h, v) for each head's value, rewards go to every head,
     * so each head's values, truncation values, tail and bootstraps are head 0's mapped by head_value */
    for (int32_t h = 1; h < G.H; ++h) {
        CHECK(same_float(HEAD(G.tail_value, r, h), head_value(h, tail)), "row %d: tail value of head %d is %g, head 0's %g",
              r, h, HEAD(G.tail_value, r, h), tail);
        for (int32_t t = 0; t < T; ++t) {
            int64_t k = base + t;
            CHECK(HEAD(G.reward, k, h) == HEAD(G.reward, k, 0), "row %d: reward[%d] of head %d is %g, head 0's %g", r, t,
                  h, HEAD(G.reward, k, h), HEAD(G.reward, k, 0));
            CHECK(same_float(HEAD(nv, t, h), head_value(h, HEAD(nv, t, 0))),
                  "row %d: next_value[%d] of head %d is %g, head 0's %g", r, t, h, HEAD(nv, t, h), HEAD(nv, t, 0));
            if (t < L) {
                CHECK(same_float(HEAD(G.value, k, h), head_value(h, HEAD(G.value, k, 0))),
                      "row %d: value[%d] of head %d is %g, head 0's %g", r, t, h, HEAD(G.value, k, h), HEAD(G.value, k, 0));
                CHECK(same_float(HEAD(G.truncation_value, k, h), head_value(h, HEAD(G.truncation_value, k, 0))),
                      "row %d: truncation_value[%d] of head %d is %g, head 0's %g", r, t, h,
                      HEAD(G.truncation_value, k, h), HEAD(G.truncation_value, k, 0));
            }
        }
    }
    /* rows of one env come out of the completed FIFO in the order the env filled them */
    int64_t start = G.row_start_step[r];
    if (Lr.end_step[e] >= 0) {
        CHECK(start >= Lr.end_step[e], "row %d (env %d): starts at step %lld, before the end %lld of its last row", r, e,
              (long long)start, (long long)Lr.end_step[e]);
        if (start == Lr.end_step[e])
            CHECK(c[0] >= Lr.end_ctr[e], "row %d (env %d): obs[0] ctr %lld < %lld, the last row's obs[length]", r, e,
                  (long long)c[0], (long long)Lr.end_ctr[e]);
    }
    Lr.end_step[e] = start + L;
    Lr.end_ctr[e] = c[L];
}

/* segvec_release of held rows (`which`: 1 all, 0 the expired ones): never fails on rows the learner holds,
 * and a taken row is never written by anybody while it is held. */
static void release_rows(int all) {
    int32_t rel[Lr.n_held + 1], n = 0, keep = 0;
    for (int32_t i = 0; i < Lr.n_held; ++i) {
        int32_t r = Lr.held_rows[i];
        if (all || Lr.held_until[i] <= Lr.it) {
            CHECK(row_sum(r) == Lr.held_sum[i], "row %d changed while the learner held it (taken)", r);
            rel[n++] = r;
        } else {
            Lr.held_rows[keep] = r;
            Lr.held_until[keep] = Lr.held_until[i];
            Lr.held_sum[keep] = Lr.held_sum[i];
            keep++;
        }
    }
    Lr.n_held = keep;
    if (!n) return;
    OK(segvec_release(Lr.core, n, rel));
    for (int32_t i = 0; i < n; ++i) Lr.held[rel[i]] = 0;
    if (Lr.n_held && chance(&Lr.rng, 0.05)) {
        /* all or nothing: a batch naming a row already released fails and leaves the held row TAKEN */
        int32_t pair[2] = {Lr.held_rows[0], rel[0]};
        int rc = segvec_release(Lr.core, 2, pair);
        CHECK(rc == SEGVEC_ERR_ROW_STATE, "release of a freed row returned %d", rc);
        int32_t twice[2] = {Lr.held_rows[0], Lr.held_rows[0]};
        rc = segvec_release(Lr.core, 2, twice);
        CHECK(rc == SEGVEC_ERR_ROW_STATE, "release of a row named twice returned %d", rc);
        Lr.negative_checks += 2;
    }
}

/* segvec_take of up to all complete rows; each is checked, then held for a while or released at once. */
static void take_rows(int all) {
    segvec_stats_t st;
    OK(segvec_read_stats(Lr.core, &st));
    int32_t c = (int32_t)st.complete_rows;
    if (chance(&Lr.rng, 0.01)) {
        /* only the learner completes, recycles and takes rows: the count is exact here */
        int32_t too_many[c + 1];
        int rc = segvec_take(Lr.core, c + 1, too_many);
        CHECK(rc == SEGVEC_ERR_NOT_ENOUGH, "take of %d rows with %d complete returned %d", c + 1, c, rc);
        Lr.negative_checks++;
    }
    int32_t n = all ? c : (int32_t)rndn(&Lr.rng, (uint32_t)c + 1);
    if (!n) return;
    int32_t rows[n];
    OK(segvec_take(Lr.core, n, rows));
    Lr.taken += n;
    for (int32_t i = 0; i < n; ++i) {
        int32_t r = rows[i];
        if (r < 0 || r >= G.S) { violation("take returned row %d", r); continue; }
        CHECK(!Lr.held[r], "row %d taken twice while held", r);
        Lr.held[r] = 1;
        check_row(r);
        Lr.held_rows[Lr.n_held] = r;
        Lr.held_until[Lr.n_held] = all || chance(&Lr.rng, 0.5) ? Lr.it : Lr.it + (int64_t)rndn(&Lr.rng, 40);
        Lr.held_sum[Lr.n_held] = row_sum(r);
        Lr.n_held++;
    }
}

/* segvec_flush_envs with the observation copies it asks for; on NO_FREE_ROW nothing may have changed. */
static int flush_envs(int32_t n, const int32_t *ids) {
    int64_t before[n], after[n], from[n], to[n], cur[n];
    float tails[n * G.H];
    int with_tails = chance(&Lr.rng, 0.5);
    OK(segvec_cursor_slots(Lr.core, n, ids, SEGVEC_OBS_SLOT, before));
    OK(segvec_gather_current(Lr.core, n, ids, G.obs, 8, cur));
    for (int32_t i = 0; i < n; ++i)
        for (int32_t h = 0; h < G.H; ++h) HEAD(tails, i, h) = head_value(h, value_of(ids[i], obs_ctr(cur[i])));
    int rc = segvec_flush_envs(Lr.core, n, ids, with_tails ? tails : NULL, from, to);
    OK(segvec_cursor_slots(Lr.core, n, ids, SEGVEC_OBS_SLOT, after));
    if (rc != SEGVEC_OK) {
        CHECK(rc == SEGVEC_ERR_NO_FREE_ROW, "flush_envs returned %d", rc);
        for (int32_t i = 0; i < n; ++i) CHECK(after[i] == before[i], "a failed flush moved env %d's cursor", ids[i]);
        return rc;
    }
    for (int32_t i = 0; i < n; ++i) {
        if (before[i] % (G.T + 1) == 0) {
            /* rows of length 0 are kept */
            CHECK(from[i] == -1 && to[i] == -1 && after[i] == before[i], "flush of env %d at a slot 0: copy %lld -> %lld",
                  ids[i], (long long)from[i], (long long)to[i]);
        } else {
            CHECK(from[i] == before[i] && to[i] == after[i] && to[i] % (G.T + 1) == 0,
                  "flush of env %d: copy %lld -> %lld, cursor %lld -> %lld", ids[i], (long long)from[i], (long long)to[i],
                  (long long)before[i], (long long)after[i]);
            if (to[i] >= 0 && from[i] >= 0) G.obs[to[i]] = G.obs[from[i]];
        }
    }
    Lr.flushes++;
    return SEGVEC_OK;
}

static int flush_or_release(int32_t n, const int32_t *ids) {
    int rc = flush_envs(n, ids);
    if (rc == SEGVEC_ERR_NO_FREE_ROW) {
        Lr.no_free_row++;
        release_rows(1);
        rc = flush_envs(n, ids);
        CHECK(rc == SEGVEC_OK, "flush_envs failed (%d) although the learner holds no row", rc);
    }
    return rc;
}

/* Reset orders: flush, begin_resets (-> RESETTING), then the order to the env's worker and a kick. */
static int reset_envs(int32_t n, const int32_t *ids) {
    if (!n) return 1;
    if (flush_or_release(n, ids) != SEGVEC_OK) return 0;
    int64_t cur[MAX_ENVS];
    OK(segvec_gather_current(Lr.core, n, ids, G.obs, 8, cur));
    OK(segvec_begin_resets(Lr.core, n, ids));
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = ids[i];
        /* the env is its worker's now, but the worker hears of it only through the order below */
        CHECK(env_state_now(e) == SEGVEC_ENV_RESETTING, "begin_resets: env %d is not RESETTING", e);
        if (Lr.lstate[e] == L_HELD) Lr.n_held_envs--;
        Lr.lstate[e] = L_OUT;
        Lr.out++;
        Lr.last_ctr[e] = obs_ctr(cur[i]);
    }
    for (int32_t w = 0; w < G.W; ++w) {
        int any = 0;
        pthread_mutex_lock(&g_workers[w].mu);
        for (int32_t i = 0; i < n; ++i)
            if (ids[i] / G.k == w) {
                g_workers[w].resets[g_workers[w].n_resets++] = ids[i];
                any = 1;
            }
        pthread_mutex_unlock(&g_workers[w].mu);
        if (any) OK(segvec_kick_worker(Lr.core, w));
    }
    Lr.resets += n;
    return 1;
}

/* Failure notes from the workers: the envs are FAILED and the learner's; they are reset. */
static void drain_failures(void) {
    pthread_mutex_lock(&g_fail_mu);
    int32_t n = g_fail_n;
    int32_t ids[MAX_ENVS];
    memcpy(ids, g_fail_list, (size_t)n * sizeof(int32_t));
    g_fail_n = 0;
    pthread_mutex_unlock(&g_fail_mu);
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = ids[i];
        CHECK(Lr.lstate[e] == L_OUT, "failure note for env %d, which the learner has (%d)", e, Lr.lstate[e]);
        CHECK(env_state_now(e) == SEGVEC_ENV_FAILED, "failure note for env %d in state %d", e, env_state_now(e));
        Lr.lstate[e] = L_FAILED;
        Lr.out--;
        Lr.pending[Lr.n_pending++] = e;
        Lr.failures++;
    }
}

static void reset_pending(void) {
    if (Lr.n_pending && reset_envs(Lr.n_pending, Lr.pending)) Lr.n_pending = 0;
}

static void start_worker(int32_t w) {
    worker_t *wk = &g_workers[w];
    atomic_store(&wk->dead, 0);
    atomic_store(&wk->die_countdown, 0);
    if (pthread_create(&wk->thread, NULL, worker_main, (void *)(intptr_t)w) != 0) {
        violation("pthread_create failed");
        return;
    }
    wk->running = 1;
}

/* A dead worker's envs that it FAILED but died before noting: the learner finds them by their state. */
static void adopt_unnoted_failures(int32_t w) {
    for (int32_t e = w * G.k; e < (w + 1) * G.k; ++e)
        if (env_state_now(e) == SEGVEC_ENV_FAILED && Lr.lstate[e] == L_OUT) {
            Lr.lstate[e] = L_FAILED;
            Lr.out--;
            Lr.pending[Lr.n_pending++] = e;
            Lr.failures++;
        }
}

/* A worker that died: join it, segvec_recover_worker, start a replacement with its orders. */
static void handle_deaths(void) {
    for (int32_t w = 0; w < G.W; ++w) {
        worker_t *wk = &g_workers[w];
        if (!wk->running || !atomic_load_explicit(&wk->dead, memory_order_acquire)) continue;
        pthread_join(wk->thread, NULL);
        wk->running = 0;
        Lr.deaths++;
        drain_failures(); /* the notes it sent before it died */
        int32_t lost[MAX_ENVS], n_lost = -1;
        OK(segvec_recover_worker(Lr.core, w, lost, &n_lost));
        CHECK(n_lost >= 0 && n_lost <= G.k, "recover_worker: %d lost envs", n_lost);
        if (n_lost < 0 || n_lost > G.k) n_lost = 0;
        Lr.lost_envs += n_lost;
        wk->n_lost = 0;
        wk->n_resetting = 0;
        for (int32_t i = 0; i < n_lost; ++i) {
            int32_t e = lost[i];
            CHECK(e / G.k == w && Lr.lstate[e] == L_OUT && env_state_now(e) == SEGVEC_ENV_IN_FLIGHT,
                  "recover_worker(%d): lost env %d (learner %d, state %d)", w, e, Lr.lstate[e], env_state_now(e));
            wk->lost[wk->n_lost++] = e;
        }
        for (int32_t e = w * G.k; e < (w + 1) * G.k; ++e) {
            int st = env_state_now(e), in_lost = 0;
            for (int32_t i = 0; i < n_lost; ++i) in_lost |= lost[i] == e;
            switch (st) {
            case SEGVEC_ENV_IN_FLIGHT:
                CHECK(in_lost, "recover_worker(%d): env %d IN_FLIGHT but not in the lost list", w, e);
                break;
            case SEGVEC_ENV_RESETTING:
                CHECK(Lr.lstate[e] == L_OUT, "env %d RESETTING, learner state %d", e, Lr.lstate[e]);
                wk->resetting[wk->n_resetting++] = e;
                break;
            case SEGVEC_ENV_READY:
                CHECK(Lr.lstate[e] == L_OUT, "env %d READY, learner state %d", e, Lr.lstate[e]);
                break;
            case SEGVEC_ENV_HELD:
                CHECK(Lr.lstate[e] == L_HELD, "env %d HELD, learner state %d", e, Lr.lstate[e]);
                break;
            case SEGVEC_ENV_FAILED:
                break; /* adopt_unnoted_failures below */
            default:
                violation("env %d of dead worker %d in state %d", e, w, st);
            }
        }
        adopt_unnoted_failures(w);
        /* its reset orders not served: those envs are RESETTING and go to the replacement's list */
        pthread_mutex_lock(&wk->mu);
        wk->n_resets = 0;
        pthread_mutex_unlock(&wk->mu);
        wk->generation++;
        start_worker(w);
        OK(segvec_kick_worker(Lr.core, w));
    }
}

/* wait_ready + pop_ready, with the checks of a received env. */
static void receive(void) {
    static const int32_t timeouts[] = {0, 0, 1, 5, -1};
    int32_t ready = -1;
    if (Lr.out > 0) {
        int32_t min = 1 + (int32_t)rndn(&Lr.rng, (uint32_t)Lr.out);
        int rc = segvec_wait_ready(Lr.core, min, timeouts[rndn(&Lr.rng, 5)], &ready);
        CHECK(rc == SEGVEC_OK || rc == SEGVEC_ERR_TIMEOUT || rc == SEGVEC_ERR_ALERT, "wait_ready returned %d", rc);
        CHECK(rc != SEGVEC_OK || ready >= min, "wait_ready: OK with %d ready < %d", ready, min);
        CHECK(ready >= 0 && ready <= Lr.out, "wait_ready: %d ready, %d outstanding", ready, Lr.out);
    }
    int32_t max_n = 1 + (int32_t)rndn(&Lr.rng, (uint32_t)G.E), ids[MAX_ENVS], n = -1;
    OK(segvec_pop_ready(Lr.core, max_n, ids, &n));
    CHECK(n >= 0 && n <= max_n && (ready < 0 || n >= (ready < max_n ? ready : max_n)),
          "pop_ready(%d) returned %d with %d ready", max_n, n, ready);
    if (n <= 0) return;
    int64_t cur[MAX_ENVS];
    OK(segvec_gather_current(Lr.core, n, ids, G.obs, 8, cur));
    Lr.pops += n;
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = ids[i];
        if (e < 0 || e >= G.E) { violation("pop_ready returned env %d", e); continue; }
        CHECK(Lr.lstate[e] == L_OUT, "pop_ready returned env %d, which is not outstanding (%d)", e, Lr.lstate[e]);
        CHECK(env_state_now(e) == SEGVEC_ENV_HELD, "popped env %d is in state %d", e, env_state_now(e));
        /* oldest publication first: within one worker's queue, in the order it published */
        int32_t w = e / G.k;
        CHECK(G.pubseq[e] > Lr.last_pubseq[w], "env %d popped out of publication order (%lld after %lld)", e,
              (long long)G.pubseq[e], (long long)Lr.last_pubseq[w]);
        Lr.last_pubseq[w] = G.pubseq[e];
        /* its current observation is its own and newer than the one the learner last acted on */
        CHECK(obs_env(cur[i]) == e && obs_ctr(cur[i]) > Lr.last_ctr[e],
              "popped env %d: current obs (env %d, ctr %lld), last acted on ctr %lld", e, obs_env(cur[i]),
              (long long)obs_ctr(cur[i]), (long long)Lr.last_ctr[e]);
        double lr = HEAD(G.env_last_reward, e, 0);
        CHECK(lr == 0.0 || lr == reward_of(e, obs_ctr(cur[i])), "popped env %d: last reward %g, expected 0 or %g", e, lr,
              reward_of(e, obs_ctr(cur[i])));
        for (int32_t h = 1; h < G.H; ++h)
            CHECK(HEAD(G.env_last_reward, e, h) == lr, "popped env %d: last reward of head %d is %g, head 0's %g", e, h,
                  HEAD(G.env_last_reward, e, h), lr);
        Lr.last_ctr[e] = obs_ctr(cur[i]);
        if (Lr.lstate[e] == L_OUT) {
            Lr.lstate[e] = L_HELD;
            Lr.out--;
            Lr.n_held_envs++;
        }
    }
}

/* prepare_send (+ sometimes cancel_send and again) and dispatch of most held envs. */
static void send(void) {
    int32_t ids[MAX_ENVS], n = 0;
    for (int32_t e = 0; e < G.E; ++e)
        if (Lr.lstate[e] == L_HELD && !chance(&Lr.rng, 0.15)) ids[n++] = e;
    if (!n) return;
    for (int32_t i = n - 1; i > 0; --i) {
        int32_t j = (int32_t)rndn(&Lr.rng, (uint32_t)i + 1), tmp = ids[i];
        ids[i] = ids[j];
        ids[j] = tmp;
    }
    int64_t cur[MAX_ENVS], slots[MAX_ENVS], cursor[MAX_ENVS], slots2[MAX_ENVS];
    uint8_t row_start[MAX_ENVS], row_start2[MAX_ENVS];
    float values[MAX_ENVS * MAX_HEADS], logprobs[MAX_ENVS];
    int64_t version = Lr.it + 1;
    OK(segvec_gather_current(Lr.core, n, ids, G.obs, 8, cur));
    OK(segvec_cursor_slots(Lr.core, n, ids, SEGVEC_STEP_SLOT, cursor));
    for (int32_t i = 0; i < n; ++i) {
        for (int32_t h = 0; h < G.H; ++h) HEAD(values, i, h) = head_value(h, value_of(ids[i], obs_ctr(cur[i])));
        logprobs[i] = -(float)i;
    }
    const float *lp = chance(&Lr.rng, 0.5) ? logprobs : NULL;
    if (chance(&Lr.rng, 0.01)) {
        /* an env named twice, or one the learner does not hold: NOT_HELD, and nothing changed */
        int32_t bad[2] = {ids[0], ids[0]};
        int32_t other = -1;
        for (int32_t e = 0; e < G.E && other < 0; ++e)
            if (Lr.lstate[e] != L_HELD) other = e;
        if (other >= 0 && chance(&Lr.rng, 0.5)) bad[1] = other;
        int64_t s[2];
        uint8_t rs[2];
        int rc = segvec_prepare_send(Lr.core, 2, bad, values, NULL, version, s, rs);
        CHECK(rc == SEGVEC_ERR_NOT_HELD, "prepare_send of env %d with %d returned %d", bad[0], bad[1], rc);
        CHECK(env_state_now(ids[0]) == SEGVEC_ENV_HELD, "a failed prepare_send left env %d in state %d", ids[0],
              env_state_now(ids[0]));
        Lr.negative_checks++;
    }
    int rc = segvec_prepare_send(Lr.core, n, ids, values, lp, version, slots, row_start);
    if (rc == SEGVEC_ERR_NO_FREE_ROW) {
        Lr.no_free_row++;
        for (int32_t i = 0; i < n; ++i)
            CHECK(env_state_now(ids[i]) == SEGVEC_ENV_HELD, "prepare_send NO_FREE_ROW left env %d in state %d", ids[i],
                  env_state_now(ids[i]));
        release_rows(1);
        rc = segvec_prepare_send(Lr.core, n, ids, values, lp, version, slots, row_start);
        CHECK(rc == SEGVEC_OK, "prepare_send failed (%d) although the learner holds no row", rc);
    }
    if (rc != SEGVEC_OK) {
        if (rc != SEGVEC_ERR_NO_FREE_ROW) violation("prepare_send returned %d", rc);
        return;
    }
    for (int32_t i = 0; i < n; ++i)
        CHECK(slots[i] == cursor[i] && row_start[i] == (cursor[i] % G.T == 0) &&
                  env_state_now(ids[i]) == SEGVEC_ENV_SENDING,
              "prepare_send(%d): slot %lld (cursor %lld), row_start %d, state %d", ids[i], (long long)slots[i],
              (long long)cursor[i], row_start[i], env_state_now(ids[i]));
    if (chance(&Lr.rng, 0.05)) {
        /* SENDING -> HELD, then the same send again: it needs nothing new (its spares are reserved) */
        OK(segvec_cancel_send(Lr.core, n, ids));
        for (int32_t i = 0; i < n; ++i)
            CHECK(env_state_now(ids[i]) == SEGVEC_ENV_HELD, "cancel_send left env %d in state %d", ids[i],
                  env_state_now(ids[i]));
        OK(segvec_prepare_send(Lr.core, n, ids, values, lp, version, slots2, row_start2));
        for (int32_t i = 0; i < n; ++i)
            CHECK(slots2[i] == slots[i] && row_start2[i] == row_start[i], "prepare after cancel moved env %d", ids[i]);
        Lr.cancels++;
    }
    for (int32_t i = 0; i < n; ++i) {
        G.act[slots[i]] = cur[i]; /* the action: the code of the observation it is for */
        Lr.last_ctr[ids[i]] = obs_ctr(cur[i]);
    }
    OK(segvec_dispatch(Lr.core, n, ids));
    for (int32_t i = 0; i < n; ++i) {
        Lr.lstate[ids[i]] = L_OUT;
        Lr.n_held_envs--;
        Lr.out++;
    }
    Lr.sends += n;
}

/* flush() of the Python API: wait until every outstanding env landed, then flush held and READY envs. */
static void flush_landed(void) {
    int64_t deadline = now_ms() + 200;
    int32_t ready = 0;
    while (Lr.out > 0) {
        int rc = segvec_wait_ready(Lr.core, Lr.out, 5, &ready);
        if (rc == SEGVEC_OK && ready >= Lr.out) break;
        if (rc == SEGVEC_ERR_ALERT || now_ms() > deadline) return; /* a failure or a death: not now */
        for (int32_t w = 0; w < G.W; ++w)
            if (atomic_load_explicit(&g_workers[w].dead, memory_order_relaxed)) return;
    }
    int32_t ids[MAX_ENVS], n = 0;
    for (int32_t e = 0; e < G.E; ++e) {
        if (Lr.lstate[e] == L_HELD) ids[n++] = e;
        else if (Lr.lstate[e] == L_OUT) {
            int st = env_state_now(e);
            CHECK(st == SEGVEC_ENV_READY, "every outstanding env landed, but env %d is in state %d", e, st);
            if (st == SEGVEC_ENV_READY) ids[n++] = e;
        }
    }
    if (n && flush_or_release(n, ids) == SEGVEC_OK) Lr.landed_flushes++;
}

/* Snapshot counts of env states and the row counters against the learner's own bookkeeping. */
static void check_counts(void) {
    int32_t outstanding, with_failed, held, other;
    OK(segvec_count_envs(Lr.core, SEGVEC_MASK_OUTSTANDING, &outstanding));
    OK(segvec_count_envs(Lr.core, SEGVEC_MASK_OUTSTANDING | (1 << SEGVEC_ENV_FAILED), &with_failed));
    OK(segvec_count_envs(Lr.core, 1 << SEGVEC_ENV_HELD, &held));
    OK(segvec_count_envs(Lr.core, (1 << SEGVEC_ENV_NEW) | (1 << SEGVEC_ENV_SENDING), &other));
    /* outstanding envs can only leave the mask by failing (FAILED, not yet seen by the learner) */
    CHECK(outstanding <= Lr.out, "count_envs: %d outstanding, learner counts %d", outstanding, Lr.out);
    CHECK(with_failed >= Lr.out && with_failed <= Lr.out + Lr.n_pending,
          "count_envs: %d outstanding or failed, learner counts %d out + %d failed", with_failed, Lr.out, Lr.n_pending);
    CHECK(held == Lr.n_held_envs, "count_envs: %d HELD, learner holds %d", held, Lr.n_held_envs);
    CHECK(other == 0, "count_envs: %d envs NEW or SENDING between sends", other);
    segvec_stats_t st;
    OK(segvec_read_stats(Lr.core, &st));
    CHECK(st.segments_taken + st.segments_recycled <= st.segments_completed, "stats: taken %lld + recycled %lld > completed %lld",
          (long long)st.segments_taken, (long long)st.segments_recycled, (long long)st.segments_completed);
    CHECK(st.complete_rows == st.segments_completed - st.segments_taken - st.segments_recycled,
          "stats: complete_rows %lld != completed %lld - taken %lld - recycled %lld", (long long)st.complete_rows,
          (long long)st.segments_completed, (long long)st.segments_taken, (long long)st.segments_recycled);
    CHECK(st.segments_taken == Lr.taken && st.taken_rows == Lr.n_held,
          "stats: segments_taken %lld, taken_rows %lld; the learner took %lld and holds %d", (long long)st.segments_taken,
          (long long)st.taken_rows, (long long)Lr.taken, Lr.n_held);
    int64_t in_use = G.S - st.free_rows - st.complete_rows - Lr.n_held;
    CHECK(in_use >= G.E && in_use <= 2 * G.E, "stats: %lld rows filling/awaiting/reserved for %d envs (free %lld, complete %lld, held %d)",
          (long long)in_use, G.E, (long long)st.free_rows, (long long)st.complete_rows, Lr.n_held);
    CHECK(st.steps >= Lr.last.steps && st.episodes >= Lr.last.episodes && st.restarts >= Lr.last.restarts &&
              st.segments_completed >= Lr.last.segments_completed && st.episodes_written >= Lr.last.episodes_written,
          "stats went backwards (steps %lld, episodes %lld, restarts %lld, completed %lld)", (long long)st.steps,
          (long long)st.episodes, (long long)st.restarts, (long long)st.segments_completed);
    /* a ticket of the episode ring is taken before `episodes` counts the episode (read first): >=, equal at rest */
    CHECK(st.episodes_written >= st.episodes, "stats: %lld episodes written < %lld episodes",
          (long long)st.episodes_written, (long long)st.episodes);
    CHECK(st.rolled_back == Lr.lost_envs && st.nan_rewards == 0, "stats: rolled_back %lld (learner saw %lld lost), nan %lld",
          (long long)st.rolled_back, (long long)Lr.lost_envs, (long long)st.nan_rewards);
    Lr.last = st;
}

static void read_episodes(int32_t max_n) {
    int32_t ids[64], n;
    double returns[64];
    int64_t lengths[64], end_steps[64], lost, cursor = Lr.ep_cursor;
    if (max_n > 64) max_n = 64;
    OK(segvec_read_episodes(Lr.core, &Lr.ep_cursor, max_n, ids, returns, lengths, end_steps, &n, &lost));
    CHECK(n >= 0 && n <= max_n && lost >= 0 && Lr.ep_cursor == cursor + n + lost, "read_episodes: cursor %lld -> %lld, %d read, %lld lost",
          (long long)cursor, (long long)Lr.ep_cursor, n, (long long)lost);
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = ids[i];
        double L = (double)lengths[i];
        /* every reward of the episode names its env: return within [L * e * 65536, L * (e * 65536 + 65535)] */
        CHECK(e >= 0 && e < G.E && lengths[i] >= 1 && lengths[i] <= MAX_EPISODE_LEN + 1 &&
                  returns[i] >= L * e * 65536.0 && returns[i] <= L * (e * 65536.0 + 65535.0) &&
                  end_steps[i] >= lengths[i],
              "episode entry: env %d, return %g, length %lld, end step %lld", e, returns[i], (long long)lengths[i],
              (long long)end_steps[i]);
    }
    Lr.episodes_read += n;
    Lr.episodes_lost += lost;
}

static void held_env_ops(void) {
    int32_t ids[MAX_ENVS], n = 0;
    for (int32_t e = 0; e < G.E; ++e)
        if (Lr.lstate[e] == L_HELD && chance(&Lr.rng, 0.5)) ids[n++] = e;
    if (!n) return;
    if (chance(&Lr.rng, 0.3)) {
        /* begin_resets needs the cursor at a row's slot 0: INVALID otherwise, nothing changed */
        int64_t slot;
        OK(segvec_cursor_slots(Lr.core, 1, &ids[0], SEGVEC_STEP_SLOT, &slot));
        if (slot % G.T != 0) {
            int rc = segvec_begin_resets(Lr.core, 1, &ids[0]);
            CHECK(rc == SEGVEC_ERR_INVALID && env_state_now(ids[0]) == SEGVEC_ENV_HELD,
                  "begin_resets of env %d off a row start returned %d", ids[0], rc);
            Lr.negative_checks++;
        }
    }
    if (chance(&Lr.rng, 0.5)) reset_envs(n, ids); /* reset(options={"reset_mask": ...}) */
    else flush_or_release(n, ids);                /* flush() of some envs */
}

static void *learner_main(void *arg) {
    int64_t seconds = *(int64_t *)arg;
    Lr.rng = rng_make(G.seed, 1);
    OK(segvec_attach(G.block, G.block_bytes, &Lr.core));
    if (!Lr.core) return NULL;
    for (int32_t e = 0; e < G.E; ++e) {
        Lr.lstate[e] = L_HELD; /* NEW: the learner's */
        Lr.last_ctr[e] = 0;
        Lr.end_step[e] = -1;
    }
    for (int32_t w = 0; w < G.W; ++w) start_worker(w);
    /* the first reset of every env: flush (nothing to close) + begin_resets */
    int32_t all[MAX_ENVS];
    for (int32_t e = 0; e < G.E; ++e) all[e] = e;
    Lr.n_held_envs = G.E;
    reset_envs(G.E, all);
    int64_t start = now_ms(), deadline = start + seconds * 1000, next_death = start + 100;
    while (now_ms() < deadline) {
        int64_t now = now_ms();
        if (now >= next_death) {
            /* kill a worker at a random point of its protocol, a few dozen points from now */
            int32_t w = (int32_t)rndn(&Lr.rng, (uint32_t)G.W);
            if (g_workers[w].running && atomic_load(&g_workers[w].die_countdown) == 0)
                atomic_store(&g_workers[w].die_countdown, 1 + (int)rndn(&Lr.rng, 60));
            next_death = now + 30 + (int64_t)rndn(&Lr.rng, 300);
        }
        handle_deaths();
        drain_failures();
        reset_pending();
        receive();
        if (chance(&Lr.rng, 0.02)) held_env_ops();
        if (chance(&Lr.rng, 0.003)) flush_landed();
        send();
        take_rows(0);
        release_rows(0);
        if (chance(&Lr.rng, 0.05)) read_episodes(1 + (int32_t)rndn(&Lr.rng, 16));
        check_counts();
        Lr.it++;
    }
    /* ---- the end: stop the workers, receive what landed, flush, take and check every row ---- */
    for (int32_t w = 0; w < G.W; ++w) atomic_store(&g_workers[w].die_countdown, 0);
    atomic_store(&G.stop, 1);
    OK(segvec_shutdown(Lr.core));
    for (int32_t w = 0; w < G.W; ++w)
        if (g_workers[w].running) {
            pthread_join(g_workers[w].thread, NULL);
            g_workers[w].running = 0;
            if (atomic_load(&g_workers[w].dead)) { /* died at the very end: recover, no replacement */
                int32_t lost[MAX_ENVS], n_lost;
                drain_failures();
                OK(segvec_recover_worker(Lr.core, w, lost, &n_lost));
                adopt_unnoted_failures(w);
                Lr.lost_envs += n_lost;
                Lr.deaths++;
            }
        }
    drain_failures();
    int32_t ready = 0;
    int rc = segvec_wait_ready(Lr.core, G.E, 0, &ready);
    CHECK(rc == SEGVEC_OK || rc == SEGVEC_ERR_TIMEOUT || rc == SEGVEC_ERR_ALERT, "final wait_ready returned %d", rc);
    for (int pass = 0; pass < 2; ++pass) receive();
    int32_t mine[MAX_ENVS], n_mine = 0;
    for (int32_t e = 0; e < G.E; ++e)
        if (Lr.lstate[e] != L_OUT) mine[n_mine++] = e;
    if (n_mine) flush_or_release(n_mine, mine);
    release_rows(1);
    take_rows(1);
    release_rows(1);
    check_counts();
    while (Lr.ep_cursor < (int64_t)Lr.last.episodes_written) {
        int64_t before = Lr.ep_cursor;
        read_episodes(64);
        if (Lr.ep_cursor == before) break;
    }
    segvec_stats_t st;
    OK(segvec_read_stats(Lr.core, &st));
    int64_t real_steps = 0, episodes = 0, restarts = 0;
    for (int32_t w = 0; w < G.W; ++w) {
        real_steps += g_workers[w].real_steps;
        episodes += g_workers[w].episodes;
        restarts += g_workers[w].restarts;
    }
    /* the counters count what was committed (a dead worker's commits included) */
    CHECK(st.steps == real_steps, "stats: steps %lld, workers committed %lld real steps", (long long)st.steps,
          (long long)real_steps);
    CHECK(st.episodes == episodes, "stats: episodes %lld, workers ended %lld", (long long)st.episodes, (long long)episodes);
    CHECK(st.restarts == restarts, "stats: restarts %lld, workers restarted %lld", (long long)st.restarts, (long long)restarts);
    CHECK(st.episodes_written == st.episodes, "stats at the end: %lld episodes written, %lld episodes",
          (long long)st.episodes_written, (long long)st.episodes);
    CHECK(st.complete_rows == 0 && st.segments_taken + st.segments_recycled == st.segments_completed,
          "stats at the end: %lld complete rows left", (long long)st.complete_rows);
    CHECK(Lr.episodes_read + Lr.episodes_lost == st.episodes_written && Lr.ep_cursor == st.episodes_written,
          "episodes: %lld read + %lld lost != %lld written", (long long)Lr.episodes_read, (long long)Lr.episodes_lost,
          (long long)st.episodes_written);
    int64_t in_use = 0;
    for (int32_t r = 0; r < G.S; ++r) {
        int32_t s = ((int32_t *)((char *)G.block + G.L.row_state))[r];
        in_use += s == SEGVEC_ROW_FILLING || s == SEGVEC_ROW_AWAITING_BOOTSTRAP || s == SEGVEC_ROW_RESERVED;
        CHECK(s != SEGVEC_ROW_TAKEN && s != SEGVEC_ROW_COMPLETE, "row %d in state %d at the end", r, s);
    }
    CHECK(st.free_rows + in_use == G.S, "rows: %lld free + %lld in use != %d", (long long)st.free_rows, (long long)in_use,
          G.S);
    Lr.last = st;
    OK(segvec_detach(Lr.core));
    return NULL;
}

/* ================================================================================================ */

static long parse(const char *s, const char *name, long lo, long hi) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "driver: bad %s %s (%ld..%ld)\n", name, s, lo, hi);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv) {
    if (argc != 7 && argc != 8) {
        fprintf(stderr, "usage: %s <seconds> <num_envs> <num_workers> <horizon> <num_segments> <seed> [value_heads]\n",
                argv[0]);
        return 2;
    }
    int64_t seconds = parse(argv[1], "seconds", 0, 3600);
    segvec_config_t cfg = {(int32_t)parse(argv[2], "num_envs", 1, MAX_ENVS),
                           (int32_t)parse(argv[3], "num_workers", 1, MAX_ENVS),
                           (int32_t)parse(argv[5], "num_segments", 2, 1 << 20),
                           (int32_t)parse(argv[4], "horizon", 1, 4096),
                           EPISODE_CAPACITY,
                           0,
                           argc == 8 ? (int32_t)parse(argv[7], "value_heads", 1, MAX_HEADS) : 1};
    G.seed = (uint64_t)parse(argv[6], "seed", 0, 0x7fffffffL);
    if (cfg.num_envs % cfg.num_workers || cfg.num_segments < 2 * cfg.num_envs) {
        fprintf(stderr, "driver: num_envs %% num_workers must be 0 and num_segments >= 2 * num_envs\n");
        return 2;
    }
    segvec_layout_t layout;
    if (segvec_compute_layout(&cfg, &layout) != SEGVEC_OK) {
        fprintf(stderr, "driver: invalid config\n");
        return 2;
    }
    G.E = cfg.num_envs;
    G.W = cfg.num_workers;
    G.S = cfg.num_segments;
    G.T = cfg.horizon;
    G.H = cfg.value_heads;
    G.k = G.E / G.W;
    G.L = layout;
    G.block_bytes = layout.total_bytes;
    G.block = aligned_alloc(64, (size_t)layout.total_bytes);
    if (!G.block) return 2;
    memset(G.block, 0, (size_t)layout.total_bytes);
    OK(segvec_format(G.block, G.block_bytes, &cfg));
    char *b = (char *)G.block;
    G.reward = (float *)(b + layout.reward);
    G.terminated = (uint8_t *)(b + layout.terminated);
    G.truncated = (uint8_t *)(b + layout.truncated);
    G.mask = (uint8_t *)(b + layout.mask);
    G.episode_start = (uint8_t *)(b + layout.episode_start);
    G.value = (float *)(b + layout.value);
    G.policy_version = (int64_t *)(b + layout.policy_version);
    G.truncation_value = (float *)(b + layout.truncation_value);
    G.next_value = (float *)(b + layout.next_value);
    G.tail_value = (float *)(b + layout.tail_value);
    G.row_env_id = (int32_t *)(b + layout.row_env_id);
    G.row_length = (int32_t *)(b + layout.row_length);
    G.row_start_step = (int64_t *)(b + layout.row_start_step);
    G.env_state = (atomic_int *)(b + layout.env_state);
    G.env_needs_reset = (uint8_t *)(b + layout.env_needs_reset);
    G.env_last_reward = (double *)(b + layout.env_last_reward);
    G.obs = calloc((size_t)G.S * (size_t)(G.T + 1), sizeof(int64_t));
    G.act = calloc((size_t)G.S * (size_t)G.T, sizeof(int64_t));
    G.pubseq = calloc((size_t)G.E, sizeof(int64_t));
    g_model = calloc((size_t)G.E, sizeof(env_model_t));
    g_workers = calloc((size_t)G.W, sizeof(worker_t));
    g_fail_list = calloc((size_t)G.E, sizeof(int32_t));
    for (int32_t w = 0; w < G.W; ++w) {
        pthread_mutex_init(&g_workers[w].mu, NULL);
        g_workers[w].resets = calloc((size_t)G.k, sizeof(int32_t));
        g_workers[w].lost = calloc((size_t)G.k, sizeof(int32_t));
        g_workers[w].resetting = calloc((size_t)G.k, sizeof(int32_t));
    }
    Lr.lstate = calloc((size_t)G.E, 1);
    Lr.last_ctr = calloc((size_t)G.E, sizeof(int64_t));
    Lr.last_pubseq = calloc((size_t)G.W, sizeof(int64_t));
    Lr.held = calloc((size_t)G.S, 1);
    Lr.held_rows = calloc((size_t)G.S, sizeof(int32_t));
    Lr.held_until = calloc((size_t)G.S, sizeof(int64_t));
    Lr.held_sum = calloc((size_t)G.S, sizeof(uint64_t));
    Lr.end_step = calloc((size_t)G.E, sizeof(int64_t));
    Lr.end_ctr = calloc((size_t)G.E, sizeof(int64_t));
    Lr.pending = calloc((size_t)G.E, sizeof(int32_t));
    Lr.nv = calloc((size_t)G.S * (size_t)G.T * (size_t)G.H, sizeof(float));

    pthread_t learner;
    if (pthread_create(&learner, NULL, learner_main, &seconds) != 0) return 2;
    pthread_join(learner, NULL);

    int64_t served = 0, worker_failures = 0;
    for (int32_t w = 0; w < G.W; ++w) {
        served += g_workers[w].steps_served;
        worker_failures += g_workers[w].failures;
    }
    CHECK(worker_failures == Lr.failures, "workers failed %lld envs, the learner saw %lld", (long long)worker_failures,
          (long long)Lr.failures);
    CHECK(Lr.last.steps > 0 && Lr.rows_checked > 0, "no progress: %lld steps, %lld rows checked", (long long)Lr.last.steps,
          (long long)Lr.rows_checked);
    long violations = atomic_load(&g_violations);
    printf("segvec stress %s: %llds envs=%d workers=%d horizon=%d segments=%d heads=%d seed=%llu | iterations=%lld sends=%lld "
           "served=%lld steps=%lld episodes=%lld (read %lld, lost %lld) resets=%lld failures=%lld restarts=%lld "
           "deaths=%lld rolled_back=%lld flushes=%lld landed_flushes=%lld cancels=%lld no_free_row=%lld "
           "rows: completed=%lld taken=%lld recycled=%lld checked=%lld negative_checks=%lld violations=%ld\n",
           violations ? "FAILED" : "ok", (long long)seconds, G.E, G.W, G.T, G.S, G.H, (unsigned long long)G.seed,
           (long long)Lr.it, (long long)Lr.sends, (long long)served, (long long)Lr.last.steps,
           (long long)Lr.last.episodes, (long long)Lr.episodes_read, (long long)Lr.episodes_lost, (long long)Lr.resets,
           (long long)Lr.failures, (long long)Lr.last.restarts, (long long)Lr.deaths, (long long)Lr.last.rolled_back,
           (long long)Lr.flushes, (long long)Lr.landed_flushes, (long long)Lr.cancels, (long long)Lr.no_free_row,
           (long long)Lr.last.segments_completed, (long long)Lr.last.segments_taken,
           (long long)Lr.last.segments_recycled, (long long)Lr.rows_checked, (long long)Lr.negative_checks, violations);

    for (int32_t w = 0; w < G.W; ++w) {
        pthread_mutex_destroy(&g_workers[w].mu);
        free(g_workers[w].resets);
        free(g_workers[w].lost);
        free(g_workers[w].resetting);
    }
    free(g_workers);
    free(g_fail_list);
    free(g_model);
    free(G.obs);
    free(G.act);
    free(G.pubseq);
    free(Lr.lstate);
    free(Lr.last_ctr);
    free(Lr.last_pubseq);
    free(Lr.held);
    free(Lr.held_rows);
    free(Lr.held_until);
    free(Lr.held_sum);
    free(Lr.end_step);
    free(Lr.end_ctr);
    free(Lr.pending);
    free(Lr.nv);
    free(G.block);
    return violations ? 1 : 0;
}
