"""Builders for tiny models and tokenizers: tests, benchmarks and the embedded default share them.

Nothing here touches the network. Tokenizers are built with the ``tokenizers`` library and, like
Llama's, have BOS/EOS/UNK but **no pad token**, so the pad-token fallback is always exercised.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"

_CONFIG_CLASSES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}

# A few lines of varied English, code and digits so a byte-level BPE learns useful merges.
_DEFAULT_CORPUS = [
    "### Instruction:\nWhat is the capital of France?\n\n### Response:\nThe capital of France is Paris.",
    "### Instruction:\nSummarize the text.\n\n### Context:\nThe cat sat on the mat all day.\n\n"
    "### Response:\nA cat spent the day sitting on a mat.",
    "Once upon a time there was a little girl who loved to play in the garden with her dog.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024. Translate German to English: Guten Morgen!",
]


def build_byte_bpe_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 320, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer that adds BOS in front of every sequence, without pad token.

    Args:
        texts: training corpus; a small built-in one when None.
        vocab_size: target vocabulary size (>= 259: 256 bytes + 3 specials).
        model_max_length: recorded in the tokenizer config.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) if texts is not None else _DEFAULT_CORPUS, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
    )


def tiny_config(
    arch: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    **overrides,
) -> PretrainedConfig:
    """A tiny config of one of the supported architectures (GQA by default, untied embeddings).

    Args:
        arch: ``llama``, ``mistral``, ``qwen2`` or ``qwen3``.
        vocab_size: the tokenizer's ``len(tokenizer)``.
        overrides: any further config field (e.g. ``head_dim``, ``attention_bias``).
    """
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(_CONFIG_CLASSES)}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        kwargs["head_dim"] = hidden_size // num_heads
    kwargs.update(overrides)
    return _CONFIG_CLASSES[arch](**kwargs)


def save_random_model(
    out_dir: str | Path,
    arch: str = "llama",
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    **config_kwargs,
) -> Path:
    """Save a randomly initialised tiny causal LM plus its tokenizer with ``save_pretrained``.

    Returns the directory, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    out_dir = Path(out_dir)
    tokenizer = tokenizer or build_byte_bpe_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **config_kwargs)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init at std 0.02 gives near-uniform logits; scale the output layer up a little so greedy
    # decoding has clear winners and tests exercise real accept/reject decisions.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
