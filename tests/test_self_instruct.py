"""Self-instruct data (Magpie): the filters and de-duplication on fixed text, the template prefix, and
the generation loop's resume, checked against an uninterrupted run on the embedded tiny model."""

import gzip
import json
import shutil

import pytest

from kangaroo_lit.data.self_instruct import (
    CATEGORIES,
    DuplicateIndex,
    diversity,
    jaccard,
    latin_fraction,
    query_prefix,
    reject_reason,
    shingles,
)
from kangaroo_lit.distill import main_self_instruct, self_instruct
from kangaroo_lit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("text", "cut", "reason"),
    [
        ("Can you translate 'good morning' into French?", False, None),
        ("Summarize the following article: The city council voted on Tuesday to expand the park.", False, None),
        ("Translate into Spanish: 'Where is the station?'", True, "cut_off"),
        ("Hello there", False, "too_short"),
        ("x " * 1500, False, "too_long"),
        ("Переведите это предложение на английский язык пожалуйста", False, "language"),
        ("What is the capital of France?<|im_end|>\n<|im_start|>assistant", False, "debris"),
        ("What is the capital?\n### Response:", False, "debris"),
        ("user: what is the capital of France", False, "debris"),
        ("I'm sorry, but I cannot help with that request today.", False, "refusal"),
        ("As an AI language model I think you should ask something else", False, "refusal"),
        ("tell me a story tell me a story tell me a story tell me a story", False, "loop"),
    ],
)
def test_reject_reason(text, cut, reason):
    assert reject_reason(text.strip(), cut) == reason


def test_latin_fraction_counts_letters_only():
    assert latin_fraction("Translate 'bonjour' (123!)") == 1.0
    assert latin_fraction("日本") == 0.0
    assert 0.4 < latin_fraction("ab日本") < 0.6


def test_duplicates_exact_and_near_but_not_merely_similar_topics():
    index = DuplicateIndex(threshold=0.7)
    first = "Write a short poem about the sea at night, with a calm and hopeful tone."
    assert index.duplicate_of(first) is None
    index.add(first)
    assert index.duplicate_of("write a SHORT poem about the sea at night -- with a calm and hopeful tone!") == "exact"
    near = "Write a short poem about the sea at night, with a calm and hopeful tone please."
    assert jaccard(shingles(first), shingles(near)) >= 0.7
    assert index.duplicate_of(near) == "near"
    other = "Write a short story about a dog who learns to surf on the coast of Portugal."
    assert jaccard(shingles(first), shingles(other)) < 0.7
    assert index.duplicate_of(other) is None
    index.add(other)
    assert len(index) == 2


def test_duplicate_index_keeps_what_an_exhaustive_comparison_keeps():
    """MinHash banding finds the near pairs that comparing every pair finds (threshold 0.7), on a sample
    with near duplicates (one word changed in a long request) and merely similar ones (a short request)."""
    tail = "so that a curious child who has never studied any science at all can follow every single step of it"
    sample = [f"Explain how {thing} works, in {n} simple sentences, {tail}"
              for thing in ("a rainbow", "a volcano", "the moon", "a battery", "a magnet") for n in (3, 5)]
    sample += [f"Explain how {thing} works to a {age} year old"
               for thing in ("a rainbow", "a magnet") for age in (6, 9)]
    index, kept, exhaustive = DuplicateIndex(threshold=0.7), [], []
    for text in sample:
        if index.duplicate_of(text) is None:
            index.add(text)
            kept.append(text)
        if all(jaccard(shingles(text), shingles(other)) < 0.7 for other in exhaustive):
            exhaustive.append(text)
    assert kept == exhaustive
    assert len(sample) > len(kept) > 5  # both kinds occur: some dropped, the distinct topics kept


def test_diversity_report():
    report = diversity(["a b c", "a b d"], ["qa", "qa"])
    assert report["requests"] == 2
    assert report["distinct_1"] == pytest.approx(4 / 6, abs=1e-4)
    assert report["distinct_2"] == pytest.approx(3 / 4, abs=1e-4)
    assert report["categories"] == {"qa": 2}


def test_query_prefix_opens_the_user_turn(tiny_tokenizer):
    class Chat:
        name_or_path = "chat"
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize):
            return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)

    prefix, chat = query_prefix(Chat(), "Be brief.", "Translate")
    assert chat and prefix == "<|system|>Be brief.<|end|><|user|>Translate"
    # A base model without a chat template: the plain instruction template's opening.
    prefix, chat = query_prefix(tiny_tokenizer, "", "Write")
    assert not chat and prefix == "### Instruction:\nWrite"


def read(path):
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return [json.loads(line) for line in data.splitlines() if line.strip()]


ARGS = dict(base_model="embedded:tiny-llama", categories=["translation", "qa", "writing"], batch_size=4,
            answer_max_new_tokens=12, snapshot_every=2, threads=1)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole"
    assert self_instruct(out_dir=str(whole), count=10, **ARGS) == 10
    answers = read(whole / "answers.jsonl")
    requests = read(whole / "requests.jsonl")
    assert len(answers) == 10 and read(whole / "answers.jsonl.gz") == answers
    assert {r["category"] for r in requests} <= {"translation", "qa", "writing"}
    assert all(r["status"] == "kept" for r in requests if r["id"] in {a["source_row"] for a in answers})
    stats = json.loads((whole / "stats.json").read_text())
    assert stats["answers"] == 10 and sum(stats["status"].values()) == len(requests)

    # Interrupted: a partial run of several rounds, then a torn last line in both files, and its last
    # round cut short (redone from its own seed, not skipped).
    part = tmp_path / "part"
    self_instruct(out_dir=str(part), count=6, **ARGS)
    assert len(read(part / "requests.jsonl")) >= 2 * ARGS["batch_size"]
    with (part / "answers.jsonl").open("a") as f:
        f.write('{"instruction": "torn')
    lines = (part / "requests.jsonl").read_text().splitlines(keepends=True)
    (part / "requests.jsonl").write_text("".join(lines[:-1]) + '{"id": 9')
    assert self_instruct(out_dir=str(part), count=10, **ARGS) == 4
    assert read(part / "answers.jsonl") == answers
    assert read(part / "requests.jsonl")[: len(requests)] == requests

    # A fresh clone holds only the snapshots: it resumes from them.
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("manifest.json", "answers.jsonl.gz", "requests.jsonl.gz"):
        shutil.copy(part / name, clone / name)
    assert self_instruct(out_dir=str(clone), count=10, **ARGS) == 0
    assert read(clone / "answers.jsonl") == answers


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    self_instruct(out_dir=str(tmp_path), count=1, **ARGS)
    with pytest.raises(ConfigError, match=r"batch_size: 4 -> 8"):
        self_instruct(out_dir=str(tmp_path), count=2, **{**ARGS, "batch_size": 8})
    with pytest.raises(ConfigError, match="unknown self-instruct categories"):
        self_instruct(out_dir=str(tmp_path / "x"), count=1, **{**ARGS, "categories": ["poetry"]})
    assert main_self_instruct(["--base_model", "embedded:tiny-llama", "--out_dir", str(tmp_path), "--count", "2",
                               "--batch_size", "8", "--threads", "1"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_a_model_that_writes_no_usable_request_stops_with_an_error(tmp_path, monkeypatch):
    from kangaroo_lit import distill

    monkeypatch.setattr("kangaroo_lit.data.self_instruct.reject_reason", lambda *a, **k: "too_short")
    with pytest.raises(ConfigError, match=f"{distill.MAX_BARREN_ROUNDS} rounds in a row kept no request"):
        self_instruct(out_dir=str(tmp_path), count=2, **{**ARGS, "batch_size": 1})


def test_a_failed_start_leaves_no_manifest(tmp_path):
    from kangaroo_lit.errors import KangarooError

    with pytest.raises((KangarooError, OSError)):
        self_instruct(out_dir=str(tmp_path / "x"), count=2, **{**ARGS, "base_model": str(tmp_path / "no-model")})
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_categories_never_name_spec_bench_questions():
    """The hints steer towards kinds of work, not test questions: no category text quotes Spec-Bench."""
    from pathlib import Path

    questions = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench_question.jsonl"
    if not questions.exists():
        pytest.skip("needs ../shared/data/spec_bench_question.jsonl")
    turns = [t for line in questions.read_text().splitlines() for t in json.loads(line).get("turns", [])]
    for category in CATEGORIES.values():
        for text in (category.hint, *category.openings):
            if len(text.split()) >= 4:
                assert not any(text in t for t in turns), text
