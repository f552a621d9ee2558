/* segvec_env.h -- envs written in C: the ABI, in one header.
 *
 * An env class is a `segvec_env_class_t`: a constant struct that declares the observation (one array of a
 * fixed shape and dtype), the action (Discrete(n), or a float32 Box of k dims), the size of one env's state,
 * the episode's time limit, named float parameters, and three functions:
 *
 *   init(state, params)                                     once per env (optional)
 *   reset(state, rng, seed, obs_out)                        start an episode, write its first observation
 *   step(state, rng, action, obs_out, &reward, &terminated, &truncated)
 *
 * Python wraps one env of a class as a `segvec.native.NativeEnv` (a gymnasium.Env: it works alone, under
 * gymnasium's wrappers and checkers, step by step).  When every env a runner owns is a bare NativeEnv of
 * one class, the runner (serial backend: in the learner's process; multiprocessing: in the worker) hands
 * its whole batch to the core in ONE call, `segvec_env_step_batch`, which loops in C over the envs:
 *
 *   for each env:  action = actions[its cursor's step slot]
 *                  NEXT_STEP and the last step ended its episode:  reset (no seed), the action ignored
 *                  else: step;  ended and SAME_STEP: final obs -> the block's final_obs[env], then reset
 *                  outcome (reward, terminated, truncated, valid, episode_started, needs_reset)
 *   segvec_commit_steps(ok envs, outcomes)        the call the Python runner makes (rows, cursors, episodes)
 *   segvec_scatter_obs(observations -> slots)     the row's next slot, or the finished row's obs[horizon]
 *                                                 and the new row's slot 0 (observations of 1 KiB and more
 *                                                 are written straight into the row's next slot instead,
 *                                                 as the Python runner writes them, and copied to the new
 *                                                 row's slot 0 where the commit says the row filled)
 *
 * so exactly-once delivery and bootstraps hold as they do for Python envs: the C loop fills the same
 * outcomes the Python runner fills, and the same two calls of the core do the bookkeeping.
 *
 * One env's memory is [ segvec_env_header_t, padded to SEGVEC_ENV_HEADER_BYTES | the class's state ]:
 *   - the header is the core's: the env's random generator (numpy's PCG64), the entropy it was seeded
 *     with, and the episode's step count.  `state` (what the class's functions get) starts after it.
 *   - the state is plain data of `state_bytes` bytes: no pointers, no resources (it is zeroed at creation,
 *     copied by copy.deepcopy and pickling, and never freed by the class).
 *
 * Seeding: the core seeds the env's generator exactly as gymnasium's `Env.reset(seed=...)` seeds
 * `np_random` -- np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed))) -- before calling
 * `reset`; an env reset without a seed and never seeded draws 128 bits of entropy from the OS first, as
 * SeedSequence(None) does; an unseeded reset otherwise goes on with the generator where it is.  The
 * segvec_rng_* draws below give exactly what numpy's Generator gives for the same state (random, uniform,
 * integers with the default int64 dtype), so a C port of a gymnasium env can be bit-for-bit.  Seeds are
 * integers in [0, 2**64).
 *
 * Time limit: a class declares `max_episode_steps` (0: none); the CORE counts the steps of each episode
 * (reset sets 0, every step adds 1) and sets `truncated` once the count reaches the limit, as gymnasium's
 * TimeLimit wrapper does (a step can then be both terminated and truncated).  The env's own `truncated`
 * (e.g. a goal that cannot be reached) is kept as it sets it.  `NativeEnv(max_episode_steps=...)` overrides
 * the class's limit per env.
 *
 * Errors: a function returns SEGVEC_ENV_OK (0) or a nonzero status: the env failed, exactly as a Python env
 * that raises (EnvError for the learner, or a rebuilt and reset env with restart_failed_envs).  Positive
 * statuses are the class's own, named by its `error_message`; the negative ones below are the core's.
 *
 * Not supported (such envs stay Python envs): Dict/Tuple or several observation arrays, MultiDiscrete or
 * integer Box actions, Discrete spaces that do not start at 0, reset options, infos (always {}),
 * rendering, and env state that holds pointers or resources.
 *
 * Build a module of classes with `segvec.native.build(name, sources)` (examples/native_env/ is a template).
 * A module exports its classes with SEGVEC_ENV_EXPORT(&class_a, &class_b, ...) once, in one of its files.
 */
#ifndef SEGVEC_ENV_H
#define SEGVEC_ENV_H

#include <stdint.h>
#include <string.h>

/* SEGVEC_ENV_CDEF_BEGIN */

enum {
    SEGVEC_ENV_ABI_VERSION = 1,
    SEGVEC_ENV_MAX_DIMS = 4,            /* dims of an observation */
    SEGVEC_ENV_HEADER_BYTES = 128       /* the core's part of one env's memory (the class's state follows) */
};

/* Statuses: 0 is success; > 0 the class's own errors (see error_message); < 0 the core's. */
enum segvec_env_status {
    SEGVEC_ENV_OK = 0,
    SEGVEC_ENV_ERR_ACTION = -1,         /* a Discrete action outside [0, n) */
    SEGVEC_ENV_ERR_NOT_RESET = -2,      /* step before the first reset */
    SEGVEC_ENV_ERR_CLASS = -3,          /* the class struct is not valid (see segvec_env_check_class) */
    SEGVEC_ENV_ERR_ENTROPY = -4         /* no entropy from the OS for an unseeded first reset */
};

enum segvec_env_dtype {                 /* element type of the observation */
    SEGVEC_ENV_UINT8 = 0,
    SEGVEC_ENV_INT32 = 1,
    SEGVEC_ENV_INT64 = 2,
    SEGVEC_ENV_FLOAT32 = 3,
    SEGVEC_ENV_FLOAT64 = 4
};

enum segvec_env_action_kind {
    SEGVEC_ENV_DISCRETE = 0,            /* Discrete(action_size): the action is one int64_t */
    SEGVEC_ENV_BOX = 1                  /* Box(action_low, action_high, (action_size,), float32): float[k] */
};

/* numpy's PCG64 state (numpy's bit_generator.state: state, inc, has_uint32, uinteger). */
typedef struct segvec_rng {
    uint64_t state_high, state_low;     /* the 128-bit LCG state */
    uint64_t inc_high, inc_low;         /* the 128-bit increment (odd) */
    uint32_t has_uint32;                /* 1: `uinteger` is the upper half of the last 64-bit draw */
    uint32_t uinteger;
} segvec_rng_t;

typedef struct segvec_env_class {
    int32_t abi_version;                /* SEGVEC_ENV_ABI_VERSION */
    const char *name;                   /* "cartpole": how Python finds the class in its module */

    /* the observation: one array */
    int32_t obs_dtype;                  /* enum segvec_env_dtype */
    int32_t obs_ndim;                   /* 0..SEGVEC_ENV_MAX_DIMS */
    int64_t obs_shape[SEGVEC_ENV_MAX_DIMS];
    const double *obs_low;              /* per element (NULL: -inf, or the integer dtype's minimum) */
    const double *obs_high;             /* per element (NULL: +inf, or the integer dtype's maximum) */

    /* the action */
    int32_t action_kind;                /* enum segvec_env_action_kind */
    int32_t action_size;                /* Discrete: n >= 1; Box: k >= 1 dims */
    const float *action_low;            /* Box: k values (NULL: -inf) */
    const float *action_high;           /* Box: k values (NULL: +inf) */

    /* episodes and state */
    int64_t max_episode_steps;          /* truncation after this many steps, counted by the core; 0: none */
    int64_t state_bytes;                /* size of one env's state (plain data) */

    /* named parameters: NativeEnv(name=value) sets them; init reads them (in this order) */
    int32_t n_params;
    const char *const *param_names;
    const double *param_defaults;

    /* The functions.  `state` is the env's state (zeroed before init), `rng` its generator.  `obs_out`
     * is where the observation goes (C-contiguous, aligned for its dtype; never the previous one).
     * Returns 0, or a status that fails the env. */
    int (*init)(void *state, const double *params);                          /* NULL: nothing to do */
    /* `seed` is NULL for a reset without a seed; the core has seeded `rng` with it already. */
    int (*reset)(void *state, segvec_rng_t *rng, const uint64_t *seed, void *obs_out);
    /* `action`: Discrete: const int64_t * in [0, n) (checked by the core); Box: const float[k] (not
     * checked or clipped, as gymnasium does not).  *reward, *terminated, *truncated start at 0. */
    int (*step)(void *state, segvec_rng_t *rng, const void *action, void *obs_out, double *reward,
                uint8_t *terminated, uint8_t *truncated);
    const char *(*error_message)(int status);                                /* NULL: "error <status>" */
} segvec_env_class_t;

/* SEGVEC_ENV_CDEF_END */

/* A module's classes, for Python: SEGVEC_ENV_EXPORT(&class_a, &class_b) defines this function
 * (NULL past the last class). */
const void *segvec_env_class_at(int32_t index);
#define SEGVEC_ENV_EXPORT(...)                                                                             \
    const void *segvec_env_class_at(int32_t index) {                                                       \
        static const segvec_env_class_t *const classes_[] = {__VA_ARGS__};                                 \
        return index >= 0 && index < (int32_t)(sizeof(classes_) / sizeof(classes_[0])) ? classes_[index]  \
                                                                                        : (const void *)0; \
    }

/* ---- draws (numpy's Generator, bit for bit) ----------------------------------------------------------
 * Each equals the numpy call named for the same bit-generator state, and leaves the state where numpy
 * leaves it. */

#define SEGVEC_PCG_MULT_HIGH 2549297995355413924ULL /* PCG's default 128-bit multiplier */
#define SEGVEC_PCG_MULT_LOW 4865540595714422341ULL

/* (high, low) of the 128-bit product a * b */
static inline void segvec_mul_64_128(uint64_t a, uint64_t b, uint64_t *high, uint64_t *low) {
#ifdef __SIZEOF_INT128__
    unsigned __int128 p = (unsigned __int128)a * b;
    *high = (uint64_t)(p >> 64);
    *low = (uint64_t)p;
#else
    uint64_t a0 = a & 0xFFFFFFFFu, a1 = a >> 32, b0 = b & 0xFFFFFFFFu, b1 = b >> 32;
    uint64_t w0 = a0 * b0, t = a1 * b0 + (w0 >> 32), w1 = (t & 0xFFFFFFFFu) + a0 * b1;
    *high = a1 * b1 + (t >> 32) + (w1 >> 32);
    *low = (w1 << 32) | (w0 & 0xFFFFFFFFu);
#endif
}

/* state = state * MULT + inc (mod 2**128): the LCG step of PCG64 */
static inline void segvec_rng_advance(segvec_rng_t *rng) {
    uint64_t high, low;
    segvec_mul_64_128(rng->state_low, SEGVEC_PCG_MULT_LOW, &high, &low);
    high += rng->state_high * SEGVEC_PCG_MULT_LOW + rng->state_low * SEGVEC_PCG_MULT_HIGH;
    low += rng->inc_low;
    high += rng->inc_high + (low < rng->inc_low);
    rng->state_high = high;
    rng->state_low = low;
}

/* bit_generator.random_raw(): step, then the XSL-RR output of the new state */
static inline uint64_t segvec_rng_next64(segvec_rng_t *rng) {
    segvec_rng_advance(rng);
    uint64_t x = rng->state_high ^ rng->state_low;
    unsigned rot = (unsigned)(rng->state_high >> 58);
    return (x >> rot) | (x << ((64u - rot) & 63u));
}

/* numpy's next_uint32: the halves of a 64-bit draw, low half first */
static inline uint32_t segvec_rng_next32(segvec_rng_t *rng) {
    if (rng->has_uint32) {
        rng->has_uint32 = 0;
        return rng->uinteger;
    }
    uint64_t next = segvec_rng_next64(rng);
    rng->has_uint32 = 1;
    rng->uinteger = (uint32_t)(next >> 32);
    return (uint32_t)next;
}

/* Generator.random(): (next64 >> 11) * 2**-53, in [0, 1) */
static inline double segvec_rng_random(segvec_rng_t *rng) {
    return (double)(segvec_rng_next64(rng) >> 11) * (1.0 / 9007199254740992.0);
}

/* Generator.uniform(low, high) */
static inline double segvec_rng_uniform(segvec_rng_t *rng, double low, double high) {
    double range = high - low;
    return low + range * segvec_rng_random(rng);
}

/* Generator.integers(low, high) (int64, high excluded, low < high): Lemire's method, as numpy draws it */
static inline int64_t segvec_rng_integers(segvec_rng_t *rng, int64_t low, int64_t high) {
    uint64_t range = (uint64_t)high - 1u - (uint64_t)low; /* numpy's rng: the closed interval's width */
    if (range == 0) return low;
    if (range <= 0xFFFFFFFFu) {
        if (range == 0xFFFFFFFFu) return (int64_t)((uint64_t)low + segvec_rng_next32(rng));
        uint32_t excl = (uint32_t)range + 1u;
        uint64_t m = (uint64_t)segvec_rng_next32(rng) * excl;
        uint32_t leftover = (uint32_t)m;
        if (leftover < excl) {
            uint32_t threshold = (uint32_t)(UINT32_MAX - (uint32_t)range) % excl;
            while (leftover < threshold) {
                m = (uint64_t)segvec_rng_next32(rng) * excl;
                leftover = (uint32_t)m;
            }
        }
        return (int64_t)((uint64_t)low + (m >> 32));
    }
    if (range == UINT64_MAX) return (int64_t)((uint64_t)low + segvec_rng_next64(rng));
    uint64_t excl = range + 1u, high_part, leftover;
    segvec_mul_64_128(segvec_rng_next64(rng), excl, &high_part, &leftover);
    if (leftover < excl) {
        uint64_t threshold = (UINT64_MAX - range) % excl;
        while (leftover < threshold) segvec_mul_64_128(segvec_rng_next64(rng), excl, &high_part, &leftover);
    }
    return (int64_t)((uint64_t)low + high_part);
}

/* ---- the core's side (segvec._native; runners and NativeEnv call it, env authors do not) ------------- */

#ifndef SEGVEC_H
typedef struct segvec_core segvec_core_t;
typedef struct segvec_outcome segvec_outcome_t;
#endif

/* SEGVEC_ENV_CORE_CDEF_BEGIN */

/* The start of one env's memory (SEGVEC_ENV_HEADER_BYTES; the class's state follows). */
typedef struct segvec_env_header {
    segvec_rng_t rng;
    uint32_t entropy[4];                /* SeedSequence.entropy of the last seeding, low word first */
    int32_t entropy_words;              /* 0: never seeded */
    int32_t was_reset;                  /* 1 once reset (a step before that is SEGVEC_ENV_ERR_NOT_RESET) */
    int64_t elapsed_steps;              /* steps of the current episode */
    int64_t max_episode_steps;          /* this env's time limit (the class's unless overridden); 0: none */
} segvec_env_header_t;

/* What one step returned (single-env calls). */
typedef struct segvec_env_result {
    double reward;
    uint8_t terminated;
    uint8_t truncated;
} segvec_env_result_t;

enum segvec_autoreset {                 /* gymnasium's AutoresetMode */
    SEGVEC_AUTORESET_NEXT_STEP = 0,
    SEGVEC_AUTORESET_SAME_STEP = 1,
    SEGVEC_AUTORESET_DISABLED = 2
};

/* The envs of one runner (all of one class) and where their data goes: pointers into the segment block
 * and scratch arrays of `n_envs` entries each, set up once by the runner. */
typedef struct segvec_env_batch {
    const segvec_env_class_t *cls;
    int32_t first_env;                  /* env id of envs[0] */
    int32_t n_envs;
    void **envs;                        /* [n_envs] each env's memory (header + state) */
    int32_t autoreset_mode;             /* enum segvec_autoreset */
    int32_t horizon;                    /* T of the block */
    int64_t obs_bytes;                  /* one observation */
    int64_t action_bytes;               /* one action (8: Discrete; 4 * k: Box) */
    void *obs;                          /* the block's observations, [S * (T + 1)] items */
    const void *actions;                /* the block's actions, [S * T] items */
    void *final_obs;                    /* the block's SAME_STEP final observations, [E] items */
    const uint8_t *env_needs_reset;     /* the block's env_needs_reset, [E] */
    /* scratch */
    void *staging;                      /* [n_envs] observations, in batch order */
    segvec_outcome_t *outcomes;         /* [n_envs] */
    int64_t *slots;                     /* [n_envs] */
    int64_t *obs_slots;                 /* [n_envs] */
    int64_t *chain_slots;               /* [n_envs] */
    int32_t *done;                      /* [n_envs] the envs committed by the last call, in batch order */
} segvec_env_batch_t;

/* SEGVEC_ENV_OK, or SEGVEC_ENV_ERR_CLASS when `cls` is not a valid class of this ABI version. */
int segvec_env_check_class(const segvec_env_class_t *cls);
/* Bytes of one env's memory: SEGVEC_ENV_HEADER_BYTES + state_bytes. */
int64_t segvec_env_bytes(const segvec_env_class_t *cls);
/* "the action is outside the action space", or the class's message for its own status. */
const char *segvec_env_strerror(const segvec_env_class_t *cls, int status);
/* A fresh env in zeroed memory `env`: the header (time limit `max_episode_steps`, < 0: the class's), then
 * the class's init with `params` (n_params values). */
int segvec_env_init(const segvec_env_class_t *cls, void *env, const double *params, int64_t max_episode_steps);
/* One env's reset (seed NULL: no seed) and step, with the core's seeding and time limit. */
int segvec_env_reset(const segvec_env_class_t *cls, void *env, const uint64_t *seed, void *obs_out);
int segvec_env_step(const segvec_env_class_t *cls, void *env, const void *action, void *obs_out,
                    segvec_env_result_t *result);

/* Seeds `rng` as np.random.PCG64(np.random.SeedSequence(entropy)) does, `entropy` given as numpy's uint32
 * words (low first; n_words <= 4).  segvec_rng_seed_os: 128 bits from the OS (SeedSequence(None)); the
 * words used go to entropy_out (4 words, leading zero words dropped: *n_words_out).  0 or a status. */
int segvec_rng_seed(segvec_rng_t *rng, const uint32_t *entropy, int32_t n_words);
int segvec_rng_seed_os(segvec_rng_t *rng, uint32_t *entropy_out, int32_t *n_words_out);
/* The draws of segvec_env.h, callable from Python (tests against numpy). */
uint64_t segvec_rng_draw64(segvec_rng_t *rng);
uint32_t segvec_rng_draw32(segvec_rng_t *rng);
double segvec_rng_draw_random(segvec_rng_t *rng);
double segvec_rng_draw_uniform(segvec_rng_t *rng, double low, double high);
int64_t segvec_rng_draw_integers(segvec_rng_t *rng, int64_t low, int64_t high);

/* The classes built into segvec (cartpole, synthetic_atari); NULL past the last. */
const segvec_env_class_t *segvec_builtin_env_class(int32_t index);

/* Steps `env_ids` (IN_FLIGHT, all in the batch) as the loop at the top of this file says, and commits
 * those that did not fail with segvec_commit_steps and segvec_scatter_obs.  Out: *n_done_out envs
 * committed (their ids in batch->done, to publish); the failed ones (not committed: fail or restart them)
 * in failed_out with their statuses; SAME_STEP: the envs whose episode ended (their final observation is
 * in final_obs) in ended_out.  Each out array holds up to n.  Returns a core status (SEGVEC_OK, or the
 * error of segvec_commit_steps / segvec_cursor_slots: then nothing was committed). */
int segvec_env_step_batch(segvec_core_t *core, segvec_env_batch_t *batch, int32_t n, const int32_t *env_ids,
                          int32_t *n_done_out, int32_t *failed_out, int32_t *failed_status_out,
                          int32_t *n_failed_out, int32_t *ended_out, int32_t *n_ended_out);
/* Resets `env_ids` (RESETTING; seeded[i]: with seeds[i], else no seed) and commits those that did not
 * fail with segvec_commit_resets and segvec_scatter_obs.  Out as for segvec_env_step_batch. */
int segvec_env_reset_batch(segvec_core_t *core, segvec_env_batch_t *batch, int32_t n, const int32_t *env_ids,
                           const uint64_t *seeds, const uint8_t *seeded, int32_t *n_done_out, int32_t *failed_out,
                           int32_t *failed_status_out, int32_t *n_failed_out);

/* SEGVEC_ENV_CORE_CDEF_END */

#endif /* SEGVEC_ENV_H */
