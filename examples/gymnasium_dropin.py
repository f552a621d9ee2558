"""A plain gymnasium vector-env training loop that runs on segvec by changing one line.

This is REINFORCE with a linear softmax policy in numpy, written against ``gymnasium.make_vec`` and its
default autoreset mode (NEXT_STEP: the step after an episode ends returns the next episode's first
observation with reward 0, and its action is ignored).  Nothing in the loop knows about segvec: the line
marked ``<-- segvec`` below replaced ``gym.make_vec(...)`` (and ``import segvec`` was added), and the loop
trains the same, step for step, with the envs stepping in worker processes.

    python examples/gymnasium_dropin.py                          # CartPole-v1, 100k steps: return ~200 in seconds
    python examples/gymnasium_dropin.py --total-timesteps 300000 --num-envs 16
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import gymnasium as gym
import numpy as np

import segvec


@dataclasses.dataclass
class Args:
    seed: int = 1
    """seed of the envs and of the action sampling"""
    env_id: str = "CartPole-v1"
    """gymnasium id of an environment with a Box observation and Discrete actions"""
    num_envs: int = 8
    """parallel envs"""
    total_timesteps: int = 100_000
    """vector steps times num_envs"""
    learning_rate: float = 0.03
    """step size of the policy-gradient ascent"""
    gamma: float = 0.99
    """discount factor of the Monte-Carlo returns"""
    episodes_per_update: int = 8
    """finished episodes in each policy-gradient batch"""


def parse_args() -> Args:
    """Command-line flags from the fields of `Args` (``--num-envs 16``).

    The other examples import this from ``examples/common.py``; this file keeps its own few lines so that it
    stays one self-contained gymnasium script (its test runs a copy of it from another folder).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Args):
        kind = {"int": int, "float": float, "str": str}[field.type]
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default)
    return Args(**vars(parser.parse_args()))


def softmax_policy(weights: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Action probabilities ``(n, num_actions)`` of a linear policy: ``softmax([obs, 1] @ weights)``."""
    logits = np.concatenate([obs, np.ones((len(obs), 1))], axis=1) @ weights
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def discounted_returns(rewards: list[float], gamma: float) -> np.ndarray:
    """``G_t = r_t + gamma * G_{t+1}`` over one episode (a time limit is treated as its end: REINFORCE
    has no critic to bootstrap a truncation with)."""
    returns = np.zeros(len(rewards))
    running = 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


if __name__ == "__main__":
    args = parse_args()
    rng = np.random.default_rng(args.seed)

    # ---- Environments -----------------------------------------------------------------------------
    # before: envs = gym.make_vec(args.env_id, num_envs=args.num_envs, vectorization_mode="sync")
    envs = segvec.make_vec(args.env_id, num_envs=args.num_envs)  # <-- segvec: the one line that changed
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "this loop needs Discrete actions"
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    num_actions = int(envs.single_action_space.n)

    # ---- REINFORCE --------------------------------------------------------------------------------
    weights = np.zeros((obs_dim + 1, num_actions))
    episodes = [{"obs": [], "actions": [], "rewards": []} for _ in range(args.num_envs)]
    finished: list[dict] = []  # whole episodes waiting for the next update
    episode_returns: list[float] = []
    autoreset = np.zeros(args.num_envs, dtype=bool)  # NEXT_STEP: this step only resets these envs
    obs, _ = envs.reset(seed=args.seed)
    obs = obs.reshape(args.num_envs, -1)
    start = time.time()
    num_steps = args.total_timesteps // args.num_envs
    for step in range(num_steps):
        probs = softmax_policy(weights, obs)
        actions = (rng.random((args.num_envs, 1)) > probs.cumsum(axis=1)).sum(axis=1).clip(0, num_actions - 1)
        next_obs, rewards, terminations, truncations, _ = envs.step(actions)
        for i in range(args.num_envs):
            if autoreset[i]:
                continue  # the env only reset: no transition to learn from
            episodes[i]["obs"].append(obs[i])
            episodes[i]["actions"].append(actions[i])
            episodes[i]["rewards"].append(float(rewards[i]))
            if terminations[i] or truncations[i]:
                finished.append(episodes[i])
                episode_returns.append(sum(episodes[i]["rewards"]))
                episodes[i] = {"obs": [], "actions": [], "rewards": []}
        autoreset = np.logical_or(terminations, truncations)
        obs = next_obs.reshape(args.num_envs, -1)

        if len(finished) >= args.episodes_per_update:
            # gradient of sum_t (G_t - baseline) log pi(a_t | s_t), with returns normalized over the batch
            batch_obs = np.concatenate([np.asarray(e["obs"]) for e in finished])
            batch_actions = np.concatenate([np.asarray(e["actions"]) for e in finished])
            returns = np.concatenate([discounted_returns(e["rewards"], args.gamma) for e in finished])
            advantages = (returns - returns.mean()) / (returns.std() + 1e-8)
            features = np.concatenate([batch_obs, np.ones((len(batch_obs), 1))], axis=1)
            grad_logits = np.eye(num_actions)[batch_actions] - softmax_policy(weights, batch_obs)
            weights += args.learning_rate * features.T @ (advantages[:, None] * grad_logits) / len(finished)
            finished = []
            global_step = (step + 1) * args.num_envs
            print(f"global_step={global_step} charts/episodic_return={np.mean(episode_returns[-20:]):.1f} "
                  f"charts/SPS={int(global_step / (time.time() - start))}")

    envs.close()
    recent = episode_returns[-20:]
    print(f"episodes={len(episode_returns)} mean_return_last_20={np.mean(recent) if recent else float('nan'):.6f} "
          f"weights_l1={np.abs(weights).sum():.10f}")
