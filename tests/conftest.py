"""Shared fixtures: the backends to parametrize over, and a factory that closes what it makes."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import envs` from tests and workers

import segvec  # noqa: E402

BACKENDS = ("serial", "multiprocessing")


def backend_options(backend: str, num_envs: int) -> dict:
    """Options for `backend`: two workers for multiprocessing where `num_envs` allows, else one.  ``"share"``
    is the multiprocessing backend with ``learner_share=True`` (worker 0 is this process)."""
    if backend == "serial":
        return {"backend": "serial"}
    share = {"learner_share": True} if backend == "share" else {}
    return {"backend": "multiprocessing", "num_workers": 2 if num_envs % 2 == 0 else 1, **share}


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def make_envs():
    """``make_envs(env, num_envs, backend, **options)``: a segvec vector env closed after the test."""
    made = []

    def make(env, num_envs, backend, **options):
        options = {**backend_options(backend, num_envs), **options}
        envs = segvec.make_vec(env, num_envs=num_envs, **options)
        made.append(envs)
        return envs

    yield make
    for envs in made:
        envs.close(terminate=True)
