"""IMPALA-style actor-learner on a Ray cluster: runners step envs with a copy of the policy, the learner
trains on their segment rows with V-trace, in one file.

Each runner (a Ray actor, `segvec.distributed.RayRollouts`) owns ``--envs-per-runner`` envs in its own
segvec vector env and a copy of the policy; it ships complete rows (``horizon`` steps of one env, with
bootstraps and the ``policy_version`` that acted) through Ray's object store.  The learner takes
``--rows-per-update`` rows, re-evaluates them with its current network and corrects the staleness of rows
acted on by older weights with V-trace: ``segvec.gae(..., lam=1, rho_clip, c_clip, target_logprob)`` over
the learner's own values gives the V-trace targets (``returns``) and the clipped, importance-weighted
advantages of the policy gradient.  After each update it broadcasts the new weights with one ``ray.put``.
Rows more than ``--max-policy-lag`` versions old are dropped by `RayRollouts` (counted in its stats).

The network and env helpers are those of ``examples/ppo.py``.  The run stops once the mean return of the
last ``--solved-window`` episodes reaches ``--solved-return`` (CartPole-v1: 475).

    python examples/impala.py                              # a new local Ray cluster, CartPole-v1
    RAY_AUTH_MODE=token python examples/impala.py --address auto   # the cluster `ray start --head` runs here
    RAY_AUTH_MODE=token python examples/impala.py --address HEAD_IP:6379 --num-runners 20   # a multi-node one

Against a cluster (``--address``) this directory travels to every node as the job's working directory
(``ppo.py`` and ``common.py`` are imported by the runners); segvec and torch must be installed on each node,
and the learner presents the cluster's token (``RAY_AUTH_MODE=token``, with the head's token file or
``RAY_AUTH_TOKEN``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
import types

import numpy as np
import ray
import torch
import torch.nn as nn

import segvec
from segvec.distributed import RayRollouts

from common import parse_args, plot_learning_curve  # examples/common.py
from ppo import Agent, make_env  # examples/ppo.py: the same MLPs and env constructor


@dataclasses.dataclass
class Args:
    exp_name: str = "impala"
    """name of this experiment (used in the plot's title)"""
    seed: int = 1
    """seed of the envs, torch and numpy"""
    torch_threads: int = 1
    """torch CPU threads of the learner and of each runner"""
    plot_path: str = ""
    """where to write the learning-curve PNG ("" for none)"""
    address: str = ""
    """Ray cluster to join ("auto", "HOST:6379"); "" starts a local one for this run"""
    num_cpus: int = 0
    """CPUs of the local cluster (0: Ray's default, every core); ignored with --address"""

    # Environments and runners
    env_id: str = "CartPole-v1"
    """gymnasium id of the environment (Discrete actions)"""
    num_runners: int = 2
    """runner actors"""
    envs_per_runner: int = 8
    """envs in each runner's segvec vector env"""
    backend: str = "serial"
    """each runner's segvec backend: "serial" (in the actor) or "multiprocessing" """
    horizon: int = 32
    """steps per segment row"""
    max_policy_lag: int = 4
    """drop rows acted on by weights more than this many updates old (-1: keep all)"""
    total_timesteps: int = 300_000
    """env steps (taken rows x horizon) to train on at most"""
    solved_return: float = 475.0
    """stop once the mean return of the last `solved_window` episodes reaches this"""
    solved_window: int = 20
    """episodes in that mean"""

    # Algorithm
    rows_per_update: int = 16
    """rows (of `horizon` steps) in each learner update"""
    learning_rate: float = 1e-3
    """Adam learning rate"""
    gamma: float = 0.99
    """discount factor"""
    rho_clip: float = 1.0
    """V-trace clip of the importance weight on the TD error"""
    c_clip: float = 1.0
    """V-trace clip of the importance weight in the recursion"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient norm clip"""


class ActingAgent(Agent):
    """`ppo.Agent` that acts: called on a batch of observations, it samples ``(actions, values, logprobs)``
    (what `RayRollouts` asks of a policy)."""

    def forward(self, obs):
        logits, value, _ = super().forward(obs.float(), (), None)
        action, logprob = self.head.sample(logits)
        return action, value, logprob


def make_runner_policy(obs_dim: int, action_space, torch_threads: int) -> ActingAgent:
    """The runners' policy factory (picklable with functools.partial): its own sampling seed per process."""
    torch.set_num_threads(torch_threads)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return ActingAgent(obs_dim, action_space)


def vtrace(agent: ActingAgent, batch, args: Args):
    """The learner's view of `batch`: ``(target log-probs [n, T], entropy [n, T], values [n, T],
    V-trace targets [n, T], clipped advantages [n, T])``, from its current network.

    NEXT_STEP rows hold the final observation of an ended episode at the step after it, so the learner's
    ``next_value`` of every step is its value of ``obs[:, t + 1]`` (0 where terminated, as `segvec.gae` does).
    """
    obs = torch.tensor(batch.obs, dtype=torch.float32)  # [n, T + 1, obs_dim] (a copy: the store's is read-only)
    T = batch.reward.shape[1]
    logits, values = agent.unroll(obs, (), None)  # [n, T + 1, A], [n, T + 1]
    action = torch.tensor(batch.action).clamp(min=0)  # (NEXT_STEP reset steps: masked below)
    logprob, entropy = agent.head.logprob_entropy(logits[:, :T], action)
    learner = types.SimpleNamespace(
        reward=batch.reward, terminated=batch.terminated, truncated=batch.truncated, mask=batch.mask,
        length=batch.length, logprob=batch.logprob,
        value=values[:, :T].detach().numpy(), next_value=values[:, 1:].detach().numpy())
    advantages, targets = segvec.gae(learner, args.gamma, 1.0, rho_clip=args.rho_clip, c_clip=args.c_clip,
                                     target_logprob=logprob.detach().numpy())
    return logprob, entropy, values[:, :T], torch.as_tensor(targets), torch.as_tensor(advantages)


if __name__ == "__main__":
    args = parse_args(Args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.torch_threads)

    # ==== plumbing: the cluster, the runners, the learner's network ====
    here = os.path.dirname(os.path.abspath(__file__))
    if args.address:
        ray.init(address=args.address, runtime_env={"working_dir": here})
    else:
        ray.init(address="local", num_cpus=args.num_cpus or None, include_dashboard=False)  # a new one
    probe = make_env(args.env_id)()
    obs_dim, action_space = int(np.prod(probe.observation_space.shape)), probe.action_space
    probe.close()
    agent = ActingAgent(obs_dim, action_space)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    rollouts = RayRollouts(
        make_env(args.env_id), num_runners=args.num_runners, envs_per_runner=args.envs_per_runner,
        policy=functools.partial(make_runner_policy, obs_dim, action_space, args.torch_threads),
        horizon=args.horizon, backend=args.backend, seed=args.seed,
        max_policy_lag=None if args.max_policy_lag < 0 else args.max_policy_lag,
        runner_resources={"num_cpus": 1})
    version = 0
    rollouts.update_policy(agent.state_dict(), version)  # the runners start from the learner's weights

    # ==== the algorithm: take rows, V-trace, one gradient step, broadcast ====
    start, steps, solved = time.time(), 0, False
    curve_steps, curve_returns, recent = [], [], []
    try:
        while steps < args.total_timesteps and not solved:
            with rollouts.take_segments(args.rows_per_update) as batch:
                lag = version - int(batch.policy_version.min())
                logprob, entropy, values, targets, advantages = vtrace(agent, batch, args)
                mask = torch.tensor(batch.mask, dtype=torch.float32)
                real = mask.sum().clamp(min=1)
                policy_loss = -(advantages * logprob * mask).sum() / real
                value_loss = 0.5 * (((values - targets) ** 2) * mask).sum() / real
                entropy_loss = (entropy * mask).sum() / real
                loss = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy_loss
                steps += len(batch) * args.horizon
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            version += 1
            rollouts.update_policy(agent.state_dict(), version)

            episodes = rollouts.episodes()
            curve_steps += [steps] * len(episodes["return"])
            curve_returns += episodes["return"].tolist()
            recent = curve_returns[-args.solved_window:]
            solved = len(recent) >= args.solved_window and np.mean(recent) >= args.solved_return
            if version % 20 == 0 or solved:
                stats = rollouts.stats()
                print(f"update {version}  steps {steps}")
                print(f"charts/episodic_return {np.mean(recent) if recent else float('nan'):.1f}")
                print(f"charts/SPS {steps / (time.time() - start):.0f}")
                print(f"charts/policy_lag {lag}")
                print(f"charts/rows_dropped_stale {stats['rows_dropped_stale']}")
                print(f"losses/value_loss {value_loss.item():.4f}")
                print(f"losses/policy_loss {policy_loss.item():.4f}")
                print(f"losses/entropy {entropy_loss.item():.4f}", flush=True)
    finally:
        rollouts.close()
    mean = np.mean(recent) if recent else float("nan")
    verdict = "solved" if solved else "not solved"
    print(f"{verdict}: mean return {mean:.1f} of the last {len(recent)} episodes after {steps} steps, "
          f"{version} updates, {time.time() - start:.0f} s")
    if args.plot_path:
        plot_learning_curve(args.plot_path, curve_steps, curve_returns, args.solved_window,
                            f"{args.exp_name}: {args.env_id}, {args.num_runners} runners")
