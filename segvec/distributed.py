"""Scale-out on Ray: rollout runners as Ray actors, complete segment rows through Ray's object store.

Data flow of one row::

    runner actor: SegmentVecEnv + policy copy -> complete rows -> Ray object store -> learner take_segments

Each runner is a Ray actor (`RayRollouts.runners`) that builds its own `segvec.SegmentVecEnv` (serial or
multiprocessing on its host), keeps its own copy of the policy and steps its envs on CPU.  The learner asks
each runner for chunks of ``rows_per_call`` complete rows; a chunk travels as the return value of one actor
call, so Ray stores it in the object store of the runner's node and the learner's ``ray.get`` maps it (numpy
arrays of 100 KiB and more come back as read-only views of the object store, smaller ones inlined).  Rows
carry the `segvec.SegmentBatch` fields plus ``runner_id`` and ``incarnation`` (which life of the runner
produced them, see below).

Backpressure: a runner has at most ``max_rows_ahead`` rows produced for the learner and not yet taken by it
(rows in calls in flight plus rows waiting at the learner); calls are issued only within that bound, and a
runner between calls does not step its envs.  So memory and staleness are bounded: a row is acted on by
weights that were current when its call was issued, at most ``ceil(max_rows_ahead / rows_per_call)`` calls
before the learner takes it.

Staleness: every step carries the ``policy_version`` of the weights that acted (`update_policy` sets it);
with ``max_policy_lag`` given, rows whose oldest step is more than that many versions older than the
learner's current version are DROPPED (never handed out) and counted in ``stats()["rows_dropped_stale"]``.
Rows within the lag are corrected by the learner with V-trace (``segvec.gae(batch, gamma, lam, rho_clip,
c_clip, target_logprob=...)``, ``batch.logprob`` being the behaviour log-probability).

Faults: runners are created with Ray actor restarts (``max_restarts``).  A runner that dies loses only the
rows it had not shipped (a chunk is one object: it arrives whole or not at all); Ray restarts the actor, and
the learner gives the new life a new ``incarnation`` whose envs are reset with seeds of their own, so no
transition is ever delivered twice.  ``stats()`` counts ``runner_restarts``, ``calls_lost`` and the rows
dropped.  An env that raises inside a runner reaches the learner as `segvec.EnvError` naming the runner and
the env, with the traceback of the env's process.

This is the only module of segvec that imports ``ray`` (``pip install "segvec[ray]"``).
"""
from __future__ import annotations

import collections
import functools
import re
import sys
import time
import uuid
from typing import Any, Callable

import numpy as np
import ray

from segvec.errors import ClosedEnvironmentError, EnvError, SegvecError, WorkerDied, make_env_error

__all__ = ["RayRollouts", "RolloutBatch", "RunnerError"]

# Counters of a runner's SegmentVecEnv.stats() that RayRollouts.stats() sums over runners.
_SUMMED = ("steps", "episodes", "segments_completed", "segments_recycled", "segments_taken", "nan_rewards",
           "restarts")


class RunnerError(SegvecError):
    """A runner failed other than by an env error: its policy raised, or it died more often than
    ``max_restarts`` allows.  The message names the runner and carries the runner's traceback.

    Attributes:
        runner_id: which runner.
    """

    def __init__(self, message: str, runner_id: int = -1):
        super().__init__(message)
        self.runner_id = runner_id


def _map(value: Any, fn: Callable) -> Any:
    """Applies `fn` to every leaf of a (dict/tuple-nested) value."""
    if isinstance(value, dict):
        return {key: _map(item, fn) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_map(item, fn) for item in value)
    return fn(value)


def _leaves(value: Any) -> list:
    """The arrays of a (dict/tuple-nested) value, in order."""
    out: list = []
    _map(value, out.append)
    return out


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy array of a policy output (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class _Failure:
    """What a runner returns instead of rows when one of its envs raised (kept picklable: the learner rebuilds
    the `EnvError` with `make_env_error`)."""

    def __init__(self, runner_id: int, error: EnvError | WorkerDied):
        self.runner_id = runner_id
        self.env_index = getattr(error, "env_index", -1)
        self.message = BaseException.__str__(error)
        self.traceback = getattr(error, "worker_traceback", "")
        self.died = isinstance(error, WorkerDied)
        original = getattr(error, "original_type", type(error))
        self.type_module, self.type_name = original.__module__, original.__qualname__

    def original_type(self) -> type:
        """The env's exception type when the learner can import it, else Exception."""
        module = sys.modules.get(self.type_module)
        found = getattr(module, self.type_name, None) if module is not None else None
        return found if isinstance(found, type) and issubclass(found, BaseException) else Exception


class _Runner:
    """The body of a runner actor: one `SegmentVecEnv` and one copy of the policy.

    Only the learner's `RayRollouts` calls it, one call at a time (the actor's default concurrency).
    """

    def __init__(self, runner_id: int, env: Any, num_envs: int, policy: Callable, horizon: int, seed: int | None,
                 num_runners: int, vec_options: dict):
        import segvec

        self.runner_id = runner_id
        self.life = uuid.uuid4().hex  # this process's life; a restarted actor gets a new one
        self.num_envs, self.num_runners, self.seed = num_envs, num_runners, seed
        self.make_envs = functools.partial(segvec.make_vec, env, num_envs=num_envs, horizon=horizon, **vec_options)
        self.envs = self.make_envs()
        self.policy = policy()
        self.torch_module = self._is_torch_module(self.policy)
        self.version = 0
        self.incarnation: int | None = None

    @staticmethod
    def _is_torch_module(policy) -> bool:
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(policy, torch.nn.Module)

    def _act(self, obs) -> tuple:
        """Runs the policy on a batch of observations: ``(actions, values, logprobs, fields)`` as numpy."""
        if self.torch_module:
            import torch

            with torch.no_grad():
                out = self.policy(_map(obs, torch.as_tensor))
        else:
            out = self.policy(obs)
        if not isinstance(out, tuple) or len(out) not in (3, 4):
            raise TypeError(f"the policy must return (actions, values, logprobs) or (actions, values, logprobs, "
                            f"step_fields_dict), got {type(out).__name__}"
                            + (f" of length {len(out)}" if isinstance(out, tuple) else ""))
        actions, values, logprobs = (_to_numpy(x) for x in out[:3])
        fields = {name: _to_numpy(x) for name, x in (out[3] if len(out) == 4 else {}).items()}
        return actions, values, logprobs, fields

    def _load(self, weights: list | None, version: int) -> None:
        if version == self.version or weights is None:
            self.version = version
            return
        state = ray.get(weights[0])
        if state is not None:
            if not hasattr(self.policy, "load_state_dict"):
                raise TypeError(f"update_policy gave weights, but the policy ({type(self.policy).__name__}) has no "
                                "load_state_dict method; give it one, or pass state_dict=None")
            self.policy.load_state_dict(state)
        self.version = version

    def collect(self, rows: int, incarnation: int, weights: list | None, version: int):
        """Steps the envs until `rows` rows are complete and returns them (a dict of arrays), or a `_Failure`.

        A first call with a new `incarnation` resets every env with the seeds of that incarnation.
        """
        envs = self.envs
        try:
            self._load(weights, version)
            envs.policy_version = self.version
            if incarnation != self.incarnation:
                if self.incarnation is not None:  # (this life ran calls of an older one: start afresh)
                    envs.close(terminate=True)
                    envs = self.envs = self.make_envs()
                self.incarnation = incarnation
                seed = None
                if self.seed is not None:
                    seed = self.seed + (incarnation * self.num_runners + self.runner_id) * self.num_envs
                envs.async_reset(seed=seed)
            while envs.segments_ready < rows:
                obs, _, _, _, info = envs.recv()
                actions, values, logprobs, fields = self._act(obs)
                envs.send(actions, info["env_id"], value=values, logprob=logprobs, **fields)
        except (EnvError, WorkerDied) as error:
            return _Failure(self.runner_id, error)
        batch = envs.take_segments(rows)
        try:
            observations, positions = batch.final_obs
            if len(positions):  # SAME_STEP truncations: this runner's policy values their final observations
                batch.set_truncation_values(self._act(observations)[1])
            data = batch.numpy(batch.fields())
            # The rows go back to the envs when this call returns: views of the block are copied now, once.
            data = {name: _map(value, np.array) if batch.zero_copy else value for name, value in data.items()}
        finally:
            batch.release()
        data["runner_id"] = np.full(rows, self.runner_id, np.int32)
        data["incarnation"] = np.full(rows, incarnation, np.int32)
        return {"rows": data, "life": self.life, "runner_id": self.runner_id, "incarnation": incarnation,
                "stats": envs.stats(), "episodes": envs.episodes()}

    def info(self) -> dict:
        """Where this runner runs and how far it got: ``{"runner_id", "life", "pid", "host", "env_pids",
        "stats"}`` (``env_pids``: the worker processes of a multiprocessing backend; ``stats``: its vector
        env's ``stats()`` now, None once closed)."""
        import multiprocessing
        import os
        import socket

        return {"runner_id": self.runner_id, "life": self.life, "pid": os.getpid(), "host": socket.gethostname(),
                "env_pids": [child.pid for child in multiprocessing.active_children()],
                "stats": None if self.envs.closed else self.envs.stats()}

    def close(self) -> None:
        self.envs.close(terminate=True)


class RolloutBatch:
    """Complete rows fetched from runners: the fields of a `segvec.SegmentBatch` as numpy arrays, plus
    ``runner_id`` and ``incarnation``.

    Attributes:
        obs: ``[n, T + 1, *obs_shape]`` (dict/tuple of arrays for structured spaces).
        action, value, logprob, reward, terminated, truncated, next_value, episode_start, mask,
            policy_version: ``[n, T]`` (``next_value`` exact: 0 where terminated, the value of the final
            observation where truncated, ``value[t + 1]`` inside the row, the runner's value of the env's next
            observation at the tail).
        length, env_id, start_step: ``[n]``; ``env_id`` is the env's index inside its runner and
            ``start_step`` counts from the runner's incarnation's reset.
        runner_id, incarnation: ``[n]`` int32, which runner and which life of it produced the row.
        Every step field and segment field is an attribute of the same name.

    Fields are read-only views of Ray's object store when the rows come from one chunk and Ray maps them
    (large arrays), else numpy arrays of their own.  `segvec.gae` accepts the batch as it is.
    """

    def __init__(self, fields: dict):
        self._fields = fields
        self._released = False

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._released:
            raise RuntimeError(f"RolloutBatch.{name} used after release()")
        try:
            return self._fields[name]
        except KeyError:
            raise AttributeError(f"RolloutBatch has no field {name!r}") from None

    def __len__(self) -> int:
        return len(self._fields["length"])

    def __repr__(self) -> str:
        return f"RolloutBatch({len(self)} rows)"

    def fields(self) -> list[str]:
        """Names of every array attribute."""
        return list(self._fields)

    def numpy(self, fields=None) -> dict:
        """The fields (all when `fields` is None) as a dict of arrays."""
        names = self.fields() if fields is None else list(fields)
        return {name: getattr(self, name) for name in names}

    def to_torch(self, device=None, non_blocking: bool = True, fields=None):
        """The fields as torch tensors (a `segvec.TorchSegments`): copies of the read-only object-store views,
        on `device` (default CPU)."""
        import torch

        from segvec.torch_utils import TorchSegments

        def tensor(array):
            return torch.tensor(array).to(device, non_blocking=non_blocking) if device is not None \
                else torch.tensor(array)

        return TorchSegments({name: _map(value, tensor) for name, value in self.numpy(fields).items()})

    def release(self) -> None:
        """Drops the batch's references to the object store (idempotent); using the batch afterwards raises."""
        self._released = True
        self._fields = {}

    def __enter__(self) -> "RolloutBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _take_rows(fields: dict, index) -> dict:
    """Rows `index` (a slice keeps views, an index array copies) of every field."""
    return {name: _map(value, lambda array: array[index]) for name, value in fields.items()}


def _concatenate(chunks: list[dict]) -> dict:
    """One dict of fields from several (rows stacked)."""
    if len(chunks) == 1:
        return chunks[0]
    first = chunks[0]

    def stack(path_values):
        return np.concatenate(path_values, axis=0)

    out = {}
    for name, value in first.items():
        if isinstance(value, (dict, tuple)):
            leaves = [_leaves(chunk[name]) for chunk in chunks]
            stacked = iter([stack([leaf[i] for leaf in leaves]) for i in range(len(leaves[0]))])
            out[name] = _map(value, lambda _: next(stacked))
        else:
            out[name] = stack([chunk[name] for chunk in chunks])
    return out


class RayRollouts:
    """Rollout runners as Ray actors; the learner takes complete segment rows from all of them.

    Args:
        env: what `segvec.make_vec` accepts (a gymnasium id, a zero-argument factory, or a list of
            `envs_per_runner` factories); every runner builds its envs from it.
        num_runners: runner actors.
        envs_per_runner: envs of each runner's `SegmentVecEnv`.
        policy: a picklable zero-argument factory; what it returns maps a batch of observations
            (``[k, *obs_shape]``) to ``(actions, values, logprobs)`` or ``(actions, values, logprobs,
            step_fields_dict)``, each ``[k, ...]`` (a torch module, called under ``torch.no_grad`` on tensors,
            or a plain callable, called on numpy arrays).  It must have ``load_state_dict`` to take weights
            from `update_policy`.
        horizon: steps per row.
        backend: each runner's segvec backend, ``"serial"`` (in the actor's process) or ``"multiprocessing"``.
        seed: env i of runner r gets the seed ``seed + (incarnation * num_runners + r) * envs_per_runner + i``
            (incarnation 0 until the runner restarts); None: fresh entropy.
        rows_per_call: rows a runner ships per call (one object in the store); default `envs_per_runner`.
        max_rows_ahead: per runner, the most rows produced (in calls in flight or waiting at the learner)
            and not yet taken; a multiple of `rows_per_call`, default ``2 * rows_per_call``.
        max_policy_lag: rows acted on (at any step) by a version older than ``policy_version -
            max_policy_lag`` are dropped when they arrive or are taken, and counted; None keeps every row.
        max_restarts: Ray restarts of each runner actor (finite); one more death raises `RunnerError`.
        runner_resources: Ray resource options of each runner actor, e.g. ``{"num_cpus": 2}`` (default
            ``{"num_cpus": 1}``); reserve what a multiprocessing backend's workers use.
        address: the Ray cluster to connect to when Ray is not initialized yet (None: ``ray.init()``'s own
            choice, a new local cluster when none runs).
        **vec_options: further keywords of `segvec.make_vec` for each runner (``num_workers``,
            ``batch_size``, ``autoreset_mode``, ``step_fields``, ...).

    Attributes:
        runners: the runner actor handles, by runner id.
        policy_version: the version of the weights last given to `update_policy` (0 at first).

    Raises:
        ValueError: a size out of range.

    Example:
        >>> import ray
        >>> ray.init(address="local", num_cpus=1, include_dashboard=False)  # doctest: +SKIP
        >>> def make_policy():
        ...     return lambda obs: (np.zeros(len(obs), np.int64), np.zeros(len(obs)), np.zeros(len(obs)))
        >>> rollouts = RayRollouts("CartPole-v1", num_runners=1, envs_per_runner=2, policy=make_policy,
        ...                        horizon=16)  # doctest: +SKIP
        >>> rollouts.take_segments(2).reward.shape  # doctest: +SKIP
        (2, 16)
        >>> rollouts.close()  # doctest: +SKIP
    """

    runners: list
    policy_version: int

    def __init__(self, env: Any, num_runners: int, envs_per_runner: int, policy: Callable, horizon: int = 128,
                 backend: str = "serial", seed: int | None = 0, rows_per_call: int | None = None,
                 max_rows_ahead: int | None = None, max_policy_lag: int | None = None, max_restarts: int = 3,
                 runner_resources: dict | None = None, address: str | None = None, **vec_options):
        self.closed = True  # until construction succeeds: close() is safe at any point
        self.runners = []
        for name, value in (("num_runners", num_runners), ("envs_per_runner", envs_per_runner),
                            ("horizon", horizon)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not callable(policy):
            raise TypeError(f"policy must be a zero-argument factory of the policy, got {type(policy).__name__}")
        rows_per_call = envs_per_runner if rows_per_call is None else rows_per_call
        if isinstance(rows_per_call, bool) or not isinstance(rows_per_call, (int, np.integer)) or rows_per_call < 1:
            raise ValueError(f"rows_per_call must be an int >= 1, got {rows_per_call!r}")
        max_rows_ahead = 2 * rows_per_call if max_rows_ahead is None else max_rows_ahead
        if (isinstance(max_rows_ahead, bool) or not isinstance(max_rows_ahead, (int, np.integer))
                or max_rows_ahead < rows_per_call or max_rows_ahead % rows_per_call):
            raise ValueError(f"max_rows_ahead must be a positive multiple of rows_per_call={rows_per_call}, "
                             f"got {max_rows_ahead!r}")
        if max_policy_lag is not None and (isinstance(max_policy_lag, bool) or not isinstance(
                max_policy_lag, (int, np.integer)) or max_policy_lag < 0):
            raise ValueError(f"max_policy_lag must be None or an int >= 0, got {max_policy_lag!r}")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, (int, np.integer)) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0 (a finite number), got {max_restarts!r}")
        if backend not in ("serial", "multiprocessing"):
            raise ValueError(f"backend must be 'serial' or 'multiprocessing', got {backend!r}")
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False)
        self.num_runners, self.envs_per_runner, self.horizon = int(num_runners), int(envs_per_runner), int(horizon)
        self.rows_per_call, self.max_rows_ahead = int(rows_per_call), int(max_rows_ahead)
        self.max_policy_lag, self.max_restarts = max_policy_lag, int(max_restarts)
        self.policy_version = 0
        self._weights: list | None = None  # [ObjectRef] of the latest state dict
        self._inflight: dict = {}  # ObjectRef -> (runner id, incarnation it was issued for)
        self._calls = [0] * self.num_runners  # calls in flight, by runner
        self._incarnation = [0] * self.num_runners  # bumped by every death and every env error
        self._deaths = [0] * self.num_runners
        self._lives: list[dict] = [{} for _ in range(self.num_runners)]  # incarnation -> life that shipped it
        self._runner_stats: dict = {}  # (runner id, life) -> the last stats() it shipped
        self._episodes: list[dict] = []
        self._queue: collections.deque = collections.deque()  # chunks of fields, oldest first
        self._queued = [0] * self.num_runners  # rows waiting at the learner, by runner
        self._counts = dict.fromkeys(("rows_received", "rows_taken", "rows_dropped_stale", "rows_dropped_restart",
                                      "runner_restarts", "calls_lost", "env_errors"), 0)
        resources = {"num_cpus": 1} if runner_resources is None else dict(runner_resources)
        actor = ray.remote(_Runner).options(max_restarts=self.max_restarts, max_task_retries=0, **resources)
        vec_options = {"backend": backend, **vec_options}
        self.closed = False
        self.runners = [actor.remote(r, env, self.envs_per_runner, policy, self.horizon, seed, self.num_runners,
                                     vec_options) for r in range(self.num_runners)]

    # ---- issuing calls --------------------------------------------------------------------------------
    def _guard(self, method: str) -> None:
        if self.closed:
            raise ClosedEnvironmentError(f"RayRollouts.{method}() after close()")

    def _refill(self) -> None:
        """Issues calls to every runner while its rows ahead stay within ``max_rows_ahead``."""
        per_call = self.rows_per_call
        weights, version = self._weights, self.policy_version
        for r, runner in enumerate(self.runners):
            while self._queued[r] + (self._calls[r] + 1) * per_call <= self.max_rows_ahead:
                ref = runner.collect.remote(per_call, self._incarnation[r], weights, version)
                self._inflight[ref] = (r, self._incarnation[r])
                self._calls[r] += 1

    def _restarted(self, r: int, incarnation: int) -> None:
        """Runner `r`'s life that ran `incarnation` is gone: the next calls start a new incarnation."""
        if incarnation != self._incarnation[r]:
            return  # (already counted)
        self._incarnation[r] += 1
        self._deaths[r] += 1
        self._counts["runner_restarts"] += 1
        if self._deaths[r] > self.max_restarts:
            raise RunnerError(f"runner {r} died {self._deaths[r]} times, more than max_restarts="
                              f"{self.max_restarts}", runner_id=r)

    # ---- receiving rows -------------------------------------------------------------------------------
    def _receive(self, ref) -> None:
        """Fetches one finished call and queues its rows (or raises the error it brought)."""
        r, incarnation = self._inflight.pop(ref)
        self._calls[r] -= 1
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as error:  # the policy (or the runner's code) raised
            raise RunnerError(f"runner {r} raised: {error}", runner_id=r) from error
        except ray.exceptions.RayActorError:  # the actor died during the call: its rows never left it
            self._counts["calls_lost"] += 1
            self._restarted(r, incarnation)
            return
        if isinstance(result, _Failure):
            # The runner's next call starts a new incarnation: its envs rebuilt and reset with fresh seeds.
            self._incarnation[r] += 1
            self._counts["env_errors"] += 1
            raise self._env_error(result)
        rows = result["rows"]
        n = len(rows["length"])
        self._counts["rows_received"] += n
        self._runner_stats[(r, result["life"])] = result["stats"]
        self._episodes.append({**result["episodes"], "runner_id": np.full(len(result["episodes"]["env_id"]), r,
                                                                          np.int32)})
        shipped_by = self._lives[r].setdefault(incarnation, result["life"])
        if shipped_by != result["life"]:
            # A new life of the runner ran calls issued for an incarnation an earlier life had shipped rows
            # of: the same seeds, so the same transitions again.  Dropped; the next calls start a new one.
            self._counts["rows_dropped_restart"] += n
            self._restarted(r, incarnation)
            return
        rows = self._fresh(rows)
        if len(rows["length"]):
            self._queue.append(rows)
            self._count_queued(rows, +1)

    def _env_error(self, failure: _Failure) -> Exception:
        r = failure.runner_id
        if failure.died:
            return RunnerError(f"runner {r}: {failure.message}", runner_id=r)
        match = re.match(r"env (-?\d+) raised in (\w+): (.*)", failure.message, re.DOTALL)
        action, detail = (match.group(2), match.group(3)) if match else ("a step", failure.message)
        return make_env_error(failure.original_type(), failure.env_index, action, failure.traceback, detail=detail,
                              source=f"runner {r}, env {failure.env_index}")

    def _fresh(self, rows: dict) -> dict:
        """`rows` without those older than ``max_policy_lag`` (counted); the same dict when none is."""
        if self.max_policy_lag is None:
            return rows
        oldest = rows["policy_version"].min(axis=1)
        keep = oldest >= self.policy_version - self.max_policy_lag
        if keep.all():
            return rows
        self._counts["rows_dropped_stale"] += int((~keep).sum())
        return _take_rows(rows, np.flatnonzero(keep))

    def _poll(self, timeout: float | None) -> bool:
        """Receives every finished call, waiting up to `timeout` seconds (None: forever) for the first one.
        Returns False when nothing finished in time."""
        self._refill()
        if not self._inflight:
            return False
        refs = list(self._inflight)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready:
            return False
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            self._receive(ref)
        return True

    # ---- the learner's face ---------------------------------------------------------------------------
    @property
    def segments_ready(self) -> int:
        """Rows waiting at the learner (finished calls are received first, without waiting)."""
        self._guard("segments_ready")
        self._poll(0)
        return sum(self._queued)

    def take_segments(self, n: int, timeout: float | None = None) -> RolloutBatch:
        """Takes `n` complete rows (oldest first, from any runners), waiting for them to arrive.

        The rows are zero-copy views of the object store when they come from one chunk (Ray maps large
        arrays), else one concatenation.  Rows older than ``max_policy_lag`` versions are dropped, never
        returned.

        Args:
            n: rows, >= 1 (more than ``num_runners * max_rows_ahead`` can never be ready at once: ValueError).
            timeout: seconds to wait at most (None: no limit).

        Raises:
            ValueError: `n` out of range.
            TimeoutError: `n` rows did not arrive within `timeout`.
            segvec.EnvError: an env of a runner raised (the message names runner and env; the env's traceback
                is in ``worker_traceback``).
            RunnerError: a policy raised in a runner, or a runner died more than ``max_restarts`` times.
            gymnasium.error.ClosedEnvironmentError: after `close`.
        """
        self._guard("take_segments")
        limit = self.num_runners * self.max_rows_ahead
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
            raise ValueError(f"n must be an int in [1, num_runners * max_rows_ahead = {limit}], got {n!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        self._poll(0)
        while True:
            self._drop_stale_queued()
            if sum(self._queued) >= n:
                break
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._poll(remaining) and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"take_segments({n}): {sum(self._queued)} rows arrived within {timeout} s")
        chunks, needed = [], n
        while needed:
            chunk = self._queue[0]
            count = len(chunk["length"])
            if count <= needed:
                chunks.append(self._queue.popleft())
            else:
                chunks.append(_take_rows(chunk, slice(0, needed)))
                self._queue[0] = _take_rows(chunk, slice(needed, None))
                count = needed
            self._count_queued(chunks[-1], -1)
            needed -= count
        self._counts["rows_taken"] += n
        self._refill()
        return RolloutBatch(_concatenate(chunks))

    def _drop_stale_queued(self) -> None:
        """Applies ``max_policy_lag`` to the rows waiting (the learner's version may have moved on)."""
        if self.max_policy_lag is None or not self._queue:
            return
        self._queue = collections.deque(chunk for chunk in map(self._fresh, self._queue) if len(chunk["length"]))
        self._queued = [0] * self.num_runners
        for chunk in self._queue:
            self._count_queued(chunk, +1)

    def _count_queued(self, chunk: dict, sign: int) -> None:
        """Adds (`sign` +1) or removes (-1) the rows of `chunk` to the per-runner count of rows waiting."""
        for r, rows in zip(*np.unique(chunk["runner_id"], return_counts=True)):
            self._queued[int(r)] += sign * int(rows)

    def update_policy(self, state_dict: Any, version: int) -> None:
        """Gives every runner new weights: one ``ray.put``, fetched by each runner (once per node's object
        store) at its next call.  Steps acted on by them carry `version` in ``policy_version``.  Calls already
        in flight finish with the weights they were issued with.  The first calls go out at the first
        `take_segments` (or `segments_ready`, `stats`, `episodes`): weights given before that, e.g. the
        learner's initial ones, act from the very first step.

        Args:
            state_dict: what the policy's ``load_state_dict`` takes (None: only the version changes).
            version: an int >= the current `policy_version`.

        Raises:
            ValueError: `version` goes backwards.  ClosedEnvironmentError: after `close`.
        """
        self._guard("update_policy")
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < self.policy_version:
            raise ValueError(f"version must be an int >= the current policy_version {self.policy_version}, "
                             f"got {version!r}")
        self._weights = None if state_dict is None else [ray.put(state_dict)]
        self.policy_version = int(version)

    def stats(self) -> dict:
        """Counters over every runner and the learner.

        Sums of the runners' `SegmentVecEnv.stats` (every life of every runner, as of its last shipped call):
        ``steps, episodes, segments_completed, segments_recycled, segments_taken, nan_rewards, restarts``.
        The learner's: ``rows_received`` (rows that reached it) ``= rows_taken + rows_queued +
        rows_dropped_stale + rows_dropped_restart``; ``runner_restarts`` (runner lives lost), ``calls_lost``
        (calls that died with their runner: their rows never left it), ``env_errors`` (errors raised from
        runners' envs), ``calls_in_flight``, ``policy_version``.
        """
        self._guard("stats")
        self._poll(0)
        out = dict.fromkeys(_SUMMED, 0)
        for snapshot in self._runner_stats.values():
            for key in _SUMMED:
                out[key] += int(snapshot.get(key, 0))
        out.update(self._counts)
        out.update(rows_queued=sum(self._queued), calls_in_flight=len(self._inflight),
                   policy_version=self.policy_version)
        return out

    def episodes(self) -> dict:
        """Episodes finished in every runner since the last call (as far as shipped rows report them):
        ``{"runner_id", "env_id", "return", "length", "end_step"}`` arrays and ``lost``."""
        self._guard("episodes")
        self._poll(0)
        records, self._episodes = self._episodes, []
        keys = ("runner_id", "env_id", "return", "length", "end_step")
        out = {key: np.concatenate([record[key] for record in records]) if records else np.zeros(0)
               for key in keys}
        out["lost"] = sum(int(record["lost"]) for record in records)
        return out

    def close(self, timeout: float = 30.0) -> None:
        """Closes every runner's envs (their workers and shared memory), kills the runner actors (no restart) and
        waits up to `timeout` seconds for them to be gone; idempotent."""
        if self.closed:
            return
        self.closed = True
        self._inflight.clear()
        self._queue.clear()
        closing = []
        for runner in self.runners:
            try:
                closing.append(runner.close.remote())
            except Exception:  # noqa: BLE001 - a dead actor: nothing to close
                pass
        if closing:
            try:
                ray.wait(closing, num_returns=len(closing), timeout=timeout)
            except Exception:  # noqa: BLE001 - dead actors are killed below all the same
                pass
        for runner in self.runners:
            try:
                ray.kill(runner, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        deadline = time.monotonic() + timeout
        for runner in self.runners:  # ray.kill is asynchronous: return once every actor is gone
            while time.monotonic() < deadline:
                try:
                    ray.get(runner.info.remote(), timeout=max(0.1, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - RayActorError: gone (or unreachable until the deadline)
                    break
                time.sleep(0.05)

    def __enter__(self) -> "RayRollouts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return (f"RayRollouts({self.num_runners} runners x {self.envs_per_runner} envs, horizon={self.horizon}, "
                f"policy_version={self.policy_version}{', closed' if self.closed else ''})")

