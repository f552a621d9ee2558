"""PPO on Atari (the Arcade Learning Environment) with segvec segments, in one file.

examples/ppo.py's loop with the standard Atari setup: gymnasium's AtariPreprocessing (84x84 grey frames,
frame-skip 4 with max-pooling of the last two frames, up to 30 no-ops at reset) on envs made with
``frameskip=1``, a stack of the last 4 frames, and the Nature-CNN actor-critic.  The envs write their
uint8 frames straight into the segment rows; each update takes ``num_envs`` complete rows, computes GAE
with ``segvec.gae`` on the rows' bootstraps (time limits bootstrapped, not taken for game overs) and
trains on minibatches of whole rows.  Training sees rewards clipped to their sign; the returns reported
and plotted are the games' own.  ``--episodic-life`` (on by default) ends a training episode at each life
lost while the game goes on, and presses FIRE to start each life in games that need it (Breakout).

    pip install "segvec[atari,examples]"                  # ale-py (ROMs included) and opencv
    python examples/ppo_atari.py                          # ALE/Breakout-v5, 10M steps (CUDA when available)
    python examples/ppo_atari.py --total-timesteps 250000 --plot-path /tmp/ppo_atari_learning_curve.png
    python examples/ppo_atari.py --engine ale             # the games in ale-py's AtariVectorEnv (C++ threads)
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import time

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from ale_py.vector_env import AtariVectorEnv
from tqdm import tqdm

import segvec

from common import PPOArgs, gae_with_rewards, parse_args, plot_learning_curve, update_metrics  # examples/common.py
from ppo import BatchRows, CategoricalHead, check_args, layer_init, ppo_update  # examples/ppo.py: the same update

gym.register_envs(ale_py)


@dataclasses.dataclass
class Args(PPOArgs):
    exp_name: str = "ppo_atari"
    """name of this experiment (used in the plot's title)"""
    seed: int = 1
    """seed of the envs, torch and numpy"""
    torch_threads: int = 0
    """torch CPU threads (0: torch's default)"""
    cuda: bool = True
    """train on CUDA when it is available"""
    plot_path: str = "ppo_atari_learning_curve.png"
    """where to write the learning-curve PNG ("" for none)"""

    # Environments
    env_id: str = "ALE/Breakout-v5"
    """ALE id of the game (made with frameskip=1: AtariPreprocessing skips frames)"""
    num_envs: int = 8
    """parallel envs; also the number of rows per update"""
    backend: str = "multiprocessing"
    """segvec backend: "serial" (in-process) or "multiprocessing" (ignored with --engine)"""
    num_workers: int = 0
    """worker processes for the multiprocessing backend (0: segvec's default)"""
    engine: str = ""
    """"ale": the games run in ale-py's AtariVectorEnv (C++ threads, its own preprocessing), written into
    segment rows by segvec.wrap_vector_env; "" (default): each game is a Python env in a segvec worker"""
    engine_threads: int = 0
    """threads of the --engine (0: one per CPU core)"""
    horizon: int = 128
    """steps per segment row, i.e. per env per update"""
    total_timesteps: int = 10_000_000
    """env steps (agent decisions, 4 frames each) to run"""
    repeat_action_probability: float = 0.25
    """sticky actions: the probability that the emulator repeats the previous action (ALE v5: 0.25)"""
    noop_max: int = 30
    """at most this many no-op frames at each game's start"""
    frame_stack: int = 4
    """frames stacked into one observation"""
    episodic_life: bool = True
    """end a training episode at each life lost (the game goes on, and games that need FIRE to start a life
    get it); reported returns are still whole games'.  Off by default with --engine, which cannot do it"""
    return_window: int = 20
    """games in the mean return reported"""

    # Algorithm (CleanRL's ppo_atari)
    clip_coef: float = 0.1
    """PPO surrogate clipping"""


class Game(gym.Wrapper):
    """Drops ALE's per-step info (segvec carries a non-empty info from the worker to the learner: the lives
    and frame counters would cost a message every step).  With `episodic_life`, a life lost ends the episode
    for training (``terminated``) while the game goes on: the next reset continues it, and a game that needs
    FIRE to start a life gets it; the whole game's return and length then come in the info of its last step
    (``game_return``, ``game_length``), since segvec's own episode records count lives."""

    def __init__(self, env: gym.Env, episodic_life: bool):
        super().__init__(env)
        self.episodic_life = episodic_life
        self.ale = env.unwrapped.ale
        self.fire = env.unwrapped.get_action_meanings()[1:2] == ["FIRE"]
        self.lives, self.game_over = 0, True
        self.game_return, self.game_length = 0.0, 0

    def reset(self, **kwargs):
        if not self.episodic_life:
            obs, _ = self.env.reset(**kwargs)
            return obs, {}
        if self.game_over:
            obs, _ = self.env.reset(**kwargs)
            self.game_over, self.game_return, self.game_length = False, 0.0, 0
        else:  # a life was lost: the game goes on from where it is
            obs = self._step(0)[0]
            if self.game_over:
                return self.reset(**kwargs)
        if self.fire:
            obs = self._step(1)[0]
            if self.game_over:
                return self.reset(**kwargs)
        self.lives = self.ale.lives()
        return obs, {}

    def _step(self, action):
        obs, reward, terminated, truncated, _ = self.env.step(action)
        self.game_return += float(reward)
        self.game_length += 1
        self.game_over = terminated or truncated
        return obs, reward, terminated, truncated, {}

    def step(self, action):
        if not self.episodic_life:
            obs, reward, terminated, truncated, _ = self.env.step(action)
            return obs, reward, terminated, truncated, {}
        obs, reward, terminated, truncated, info = self._step(action)
        lives = self.ale.lives()
        if self.game_over:
            info = {"game_return": self.game_return, "game_length": self.game_length}
        elif lives < self.lives:
            terminated = True  # for training only: the game goes on at the next reset
        self.lives = lives
        return obs, reward, terminated, truncated, info


def check_atari_args(args: Args) -> str | None:
    """examples/ppo.py's checks, and the engine's."""
    if args.engine not in ("", "ale"):
        return f'--engine {args.engine!r}: "ale" (ale-py\'s AtariVectorEnv) or "" (Python envs)'
    if args.engine and args.episodic_life:
        # ale-py's own options do not fit: its episodic_life restarts the whole game at the first life lost,
        # and its life_loss_info ends the episode without the reset that the next step then is said to be.
        return ("--episodic-life needs Python envs: with --engine ale each episode is a whole game "
                "(leave --episodic-life off)")
    return check_args(args)


def make_engine(args: Args):
    """ale-py's AtariVectorEnv with the preprocessing that `make_env` gives each Python env: 84x84 grey frames,
    frame-skip 4 with max-pooling, up to `noop_max` no-ops at reset, a stack of `frame_stack` frames, sticky
    actions, FIRE at reset where the game needs it; the games' own rewards (training clips them itself)."""
    game = re.sub(r"(?<!^)(?=[A-Z])", "_", args.env_id.split("/")[-1].split("-")[0]).lower()  # SpaceInvaders
    return AtariVectorEnv(game, args.num_envs, num_threads=args.engine_threads or (os.cpu_count() or 1),
                          repeat_action_probability=args.repeat_action_probability, noop_max=args.noop_max,
                          stack_num=args.frame_stack, frameskip=4, img_height=84, img_width=84, grayscale=True,
                          episodic_life=False, reward_clipping=False, use_fire_reset=True)


def make_env(args: Args):
    """A zero-argument constructor of one preprocessed game."""

    def thunk():
        env = gym.make(args.env_id, frameskip=1, repeat_action_probability=args.repeat_action_probability)
        env = gym.wrappers.AtariPreprocessing(env, noop_max=args.noop_max, frame_skip=4, screen_size=84,
                                              grayscale_obs=True, scale_obs=False)
        env = Game(env, args.episodic_life)
        return gym.wrappers.FrameStackObservation(env, args.frame_stack)

    return thunk


class Agent(nn.Module):
    """The Nature CNN (Mnih et al., 2015) shared by an actor (logits) and a critic (value) head; the interface
    of examples/ppo.py's agents (stateless: its recurrent state is the empty tuple), so its update trains it."""

    def __init__(self, frames: int, num_actions: int):
        super().__init__()
        self.network = nn.Sequential(
            layer_init(nn.Conv2d(frames, 32, 8, stride=4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(64 * 7 * 7, 512)), nn.ReLU(),
        )
        self.head = CategoricalHead(512, num_actions)
        self.critic = layer_init(nn.Linear(512, 1), std=1)

    def initial_state(self, n: int) -> tuple:
        return ()

    def unroll(self, obs, state, episode_start):
        """``obs`` ``[..., frames, 84, 84]`` (uint8 values): ``(logits [..., A], value [...])``."""
        lead = obs.shape[:-3]
        hidden = self.network(obs.reshape(-1, *obs.shape[-3:]).float() / 255.0)
        return self.head(hidden).reshape(*lead, -1), self.critic(hidden).reshape(lead)

    def forward(self, obs, state, episode_start):
        """One step for a batch: ``(logits [n, A], value [n], state)``."""
        logits, value = self.unroll(obs, state, episode_start)
        return logits, value, state


if __name__ == "__main__":
    args = parse_args(Args, defaults=lambda a: {"episodic_life": not a.engine}, check=check_atari_args)
    num_iterations = args.total_timesteps // (args.num_envs * args.horizon)

    # ---- Seeding and device ---------------------------------------------------------------------
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    # ---- Environments: rows of `horizon` steps of uint8 frame stacks -------------------------------
    start_time = time.time()
    if args.engine:  # the engine steps its games itself; segvec writes each batch it returns into the rows
        envs = segvec.wrap_vector_env(make_engine(args), horizon=args.horizon)
    else:
        envs = segvec.make_vec(make_env(args), num_envs=args.num_envs, backend=args.backend,
                               num_workers=args.num_workers or None, horizon=args.horizon)
    agent = Agent(args.frame_stack, int(envs.single_action_space.n)).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    # ---- Start the games ------------------------------------------------------------------------
    global_step = 0
    next_obs, _ = envs.reset(seed=args.seed)
    episode_steps, episode_returns = [], []
    recent = collections.deque(maxlen=args.return_window)
    metrics: dict = {}
    progress = tqdm(total=args.total_timesteps, unit="step", unit_scale=True, dynamic_ncols=True)

    for iteration in range(1, num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        # ---- Rollout: step until every env has closed a row (horizon steps + its bootstrap) -------
        games = []
        while envs.segments_ready < args.num_envs:
            with torch.no_grad():
                logits, value, _ = agent(torch.as_tensor(next_obs, device=device), (), None)
                action, logprob = agent.head.sample(logits)
            next_obs, reward, terminated, truncated, info = envs.step(
                action.cpu().numpy(), value=value.cpu().numpy(), logprob=logprob.cpu().numpy())
            global_step += args.num_envs
            if "game_return" in info:  # --episodic-life: segvec's episodes are lives, the games end here
                games.extend(info["game_return"][info["_game_return"]].tolist())
        progress.update(global_step - progress.n)

        finished = envs.episodes()
        if not args.episodic_life:  # each episode is a whole game, counted by segvec on the env's rewards
            games = finished["return"].tolist()
        episode_returns.extend(games)
        episode_steps.extend([global_step] * len(games))
        recent.extend(games)

        # ---- Advantages: GAE on the sign of the rewards, within each row --------------------------
        with envs.take_segments(args.num_envs) as batch:
            advantages, returns = gae_with_rewards(batch, np.sign(batch.reward), args.gamma, args.gae_lambda)

            # ---- Update: PPO epochs over minibatches of whole rows, each gathered from the block ---
            losses = ppo_update(agent, optimizer, BatchRows(batch, advantages, returns, device), args)

            metrics = update_metrics(batch, returns, losses, optimizer, recent, len(episode_returns), global_step,
                                     start_time)
        progress.set_postfix(ret=f"{metrics['charts/episodic_return']:.1f}", sps=metrics["charts/SPS"],
                             refresh=False)

    # ---- Done: final numbers and the learning curve --------------------------------------------------
    progress.close()
    elapsed = time.time() - start_time
    envs.close()
    for name, value in metrics.items():
        print(f"{name:32s} {value:.6g}")
    first = episode_returns[:args.return_window]
    print(f"{args.env_id}: mean return of the first {len(first)} games "
          f"{np.mean(first) if first else float('nan'):.1f}, of the last {len(recent)} "
          f"{np.mean(recent) if recent else float('nan'):.1f}; {global_step} steps, {len(episode_returns)} games, "
          f"{elapsed:.1f} s ({global_step / elapsed:.0f} steps/s) on {device}")
    if args.plot_path:
        source = "segvec over AtariVectorEnv" if args.engine else "segvec"
        title = f"{args.exp_name} on {args.env_id} ({source}, {args.num_envs} envs, {device})"
        plot_learning_curve(args.plot_path, episode_steps, episode_returns, args.return_window, title)
        print(f"learning curve: {os.path.abspath(args.plot_path)}")
