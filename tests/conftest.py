"""Shared fixtures: offline tiny models, and (via tests.conftest_servers) real local servers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("USERNAME", "srpo-tests")  # Metaflow refuses to run as root without it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.conftest_servers", "tests.slurm_cluster"]


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """The embedded default model (builtin:tiny-arith), resolved like any HF path."""
    from srpo_core.tiny.build import resolve_model_path

    return os.environ.get("SRPO_TEST_MODEL") or resolve_model_path("builtin:tiny-arith")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def hf(tiny_model):
    """The HF engine over the tiny model: the reference the other engines' chains must equal."""
    from srpo_core.engine.hf import HFEngine

    model, tok = tiny_model
    return HFEngine(model, tok)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module, restored afterwards: the same float32 arithmetic in a server
    and an in-process reference (so sampled chains match), and no OpenMP spin-waiting on a shared
    2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
