"""The template for C envs of one's own (examples/native_env/): it builds with segvec.native.build (cached),
matches gymnasium's Pendulum-v1, and runs in segvec's vector env with its three faces, on both backends."""
from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys

import gymnasium
import numpy as np
import pytest

import segvec
import segvec.native
from conftest import backend_options
from segvec.runner import NativeEnvRunner

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "examples" / "native_env"


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory):
    """examples/native_env/pendulum.py, built into a fresh cache."""
    cache = tmp_path_factory.mktemp("segvec-cache")
    saved = os.environ.get("SEGVEC_CACHE_DIR")
    os.environ["SEGVEC_CACHE_DIR"] = str(cache)
    sys.path.insert(0, str(TEMPLATE))
    try:
        sys.modules.pop("pendulum", None)
        module = importlib.import_module("pendulum")
    finally:
        sys.path.remove(str(TEMPLATE))
        if saved is None:
            os.environ.pop("SEGVEC_CACHE_DIR")
        else:
            os.environ["SEGVEC_CACHE_DIR"] = saved
    assert module.MODULE.path.parent == cache / "native"
    return module


def test_the_template_is_gymnasiums_pendulum(pendulum):
    ours, theirs = gymnasium.make("example/Pendulum-c"), gymnasium.make("Pendulum-v1")
    assert type(ours) is pendulum.PendulumEnv
    assert ours.observation_space == theirs.observation_space and ours.action_space == theirs.action_space
    rng = np.random.default_rng(0)
    truncations = 0
    for seed in range(3):
        assert ours.reset(seed=seed)[0].tobytes() == theirs.reset(seed=seed)[0].tobytes()
        for _ in range(450):
            action = rng.uniform(-2.5, 2.5, 1).astype(np.float32)
            got, want = ours.step(action), theirs.step(action)
            assert got[0].tobytes() == want[0].tobytes() and got[2:4] == want[2:4]
            assert got[1] == pytest.approx(float(want[1]), rel=1e-9)
            if got[3]:
                truncations += 1
                assert ours.reset()[0].tobytes() == theirs.reset()[0].tobytes()
    assert truncations == 6
    assert pendulum.PendulumEnv(g=3.0).params == {"g": 3.0}
    with pytest.raises(ValueError, match="finite"):
        pendulum.PendulumEnv(g=float("nan"))


def test_the_template_runs_with_every_face(pendulum, backend):
    E = 4
    theirs = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make("Pendulum-v1")] * E)
    envs = segvec.make_vec("example/Pendulum-c", num_envs=E, horizon=16, **backend_options(backend, E))
    try:
        if backend == "serial":
            assert isinstance(envs._backend.runner, NativeEnvRunner)
        rng = np.random.default_rng(1)
        obs, _ = envs.reset(seed=3)  # gymnasium face
        assert obs.tobytes() == theirs.reset(seed=3)[0].tobytes()
        seen, sent, rows = [obs], [], 0
        for _ in range(250):
            actions = rng.uniform(-2, 2, (E, 1)).astype(np.float32)
            got, want = envs.step(actions, value=np.zeros(E, np.float32)), theirs.step(actions)
            assert got[0].tobytes() == want[0].tobytes()
            np.testing.assert_array_equal(got[3], want[3])
            np.testing.assert_allclose(got[1], want[1], rtol=1e-9)
            seen.append(got[0])
            sent.append(actions)
            with envs.take_segments() as batch:  # segments: rows of one env's consecutive steps
                for i in range(len(batch)):
                    e, start = int(batch.env_id[i]), int(batch.start_step[i])
                    np.testing.assert_array_equal(batch.obs[i], np.stack([o[e] for o in seen[start:start + 17]]))
                    np.testing.assert_array_equal(batch.action[i], np.stack([a[e] for a in sent[start:start + 16]]))
                    rows += 1
        assert rows == E * (250 // 16)
        envs.async_reset(seed=5)  # async face
        for _ in range(40):
            obs, rewards, terminated, truncated, info = envs.recv()
            envs.send(np.ones((len(obs), 1), np.float32), info["env_id"])
        episodes = envs.episodes()
        assert (episodes["length"] == 200).all() and len(episodes["length"]) == E
    finally:
        envs.close()
        theirs.close()


def test_builds_are_cached_and_errors_name_the_compiler_message(pendulum, tmp_path):
    module = segvec.native.build("pendulum_example", [TEMPLATE / "pendulum.c"], cache=pendulum.MODULE.path.parent.parent)
    assert module is pendulum.MODULE, "a build loaded in this process is reused"
    mtime = module.path.stat().st_mtime_ns
    script = ("import segvec.native, sys; m = segvec.native.build('pendulum_example', [sys.argv[1]], cache=sys.argv[2]);"
              "print(m.path, sorted(m.classes))")
    out = subprocess.run([sys.executable, "-c", script, str(TEMPLATE / "pendulum.c"), str(module.path.parent.parent)],
                         capture_output=True, text=True, env={**os.environ, "CC": "false", "PYTHONPATH": str(ROOT)},
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert str(module.path) in out.stdout and "['pendulum']" in out.stdout, "another process loads the cached build"
    assert module.path.stat().st_mtime_ns == mtime
    broken = tmp_path / "broken.c"
    broken.write_text('#include "segvec_env.h"\nint oops(void) { return undefined_name; }\nSEGVEC_ENV_EXPORT()\n')
    with pytest.raises(segvec.native.NativeBuildError, match="undefined_name"):
        segvec.native.build("broken", [broken], cache=tmp_path / "cache")
    with pytest.raises(KeyError, match="exports \\['pendulum'\\]"):
        module.env_class("nope")


def test_the_template_runs_as_a_script(tmp_path):
    out = subprocess.run([sys.executable, str(TEMPLATE / "pendulum.py")], capture_output=True, text=True,
                         env={**os.environ, "SEGVEC_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "segments of 64 steps" in out.stdout
