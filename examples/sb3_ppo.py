"""Stable-Baselines3's PPO trained on segvec envs, unchanged, through `SB3VecEnv`.

`make_sb3_vec_env` builds a `SegmentVecEnv` (SAME_STEP autoreset, each env wrapped in SB3's ``Monitor``) and
presents it as an SB3 ``VecEnv``; PPO, its logger and ``evaluate_policy`` use it like a ``SubprocVecEnv``.
Hyperparameters are the rl-baselines3-zoo ones for CartPole-v1.

    python examples/sb3_ppo.py                                   # CartPole-v1, 30k steps, under a minute
    python examples/sb3_ppo.py --total-timesteps 100000 --num-envs 16 --verbose 1
"""
from __future__ import annotations

import dataclasses
import time

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy

from segvec.integrations.sb3 import make_sb3_vec_env

from common import parse_args  # examples/common.py: flags from the fields of Args


@dataclasses.dataclass
class Args:
    seed: int = 1
    """seed of the envs, torch and numpy (SB3's set_random_seed)"""
    torch_threads: int = 1
    """torch CPU threads (small networks run fastest on one)"""
    verbose: int = 0
    """SB3's verbosity: 1 prints its training tables"""

    # Environments
    env_id: str = "CartPole-v1"
    """gymnasium id of the environment"""
    num_envs: int = 8
    """parallel envs"""
    backend: str = "multiprocessing"
    """segvec backend: "serial" (in-process) or "multiprocessing" """
    num_workers: int = 0
    """worker processes for the multiprocessing backend (0: segvec's default)"""
    total_timesteps: int = 30_000
    """env steps to train for"""
    eval_episodes: int = 10
    """episodes of the deterministic policy to evaluate after training (0: none)"""

    # Algorithm (rl-baselines3-zoo's CartPole-v1 settings)
    n_steps: int = 32
    """steps per env per rollout"""
    batch_size: int = 256
    """minibatch size"""
    n_epochs: int = 20
    """epochs over each rollout"""
    learning_rate: float = 1e-3
    """Adam learning rate"""
    gamma: float = 0.98
    """discount factor"""
    gae_lambda: float = 0.8
    """GAE lambda"""


if __name__ == "__main__":
    args = parse_args(Args)
    torch.set_num_threads(args.torch_threads)

    # ---- Environments: a SegmentVecEnv presented as an SB3 VecEnv ----------------------------------
    options = {"backend": args.backend}
    if args.backend == "multiprocessing" and args.num_workers:
        options["num_workers"] = args.num_workers
    env = make_sb3_vec_env(args.env_id, args.num_envs, **options)

    # ---- PPO, exactly as with any SB3 VecEnv ------------------------------------------------------
    model = PPO("MlpPolicy", env, n_steps=args.n_steps, batch_size=args.batch_size, n_epochs=args.n_epochs,
                learning_rate=args.learning_rate, gamma=args.gamma, gae_lambda=args.gae_lambda,
                seed=args.seed, device="cpu", verbose=args.verbose)
    start = time.time()
    model.learn(total_timesteps=args.total_timesteps)
    elapsed = time.time() - start
    episodes = list(model.ep_info_buffer)
    train_return = sum(e["r"] for e in episodes) / len(episodes) if episodes else float("nan")
    print(f"global_step={model.num_timesteps} charts/episodic_return={train_return:.1f} "
          f"charts/SPS={int(model.num_timesteps / elapsed)}")

    if args.eval_episodes:
        mean_return, std_return = evaluate_policy(model, env, n_eval_episodes=args.eval_episodes, deterministic=True)
        print(f"eval/mean_return={mean_return:.1f} eval/std_return={std_return:.1f} episodes={args.eval_episodes}")
    env.close()
