/* synthetic_atari.c -- the synthetic Atari-shaped env of segvec/envs.py in C ("segvec/SyntheticAtari-c").
 *
 * Same spaces and rules as segvec.envs.SyntheticAtariEnv: observations are the last 4 frames (oldest first)
 * of an 84x84 window onto a random 84x84 texture (the window wraps), uint8 (84, 84, 4); Discrete(6) moves
 * the window (0: stay, 1/2: right by 1/2 columns, 3/4: left by 1/2, 5: down one row); reward 1 when the
 * action equals the step's target action (target_key + 7 t) % 6; episodes last a uniform number of steps
 * in [min_length, max_length] and end truncated with probability truncation_prob, else terminated.  The
 * frame update is a cheap deterministic shift of the frame stack, with no added work per step; the random
 * draws are the env's own (the same seed does not give the Python env's episodes).
 */
#include <string.h>

#include "segvec_env.h"

#define SIDE 84
#define STACK 4
#define PIXELS (SIDE * SIDE)

typedef struct {
    double truncation_prob;
    int64_t min_length, max_length;
    int64_t row, col, t, length, target_key;
    int32_t truncate, pad;
    uint8_t texture[PIXELS];        /* [84, 84] */
    uint32_t stack[PIXELS];         /* [84, 84] words of 4 frames: the observation's bytes */
} synthetic_t;

/* A word holds a pixel's 4 frames, oldest first in memory: a new frame enters at the last byte. */
static inline uint32_t push(uint32_t word, uint8_t pixel) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return (word << 8) | pixel;
#else
    return (word >> 8) | ((uint32_t)pixel << 24);
#endif
}

static inline uint32_t repeat(uint8_t pixel) { return 0x01010101u * pixel; }

enum { BAD_LENGTHS = 1, BAD_PROBABILITY = 2 };

static const char *const param_names[] = {"min_length", "max_length", "truncation_prob"};
static const double param_defaults[] = {64, 512, 0.25};

static const char *synthetic_error(int status) {
    switch (status) {
    case BAD_LENGTHS: return "episode lengths must satisfy 1 <= min_length <= max_length";
    case BAD_PROBABILITY: return "truncation_prob must be in [0, 1]";
    default: return NULL;
    }
}

static int synthetic_init(void *state, const double *params) {
    synthetic_t *s = (synthetic_t *)state;
    s->min_length = (int64_t)params[0];
    s->max_length = (int64_t)params[1];
    s->truncation_prob = params[2];
    if (s->min_length < 1 || s->max_length < s->min_length) return BAD_LENGTHS;
    if (!(s->truncation_prob >= 0.0 && s->truncation_prob <= 1.0)) return BAD_PROBABILITY;
    return SEGVEC_ENV_OK;
}

/* Drops the oldest frame of every pixel's stack and appends the window's pixel; writes the observation.
 * The window's row i is texture row (row + i) % 84 from column col on, wrapping once. */
static void push_frame(synthetic_t *s, uint8_t *obs) {
    const int64_t head = SIDE - s->col; /* columns before the wrap */
    for (int64_t i = 0; i < SIDE; ++i) {
        const uint8_t *texture_row = s->texture + ((s->row + i) % SIDE) * SIDE;
        uint32_t *words = s->stack + i * SIDE;
        for (int64_t j = 0; j < head; ++j) words[j] = push(words[j], texture_row[s->col + j]);
        for (int64_t j = head; j < SIDE; ++j) words[j] = push(words[j], texture_row[j - head]);
    }
    memcpy(obs, s->stack, sizeof(s->stack));
}

static int synthetic_reset(void *state, segvec_rng_t *rng, const uint64_t *seed, void *obs_out) {
    synthetic_t *s = (synthetic_t *)state;
    (void)seed;
    for (int p = 0; p < PIXELS; p += 8) {
        uint64_t bits = segvec_rng_next64(rng);
        memcpy(s->texture + p, &bits, 8); /* (PIXELS is a multiple of 8) */
    }
    s->row = segvec_rng_integers(rng, 0, SIDE);
    s->col = segvec_rng_integers(rng, 0, SIDE);
    s->length = segvec_rng_integers(rng, s->min_length, s->max_length + 1);
    s->truncate = segvec_rng_random(rng) < s->truncation_prob;
    s->target_key = segvec_rng_integers(rng, 0, (int64_t)1 << 30);
    s->t = 0;
    const int64_t head = SIDE - s->col;
    for (int64_t i = 0; i < SIDE; ++i) {
        const uint8_t *texture_row = s->texture + ((s->row + i) % SIDE) * SIDE;
        uint32_t *words = s->stack + i * SIDE;
        for (int64_t j = 0; j < head; ++j) words[j] = repeat(texture_row[s->col + j]);
        for (int64_t j = head; j < SIDE; ++j) words[j] = repeat(texture_row[j - head]);
    }
    memcpy(obs_out, s->stack, sizeof(s->stack));
    return SEGVEC_ENV_OK;
}

static int synthetic_step(void *state, segvec_rng_t *rng, const void *action, void *obs_out, double *reward,
                          uint8_t *terminated, uint8_t *truncated) {
    static const int64_t shift[6] = {0, 1, 2, -1, -2, 0};
    synthetic_t *s = (synthetic_t *)state;
    (void)rng;
    int64_t a = *(const int64_t *)action;
    s->col = (s->col + shift[a] + SIDE) % SIDE;
    if (a == 5) s->row = (s->row + 1) % SIDE;
    *reward = a == (s->target_key + 7 * s->t) % 6 ? 1.0 : 0.0;
    s->t += 1;
    push_frame(s, (uint8_t *)obs_out);
    int ended = s->t >= s->length;
    *terminated = (uint8_t)(ended && !s->truncate);
    *truncated = (uint8_t)(ended && s->truncate);
    return SEGVEC_ENV_OK;
}


const segvec_env_class_t segvec_env_synthetic_atari = {
    .abi_version = SEGVEC_ENV_ABI_VERSION,
    .name = "synthetic_atari",
    .obs_dtype = SEGVEC_ENV_UINT8,
    .obs_ndim = 3,
    .obs_shape = {SIDE, SIDE, STACK},
    .action_kind = SEGVEC_ENV_DISCRETE,
    .action_size = 6,
    .max_episode_steps = 0,
    .state_bytes = sizeof(synthetic_t),
    .n_params = 3,
    .param_names = param_names,
    .param_defaults = param_defaults,
    .init = synthetic_init,
    .reset = synthetic_reset,
    .step = synthetic_step,
    .error_message = synthetic_error,
};
