"""Self-distillation: rows the model answered itself, in Dolly format, resumable."""

import json

import pytest

from kangaroo_lit.data.rows import load_file_rows
from kangaroo_lit.distill import distill, finished_pairs
from kangaroo_lit.errors import ConfigError, DataError
from tests.conftest import REPO_ROOT

ROWS = REPO_ROOT / "tests" / "fixtures" / "dolly-tiny.jsonl"


def test_rows_are_dolly_rows_with_the_models_own_greedy_answer(tmp_path, tiny_llama_dir, one_thread):
    from transformers import AutoTokenizer

    from kangaroo_lit.architectures import load_base_model
    from kangaroo_lit.data.tokenize import RowEncoder

    out = tmp_path / "distilled.jsonl"
    assert distill(str(tiny_llama_dir), str(ROWS), str(out), max_new_tokens=12, batch_size=1, max_rows=3,
                   format="instruction") == 3
    assert len(load_file_rows(out, "dolly", "error")) == 3  # parses as Dolly rows
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source_row"] for r in rows] == [0, 1, 2]  # source order (generated longest prompt first)
    source = load_file_rows(ROWS, "dolly", "error")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = load_base_model(str(tiny_llama_dir), "float32")
    encoder = RowEncoder(tok, 10**9)
    for row in rows:
        src = source[row["source_row"]]
        assert row["instruction"] == src["instruction"] and row["context"] == src.get("context", "")
        ids = tok(encoder.render({**src, "response": ""})[0], return_tensors="pt").input_ids
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        new = expected[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert row["response"] == tok.decode(new, skip_special_tokens=True).strip()


def test_interrupted_run_resumes_to_the_same_rows(tmp_path, tiny_llama_dir, one_thread):
    kw = dict(max_new_tokens=8, batch_size=2, max_rows=5, format="instruction", temperature=0.9,
              samples_per_row=2, seed=3)
    straight = tmp_path / "straight.jsonl"
    distill(str(tiny_llama_dir), str(ROWS), str(straight), **kw)
    interrupted = tmp_path / "interrupted.jsonl"
    lines = straight.read_text().splitlines(keepends=True)
    # as if killed mid-write: four whole lines, then half of the fifth
    interrupted.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    assert len(finished_pairs(interrupted)) == 4 and interrupted.read_text().endswith("\n")
    assert distill(str(tiny_llama_dir), str(ROWS), str(interrupted), **kw) == len(lines) - 4

    def by_pair(path):
        return {(r["source_row"], r["sample"]): r["response"] for r in map(json.loads, path.read_text().splitlines())}

    assert list(by_pair(interrupted)) == list(by_pair(straight)) == sorted(by_pair(straight))  # source order
    assert len(by_pair(straight)) == 10
    # seeded per batch, so the redone batches sample the same answers as the uninterrupted run
    same = sum(by_pair(interrupted)[k] == v for k, v in by_pair(straight).items())
    assert same >= 8, f"only {same} of 10 answers reproduced"


def test_bad_inputs_are_refused(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="temperature"):
        distill(str(tiny_llama_dir), str(ROWS), str(tmp_path / "o.jsonl"), samples_per_row=2)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"source_row": 0, "sample": 0}\nnot json\n{"source_row": 1, "sample": 0}\n')
    with pytest.raises(DataError, match="line 2"):
        finished_pairs(broken)


def test_resume_is_keyed_by_row_and_sample(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text('{"source_row": 3, "sample": 1}\n{"source_row": 0, "sample": 0}\n{"source_r')
    assert finished_pairs(path) == {(3, 1), (0, 0)}
    assert path.read_text().count("\n") == 2
