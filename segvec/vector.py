"""`SegmentVecEnv`: a gymnasium VectorEnv whose envs write straight into shared segment memory.

Three faces over one segment block, and one state machine (`AsyncState`, checked by `_guard`):
  - gymnasium: ``reset/step`` (+ ``*_async/*_wait``, ``call/get_attr/set_attr``), a drop-in VectorEnv;
  - async (EnvPool-style): ``async_reset``, ``recv`` (the first ``batch_size`` ready envs), ``send``;
  - segments: ``take_segments`` -> `SegmentBatch` with bootstrap values, ``flush``, ``stats``.
Where the envs run is the backend's business (``segvec/backends/``); what the learner passes in is checked
by ``checks.py``; infos are batched by ``infos.py``; SAME_STEP truncation bootstraps by ``truncations.py``.
"""
from __future__ import annotations

import enum
import multiprocessing
import time
import warnings
from typing import Any, Callable, Sequence

import gymnasium
import numpy as np
from gymnasium import logger
from gymnasium.spaces import Space
from gymnasium.spaces.utils import is_space_dtype_shape_equiv
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_differing_spaces, batch_space

from segvec import checks
from segvec._core import OUTSTANDING, EnvState, Geometry, check_value_shape
from segvec.backends import BACKENDS
from segvec.errors import (
    AlreadyPendingCallError,
    ClosedEnvironmentError,
    EnvError,
    NoAsyncCallError,
    NotEnoughSegmentsError,
    NotReceivedError,
    SegmentBufferExhausted,
    SpaceMismatchError,
    warn,
)
from segvec.evaluation import Evaluator
from segvec.infos import collect_infos, spread_infos
from segvec.objects import AsGiven, ObjectStore
from segvec.segments import SegmentBatch
from segvec.spaces import SpaceLayout, spaces_equal
from segvec.truncations import TruncationLedger


def _same_shape_and_dtype(a: Space, b: Space) -> bool:
    try:
        return bool(is_space_dtype_shape_equiv(a, b))
    except (TypeError, NotImplementedError, AttributeError):  # spaces gymnasium cannot compare so
        return a == b


class AsyncState(enum.Enum):
    """What the vector env waits for.  Every public method checks it once, through `_guard`."""

    DEFAULT = "default"
    WAITING_RESET = "reset"
    WAITING_STEP = "step"
    WAITING_CALL = "call"
    ASYNC = "async"  # the async face owns the envs (async_reset/recv/send)


IDLE = (AsyncState.DEFAULT, AsyncState.ASYNC)  # no call waits for its *_wait
_NEW = int(EnvState.NEW)  # (an int: numpy compares an IntEnum member with an array far slower)
ERROR_GRACE_S = 2.0  # after an env error, how long reset_wait/step_wait go on collecting the other envs' errors


def _as_env_fns(env, num_envs: int, env_kwargs: dict | None) -> list[Callable]:
    if isinstance(env, (str, gymnasium.envs.registration.EnvSpec)):
        env_id, kwargs = env, dict(env_kwargs or {})
        return [_GymMake(env_id, kwargs) for _ in range(num_envs)]
    if isinstance(env, gymnasium.Env):
        raise TypeError(_ENV_INSTANCE)
    if callable(env):
        if env_kwargs:
            raise ValueError("env_kwargs only applies to a gymnasium id or EnvSpec; pass them inside your callable")
        return [env for _ in range(num_envs)]
    try:
        fns = list(env)
    except TypeError:
        raise TypeError("env must be a gymnasium id, a gymnasium EnvSpec, a callable returning an env, or a list "
                        f"of callables, got {type(env).__name__}") from None
    if len(fns) != num_envs:
        raise ValueError(f"got {len(fns)} env callables for num_envs={num_envs}")
    if any(isinstance(fn, gymnasium.Env) for fn in fns):
        raise TypeError(_ENV_INSTANCE)
    if not all(callable(fn) for fn in fns):
        raise TypeError("env must be a gymnasium id, a gymnasium EnvSpec, a callable returning an env, or a list "
                        "of callables")
    return fns


_ENV_INSTANCE = ("env is an env instance, but each worker builds its own envs: pass a zero-argument callable that "
                 "returns a new env (e.g. `lambda: gymnasium.make(...)`, or your env's class), a gymnasium id "
                 "such as 'CartPole-v1', or an EnvSpec (`env.spec`, or gymnasium.spec('CartPole-v1'))")


class _GymMake:
    """A picklable ``gymnasium.make(env_id, **kwargs)`` (`env_id` a registered id or an ``EnvSpec``)."""

    def __init__(self, env_id, kwargs: dict):
        self.env_id, self.kwargs = env_id, kwargs

    def __call__(self):
        return gymnasium.make(self.env_id, **self.kwargs)


def make_vec(env, num_envs: int = 8, **options) -> "SegmentVecEnv":
    """Makes a `SegmentVecEnv` of `num_envs` copies of `env`.

    Args:
        env: a gymnasium id (``"CartPole-v1"``) or ``EnvSpec`` (``gymnasium.spec(...)``, ``env.spec``), each
            env made with ``gymnasium.make(env, **env_kwargs)``; a zero-argument callable returning an env; or
            a list of such callables (one per env).  Not an env instance (TypeError): workers build their own.
        num_envs: number of envs.
        **options: see `SegmentVecEnv` (``env_kwargs`` applies to a gymnasium id or spec).

    Example:
        >>> import segvec
        >>> envs = segvec.make_vec("CartPole-v1", num_envs=4, backend="serial", horizon=8)
        >>> obs, info = envs.reset(seed=0)
        >>> obs.shape
        (4, 4)
        >>> envs.close()
    """
    env_kwargs = options.pop("env_kwargs", None)
    return SegmentVecEnv(_as_env_fns(env, num_envs, env_kwargs), **options)


def wrap_vector_env(vec_env, **options) -> "SegmentVecEnv":
    """A `SegmentVecEnv` whose envs are the sub-envs of a batched engine that steps them itself.

    The engine (a ``gymnasium.vector.VectorEnv``: ``SyncVectorEnv``, ``AsyncVectorEnv``, ale-py's
    ``AtariVectorEnv``, ...; or an EnvPool env from ``envpool.make_gymnasium``) runs in this process; every
    batch it returns is written into segment rows by the core's bookkeeping, so all three faces work on
    it: ``reset``/``step``, ``async_reset``/``recv``/``send`` and ``take_segments`` with exact bootstraps.

    Args:
        vec_env: the engine.  Its ``single_observation_space``/``single_action_space`` are the envs'; its
            autoreset mode (``metadata["autoreset_mode"]``) is the vector env's.  It is closed with the
            vector env.
        **options: see `SegmentVecEnv`.  ``autoreset_mode`` defaults to the engine's (another raises
            ValueError); ``batch_size`` to the engine's batch (EnvPool's async mode), else ``num_envs``.
            ``num_workers``, ``context`` and ``restart_failed_envs`` do not apply (ValueError).

    Example:
        >>> import gymnasium, segvec
        >>> engine = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make("CartPole-v1")] * 4)
        >>> envs = segvec.wrap_vector_env(engine, horizon=8)
        >>> obs, info = envs.reset(seed=0)
        >>> obs.shape, envs.engine is engine
        ((4, 4), True)
        >>> envs.close()
    """
    from segvec.backends.engine import engine_options

    if options.get("backend", "engine") != "engine":
        raise ValueError(f"wrap_vector_env uses the 'engine' backend, got backend={options['backend']!r}")
    options["backend"] = "engine"
    for key, value in engine_options(vec_env).items():
        if options.get(key) is None:
            options[key] = value
    return SegmentVecEnv(vec_env, **options)


class SegmentVecEnv(VectorEnv):
    """A vectorized env whose envs write observations and outcomes into shared segment rows.

    Args:
        env_fns: one zero-argument callable per env, each returning a gymnasium.Env; with
            ``backend="engine"``, a batched engine (a gymnasium VectorEnv, EnvPool) whose sub-envs are the
            envs (see `wrap_vector_env`).
        backend: ``"serial"`` (envs in this process), ``"multiprocessing"`` (worker processes) or
            ``"engine"`` (the sub-envs of a batched engine, stepped in this process).
        num_workers: worker processes (multiprocessing); default ``min(num_envs, cpu count)`` rounded down
            to a divisor of ``num_envs``.  ``num_envs % num_workers`` must be 0.
        batch_size: envs returned by each ``recv()``; default ``num_envs``.
        horizon: steps per segment row.
        num_segments: rows in the buffer, ``>= 2 * num_envs``; default ``4 * num_envs``.
        autoreset_mode: a gymnasium ``AutoresetMode`` (or its string).
        step_fields: extra per-step learner fields ``{name: (shape, dtype)}``, given to ``send``/``step``.
        segment_fields: per-segment fields stored at a row's first step (e.g. recurrent state).
        value_fn: optional ``obs_batch -> values`` (``[n]``, or ``[n, k]`` with value heads); gives the
            value of final observations of truncated episodes (SAME_STEP) and of the current observations at
            ``flush``.
        value_shape: ``()`` (default): one value per step.  ``(k,)``: k value heads (one per reward stream
            or auxiliary prediction), each bootstrapped by the same rules: ``value``/``next_value``/``reward``
            of segments are ``[n, T, k]``, ``send``/``step`` take ``value=`` of shape ``(n, k)``, the rewards
            that ``step``/``recv`` return are ``(n, k)`` and `segvec.gae` takes one gamma/lam per head.  The
            rewards per head are the env's reward when it is an array of shape ``(k,)`` (head 0 counts in
            the episode statistics), else ``info["rewards"]`` of shape ``(k,)`` when the env's info has it
            (its scalar reward counts), else the scalar reward in every head (native C envs too).
        context: multiprocessing context or start method name (``"fork"``, ``"spawn"``, ``"forkserver"``).
        shared_memory: True (default): every part of both spaces must have a fixed shape and dtype, or
            `SharedMemorySpaceError` (a TypeError and ValueError) is raised.  False: parts with no fixed shape
            (Text, Graph, Sequence, OneOf, user-defined spaces) travel pickled and are kept as Python objects
            in this process; segments hold them as object arrays.  Fixed-size parts always live in shared
            memory.
        copy: accepted for gymnasium's AsyncVectorEnv; observations returned by ``reset``/``step``/``recv``
            are always fresh arrays that no later call overwrites, whatever its value.
        daemon: whether worker processes are daemons (they then cannot start processes of their own).
        worker: gymnasium's custom worker function; not supported (segvec's workers write into segment
            memory): anything but None raises ValueError.
        observation_mode: ``"same"`` (every env has the same observation space), ``"different"`` (spaces
            may differ in bounds but share shapes and dtypes; ``observation_space`` batches them), or a tuple
            ``(observation_space, single_observation_space)`` to set both.
        max_concurrency: at most this many envs step at once (multiprocessing: caps ``num_workers``).
        learner_share: multiprocessing only (else ValueError): worker 0's envs ``[0, num_envs // num_workers)``
            are built and stepped in this process, after each dispatch has woken the worker processes
            1..``num_workers - 1``, which step theirs meanwhile; ``num_workers`` counts this process (W=2: one
            worker process).  For machines with few cores, where the learner would mostly wait.  Everything
            else (faces, seeds, infos, errors, restarts, calls) behaves as with worker processes only.
        restart_failed_envs: rebuild (with its factory) and reset an env that raises in ``step`` instead of
            raising EnvError, and replace a worker that dies.  The new episode starts at the same slot of the
            same row: the transition before it becomes truncated, bootstrapped by the value already sent for
            the observation the env failed on.  The learner sees ``truncated=True``,
            ``info["env_restarted"]`` and ``info["env_error"]``; ``stats()["restarts"]`` counts it.  Off by
            default.
        debug: fill fresh rows' rewards with -42.42 so tests can prove none survives into a segment.
        episode_capacity: entries of the finished-episode record that `episodes` reads; default
            ``max(1024, 4 * num_envs)``.  Episodes not read before that many more finish are lost.

    Reproducibility: in synchronous stepping -- the gymnasium face (``reset``/``step``), or the async face
    when every ``recv`` returns every env sent (``batch_size == num_envs``) and ``send`` sends them all --
    a run depends on the seeds and the learner's calls only, never on how fast the workers are: ``recv``
    returns the envs in env id order, rows are handed out in the order the learner's calls make them, so
    every ``take_segments`` returns the same rows in the same order, and ``episodes`` (called while no env
    is in flight) returns the same episodes in the same order, on every run and on both backends.  In async
    mode (``batch_size < num_envs``, or sends of subsets) which envs a ``recv`` returns, and so the order of
    sends, rows and episodes, follows the workers' timing: each env's own transitions are still exactly
    reproducible given the actions it was sent, but what the learner sees when is not.

    Raises:
        ValueError: invalid sizes, or envs whose spaces differ (`SpaceMismatchError`).
        TypeError: a space that cannot live in shared memory.
        EnvError: an env raised in its constructor.
    """

    metadata: dict
    num_envs: int
    batch_size: int
    horizon: int
    num_segments: int
    num_workers: int
    policy_version: int
    closed: bool
    _recycled_seen: int | None = None  # segments_recycled at the last take (None: nothing taken yet)
    _warned_recycled = False
    _warned_lost = False

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gymnasium.Env]],
        *,
        backend: str = "multiprocessing",
        num_workers: int | None = None,
        batch_size: int | None = None,
        horizon: int = 128,
        num_segments: int | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        step_fields: dict | None = None,
        segment_fields: dict | None = None,
        value_fn: Callable | None = None,
        value_shape: tuple = (),
        context: Any = None,
        restart_failed_envs: bool = False,
        debug: bool = False,
        shared_memory: bool = True,
        copy: bool = True,
        daemon: bool = True,
        worker: Callable | None = None,
        observation_mode: str | tuple = "same",
        max_concurrency: int | None = None,
        episode_capacity: int | None = None,
        learner_share: bool = False,
    ):
        self.closed = True  # until construction succeeds: close() is safe at any point
        self._backend = None
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
        env_fns, num_envs = BACKENDS[backend].source(env_fns)
        self._evaluator = None
        self._eval_fns = env_fns if backend != "engine" else None  # evaluate() builds its envs from these
        if worker is not None:
            raise ValueError("a custom `worker` function is not supported: segvec's workers write observations "
                             "into shared segment memory themselves. Wrap the env instead (gymnasium.Wrapper) to "
                             "change what a step does.")
        checks.observation_mode(observation_mode)
        self.value_shape = check_value_shape(value_shape)
        self.horizon, self.batch_size, self.num_segments = checks.sizes(num_envs, horizon, batch_size, num_segments)
        backend_type = BACKENDS[backend]
        num_workers = checks.max_concurrency(max_concurrency, num_envs, num_workers, backend)
        self.num_envs, self.num_workers = num_envs, backend_type.resolve_num_workers(num_envs, num_workers)
        self.shared_memory, self.copy, self.observation_mode = bool(shared_memory), copy, observation_mode
        self.autoreset_mode = checks.autoreset_mode(autoreset_mode)
        self.backend_name = backend
        self.value_fn = value_fn
        self.policy_version = 0

        self._backend = backend_type(env_fns, self.autoreset_mode, self.num_workers, context, restart_failed_envs,
                                     daemon=daemon, **checks.learner_share(learner_share, backend))
        try:
            env_spaces = self._backend.create_envs()
            self._set_spaces(env_spaces, observation_mode)
            obs_layout = SpaceLayout(self.single_observation_space, "observation")
            if self.shared_memory:
                obs_layout.require_shared_memory()
            geometry = Geometry.make(num_envs, self.num_workers, self.num_segments, self.horizon,
                                     self.single_observation_space, self.single_action_space,
                                     step_fields, segment_fields, poison=debug, episode_capacity=episode_capacity,
                                     value_shape=self.value_shape)
            self._storage = self._backend.attach(geometry)
            try:
                self.metadata = dict(self._backend.env_metadata())
            except EnvError:  # metadata is a courtesy
                self.metadata = {"render_mode": None}
        except BaseException:
            self._backend.close(terminate=True)
            raise
        self.metadata["autoreset_mode"] = self.autoreset_mode
        self.render_mode = self.metadata.get("render_mode")
        storage = self._storage
        if storage.obs_layout.has_objects or storage.action_layout.has_objects:
            storage.objects = ObjectStore(storage.obs_layout, storage.action_layout, self.num_segments, self.horizon,
                                          num_envs)
        self._core = storage.core
        self.engine = getattr(self._backend, "engine", None)  # the batched engine (backend "engine"), else None
        self._state = AsyncState.DEFAULT
        self._pending_reset_ids: np.ndarray | None = None
        self._call_request: tuple | None = None
        self._all_ids = np.arange(num_envs, dtype=np.int32)
        self._undelivered = np.zeros(0, np.int32)  # received from the core during a partial reset of the
        # async face, not returned by recv yet
        self._reset_requested = np.zeros(num_envs, bool)  # reset at least once (for error messages)
        self._episode_cursor = [0]
        self._check_actions = checks.ActionCheck(storage.action_layout)
        self._same_step = self.autoreset_mode == AutoresetMode.SAME_STEP
        self._truncations = TruncationLedger(storage, value_fn)
        self.closed = False

    def _set_spaces(self, env_spaces: list[tuple], mode) -> None:
        """Sets the single and batched spaces from every env's ``(observation_space, action_space)``.

        Raises:
            SpaceMismatchError (a RuntimeError and ValueError): action spaces differ; observation spaces
                differ under ``"same"``, or differ in shape or dtype otherwise.
        """
        n = len(env_spaces)
        first_action = env_spaces[0][1]
        for index, (_, action_space) in enumerate(env_spaces):
            if not spaces_equal(action_space, first_action):
                raise SpaceMismatchError(
                    f"Some environments have an action space different from `{first_action}` (env {index} has "
                    f"{action_space}). In order to batch actions, the action spaces from all environments must be "
                    "equal.")
        obs_spaces = [space for space, _ in env_spaces]
        batched, single = mode if isinstance(mode, tuple) else (None, obs_spaces[0])
        for index, space in enumerate(obs_spaces):
            if mode == "same" and not spaces_equal(space, single):
                raise SpaceMismatchError(
                    "SegmentVecEnv(..., observation_mode='same') however the sub-environments observation spaces "
                    f"are not equivalent. Env {index} has {space}, env 0 has {single}. If this is intentional, "
                    "use `observation_mode='different'` instead.")
            if mode != "same" and not _same_shape_and_dtype(space, single):
                raise SpaceMismatchError(
                    f"SegmentVecEnv(..., observation_mode={mode if isinstance(mode, str) else 'custom spaces'!r}) "
                    f"however the sub-environment's observation spaces do not share a common shape and dtype: "
                    f"env {index} has {space}, the single observation space is {single}.")
        if batched is None:
            batched = batch_space(single, n) if mode == "same" else batch_differing_spaces(obs_spaces)
        self.single_observation_space, self.observation_space = single, batched
        self.single_action_space, self.action_space = first_action, batch_space(first_action, n)

    # ---- the state machine ----------------------------------------------------------------------
    def _guard(self, method: str, waits_for: AsyncState | None = None, any_state: bool = False) -> None:
        """The one check of every public method: the envs are open, and (unless `any_state`) either no
        call is pending (`waits_for` None) or the pending call is the one `method` completes.

        Raises:
            ClosedEnvironmentError: after `close()`.
            AlreadyPendingCallError: `method` starts a call while another waits for its ``*_wait``.
            NoAsyncCallError: `method` completes a call that was not started.
        """
        if self.closed:
            raise ClosedEnvironmentError(f"Trying to operate on `{type(self).__name__}`, after a call to `close()`.")
        if any_state:
            return
        if waits_for is None and self._state not in IDLE:
            raise AlreadyPendingCallError(
                f"Calling `{method}` while waiting for a pending call to `{self._state.value}` to complete.",
                str(self._state.value))
        if waits_for is not None and self._state != waits_for:
            started = {AsyncState.WAITING_RESET: "reset_async", AsyncState.WAITING_STEP: "step_async",
                       AsyncState.WAITING_CALL: "call_async"}[waits_for]
            raise NoAsyncCallError(f"Calling `{method}` without any prior call to `{started}`.", waits_for.value)

    @property
    def _outstanding(self) -> int:
        """Envs reset or sent and not returned yet: the core's env states, and the envs a partial reset of
        the async face received on the way."""
        return self._core.count_envs(OUTSTANDING) + len(self._undelivered)

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    # ---- receiving ------------------------------------------------------------------------------
    def _pop(self, count: int, deadline: float | None) -> np.ndarray:
        """Waits for `count` published envs and receives them (HELD)."""
        self._backend.wait(count, deadline)
        return self._core.pop_ready(count)

    def _pop_all(self, count: int, deadline: float | None) -> None:
        """The gymnasium face's wait: receives the `count` envs of a reset or step.

        An env that raised is FAILED and never publishes: its error is kept and the wait goes on for the
        other envs (at most `ERROR_GRACE_S` more), so that every env error of the call is seen.  The errors
        are then logged as gymnasium's AsyncVectorEnv logs them (``gymnasium.logger.error``: the env, its
        traceback, then "Raising the last exception back to the main process.") and the last is raised; the
        envs published meanwhile are received, those still stepping are received by the next call.
        """
        errors: list[EnvError] = []
        grace_end = None
        while len(errors) < count:
            wait_until = deadline if grace_end is None else min(grace_end, deadline or grace_end)
            try:
                self._backend.wait(count - len(errors), wait_until)
                break
            except EnvError as error:
                errors.append(error)
                grace_end = grace_end or time.monotonic() + ERROR_GRACE_S
            except multiprocessing.TimeoutError:
                if not errors:
                    raise
                break
        self._core.pop_ready(count - len(errors))
        if errors:
            for error in errors:
                source = f"Worker-{error.env_index}" if error.env_index >= 0 else "the engine"
                logger.error("%s", f"Received the following error from {source} - Shutting it down")
                logger.error("%s", error.worker_traceback or str(error))
            logger.error("%s", "Raising the last exception back to the main process.")
            raise errors[-1]

    def _results(self, env_ids: np.ndarray, size: int, deadline: float | None = None):
        """``(obs, rewards, terminations, truncations, infos)`` of received `env_ids`."""
        storage = self._storage
        infos = collect_infos(self._backend, storage, env_ids, size, deadline)  # (first: it brings objects)
        obs = self._current_obs(env_ids)
        select = slice(None) if env_ids is self._all_ids else env_ids  # every env: plain copies
        rewards = storage.env_last_reward[select].astype(np.float64)
        terminated = storage.env_last_terminated[select].copy()
        truncated = storage.env_last_truncated[select].copy()
        if self._same_step:
            self._truncations.note(env_ids)
        return obs, rewards, terminated, truncated, infos

    def _current_obs(self, env_ids: np.ndarray):
        """Each env's current observation (a copy), gathered from its cursor slot by the C core (parts with
        no fixed shape: from the `ObjectStore`, each a tuple over the envs)."""
        storage = self._storage
        if not storage.obs_layout.has_objects:
            return storage.obs_layout.structure(self._core.gather_current(env_ids))
        objects = storage.objects.current(self._core.cursor_slots(env_ids, observation=True))
        return storage.obs_layout.structure(self._core.gather_current(env_ids), objects)

    def _receive_stragglers(self, wait: bool, keep: np.ndarray | None = None) -> None:
        """Receives envs still outstanding from a call the user gave up on (a timeout, an env error, a
        Ctrl-C) and drops their results, so that the next call starts from envs the learner holds.

        With `wait`, waits until none is outstanding in the core; an env error met meanwhile is logged as a
        warning (that env is FAILED and the caller resets it), not raised.  Without, receives those
        published now.  Envs of `keep` (a partial reset of the async face: the envs it does not reset) are
        kept for `recv` to return instead.
        """
        while True:
            outstanding = self._core.count_envs(OUTSTANDING)
            if not outstanding:
                return
            if wait:
                try:
                    self._backend.wait(outstanding, None)
                except EnvError as error:
                    warnings.warn(f"while waiting for envs to finish before a reset: {error}", RuntimeWarning,
                                  stacklevel=3)
                    continue
            ids = self._core.pop_ready(outstanding if wait else self.num_envs)
            kept = ids[np.isin(ids, keep)] if keep is not None else ids[:0]
            dropped = ids[~np.isin(ids, kept)]
            if self._same_step:
                self._truncations.note(dropped)
                self._truncations.note_early(kept)
            collect_infos(self._backend, self._storage, dropped, len(dropped))
            self._undelivered = np.concatenate([self._undelivered, kept])
            if not wait:
                return

    def _received(self, env_ids: np.ndarray, wanted: int, deadline: float | None) -> np.ndarray:
        """The envs `recv` returns of those it received (`wanted` asked for): all of them here; a vector
        env whose envs come in groups (agent slots) completes the groups."""
        return env_ids

    # ---- sending --------------------------------------------------------------------------------
    def _send(self, actions, env_ids: np.ndarray, value=None, logprob=None, fields: dict | None = None) -> None:
        """Checks everything, then writes the send into the core and dispatches it; raises before the core
        changes anything (and rolls the envs back to HELD if writing fails anyway)."""
        storage, core = self._storage, self._core
        count = len(env_ids)
        leaves = self._check_actions(actions, count)
        object_actions = self._object_actions(actions, env_ids) if storage.action_layout.has_objects else None
        if self._check_actions.reshaped:  # the env gets the number as given, as gymnasium's vector envs do
            object_actions = {int(e): AsGiven(actions[i]) for i, e in enumerate(env_ids.tolist())}
        fields = checks.learner_fields(fields or {}, storage, count)
        values = None if value is None else checks.per_env(value, count, "value", self.value_shape)
        logprobs = None if logprob is None else checks.per_env(logprob, count, "logprob")
        try:
            slots, row_start = core.prepare_send(env_ids, values, logprobs, self.policy_version)
        except NotReceivedError:
            self._explain_not_held(env_ids)
            raise
        except SegmentBufferExhausted:
            raise SegmentBufferExhausted(
                f"no free segment row for the envs that start a new row with this step: every row is filling, "
                f"awaiting its bootstrap or taken by the learner ({self.stats()['taken_rows']} taken now). "
                "Release the batches you hold (batch.release(), or take them with `with`) and send again, or "
                "raise num_segments. Nothing was sent.") from None
        try:
            for by_slot, array in zip(storage.action_by_slot, leaves):
                by_slot[slots] = array
            for name, array in fields.items():
                if name in storage.step_fields:
                    storage.step_fields_by_slot[name][slots] = array
                elif row_start.any():
                    starts = row_start.astype(bool)
                    storage.segment_fields[name][storage.env_row[env_ids[starts]]] = array[starts]
            if object_actions is not None:
                if storage.action_layout.has_objects:
                    storage.objects.store_actions(slots, object_actions, env_ids)
                self._backend.send_object_actions(object_actions)
        except BaseException:
            core.cancel_send(env_ids)
            raise
        core.dispatch(env_ids)
        self._backend.after_dispatch()

    def _object_actions(self, actions, env_ids: np.ndarray) -> dict:
        """``{env: [value per object leaf]}`` of a batch of actions (each object leaf a sequence, one per env).

        Raises:
            TypeError: an object leaf is not a sequence of one action per env.
        """
        layout, count = self._storage.action_layout, len(env_ids)
        columns = []
        for path, values in zip(layout.object_paths, layout.flatten_objects(actions)):
            where = f" at {'/'.join(map(str, path))}" if path else ""
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != count:
                raise TypeError(f"actions{where} must be a sequence of {count} actions (one per env), got {values!r}")
            columns.append(list(values))
        return {int(e): [column[i] for column in columns] for i, e in enumerate(env_ids.tolist())}

    def _explain_not_held(self, env_ids: np.ndarray) -> None:
        """Raises NotReceivedError saying why some of `env_ids` cannot be sent to."""
        states = self._storage.env_state[env_ids]
        never = env_ids[(states == EnvState.NEW) & ~self._reset_requested[env_ids]]
        if len(never):
            raise NotReceivedError(f"envs {never.tolist()} were never reset: call reset() (or async_reset() and "
                                   "recv()) before step() or send()")
        failed = env_ids[states == EnvState.FAILED]
        if len(failed):
            raise NotReceivedError(
                f"envs {failed.tolist()} failed (an EnvError was raised for each): reset them before sending "
                "actions, e.g. reset(options={'reset_mask': mask}) or async_reset()")
        unique, counts = np.unique(env_ids, return_counts=True)
        twice = unique[counts > 1]
        if len(twice):
            raise NotReceivedError(f"env(s) {twice.tolist()}: each appears twice in one send")
        raise NotReceivedError(f"envs {env_ids[states != EnvState.HELD].tolist()} were not received since "
                               "their last send (recv() returns the envs you may send to)")

    # ---- gymnasium face -------------------------------------------------------------------------
    def reset(self, *, seed=None, options: dict | None = None):
        """Resets every env (or those of ``options["reset_mask"]``) and returns ``(obs, infos)``.

        Rows in progress of the envs reset are flushed first (closed as partial segments).  An int seed
        gives env i the seed ``seed + i``.  See gymnasium's ``VectorEnv.reset``.
        """
        self.reset_async(seed=seed, options=options)
        return self.reset_wait()

    def reset_async(self, seed=None, options: dict | None = None) -> None:
        """Starts resetting (see `reset`).

        Envs still stepping since a call that raised or timed out (or, on the async face, since their last
        `send`) are waited for first and their results dropped; an env error met meanwhile is a warning.

        Raises:
            AlreadyPendingCallError: a `reset_async`, `step_async` or `call_async` waits for its `*_wait`.
        """
        self._guard("reset_async")
        seeds = checks.seeds(seed, self.num_envs)
        options = dict(options) if options else None
        env_ids = self._all_ids
        if options is not None and "reset_mask" in options:
            env_ids = checks.reset_mask(options.pop("reset_mask"), self.num_envs)
            seeds = [seeds[i] for i in env_ids]
        self._backend.before_reset(env_ids, options)
        partial = len(env_ids) < self.num_envs and self._state == AsyncState.ASYNC
        self._receive_stragglers(wait=True, keep=np.setdiff1d(self._all_ids, env_ids) if partial else None)
        self._undelivered = self._undelivered[~np.isin(self._undelivered, env_ids)]
        self._backend.discard_errors(env_ids)
        self._flush_envs(env_ids)
        self._core.begin_resets(env_ids)
        self._state = AsyncState.WAITING_RESET
        self._pending_reset_ids = env_ids
        self._reset_requested[env_ids] = True
        self._backend.reset(env_ids, seeds, options)

    def reset_wait(self, timeout: float | None = None):
        """Waits for `reset_async` and returns ``(obs, infos)`` for every env.

        Raises:
            NoAsyncCallError: no reset is pending.  multiprocessing.TimeoutError: `timeout` seconds passed.
            EnvError: an env raised in reset (that env is FAILED: reset it again).
        """
        self._guard("reset_wait", AsyncState.WAITING_RESET)
        env_ids = self._pending_reset_ids
        deadline = self._deadline(timeout)
        try:  # whatever happens, the reset is over: envs still resetting are received by the next call
            self._pop_all(len(env_ids), deadline)
        finally:
            self._state = AsyncState.DEFAULT
        infos: dict = {}
        if self._storage.env_has_info[env_ids].any():  # (before the observations: it brings their objects)
            infos = spread_infos(collect_infos(self._backend, self._storage, env_ids, len(env_ids), deadline),
                                 env_ids, self.num_envs)
        return self._current_obs(self._all_ids), infos

    def step(self, actions, **learner_fields):
        """Steps every env; returns ``(obs, rewards, terminations, truncations, infos)`` in env order.

        Accepts the learner fields of `send` (``value=``, ``logprob=``, step/segment fields) so that the
        gymnasium face fills segments with them.  Follows ``autoreset_mode`` like gymnasium's vector envs.
        Rewards are ``(num_envs,)``, or ``(num_envs, k)`` with ``value_shape=(k,)`` (the rewards per head).
        Envs that were never reset are reset first (no seed): an env's first observation starts its row.
        """
        self.step_async(actions, **learner_fields)
        return self.step_wait()

    def step_async(self, actions, **learner_fields) -> None:
        """Sends `actions` for every env.

        Raises:
            AlreadyPendingCallError: a call is pending, envs sent on the async face are in flight, or envs
                still step since a call that raised or timed out (`reset()` waits for those).
            NotReceivedError: an env was never reset, or failed (reset it first).
            SegmentBufferExhausted: the learner holds every row the envs could move to; nothing was sent.
        """
        self._guard("step_async")
        never = (self._storage.env_state == _NEW) & ~self._reset_requested
        if self._state == AsyncState.DEFAULT and never.any():  # as gymnasium's vector envs allow
            self.reset(options={"reset_mask": never})
        if self._state == AsyncState.DEFAULT and self._outstanding:
            self._receive_stragglers(wait=False)
        if self._outstanding:
            raise AlreadyPendingCallError(
                f"Calling `step_async` while {self._outstanding} envs are in flight (sent on the async face, or "
                "still stepping since a call that raised or timed out: reset() waits for them).",
                str(self._state.value))
        value = learner_fields.pop("value", None)
        logprob = learner_fields.pop("logprob", None)
        self._send(actions, self._all_ids, value, logprob, learner_fields)
        self._state = AsyncState.WAITING_STEP

    def step_wait(self, timeout: float | None = None):
        """Waits for `step_async` and returns the results in env order (see `step`).

        Raises:
            NoAsyncCallError: no step is pending.
            multiprocessing.TimeoutError: `timeout` seconds passed (the step stays pending: wait again).
            EnvError: an env raised (that env is FAILED: reset it; the step is over).
        """
        self._guard("step_wait", AsyncState.WAITING_STEP)
        deadline = self._deadline(timeout)
        try:
            self._pop_all(self.num_envs, deadline)
        except multiprocessing.TimeoutError:
            raise  # still pending: step_wait may be called again
        except BaseException:
            self._state = AsyncState.DEFAULT  # the step is over; envs still stepping are received later
            raise
        self._state = AsyncState.DEFAULT
        return self._results(self._all_ids, self.num_envs, deadline)

    def call(self, name: str, *args, **kwargs) -> tuple:
        """Calls `name` (method or attribute) on every env; returns the results in env order."""
        self.call_async(name, *args, **kwargs)
        return self.call_wait()

    def call_async(self, name: str, *args, **kwargs) -> None:
        self._guard("call_async")
        self._call_request = (name, args, kwargs, self._state)
        self._state = AsyncState.WAITING_CALL

    def call_wait(self, timeout: float | None = None) -> tuple:
        self._guard("call_wait", AsyncState.WAITING_CALL)
        name, args, kwargs, previous = self._call_request
        self._state = previous
        return tuple(self._backend.call(name, args, kwargs, timeout=timeout))

    def call_at(self, env_ids, name, *args, **kwargs) -> tuple:
        """Like `call`, on the envs `env_ids` only; returns their results in the order of `env_ids`.

        `name` is a method or attribute name (looked up through wrappers, like `call`), or a picklable
        function, called as ``name(env, *args, **kwargs)`` where the env lives.

        Raises:
            ValueError: an env id outside ``[0, num_envs)``.
            AlreadyPendingCallError: a reset, step or call is pending.
        """
        self._guard("call_at")
        ids = [int(e) for e in np.asarray(env_ids, dtype=np.int64).reshape(-1)]
        if any(e < 0 or e >= self.num_envs for e in ids):
            raise ValueError(f"env_ids must be in [0, {self.num_envs}), got {ids}")
        if not ids:
            return ()
        return tuple(self._backend.call(name, args, kwargs, env_ids=ids))

    def get_attr(self, name: str) -> tuple:
        """Returns attribute `name` of every env."""
        return self.call(name)

    def set_attr(self, name: str, values) -> None:
        """Sets attribute `name` on every env (one value for all, or a list/tuple of one per env)."""
        self._guard("set_attr")
        if not isinstance(values, (list, tuple)):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError("Values must be a list or tuple with length equal to the number of environments. "
                             f"Got `{len(values)}` values for {self.num_envs} environments.")
        self._backend.set_attr(name, list(values))

    def render(self):
        """Returns the frames of every env (``call("render")``)."""
        return self.call("render")

    @property
    def np_random_seed(self) -> tuple:
        """The ``np_random_seed`` of every env (the seed of its last seeded reset), in env order."""
        return self.get_attr("np_random_seed")

    @property
    def np_random(self) -> tuple:
        """The numpy random generator of every env, in env order (copies: the envs live elsewhere)."""
        return self.get_attr("np_random")

    # ---- async face -----------------------------------------------------------------------------
    def async_reset(self, seed=None, options: dict | None = None) -> None:
        """Resets every env without waiting; their first observations come from `recv`.

        Raises:
            ValueError: the autoreset mode is DISABLED (the async face has no way to reset one env).
        """
        self._guard("async_reset")
        if self.autoreset_mode == AutoresetMode.DISABLED:
            raise ValueError("the async face (async_reset/recv/send) needs autoreset: make the envs with "
                             "autoreset_mode NEXT_STEP or SAME_STEP, or use reset()/step() with DISABLED")
        self.reset_async(seed=seed, options=options)
        self._state = AsyncState.ASYNC

    def recv(self, timeout: float | None = None):
        """Returns ``(obs, rewards, terminations, truncations, infos)`` of the first ready envs.

        At most ``batch_size`` envs (fewer only when fewer are outstanding); ``infos["env_id"]`` says which
        envs the rows are.  When they are every env outstanding (always with ``batch_size == num_envs``),
        they come in env id order, so synchronous stepping never depends on the workers' timing; otherwise
        in the order they became ready.  Rewards, terminations and truncations are the outcome of each
        env's previous action (0/False right after a reset); rewards are ``(n,)``, or ``(n, k)`` with
        ``value_shape=(k,)``.

        Raises:
            NoAsyncCallError: nothing is outstanding (call `async_reset` or `send` first).
            EnvError: an env raised (that env is FAILED: reset it; the others go on).
            WorkerDied: a worker died (without restart_failed_envs).
        """
        if self._state == AsyncState.WAITING_RESET and not self.closed:
            self._state = AsyncState.ASYNC  # async_reset's reset completes through recv
        self._guard("recv")
        outstanding = self._outstanding
        if outstanding <= 0:
            self._backend.raise_errors()  # an error of the last envs sent comes first
            raise NoAsyncCallError("Calling `recv` with no env outstanding: call `async_reset` or `send` first.",
                                   AsyncState.ASYNC.value)
        self._state = AsyncState.ASYNC
        deadline = self._deadline(timeout)
        wanted = min(self.batch_size, outstanding)
        if len(self._undelivered):  # envs a partial reset received on the way come first
            env_ids, self._undelivered = self._undelivered[:wanted], self._undelivered[wanted:]
            env_ids = np.concatenate([env_ids, self._core.pop_ready(wanted - len(env_ids))])
        else:
            env_ids = self._pop(wanted, deadline)
        env_ids = self._received(env_ids, wanted, deadline)
        if wanted == outstanding:  # every env outstanding: env order, not the order the workers finished in
            env_ids = np.sort(env_ids)
        obs, rewards, terminated, truncated, infos = self._results(env_ids, len(env_ids), deadline)
        infos["env_id"] = env_ids
        return obs, rewards, terminated, truncated, infos

    def send(self, actions, env_ids, value=None, logprob=None, **fields) -> None:
        """Sends actions for `env_ids` (received by `recv`), with the learner's per-step data.

        Args:
            actions: ``[len(env_ids), *action_shape]`` (structured spaces: their batched structure).
            env_ids: the envs, e.g. ``infos["env_id"]`` of the last `recv`.
            value, logprob: ``[len(env_ids)]`` stored at each env's current step (NaN when omitted); with
                ``value_shape=(k,)``, `value` is ``[len(env_ids), k]`` (one value per head).
            **fields: step and segment fields declared at construction.

        Raises:
            NotReceivedError: an env was not received since its last send, is named twice, or failed
                (reset it first).
            ValueError/TypeError: actions or fields of the wrong shape, dtype or out of the action space.
            SegmentBufferExhausted: the learner holds every row the envs could move to (release batches and
                send again); nothing was sent.
        """
        self._guard("send")
        ids = np.ascontiguousarray(np.asarray(env_ids).reshape(-1), dtype=np.int32)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_envs):
            raise ValueError(f"env_ids must be in [0, {self.num_envs}), got {ids}")
        self._state = AsyncState.ASYNC
        self._send(actions, ids, value, logprob, fields)

    # ---- segments -------------------------------------------------------------------------------
    @property
    def segments_ready(self) -> int:
        """Complete rows not yet taken."""
        self._guard("segments_ready", any_state=True)
        return self._core.complete_rows()

    def take_segments(self, n: int | None = None) -> SegmentBatch:
        """Takes `n` complete rows (the oldest), or all complete rows when `n` is None; never blocks.

        The batch's rows are in buffer order (``batch.rows`` ascending).  In synchronous stepping (see the
        class docstring) which rows complete, where they lie and which a take gets follow the learner's calls
        only, so the batch is the same, row for row, on every run and backend; in async mode it follows the
        workers' timing.

        Complete rows nobody took are recycled when the envs need rows (``stats()["segments_recycled"]``).
        Once the learner has taken segments, the first take after rows were recycled warns (`SegvecWarning`,
        once per vector env): the learner takes fewer rows than the envs complete, and loses the rest.

        Raises:
            ValueError (NotEnoughSegmentsError): `n` is more than `segments_ready`.
        """
        self._guard("take_segments", any_state=True)
        self._check_recycled()
        ready = self.segments_ready
        all_rows = n is None
        if all_rows:
            n = ready
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if n > ready:
            raise NotEnoughSegmentsError(f"take_segments({n}) but only {ready} segments are ready "
                                         f"(the buffer has {self.num_segments} rows)")
        rows = self._core.take(n)
        if rows is None:
            raise NotEnoughSegmentsError(f"take_segments({n}): the complete rows were recycled meanwhile")
        rows.sort()
        return SegmentBatch(self._storage, rows, self.autoreset_mode, self._truncations.take(rows), self._release)

    def _check_recycled(self) -> None:
        """Warns, once, when complete rows were recycled since the learner's previous take."""
        if self._warned_recycled:
            return
        recycled = self._storage.stats()["segments_recycled"]
        seen, self._recycled_seen = self._recycled_seen, recycled
        if seen is not None and recycled > seen:
            self._warned_recycled = True
            warn(f"segvec: complete segments were recycled before the learner took them ({recycled - seen} rows "
                 "since the previous take_segments): the envs complete rows faster than the learner takes them, "
                 "and the steps in those rows are lost to it. Take every complete row (take_segments() takes "
                 "all of them, envs.segments_ready says how many there are), or raise num_segments if they are "
                 "taken late; stats()['segments_recycled'] counts them. This warning comes once; to silence "
                 "it: warnings.filterwarnings('ignore', message='segvec: complete segments were recycled').")

    def _release(self, rows: np.ndarray) -> None:
        if not self.closed:
            self._core.release(rows)

    def flush(self, timeout: float | None = None) -> None:
        """Closes every row in progress as a partial segment, so all stepped data can be taken.

        Waits for envs whose actions are in flight to land first.  The tail bootstrap of a flushed row is
        ``value_fn(current observation)`` when a value_fn is set, else the value already sent (NaN if none).
        """
        self._guard("flush", any_state=True)
        in_core = self._core.count_envs(OUTSTANDING)  # (not the envs a partial reset received on the way)
        if in_core:
            self._backend.wait(in_core, self._deadline(timeout))
        if self._same_step:
            self._truncations.note_landed()
        self._flush_envs(self._all_ids)

    def _flush_envs(self, env_ids: np.ndarray) -> None:
        """Closes the rows in progress of `env_ids` (see segvec_flush_envs); all or nothing.

        Raises:
            SegmentBufferExhausted: the new rows cannot be had (the learner holds the rest).
        """
        storage = self._storage
        tails = None
        if self.value_fn is not None:
            tails = checks.per_env(self.value_fn(self._current_obs(env_ids)), len(env_ids), "value_fn's values",
                                   self.value_shape)
        try:
            copy_from, copy_to = self._core.flush_envs(env_ids, tails)
        except SegmentBufferExhausted:
            raise SegmentBufferExhausted(
                f"no free segment row to start after the rows being closed: every row is filling, awaiting its "
                f"bootstrap or taken by the learner ({self.stats()['taken_rows']} taken now). Release the "
                "batches you hold (batch.release()) and try again, or raise num_segments. Nothing was flushed.") \
                from None
        moved = copy_from >= 0
        if moved.any():
            for by_slot in storage.obs_by_slot:
                by_slot[copy_to[moved]] = by_slot[copy_from[moved]]
            if storage.objects is not None:
                storage.objects.move(copy_from[moved], copy_to[moved])

    def stats(self) -> dict:
        """Counters: steps, episodes, segments_completed, segments_recycled, segments_taken, nan_rewards,
        episodes_written, restarts, complete_rows, free_rows, taken_rows, rolled_back."""
        self._guard("stats", any_state=True)
        return self._storage.stats()

    @property
    def episode_capacity(self) -> int:
        """Entries of the finished-episode record: unread episodes beyond the last this many are lost."""
        return self._storage.geometry.episode_capacity

    def episodes(self, max_n: int | None = None) -> dict:
        """Episodes finished since the last call: ``{"env_id", "return", "length", "end_step"}`` arrays, and
        ``lost``.

        ``end_step`` is how many steps the env had taken (actions it was sent, NEXT_STEP reset steps
        included) when the episode ended.  The episodes come ordered by ``(end_step, env_id)``: in
        synchronous stepping every env has taken as many steps, so that is the order they ended in, the
        same on every run and backend.  At most `max_n` (default: all) are returned; the rest wait for the
        next call (which ones wait then follows the order the workers recorded them in).  The record keeps
        the last ``episode_capacity`` episodes (default ``max(1024, 4 * num_envs)``); older unread ones are
        lost, counted in ``lost`` and reported once by a `SegvecWarning`.
        """
        self._guard("episodes", any_state=True)
        capacity = self.episode_capacity
        if max_n is None:
            max_n = capacity
        if not isinstance(max_n, (int, np.integer)) or isinstance(max_n, bool) or max_n < 0:
            raise ValueError(f"max_n must be None or a non-negative int, got {max_n!r}")
        episodes = self._core.read_episodes(self._episode_cursor, min(int(max_n), capacity))
        order = np.lexsort((episodes["env_id"], episodes["end_step"]))
        for key in ("env_id", "return", "length", "end_step"):
            episodes[key] = episodes[key][order]
        if episodes["lost"] and not self._warned_lost:
            self._warned_lost = True
            warn(f"segvec: {episodes['lost']} finished episodes were lost before episodes() read them: the "
                 f"record keeps the last {capacity} (episode_capacity). Call episodes() more often or pass a "
                 "larger episode_capacity; the 'lost' entry counts them on every call. This warning comes once.")
        return episodes

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self, policy: Callable, num_episodes: int = 10, num_envs: int | None = None,
                 seed: int | None = None, env_fn: Callable[[], gymnasium.Env] | None = None,
                 max_steps: int | None = None, episode_start: bool = False) -> dict:
        """Runs `num_episodes` whole episodes of `policy` on evaluation envs of their own.

        The evaluation envs are separate instances built in this process from the training envs'
        constructors (env ``i`` from the constructor of training env ``i % self.num_envs``), or from
        `env_fn`; they are built on the first call and kept until `close`.  Training is untouched: no
        evaluation step is written into a segment row, no training env is stepped, reset or reseeded, and
        rows in progress stay in progress (nothing is flushed).  So evaluation may come at any point, also
        while actions sent by ``send``/``step_async`` are in flight: training goes on afterwards exactly where
        it was, and a run with evaluations takes the same rows as one without.

        Every call starts fresh episodes: evaluation env ``i`` is reset (with ``seed + i`` when `seed` is an
        int, else unseeded) and then owes ``(num_episodes + i) // num_envs`` whole episodes; only those
        count, so long episodes are not crowded out by short ones.  An env whose episodes are done waits
        (it is not stepped) while the others finish.

        Envs written in C (``segvec/CartPole-c``, `segvec.native`) are evaluated through their gymnasium
        face.  A vector env over a batched engine (`wrap_vector_env`) has no constructor of one env: pass
        `env_fn`.

        Args:
            policy: ``obs -> actions``: `obs` is a batch of ``num_envs`` observations (the batched structure of
                ``single_observation_space``); it returns ``num_envs`` actions (numpy or torch), or a tuple whose
                first item they are (``(actions, values, logprobs)`` policies fit).  Evaluation is the policy's
                business: make it deterministic (e.g. the argmax) if that is what you measure.  It is called
                with the whole batch every step, also for envs already done (their actions are ignored), so
                row i of every call is evaluation env i: a recurrent policy keeps its state per row.
            num_episodes: episodes to run, >= 1.
            num_envs: evaluation envs; default ``min(num_episodes, self.num_envs)``.
            seed: seeds of the evaluation envs' first resets (``seed + i``); the same seed, policy and envs
                give the same episodes.  None: unseeded (the envs' generators go on from where they were).
            env_fn: a zero-argument constructor of one evaluation env, instead of the training envs'.
            max_steps: raise RuntimeError after this many env steps (all envs together) if episodes are still
                running; None: no limit.
            episode_start: True: `policy` is called as ``policy(obs, episode_start)``, ``episode_start``
                ``[num_envs]`` bool True where ``obs[i]`` is the first observation of an episode (where a
                recurrent policy resets its state of env i).

        Returns:
            ``{"return": float64 [num_episodes], "length": int64 [num_episodes], "env_index": int64
            [num_episodes]}``: the episodes of evaluation env 0 in the order they ended, then env 1's, ...

        Raises:
            ValueError: `num_episodes`, `num_envs` or `max_steps` not an int >= 1, no `env_fn` for a vector env over
                a batched engine, or a policy that returns other than ``num_envs`` actions.
            RuntimeError: more than `max_steps` steps.
            EnvError: an evaluation env raised (``env_index`` is its index among the evaluation envs).
            ClosedEnvironmentError: after `close`.

        Example:
            >>> import numpy as np, segvec
            >>> envs = segvec.make_vec("CartPole-v1", num_envs=2, backend="serial", horizon=8)
            >>> result = envs.evaluate(lambda obs: np.zeros(len(obs), np.int64), num_episodes=4, seed=0)
            >>> result["return"].shape, bool((result["return"] == result["length"]).all())
            ((4,), True)
            >>> envs.close()
        """
        self._guard("evaluate", any_state=True)
        for name, number in (("num_episodes", num_episodes), ("num_envs", num_envs), ("max_steps", max_steps)):
            if number is None and name != "num_episodes":
                continue
            if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or number < 1:
                raise ValueError(f"{name} must be an int >= 1, got {number!r}")
        if env_fn is not None:
            if not callable(env_fn) or isinstance(env_fn, gymnasium.Env):
                raise TypeError(f"env_fn must be a zero-argument callable returning an env, got {env_fn!r}")
            fns = [env_fn]
        elif self._eval_fns is None:
            raise ValueError("evaluate() on a vector env over a batched engine (wrap_vector_env) needs "
                             "env_fn=, a zero-argument constructor of one evaluation env: the engine's sub-envs "
                             "are training envs, and segvec cannot build more of them")
        else:
            fns = self._eval_fns
        if self._evaluator is None or self._evaluator.env_fns != fns:
            if self._evaluator is not None:
                self._evaluator.close()
            self._evaluator = Evaluator(fns)
        count = int(num_envs) if num_envs is not None else min(int(num_episodes), self.num_envs)
        return self._evaluator.run(policy, int(num_episodes), count, seed, max_steps, bool(episode_start))

    # ---- shutdown -------------------------------------------------------------------------------
    def close(self, terminate: bool = False, **kwargs) -> None:
        """Closes every env, stops workers and frees shared memory.  Idempotent; safe after errors.

        Closing while a ``reset_async``/``step_async``/``call_async`` waits for its ``*_wait`` warns (a
        UserWarning, as gymnasium's AsyncVectorEnv does) and drops that call.
        """
        if getattr(self, "closed", True) and getattr(self, "_backend", None) is None:
            return
        state = getattr(self, "_state", AsyncState.DEFAULT)
        if not self.closed and state not in IDLE:
            warnings.warn(f"Calling `close` while waiting for a pending call to `{state.value}` to complete.",
                          UserWarning, stacklevel=2)
        self.closed = True
        evaluator, self._evaluator = getattr(self, "_evaluator", None), None
        if evaluator is not None:
            evaluator.close()
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.close(terminate=terminate)

    def __del__(self):
        try:
            self.close(terminate=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return (f"SegmentVecEnv({self.backend_name}, num_envs={self.num_envs}, batch_size={self.batch_size}, "
                f"horizon={self.horizon}, num_segments={self.num_segments})")
