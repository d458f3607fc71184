"""Tokenization cache: a hit on the second setup, a miss whenever data, settings or tokenizer change."""

import logging
import shutil
from pathlib import Path

import pytest
import torch

from kangaroo_lit.data.cache import cache_key, default_cache_dir, tokenizer_fingerprint
from kangaroo_lit.data.datamodule import InstructionDataModule
from kangaroo_lit.tiny import build_byte_bpe_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def tok_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(path)
    return path


def setup_dm(tok_dir, data_path, cache_dir, **kw):
    dm = InstructionDataModule(
        tokenizer=str(tok_dir), data_path=str(data_path), cache_dir=str(cache_dir), num_workers=0, **kw
    )
    dm.setup("fit")
    return dm


def test_second_setup_loads_from_cache(tmp_path, tok_dir, caplog):
    data = FIXTURES / "dolly-tiny.jsonl"
    first = setup_dm(tok_dir, data, tmp_path / "cache")
    assert not first.loaded_from_cache and Path(first.cache_file).is_file()
    with caplog.at_level(logging.INFO, logger="kangaroo_lit.data.datamodule"):
        second = setup_dm(tok_dir, data, tmp_path / "cache")
    assert second.loaded_from_cache and second.cache_file == first.cache_file
    assert f"loaded 10 rows (10 examples) from cache {first.cache_file}" in caplog.text
    assert torch.equal(first.data.input_ids, second.data.input_ids)
    assert torch.equal(first.train_dataset.indices, second.train_dataset.indices)
    assert second.truncation_stats == first.truncation_stats
    # written atomically: no temporary file is left behind
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(first.cache_file).name]


def test_changed_file_content_misses(tmp_path, tok_dir):
    data = tmp_path / "data.jsonl"
    shutil.copy(FIXTURES / "dolly-tiny.jsonl", data)
    first = setup_dm(tok_dir, data, tmp_path / "cache")
    # same name, same size class, one changed character: the content hash must change the key
    data.write_text(data.read_text().replace("Paris", "Lyons", 1))
    second = setup_dm(tok_dir, data, tmp_path / "cache")
    assert not second.loaded_from_cache and second.cache_file != first.cache_file
    assert not torch.equal(first.data.input_ids, second.data.input_ids)


def test_changed_settings_miss(tmp_path, tok_dir):
    data = FIXTURES / "dolly-tiny.jsonl"
    base = setup_dm(tok_dir, data, tmp_path / "cache")
    for kw in ({"max_length": 32}, {"max_rows": 5}, {"format": "text", "data_path": FIXTURES / "stories.jsonl"}):
        kw = dict(kw)
        dm = setup_dm(tok_dir, kw.pop("data_path", data), tmp_path / "cache", **kw)
        assert not dm.loaded_from_cache and dm.cache_file != base.cache_file, kw


def test_changed_tokenizer_at_the_same_path_misses(tmp_path, tok_dir):
    data = FIXTURES / "dolly-tiny.jsonl"
    first = setup_dm(tok_dir, data, tmp_path / "cache")
    other = build_byte_bpe_tokenizer(["completely different corpus text " * 5, "zzz yyy xxx"], vocab_size=300)
    other.save_pretrained(tok_dir)  # same name, different content
    second = setup_dm(tok_dir, data, tmp_path / "cache")
    assert not second.loaded_from_cache and second.cache_file != first.cache_file


def test_chat_template_changes_the_fingerprint(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    before = tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(copy.deepcopy(tok)) == before
    tok.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_fingerprint(tok) != before
    assert cache_key(a=1, b=2) == cache_key(b=2, a=1) != cache_key(a=1, b=3)


def test_cache_can_be_disabled_and_corrupt_entries_are_rebuilt(tmp_path, tok_dir, caplog):
    data = FIXTURES / "dolly-tiny.jsonl"
    setup_dm(tok_dir, data, tmp_path / "off", use_cache=False)
    assert not (tmp_path / "off").exists()
    first = setup_dm(tok_dir, data, tmp_path / "cache")
    Path(first.cache_file).write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="kangaroo_lit.data.cache"):
        again = setup_dm(tok_dir, data, tmp_path / "cache")
    assert "unreadable tokenization cache" in caplog.text and not again.loaded_from_cache
    assert setup_dm(tok_dir, data, tmp_path / "cache").loaded_from_cache  # rewritten


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "kangaroo_lit" / "tokenized"
