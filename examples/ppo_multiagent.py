"""Shared-policy PPO on a PettingZoo env (Knights-Archers-Zombies) with segvec agent slots, in one file.

``segvec.make_multiagent`` runs ``num_envs`` PettingZoo envs; each agent of each env is an *agent slot*
with its own segment rows, so examples/ppo.py's update trains one policy for every agent unchanged: each
update takes ``num_envs * num_agents`` complete rows (``horizon`` steps of one agent each, with their
bootstraps), computes GAE with ``segvec.gae`` and trains on minibatches of whole rows.  An agent killed
by a zombie reports ``terminated`` once and then sits out: its slot writes nothing (its actions are
dropped) until its env resets, so no fake transition reaches the rows.  The policy sees which agent it
acts for through the observation (the ``vector-masked`` observation starts with the agent's own row, and
each row's type mask tells an archer from a knight), and archers and knights share it, as in SuperSuit's
``pettingzoo_env_to_vec_env_v1`` recipes.  Reported returns are whole games' (every agent's rewards
summed, from ``episodes()["env_episodes"]``).

    pip install "segvec[pettingzoo,examples]"             # pettingzoo[butterfly], torch, matplotlib
    python examples/ppo_multiagent.py                     # 8 envs x 4 agents, 400k agent steps
    python examples/ppo_multiagent.py --total-timesteps 100000 --plot-path /tmp/kaz.png
"""
from __future__ import annotations

import collections
import dataclasses
import os
import time

import numpy as np
import torch
from pettingzoo.butterfly import knights_archers_zombies_v11
from tqdm import tqdm

import segvec

from common import PPOArgs, parse_args, plot_learning_curve, update_metrics  # examples/common.py
from ppo import Agent as MLPAgent  # examples/ppo.py: the same agent and update
from ppo import Rows, ppo_update

AGENTS_PER_ENV = 4  # Knights-Archers-Zombies' default: 2 archers, 2 knights


@dataclasses.dataclass
class Args(PPOArgs):
    exp_name: str = "ppo_multiagent"
    """name of this experiment (used in the plot's title)"""
    seed: int = 1
    """seed of the envs, torch and numpy"""
    torch_threads: int = 1
    """torch CPU threads (small networks run fastest on one)"""
    plot_path: str = "ppo_multiagent_learning_curve.png"
    """where to write the learning-curve PNG ("" for none)"""

    # Environments
    num_envs: int = 8
    """PettingZoo envs; each has 4 agents (2 archers, 2 knights), so 4 * num_envs agent slots and rows per
    update"""
    backend: str = "multiprocessing"
    """segvec backend: "serial" (in-process) or "multiprocessing" """
    num_workers: int = 0
    """worker processes for the multiprocessing backend (0: segvec's default; must divide num_envs)"""
    horizon: int = 64
    """steps per segment row, i.e. per agent slot per update"""
    total_timesteps: int = 400_000
    """agent steps (one per agent slot and env step, sat-out steps of dead agents included) to run"""
    max_cycles: int = 900
    """Knights-Archers-Zombies' episode limit, in env steps"""
    spawn_delay: int = 20
    """env steps between zombie spawns"""
    return_window: int = 20
    """games (episodes of whole envs) in the mean return reported"""

    # Algorithm
    learning_rate: float = 3e-4
    """Adam learning rate"""
    num_minibatches: int = 4
    """minibatches per epoch; each holds whole rows, so it must divide the 4 * num_envs rows"""


def check_args(args: Args) -> str | None:
    """What is wrong with `args`, said as a command-line error (None when nothing is)."""
    rows = AGENTS_PER_ENV * args.num_envs
    if args.num_envs < 1 or args.num_minibatches < 1 or rows % args.num_minibatches:
        return (f"--num-minibatches {args.num_minibatches} must divide the {rows} rows of an update "
                f"({AGENTS_PER_ENV} agents x --num-envs {args.num_envs}): each minibatch holds whole rows")
    if args.total_timesteps < rows * args.horizon:
        return (f"--total-timesteps {args.total_timesteps} is less than one update's {rows} rows x --horizon "
                f"{args.horizon} agent steps")
    return None


class KnightsArchersZombies:
    """A picklable zero-argument constructor of Knights-Archers-Zombies with vector observations whose rows
    start with a type mask (``obs_method="vector-masked"``), so that the shared policy tells an archer from a
    knight."""

    def __init__(self, args: Args):
        self.kwargs = {"max_cycles": args.max_cycles, "spawn_delay": args.spawn_delay}

    def __call__(self):
        return knights_archers_zombies_v11.parallel_env(obs_method="vector-masked", **self.kwargs)


class Agent(MLPAgent):
    """examples/ppo.py's MLP actor-critic on the flattened ``[entities, 11]`` vector observation."""

    def forward(self, obs, state, episode_start):
        return super().forward(obs.flatten(-2).float(), state, episode_start)

    def unroll(self, obs, state, episode_start):
        return super().unroll(obs.flatten(-2).float(), state, episode_start)


if __name__ == "__main__":
    args = parse_args(Args, check=check_args)
    num_agents = AGENTS_PER_ENV
    rows_per_update = args.num_envs * num_agents
    num_iterations = args.total_timesteps // (rows_per_update * args.horizon)

    # ---- Seeding ----------------------------------------------------------------------------------
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    # ---- Environments: one row stream per agent slot ---------------------------------------------
    start_time = time.time()
    envs = segvec.make_multiagent(KnightsArchersZombies(args), num_envs=args.num_envs, backend=args.backend,
                                  num_workers=args.num_workers or None, horizon=args.horizon)
    assert envs.num_agents == AGENTS_PER_ENV
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    agent = Agent(obs_dim, envs.single_action_space)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    # ---- Start the game -------------------------------------------------------------------------
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

        # ---- Rollout: step every slot until as many rows as slots are complete -----------------------
        while envs.segments_ready < rows_per_update:
            with torch.no_grad():
                logits, value, _ = agent(torch.as_tensor(next_obs), (), None)
                action, logprob = agent.head.sample(logits)
            next_obs, reward, terminated, truncated, info = envs.step(
                action.numpy(), value=value.numpy(), logprob=logprob.numpy())
            global_step += envs.num_envs
        progress.update(min(global_step, args.total_timesteps) - progress.n)

        finished = envs.episodes()["env_episodes"]  # whole games: every agent's rewards summed
        episode_returns.extend(finished["return"].tolist())
        episode_steps.extend([global_step] * len(finished["return"]))
        recent.extend(finished["return"].tolist())

        # ---- Advantages: GAE within each row of one agent -----------------------------------------
        with envs.take_segments(rows_per_update) as batch:
            advantages, returns = segvec.gae(batch, args.gamma, args.gae_lambda)
            seg = batch.to_torch()
            rows = Rows(obs=seg.obs[:, :args.horizon], action=seg.action, logprob=seg.logprob, value=seg.value,
                        advantages=torch.as_tensor(advantages), returns=torch.as_tensor(returns), mask=seg.mask,
                        episode_start=seg.episode_start)

            # ---- Update: PPO epochs over minibatches of whole rows -------------------------------
            losses = ppo_update(agent, optimizer, rows, args)

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
    print(f"knights_archers_zombies_v11: mean game return (4 agents) of the first {len(first)} games "
          f"{np.mean(first) if first else float('nan'):.2f}, of the last {len(recent)} "
          f"{np.mean(recent) if recent else float('nan'):.2f}; {global_step} agent steps, "
          f"{len(episode_returns)} games, {elapsed:.1f} s ({global_step / elapsed:.0f} agent steps/s)")
    if args.plot_path:
        title = f"{args.exp_name} on KAZ v11 (segvec, {args.num_envs} envs x {num_agents} agents): game returns"
        plot_learning_curve(args.plot_path, episode_steps, episode_returns, args.return_window, title,
                            xlabel="agent steps")
        print(f"learning curve: {os.path.abspath(args.plot_path)}")
