/* segvec_env.c -- the core's side of envs written in C: seeding, one env's reset and step, and the batch
 * loops that step a runner's envs and commit them with the core's own calls.  The design is in segvec_env.h. */
#define _GNU_SOURCE
#include "segvec.h"
#include "segvec_env.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#if defined(__linux__)
#include <sys/syscall.h>
#endif

_Static_assert(sizeof(segvec_env_header_t) <= SEGVEC_ENV_HEADER_BYTES, "the header fits its bytes");

/* ---- numpy's SeedSequence and PCG64 seeding ---------------------------------------------------------- */

#define SS_POOL_SIZE 4
#define SS_INIT_A 0x43b0d7e5u
#define SS_MULT_A 0x931e8875u
#define SS_INIT_B 0x8b51f9ddu
#define SS_MULT_B 0x58f38dedu
#define SS_MIX_MULT_L 0xca01f9ddu
#define SS_MIX_MULT_R 0x4973f715u
#define SS_XSHIFT 16

static uint32_t ss_hashmix(uint32_t value, uint32_t *hash_const) {
    value ^= *hash_const;
    *hash_const *= SS_MULT_A;
    value *= *hash_const;
    value ^= value >> SS_XSHIFT;
    return value;
}

static uint32_t ss_mix(uint32_t x, uint32_t y) {
    uint32_t result = SS_MIX_MULT_L * x - SS_MIX_MULT_R * y;
    result ^= result >> SS_XSHIFT;
    return result;
}

/* SeedSequence(entropy).pool (no spawn key, pool size 4): mix_entropy over the entropy words */
static void ss_pool(const uint32_t *entropy, int32_t n, uint32_t pool[SS_POOL_SIZE]) {
    uint32_t hash_const = SS_INIT_A;
    for (int i = 0; i < SS_POOL_SIZE; ++i) pool[i] = ss_hashmix(i < n ? entropy[i] : 0u, &hash_const);
    for (int src = 0; src < SS_POOL_SIZE; ++src)
        for (int dst = 0; dst < SS_POOL_SIZE; ++dst)
            if (src != dst) pool[dst] = ss_mix(pool[dst], ss_hashmix(pool[src], &hash_const));
    for (int src = SS_POOL_SIZE; src < n; ++src)
        for (int dst = 0; dst < SS_POOL_SIZE; ++dst) pool[dst] = ss_mix(pool[dst], ss_hashmix(entropy[src], &hash_const));
}

/* SeedSequence.generate_state(n_words, uint32) */
static void ss_generate(const uint32_t pool[SS_POOL_SIZE], uint32_t *out, int n_words) {
    uint32_t hash_const = SS_INIT_B;
    for (int i = 0; i < n_words; ++i) {
        uint32_t value = pool[i % SS_POOL_SIZE];
        value ^= hash_const;
        hash_const *= SS_MULT_B;
        value *= hash_const;
        value ^= value >> SS_XSHIFT;
        out[i] = value;
    }
}

int segvec_rng_seed(segvec_rng_t *rng, const uint32_t *entropy, int32_t n_words) {
    if (!rng || n_words < 1 || n_words > 4) return SEGVEC_ENV_ERR_CLASS;
    uint32_t pool[SS_POOL_SIZE], words[8];
    uint64_t w[4];
    ss_pool(entropy, n_words, pool);
    ss_generate(pool, words, 8);
    for (int k = 0; k < 4; ++k) w[k] = (uint64_t)words[2 * k] | ((uint64_t)words[2 * k + 1] << 32);
    /* PCG64: generate_state(4, uint64) = (seed high, seed low, inc high, inc low); pcg64_srandom_r */
    rng->state_high = rng->state_low = 0;
    rng->inc_high = (w[2] << 1) | (w[3] >> 63);
    rng->inc_low = (w[3] << 1) | 1u;
    segvec_rng_advance(rng);
    uint64_t low = rng->state_low + w[1];
    rng->state_high += w[0] + (low < w[1]);
    rng->state_low = low;
    segvec_rng_advance(rng);
    rng->has_uint32 = 0;
    rng->uinteger = 0;
    return SEGVEC_ENV_OK;
}

static int os_entropy(uint8_t *buffer, size_t n) {
#if defined(__linux__) && defined(SYS_getrandom)
    size_t got = 0;
    while (got < n) {
        long r = syscall(SYS_getrandom, buffer + got, n - got, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            break;
        }
        got += (size_t)r;
    }
    if (got == n) return 0;
#endif
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t done = 0;
    while (done < n) {
        ssize_t r = read(fd, buffer + done, n - done);
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            close(fd);
            return -1;
        }
        done += (size_t)r;
    }
    close(fd);
    return 0;
}

int segvec_rng_seed_os(segvec_rng_t *rng, uint32_t *entropy_out, int32_t *n_words_out) {
    uint32_t words[4];
    if (os_entropy((uint8_t *)words, sizeof(words)) != 0) return SEGVEC_ENV_ERR_ENTROPY;
    /* SeedSequence(None) draws a 128-bit int; as a seed it is its words without the leading zero ones */
    int32_t n = 4;
    while (n > 1 && words[n - 1] == 0) --n;
    for (int32_t i = 0; i < 4; ++i) entropy_out[i] = i < n ? words[i] : 0u;
    *n_words_out = n;
    return segvec_rng_seed(rng, words, n);
}

uint64_t segvec_rng_draw64(segvec_rng_t *rng) { return segvec_rng_next64(rng); }
uint32_t segvec_rng_draw32(segvec_rng_t *rng) { return segvec_rng_next32(rng); }
double segvec_rng_draw_random(segvec_rng_t *rng) { return segvec_rng_random(rng); }
double segvec_rng_draw_uniform(segvec_rng_t *rng, double low, double high) { return segvec_rng_uniform(rng, low, high); }
int64_t segvec_rng_draw_integers(segvec_rng_t *rng, int64_t low, int64_t high) {
    return segvec_rng_integers(rng, low, high);
}

/* ---- one env ------------------------------------------------------------------------------------- */

static inline segvec_env_header_t *header_of(void *env) { return (segvec_env_header_t *)env; }
static inline void *state_of(void *env) { return (char *)env + SEGVEC_ENV_HEADER_BYTES; }

int segvec_env_check_class(const segvec_env_class_t *cls) {
    if (!cls || cls->abi_version != SEGVEC_ENV_ABI_VERSION || !cls->name || !cls->reset || !cls->step)
        return SEGVEC_ENV_ERR_CLASS;
    if (cls->obs_dtype < SEGVEC_ENV_UINT8 || cls->obs_dtype > SEGVEC_ENV_FLOAT64) return SEGVEC_ENV_ERR_CLASS;
    if (cls->obs_ndim < 0 || cls->obs_ndim > SEGVEC_ENV_MAX_DIMS) return SEGVEC_ENV_ERR_CLASS;
    for (int32_t d = 0; d < cls->obs_ndim; ++d)
        if (cls->obs_shape[d] < 1) return SEGVEC_ENV_ERR_CLASS;
    if ((cls->action_kind != SEGVEC_ENV_DISCRETE && cls->action_kind != SEGVEC_ENV_BOX) || cls->action_size < 1)
        return SEGVEC_ENV_ERR_CLASS;
    if (cls->state_bytes < 0 || cls->max_episode_steps < 0 || cls->n_params < 0) return SEGVEC_ENV_ERR_CLASS;
    if (cls->n_params > 0 && (!cls->param_names || !cls->param_defaults)) return SEGVEC_ENV_ERR_CLASS;
    return SEGVEC_ENV_OK;
}

int64_t segvec_env_bytes(const segvec_env_class_t *cls) { return SEGVEC_ENV_HEADER_BYTES + cls->state_bytes; }

const char *segvec_env_strerror(const segvec_env_class_t *cls, int status) {
    switch (status) {
    case SEGVEC_ENV_OK: return "ok";
    case SEGVEC_ENV_ERR_ACTION: return "the action is outside the action space";
    case SEGVEC_ENV_ERR_NOT_RESET: return "step() before the first reset()";
    case SEGVEC_ENV_ERR_CLASS: return "not a valid env class of this ABI version";
    case SEGVEC_ENV_ERR_ENTROPY: return "no entropy from the OS to seed an unseeded reset";
    default: break;
    }
    const char *message = cls && cls->error_message ? cls->error_message(status) : NULL;
    return message ? message : "the env failed (a status of its own; its class names no message)";
}

int segvec_env_init(const segvec_env_class_t *cls, void *env, const double *params, int64_t max_episode_steps) {
    int status = segvec_env_check_class(cls);
    if (status != SEGVEC_ENV_OK) return status;
    segvec_env_header_t *h = header_of(env);
    memset(h, 0, sizeof(*h));
    h->max_episode_steps = max_episode_steps < 0 ? cls->max_episode_steps : max_episode_steps;
    return cls->init ? cls->init(state_of(env), params) : SEGVEC_ENV_OK;
}

/* Gymnasium's Env.reset(seed): a seed reseeds the generator; an env never seeded is seeded from the OS. */
static inline int env_reset(const segvec_env_class_t *cls, void *env, const uint64_t *seed, void *obs_out) {
    segvec_env_header_t *h = header_of(env);
    if (seed) {
        uint32_t words[2] = {(uint32_t)*seed, (uint32_t)(*seed >> 32)};
        int n = words[1] ? 2 : 1;
        segvec_rng_seed(&h->rng, words, n);
        h->entropy[0] = words[0];
        h->entropy[1] = words[1];
        h->entropy[2] = h->entropy[3] = 0;
        h->entropy_words = n;
    } else if (h->entropy_words == 0) {
        int status = segvec_rng_seed_os(&h->rng, h->entropy, &h->entropy_words);
        if (status != SEGVEC_ENV_OK) return status;
    }
    h->elapsed_steps = 0;
    int status = cls->reset(state_of(env), &h->rng, seed, obs_out);
    if (status == SEGVEC_ENV_OK) h->was_reset = 1;
    return status;
}

/* The class's step, then gymnasium's TimeLimit: truncated once the episode has run max_episode_steps. */
static inline int env_step(const segvec_env_class_t *cls, void *env, const void *action, void *obs_out,
                           double *reward, uint8_t *terminated, uint8_t *truncated) {
    segvec_env_header_t *h = header_of(env);
    if (!h->was_reset) return SEGVEC_ENV_ERR_NOT_RESET;
    if (cls->action_kind == SEGVEC_ENV_DISCRETE) {
        int64_t a;
        memcpy(&a, action, sizeof(a));
        if (a < 0 || a >= cls->action_size) return SEGVEC_ENV_ERR_ACTION;
    }
    *reward = 0.0;
    *terminated = *truncated = 0;
    int status = cls->step(state_of(env), &h->rng, action, obs_out, reward, terminated, truncated);
    if (status != SEGVEC_ENV_OK) return status;
    h->elapsed_steps += 1;
    if (h->max_episode_steps > 0 && h->elapsed_steps >= h->max_episode_steps) *truncated = 1;
    *terminated = *terminated != 0;
    *truncated = *truncated != 0;
    return SEGVEC_ENV_OK;
}

int segvec_env_reset(const segvec_env_class_t *cls, void *env, const uint64_t *seed, void *obs_out) {
    return env_reset(cls, env, seed, obs_out);
}

int segvec_env_step(const segvec_env_class_t *cls, void *env, const void *action, void *obs_out,
                    segvec_env_result_t *result) {
    return env_step(cls, env, action, obs_out, &result->reward, &result->terminated, &result->truncated);
}

/* ---- the batch loops --------------------------------------------------------------------------------- */

/* Observations of this size and more are written where they belong instead of staged and scattered (one
 * copy instead of two), as the Python runner does. */
#define DIRECT_OBS_BYTES 1024

/* Steps (or resets) every env of the call, then commits those that did not fail and puts their observations
 * where they belong.  b->slots holds the envs' step slots. */
static int step_envs(segvec_core_t *core, segvec_env_batch_t *b, int32_t n, const int32_t *env_ids, int32_t *n_done,
                     int32_t *failed_out, int32_t *failed_status_out, int32_t *n_failed, int32_t *ended_out,
                     int32_t *n_ended) {
    const segvec_env_class_t *cls = b->cls;
    const int next_step = b->autoreset_mode == SEGVEC_AUTORESET_NEXT_STEP;
    const int same_step = b->autoreset_mode == SEGVEC_AUTORESET_SAME_STEP;
    const int64_t obs_bytes = b->obs_bytes, action_bytes = b->action_bytes;
    const char *actions = (const char *)b->actions;
    const int64_t T = b->horizon;
    const int direct = obs_bytes >= DIRECT_OBS_BYTES;
    int32_t done = 0;
    char *staging = (char *)b->staging;
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        void *env = b->envs[e - b->first_env];
        /* large observations go straight to the row's next observation slot: r * (T + 1) + t + 1 for the
         * step slot r * T + t (obs[horizon] when the row fills; the commit then says where it continues) */
        int64_t slot = b->slots[i];
        char *obs = direct ? (char *)b->obs + (slot + slot / T + 1) * obs_bytes : staging + (int64_t)done * obs_bytes;
        segvec_outcome_t *o = &b->outcomes[done];
        int status;
        if (next_step && b->env_needs_reset[e]) {
            /* NEXT_STEP: the step after an episode's end resets the env; its action is ignored */
            status = env_reset(cls, env, NULL, obs);
            *o = (segvec_outcome_t){0.0, 0.0, 0.0, 0.0, 1.0, 0.0};
        } else {
            double reward;
            uint8_t terminated, truncated;
            status = env_step(cls, env, actions + slot * action_bytes, obs, &reward, &terminated, &truncated);
            *o = (segvec_outcome_t){reward, terminated, truncated, 1.0, 0.0, 0.0};
            if (status == SEGVEC_ENV_OK && (terminated || truncated)) {
                if (same_step) { /* the final observation stays where the learner finds it; the env resets */
                    memcpy((char *)b->final_obs + (int64_t)e * obs_bytes, obs, (size_t)obs_bytes);
                    status = env_reset(cls, env, NULL, obs);
                    o->episode_started = 1.0;
                    if (status == SEGVEC_ENV_OK) ended_out[(*n_ended)++] = e;
                } else if (next_step) {
                    o->needs_reset = 1.0;
                }
            }
        }
        if (status != SEGVEC_ENV_OK) {
            failed_out[*n_failed] = e;
            failed_status_out[(*n_failed)++] = status;
            continue;
        }
        b->done[done++] = e;
    }
    int status = segvec_commit_steps(core, done, b->done, b->outcomes, b->obs_slots, b->chain_slots);
    if (status != SEGVEC_OK) return status;
    if (!direct) {
        segvec_scatter_obs(staging, obs_bytes, done, b->obs_slots, b->chain_slots, b->obs);
    } else { /* written at the row's obs[horizon] (the chain slot) where the row filled: the new row starts with it */
        char *all = (char *)b->obs;
        for (int32_t k = 0; k < done; ++k)
            if (b->chain_slots[k] >= 0)
                memcpy(all + b->obs_slots[k] * obs_bytes, all + b->chain_slots[k] * obs_bytes, (size_t)obs_bytes);
    }
    *n_done = done;
    return SEGVEC_OK;
}

int segvec_env_step_batch(segvec_core_t *core, segvec_env_batch_t *b, int32_t n, const int32_t *env_ids,
                          int32_t *n_done_out, int32_t *failed_out, int32_t *failed_status_out,
                          int32_t *n_failed_out, int32_t *ended_out, int32_t *n_ended_out) {
    *n_done_out = *n_failed_out = *n_ended_out = 0;
    if (n < 0 || n > b->n_envs) return SEGVEC_ERR_INVALID;
    for (int32_t i = 0; i < n; ++i)
        if (env_ids[i] < b->first_env || env_ids[i] >= b->first_env + b->n_envs) return SEGVEC_ERR_INVALID;
    int status = segvec_cursor_slots(core, n, env_ids, SEGVEC_STEP_SLOT, b->slots);
    if (status != SEGVEC_OK) return status;
    return step_envs(core, b, n, env_ids, n_done_out, failed_out, failed_status_out, n_failed_out, ended_out,
                     n_ended_out);
}

int segvec_env_reset_batch(segvec_core_t *core, segvec_env_batch_t *b, int32_t n, const int32_t *env_ids,
                           const uint64_t *seeds, const uint8_t *seeded, int32_t *n_done_out, int32_t *failed_out,
                           int32_t *failed_status_out, int32_t *n_failed_out) {
    *n_done_out = *n_failed_out = 0;
    if (n < 0 || n > b->n_envs) return SEGVEC_ERR_INVALID;
    for (int32_t i = 0; i < n; ++i)
        if (env_ids[i] < b->first_env || env_ids[i] >= b->first_env + b->n_envs) return SEGVEC_ERR_INVALID;
    int32_t done = 0, failed = 0;
    for (int32_t i = 0; i < n; ++i) {
        int32_t e = env_ids[i];
        char *obs = (char *)b->staging + (int64_t)done * b->obs_bytes;
        int status = env_reset(b->cls, b->envs[e - b->first_env], seeded[i] ? &seeds[i] : NULL, obs);
        if (status != SEGVEC_ENV_OK) {
            failed_out[failed] = e;
            failed_status_out[failed++] = status;
            continue;
        }
        b->done[done++] = e;
    }
    *n_failed_out = failed;
    int status = segvec_commit_resets(core, done, b->done, b->obs_slots);
    if (status != SEGVEC_OK) return status;
    segvec_scatter_obs(b->staging, b->obs_bytes, done, b->obs_slots, NULL, b->obs);
    *n_done_out = done;
    return SEGVEC_OK;
}

/* ---- the classes built into segvec ----------------------------------------------------------------- */

extern const segvec_env_class_t segvec_env_cartpole;
extern const segvec_env_class_t segvec_env_synthetic_atari;

const segvec_env_class_t *segvec_builtin_env_class(int32_t index) {
    static const segvec_env_class_t *const classes[] = {&segvec_env_cartpole, &segvec_env_synthetic_atari};
    return index >= 0 && index < (int32_t)(sizeof(classes) / sizeof(classes[0])) ? classes[index] : NULL;
}
