"""Tokenization: prompt masking, the final EOS target, boundary merges, truncation, chat template, text."""

import copy
import logging

import pytest

from kangaroo_lit.data.prompts import format_prompt
from kangaroo_lit.data.tokenize import IGNORE_INDEX, RowEncoder, TruncationStats, truncate_example

ROW = {"instruction": "What is the capital of France?", "context": "", "response": "The capital is Paris."}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def encode(encoder, rows):
    return encoder.encode_dolly(rows, 0, TruncationStats())


def test_dolly_ids_prompt_mask_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    (ex,) = encode(RowEncoder(tok, 512), [ROW])
    prompt = format_prompt(ROW["instruction"], ROW["context"])
    full = tok(prompt + ROW["response"])["input_ids"]
    assert ex.ids == full + [tok.eos_token_id]
    assert ex.ids[0] == tok.bos_token_id
    assert ex.ids[: ex.n_prompt] == tok(prompt)["input_ids"]
    assert tok.decode(ex.ids[ex.n_prompt : -1]) == ROW["response"]


def test_context_goes_into_the_prompt(tiny_tokenizer):
    row = dict(ROW, context="Paris is in France.")
    (ex,) = encode(RowEncoder(tiny_tokenizer, 512), [row])
    assert "### Context:\nParis is in France." in tiny_tokenizer.decode(ex.ids[: ex.n_prompt])


def test_bpe_merge_across_the_boundary_tokenizes_parts_separately(tiny_tokenizer, monkeypatch):
    # "he" is one merged token of the tiny BPE: a prompt ending in "h" before a response "ello"
    # tokenizes differently joined than apart.
    tok = tiny_tokenizer
    assert tok("h")["input_ids"] != tok("hello")["input_ids"][:2]
    monkeypatch.setattr("kangaroo_lit.data.tokenize.format_prompt", lambda i, c: "h")
    stats = TruncationStats()
    (ex,) = RowEncoder(tok, 512).encode_dolly([dict(ROW, response="ello")], 0, stats)
    assert stats.boundary_merges == 1
    assert ex.ids[: ex.n_prompt] == tok("h")["input_ids"]
    assert ex.ids[ex.n_prompt :] == tok("ello", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_truncation_cuts_the_prompt_left_and_keeps_bos():
    prompt, target = [1] + list(range(100, 130)), list(range(200, 210)) + [2]
    p, t, p_cut, t_cut = truncate_example(prompt, target, max_length=20, bos_id=1)
    assert (p_cut, t_cut) == (True, False)
    assert t == target and len(p) + len(t) == 20
    assert p == [1] + list(range(122, 130))  # BOS, then the end of the prompt


def test_truncation_then_cuts_the_response_end():
    prompt, target = [1] + list(range(100, 130)), list(range(200, 240)) + [2]
    p, t, p_cut, t_cut = truncate_example(prompt, target, max_length=20, bos_id=1)
    assert (p_cut, t_cut) == (True, True)
    assert p == [1] + list(range(126, 130))  # floor: max_length // 4 = 5 tokens
    assert t == list(range(200, 215))  # the response start is kept; no EOS after a cut
    assert truncate_example([1, 5], [7, 2], 20, 1) == ([1, 5], [7, 2], False, False)


def test_long_row_keeps_the_response_and_counts(tiny_tokenizer, caplog):
    long_row = dict(ROW, context="The weather is nice today. " * 40)
    encoder = RowEncoder(tiny_tokenizer, max_length=64)
    with caplog.at_level(logging.INFO, logger="kangaroo_lit.data.tokenize"):
        (ex, short), stats = encoder.encode_rows([long_row, ROW])
    assert len(ex.ids) <= 64 and ex.ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ex.ids[ex.n_prompt :]) == ROW["response"] + "</s>"
    assert tiny_tokenizer.decode(ex.ids[: ex.n_prompt]).endswith("### Response:\n")
    assert (stats.prompt_cut, stats.response_cut, stats.rows) == (1, 0, 2)
    assert "1 prompts cut from the left, 0 responses cut at the end" in caplog.text


def test_chat_template_path(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    row = dict(ROW, context="Some context.")
    encoder = RowEncoder(tok, 512, use_chat_template=True)
    assert encoder.use_chat_template
    (ex,) = encode(encoder, [row])
    user = {"role": "user", "content": "What is the capital of France?\n\nSome context."}
    prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ex.ids[: ex.n_prompt]) == prompt
    assert ex.ids[0] == tok.bos_token_id and ex.ids.count(tok.bos_token_id) == 1
    # the template's own EOS closes the response (its trailing newline is dropped, no second EOS)
    assert ex.ids[ex.n_prompt :] == tok(ROW["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_chat_template_without_eos_gets_one_appended(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT_TEMPLATE.replace("{{ eos_token }}", "!")
    (ex,) = encode(RowEncoder(tok, 512, use_chat_template=True), [ROW])
    # the rendered turn is "response!\n": all of it is a target, then the EOS appended
    assert ex.ids[ex.n_prompt :] == tok(ROW["response"] + "!\n", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]


def test_no_chat_template_falls_back_with_one_warning(tiny_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="kangaroo_lit.data.tokenize"):
        encoder = RowEncoder(tiny_tokenizer, 512, use_chat_template=True)
        examples, _ = encoder.encode_rows([ROW, ROW])
    assert not encoder.use_chat_template
    assert caplog.text.count("has no chat template") == 1
    assert examples[0].ids == encode(RowEncoder(tiny_tokenizer, 512), [ROW])[0].ids


def test_text_every_token_is_a_target_and_long_documents_are_chunked(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "Once upon a time there was a little girl who loved to play in the garden. " * 4
    encoder = RowEncoder(tok, max_length=32, data_format="text")
    examples, stats = encoder.encode_rows([{"text": text}, {"text": "Hi."}])
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    assert len(ids) % 32 != 0
    full = len(ids) // 32
    chunks = [e for e in examples if e.row == 0]
    # full windows first, every token a target ...
    assert [c.ids for c in chunks[:full]] == [ids[s : s + 32] for s in range(0, full * 32, 32)]
    assert all(c.n_prompt == 0 for c in chunks[:full])
    # ... then the tail as the last 32 tokens, the overlap being context, not targets again
    tail = chunks[full]
    assert len(chunks) == full + 1 and tail.ids == ids[-32:]
    assert tail.n_prompt == 32 - (len(ids) - full * 32)
    targets = sum(len(c.ids) - c.n_prompt for c in chunks)
    assert targets == len(ids)  # each token is a target exactly once
    assert examples[-1].ids == tok("Hi.")["input_ids"] + [tok.eos_token_id]
    assert stats.docs_chunked == 1 and stats.examples == len(examples)


def test_encoder_validates_arguments(tiny_tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        RowEncoder(tiny_tokenizer, 1)
    with pytest.raises(ValueError, match="format"):
        RowEncoder(tiny_tokenizer, 16, data_format="chat")


def test_labels_follow_prompt_length(tiny_tokenizer):
    from kangaroo_lit.data.dataset import TokenizedRows

    examples, _ = RowEncoder(tiny_tokenizer, 512).encode_rows([ROW])
    ids, labels = TokenizedRows.from_encoded(examples).example(0)
    n = examples[0].n_prompt
    assert (labels[:n] == IGNORE_INDEX).all() and (labels[n:] == ids[n:]).all()
    assert labels[-1] == tiny_tokenizer.eos_token_id
