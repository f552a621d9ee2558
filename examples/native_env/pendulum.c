/* pendulum.c -- a template for an env written in C: gymnasium's Pendulum-v1.
 *
 * What a C env is (native/segvec_env.h has the whole ABI):
 *   1. a struct of plain data, the state of one env (no pointers: segvec copies it with memcpy);
 *   2. reset / step functions (and optionally init, which reads the named parameters);
 *   3. a constant segvec_env_class_t that declares the spaces, the state size, the time limit, the
 *      parameters and the functions;
 *   4. SEGVEC_ENV_EXPORT(&class, ...) once per module, so that Python finds the classes by name.
 * pendulum.py next to this file builds it (segvec.native.build), wraps it (a NativeEnv subclass) and gives
 * it a gymnasium id.  segvec then steps a whole batch of these envs in one C call.
 *
 * Porting a gymnasium env exactly means computing what numpy computes: the same expressions in the same
 * order, the same libm functions, and numpy's type promotion -- here the torque is a float32, and numpy 2
 * keeps `python float * float32` in float32.  Observations and terminations here are Pendulum-v1's bit for
 * bit; rewards agree to about 1e-10, as numpy's own `x ** 2` (a vectorized power) may differ from the
 * exact square in the last bit.
 */
#include <math.h>

#include "segvec_env.h"

#define PI 3.14159265358979323846 /* numpy's np.pi (M_PI is not ISO C) */
#define MAX_SPEED 8.0
#define MAX_TORQUE 2.0
#define DT 0.05
#define MASS 1.0
#define LENGTH 1.0

/* 1. The state of one env: plain data, zeroed before init. */
typedef struct {
    double g;           /* gravity: a parameter (PendulumEnv(g=9.81)) */
    double th, thdot;   /* angle and angular velocity (float64, as gymnasium keeps them) */
} pendulum_t;

/* 2. The functions.  Each returns SEGVEC_ENV_OK, or a status > 0 of its own (see error_message). */
enum { BAD_GRAVITY = 1 };

static const char *pendulum_error(int status) {
    return status == BAD_GRAVITY ? "g must be a finite number" : 0;
}

/* init: once per env, with the parameters in the order of param_names (defaults filled in by Python). */
static int pendulum_init(void *state, const double *params) {
    pendulum_t *s = (pendulum_t *)state;
    s->g = params[0];
    return isfinite(s->g) ? SEGVEC_ENV_OK : BAD_GRAVITY;
}

static void write_obs(const pendulum_t *s, float *obs) {
    obs[0] = (float)cos(s->th);
    obs[1] = (float)sin(s->th);
    obs[2] = (float)s->thdot;
}

/* reset: the core has seeded `rng` already when the reset has a seed (`seed` says which, or NULL), exactly
 * as gymnasium seeds np_random; segvec_rng_uniform is np_random.uniform, draw for draw. */
static int pendulum_reset(void *state, segvec_rng_t *rng, const uint64_t *seed, void *obs_out) {
    pendulum_t *s = (pendulum_t *)state;
    (void)seed;
    s->th = segvec_rng_uniform(rng, -PI, PI); /* np_random.uniform(low=-[pi, 1], high=[pi, 1]) */
    s->thdot = segvec_rng_uniform(rng, -1.0, 1.0);
    write_obs(s, (float *)obs_out);
    return SEGVEC_ENV_OK;
}

/* numpy's float64 remainder (the sign of the divisor, as Python's %) */
static double remainder_like_numpy(double a, double b) {
    double mod = fmod(a, b);
    if (mod != 0.0) {
        if ((b < 0) != (mod < 0)) mod += b;
    } else {
        mod = copysign(0.0, b);
    }
    return mod;
}

static double angle_normalize(double x) { return remainder_like_numpy(x + PI, 2 * PI) - PI; }

/* step: the action is a Box(-2, 2, (1,), float32): `action` points to 1 float (not clipped by segvec).
 * *reward, *terminated, *truncated start at 0; Pendulum never terminates, and the 200-step time limit is
 * the class's max_episode_steps (the core counts it and sets *truncated). */
static int pendulum_step(void *state, segvec_rng_t *rng, const void *action, void *obs_out, double *reward,
                         uint8_t *terminated, uint8_t *truncated) {
    pendulum_t *s = (pendulum_t *)state;
    (void)rng;
    (void)terminated;
    (void)truncated;
    float u = ((const float *)action)[0]; /* np.clip(u, -2.0, 2.0)[0]: a float32 */
    if (u < (float)-MAX_TORQUE) u = (float)-MAX_TORQUE;
    if (u > (float)MAX_TORQUE) u = (float)MAX_TORQUE;
    double th = s->th, thdot = s->thdot;
    /* costs = angle_normalize(th) ** 2 + 0.1 * thdot**2 + 0.001 * (u**2); the last term in float32 */
    double angle = angle_normalize(th);
    float torque_cost = 0.001f * (u * u);
    double costs = angle * angle + 0.1 * (thdot * thdot) + (double)torque_cost;
    /* newthdot = thdot + (3 * g / (2 * l) * np.sin(th) + 3.0 / (m * l**2) * u) * dt; `3.0 * u` in float32 */
    float torque_term = (float)(3.0 / (MASS * (LENGTH * LENGTH))) * u;
    double newthdot = thdot + (3 * s->g / (2 * LENGTH) * sin(th) + (double)torque_term) * DT;
    newthdot = newthdot < -MAX_SPEED ? -MAX_SPEED : newthdot > MAX_SPEED ? MAX_SPEED : newthdot;
    s->th = th + newthdot * DT;
    s->thdot = newthdot;
    *reward = -costs;
    write_obs(s, (float *)obs_out);
    return SEGVEC_ENV_OK;
}

/* 3. The class. */
static const double obs_low[3] = {-1.0, -1.0, -MAX_SPEED};
static const double obs_high[3] = {1.0, 1.0, MAX_SPEED};
static const float action_low[1] = {(float)-MAX_TORQUE};
static const float action_high[1] = {(float)MAX_TORQUE};
static const char *const param_names[] = {"g"};
static const double param_defaults[] = {10.0};

static const segvec_env_class_t pendulum_class = {
    .abi_version = SEGVEC_ENV_ABI_VERSION,
    .name = "pendulum",                    /* module.env_class("pendulum") in Python */
    .obs_dtype = SEGVEC_ENV_FLOAT32,       /* Box(obs_low, obs_high, (3,), float32) */
    .obs_ndim = 1,
    .obs_shape = {3},
    .obs_low = obs_low,
    .obs_high = obs_high,
    .action_kind = SEGVEC_ENV_BOX,         /* Box(action_low, action_high, (1,), float32) */
    .action_size = 1,
    .action_low = action_low,
    .action_high = action_high,
    .max_episode_steps = 200,              /* truncation after 200 steps (0: none), counted by the core */
    .state_bytes = sizeof(pendulum_t),
    .n_params = 1,
    .param_names = param_names,
    .param_defaults = param_defaults,
    .init = pendulum_init,
    .reset = pendulum_reset,
    .step = pendulum_step,
    .error_message = pendulum_error,
};

/* 4. The module's classes. */
SEGVEC_ENV_EXPORT(&pendulum_class)
