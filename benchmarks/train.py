"""Wall time to solve CartPole-v1: examples/ppo.py (segvec) against the same PPO on gymnasium's SyncVectorEnv.

Both runs use the hyperparameters of ``examples/ppo.py``'s ``Args`` and its code for everything but the
rollout (the baseline imports its ``Args``, ``make_env``, ``make_agent``, ``sample_action`` and
``ppo_update``), the same seeds, the same stop rule (mean return of the last 20 episodes >= 475), and time
the same span: from building the envs to the solving update (the agent and its optimizer are built before,
in both).  Each run is a fresh process; the two trainers alternate seed by seed.

The baseline is CleanRL's loop made to compute the same thing as the segvec trainer: time-major storage
tensors filled step by step, NEXT_STEP autoreset steps masked out, truncations bootstrapped from the value
of the final observation (the value computed at the masked step that follows), GAE with the C kernel's
semantics; ``ppo_update`` then trains on minibatches of whole env columns (the segvec trainer's rows).

    python benchmarks/train.py                   # seeds 1 2 3
    python benchmarks/train.py --seeds 1 2 3 4 5 --backend multiprocessing

CartPole's physics costs a few microseconds a step, so on a small machine both trainers spend their time
in the network and in Python, which are the same in both.  ``--env-cost-us`` makes every env step also
burn that much CPU (``SlowCartPole-v1``, standing in for an env with real physics) to show what parallel
workers buy once the env is what costs; use it with ``--backend multiprocessing``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

import gymnasium as gym

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PPO = EXAMPLES / "ppo.py"
SOLVED_LINE = re.compile(r"^(solved|not solved): .* after (\d+) steps, (\d+) episodes, ([0-9.]+) s")
ENV_COST_VARIABLE = "SEGVEC_BENCH_ENV_COST_US"
SLOW_ENV_ID = "benchmarks.train:SlowCartPole-v1"  # gymnasium imports this module, which registers it


class SlowCartPole(gym.Wrapper):
    """CartPole-v1 whose every step also burns ``$SEGVEC_BENCH_ENV_COST_US`` microseconds of CPU."""

    def __init__(self):
        super().__init__(gym.make("CartPole-v1"))
        self.cost = float(os.environ.get(ENV_COST_VARIABLE, "0")) * 1e-6

    def step(self, action):
        end = time.perf_counter() + self.cost
        while time.perf_counter() < end:
            pass
        return self.env.step(action)


if "SlowCartPole-v1" not in gym.registry:
    gym.register("SlowCartPole-v1", entry_point=SlowCartPole)


def load_ppo():
    """examples/ppo.py as a module (imported on demand: gymnasium imports this module to make SlowCartPole)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # where ppo.py and its examples/common.py are
    import ppo

    return ppo


def baseline(seed: int, env_id: str) -> None:
    """CleanRL-style PPO on SyncVectorEnv with examples/ppo.py's hyperparameters; prints its solved line."""
    import collections

    import numpy as np
    import torch

    ppo = load_ppo()
    args = ppo.Args(seed=seed, env_id=env_id)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    N, T = args.num_envs, args.horizon
    num_iterations = args.total_timesteps // (N * T)
    agent, optimizer = ppo.make_agent(args, torch.device("cpu"))

    start_time = time.time()
    envs = gym.vector.SyncVectorEnv([ppo.make_env(args.env_id) for _ in range(N)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)

    obs = torch.zeros((T, N) + envs.single_observation_space.shape)
    actions = torch.zeros((T, N), dtype=torch.long)
    logprobs = torch.zeros((T, N))
    rewards = torch.zeros((T, N))
    terminations = torch.zeros((T, N), dtype=torch.bool)
    truncations = torch.zeros((T, N), dtype=torch.bool)
    masks = torch.zeros((T, N), dtype=torch.bool)
    values = torch.zeros((T, N))
    no_episode_start = torch.zeros((N, T), dtype=torch.bool)  # the MLP agent has no state to reset

    global_step = 0
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = torch.as_tensor(next_obs)
    needs_reset = torch.zeros(N, dtype=torch.bool)
    recent = collections.deque(maxlen=args.solved_window)
    episodes = 0
    solved = False
    for iteration in range(1, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
        for step in range(T):
            global_step += N
            obs[step] = next_obs
            masks[step] = ~needs_reset  # NEXT_STEP: this step only resets the env
            with torch.no_grad():
                logits, value, _ = agent(next_obs, (), None)
                action, logprobs[step] = ppo.sample_action(logits)
            values[step] = value
            actions[step] = action
            next_obs, reward, terminated, truncated, infos = envs.step(action.numpy())
            rewards[step] = torch.as_tensor(reward)
            terminations[step] = torch.as_tensor(terminated)
            truncations[step] = torch.as_tensor(truncated)
            needs_reset = torch.as_tensor(terminated | truncated)
            next_obs = torch.as_tensor(next_obs)
            if "_episode" in infos:
                finished = infos["episode"]["r"][infos["_episode"]]
                recent.extend(finished.tolist())
                episodes += len(finished)

        # GAE with the C kernel's semantics, time-major, vectorized across envs.
        with torch.no_grad():
            last_value = agent(next_obs, (), None)[1]
        next_values = torch.cat([values[1:], last_value[None]], 0)
        next_values = torch.where(terminations, 0.0, next_values)
        deltas = rewards + args.gamma * next_values - values
        carry = torch.where(terminations | truncations, 0.0, args.gamma * args.gae_lambda)
        advantages = torch.zeros((T, N))
        running = torch.zeros(N)
        for t in reversed(range(T)):
            running = torch.where(masks[t], deltas[t] + carry[t] * running, 0.0)
            advantages[t] = running
        returns = advantages + values

        # The example's update, on the env columns as rows ([N, T] views of the time-major storage).
        rows = ppo.Rows(obs=obs.transpose(0, 1), action=actions.T, logprob=logprobs.T, value=values.T,
                        advantages=advantages.T, returns=returns.T, mask=masks.T, episode_start=no_episode_start)
        ppo.ppo_update(agent, optimizer, rows, args)
        if len(recent) == args.solved_window and np.mean(recent) >= args.solved_return > 0:
            solved = True
            break
    elapsed = time.time() - start_time
    envs.close()
    print(f"{'solved' if solved else 'not solved'}: mean return of the last {len(recent)} episodes "
          f"{np.mean(recent):.1f} after {global_step} steps, {episodes} episodes, {elapsed:.1f} s "
          f"({global_step / elapsed:.0f} steps/s)")


def run(command: list[str], env_cost_us: float) -> tuple[bool, int, float]:
    """Runs one trainer; returns (solved, env steps, seconds from env creation to the end)."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    environment[ENV_COST_VARIABLE] = str(env_cost_us)
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    for line in out.stdout.splitlines():
        match = SOLVED_LINE.match(line)
        if match:
            return match.group(1) == "solved", int(match.group(2)), float(match.group(4))
    raise RuntimeError(f"no result line in the output of {' '.join(command)}:\n{out.stdout[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--backend", default=None, help="segvec backend for examples/ppo.py (default: its own)")
    parser.add_argument("--env-cost-us", type=float, default=0.0,
                        help="CPU microseconds every env step burns on top of CartPole's (SlowCartPole-v1)")
    parser.add_argument("--baseline-seed", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--env-id", default="CartPole-v1", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.baseline_seed is not None:
        baseline(options.baseline_seed, options.env_id)
        return
    env_id = SLOW_ENV_ID if options.env_cost_us else "CartPole-v1"

    ppo = load_ppo()
    defaults = ppo.Args()
    backend = options.backend or defaults.backend
    cost = f" (+{options.env_cost_us:g} us of CPU per step)" if options.env_cost_us else ""
    print(f"{env_id}{cost} PPO to mean return {defaults.solved_return:g} over {defaults.solved_window} episodes: "
          f"num_envs={defaults.num_envs} horizon={defaults.horizon} lr={defaults.learning_rate:g} "
          f"epochs={defaults.update_epochs} minibatches={defaults.num_minibatches}; segvec backend={backend}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'seed':>4} {'trainer':>10} {'solved':>6} {'steps':>8} {'seconds':>8} {'steps/s':>8}")
    results: dict[str, list] = {"segvec": [], "sync": []}
    for seed in options.seeds:
        commands = {
            "segvec": [sys.executable, str(PPO), "--seed", str(seed), "--plot-path", "", "--backend", backend,
                       "--env-id", env_id, "--solved-return", str(defaults.solved_return)],
            "sync": [sys.executable, __file__, "--baseline-seed", str(seed), "--env-id", env_id],
        }
        for name, command in commands.items():
            solved, steps, seconds = run(command, options.env_cost_us)
            results[name].append((solved, steps, seconds))
            print(f"{seed:>4} {name:>10} {str(solved):>6} {steps:>8} {seconds:>8.1f} {steps / seconds:>8.0f}",
                  flush=True)

    def summary(name):
        runs = results[name]
        return (statistics.median(r[2] for r in runs), statistics.median(r[1] for r in runs),
                sum(r[1] for r in runs) / sum(r[2] for r in runs), sum(r[0] for r in runs))

    seg_time, seg_steps, seg_sps, seg_solved = summary("segvec")
    base_time, base_steps, base_sps, base_solved = summary("sync")
    n = len(options.seeds)
    for name, (seconds, steps, sps, solved) in (("segvec", (seg_time, seg_steps, seg_sps, seg_solved)),
                                                ("sync", (base_time, base_steps, base_sps, base_solved))):
        print(f"{name + ':':7s} solved {solved}/{n}, median {seconds:.1f} s, median {steps:.0f} steps, "
              f"{sps:.0f} steps/s")
    print(f"wall time to solve, segvec / SyncVectorEnv (medians): {seg_time / base_time:.2f}x (target <= 0.5x)")
    print(f"time per env step, segvec / SyncVectorEnv: {base_sps / seg_sps:.2f}x")


if __name__ == "__main__":
    main()
