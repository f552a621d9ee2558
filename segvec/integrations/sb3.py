"""Stable-Baselines3 on segvec: `SB3VecEnv` presents a `SegmentVecEnv` as an SB3 ``VecEnv``.

SB3's algorithms (PPO, A2C, ...) then train on segvec's workers unchanged::

    from stable_baselines3 import PPO
    from segvec.integrations.sb3 import make_sb3_vec_env

    env = make_sb3_vec_env("CartPole-v1", num_envs=8, backend="multiprocessing")
    PPO("MlpPolicy", env).learn(10_000)
    env.close()

`SB3VecEnv` also takes env factories the way SB3's ``SubprocVecEnv`` does, so SB3's own helpers build it::

    from stable_baselines3.common.env_util import make_vec_env
    from segvec.integrations.sb3 import SB3VecEnv

    env = make_vec_env("CartPole-v1", n_envs=8, vec_env_cls=SB3VecEnv, vec_env_kwargs={"num_workers": 2})

SB3's vector API differs from gymnasium's in these ways, which this adapter translates:

- ``reset()`` returns observations only; per-env reset infos land in ``reset_infos``, and the seeds and
  options of the next reset come from ``seed()`` / ``set_options()``.
- ``step_wait()`` returns ``(obs, rewards, dones, infos)`` with ``dones = terminated | truncated`` and
  ``infos`` a list of one dict per env.  An env whose episode ended was reset in the same step: its ``obs``
  row is the first observation of the next episode, its info carries ``terminal_observation`` (the final
  observation) and, like every info, ``TimeLimit.truncated`` (truncated and not terminated).  That is
  gymnasium's ``AutoresetMode.SAME_STEP``, so the wrapped `SegmentVecEnv` must use it (final observations
  come from ``infos["final_obs"]``, final step infos from ``infos["final_info"]``).
- ``step_async()`` takes actions for Dict/Tuple action spaces either batched (a dict/tuple of arrays with
  one row per env, gymnasium's layout) or as one action per env (a list of dicts/tuples, SB3's layout).
- ``get_attr/set_attr/env_method/env_is_wrapped`` take ``indices`` (None: every env; an int; or an
  iterable of ints), indexing the envs like a Python list (``-1`` is the last env; an index out of range
  raises IndexError), and touch only those envs.  Attributes are read and methods found through the
  wrappers (gymnasium's ``get_wrapper_attr``); ``set_attr`` sets the attribute on the outermost wrapper of
  each env, as SB3's own VecEnvs do.

stable_baselines3 is imported by this module only: ``import segvec`` never needs it.
"""
from __future__ import annotations

import multiprocessing
import operator
import os
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from segvec import checks
from segvec.backends.base import call_env
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


def _same_step_mode(segvec_options: dict) -> None:
    """Checks that ``segvec_options`` asks for SAME_STEP autoreset, if for any mode, and drops the option.

    Raises:
        ValueError: an ``autoreset_mode`` other than SAME_STEP (or not a mode at all).
    """
    mode = checks.autoreset_mode(segvec_options.pop("autoreset_mode", AutoresetMode.SAME_STEP))
    if mode != AutoresetMode.SAME_STEP:
        raise ValueError(f"SB3 needs autoreset_mode=AutoresetMode.SAME_STEP, got {mode}")


def _single_head(value_shape) -> None:
    """SB3 trains one value per step: ValueError for value heads (``value_shape`` other than ``()``)."""
    if tuple(value_shape) != ():
        raise ValueError(f"SB3 trains one value head: SB3VecEnv needs value_shape=() (the default), got "
                         f"value_shape={tuple(value_shape)}; train several heads on the segment face "
                         "(take_segments and segvec.gae with one gamma and lam per head)")


def _env_identity(env: gymnasium.Env) -> tuple[int, int]:
    """``(process id, id of the innermost env)``: equal for two envs only if they are one object."""
    return os.getpid(), id(getattr(env, "unwrapped", env))


# Leaf spaces whose batch is one array; a batch of any other leaf space is a tuple, as in gymnasium.
_ARRAY_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def _is_batch(actions: Any, space: spaces.Space) -> bool:
    """Whether `actions` has the batched layout of `space`: the space's dict/tuple nesting with an array
    (anything but a tuple or a mapping) at every Box/Discrete/MultiDiscrete/MultiBinary leaf.  One action
    per env does not have it: for a Dict space it is not a mapping; for a Tuple space it has a tuple (one
    env's action) where the batch has an array."""
    if isinstance(space, spaces.Dict):
        return isinstance(actions, Mapping) and all(
            key in actions and _is_batch(actions[key], sub) for key, sub in space.spaces.items())
    if isinstance(space, spaces.Tuple):
        return isinstance(actions, (tuple, list)) and len(actions) == len(space.spaces) and all(
            _is_batch(part, sub) for part, sub in zip(actions, space.spaces))
    return not isinstance(actions, (tuple, Mapping)) if isinstance(space, _ARRAY_SPACES) else True


def _stack(actions: Sequence[Any], space: spaces.Space) -> Any:
    """One action per env (dicts/tuples nested like `space`) in the batched layout: the same nesting with
    one array per Box/Discrete/MultiDiscrete/MultiBinary leaf (a tuple of the values for other leaves)."""
    if isinstance(space, spaces.Dict):
        return {key: _stack([action[key] for action in actions], sub) for key, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(_stack([action[i] for action in actions], sub) for i, sub in enumerate(space.spaces))
    if isinstance(space, _ARRAY_SPACES):
        return np.stack([np.asarray(action) for action in actions])
    return tuple(actions)


class SB3VecEnv(VecEnv):
    """A `SegmentVecEnv` as a stable_baselines3 ``VecEnv`` (see the module docstring for the translation).

    Made either like SB3's ``SubprocVecEnv``, from one env factory per env (so that SB3's ``make_vec_env``
    can build it through ``vec_env_cls=SB3VecEnv``), or around a `SegmentVecEnv` made beforehand.

    ``observation_space`` and ``action_space`` are the single-env spaces, as SB3 expects.  Rewards come back
    as ``float32 (num_envs,)``, dones as ``bool (num_envs,)``.  ``step_async`` sends the actions to the
    workers at once, so SB3 code that overlaps work with ``step_wait`` gets the overlap.

    Like SB3's ``DummyVecEnv``, it refuses factories that return one and the same env object (``lambda:
    env``) instead of a new env per call: after the envs are built, two envs that are one object in the
    process that holds them (the learner's for the serial backend, a worker's for multiprocessing) raise
    ValueError.  A worker process holds its own copy of such an env, so envs alone in their worker pass.

    `SB3VecEnv` owns the `SegmentVecEnv` it made or was given: ``close()`` closes it.  If the constructor
    raises, a `SegmentVecEnv` it made is closed; one it was given is left to the caller.

    Args:
        env_fns: one zero-argument callable per env, each returning a new gymnasium env (SB3's
            ``env_fns``); or a `SegmentVecEnv` made with ``autoreset_mode=AutoresetMode.SAME_STEP``
            (`make_sb3_vec_env` makes one), to be given alone.
        start_method: with `env_fns`, the multiprocessing start method of the workers (``"fork"``,
            ``"spawn"``, ``"forkserver"``), segvec's ``context`` option; None leaves segvec's default (the
            platform's default start method).
        vec_env: the `SegmentVecEnv` to wrap, as a keyword (same as passing it as `env_fns`).
        **segvec_options: with `env_fns`, options of `SegmentVecEnv` (``backend``, default
            ``"multiprocessing"``; ``num_workers``, ``horizon``, ...).  ``autoreset_mode`` may be given only
            as SAME_STEP.

    Raises:
        TypeError: neither a list of callables nor a `SegmentVecEnv`; a `SegmentVecEnv` with other arguments;
            both `start_method` and ``context``; an unknown segvec option.
        ValueError: the autoreset mode is not SAME_STEP; value heads (``value_shape`` other than ``()``: SB3
            trains one value); an unknown `start_method`; factories that returned the same env object; an
            invalid segvec option.
        EnvError: an env raised while being built.

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
        >>> env.get_attr("gravity", indices=[-1])
        [9.8]
        >>> env.close()
        >>> env = SB3VecEnv([lambda: gymnasium.make("CartPole-v1")] * 2, backend="serial", horizon=8)
        >>> env.num_envs, env.observation_space.shape
        (2, (4,))
        >>> env.close()
    """

    vec_env: SegmentVecEnv

    def __init__(self, env_fns: Sequence[Callable[[], gymnasium.Env]] | SegmentVecEnv | None = None,
                 start_method: str | None = None, *, vec_env: SegmentVecEnv | None = None, **segvec_options):
        if isinstance(env_fns, SegmentVecEnv):
            if vec_env is not None:
                raise TypeError("SB3VecEnv takes one SegmentVecEnv, got two")
            env_fns, vec_env = None, env_fns
        if vec_env is not None:
            if env_fns is not None or start_method is not None or segvec_options:
                raise TypeError("SB3VecEnv(vec_env) takes no other arguments: the SegmentVecEnv is made already")
            if not isinstance(vec_env, SegmentVecEnv):
                raise TypeError(f"SB3VecEnv wraps a segvec.SegmentVecEnv, got {type(vec_env).__name__}")
            if vec_env.autoreset_mode != AutoresetMode.SAME_STEP:
                raise ValueError(
                    f"SB3 resets ended episodes within the same step; make the SegmentVecEnv with "
                    f"autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP (it has {vec_env.autoreset_mode}), "
                    "or use segvec.integrations.sb3.make_sb3_vec_env")
            _single_head(vec_env.value_shape)
            owned = False
        else:
            vec_env, owned = self._make(env_fns, start_method, segvec_options), True
        try:
            self.vec_env = vec_env
            self._check_distinct_envs()
            self.num_envs = vec_env.num_envs  # the base constructor reads render_mode through get_attr
            super().__init__(vec_env.num_envs, vec_env.single_observation_space, vec_env.single_action_space)
        except BaseException:
            if owned:
                vec_env.close()
            raise

    @staticmethod
    def _make(env_fns, start_method: str | None, segvec_options: dict) -> SegmentVecEnv:
        """The SAME_STEP `SegmentVecEnv` of `env_fns` (see the constructor)."""
        if env_fns is None:
            raise TypeError("SB3VecEnv needs env_fns (one env factory per env) or a segvec.SegmentVecEnv")
        _single_head(segvec_options.get("value_shape", ()))
        if isinstance(env_fns, (str, bytes, Mapping)):
            fns = None
        else:
            try:
                fns = list(env_fns)
            except TypeError:
                fns = None
        if fns is None or not all(callable(fn) for fn in fns):
            raise TypeError("SB3VecEnv takes a list of env factories (zero-argument callables returning an env) "
                            f"or a segvec.SegmentVecEnv, got {type(env_fns).__name__}")
        _same_step_mode(segvec_options)
        if start_method is not None:
            if "context" in segvec_options:
                raise TypeError("give the workers' start method once: start_method or context, not both")
            multiprocessing.get_context(start_method)  # an unknown method raises ValueError here, as in SB3
            segvec_options["context"] = start_method
        return SegmentVecEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP, **segvec_options)

    def _check_distinct_envs(self) -> None:
        """Raises ValueError if two envs are one object in the process that holds them.

        A worker process started by spawn or forkserver imports this module (and stable_baselines3) to run
        the check, unless it holds a single env: then there is nothing to check.
        """
        vec_env = self.vec_env
        if vec_env.backend_name == "multiprocessing" and vec_env.num_workers == vec_env.num_envs:
            return  # one env per worker process: no two can be the same object
        envs_of: dict[tuple, list[int]] = {}
        for index, identity in enumerate(vec_env.call_at(range(vec_env.num_envs), _env_identity)):
            envs_of.setdefault(identity, []).append(index)
        shared = [indices for indices in envs_of.values() if len(indices) > 1]
        if shared:
            raise ValueError(
                f"envs {shared[0]} are one and the same env object: each env factory must build a new env on "
                "every call (e.g. `lambda: gymnasium.make(env_id)`), not return an env made beforehand "
                "(`lambda: env`), which the vectorized envs would then all step at once")

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

    def step_async(self, actions: Any) -> None:
        """Sends one action per env.

        Args:
            actions: ``(num_envs, *action_shape)`` (or a list of one action per env).  For a Dict or Tuple
                action space either the batched layout, a dict/tuple of such arrays (nested like the space),
                or SB3's, a list of one dict/tuple per env (as ``[action_space.sample() for _ in envs]``).
                The batched layout is recognised first; one env's action of a Tuple space is a tuple.

        Raises:
            ValueError: for a Dict or Tuple action space, actions in neither layout (say one action too
                many); actions of the wrong shape or out of the action space.  Nothing was sent.
            TypeError: actions of a dtype the action space cannot take.  Nothing was sent.
        """
        space = self.action_space
        if isinstance(space, (spaces.Dict, spaces.Tuple)) and not _is_batch(actions, space):
            per_env = None
            if not isinstance(actions, (Mapping, str, bytes)):
                try:
                    per_env = list(actions)
                except TypeError:
                    pass
            if per_env is None or len(per_env) != self.num_envs:
                got = f"{len(per_env)} actions" if per_env is not None else type(actions).__name__
                raise ValueError(f"actions for the {type(space).__name__} action space must be batched (nested "
                                 f"like the space, one row per env) or a list of one action per env "
                                 f"({self.num_envs}); got {got}")
            try:
                actions = _stack(per_env, space)
            except (KeyError, IndexError, TypeError, ValueError) as error:
                raise ValueError(f"actions for the {type(space).__name__} action space: the {self.num_envs} "
                                 f"per-env actions do not all fit the space {space} ({error!r})") from error
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
        """Attribute `attr_name` of the envs `indices`, in that order, looked up through their wrappers
        (``env.get_wrapper_attr(attr_name)``: the outermost wrapper that has it, else the env below).

        Raises:
            IndexError: an index out of range.
            AttributeError: (as `segvec.EnvError`) an env has no such attribute.
        """
        return list(self.vec_env.call_at(self._get_indices(indices), "get_wrapper_attr", attr_name))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Sets `attr_name` to `value` on the outermost wrapper of the envs `indices` (``setattr(env, ...)``).

        As with SB3's own VecEnvs, an attribute of an env under its wrappers is not changed: ``get_attr``
        then finds the wrapper's.  To change it where it lives (say CartPole's ``gravity`` under ``Monitor``
        and ``TimeLimit``), call ``env_method("set_wrapper_attr", name, value)``.

        Raises:
            IndexError: an index out of range.
        """
        self.vec_env.call_at(self._get_indices(indices), setattr, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        """Calls ``method_name(*method_args, **method_kwargs)`` on the envs `indices`; returns their results
        in that order.  The method is looked up through the wrappers, like `get_attr` (a `method_name` that
        is an attribute but not callable gives its value).

        Raises:
            IndexError: an index out of range.
            AttributeError: (as `segvec.EnvError`) an env has no such method; an error the method raised
                comes as `segvec.EnvError` of the same type.
        """
        return list(self.vec_env.call_at(self._get_indices(indices), call_env, method_name, method_args,
                                         method_kwargs))

    def env_is_wrapped(self, wrapper_class: type[gymnasium.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        """Whether each env of `indices` has a `wrapper_class` in its wrapper stack (checked where it lives).

        Raises:
            IndexError: an index out of range.
        """
        return list(self.vec_env.call_at(self._get_indices(indices), is_wrapped, wrapper_class))

    def _get_indices(self, indices: VecEnvIndices) -> list[int]:
        """The env indices `indices` stands for, as non-negative ints in the order given.

        None stands for every env; an int (or numpy integer) for that env; an iterable for its items.  Each
        index means what it means for a Python list of the envs: ``-1`` is the last env.

        Raises:
            IndexError: an index outside ``[-num_envs, num_envs)``.
            TypeError: an index that is not an integer.
        """
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, (int, np.integer)):
            indices = [indices]
        resolved = []
        for index in indices:
            position = operator.index(index)
            if not -self.num_envs <= position < self.num_envs:
                raise IndexError(f"env index {position} is out of range for {self.num_envs} envs")
            resolved.append(position % self.num_envs)
        return resolved

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
        ValueError: ``autoreset_mode`` other than SAME_STEP, factories that return one and the same env
            object (see `SB3VecEnv`), or an invalid segvec option.

    Example:
        >>> from segvec.integrations.sb3 import make_sb3_vec_env
        >>> env = make_sb3_vec_env("CartPole-v1", num_envs=2, backend="serial")
        >>> env.num_envs, env.observation_space.shape
        (2, (4,))
        >>> env.close()
    """
    _same_step_mode(segvec_options)
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
