"""Test envs whose whole behaviour follows from their seed, and the plain references the tests compare to.

Everything is module-level so that worker processes (any start method) can pickle the factories.

- `DictEnv`: Dict observations, random episode lengths that end in termination, truncation or both, and a
  non-empty info dict on some steps and resets.
- `CounterEnv`: a Box observation that encodes ``(env index, episode, step, noise)``, so every transition
  says where it comes from; random episode lengths, terminations and truncations.
- `policy` / `value_of`: a deterministic policy and value function of the observation (batched or single).
- `reference_slots`: the plain sequential loop that segvec must reproduce, slot for slot.
- `reference_gae`: plain Python GAE, row by row (V-trace weights when given).
"""
from __future__ import annotations

import dataclasses
import functools

import gymnasium
import numpy as np
from gymnasium import spaces


class DictEnv(gymnasium.Env):
    """Dict observations; episodes of 1..`max_length` steps ending in terminated, truncated or both.

    Infos: ``reset`` sometimes returns ``{"start": int}``; ``step`` sometimes returns
    ``{"bonus": float, "tag": np.ndarray}`` and always ``{"ended": True}`` on the last step of an episode.
    """

    metadata = {"render_modes": []}

    def __init__(self, max_length: int = 12):
        self.max_length = max_length
        self.observation_space = spaces.Dict({
            "position": spaces.Box(-100.0, 100.0, (3,), np.float32),
            "count": spaces.Discrete(1000),
            "flags": spaces.MultiBinary(2),
        })
        self.action_space = spaces.Discrete(3)
        self.speed = 1.0  # an attribute for get_attr/set_attr tests

    def _obs(self):
        return {
            "position": self._position.astype(np.float32),
            "count": np.int64(self._t),
            "flags": np.array([self._t % 2, self._episode % 2], np.int8),
        }

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._episode = getattr(self, "_episode", -1) + 1
        self._t = 0
        self._length = int(self.np_random.integers(1, self.max_length + 1))
        self._ending = int(self.np_random.integers(0, 3))  # 0 terminated, 1 truncated, 2 both
        self._position = self.np_random.uniform(-1, 1, 3)
        info = {}
        if self.np_random.random() < 0.3:
            info["start"] = int(self.np_random.integers(0, 100))
        return self._obs(), info

    def step(self, action):
        self._t += 1
        self._position = self._position + (int(action) - 1) * 0.1 * self.speed + self.np_random.normal(0, 0.01, 3)
        reward = float(self._position.sum()) + 0.5 * int(action)
        ended = self._t >= self._length
        terminated = ended and self._ending in (0, 2)
        truncated = ended and self._ending in (1, 2)
        info = {}
        if self.np_random.random() < 0.25:
            info["bonus"] = float(self.np_random.random())
            info["tag"] = np.array([self._t, self._episode], np.int64)
        if ended:
            info["ended"] = True
        return self._obs(), reward, terminated, truncated, info


class CounterEnv(gymnasium.Env):
    """Observations ``[index, episode, step, noise]`` (float64), so a transition names its origin.

    Each episode draws its length (1..`max_length`) and whether it ends terminated, truncated or both;
    action 3 also terminates with probability 0.1.  Everything follows from the seed and the actions.
    """

    def __init__(self, index: int = 0, max_length: int = 9):
        self.index = index
        self.max_length = max_length
        self.observation_space = spaces.Box(-np.inf, np.inf, (4,), np.float64)
        self.action_space = spaces.Discrete(4)
        self._episode = -1

    def _obs(self):
        return np.array([self.index, self._episode, self._t, self._noise], np.float64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._episode += 1
        self._t = 0
        self._length = int(self.np_random.integers(1, self.max_length + 1))
        self._ending = int(self.np_random.integers(0, 3))
        self._noise = float(self.np_random.random())
        return self._obs(), {}

    def step(self, action):
        self._t += 1
        self._noise = float(self.np_random.random())
        reward = float(self.index + 0.25 * int(action) - self._noise)
        ended = self._t >= self._length
        terminated = (ended and self._ending in (0, 2)) or (int(action) == 3 and self._noise < 0.1)
        truncated = ended and self._ending in (1, 2)
        return self._obs(), reward, bool(terminated), bool(truncated), {}


def counter_fns(num_envs: int, max_length: int = 9) -> list:
    """One `CounterEnv` factory per env, each knowing its index."""
    return [functools.partial(CounterEnv, index=i, max_length=max_length) for i in range(num_envs)]


def policy(obs) -> np.ndarray:
    """A deterministic action (0..3) of each observation ``[..., 4]``; works on one or a batch."""
    obs = np.asarray(obs, np.float64)
    return ((obs[..., 0] * 7 + obs[..., 1] * 3 + obs[..., 2] * 5 + np.floor(obs[..., 3] * 10)) % 4).astype(np.int64)


def value_of(obs) -> np.ndarray:
    """A deterministic value of each observation ``[..., 4]`` (float32, like segvec stores it)."""
    obs = np.asarray(obs, np.float64)
    return (np.sin(obs[..., 0] * 1.3 + obs[..., 1] * 0.7 + obs[..., 2] * 0.31) * 2.0 + obs[..., 3]).astype(np.float32)


@dataclasses.dataclass
class Slots:
    """One phase (a reset with a seed, then `n` slots) of the plain sequential loop, as segvec should store it.

    Arrays over the phase's slots ``[n, ...]``; a slot is a step of the env (NEXT_STEP: also the reset step
    that follows an ended episode, whose action is ignored: ``real`` False, reward 0).
    """

    start_obs: np.ndarray    # [4] the phase's reset observation
    obs: np.ndarray          # [n, 4] what the policy saw
    action: np.ndarray       # [n]
    reward: np.ndarray       # [n]
    terminated: np.ndarray   # [n]
    truncated: np.ndarray    # [n]
    real: np.ndarray         # [n] a real transition (False on NEXT_STEP reset steps)
    next_obs: np.ndarray     # [n, 4] what the step returned (the final observation when it ended)
    after: np.ndarray        # [n, 4] the env's observation after the slot (before a user's reset)


def reference_slots(index: int, phases: list, mode: str, max_length: int = 9) -> list[Slots]:
    """The plain loop over one `CounterEnv`: for each ``(seed, n)`` of `phases`, reset with `seed` and run
    `n` slots with `policy`.  `mode` is the autoreset mode's value: ``"NextStep"`` (an ended episode's next
    action is ignored and the env resets), ``"SameStep"`` (it resets at once), ``"Disabled"`` (the user
    resets it at once with ``reset()``; the observation after the slot is the final one)."""
    env = CounterEnv(index=index, max_length=max_length)
    out = []
    for seed, n in phases:
        obs = env.reset(seed=seed)[0]
        start = obs
        pending = False
        rows = {k: [] for k in ("obs", "action", "reward", "terminated", "truncated", "real", "next_obs", "after")}

        def put(**values):
            for key, value in values.items():
                rows[key].append(value)

        for _ in range(n):
            if mode == "NextStep" and pending:
                final = obs
                obs = env.reset()[0]
                pending = False
                put(obs=final, action=-1, reward=0.0, terminated=False, truncated=False, real=False,
                    next_obs=obs, after=obs)
                continue
            action = int(policy(obs))
            next_obs, reward, terminated, truncated, _ = env.step(action)
            ended = terminated or truncated
            before = obs
            if ended and mode == "SameStep":
                obs = env.reset()[0]
            else:
                obs = next_obs
            put(obs=before, action=action, reward=reward, terminated=terminated, truncated=truncated, real=True,
                next_obs=next_obs, after=obs)
            if ended and mode == "NextStep":
                pending = True
            if ended and mode == "Disabled":
                obs = env.reset()[0]
        out.append(Slots(
            start_obs=np.asarray(start, np.float64),
            obs=np.asarray(rows["obs"], np.float64).reshape(-1, 4), action=np.asarray(rows["action"], np.int64),
            reward=np.asarray(rows["reward"], np.float64), terminated=np.asarray(rows["terminated"], bool),
            truncated=np.asarray(rows["truncated"], bool), real=np.asarray(rows["real"], bool),
            next_obs=np.asarray(rows["next_obs"], np.float64).reshape(-1, 4),
            after=np.asarray(rows["after"], np.float64).reshape(-1, 4)))
    return out


class TextEnv(gymnasium.Env):
    """An env whose observations are strings (gymnasium.spaces.Text): nothing shared memory can hold."""

    def __init__(self):
        self.observation_space = spaces.Text(8)
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "start", {}

    def step(self, action):
        return "step", 0.0, False, False, {}


class GraphEnv(TextEnv):
    """An env whose observations are graphs (gymnasium.spaces.Graph)."""

    def __init__(self):
        super().__init__()
        self.observation_space = spaces.Graph(node_space=spaces.Box(-1, 1, (2,)), edge_space=None)


class TupleEnv(gymnasium.Env):
    """Tuple observations and Dict actions (Box + MultiDiscrete + MultiBinary); the observation echoes the
    last action, so a test sees exactly which action the env got."""

    def __init__(self):
        self.observation_space = spaces.Tuple((
            spaces.Box(-10.0, 10.0, (2,), np.float64),
            spaces.MultiDiscrete([3, 4]),
            spaces.Discrete(5, start=-2),
        ))
        self.action_space = spaces.Dict({
            "force": spaces.Box(-1.0, 1.0, (2,), np.float32),
            "gear": spaces.MultiDiscrete([3, 4]),
            "lights": spaces.MultiBinary(3),
        })

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return (self.np_random.uniform(-1, 1, 2), np.array([0, 0]), np.int64(-2)), {}

    def step(self, action):
        self._t += 1
        obs = (np.asarray(action["force"], np.float64) * 3, np.asarray(action["gear"]),
               np.int64(int(np.sum(action["lights"])) - 2))
        reward = float(np.sum(action["force"])) + float(np.sum(action["gear"]))
        return obs, reward, False, self._t >= 7, {}


def reference_gae(b, gamma, lam, rho=None, c=None):
    """Plain Python GAE, row by row, backwards (V-trace weights when rho/c are given).

    The recursion stops at terminated, truncated and t = length - 1 steps; masked-out steps and steps past
    length get advantage and return 0 and reset it; next_value is 0 where terminated, whatever it holds.
    """
    n, T = b.reward.shape
    adv, ret = np.zeros((n, T)), np.zeros((n, T))
    for i in range(n):
        running = 0.0
        for t in reversed(range(T)):
            if t >= b.length[i] or not b.mask[i, t]:
                running = 0.0
                continue
            next_value = 0.0 if b.terminated[i, t] else float(b.next_value[i, t])
            delta = float(b.reward[i, t]) + gamma * next_value - float(b.value[i, t])
            stop = b.terminated[i, t] or b.truncated[i, t] or t == b.length[i] - 1
            weight_delta = 1.0 if rho is None else float(rho[i, t])
            weight_carry = 1.0 if c is None else float(c[i, t])
            running = weight_delta * delta + (0.0 if stop else gamma * lam * weight_carry * running)
            adv[i, t] = running
            ret[i, t] = running + float(b.value[i, t])
    return adv, ret


class NamedCounterEnv(gymnasium.Env):
    """`CounterEnv` with parts that shared memory cannot hold: the observation is a Dict of the counter
    (Box) and its name, ``"index/episode/step"`` (Text); the action is a Tuple of the counter's Discrete
    action and a Text word that the next observation's ``word`` part echoes (Sequence of Discrete)."""

    def __init__(self, index: int = 0, max_length: int = 9):
        self.counter = CounterEnv(index, max_length)
        self.observation_space = spaces.Dict({
            "counter": self.counter.observation_space,
            "name": spaces.Text(32, charset="0123456789/"),
            "word": spaces.Sequence(spaces.Discrete(128)),
        })
        self.action_space = spaces.Tuple((self.counter.action_space, spaces.Text(8)))

    def _obs(self, counter, word: str):
        index, episode, t = (int(v) for v in counter[:3])
        return {"counter": counter, "name": f"{index}/{episode}/{t}", "word": tuple(ord(c) for c in word)}

    def reset(self, *, seed=None, options=None):
        counter, info = self.counter.reset(seed=seed, options=options)
        return self._obs(counter, ""), info

    def step(self, action):
        counter_action, word = action
        counter, reward, terminated, truncated, info = self.counter.step(counter_action)
        return self._obs(counter, word), reward, terminated, truncated, info


def named_counter_fns(num_envs: int, max_length: int = 9) -> list:
    return [functools.partial(NamedCounterEnv, index=i, max_length=max_length) for i in range(num_envs)]


class ScalarActionEnv(gymnasium.Env):
    """Records the type and value of every action it gets (``info["action"]``): a 0-d float32 Box action
    space, or with ``shape=(1,)`` a one-element one."""

    def __init__(self, shape=()):
        self.observation_space = spaces.Discrete(4)
        self.action_space = spaces.Box(0.0, 1.0, shape, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return 0, {}

    def step(self, action):
        return 1, 0.0, False, False, {"action_type": type(action).__name__, "action": action}


class SlowResetEnv(CounterEnv):
    """A `CounterEnv` whose reset sleeps `delay` seconds (its steps sleep ``action / 10`` seconds)."""

    def __init__(self, index: int = 0, delay: float = 0.3):
        super().__init__(index)
        self.delay = delay

    def reset(self, *, seed=None, options=None):
        import time
        time.sleep(self.delay)
        return super().reset(seed=seed, options=options)

    def step(self, action):
        import time
        time.sleep(int(action) / 10)
        return super().step(action)


class Anything(spaces.Space):
    """A user-defined space: any Python object."""

    def contains(self, x):
        return True

    def __eq__(self, other):
        return isinstance(other, Anything)


class AnythingEnv(gymnasium.Env):
    """Observations and actions of a user-defined space: reset gives ``{"started": seed}``, a step
    ``["got", action]``."""

    observation_space = Anything()
    action_space = Anything()

    def reset(self, *, seed=None, options=None):
        return {"started": seed}, {}

    def step(self, action):
        return ["got", action], 0.0, False, False, {}
