"""Adapters that let other RL libraries train on segvec.

Each lives in its own module and imports its library only when that module is imported, so segvec never
depends on them:

- `segvec.integrations.sb3`: ``SB3VecEnv`` / ``make_sb3_vec_env``, a stable_baselines3 ``VecEnv``.
"""
