"""Tests of segvec/advantages.py and `segvec.gae`: input checks (never a crash in C), numpy and torch GAE
against a plain Python reference (NaN positions included), and numpy GAE without torch."""
from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import segvec
from envs import reference_gae

try:
    import torch
except ImportError:
    torch = None

requires_torch = pytest.mark.skipif(torch is None, reason="needs torch")
PACKAGE = pathlib.Path(segvec.__file__).resolve().parent


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


# ---- reference --------------------------------------------------------------------------------------
def assert_same(actual, expected, rtol, atol):
    """Equal to `rtol` relative (`atol` absolute near 0), with NaN at exactly the same positions."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg="NaN positions differ")
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def as_torch(b):
    return types.SimpleNamespace(**{k: torch.as_tensor(v) for k, v in vars(b).items()})


@st.composite
def batches_with_nans(draw):
    """Batches with flushed rows (NaN tail bootstrap at length - 1) and NaN values in random places."""
    n, T = draw(st.integers(1, 6)), draw(st.integers(1, 16))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    f32 = np.float32
    b = types.SimpleNamespace(
        reward=rng.standard_normal((n, T)).astype(f32),
        value=rng.standard_normal((n, T)).astype(f32),
        next_value=rng.standard_normal((n, T)).astype(f32),
        logprob=-rng.exponential(size=(n, T)).astype(f32),
        terminated=rng.random((n, T)) < draw(st.sampled_from([0.0, 0.1, 0.4])),
        truncated=rng.random((n, T)) < draw(st.sampled_from([0.0, 0.1, 0.4])),
        mask=rng.random((n, T)) >= draw(st.sampled_from([0.0, 0.1, 0.4])),
        length=rng.integers(0, T + 1, n).astype(np.int32) if draw(st.booleans()) else np.full(n, T, np.int32),
    )
    flushed = (rng.random(n) < draw(st.sampled_from([0.0, 0.5, 1.0]))) & (b.length > 0)
    b.next_value[flushed, b.length[flushed] - 1] = np.nan
    p_nan = draw(st.sampled_from([0.0, 0.05, 0.2]))
    for name in ("value", "next_value", "reward", "logprob"):
        getattr(b, name)[rng.random((n, T)) < p_nan] = np.nan
    b.target = (b.logprob + rng.normal(0, 0.7, (n, T))).astype(f32)
    return b


# ---- numpy (C kernel) and torch against the reference, NaN included -------------------------------------
@pytest.mark.filterwarnings("ignore::segvec.SegvecWarning")  # NaN values on purpose
@settings(max_examples=300, deadline=None)
@given(batches_with_nans(), st.sampled_from([0.0, 0.9, 0.99, 1.0]), st.sampled_from([0.0, 0.5, 0.95, 1.0]))
def test_gae_matches_reference_with_nans(b, gamma, lam):
    adv_ref, ret_ref = reference_gae(b, gamma, lam)
    adv_c, ret_c = segvec.gae(b, gamma, lam)
    assert_same(adv_c, adv_ref, rtol=1e-4, atol=1e-4)
    assert_same(ret_c, ret_ref, rtol=1e-4, atol=1e-4)
    if torch is not None:
        adv_t, ret_t = segvec.gae(as_torch(b), gamma, lam)
        assert_same(adv_t.numpy(), adv_c, rtol=1e-5, atol=1e-6)
        assert_same(ret_t.numpy(), ret_c, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::segvec.SegvecWarning")  # NaN values on purpose
@settings(max_examples=300, deadline=None)
@given(batches_with_nans(), st.sampled_from([0.9, 0.99]), st.sampled_from([0.9, 0.95]),
       st.sampled_from([None, 0.5, 1.0, 2.0]), st.sampled_from([None, 0.5, 1.0, 2.0]))
def test_clipped_gae_matches_reference_with_nans(b, gamma, lam, rho_clip, c_clip):
    ratio = np.exp(b.target.astype(np.float64) - b.logprob)
    rho = ratio if rho_clip is None else np.minimum(ratio, rho_clip)
    c = ratio if c_clip is None else np.minimum(ratio, c_clip)
    adv_ref, ret_ref = reference_gae(b, gamma, lam, rho=rho, c=c)
    adv_n, ret_n = segvec.gae(b, gamma, lam, rho_clip=rho_clip, c_clip=c_clip, target_logprob=b.target)
    assert_same(adv_n, adv_ref, rtol=1e-4, atol=1e-4)
    assert_same(ret_n, ret_ref, rtol=1e-4, atol=1e-4)
    if torch is not None:
        adv_t, ret_t = segvec.gae(as_torch(b), gamma, lam, rho_clip=rho_clip, c_clip=c_clip,
                                  target_logprob=torch.from_numpy(b.target))
        assert_same(adv_t.numpy(), adv_n, rtol=1e-5, atol=1e-5)
        assert_same(ret_t.numpy(), ret_n, rtol=1e-5, atol=1e-5)


def flushed_row():
    """One row of T=8, length 6: an episode ends (terminated, next_value NaN) at t=2, the tail bootstrap
    at t=5 is unknown (NaN), step 3 is masked out."""
    f32 = np.float32
    b = types.SimpleNamespace(
        reward=np.ones((1, 8), f32), value=np.full((1, 8), 0.5, f32), next_value=np.full((1, 8), 0.5, f32),
        terminated=np.zeros((1, 8), bool), truncated=np.zeros((1, 8), bool), mask=np.ones((1, 8), bool),
        length=np.array([6], np.int32), logprob=np.zeros((1, 8), f32))
    b.terminated[0, 2] = True
    b.next_value[0, 2] = b.next_value[0, 5] = np.nan
    b.mask[0, 3] = False
    return b


def expected_flushed_row_nans():
    return np.array([[False, False, False, False, True, True, False, False]])


def test_nan_stays_in_the_last_episode_numpy():
    b = flushed_row()
    advantages, returns = segvec.gae(b, 0.99, 0.95)
    np.testing.assert_array_equal(np.isnan(advantages), expected_flushed_row_nans())
    np.testing.assert_array_equal(np.isnan(returns), expected_flushed_row_nans())
    assert advantages[0, 2] == np.float32(1.0 - 0.5)  # terminated: next_value ignored though NaN
    advantages, _ = segvec.gae(b, 0.99, 0.95, rho_clip=1.0, c_clip=1.0, target_logprob=b.logprob)
    np.testing.assert_array_equal(np.isnan(advantages), expected_flushed_row_nans())


@requires_torch
@pytest.mark.parametrize("clipped", [False, True], ids=["plain", "clipped"])
def test_nan_stays_in_the_last_episode_torch(clipped):
    b = flushed_row()
    extra = {"rho_clip": 1.0, "c_clip": 1.0, "target_logprob": torch.from_numpy(b.logprob)} if clipped else {}
    advantages, returns = segvec.gae(as_torch(b), 0.99, 0.95, **extra)
    np.testing.assert_array_equal(torch.isnan(advantages).numpy(), expected_flushed_row_nans())
    np.testing.assert_array_equal(torch.isnan(returns).numpy(), expected_flushed_row_nans())
    assert advantages[0, 2].item() == np.float32(1.0 - 0.5)


# ---- input checks -----------------------------------------------------------------------------------
N, T = 3, 5


def good_batch():
    rng = np.random.default_rng(0)
    f32 = np.float32
    return types.SimpleNamespace(
        reward=rng.standard_normal((N, T)).astype(f32), value=rng.standard_normal((N, T)).astype(f32),
        next_value=rng.standard_normal((N, T)).astype(f32), logprob=np.full((N, T), -0.5, f32),
        terminated=np.zeros((N, T), bool), truncated=np.zeros((N, T), bool), mask=np.ones((N, T), bool),
        length=np.full(N, T, np.int32))


STEP_FIELDS = ("reward", "value", "next_value", "terminated", "truncated", "mask")
BAD_FIELDS = [  # (field, bad value, exception, message)
    *[(name, shape, ValueError, f"{name} has shape {shape}, expected {(N, T)}")
      for name in STEP_FIELDS[1:] for shape in [(N, T - 1), (N - 1, T), (N, T + 1), (N * T,), (N, T, 1)]],
    ("reward", (N * T,), ValueError, f"reward has shape {(N * T,)}, expected (n, T)"),
    ("reward", (N, 0), ValueError, f"reward has shape {(N, 0)}, expected (n, T) or (n, T, k) with T, k >= 1"),
    ("length", (N - 1,), ValueError, f"length has shape {(N - 1,)}, expected {(N,)}"),
    ("length", (N, 1), ValueError, f"length has shape {(N, 1)}, expected {(N,)}"),
    ("length", np.array([T, -1, T], np.int32), ValueError, f"length must lie in [0, T={T}], got -1"),
    ("length", np.array([T, T + 1, T], np.int32), ValueError, f"length must lie in [0, T={T}], got {T + 1}"),
    ("length", np.full(N, T, np.float32), TypeError, "length must be an integer array, got "),
    ("value", np.full((N, T), "x"), TypeError, "value must be a real-valued array, got "),
    ("reward", np.zeros((N, T), complex), TypeError, "reward must be a real-valued array, got "),
    ("terminated", np.zeros((N, T), np.float32), TypeError, "terminated must be a bool or integer array, got "),
    ("mask", None, TypeError, "mask must be a bool or integer array, got "),
]


def bad_batch(field, bad):
    b = good_batch()
    if isinstance(bad, tuple):  # a shape
        dtype = getattr(b, field).dtype
        bad = np.zeros(bad, dtype) if field != "length" else np.full(bad, T, dtype)
    setattr(b, field, bad)
    return b


def torch_fields(b):
    """`b` with every numeric field a tensor (fields torch cannot hold stay as they are)."""
    def convert(value):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            return value
    return types.SimpleNamespace(**{k: convert(v) for k, v in vars(b).items()})


KERNELS = ["numpy", "numpy-clipped", pytest.param("torch", marks=requires_torch),
           pytest.param("torch-clipped", marks=requires_torch)]


def call_gae(kernel, b, gamma=0.99, lam=0.95, **options):
    if kernel.startswith("torch"):
        b = torch_fields(b)
    if kernel.endswith("clipped") and "target_logprob" not in options:
        options = {"rho_clip": 1.0, "c_clip": 1.0, "target_logprob": np.zeros((N, T), np.float32), **options}
    if kernel.startswith("torch") and isinstance(options.get("target_logprob"), np.ndarray):
        options["target_logprob"] = torch.as_tensor(options["target_logprob"])
    return segvec.gae(b, gamma, lam, **options)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("field, bad, error, message", BAD_FIELDS,
                         ids=[f"{f}-{getattr(b, 'shape', b)}" for f, b, _, _ in BAD_FIELDS])
def test_bad_field_raises_naming_it(kernel, field, bad, error, message):
    with pytest.raises(error, match=re.escape("gae: " + message)):
        call_gae(kernel, bad_batch(field, bad))


@pytest.mark.parametrize("kernel", KERNELS)
def test_missing_field_raises(kernel):
    b = good_batch()
    del b.next_value
    with pytest.raises(TypeError, match=re.escape("gae: batch has no field 'next_value'")):
        call_gae(kernel, b)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name, bad, error, message", [
    ("gamma", float("nan"), ValueError, "gamma must be finite, got nan"),
    ("gamma", float("inf"), ValueError, "gamma must be finite, got inf"),
    ("gamma", "0.99", TypeError, "gamma must be a real number, got str"),
    ("gamma", None, TypeError, "gamma must be a real number, got NoneType"),
    ("lam", float("-inf"), ValueError, "lam must be finite, got -inf"),
    ("lam", True, TypeError, "lam must be a real number, got bool"),
    ("lam", np.ones(2), TypeError, "lam must be a real number, got ndarray"),
])
def test_bad_gamma_or_lam_raises(kernel, name, bad, error, message):
    scalars = {"gamma": 0.99, "lam": 0.95, name: bad}
    with pytest.raises(error, match=re.escape("gae: " + message)):
        call_gae(kernel, good_batch(), **scalars)


@pytest.mark.parametrize("kernel", ["numpy-clipped", pytest.param("torch-clipped", marks=requires_torch)])
@pytest.mark.parametrize("options, error, message", [
    ({"target_logprob": np.zeros((N, T - 1), np.float32)}, ValueError,
     f"target_logprob has shape {(N, T - 1)}, expected {(N, T)}"),
    ({"behaviour_logprob": np.zeros((N + 1, T), np.float32)}, ValueError,
     f"behaviour_logprob has shape {(N + 1, T)}, expected {(N, T)}"),
    ({"target_logprob": np.zeros((N, T), bool)}, TypeError, "target_logprob must be a real-valued array, got "),
    ({"rho_clip": -1.0}, ValueError, "rho_clip must be None or a number > 0, got -1.0"),
    ({"c_clip": float("nan")}, ValueError, "c_clip must be None or a number > 0, got nan"),
    ({"c_clip": "1"}, TypeError, "c_clip must be None or a real number, got str"),
])
def test_bad_clipped_options_raise(kernel, options, error, message):
    with pytest.raises(error, match=re.escape("gae: " + message)):
        call_gae(kernel, good_batch(), **options)


@pytest.mark.parametrize("kernel", ["numpy-clipped", pytest.param("torch-clipped", marks=requires_torch)])
def test_batch_logprob_is_checked_when_it_is_the_behaviour(kernel):
    b = good_batch()
    b.logprob = np.zeros((N, 1), np.float32)
    with pytest.raises(ValueError, match=re.escape(f"gae: logprob has shape {(N, 1)}, expected {(N, T)}")):
        call_gae(kernel, b)
    del b.logprob
    with pytest.raises(TypeError, match=re.escape("gae: batch has no field 'logprob'")):
        call_gae(kernel, b)


@pytest.mark.parametrize("kernel", ["numpy", pytest.param("torch", marks=requires_torch)])
@pytest.mark.parametrize("option", ["rho_clip", "c_clip", "behaviour_logprob"])
def test_clip_options_without_target_logprob_raise(kernel, option):
    value = np.zeros((N, T), np.float32) if option == "behaviour_logprob" else 1.0
    with pytest.raises(ValueError, match=re.escape(f"gae: {option} needs target_logprob")):
        call_gae(kernel, good_batch(), **{option: value})


def test_good_batch_of_other_dtypes_is_accepted():
    b = good_batch()
    expected = segvec.gae(b, 0.99, 0.95)
    b.reward, b.value = b.reward.astype(np.float64), b.value.tolist()
    b.terminated, b.mask, b.length = b.terminated.astype(np.int64), b.mask.astype(np.uint8), b.length.tolist()
    advantages, _ = segvec.gae(b, np.float32(0.99), 0.95)
    np.testing.assert_array_equal(advantages, expected[0])
    assert segvec.gae(types.SimpleNamespace(**{k: v[:0] for k, v in vars(good_batch()).items()}),
                      0.99, 0.95)[0].shape == (0, T)


def test_mismatched_shapes_raise_instead_of_crashing_in_c():
    """Before the checks, the C kernel read `value` as if it had reward's shape: a segfault."""
    result = run_python("""
        import types, numpy as np, segvec
        n, T = 1024, 4096
        f, b = np.zeros((n, T), np.float32), np.zeros((n, T), bool)
        batch = types.SimpleNamespace(reward=f, value=np.zeros((1, 1), np.float32), next_value=f,
                                      terminated=b, truncated=b, mask=~b, length=np.full(n, T, np.int32))
        try:
            segvec.gae(batch, 0.99, 0.95)
        except ValueError as error:
            print("ValueError:", error)
    """)
    assert result.returncode == 0, f"returncode {result.returncode}: {result.stderr[-2000:]}"
    assert "ValueError: gae: value has shape (1, 1), expected (1024, 4096)" in result.stdout


# ---- structure: numpy GAE without torch, no import cycle ---------------------------------------------
def test_numpy_gae_works_without_torch():
    result = run_python("""
        import sys, types
        sys.modules["torch"] = None  # `import torch` raises ImportError
        import numpy as np, segvec
        b = types.SimpleNamespace(
            reward=np.ones((2, 4), np.float32), value=np.zeros((2, 4), np.float32),
            next_value=np.zeros((2, 4), np.float32), logprob=np.zeros((2, 4), np.float32),
            terminated=np.zeros((2, 4), bool), truncated=np.zeros((2, 4), bool), mask=np.ones((2, 4), bool),
            length=np.array([4, 2], np.int32))
        plain, _ = segvec.gae(b, 0.5, 1.0)
        clipped, _ = segvec.gae(b, 0.5, 1.0, rho_clip=1.0, c_clip=1.0, target_logprob=np.zeros((2, 4)))
        np.testing.assert_allclose(plain, [[1.875, 1.75, 1.5, 1.0], [1.5, 1.0, 0.0, 0.0]])
        np.testing.assert_allclose(clipped, plain)
        print("ok", sorted(m for m in sys.modules if m.startswith("segvec")))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
    assert "segvec.torch_utils" not in result.stdout


def imports_of(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """``(module-level imports, imports anywhere)`` of a source file, absolute module names."""
    tree = ast.parse(path.read_text())

    def names(nodes):
        found = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        return found

    return names(tree.body), names(ast.walk(tree))


def test_torch_is_imported_at_module_level_only_by_torch_utils():
    offenders = [path.name for path in PACKAGE.rglob("*.py") if path.name != "torch_utils.py"
                 and any(m.split(".")[0] == "torch" for m in imports_of(path)[0])]
    assert not offenders


def test_no_import_cycle_between_segvec_modules():
    """Imports anywhere in a module count (a lazy import is still a dependency)."""
    def module(path):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {module(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in imports_of(path)[1] if m in modules and m != name and not name.startswith(m + ".")
                    and m != "segvec"} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(name, trail):
        if state.get(name) == 1:
            pytest.fail("import cycle: " + " -> ".join(trail[trail.index(name):] + [name]))
        if state.get(name) is None:
            state[name] = 1
            for child in sorted(graph[name]):
                visit(child, trail + [name])
            state[name] = 2

    for name in sorted(graph):
        visit(name, [])
