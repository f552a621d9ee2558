/* cartpole.c -- gymnasium's CartPole-v1 in C, bit for bit (registered as "segvec/CartPole-c").
 *
 * The dynamics are gymnasium's classic_control/cartpole.py line for line: the euler integrator on a float64
 * state, the same expressions evaluated in the same order (compiled without contraction into fused
 * multiply-adds), float32 observations, reward 1 per step (0 for steps after a termination), termination
 * past |x| > 2.4 or |theta| > 12 degrees.  Reset draws the state from U(-0.05, 0.05)^4 with the env's
 * generator, which the core seeds as gymnasium seeds np_random; the 500-step time limit (gymnasium's
 * TimeLimit for CartPole-v1) is the class's max_episode_steps, counted by the core.
 */
#include <math.h>

#include "segvec_env.h"

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

#define GRAVITY 9.8
#define MASSCART 1.0
#define MASSPOLE 0.1
#define TOTAL_MASS (MASSPOLE + MASSCART)
#define LENGTH 0.5 /* half the pole's length */
#define POLEMASS_LENGTH (MASSPOLE * LENGTH)
#define FORCE_MAG 10.0
#define TAU 0.02
#define THETA_THRESHOLD (12 * 2 * M_PI / 360)
#define X_THRESHOLD 2.4

typedef struct {
    double x, x_dot, theta, theta_dot;
    int64_t steps_beyond_terminated; /* -1: the pole has not fallen (gymnasium's None) */
} cartpole_t;

static const double obs_high[4] = {X_THRESHOLD * 2, INFINITY, THETA_THRESHOLD * 2, INFINITY};
static const double obs_low[4] = {-(X_THRESHOLD * 2), -INFINITY, -(THETA_THRESHOLD * 2), -INFINITY};

static void write_obs(const cartpole_t *s, float *obs) {
    obs[0] = (float)s->x;
    obs[1] = (float)s->x_dot;
    obs[2] = (float)s->theta;
    obs[3] = (float)s->theta_dot;
}

static int cartpole_reset(void *state, segvec_rng_t *rng, const uint64_t *seed, void *obs_out) {
    cartpole_t *s = (cartpole_t *)state;
    (void)seed;
    /* self.np_random.uniform(low=-0.05, high=0.05, size=(4,)) */
    s->x = segvec_rng_uniform(rng, -0.05, 0.05);
    s->x_dot = segvec_rng_uniform(rng, -0.05, 0.05);
    s->theta = segvec_rng_uniform(rng, -0.05, 0.05);
    s->theta_dot = segvec_rng_uniform(rng, -0.05, 0.05);
    s->steps_beyond_terminated = -1;
    write_obs(s, (float *)obs_out);
    return SEGVEC_ENV_OK;
}

static int cartpole_step(void *state, segvec_rng_t *rng, const void *action, void *obs_out, double *reward,
                         uint8_t *terminated, uint8_t *truncated) {
    cartpole_t *s = (cartpole_t *)state;
    (void)rng;
    (void)truncated;
    double x = s->x, x_dot = s->x_dot, theta = s->theta, theta_dot = s->theta_dot;
    double force = *(const int64_t *)action == 1 ? FORCE_MAG : -FORCE_MAG;
    double costheta = cos(theta);
    double sintheta = sin(theta);
    double temp = (force + POLEMASS_LENGTH * (theta_dot * theta_dot) * sintheta) / TOTAL_MASS;
    double thetaacc = (GRAVITY * sintheta - costheta * temp) /
                      (LENGTH * (4.0 / 3.0 - MASSPOLE * (costheta * costheta) / TOTAL_MASS));
    double xacc = temp - POLEMASS_LENGTH * thetaacc * costheta / TOTAL_MASS;
    x = x + TAU * x_dot;
    x_dot = x_dot + TAU * xacc;
    theta = theta + TAU * theta_dot;
    theta_dot = theta_dot + TAU * thetaacc;
    s->x = x;
    s->x_dot = x_dot;
    s->theta = theta;
    s->theta_dot = theta_dot;
    int fallen = x < -X_THRESHOLD || x > X_THRESHOLD || theta < -THETA_THRESHOLD || theta > THETA_THRESHOLD;
    *terminated = (uint8_t)fallen;
    if (!fallen) {
        *reward = 1.0;
    } else if (s->steps_beyond_terminated < 0) {
        s->steps_beyond_terminated = 0; /* the pole just fell */
        *reward = 1.0;
    } else {
        s->steps_beyond_terminated += 1; /* stepping on after a termination */
        *reward = 0.0;
    }
    write_obs(s, (float *)obs_out);
    return SEGVEC_ENV_OK;
}

const segvec_env_class_t segvec_env_cartpole = {
    .abi_version = SEGVEC_ENV_ABI_VERSION,
    .name = "cartpole",
    .obs_dtype = SEGVEC_ENV_FLOAT32,
    .obs_ndim = 1,
    .obs_shape = {4},
    .obs_low = obs_low,
    .obs_high = obs_high,
    .action_kind = SEGVEC_ENV_DISCRETE,
    .action_size = 2,
    .max_episode_steps = 500,
    .state_bytes = sizeof(cartpole_t),
    .reset = cartpole_reset,
    .step = cartpole_step,
};
