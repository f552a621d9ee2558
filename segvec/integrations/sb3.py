"""Stable-Baselines3 on segvec: `SB3VecEnv` presents a `SegmentVecEnv` as an SB3 ``VecEnv``.

SB3's algorithms (PPO, A2C, ...) then train on segvec's workers unchanged::

    from stable_baselines3 import PPO
    from segvec.integrations.sb3 import make_sb3_vec_env

    env = make_sb3_vec_env("CartPole-v1", num_envs=8, backend="multiprocessing")
    PPO("MlpPolicy", env).learn(10_000)
    env.close()

SB3's vector API differs from gymnasium's in three ways that this adapter translates:

- ``reset()`` returns observations only; per-env reset infos land in ``reset_infos``, and the seeds and
  options of the next reset come from ``seed()`` / ``set_options()``.
- ``step_wait()`` returns ``(obs, rewards, dones, infos)`` with ``dones = terminated | truncated`` and
  ``infos`` a list of one dict per env.  An env whose episode ended was reset in the same step: its ``obs``
  row is the first observation of the next episode, its info carries ``terminal_observation`` (the final
  observation) and, like every info, ``TimeLimit.truncated`` (truncated and not terminated).  That is
  gymnasium's ``AutoresetMode.SAME_STEP``, so the wrapped `SegmentVecEnv` must use it (final observations
  come from ``infos["final_obs"]``, final step infos from ``infos["final_info"]``).
- ``get_attr/set_attr/env_method/env_is_wrapped`` take ``indices`` (None: every env; an int; or an
  iterable of ints) and only touch those envs.

stable_baselines3 is imported by this module only: ``import segvec`` never needs it.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Sequence

import gymnasium
import numpy as np
from gymnasium.vector import AutoresetMode

from segvec.vector import SegmentVecEnv, make_vec

try:
    from stable_baselines3.common.env_util import is_wrapped
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn
except ImportError as error:  # pragma: no cover - exercised only without stable-baselines3
    raise ImportError(
        "segvec.integrations.sb3 needs stable-baselines3 (`pip install stable-baselines3`); "
        "the rest of segvec works without it") from error

# Keys SAME_STEP adds to the infos of an env whose episode ended; never part of an env's own info.
_AUTORESET_KEYS = frozenset({"final_obs", "final_info"})


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python scalar the env most likely returned (batching made it numpy)."""
    return value.item() if isinstance(value, np.generic) else value


def _env_info(infos: dict, index: int, skip: frozenset = frozenset()) -> dict:
    """Env `index`'s info dict out of gymnasium's batched infos (arrays plus ``_key`` masks)."""
    info: dict = {}
    for key, value in infos.items():
        mask = infos.get(f"_{key}") if isinstance(key, str) else None
        if mask is None or key in skip or not mask[index]:
            continue
        info[key] = _env_info(value, index) if isinstance(value, dict) else _plain(value[index])
    return info


class SB3VecEnv(VecEnv):
    """A `SegmentVecEnv` as a stable_baselines3 ``VecEnv`` (see the module docstring for the translation).

    ``observation_space`` and ``action_space`` are the single-env spaces, as SB3 expects.  Rewards come back
    as ``float32 (num_envs,)``, dones as ``bool (num_envs,)``.  ``step_async`` sends the actions to the
    workers at once, so SB3 code that overlaps work with ``step_wait`` gets the overlap.

    Args:
        vec_env: a `SegmentVecEnv` made with ``autoreset_mode=AutoresetMode.SAME_STEP``
            (`make_sb3_vec_env` makes one).  `SB3VecEnv` owns it from now on: ``close()`` closes it.

    Raises:
        TypeError: `vec_env` is not a `SegmentVecEnv`.
        ValueError: its autoreset mode is not SAME_STEP.

    Example:
        >>> import segvec
        >>> from gymnasium.vector import AutoresetMode
        >>> from segvec.integrations.sb3 import SB3VecEnv
        >>> env = SB3VecEnv(segvec.make_vec("CartPole-v1", num_envs=2, backend="serial",
        ...                                 autoreset_mode=AutoresetMode.SAME_STEP))
        >>> _ = env.seed(0)
        >>> env.reset().shape
        (2, 4)
        >>> obs, rewards, dones, infos = env.step(np.array([0, 1]))
        >>> rewards.dtype, dones.shape, sorted(infos[0])
        (dtype('float32'), (2,), ['TimeLimit.truncated'])
        >>> env.get_attr("gravity", indices=[1])
        [9.8]
        >>> env.close()
    """

    vec_env: SegmentVecEnv

    def __init__(self, vec_env: SegmentVecEnv):
        if not isinstance(vec_env, SegmentVecEnv):
            raise TypeError(f"SB3VecEnv wraps a segvec.SegmentVecEnv, got {type(vec_env).__name__}")
        if vec_env.autoreset_mode != AutoresetMode.SAME_STEP:
            raise ValueError(
                f"SB3 resets ended episodes within the same step; make the SegmentVecEnv with "
                f"autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP (it has {vec_env.autoreset_mode}), "
                "or use segvec.integrations.sb3.make_sb3_vec_env")
        self.vec_env = vec_env
        self.num_envs = vec_env.num_envs  # the base constructor reads render_mode through get_attr
        super().__init__(vec_env.num_envs, vec_env.single_observation_space, vec_env.single_action_space)

    # ---- reset and step -------------------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        """Resets every env with the seeds of ``seed()`` and options of ``set_options()`` (used once).

        Returns:
            The first observations ``(num_envs, *obs_shape)`` (Dict/Tuple spaces: dict/tuple of arrays);
            per-env reset infos are in ``reset_infos``.
        """
        seeds = None if all(seed is None for seed in self._seeds) else list(self._seeds)
        groups: dict[int, list[int]] = {}  # envs sharing the same options reset together
        distinct: list[dict] = []
        for index, options in enumerate(self._options):
            for position, seen in enumerate(distinct):
                if seen == options:
                    groups[position].append(index)
                    break
            else:
                groups[len(distinct)] = [index]
                distinct.append(options)
        if len(distinct) == 1:
            obs, infos = self.vec_env.reset(seed=seeds, options=dict(distinct[0]) or None)
            self.reset_infos = [_env_info(infos, i) for i in range(self.num_envs)]
        else:
            for position, options in enumerate(distinct):
                mask = np.zeros(self.num_envs, dtype=np.bool_)
                mask[groups[position]] = True
                obs, infos = self.vec_env.reset(seed=seeds, options={**options, "reset_mask": mask})
                for i in groups[position]:
                    self.reset_infos[i] = _env_info(infos, i)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        """Sends one action per env, ``(num_envs, *action_shape)``."""
        self.vec_env.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        """Waits for `step_async`; returns ``(obs, rewards, dones, infos)`` (see the class docstring)."""
        obs, rewards, terminated, truncated, infos = self.vec_env.step_wait()
        dones = np.logical_or(terminated, truncated)
        ended = infos.get("_final_obs")
        env_infos: list[dict] = []
        for i in range(self.num_envs):
            if ended is not None and ended[i]:
                final_info = infos.get("final_info")
                info = _env_info(final_info, i) if final_info is not None and infos["_final_info"][i] else {}
                info["terminal_observation"] = infos["final_obs"][i]
                self.reset_infos[i] = _env_info(infos, i, _AUTORESET_KEYS)
            else:
                info = _env_info(infos, i, _AUTORESET_KEYS)
            info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            env_infos.append(info)
        return obs, rewards.astype(np.float32), dones, env_infos

    # ---- attributes and methods of the envs -----------------------------------------------------
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """Attribute `attr_name` of the envs `indices`, looked up through their wrappers.

        Raises:
            AttributeError: (as `segvec.EnvError`) an env has no such attribute.
        """
        return list(self.vec_env.call_at(self._get_indices(indices), "get_wrapper_attr", attr_name))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Sets `attr_name` to `value` on the envs `indices`.

        Like gymnasium's vector envs (``set_wrapper_attr``), the attribute is set where it lives in the
        wrapper stack (``set_attr("gravity", 5.0)`` changes the physics of CartPole); a new attribute is
        created on the outermost wrapper, as SB3's own VecEnvs do.
        """
        self.vec_env.call_at(self._get_indices(indices), "set_wrapper_attr", attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        """Calls ``method_name(*method_args, **method_kwargs)`` on the envs `indices`; returns their results."""
        return list(self.vec_env.call_at(self._get_indices(indices), method_name, *method_args, **method_kwargs))

    def env_is_wrapped(self, wrapper_class: type[gymnasium.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        """Whether each env of `indices` has a `wrapper_class` in its wrapper stack (checked where it lives)."""
        return list(self.vec_env.call_at(self._get_indices(indices), is_wrapped, wrapper_class))

    def _get_indices(self, indices: VecEnvIndices) -> Iterable[int]:
        if indices is None:
            return range(self.num_envs)
        if isinstance(indices, (int, np.integer)):
            return [int(indices)]
        return [int(i) for i in indices]

    # ---- rendering and shutdown -----------------------------------------------------------------
    def get_images(self) -> Sequence[np.ndarray | None]:
        """One frame per env when the envs were made with ``render_mode="rgb_array"``, else Nones."""
        if self.render_mode != "rgb_array":
            warnings.warn(f"The render mode is {self.render_mode}, but get_images needs `rgb_array` to obtain images.")
            return [None] * self.num_envs
        return list(self.vec_env.call("render"))

    def close(self) -> None:
        """Closes the `SegmentVecEnv` (its envs, workers and shared memory).  Idempotent."""
        self.vec_env.close()

    def __repr__(self) -> str:
        return f"SB3VecEnv({self.vec_env!r})"


class _MonitoredEnv:
    """A picklable env factory: ``Monitor(gymnasium.make(env_id, **kwargs))`` or ``Monitor(fn())``."""

    def __init__(self, env: str | Callable[[], gymnasium.Env], env_kwargs: dict | None):
        self.env, self.env_kwargs = env, dict(env_kwargs or {})

    def __call__(self) -> gymnasium.Env:
        env = gymnasium.make(self.env, **self.env_kwargs) if isinstance(self.env, str) else self.env()
        return Monitor(env)


def make_sb3_vec_env(env_id_or_fn, num_envs: int = 8, *, monitor: bool = True, **segvec_options) -> SB3VecEnv:
    """Makes a `SegmentVecEnv` in SAME_STEP autoreset mode and wraps it in `SB3VecEnv`.

    Args:
        env_id_or_fn: a gymnasium id, a zero-argument callable returning an env, or a list of such
            callables (one per env), as for `segvec.make_vec`.
        num_envs: number of envs.
        monitor: wrap each env in SB3's ``Monitor`` (as SB3's ``make_vec_env`` does), so that SB3 logs
            episode returns and lengths (``rollout/ep_rew_mean``) and ``evaluate_policy`` finds it.
        **segvec_options: options of `segvec.make_vec` (``backend``, ``num_workers``, ``env_kwargs``,
            ``context``, ...).  ``autoreset_mode`` may be given only as SAME_STEP.

    Raises:
        ValueError: ``autoreset_mode`` other than SAME_STEP, or an invalid segvec option.

    Example:
        >>> from segvec.integrations.sb3 import make_sb3_vec_env
        >>> env = make_sb3_vec_env("CartPole-v1", num_envs=2, backend="serial")
        >>> env.num_envs, env.observation_space.shape
        (2, (4,))
        >>> env.close()
    """
    mode = AutoresetMode(segvec_options.pop("autoreset_mode", AutoresetMode.SAME_STEP))
    if mode != AutoresetMode.SAME_STEP:
        raise ValueError(f"SB3 needs autoreset_mode=AutoresetMode.SAME_STEP, got {mode}")
    if monitor:
        env_kwargs = segvec_options.pop("env_kwargs", None)
        if env_kwargs and not isinstance(env_id_or_fn, str):
            raise ValueError("env_kwargs only applies to a gymnasium id; pass them inside your callable")
        if isinstance(env_id_or_fn, str) or callable(env_id_or_fn):
            env_id_or_fn = _MonitoredEnv(env_id_or_fn, env_kwargs)
        else:
            env_id_or_fn = [_MonitoredEnv(fn, None) for fn in env_id_or_fn]
    vec_env = make_vec(env_id_or_fn, num_envs=num_envs, autoreset_mode=AutoresetMode.SAME_STEP, **segvec_options)
    try:
        return SB3VecEnv(vec_env)
    except BaseException:
        vec_env.close()
        raise
