"""Shared fixtures: a tiny random CODI checkpoint, the embedded default, the real GSM8K file."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GSM8K_TEST = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-block, 32-wide GPT-2 CODI checkpoint with LoRA, in the released layout (milliseconds a rollout)."""
    from tests.checkpoints import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_reasoner(tiny_model_dir):
    from runner.model import ModelSpec, load
    return load(ModelSpec(model=str(tiny_model_dir)))


@pytest.fixture(scope="session")
def default_reasoner():
    """The embedded default model, loaded through the same loader as any CODI checkpoint."""
    from runner.model import ModelSpec, load
    return load(ModelSpec())


@pytest.fixture(scope="session")
def gsm8k_path() -> Path:
    """The real GSM8K test set beside the repo; a skip where absent, a failure in CI."""
    if not GSM8K_TEST.exists():
        message = f"the GSM8K test set is not at {GSM8K_TEST} (it is not shipped with the repo)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must provide it")
        pytest.skip(message)
    return GSM8K_TEST


@pytest.fixture(scope="module")
def one_torch_thread():
    """Millisecond forwards of tiny models: more threads only add contention on a shared CPU."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
