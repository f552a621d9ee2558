"""Synthetic envs with Atari-sized observations and a tunable CPU cost per step.

For benchmarks, tests and soak runs that need the shape of Atari (84x84x4 uint8 frames, 6 actions,
episodes of varying length ending in terminations and truncations) without emulators or ROMs.  The CPU
cost of a step is real numpy work, calibrated once per process, never a sleep: a worker that steps these
envs keeps its core busy exactly like a real env would.

Importing this module registers two gymnasium ids (``segvec`` itself does not import it):

    ``segvec/SyntheticAtari-v0``       about 50 us of work per step (``work_us=50``)
    ``segvec/SyntheticAtariHeavy-v0``  about 1 ms of work per step (``work_us=1000``)

In a process that has not imported ``segvec.envs`` (e.g. a worker started with ``spawn``), use
gymnasium's ``module:id`` form, which imports the module first: ``gymnasium.make("segvec.envs:segvec/
SyntheticAtari-v0")``.

``segvec/SyntheticAtari-c`` (``segvec.native.SyntheticAtariEnv``, registered by ``import segvec``) is the same
env written in C, with no added work per step.

Example:
    >>> import gymnasium
    >>> import segvec.envs
    >>> env = gymnasium.make("segvec/SyntheticAtari-v0", work_us=0)
    >>> obs, info = env.reset(seed=0)
    >>> obs.shape, obs.dtype, env.action_space
    ((84, 84, 4), dtype('uint8'), Discrete(6))
    >>> env.close()
"""
from __future__ import annotations

import time

import gymnasium
import numpy as np
from gymnasium import spaces

__all__ = [
    "HEAVY_WORK_US",
    "LIGHT_WORK_US",
    "SyntheticAtariEnv",
    "burn",
    "calibrate_work",
    "register_envs",
    "units_for",
]

LIGHT_WORK_US = 50.0
HEAVY_WORK_US = 1000.0
FRAME_SHAPE = (84, 84)
STACK = 4

_UNIT_SIZE = 2048                        # float32 elements one unit of work transforms
_unit_seconds: float | None = None       # cost of one unit in this process, measured once
_work_src = np.linspace(0.0, 3.0, _UNIT_SIZE, dtype=np.float32)
_work_dst = np.empty(_UNIT_SIZE, np.float32)


def _work_unit() -> None:
    np.sin(_work_src, out=_work_dst)
    np.multiply(_work_dst, _work_dst, out=_work_dst)


def calibrate_work(force: bool = False) -> float:
    """Measures the cost of one unit of work in this process (once; later calls return the cached value).

    A unit is a fixed pair of numpy ufunc calls on ``2048`` float32 values (a few microseconds).  The cost is
    the fastest of several short trials, so a briefly busy machine does not make later steps too short.

    Args:
        force: measure again even if this process already has a measurement.

    Returns:
        Seconds per unit.
    """
    global _unit_seconds
    if _unit_seconds is not None and not force:
        return _unit_seconds
    for _ in range(50):  # warm up caches and the ufunc loops
        _work_unit()
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(200):
            _work_unit()
        best = min(best, (time.perf_counter() - start) / 200)
    _unit_seconds = best
    return best


def units_for(work_us: float) -> int:
    """Number of work units that take about `work_us` microseconds in this process (0 for ``work_us <= 0``)."""
    if work_us <= 0:
        return 0
    return max(1, round(work_us * 1e-6 / calibrate_work()))


def burn(units: int) -> None:
    """Does `units` units of numpy work (see `calibrate_work`); the CPU cost of a synthetic step."""
    for _ in range(units):
        _work_unit()


class SyntheticAtariEnv(gymnasium.Env):
    """An Atari-shaped env: stacked 84x84 uint8 frames, 6 actions, random-length episodes, real CPU work.

    Observation: ``Box(0, 255, (84, 84, 4), uint8)``, the last 4 frames (oldest first, like gymnasium's
    ``FrameStackObservation`` on channels-last frames).  Each frame is an 84x84 window of a random texture
    drawn at reset; the action moves the window (0: stay, 1/2: right by 1/2 columns, 3/4: left by 1/2,
    5: down by one row), so observations depend on actions.

    Action: ``Discrete(6)``.  Reward: 1.0 when the action equals the step's target action (a function of
    the episode and the step index), else 0.0.

    Episodes: at reset the episode length is drawn uniformly from ``episode_length`` (inclusive); the
    episode then ends with ``truncated=True`` with probability ``truncation_prob`` (a time limit) and with
    ``terminated=True`` otherwise.  Never both.  Info dicts are empty.

    Determinism: everything (textures, lengths, how episodes end, targets) comes from the env's
    ``np_random``, so the sequence of observations, rewards, terminations and truncations is a function of
    the reset seed and the actions alone.  The work done per step never changes the outcome.

    Cost: each step does about ``work_us`` microseconds of numpy work (calibrated once per process by
    `calibrate_work`) on top of building the frame stack (a few microseconds).

    Args:
        work_us: microseconds of numpy work per step (``0``: none).  Default 50; the heavy id uses 1000.
        episode_length: ``(min, max)`` steps per episode, inclusive, ``1 <= min <= max``.
        truncation_prob: probability that an episode ends by truncation rather than termination.
        render_mode: ``None`` or ``"rgb_array"`` (the newest frame as an ``(84, 84, 3)`` uint8 image).

    Raises:
        ValueError: invalid ``episode_length``, ``truncation_prob`` or ``render_mode``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 60}

    def __init__(
        self,
        work_us: float = LIGHT_WORK_US,
        episode_length: tuple[int, int] = (64, 512),
        truncation_prob: float = 0.25,
        render_mode: str | None = None,
    ):
        low, high = (int(v) for v in episode_length)
        if not 1 <= low <= high:
            raise ValueError(f"episode_length must be (min, max) with 1 <= min <= max, got {episode_length!r}")
        if not 0.0 <= truncation_prob <= 1.0:
            raise ValueError(f"truncation_prob must be in [0, 1], got {truncation_prob!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.observation_space = spaces.Box(0, 255, FRAME_SHAPE + (STACK,), np.uint8)
        self.action_space = spaces.Discrete(6)
        self.work_us = float(work_us)
        self.episode_length = (low, high)
        self.truncation_prob = float(truncation_prob)
        self.render_mode = render_mode
        self._units = units_for(self.work_us)
        height, width = FRAME_SHAPE
        self._texture = np.zeros((2 * height, 2 * width), np.uint8)  # [2 * 84, 2 * 84], windows wrap
        # The frame stack, one word per pixel: byte k of a word is frame k (oldest first), so the
        # [84, 84, 4] uint8 observation is this array's bytes and dropping the oldest frame is one shift.
        self._words = np.zeros(FRAME_SHAPE, np.uint32)                # [84, 84]
        self._obs = self._words.view(np.uint8).reshape(FRAME_SHAPE + (STACK,))  # [84, 84, 4] view of it
        self._incoming = np.zeros(FRAME_SHAPE, np.uint32)             # [84, 84] newest frame, shifted
        self._row = self._col = 0
        self._t = 0
        self._length = 0
        self._truncate = False
        self._target_key = 0
        self._done = True

    def _frame(self) -> np.ndarray:
        height, width = FRAME_SHAPE
        return self._texture[self._row:self._row + height, self._col:self._col + width]

    def _push_frame(self) -> None:
        """Drops the oldest frame of the stack and appends the current window."""
        if np.little_endian:  # frame k is the word's k-th least significant byte
            np.right_shift(self._words, np.uint32(8), out=self._words)
            np.left_shift(self._frame(), np.uint32(24), out=self._incoming, dtype=np.uint32)
        else:
            np.left_shift(self._words, np.uint32(8), out=self._words)
            np.copyto(self._incoming, self._frame())
        np.bitwise_or(self._words, self._incoming, out=self._words)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """Starts an episode; returns ``(obs (84, 84, 4) uint8, {})``.

        Args:
            seed: seeds ``np_random`` (gymnasium semantics: only when given).
            options: unused.
        """
        super().reset(seed=seed)
        rng = self.np_random
        height, width = FRAME_SHAPE
        tile = rng.integers(0, 256, FRAME_SHAPE, dtype=np.uint8)
        self._texture[:height, :width] = tile  # tiled so that every window is contiguous in the texture
        self._texture[:height, width:] = tile
        self._texture[height:] = self._texture[:height]
        self._row = int(rng.integers(height))
        self._col = int(rng.integers(width))
        self._length = int(rng.integers(self.episode_length[0], self.episode_length[1] + 1))
        self._truncate = bool(rng.random() < self.truncation_prob)
        self._target_key = int(rng.integers(1 << 30))
        self._t = 0
        self._done = False
        self._obs[:] = self._frame()[:, :, None]
        burn(self._units)
        return self._obs.copy(), {}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Advances one step; returns ``(obs (84, 84, 4) uint8, reward, terminated, truncated, {})``.

        Raises:
            ValueError: `action` is not in ``Discrete(6)``.
            RuntimeError: the episode has ended (call `reset`).
        """
        if self._done:
            raise RuntimeError("step() called on an episode that has ended: call reset() first")
        action = int(action)
        if not 0 <= action < 6:
            raise ValueError(f"action must be in Discrete(6), got {action}")
        height, width = FRAME_SHAPE
        shift = (0, 1, 2, -1, -2, 0)[action]
        self._col = (self._col + shift) % width
        if action == 5:
            self._row = (self._row + 1) % height
        reward = 1.0 if action == (self._target_key + 7 * self._t) % 6 else 0.0
        self._t += 1
        self._push_frame()
        burn(self._units)
        ended = self._t >= self._length
        terminated = ended and not self._truncate
        truncated = ended and self._truncate
        self._done = ended
        return self._obs.copy(), reward, terminated, truncated, {}

    def render(self) -> np.ndarray | None:
        """The newest frame as an ``(84, 84, 3)`` uint8 image (``render_mode="rgb_array"``), else None."""
        if self.render_mode != "rgb_array":
            return None
        return np.repeat(self._obs[:, :, -1:], 3, axis=2)


def register_envs() -> None:
    """Registers ``segvec/SyntheticAtari-v0`` and ``segvec/SyntheticAtariHeavy-v0`` (idempotent)."""
    for env_id, work_us in (("segvec/SyntheticAtari-v0", LIGHT_WORK_US),
                            ("segvec/SyntheticAtariHeavy-v0", HEAVY_WORK_US)):
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point=f"{__name__}:SyntheticAtariEnv",
                               kwargs={"work_us": work_us})


register_envs()
