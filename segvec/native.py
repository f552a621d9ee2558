"""Envs written in C: `NativeEnv` (a gymnasium.Env around one C env), `build` (compile a module of C env
classes with cffi, cached), and the C envs built into segvec.

The ABI is ``native/segvec_env.h``.  A `NativeEnv` works alone (``reset``/``step`` call the C functions, one
env at a time), under gymnasium's wrappers and checkers; inside a segvec vector env whose runner owns only
bare NativeEnvs of one class, the runner steps them all in one C call per batch (``segvec/runner.py``).

Built in (registered with gymnasium by ``import segvec``):
    ``segvec/CartPole-c``        `CartPoleEnv`: gymnasium's CartPole-v1, bit for bit, seeding included
    ``segvec/SyntheticAtari-c``  `SyntheticAtariEnv`: the synthetic Atari-shaped env of ``segvec.envs``

Your own (``examples/native_env/`` is a template)::

    module = segvec.native.build("my_envs", ["my_env.c"])      # compiled once, cached

    class MyEnv(segvec.native.NativeEnv):
        native = module.env_class("my_env")                     # the class's `name` in C

    envs = segvec.make_vec(MyEnv, num_envs=1024)                # or register an id: segvec.native.register

Example:
    >>> import gymnasium, segvec
    >>> env = gymnasium.make("segvec/CartPole-c")
    >>> obs, info = env.reset(seed=0)
    >>> reference = gymnasium.make("CartPole-v1")
    >>> bool((obs == reference.reset(seed=0)[0]).all())
    True
    >>> env.close(); reference.close()
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile
from typing import ClassVar, Sequence

import gymnasium
import numpy as np
from gymnasium import spaces

from segvec._core import ENV_ERR_ACTION, ENV_ERR_NOT_RESET, EnvClass, EnvMemory

__all__ = [
    "CartPoleEnv",
    "NativeBuildError",
    "NativeEnv",
    "NativeEnvError",
    "NativeModule",
    "SyntheticAtariEnv",
    "build",
    "header_dir",
    "register",
    "register_envs",
]

SEED_LIMIT = 2**64


class NativeEnvError(RuntimeError):
    """A C env's function returned a status of its own (its class's message says which).

    Attributes:
        status: the status it returned.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def env_error(env_class: EnvClass, status: int, action: str) -> Exception:
    """The exception a C env's failing status stands for: ValueError for an action outside the space,
    gymnasium's ResetNeeded for a step before the first reset, else NativeEnvError."""
    message = f"{env_class.name}.{action}: {env_class.strerror(status)} (status {status})"
    if status == ENV_ERR_ACTION:
        return ValueError(message)
    if status == ENV_ERR_NOT_RESET:
        return gymnasium.error.ResetNeeded(message)
    return NativeEnvError(message, status)


def check_seed(seed) -> int:
    """A seed as a C env takes it: an int in [0, 2**64).

    Raises:
        gymnasium.error.Error: anything else (gymnasium's own error for a negative seed).
    """
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT:
        return int(seed)
    raise gymnasium.error.Error(f"Seed must be a python integer in [0, 2**64) for a C env, actual type: "
                                f"{type(seed).__name__} ({seed!r})")


class NativeEnv(gymnasium.Env):
    """One env of a C env class, as a gymnasium.Env.

    Subclasses set the class attribute `native` (an `EnvClass`: ``module.env_class(name)``).  The spaces
    come from the C class: the observation is a Box of its shape and dtype; the action a ``Discrete(n)`` or a
    float32 ``Box``.  Infos are always ``{}``; there are no reset options and no rendering.

    Seeding follows gymnasium: ``reset(seed=s)`` seeds the env's generator as ``np_random`` would be seeded
    (numpy's PCG64 from SeedSequence(s), s in [0, 2**64)); an unseeded reset of an env never seeded seeds it
    from the OS.  ``np_random`` (and ``_np_random``) are numpy Generators holding a COPY of the C generator's
    state (draws from them do not advance the env's); assigning a PCG64 Generator sets the C generator.

    Args:
        max_episode_steps: this env's time limit (default: the class's; 0: none).  The core counts it.
        render_mode: only None.
        **params: the class's named parameters (floats), e.g. ``truncation_prob=0.5``.

    Raises:
        TypeError: an unknown parameter, or a subclass without `native`.
        ValueError: a render mode, or parameters the class's init refuses.
    """

    native: ClassVar[EnvClass | None] = None
    metadata = {"render_modes": []}

    def __init__(self, *, max_episode_steps: int | None = None, render_mode: str | None = None, **params):
        env_class = type(self).native
        if not isinstance(env_class, EnvClass):
            raise TypeError(f"{type(self).__name__} must set the class attribute `native` to a C env class "
                            "(module.env_class(name)), see segvec.native")
        if render_mode is not None:
            raise ValueError(f"C envs do not render: render_mode must be None, got {render_mode!r}")
        unknown = set(params) - set(env_class.params)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected parameters {sorted(unknown)}; "
                            f"its parameters are {list(env_class.params)}")
        self.params = {name: float(params.get(name, default)) for name, default in env_class.params.items()}
        if max_episode_steps is not None and (not isinstance(max_episode_steps, (int, np.integer))
                                              or max_episode_steps < 0):
            raise ValueError(f"max_episode_steps must be an int >= 0 (0: no limit), got {max_episode_steps!r}")
        self.render_mode = None
        self.observation_space = _observation_space(env_class)
        self.action_space = _action_space(env_class)
        self._memory = env_class.new_env(list(self.params.values()), max_episode_steps)

    @property
    def max_episode_steps(self) -> int:
        """This env's time limit (0: none)."""
        return int(self._memory.header.max_episode_steps)

    @property
    def elapsed_steps(self) -> int:
        """Steps of the current episode."""
        return int(self._memory.header.elapsed_steps)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Starts an episode; returns ``(obs, {})``.

        Raises:
            gymnasium.error.Error: a seed that is not an int in [0, 2**64).
            ValueError: reset options (C envs take none).
            NativeEnvError: the C reset failed.
        """
        if options:
            raise ValueError(f"C envs take no reset options, got {sorted(options)}")
        memory = self._memory
        status = memory.reset(None if seed is None else check_seed(seed))
        if status:
            raise env_error(memory.env_class, status, "reset")
        return memory.obs.copy(), {}

    def step(self, action):
        """Advances one step; returns ``(obs, reward, terminated, truncated, {})``.

        Raises:
            ValueError: a Discrete action outside [0, n) or not an integer, a Box action of the wrong shape.
            gymnasium.error.ResetNeeded: step before the first reset.
            NativeEnvError: the C step failed.
        """
        memory = self._memory
        if memory.env_class.discrete:
            value = np.asarray(action)
            if value.shape != () or value.dtype.kind not in "iu":
                raise ValueError(f"{type(self).__name__}: a Discrete action is one integer, got {action!r}")
            memory.action[()] = value
        else:
            value = np.asarray(action, np.float32)
            if value.size != memory.action.size:
                raise ValueError(f"{type(self).__name__}: the action has {value.size} values, the space "
                                 f"{self.action_space} takes {memory.action.size}")
            memory.action[:] = value.reshape(-1)
        status, reward, terminated, truncated = memory.step()
        if status:
            raise env_error(memory.env_class, status, "step")
        return memory.obs.copy(), reward, terminated, truncated, {}

    def render(self):
        return None

    # ---- the generator --------------------------------------------------------------------------------
    def _generator(self) -> np.random.Generator:
        bit_generator = np.random.PCG64()
        bit_generator.state = self._memory.rng_state()
        return np.random.Generator(bit_generator)

    @property
    def _np_random(self) -> np.random.Generator | None:  # (gymnasium's checker reads it)
        return None if self._memory.entropy() is None else self._generator()

    @_np_random.setter
    def _np_random(self, value) -> None:
        if "_memory" in self.__dict__:  # (gymnasium.Env's class attribute is not set on instances)
            self._memory.set_rng_state(None if value is None else value.bit_generator.state)

    @property
    def np_random(self) -> np.random.Generator:
        """A copy of the env's generator (seeded from the OS first if the env was never seeded)."""
        if self._memory.entropy() is None:
            self._memory.seed_from_os()
        return self._generator()

    @np_random.setter
    def np_random(self, value: np.random.Generator) -> None:
        self._memory.set_rng_state(value.bit_generator.state)

    @property
    def np_random_seed(self) -> int:
        """The entropy of the last seeding (-1 when the generator was set from a Generator)."""
        if self._memory.entropy() is None:
            self._memory.seed_from_os()
        return self._memory.entropy()

    # ---- copies ---------------------------------------------------------------------------------------
    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k != "_memory"}
        state["_memory_bytes"] = self._memory.bytes.tobytes()
        return state

    def __setstate__(self, state):
        raw = state.pop("_memory_bytes")
        self.__dict__.update(state)
        self._memory = EnvMemory(type(self).native, raw)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: C env {type(self).native.name!r}>"


def _observation_space(env_class: EnvClass) -> spaces.Box:
    dtype, shape = env_class.obs_dtype, env_class.obs_shape
    low, high = env_class.obs_bounds
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low = info.min if low is None else low.astype(dtype)
        high = info.max if high is None else high.astype(dtype)
    else:  # (bounds in the observation's dtype: Box warns when it lowers their precision itself)
        low = -np.inf if low is None else low.astype(dtype)
        high = np.inf if high is None else high.astype(dtype)
    return spaces.Box(low, high, shape, dtype)


def _action_space(env_class: EnvClass) -> spaces.Space:
    if env_class.discrete:
        return spaces.Discrete(env_class.action_size)
    low, high = env_class.action_bounds
    return spaces.Box(-np.inf if low is None else low, np.inf if high is None else high, (env_class.action_size,),
                      np.float32)


# ---- the envs built into segvec ------------------------------------------------------------------------
class CartPoleEnv(NativeEnv):
    """gymnasium's CartPole-v1 in C (``native/envs/cartpole.c``), bit for bit: the same observations,
    rewards, terminations and truncations (500-step limit) as ``gymnasium.make("CartPole-v1")`` for the same
    seeds and actions, unseeded resets included."""

    native = EnvClass.builtin("cartpole")


class SyntheticAtariEnv(NativeEnv):
    """The synthetic Atari-shaped env of `segvec.envs` in C (``native/envs/synthetic_atari.c``): uint8
    (84, 84, 4) frame stacks, Discrete(6), episode lengths in [min_length, max_length] (default 64..512)
    ending truncated with probability truncation_prob (default 0.25); no added work per step."""

    native = EnvClass.builtin("synthetic_atari")


def register(env_id: str, env_type: type, **kwargs) -> None:
    """Registers a `NativeEnv` subclass with gymnasium as `env_id` (idempotent).

    ``gymnasium.make(env_id)`` then returns the bare env: the time limit is the C class's own, counted by
    the core (no TimeLimit wrapper), and neither the order enforcer nor the passive checker wraps it, so a
    segvec vector env steps it in C.  `kwargs` go to ``gymnasium.register`` (e.g. ``kwargs={...}``,
    ``reward_threshold``).
    """
    if env_id in gymnasium.registry:
        return
    gymnasium.register(id=env_id, entry_point=f"{env_type.__module__}:{env_type.__qualname__}",
                       max_episode_steps=None, order_enforce=False, disable_env_checker=True, **kwargs)


def register_envs() -> None:
    """Registers ``segvec/CartPole-c`` and ``segvec/SyntheticAtari-c`` (idempotent; ``import segvec`` does)."""
    register("segvec/CartPole-c", CartPoleEnv, reward_threshold=475.0)
    register("segvec/SyntheticAtari-c", SyntheticAtariEnv)


# ---- building modules of C envs ------------------------------------------------------------------------
class NativeBuildError(RuntimeError):
    """Compiling a module of C envs failed (the compiler's output is in the message)."""


class NativeModule:
    """A compiled module of C env classes.

    Attributes:
        name: the name given to `build`.
        path: the compiled extension.
        classes: ``{name: EnvClass}`` of the classes it exports (SEGVEC_ENV_EXPORT).
    """

    def __init__(self, name: str, path: pathlib.Path, module):
        self.name, self.path, self._module = name, path, module
        ffi, lib = module.ffi, module.lib
        self.classes: dict[str, EnvClass] = {}
        index = 0
        while (pointer := lib.segvec_env_class_at(index)) != ffi.NULL:
            env_class = EnvClass(int(ffi.cast("uintptr_t", pointer)), keepalive=module)
            self.classes[env_class.name] = env_class
            index += 1

    def env_class(self, name: str) -> EnvClass:
        """The class the C code names `name` (the ``name`` field of its struct)."""
        try:
            return self.classes[name]
        except KeyError:
            raise KeyError(f"module {self.name!r} has no C env class {name!r}; it exports {sorted(self.classes)}") \
                from None

    def __repr__(self) -> str:
        return f"NativeModule({self.name!r}, classes={sorted(self.classes)})"


_LOADED: dict[str, NativeModule] = {}
BASE_FLAGS = ("-std=c11", "-O3", "-ffp-contract=off", "-Wall", "-Wno-unused-parameter",
              "-Werror=implicit-function-declaration")


def header_dir() -> pathlib.Path:
    """The directory of ``segvec_env.h`` (the ABI): ``native/`` of the source tree segvec runs from.

    Raises:
        FileNotFoundError: segvec was installed without its source tree.
    """
    here = pathlib.Path(__file__).resolve().parent
    for candidate in (os.environ.get("SEGVEC_INCLUDE_DIR"), here / "include", here.parent / "native"):
        if candidate and (pathlib.Path(candidate) / "segvec_env.h").is_file():
            return pathlib.Path(candidate)
    raise FileNotFoundError("segvec_env.h was not found: building C envs needs segvec's source tree "
                            "(an editable install, `pip install -e .`), or SEGVEC_INCLUDE_DIR naming the "
                            "directory that holds native/segvec_env.h")


def cache_dir() -> pathlib.Path:
    """Where compiled modules are kept: $SEGVEC_CACHE_DIR, else $XDG_CACHE_HOME/segvec, else ~/.cache/segvec."""
    if os.environ.get("SEGVEC_CACHE_DIR"):
        return pathlib.Path(os.environ["SEGVEC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "segvec"


def build(name: str, sources: Sequence[str | os.PathLike], *, include_dirs: Sequence = (),
          extra_compile_args: Sequence[str] = (), libraries: Sequence[str] = (), define_macros: Sequence = (),
          cache: str | os.PathLike | None = None, verbose: bool = False) -> NativeModule:
    """Compiles C env classes into a module (cffi, out of line) and loads it; cached.

    The module is built once per content: the key hashes the sources, every header next to them or in
    `include_dirs`, ``segvec_env.h``, the flags and the Python ABI.  A cached build is loaded without
    compiling (in every process that imports the user's module, e.g. spawned workers); concurrent
    builders wait for each other (a file lock).  Each source includes ``segvec_env.h``; one of them exports
    the classes with ``SEGVEC_ENV_EXPORT(&class_a, ...)``.

    Args:
        name: a name for the module (an identifier).
        sources: the C files (paths; relative ones from the current directory).
        include_dirs, extra_compile_args, libraries, define_macros: passed to the compiler (flags come after
            ``-std=c11 -O3 -ffp-contract=off``; libm is always linked).
        cache: the cache directory (default `cache_dir()`).
        verbose: print the compiler's command lines.

    Returns:
        the loaded `NativeModule`.

    Raises:
        NativeBuildError: the compiler failed.
        FileNotFoundError: a source, or segvec_env.h, is missing.
        ValueError: `name` is not an identifier.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier, got {name!r}")
    paths = [pathlib.Path(source).resolve() for source in sources]
    if not paths:
        raise ValueError("build needs at least one C source")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no C source {path}")
    includes = [pathlib.Path(d).resolve() for d in include_dirs]
    abi_dir = header_dir()
    flags = [*BASE_FLAGS, *extra_compile_args]
    key = hashlib.sha256()
    for part in (sys.implementation.cache_tag, sysconfig.get_config_var("EXT_SUFFIX"), repr(flags),
                 repr(list(libraries)), repr(list(define_macros)), name):
        key.update(str(part).encode() + b"\0")
    headers = {abi_dir / "segvec_env.h"}
    for directory in {p.parent for p in paths} | set(includes):
        headers.update(directory.glob("*.h"))
    for path in [*paths, *sorted(headers)]:
        key.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    module_name = f"_segvec_envs_{name}_{key.hexdigest()[:16]}"
    root = pathlib.Path(cache) if cache is not None else cache_dir()
    target = root / "native" / (module_name + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    if module_name in _LOADED:
        return _LOADED[module_name]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                _compile(module_name, paths, [abi_dir, *includes], flags, list(libraries), list(define_macros),
                         target, verbose)
    loader = importlib.machinery.ExtensionFileLoader(module_name, str(target))
    spec = importlib.util.spec_from_file_location(module_name, target, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    _LOADED[module_name] = NativeModule(name, target, module)
    return _LOADED[module_name]


def _compile(module_name, paths, include_dirs, flags, libraries, define_macros, target, verbose) -> None:
    """Compiles in a private directory, then moves the extension into place (atomically)."""
    import contextlib
    import io

    from cffi import FFI

    ffibuilder = FFI()
    ffibuilder.cdef("const void *segvec_env_class_at(int32_t index);")
    ffibuilder.set_source(module_name, '#include "segvec_env.h"', sources=[str(p) for p in paths],
                          include_dirs=[str(d) for d in include_dirs], extra_compile_args=flags,
                          libraries=["m", *libraries], define_macros=define_macros)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f"{module_name}-", dir=target.parent))
    output = io.StringIO()
    try:
        try:
            if verbose:
                built = ffibuilder.compile(tmpdir=str(work), verbose=True)
            else:  # the compiler's messages go to the error, not to the user's terminal
                with _captured_fds(output), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                    built = ffibuilder.compile(tmpdir=str(work), verbose=False)
        except Exception as error:  # noqa: BLE001 - cffi/setuptools raise several kinds
            raise NativeBuildError(f"building the C envs {module_name} failed: {error}\n{output.getvalue()}") \
                from None
        os.replace(built, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _captured_fds:
    """Sends file descriptors 1 and 2 (the compiler's output) to `out` for the duration."""

    def __init__(self, out):
        self.out = out

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = [os.dup(1), os.dup(2)]
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.file.seek(0)
        self.out.write(self.file.read().decode(errors="replace"))
        self.file.close()
        return False
