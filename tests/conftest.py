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


def build_decoding_model(
    model_dir,
    exit_layer: int,
    mode: str,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    perturb: bool = True,
):
    """A float64 KangarooModel for decoding tests; ``mode`` is "off" (no LoRA), "draft" or "shared".

    ``perturb`` draws LoRA B (scale 0.05) and the adapter's ``o_proj`` (0.02) at random, so the draft path
    differs from plain early exit; without it the adapter is untrained (``o_proj`` zero) and LoRA B zero.
    Generation config: no EOS unless a test passes one, pad id 0.
    """
    import torch

    from kangaroo_lit.architectures import load_base_model
    from kangaroo_lit.model import KangarooModel
    from kangaroo_lit.settings import LoraSettings

    base = load_base_model(str(model_dir), "float64", attn_implementation)
    base.generation_config.eos_token_id = None  # EOS only where a test asks for it
    base.generation_config.pad_token_id = 0
    lora = None if mode == "off" else LoraSettings(rank=4, alpha=8.0, dropout=0.0, scope=mode)
    model = KangarooModel(base, exit_layer=exit_layer, lora=lora, trainable_dtype=torch.float64).eval()
    if perturb:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.05)
            o_proj = model.adapter.self_attn.o_proj.weight
            o_proj.copy_(torch.randn(o_proj.shape, generator=gen, dtype=o_proj.dtype) * 0.02)
    return model


def greedy_reference(model, ids, max_new_tokens: int, eos=None) -> list[int]:
    """HF ``generate(do_sample=False)`` of the model that verifies (DESIGN.md §2): the new tokens."""
    from kangaroo_lit.decoding import reference_model

    kwargs = {} if eos is None else {"eos_token_id": eos}
    with reference_model(model) as lm:
        out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, ids.shape[1] :].tolist()
