"""PPO on segvec segments (discrete or continuous actions), in one file.

The rollout writes itself: every ``envs.step`` stores the observation, the action and the policy's value
and log-probability in the env's current segment row.  Each update takes ``num_envs`` complete rows
(``horizon`` consecutive steps of one env each, with their bootstrap values attached), computes GAE with
``segvec.gae`` -- terminations and truncations kept apart, truncations bootstrapped from the value of the
final observation -- and trains on minibatches of whole rows.  ``--lstm`` makes the policy recurrent: the
LSTM state at each row's first step travels with the row (a segment field) and ``episode_start`` resets it
inside rows, so training replays every row exactly as it was played.

Discrete action spaces get a categorical policy; Box action spaces a Gaussian one (a mean per action
dimension, a log-std that does not depend on the observation).  The defaults of `Args` are CartPole's; a
Box action space gets those of `CONTINUOUS` (continuous control, with observation and reward
normalization), and the envs of `ENV_DEFAULTS` their own, except where a flag is given on the command line
(``--env-id ENV --help`` shows the defaults ENV gets).  The run stops once the mean return of the last
``solved_window`` episodes reaches the env spec's ``reward_threshold`` (or ``--solved-return``); an env
without one runs all ``total_timesteps``.

    python examples/ppo.py                                  # CartPole-v1, stops once solved (475)
    python examples/ppo.py --env-id segvec/CartPole-c       # the same CartPole in C, stepped by segvec's core
    python examples/ppo.py --env-id Acrobot-v1              # stops at -100
    python examples/ppo.py --env-id LunarLander-v3          # stops at 200 (Box2D: pip install -e ".[box2d]")
    python examples/ppo.py --env-id Pendulum-v1             # Box actions; no reward_threshold: 500k steps
    python examples/ppo.py --lstm                           # recurrent (slower: minibatches replay rows step by step)
    python examples/ppo.py --lstm --mask-velocity --norm-obs   # CartPole without velocities: needs the memory
    python examples/ppo.py --replay-ratio 0.25              # a quarter of each update's rows replayed, by priority
    python examples/ppo.py --eval-episodes 20               # then 20 greedy episodes on separate envs

Each update trains on minibatches of whole rows that the batch gathers itself (``batch.rows_view``): a batch is
never copied whole.  With ``--replay-ratio`` each update's fresh rows are joined by rows of older updates from a
prioritized `segvec.SegmentReplay` (priority: a row's mean |advantage|); GAE is V-trace-clipped against the
policy at the update's start, which is also PPO's reference policy, and a replayed row's policy loss is
weighed by its importance weight.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import time
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import segvec

from common import PPOArgs, gae_with_rewards, parse_args, plot_learning_curve, update_metrics  # examples/common.py


@dataclasses.dataclass
class Args(PPOArgs):
    exp_name: str = "ppo"
    """name of this experiment (used in the plot's title)"""
    seed: int = 1
    """seed of the envs, torch and numpy"""
    torch_threads: int = 1
    """torch CPU threads (small networks run fastest on one)"""
    cuda: bool = False
    """train on CUDA when it is available"""
    plot_path: str = "ppo_learning_curve.png"
    """where to write the learning-curve PNG ("" for none)"""
    curve_path: str = ""
    """also write every episode's (env step, wall seconds, return) as CSV here ("" for none)"""

    # Environments
    env_id: str = "CartPole-v1"
    """gymnasium id of the environment"""
    num_envs: int = 8
    """parallel envs; also the number of rows per update"""
    backend: str = "serial"
    """segvec backend: "serial" (in-process) or "multiprocessing" """
    num_workers: int = 0
    """worker processes for the multiprocessing backend (0: segvec's default)"""
    horizon: int = 128
    """steps per segment row, i.e. per env per update (Box action spaces: 256)"""
    total_timesteps: int = 500_000
    """env steps to run at most (LunarLander-v3: 2M)"""
    solved_return: float = 475.0
    """stop once the mean return of the last `solved_window` episodes reaches this. Default: the env spec's
    reward_threshold (CartPole-v1 475, Acrobot-v1 -100, LunarLander-v3 200), inf (never stop) for an env
    without one (Pendulum-v1)"""
    solved_window: int = 20
    """episodes in that mean"""

    # Algorithm (Box action spaces get the values of CONTINUOUS, some envs those of ENV_DEFAULTS, unless
    # given on the command line: `--env-id ENV --help` shows the defaults of ENV)
    learning_rate: float = 2.5e-3
    """Adam learning rate (Box action spaces: 1e-3)"""
    num_minibatches: int = 4
    """minibatches per epoch; each holds num_envs / num_minibatches whole rows, so it must divide num_envs
    (Box action spaces: 8)"""
    update_epochs: int = 4
    """epochs over each batch (Box action spaces: 10)"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    norm_obs: bool = False
    """feed the policy observations normalized by their running mean and std, updated after each update
    (Box action spaces: on)"""
    norm_reward: bool = False
    """train on rewards divided by the running std of the discounted return; episode returns stay the env's
    (Box action spaces: on)"""
    lstm: bool = False
    """recurrent policy (LSTM state carried by segment fields)"""
    lstm_hidden: int = 64
    """LSTM state size"""
    mask_velocity: bool = False
    """CartPole: drop the cart's and the pole's velocities from the observation, so that only a policy with
    memory can tell where the pole is going"""
    replay_ratio: float = 0.0
    """fraction of each update's rows replayed from older updates (segvec.SegmentReplay, prioritized by mean
    |advantage|, corrected by V-trace-clipped GAE); 0: on-policy PPO"""
    replay_capacity: int = 64
    """rows the replay keeps (the newest; older ones are evicted first)"""
    eval_episodes: int = 0
    """at the end, evaluate the greedy policy on this many episodes of separate envs (envs.evaluate)"""


CONTINUOUS = dict(horizon=256, learning_rate=1e-3, num_minibatches=8, update_epochs=10, norm_obs=True,
                  norm_reward=True)
"""The defaults of Box action spaces (continuous control), where they differ from `Args`' (those of CartPole)."""

ENV_DEFAULTS = {
    "LunarLander-v3": dict(num_envs=32, learning_rate=3e-4, gamma=0.999, gae_lambda=0.98, ent_coef=0.01,
                           num_minibatches=8, update_epochs=10, norm_reward=True, total_timesteps=2_000_000),
}
"""Defaults of particular envs, where they differ from `Args`' (and `CONTINUOUS`)."""


def env_defaults(args: Args) -> dict:
    """The defaults that depend on the env (`parse_args` lets flags given on the command line win): the
    stop threshold from its spec, `CONTINUOUS` for a Box action space, and the env's `ENV_DEFAULTS`."""
    env = make_env(args.env_id, args.mask_velocity)()
    threshold = env.spec.reward_threshold if env.spec is not None else None
    continuous = isinstance(env.action_space, gym.spaces.Box)
    env.close()
    return {"solved_return": math.inf if threshold is None else float(threshold),
            **(CONTINUOUS if continuous else {}), **ENV_DEFAULTS.get(args.env_id, {})}


def check_args(args: Args) -> str | None:
    """What is wrong with `args`, said as a command-line error (None when nothing is)."""
    if args.num_envs < 1 or args.num_minibatches < 1 or args.num_envs % args.num_minibatches:
        return (f"--num-minibatches {args.num_minibatches} must divide --num-envs {args.num_envs}: each minibatch "
                f"holds whole rows (num_envs / num_minibatches of them, {args.horizon} steps each)")
    replay_ratio = getattr(args, "replay_ratio", 0.0)  # (ppo_atari.py's Args have none)
    if not 0.0 <= replay_ratio < 1.0:
        return f"--replay-ratio {replay_ratio} must be in [0, 1)"
    if args.total_timesteps < args.num_envs * args.horizon:
        return (f"--total-timesteps {args.total_timesteps} is less than one update's "
                f"--num-envs {args.num_envs} x --horizon {args.horizon} steps")
    return None


class MaskVelocity(gym.ObservationWrapper):
    """CartPole without velocities: the observation is ``[cart position, pole angle]`` (of the four), so the
    current observation alone does not say where the pole is going: a policy needs memory."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        box = env.observation_space
        if not isinstance(box, gym.spaces.Box) or box.shape != (4,):
            raise ValueError(f"--mask-velocity is for CartPole's 4-number observation, not {box}")
        self.observation_space = gym.spaces.Box(box.low[[0, 2]], box.high[[0, 2]], dtype=box.dtype)

    def observation(self, observation):
        return observation[[0, 2]]


def make_env(env_id: str, mask_velocity: bool = False):
    """A zero-argument env constructor (segvec counts episode returns itself: no statistics wrapper needed).

    A Box action space gets gymnasium's ClipAction: the policy's Gaussian sample is sent and stored in the
    row as it is (the log-probability stored is that sample's), and the env clips it to the space's bounds.
    `mask_velocity` wraps it in `MaskVelocity`.
    """

    def thunk():
        env = gym.make(env_id)
        if isinstance(env.action_space, gym.spaces.Box):
            env = gym.wrappers.ClipAction(env)
        if mask_velocity:
            env = MaskVelocity(env)
        return env

    return thunk


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def sample_action(logits: torch.Tensor):
    """One action per row of `logits` ``[n, A]``: ``(action [n], its log-probability [n])``."""
    logprob_all = logits.log_softmax(-1)
    action = torch.multinomial(logprob_all.exp(), 1)
    return action.squeeze(-1), logprob_all.gather(-1, action).squeeze(-1)


class CategoricalHead(nn.Module):
    """The policy of a Discrete action space: its output is one logit per action."""

    def __init__(self, hidden: int, num_actions: int):
        super().__init__()
        self.logits = layer_init(nn.Linear(hidden, num_actions), std=0.01)

    def forward(self, features):
        return self.logits(features)

    def sample(self, logits):
        """``(action, log-probability)`` per row of `logits`."""
        return sample_action(logits)

    def logprob_entropy(self, logits, action):
        """Log-probability of `action` (``[...]``) and entropy under `logits` (``[..., A]``)."""
        logprob_all = logits.log_softmax(-1)
        logprob = logprob_all.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
        return logprob, -(logprob_all.exp() * logprob_all).sum(-1)


class GaussianHead(nn.Module):
    """The policy of a Box action space: its output is the mean of a diagonal Gaussian; the log-std is a
    parameter per action dimension that does not depend on the observation (CleanRL's ppo_continuous_action)."""

    def __init__(self, hidden: int, action_dim: int):
        super().__init__()
        self.mean = layer_init(nn.Linear(hidden, action_dim), std=0.01)
        self.logstd = nn.Parameter(torch.zeros(action_dim))

    def forward(self, features):
        return self.mean(features)

    def sample(self, mean):
        """``(action, log-probability)`` per row of `mean`: the unclipped sample (the env clips it)."""
        action = mean + self.logstd.exp() * torch.randn_like(mean)
        return action, self.logprob_entropy(mean, action)[0]

    def logprob_entropy(self, mean, action):
        """Log-probability of `action` (``[..., D]``, summed over D) and entropy under the Gaussian at `mean`."""
        logstd = self.logstd.expand_as(mean)
        logprob = -0.5 * ((action - mean) / logstd.exp()) ** 2 - logstd - 0.5 * math.log(2 * math.pi)
        entropy = logstd + 0.5 * (1.0 + math.log(2 * math.pi))
        return logprob.sum(-1), entropy.sum(-1)


def make_head(hidden: int, action_space: gym.Space) -> nn.Module:
    if isinstance(action_space, gym.spaces.Discrete):
        return CategoricalHead(hidden, int(action_space.n))
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        return GaussianHead(hidden, action_space.shape[0])
    raise TypeError(f"examples/ppo.py handles Discrete and 1-D Box action spaces, not {action_space}")


class ObsNorm(nn.Module):
    """Observations minus their running mean, over their running std, clipped to [-clip, clip].

    Part of the policy: the log-probabilities stored in the rows are those of the policy with the statistics
    of their time, and the statistics change only after an update (`update`), like the weights: PPO's ratio
    then weighs the change of both.  ``enabled=False`` makes it the identity.
    """

    def __init__(self, obs_dim: int, enabled: bool, clip: float = 10.0):
        super().__init__()
        self.enabled, self.clip = enabled, clip
        self.register_buffer("mean", torch.zeros(obs_dim))
        self.register_buffer("var", torch.ones(obs_dim))
        self.register_buffer("count", torch.tensor(1e-4))

    def forward(self, obs):
        if not self.enabled:
            return obs
        return ((obs - self.mean) / (self.var + 1e-8).sqrt()).clamp(-self.clip, self.clip)

    @torch.no_grad()
    def update(self, obs):
        """Merges the mean and variance of `obs` ``[k, obs_dim]`` into the running ones."""
        if not self.enabled or not len(obs):
            return
        obs = obs.double()
        batch_mean, batch_var, batch_count = obs.mean(0), obs.var(0, unbiased=False), obs.shape[0]
        delta, total = batch_mean - self.mean, self.count + batch_count
        self.var.copy_((self.var * self.count + batch_var * batch_count
                        + delta ** 2 * self.count * batch_count / total) / total)
        self.mean.add_(delta * batch_count / total)
        self.count.fill_(total)


class ReturnScale:
    """The running std of each env's discounted return (CleanRL's NormalizeReward, on the learner's side):
    rewards divided by `scale` keep the critic's targets near unit size.  Episode returns are not touched."""

    def __init__(self, num_envs: int, gamma: float):
        self.gamma = gamma
        self.discounted = np.zeros(num_envs)
        self.count, self.mean, self.var = 1e-4, 0.0, 1.0

    def update(self, reward, real, done) -> None:
        """One vector step: `reward`, `real` (the step was a transition, not a NEXT_STEP reset), `done`."""
        self.discounted = np.where(real, self.discounted * self.gamma + reward, self.discounted)
        x = self.discounted[real]
        if len(x):
            delta, total = x.mean() - self.mean, self.count + len(x)
            self.var = (self.var * self.count + x.var() * len(x) + delta ** 2 * self.count * len(x) / total) / total
            self.mean += delta * len(x) / total
            self.count = total
        self.discounted[done] = 0.0

    @property
    def scale(self) -> float:
        return float(np.sqrt(self.var + 1e-8))


class Agent(nn.Module):
    """Separate actor and critic MLPs.  Stateless: its recurrent state is the empty tuple."""

    def __init__(self, obs_dim: int, action_space: gym.Space, norm_obs: bool = False):
        super().__init__()
        self.obs_norm = ObsNorm(obs_dim, norm_obs)
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            make_head(64, action_space),
        )
        self.head = self.actor[-1]

    def initial_state(self, n: int) -> tuple:
        return ()

    def forward(self, obs, state, episode_start):
        """One step for a batch: ``(policy output [n, ...], value [n], new_state)`` (the output: logits, or
        the Gaussian's mean; `head` samples from it)."""
        obs = self.obs_norm(obs)
        return self.actor(obs), self.critic(obs).squeeze(-1), state

    def unroll(self, obs, state, episode_start):
        """Whole rows ``[n, T, ...]`` from their first step's state: ``(policy output [n, T, ...], values [n, T])``."""
        obs = self.obs_norm(obs)
        return self.actor(obs), self.critic(obs).squeeze(-1)


class LSTMAgent(nn.Module):
    """An MLP encoder, an LSTM cell whose state resets where ``episode_start``, actor and critic heads."""

    def __init__(self, obs_dim: int, action_space: gym.Space, hidden: int, norm_obs: bool = False):
        super().__init__()
        self.hidden = hidden
        self.obs_norm = ObsNorm(obs_dim, norm_obs)
        self.encoder = nn.Sequential(layer_init(nn.Linear(obs_dim, 64)), nn.Tanh())
        self.cell = nn.LSTMCell(64, hidden)
        self.actor = make_head(hidden, action_space)
        self.critic = layer_init(nn.Linear(hidden, 1), std=1.0)
        self.head = self.actor

    def initial_state(self, n: int) -> tuple:
        return torch.zeros(n, self.hidden), torch.zeros(n, self.hidden)

    def forward(self, obs, state, episode_start):
        keep = (~episode_start).float().unsqueeze(-1)
        h, c = self.cell(self.encoder(self.obs_norm(obs)), (state[0] * keep, state[1] * keep))
        return self.actor(h), self.critic(h).squeeze(-1), (h, c)

    def unroll(self, obs, state, episode_start):
        outputs = []
        for t in range(obs.shape[1]):
            out, value, state = self(obs[:, t], state, episode_start[:, t])
            outputs.append((out, value))
        return torch.stack([o[0] for o in outputs], 1), torch.stack([o[1] for o in outputs], 1)


class GreedyPolicy:
    """The agent's most likely action (categorical: the argmax; Gaussian: the mean), for `envs.evaluate`
    with ``episode_start=True``: row i of every call is one evaluation env, whose recurrent state it keeps."""

    def __init__(self, agent: nn.Module, device: torch.device):
        self.agent, self.device, self.state = agent, device, None

    @torch.no_grad()
    def __call__(self, obs, episode_start):
        if self.state is None:
            self.state = tuple(s.to(self.device) for s in self.agent.initial_state(len(obs)))
        start = torch.as_tensor(episode_start, device=self.device)
        out, _, self.state = self.agent(torch.as_tensor(obs, device=self.device), self.state, start)
        action = out.argmax(-1) if isinstance(self.agent.head, CategoricalHead) else out
        return action.cpu().numpy()


def make_agent(args: Args, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The agent `args` asks for, sized by one probe env, on `device`, and its Adam optimizer."""
    probe = make_env(args.env_id, args.mask_velocity)()
    obs_dim = int(np.prod(probe.observation_space.shape))
    action_space = probe.action_space
    probe.close()
    agent = (LSTMAgent(obs_dim, action_space, args.lstm_hidden, args.norm_obs) if args.lstm
             else Agent(obs_dim, action_space, args.norm_obs))
    agent = agent.to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    return agent, optimizer


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


class Rows(NamedTuple):
    """Whole rows of steps, ``[n, T, ...]`` tensors (row i: T consecutive steps of one env): what PPO trains on."""

    obs: torch.Tensor
    """``[n, T, *obs_shape]``: what the policy saw at each step"""
    action: torch.Tensor
    """``[n, T]`` (``[n, T, D]`` for Box actions): the action it took"""
    logprob: torch.Tensor
    """``[n, T]``: that action's log-probability under the policy PPO's ratio is taken against"""
    value: torch.Tensor
    """``[n, T]``: the critic's value of the step's observation then"""
    advantages: torch.Tensor
    """``[n, T]``: GAE advantages"""
    returns: torch.Tensor
    """``[n, T]``: advantages + value, the critic's targets"""
    mask: torch.Tensor
    """``[n, T]``: true (1) at real transitions, false at NEXT_STEP reset steps and a row's unused tail"""
    episode_start: torch.Tensor
    """``[n, T]`` bool: the recurrent state resets before this step"""
    state: tuple = ()
    """the recurrent state at each row's first step, ``[n, ...]`` tensors (``()`` for a stateless agent)"""
    weights: torch.Tensor | None = None
    """``[n]`` importance weights of prioritized replay on each row's policy loss (None: all 1)"""

    @property
    def num_rows(self) -> int:
        return self.obs.shape[0]

    def minibatches(self, num_minibatches: int):
        """One epoch: the rows in `num_minibatches` random minibatches of whole rows, by torch indexing (for
        rows already in torch memory; segvec batches gather their own minibatches: `BatchRows`)."""
        if self.num_rows % num_minibatches:
            raise ValueError(f"num_minibatches={num_minibatches} does not divide the batch's {self.num_rows} rows "
                             "(these minibatches hold equally many whole rows)")
        order = torch.randperm(self.num_rows, device=self.obs.device)
        size = self.num_rows // num_minibatches
        for start in range(0, self.num_rows, size):
            mb = order[start:start + size]
            yield Rows(*(field[mb] for field in self[:8]), state=tuple(s[mb] for s in self.state),
                       weights=None if self.weights is None else self.weights[mb])


class BatchRows:
    """A segvec batch (`SegmentBatch`, or the `ReplayBatch` of a replay mix) and its per-row training targets,
    ``[n, T]`` numpy arrays: each minibatch is a selection of the batch's own rows (``batch.rows_view``, as
    ``batch.minibatches`` makes them), gathered from the segment block at minibatch size and copied to the
    device as `Rows`; a batch's rows are never gathered whole.

    `logprob` replaces the batch's log-probabilities as PPO's reference (those of the policy at the update's
    start, for replayed rows); default the batch's own.
    """

    def __init__(self, batch, advantages: np.ndarray, returns: np.ndarray, device: torch.device,
                 logprob: np.ndarray | None = None):
        self.batch, self.device = batch, device
        self.targets = {"advantages": advantages, "returns": returns}
        if logprob is not None:
            self.targets["logprob"] = logprob
        self.recurrent = "h" in batch.fields()
        self.weighted = hasattr(batch, "weights")
        self.fields = ["obs", "action", "value", "mask", "episode_start"] + ["logprob"] * (logprob is None) \
            + ["h", "c"] * self.recurrent + ["weights"] * self.weighted
        self.num_rows = len(batch)

    def minibatches(self, num_minibatches: int):
        # The shuffle of `Rows.minibatches` (torch's default generator), rows in its order: the same seed gives
        # the same minibatches, row for row, so the update is the same to the bit.
        order = torch.randperm(self.num_rows).numpy()
        for part in np.array_split(order, num_minibatches):
            mb = self.batch.rows_view(part)
            seg = mb.to_torch(self.device, fields=self.fields)
            targets = {name: torch.as_tensor(value[part], device=self.device) for name, value in self.targets.items()}
            yield Rows(obs=seg.obs[:, :-1],  # obs[:, T] is the observation after the row (the next row's first)
                       action=seg.action, logprob=targets.get("logprob", getattr(seg, "logprob", None)),
                       value=seg.value, advantages=targets["advantages"], returns=targets["returns"],
                       mask=seg.mask, episode_start=seg.episode_start,
                       state=(seg.h, seg.c) if self.recurrent else (),
                       weights=seg.weights if self.weighted else None)


@torch.no_grad()
def logprob_of(agent: nn.Module, batch, device: torch.device) -> np.ndarray:
    """``[n, T]`` the log-probabilities the agent now gives the actions of the rows of `batch` (replayed
    whole from each row's stored first-step state)."""
    recurrent = "h" in batch.fields()
    seg = batch.to_torch(device, fields=["obs", "action", "episode_start"] + ["h", "c"] * recurrent)
    out, _ = agent.unroll(seg.obs[:, :-1].float(), (seg.h, seg.c) if recurrent else (), seg.episode_start)
    return agent.head.logprob_entropy(out, seg.action)[0].cpu().numpy()


def ppo_update(agent: nn.Module, optimizer: torch.optim.Optimizer, rows, args: Args) -> dict[str, float]:
    """PPO epochs over minibatches of whole rows; returns the losses of the last minibatch (``losses/...``).

    `rows` makes each epoch's minibatches (``rows.minibatches(num_minibatches)``, `Rows` each): `BatchRows`
    over a segvec batch (minibatches of ``n // num_minibatches`` or one more rows), or `Rows` already in torch
    memory (`num_minibatches` must divide its rows: ValueError).  Clipped surrogate (each row's policy loss times
    its importance weight, when it has one) and (with `args.clip_vloss`) clipped value loss, means over real
    transitions only.  Reads the algorithm's fields of `args` (``update_epochs``, ``num_minibatches``,
    ``clip_coef``, ...).
    """
    clipfracs = []
    for epoch in range(args.update_epochs):
        for mb in rows.minibatches(args.num_minibatches):
            mb_mask = mb.mask.float()
            out, new_value = agent.unroll(mb.obs.float(), mb.state, mb.episode_start)
            new_logprob, entropy = agent.head.logprob_entropy(out, mb.action)
            logratio = torch.where(mb.mask, new_logprob - mb.logprob, 0.0)
            ratio = logratio.exp()

            with torch.no_grad():
                approx_kl = masked_mean((ratio - 1) - logratio, mb_mask)
                clipfracs.append(masked_mean(((ratio - 1.0).abs() > args.clip_coef).float(), mb_mask).item())

            mb_advantages = mb.advantages
            if args.norm_adv:
                mean = masked_mean(mb_advantages, mb_mask)
                std = masked_mean((mb_advantages - mean) ** 2, mb_mask).sqrt()
                mb_advantages = (mb_advantages - mean) / (std + 1e-8)

            # Policy loss (rows drawn by priority weigh by their importance weight)
            pg_loss1 = -mb_advantages * ratio
            pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
            pg_loss = torch.max(pg_loss1, pg_loss2)
            if mb.weights is not None:
                pg_loss = pg_loss * mb.weights[:, None]
            pg_loss = masked_mean(pg_loss, mb_mask)

            # Value loss
            mb_returns, mb_values = mb.returns, mb.value
            if args.clip_vloss:
                v_loss_unclipped = (new_value - mb_returns) ** 2
                v_clipped = mb_values + torch.clamp(new_value - mb_values, -args.clip_coef, args.clip_coef)
                v_loss_clipped = (v_clipped - mb_returns) ** 2
                v_loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mb_mask)
            else:
                v_loss = 0.5 * masked_mean((new_value - mb_returns) ** 2, mb_mask)

            entropy_loss = masked_mean(entropy, mb_mask)
            loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()

        if args.target_kl and approx_kl > args.target_kl:
            break
    return {
        "losses/value_loss": v_loss.item(),
        "losses/policy_loss": pg_loss.item(),
        "losses/entropy": entropy_loss.item(),
        "losses/approx_kl": approx_kl.item(),
        "losses/clipfrac": float(np.mean(clipfracs)),
    }


if __name__ == "__main__":
    args = parse_args(Args, defaults=env_defaults, check=check_args)
    num_iterations = args.total_timesteps // (args.num_envs * args.horizon)

    # ---- Seeding and device ---------------------------------------------------------------------
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    # ---- Agent, sized by one probe env --------------------------------------------------------------
    agent, optimizer = make_agent(args, device)
    return_scale = ReturnScale(args.num_envs, args.gamma) if args.norm_reward else None

    # ---- Environments: segment rows of `horizon` steps, LSTM state stored at each row's start --------
    start_time = time.time()
    segment_fields = None
    if args.lstm:
        segment_fields = {"h": ((args.lstm_hidden,), np.float32), "c": ((args.lstm_hidden,), np.float32)}
    envs = segvec.make_vec(
        make_env(args.env_id, args.mask_velocity), num_envs=args.num_envs, backend=args.backend,
        num_workers=args.num_workers or None, horizon=args.horizon, segment_fields=segment_fields,
    )

    replay = segvec.SegmentReplay(args.replay_capacity, prioritized=True, seed=args.seed) if args.replay_ratio else None

    # ---- Start the game -------------------------------------------------------------------------
    global_step = 0
    next_obs, _ = envs.reset(seed=args.seed)
    state = tuple(s.to(device) for s in agent.initial_state(args.num_envs))
    episode_start = torch.ones(args.num_envs, dtype=torch.bool, device=device)
    needs_reset = np.zeros(args.num_envs, dtype=bool)  # NEXT_STEP autoreset: the next step resets the env
    episode_steps, episode_times, episode_returns = [], [], []
    recent = collections.deque(maxlen=args.solved_window)
    metrics: dict = {}
    solved = False
    progress = tqdm(total=args.total_timesteps, unit="step", unit_scale=True, dynamic_ncols=True)

    for iteration in range(1, num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        # ---- Rollout: step until every env has closed a row (horizon steps + its bootstrap) -------
        # A row is complete once the value of the env's next observation is sent with the next step,
        # so the first step of each row was taken by the policy before the previous update; its
        # recorded log-probability keeps the PPO ratio exact.
        while envs.segments_ready < args.num_envs:
            with torch.no_grad():
                obs = torch.as_tensor(next_obs, device=device)
                out, value, new_state = agent(obs, state, episode_start)
                action, logprob = agent.head.sample(out)
            recurrent = {"h": state[0].cpu().numpy(), "c": state[1].cpu().numpy()} if args.lstm else {}
            next_obs, reward, terminated, truncated, _ = envs.step(
                action.cpu().numpy(), value=value.cpu().numpy(), logprob=logprob.cpu().numpy(), **recurrent)
            state = new_state
            global_step += args.num_envs
            if return_scale is not None:
                return_scale.update(reward, ~needs_reset, terminated | truncated)
            # NEXT_STEP autoreset: after a done step the env's next action is ignored and the observation
            # after that one starts a new episode.
            episode_start = torch.as_tensor(needs_reset, device=device)
            needs_reset = terminated | truncated
        progress.update(global_step - progress.n)

        finished = envs.episodes()
        episode_returns.extend(finished["return"].tolist())
        episode_steps.extend([global_step] * len(finished["return"]))
        episode_times.extend([time.time() - start_time] * len(finished["return"]))
        recent.extend(finished["return"].tolist())

        # ---- Advantages: GAE within each row, on the bootstraps segvec attached --------------------
        with envs.take_segments(args.num_envs) as batch:  # the rows go back to the envs at the block's end
            rows, now_logprob, vtrace = batch, None, {}
            if replay is not None:  # the fresh rows, then rows of older updates drawn by priority (copies)
                rows = replay.mix(batch, args.replay_ratio)
                # PPO's ratio is taken against the policy at the update's start, and V-trace corrects the
                # GAE of rows an older policy played (for fresh rows it is the same policy: weights 1).
                now_logprob = logprob_of(agent, rows, device)
                vtrace = dict(rho_clip=1.0, c_clip=1.0, target_logprob=now_logprob)
            if return_scale is None:
                advantages, returns = segvec.gae(rows, args.gamma, args.gae_lambda, **vtrace)
            else:  # the same GAE on rewards / the return's std: the critic learns returns of that scale
                advantages, returns = gae_with_rewards(rows, rows.reward / np.float32(return_scale.scale),
                                                       args.gamma, args.gae_lambda, **vtrace)
            if replay is not None:  # priority: a row's mean |advantage| over its real steps
                priority = np.abs(advantages).sum(1) / np.maximum(rows.mask.sum(1), 1)
                replay.update_priorities(rows.row_ids[rows.replayed], priority[rows.replayed])
                replay.add(batch, priority=priority[~rows.replayed])

            # ---- Update: PPO epochs over minibatches of whole rows, gathered by the batch itself ---
            losses = ppo_update(agent, optimizer, BatchRows(rows, advantages, returns, device, now_logprob), args)
            # The observation statistics move after the update, with the weights: the next rollout's policy.
            if agent.obs_norm.enabled:
                agent.obs_norm.update(torch.as_tensor(batch.obs[:, :-1][batch.mask], device=device).float())

            # ---- Bookkeeping -----------------------------------------------------------------------
            metrics = update_metrics(rows, returns, losses, optimizer, recent, len(episode_returns), global_step,
                                     start_time)
        progress.set_postfix(ret=f"{metrics['charts/episodic_return']:.1f}", sps=metrics["charts/SPS"],
                             refresh=False)
        if len(recent) == args.solved_window and np.mean(recent) >= args.solved_return:
            solved = True
            break

    # ---- Done: final numbers, an evaluation, and the learning curve --------------------------------
    progress.close()
    elapsed = time.time() - start_time
    if args.eval_episodes:  # whole episodes on envs of their own: the training rows are not touched
        result = envs.evaluate(GreedyPolicy(agent, device), num_episodes=args.eval_episodes, seed=args.seed + 10_000,
                               episode_start=True)
        metrics["eval/mean_return"] = float(result["return"].mean())
        metrics["eval/mean_length"] = float(result["length"].mean())
    envs.close()
    for name, value in metrics.items():
        print(f"{name:32s} {value:.6g}")
    print(f"{'solved' if solved else 'not solved'}: mean return of the last {len(recent)} episodes "
          f"{np.mean(recent) if recent else float('nan'):.1f} after {global_step} steps, {len(episode_returns)} "
          f"episodes, {elapsed:.1f} s ({global_step / elapsed:.0f} steps/s)")
    if args.curve_path:
        np.savetxt(args.curve_path, np.column_stack([episode_steps, episode_times, episode_returns]), delimiter=",",
                   header="step,seconds,return", comments="", fmt=["%d", "%.3f", "%.6g"])
    if args.plot_path:
        title = (f"{args.exp_name}{' (LSTM)' if args.lstm else ''} on {args.env_id}"
                 f"{' without velocities' if args.mask_velocity else ''} (segvec, {args.num_envs} envs)")
        plot_learning_curve(args.plot_path, episode_steps, episode_returns, args.solved_window, title)
        print(f"learning curve: {os.path.abspath(args.plot_path)}")
