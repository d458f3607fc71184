"""Shared fixtures: offline HF, tiny tokenizers and tiny random models of each supported architecture."""

import os

# Must be set before any Hugging Face library is imported: tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from kangaroo_lit.tiny import build_byte_bpe_tokenizer, save_random_model  # noqa: E402

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3"]
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer without pad token (like Llama's)."""
    return build_byte_bpe_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer):
    """{arch: directory} of tiny random models (hidden 64, 4 layers, GQA) saved with their tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_random_model(root / arch, arch, tiny_tokenizer, seed=0) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (restored after): tiny models gain nothing from a second one, and
    spinning OpenMP threads on a shared 2-core runner can make them ten times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_dir():
    """The read-only ../shared folder (real data, the stories model), or skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present on this machine")
    return SHARED
