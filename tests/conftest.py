"""Shared fixtures: the real SmolLM2 model (ours and transformers'), loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from quicksilver.models import loading

# Tests never touch the network: fail fast instead of waiting on the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm_fp32() -> loading.LoadedModel:
    return loading.load("smollm2-135m", "float32")


@pytest.fixture(scope="session")
def hf_smollm_fp32():
    """transformers' own Llama implementation on the same GGUF file: the reference."""
    from transformers import AutoModelForCausalLM

    path = Path(loading.resolve("smollm2-135m").path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-model tests: tiny matmuls gain nothing from
    threads, and on a busy machine OpenMP's spinning threads make them many times slower.
    Modules ask for it with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
