"""What the examples share: their command line, read from an ``Args`` dataclass (CleanRL style), GAE on
rewards the trainer changed, and the learning-curve plot.

Each trainer declares ``Args``: typed fields with defaults, a one-line docstring under each.  `parse_args`
turns the fields into flags (``num_envs`` -> ``--num-envs``; a ``bool`` field gives ``--lstm`` /
``--no-lstm``), their docstrings and defaults into ``--help``, and returns an ``Args``.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import time
import types
import typing
from typing import Callable

import numpy as np

import segvec

ArgsT = typing.TypeVar("ArgsT")


@dataclasses.dataclass
class PPOArgs:
    """The PPO update's hyperparameters (CleanRL's names and meanings).  A trainer's ``Args`` inherits them and
    redeclares a field to change its default or its description; its own flags come first in ``--help``."""

    learning_rate: float = 2.5e-4
    """Adam learning rate"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over `total_timesteps`"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    num_minibatches: int = 4
    """minibatches per epoch; each holds num_envs / num_minibatches whole rows, so it must divide num_envs"""
    update_epochs: int = 4
    """epochs over each batch"""
    norm_adv: bool = True
    """normalize advantages per minibatch"""
    clip_coef: float = 0.2
    """PPO surrogate clipping"""
    clip_vloss: bool = True
    """clip the value loss too"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient norm clip"""
    target_kl: float = 0.0
    """stop an update's epochs early past this approximate KL (0: off)"""


def field_docs(args_class: type) -> dict[str, str]:
    """The docstring written under each field of `args_class` or of a base class it inherits the field from
    (the most derived one wins; ``{}`` for a class whose source is not at hand)."""
    docs: dict[str, str] = {}
    for cls in reversed(args_class.__mro__):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        tree = ast.parse(textwrap.dedent(source))
        classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
        if not classes:
            continue
        body = classes[0].body
        for statement, following in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                text = " ".join(following.value.value.split())  # one paragraph: argparse rewraps it
                docs[statement.target.id] = text.replace("%", "%%")  # argparse formats help strings
    return docs


def build_parser(args_class: type, add_help: bool = True) -> argparse.ArgumentParser:
    """The parser of `args_class`: one flag per field, its docstring and its default in ``--help``."""
    module_doc = sys.modules[args_class.__module__].__doc__ or ""
    parser = argparse.ArgumentParser(description=(module_doc.strip().splitlines() or [""])[0], add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    types_, docs = typing.get_type_hints(args_class), field_docs(args_class)
    fields = dataclasses.fields(args_class)
    inherited = {f.name for base in args_class.__mro__[1:] if dataclasses.is_dataclass(base)
                 for f in dataclasses.fields(base)}
    for field in [f for f in fields if f.name not in inherited] + [f for f in fields if f.name in inherited]:
        flag, kind = "--" + field.name.replace("_", "-"), types_[field.name]
        help_text = docs.get(field.name, " ")  # never None: the formatter appends the default to help text only
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=help_text)
    return parser


def parse_args(args_class: type[ArgsT], argv: list[str] | None = None,
               defaults: Callable[[ArgsT], dict] | None = None,
               check: Callable[[ArgsT], str | None] | None = None) -> ArgsT:
    """An `args_class` instance from the command line (`argv`, default ``sys.argv[1:]``): one flag per field.

    Args:
        defaults: optional ``provisional args -> {field: default}``, for defaults that depend on other flags
            (on the env, say): they replace the dataclass's defaults, flags given on the command line win, and
            ``--help`` shows them.
        check: optional ``args -> error message or None``; a message ends the program as argparse does
            (usage, the message, exit status 2).
    """
    parser = build_parser(args_class)
    if defaults is not None:
        provisional, _ = build_parser(args_class, add_help=False).parse_known_args(argv)
        try:
            parser.set_defaults(**defaults(args_class(**vars(provisional))))
        except Exception as error:  # noqa: BLE001 - e.g. an unknown env id: say it as a command-line error
            parser.error(f"{type(error).__name__}: {error}")
    args = args_class(**vars(parser.parse_args(argv)))
    message = check(args) if check is not None else None
    if message:
        parser.error(message)
    return args


def gae_with_rewards(batch, rewards: np.ndarray, gamma: float, lam: float, **vtrace):
    """``segvec.gae`` of `batch` with its rewards replaced by `rewards` (scaled or clipped for training);
    the batch itself, and the episode returns segvec counted, keep the env's own rewards.  `vtrace`:
    ``rho_clip, c_clip, target_logprob`` of ``segvec.gae`` (the behaviour policy's are the batch's)."""
    fields = {name: getattr(batch, name) for name in ("value", "next_value", "terminated", "truncated", "mask",
                                                      "length", "logprob")}
    return segvec.gae(types.SimpleNamespace(reward=rewards, **fields), gamma, lam, **vtrace)


def update_metrics(rows, returns: np.ndarray, losses: dict, optimizer, recent, episodes: int, global_step: int,
                   start_time: float) -> dict:
    """An update's numbers under CleanRL's names: the learning rate, the mean of the `recent` episode returns,
    the episode count, env steps per second since `start_time`, the update's `losses` and the critic's
    explained variance over the real steps of `rows` (its ``value`` and ``mask`` against `returns`)."""
    real = rows.mask
    values, targets = rows.value[real], returns[real]
    var_y = np.var(targets)
    explained_var = np.nan if var_y == 0 else 1 - np.var(targets - values) / var_y
    return {
        "charts/learning_rate": optimizer.param_groups[0]["lr"],
        "charts/episodic_return": float(np.mean(recent)) if recent else float("nan"),
        "charts/episodes": episodes,
        "charts/SPS": int(global_step / (time.time() - start_time)),
        **losses,
        "losses/explained_variance": float(explained_var),
    }


def plot_learning_curve(path: str, steps, returns, window: int, title: str, xlabel: str = "env steps") -> None:
    """Writes a PNG of every episode's return against the step (`xlabel`) it ended at, and its running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, returns = np.asarray(steps), np.asarray(returns)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, returns, ".", alpha=0.3, label="episode return")
    if len(returns) >= window:
        rolling = np.convolve(returns, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], rolling, label=f"mean of last {window}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
