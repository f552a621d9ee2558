/* counter_envs.c -- C ports of the test envs whose observations say where each transition comes from.
 *
 *   counter:  tests/envs.py CounterEnv, draw for draw (numpy's integers and random on the same generator),
 *             so `envs.reference_slots` (the plain Python loop) is the reference of C envs too.
 *   counting: tests/storm.py CountingEnv: obs [env_index, build, episode, step]; fails (status 1) every
 *             `fail_every` steps; episodes end terminated after `episode_length` steps.
 */
#include "segvec_env.h"

/* ---- counter ------------------------------------------------------------------------------------- */
typedef struct {
    int64_t index, max_length, episode, t, length, ending;
    double noise;
} counter_t;

static const char *const counter_params[] = {"index", "max_length"};
static const double counter_defaults[] = {0, 9};

static int counter_init(void *state, const double *params) {
    counter_t *s = (counter_t *)state;
    s->index = (int64_t)params[0];
    s->max_length = (int64_t)params[1];
    s->episode = -1;
    return s->max_length >= 1 ? SEGVEC_ENV_OK : 1;
}

static void counter_obs(const counter_t *s, double *obs) {
    obs[0] = (double)s->index;
    obs[1] = (double)s->episode;
    obs[2] = (double)s->t;
    obs[3] = s->noise;
}

static int counter_reset(void *state, segvec_rng_t *rng, const uint64_t *seed, void *obs) {
    counter_t *s = (counter_t *)state;
    (void)seed;
    s->episode += 1;
    s->t = 0;
    s->length = segvec_rng_integers(rng, 1, s->max_length + 1);
    s->ending = segvec_rng_integers(rng, 0, 3);
    s->noise = segvec_rng_random(rng);
    counter_obs(s, (double *)obs);
    return SEGVEC_ENV_OK;
}

static int counter_step(void *state, segvec_rng_t *rng, const void *action, void *obs, double *reward,
                        uint8_t *terminated, uint8_t *truncated) {
    counter_t *s = (counter_t *)state;
    int64_t a = *(const int64_t *)action;
    s->t += 1;
    s->noise = segvec_rng_random(rng);
    *reward = (double)s->index + 0.25 * (double)a - s->noise;
    int ended = s->t >= s->length;
    *terminated = (ended && (s->ending == 0 || s->ending == 2)) || (a == 3 && s->noise < 0.1);
    *truncated = ended && (s->ending == 1 || s->ending == 2);
    counter_obs(s, (double *)obs);
    return SEGVEC_ENV_OK;
}

static const segvec_env_class_t counter_class = {
    .abi_version = SEGVEC_ENV_ABI_VERSION,
    .name = "counter",
    .obs_dtype = SEGVEC_ENV_FLOAT64,
    .obs_ndim = 1,
    .obs_shape = {4},
    .action_kind = SEGVEC_ENV_DISCRETE,
    .action_size = 4,
    .state_bytes = sizeof(counter_t),
    .n_params = 2,
    .param_names = counter_params,
    .param_defaults = counter_defaults,
    .init = counter_init,
    .reset = counter_reset,
    .step = counter_step,
};

/* ---- counting ------------------------------------------------------------------------------------ */
typedef struct {
    int64_t env_index, fail_every, episode_length, build, episode, t, total;
} counting_t;

static const char *const counting_params[] = {"env_index", "fail_every", "episode_length", "build"};
static const double counting_defaults[] = {0, 0, 7, 0};

enum { BROKE = 1 };

static const char *counting_error(int status) { return status == BROKE ? "the env broke (fail_every)" : 0; }

static int counting_init(void *state, const double *params) {
    counting_t *s = (counting_t *)state;
    s->env_index = (int64_t)params[0];
    s->fail_every = (int64_t)params[1];
    s->episode_length = (int64_t)params[2];
    s->build = (int64_t)params[3];
    s->episode = -1;
    return SEGVEC_ENV_OK;
}

static void counting_obs(const counting_t *s, double *obs) {
    obs[0] = (double)s->env_index;
    obs[1] = (double)s->build;
    obs[2] = (double)s->episode;
    obs[3] = (double)s->t;
}

static int counting_reset(void *state, segvec_rng_t *rng, const uint64_t *seed, void *obs) {
    counting_t *s = (counting_t *)state;
    (void)rng;
    (void)seed;
    s->episode += 1;
    s->t = 0;
    counting_obs(s, (double *)obs);
    return SEGVEC_ENV_OK;
}

static int counting_step(void *state, segvec_rng_t *rng, const void *action, void *obs, double *reward,
                         uint8_t *terminated, uint8_t *truncated) {
    counting_t *s = (counting_t *)state;
    (void)rng;
    (void)truncated;
    s->total += 1;
    if (s->fail_every && s->total % s->fail_every == 0) return BROKE;
    s->t += 1;
    *reward = (double)*(const int64_t *)action;
    *terminated = s->t >= s->episode_length;
    counting_obs(s, (double *)obs);
    return SEGVEC_ENV_OK;
}

static const double counting_low[4] = {-1e9, -1e9, -1e9, -1e9};
static const double counting_high[4] = {1e9, 1e9, 1e9, 1e9};

static const segvec_env_class_t counting_class = {
    .abi_version = SEGVEC_ENV_ABI_VERSION,
    .name = "counting",
    .obs_dtype = SEGVEC_ENV_FLOAT64,
    .obs_ndim = 1,
    .obs_shape = {4},
    .obs_low = counting_low,
    .obs_high = counting_high,
    .action_kind = SEGVEC_ENV_DISCRETE,
    .action_size = 3,
    .state_bytes = sizeof(counting_t),
    .n_params = 4,
    .param_names = counting_params,
    .param_defaults = counting_defaults,
    .init = counting_init,
    .reset = counting_reset,
    .step = counting_step,
    .error_message = counting_error,
};

SEGVEC_ENV_EXPORT(&counter_class, &counting_class)
