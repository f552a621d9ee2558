"""PPO with an auxiliary value head on segvec segments (``value_shape=(2,)``), in one small file.

The critic predicts two things per observation.  Head 0 is the usual value of the env's reward (gamma 0.99);
its advantages train the policy.  Head 1 is an auxiliary prediction trained like a value function: the
discounted sum (gamma 0.9) of the pole's future tilt ``|angle|``, which the env reports in
``info["rewards"]`` beside its reward.  Inside a segment its label is the ground truth; at the segment's end
(and at truncations) the head's own prediction of the next observation is the bootstrap, exactly as for
head 0 -- segvec stores both heads' values, rewards and bootstraps, and ``segvec.gae`` runs both recursions
at once with one gamma and lambda per head.  The auxiliary loss shapes the critic's torso, which both heads
share; it never enters the policy gradient.

    python examples/value_heads.py                 # CartPole-v1, stops once solved (475)
"""
from __future__ import annotations

import dataclasses
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

import segvec

from common import parse_args  # examples/common.py


@dataclasses.dataclass
class Args:
    seed: int = 1
    """seed of the envs, torch and numpy"""
    num_envs: int = 8
    """parallel envs; also the number of rows per update"""
    horizon: int = 128
    """steps per segment row, i.e. per env per update"""
    total_timesteps: int = 300_000
    """env steps to run at most"""
    solved_return: float = 475.0
    """stop once the mean return of the last 20 episodes reaches this"""
    gammas: str = "0.99,0.9"
    """discount of each head: the reward's, then the auxiliary tilt's"""
    lams: str = "0.95,0.95"
    """GAE lambda of each head"""
    aux_coef: float = 0.5
    """weight of the auxiliary head's loss"""
    learning_rate: float = 2.5e-3
    """Adam learning rate, decayed linearly to 0 over `total_timesteps`"""
    update_epochs: int = 4
    """epochs over each batch"""
    num_minibatches: int = 4
    """minibatches of whole rows per epoch"""
    clip_coef: float = 0.2
    """PPO's ratio clip"""
    ent_coef: float = 0.0
    """entropy bonus"""


class TiltAsHeadReward(gym.Wrapper):
    """Puts the step's rewards per head in ``info["rewards"]``: the env's reward and the pole's ``|angle|``."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {**info, "rewards": np.array([reward, abs(obs[2])], np.float32)}


def make_env():
    return TiltAsHeadReward(gym.make("CartPole-v1"))


def mlp(obs_size: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(obs_size, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, outputs))


class Agent(nn.Module):
    """A policy network, and a critic network with one output per value head (the heads share its torso)."""

    def __init__(self, obs_size: int, num_actions: int, num_heads: int):
        super().__init__()
        self.policy = mlp(obs_size, num_actions)
        self.critic = mlp(obs_size, num_heads)

    def forward(self, obs: torch.Tensor):
        """``(action distribution, values [..., num_heads])``."""
        return torch.distributions.Categorical(logits=self.policy(obs)), self.critic(obs)


if __name__ == "__main__":
    args = parse_args(Args)
    gammas, lams = [float(g) for g in args.gammas.split(",")], [float(x) for x in args.lams.split(",")]
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    # ---- plumbing: envs whose rows hold two value heads --------------------------------------------------
    envs = segvec.make_vec(make_env, num_envs=args.num_envs, backend="serial", horizon=args.horizon,
                           autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, value_shape=(len(gammas),))
    agent = Agent(envs.single_observation_space.shape[0], envs.single_action_space.n, len(gammas))
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    obs, _ = envs.reset(seed=args.seed)
    returns_seen, steps, start = [], 0, time.time()

    while steps < args.total_timesteps:
        # ---- rollout: each step stores obs, action, logprob and both heads' values in the rows; a row is
        # complete once its tail bootstrap (both heads' values of the next observation) is sent too ----------
        with torch.no_grad():
            while envs.segments_ready < args.num_envs:
                dist, values = agent(torch.as_tensor(obs))
                actions = dist.sample()
                obs, _, _, _, _ = envs.step(actions.numpy(), value=values.numpy(),
                                            logprob=dist.log_prob(actions).numpy())
                steps += args.num_envs
        returns_seen += envs.episodes()["return"].tolist()

        # ---- algorithm: GAE per head, PPO on head 0, value regression on every head ------------------------
        optimizer.param_groups[0]["lr"] = args.learning_rate * max(0.0, 1.0 - steps / args.total_timesteps)
        with envs.take_segments(args.num_envs) as batch:
            final_obs, _ = batch.final_obs   # SAME_STEP truncations: bootstrapped by the final obs' values
            if len(final_obs):
                with torch.no_grad():
                    batch.set_truncation_values(agent(torch.as_tensor(final_obs))[1].numpy())
            advantages, targets = segvec.gae(batch, gammas, lams)   # [n, T, heads]
            real = batch.mask
            b_obs = torch.as_tensor(batch.obs[:, :-1][real])
            b_actions = torch.as_tensor(batch.action[real])
            b_logprob = torch.as_tensor(batch.logprob[real])
            b_adv = torch.as_tensor(advantages[real][:, 0])       # the policy learns from head 0 only
            b_targets = torch.as_tensor(targets[real])            # [steps, heads]
        for _ in range(args.update_epochs):
            for part in np.array_split(np.random.permutation(len(b_obs)), args.num_minibatches):
                dist, values = agent(b_obs[part])
                ratio = (dist.log_prob(b_actions[part]) - b_logprob[part]).exp()
                adv = (b_adv[part] - b_adv[part].mean()) / (b_adv[part].std() + 1e-8)
                policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * adv).mean()
                head_losses = ((values - b_targets[part]) ** 2).mean(dim=0)   # one per head
                loss = (policy_loss + 0.5 * head_losses[0] + args.aux_coef * head_losses[1:].sum()
                        - args.ent_coef * dist.entropy().mean())
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
                optimizer.step()

        recent = float(np.mean(returns_seen[-20:])) if returns_seen else float("nan")
        print(f"charts/steps {steps}")
        print(f"charts/mean_return {recent:.1f}")
        print(f"losses/value_loss {head_losses[0].item():.4f}")
        print(f"losses/aux_value_loss {head_losses[1:].sum().item():.4f}")
        if len(returns_seen) >= 20 and recent >= args.solved_return:
            print(f"solved after {steps} steps, {time.time() - start:.1f} s")
            break
    envs.close()
