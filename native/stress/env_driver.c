/* env_driver.c -- the batch loops of envs written in C (native/segvec_env.c) under the sanitizers.
 *
 *   env_driver <seconds> <num_envs> <horizon> <seed>
 *
 * One learner steps its envs inline, as the serial backend does: prepare_send / dispatch, worker_pop,
 * segvec_env_step_batch, fail_envs of the envs that failed, publish, pop_ready; now and then takes and
 * releases rows, flushes, and resets (segvec_env_reset_batch, with and without seeds) the failed envs or all
 * of them.  The env classes rotate: cartpole (16-byte observations), synthetic_atari (28 KiB observations)
 * and a class of this driver's own whose steps and resets fail at random; so do the autoreset modes
 * (NEXT_STEP, SAME_STEP, DISABLED; DISABLED resets ended envs like the learner does).  Some actions are
 * outside the action space.  The driver's own arrays stand in for what Python lays out after the core
 * (observations, actions, SAME_STEP final observations).
 *
 * Checks: every env of a call is committed once or reported failed with a status; the core's step and
 * episode counters grow by the real steps and the endings of the committed outcomes; SAME_STEP endings are
 * committed envs; a committed env's (staged) observation is in its slot.  Violations print a VIOLATION line and make
 * the exit status 1; the last line of stdout is a one-line summary.
 */
#define _POSIX_C_SOURCE 200809L
#include "segvec.h"
#include "segvec_env.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern const segvec_env_class_t segvec_env_cartpole;
extern const segvec_env_class_t segvec_env_synthetic_atari;

static long g_violations;
#define CHECK(cond, ...)                                                                                    \
    do {                                                                                                    \
        if (!(cond)) {                                                                                      \
            if (g_violations++ < 20) {                                                                      \
                printf("VIOLATION: ");                                                                      \
                printf(__VA_ARGS__);                                                                        \
                printf("\n");                                                                               \
            }                                                                                               \
        }                                                                                                   \
    } while (0)
#define OK(call)                                                                                            \
    do {                                                                                                    \
        int rc_ = (call);                                                                                   \
        CHECK(rc_ == SEGVEC_OK, "%s returned %d", #call, rc_);                                              \
    } while (0)

/* ---- a class that fails at random ---------------------------------------------------------------- */
typedef struct {
    double position;
    int64_t t;
} flaky_t;

static int flaky_reset(void *state, segvec_rng_t *rng, const uint64_t *seed, void *obs) {
    flaky_t *s = state;
    (void)seed;
    if (segvec_rng_random(rng) < 0.02) return 3;
    s->position = segvec_rng_uniform(rng, -1.0, 1.0);
    s->t = 0;
    double *o = obs;
    o[0] = s->position, o[1] = 0.0, o[2] = 0.0;
    return SEGVEC_ENV_OK;
}

static int flaky_step(void *state, segvec_rng_t *rng, const void *action, void *obs, double *reward,
                      uint8_t *terminated, uint8_t *truncated) {
    flaky_t *s = state;
    if (segvec_rng_random(rng) < 0.01) return 4;
    s->t += 1;
    s->position += (double)(*(const int64_t *)action - 1) * 0.1;
    *reward = s->position;
    *terminated = segvec_rng_random(rng) < 0.05;
    *truncated = segvec_rng_random(rng) < 0.05;
    double *o = obs;
    o[0] = s->position, o[1] = (double)s->t, o[2] = *reward;
    return SEGVEC_ENV_OK;
}

static const segvec_env_class_t flaky_class = {
    .abi_version = SEGVEC_ENV_ABI_VERSION, .name = "flaky", .obs_dtype = SEGVEC_ENV_FLOAT64, .obs_ndim = 1,
    .obs_shape = {3}, .action_kind = SEGVEC_ENV_DISCRETE, .action_size = 3, .max_episode_steps = 9,
    .state_bytes = sizeof(flaky_t), .reset = flaky_reset, .step = flaky_step,
};

/* ---- the driver ---------------------------------------------------------------------------------- */
static uint64_t g_rand = 88172645463325252ull;
static uint64_t next_rand(void) {
    g_rand ^= g_rand << 13;
    g_rand ^= g_rand >> 7;
    g_rand ^= g_rand << 17;
    return g_rand;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct {
    int64_t steps, resets, failures, endings, rounds;
} totals_t;

/* One run of `seconds` with one class and one autoreset mode. */
static void run(const segvec_env_class_t *cls, int32_t mode, int32_t E, int32_t T, double seconds, totals_t *tot) {
    segvec_config_t config = {.num_envs = E, .num_workers = 1, .num_segments = 4 * E, .horizon = T,
                              .episode_capacity = 64, .poison = 1, .value_heads = 1};
    segvec_layout_t layout;
    int64_t bytes;
    OK(segvec_block_bytes(&config, &bytes));
    OK(segvec_compute_layout(&config, &layout));
    char *block = calloc(1, (size_t)bytes);
    segvec_core_t *core;
    OK(segvec_format(block, bytes, &config));
    OK(segvec_attach(block, bytes, &core));
    const int64_t S = config.num_segments, obs_bytes = (int64_t)(cls->obs_dtype == SEGVEC_ENV_UINT8 ? 1 : cls->obs_dtype == SEGVEC_ENV_FLOAT32 ? 4 : 8)
        * (cls->obs_ndim ? cls->obs_shape[0] : 1) * (cls->obs_ndim > 1 ? cls->obs_shape[1] : 1) * (cls->obs_ndim > 2 ? cls->obs_shape[2] : 1);
    char *obs = calloc((size_t)(S * (T + 1)), (size_t)obs_bytes);
    int64_t *actions = calloc((size_t)(S * T), sizeof(int64_t));
    char *final_obs = calloc((size_t)E, (size_t)obs_bytes);
    void **envs = calloc((size_t)E, sizeof(void *));
    const int64_t env_bytes = segvec_env_bytes(cls);
    for (int32_t e = 0; e < E; ++e) {
        envs[e] = aligned_alloc(64, (size_t)((env_bytes + 63) / 64 * 64));
        memset(envs[e], 0, (size_t)env_bytes);
        double params[4] = {3, 12, 0.5, 0};
        OK(segvec_env_init(cls, envs[e], params, -1));
    }
    char *staging = calloc((size_t)E, (size_t)obs_bytes);
    segvec_outcome_t *outcomes = calloc((size_t)E, sizeof(segvec_outcome_t));
    int64_t *scratch = calloc((size_t)(3 * E), sizeof(int64_t));
    int32_t *done = calloc((size_t)E, sizeof(int32_t)), *ids = calloc((size_t)E, sizeof(int32_t));
    int32_t *failed = calloc((size_t)E, sizeof(int32_t)), *status = calloc((size_t)E, sizeof(int32_t));
    int32_t *ended = calloc((size_t)E, sizeof(int32_t)), *rows = calloc((size_t)S, sizeof(int32_t));
    int64_t *slots = calloc((size_t)E, sizeof(int64_t)), *from = calloc((size_t)E, sizeof(int64_t));
    int64_t *to = calloc((size_t)E, sizeof(int64_t)), *obs_slots = calloc((size_t)E, sizeof(int64_t));
    uint8_t *row_start = calloc((size_t)E, 1), *seeded = calloc((size_t)E, 1), *failed_env = calloc((size_t)E, 1);
    uint64_t *seeds = calloc((size_t)E, sizeof(uint64_t));
    float *values = calloc((size_t)E, sizeof(float));
    segvec_env_batch_t batch = {
        .cls = cls, .first_env = 0, .n_envs = E, .envs = envs, .autoreset_mode = mode, .horizon = T,
        .obs_bytes = obs_bytes,
        .action_bytes = 8, .obs = obs, .actions = actions, .final_obs = final_obs,
        .env_needs_reset = (const uint8_t *)(block + layout.env_needs_reset), .staging = staging,
        .outcomes = outcomes, .slots = scratch, .obs_slots = scratch + E, .chain_slots = scratch + 2 * E,
        .done = done};
    segvec_stats_t before, after;
    int32_t n, n_done, n_failed, n_ended;

    /* resets `ids[0..n)` (every env, or the failed ones), with random seeds or none */
#define RESET(count)                                                                                          \
    do {                                                                                                      \
        OK(segvec_flush_envs(core, (count), ids, NULL, from, to));                                            \
        for (int32_t i = 0; i < (count); ++i)                                                                 \
            if (from[i] >= 0) memcpy(obs + to[i] * obs_bytes, obs + from[i] * obs_bytes, (size_t)obs_bytes);  \
        OK(segvec_begin_resets(core, (count), ids));                                                          \
        for (int32_t i = 0; i < (count); ++i) seeded[i] = next_rand() % 2, seeds[i] = next_rand();            \
        OK(segvec_env_reset_batch(core, &batch, (count), ids, seeds, seeded, &n_done, failed, status,         \
                                  &n_failed));                                                                \
        CHECK(n_done + n_failed == (count), "reset: %d committed + %d failed of %d", n_done, n_failed, (count)); \
        for (int32_t i = 0; i < n_failed; ++i) {                                                              \
            failed_env[failed[i]] = 1;                                                                        \
            CHECK(status[i] == 3, "reset status %d", status[i]);                                              \
        }                                                                                                     \
        for (int32_t i = 0; i < n_done; ++i) failed_env[done[i]] = 0;                                         \
        if (n_failed) OK(segvec_fail_envs(core, n_failed, failed));                                           \
        OK(segvec_publish(core, n_done, done));                                                               \
        tot->resets += n_done;                                                                                \
        tot->failures += n_failed;                                                                            \
    } while (0)

    /* held[0..n_held): the envs the learner holds (received, not failed); ended_env: DISABLED endings */
    int32_t *held = calloc((size_t)E, sizeof(int32_t)), n_held = 0, ready, popped;
    uint8_t *ended_env = calloc((size_t)E, 1);
#define RECEIVE()                                                                                             \
    do {                                                                                                      \
        OK(segvec_wait_ready(core, 0, 0, &ready));                                                            \
        OK(segvec_pop_ready(core, E, held + n_held, &n));                                                     \
        n_held += n;                                                                                          \
    } while (0)
    for (int32_t e = 0; e < E; ++e) ids[e] = e;
    RESET(E);
    RECEIVE();
    double end = now_s() + seconds;
    while (now_s() < end) {
        tot->rounds += 1;
        /* the learner sends to every env it holds */
        n = n_held;
        memcpy(ids, held, (size_t)n * sizeof(int32_t));
        n_held = 0;
        if (n) {
            for (int32_t i = 0; i < n; ++i) values[i] = (float)(next_rand() % 100);
            OK(segvec_prepare_send(core, n, ids, values, NULL, tot->rounds, slots, row_start));
            for (int32_t i = 0; i < n; ++i) /* 1 in 200 outside the action space */
                actions[slots[i]] = next_rand() % 200 == 0 ? cls->action_size
                                                           : (int64_t)(next_rand() % (uint64_t)cls->action_size);
            OK(segvec_dispatch(core, n, ids));
            /* the serial backend's worker side */
            OK(segvec_worker_pop(core, 0, E, ids, &popped));
            CHECK(popped == n, "worker_pop %d of %d", popped, n);
            OK(segvec_read_stats(core, &before));
            OK(segvec_env_step_batch(core, &batch, popped, ids, &n_done, failed, status, &n_failed, ended, &n_ended));
            OK(segvec_read_stats(core, &after));
            CHECK(n_done + n_failed == popped, "step: %d committed + %d failed of %d", n_done, n_failed, popped);
            int64_t real = 0, endings = 0;
            for (int32_t i = 0; i < n_done; ++i) {
                const segvec_outcome_t *o = &outcomes[i];
                int ending = o->valid != 0.0 && (o->terminated != 0.0 || o->truncated != 0.0);
                real += o->valid != 0.0;
                endings += ending;
                if (ending && mode == SEGVEC_AUTORESET_DISABLED) ended_env[done[i]] = 1;
                int64_t slot;
                OK(segvec_cursor_slots(core, 1, &done[i], SEGVEC_OBS_SLOT, &slot));
                if (obs_bytes < 1024) /* (larger ones are written in place: no staged copy to compare) */
                    CHECK(memcmp(obs + slot * obs_bytes, staging + (int64_t)i * obs_bytes, (size_t)obs_bytes) == 0,
                          "env %d: its observation is not in its slot", done[i]);
            }
            CHECK(after.steps - before.steps == real, "steps counted %lld, committed %lld",
                  (long long)(after.steps - before.steps), (long long)real);
            CHECK(after.episodes - before.episodes == endings, "episodes counted %lld, ended %lld",
                  (long long)(after.episodes - before.episodes), (long long)endings);
            for (int32_t i = 0; i < n_ended; ++i) {
                int found = 0;
                for (int32_t j = 0; j < n_done && !found; ++j) found = done[j] == ended[i];
                CHECK(found, "SAME_STEP ending of env %d that was not committed", ended[i]);
            }
            for (int32_t i = 0; i < n_failed; ++i) {
                CHECK(status[i] == SEGVEC_ENV_ERR_ACTION || status[i] == 3 || status[i] == 4, "step status %d",
                      status[i]);
                failed_env[failed[i]] = 1;
            }
            if (n_failed) OK(segvec_fail_envs(core, n_failed, failed));
            OK(segvec_publish(core, n_done, done));
            tot->steps += real;
            tot->endings += endings;
            tot->failures += n_failed;
            RECEIVE();
        }
        /* the learner: take and release, flush, reset the failed (and DISABLED's ended) envs, or all */
        OK(segvec_read_stats(core, &after));
        if (after.complete_rows && next_rand() % 3 == 0) {
            int32_t k = (int32_t)(next_rand() % (uint64_t)after.complete_rows) + 1;
            OK(segvec_take(core, k, rows));
            OK(segvec_release(core, k, rows));
        }
        if (n_held && next_rand() % 20 == 0) {
            OK(segvec_flush_envs(core, n_held, held, NULL, from, to));
            for (int32_t i = 0; i < n_held; ++i)
                if (from[i] >= 0) memcpy(obs + to[i] * obs_bytes, obs + from[i] * obs_bytes, (size_t)obs_bytes);
        }
        int32_t k = 0;
        if (next_rand() % 50 == 0) {
            for (int32_t e = 0; e < E; ++e) ids[k++] = e;
            n_held = 0;
        } else {
            for (int32_t e = 0; e < E; ++e)
                if (failed_env[e] || ended_env[e]) ids[k++] = e;
            int32_t kept = 0;
            for (int32_t i = 0; i < n_held; ++i)
                if (!ended_env[held[i]]) held[kept++] = held[i];
            n_held = kept;
        }
        if (k) {
            memset(ended_env, 0, (size_t)E);
            RESET(k);
            RECEIVE();
        }
    }
    free(held);
    free(ended_env);
#undef RECEIVE
    for (int32_t e = 0; e < E; ++e) free(envs[e]);
    free(envs), free(obs), free(actions), free(final_obs), free(staging), free(outcomes), free(scratch);
    free(done), free(ids), free(failed), free(status), free(ended), free(rows), free(slots), free(from), free(to);
    free(obs_slots), free(row_start), free(seeded), free(failed_env), free(seeds), free(values);
    segvec_detach(core);
    free(block);
#undef RESET
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s <seconds> <num_envs> <horizon> <seed>\n", argv[0]);
        return 2;
    }
    double seconds = atof(argv[1]);
    int32_t E = atoi(argv[2]), T = atoi(argv[3]);
    g_rand ^= (uint64_t)atoll(argv[4]) * 0x9E3779B97F4A7C15ull;
    const segvec_env_class_t *classes[] = {&segvec_env_cartpole, &segvec_env_synthetic_atari, &flaky_class};
    const int32_t modes[] = {SEGVEC_AUTORESET_NEXT_STEP, SEGVEC_AUTORESET_SAME_STEP, SEGVEC_AUTORESET_DISABLED};
    totals_t tot = {0};
    for (int c = 0; c < 3; ++c)
        for (int m = 0; m < 3; ++m) run(classes[c], modes[m], c == 1 && E > 8 ? 8 : E, T, seconds / 9, &tot);
    printf("segvec env driver: %lld rounds, %lld steps, %lld resets, %lld endings, %lld failures, %ld violations\n",
           (long long)tot.rounds, (long long)tot.steps, (long long)tot.resets, (long long)tot.endings,
           (long long)tot.failures, g_violations);
    return g_violations ? 1 : 0;
}
