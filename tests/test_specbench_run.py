"""``kangaroo-lit specbench`` end to end on tiny models: answer files, identical greedy outputs, resume, errors."""

import json
import shutil

import pytest

from kangaroo_lit.specbench.answers import CHOICE_FIELDS, FIELDS
from kangaroo_lit.specbench.cli import main, parse

ALL_METHODS = ["vanilla", "generate", "pld", "hf_early_exit", "lookup", "early_exit"]
# One of each shape: an MT-Bench question (two turns), a short one and a long one (cut to fit the context).
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a poem about the sea.", "Now make it rhyme."]},
    {"question_id": 82, "category": "writing", "turns": ["Not selected by --limit 1.", "Nor this."]},
    {"question_id": 321, "category": "qa", "turns": ["Who wrote Hamlet?"]},
    {"question_id": 481, "category": "rag", "turns": ["Passage: " + "the sea is blue and wide. " * 60 + "Why?"]},
]


@pytest.fixture
def question_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def run(question_file, out_dir, *extra, model=None):
    argv = ["--question_file", str(question_file), "--out_dir", str(out_dir), "--limit", "1",
            "--max_new_tokens", "8", "--warmup", "0", "--no_progress", *extra]
    if model is not None:
        argv += ["--base_model", str(model)]
    return main(argv)


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timings(record):
    record = json.loads(json.dumps(record))
    record.pop("tstamp")
    record["choices"][0].pop("wall_time")
    return record


@pytest.fixture(scope="module")
def float64_run(tmp_path_factory, tiny_llama_dir, one_thread):
    """One greedy float64 run of every method on the tiny random Llama (untrained early exit, layer 1);
    its context is shrunk to 320 tokens so the long question gets cut."""
    import json as _json

    root = tmp_path_factory.mktemp("specbench")
    model = root / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = _json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 320
    (model / "config.json").write_text(_json.dumps(config))
    questions = root / "questions.jsonl"
    questions.write_text("".join(_json.dumps(q) + "\n" for q in QUESTIONS))
    out = root / "out"
    assert run(questions, out, "--dtype", "float64", "--exit_layer", "1", "--threshold", "0.0", model=model) == 0
    return questions, model, out


def test_answer_files_have_every_field_spec_bench_reads(float64_run):
    _, _, out = float64_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ALL_METHODS
    for method in ALL_METHODS:
        records = lines(out / "run_1" / f"{method}.jsonl")
        assert [r["question_id"] for r in records] == [81, 321, 481]
        for r in records:
            assert set(FIELDS) <= set(r) and len(r["choices"]) == 1
            choice = r["choices"][0]
            assert set(CHOICE_FIELDS) <= set(choice) and choice["index"] == 0
            turns = 2 if r["question_id"] == 81 else 1
            for key in ("turns", "decoding_steps", "new_tokens", "wall_time", "token_ids", "prompt_cut"):
                assert len(choice[key]) == turns, (method, key)
            assert all(isinstance(t, str) for t in choice["turns"])
            assert choice["new_tokens"] == [len(t) for t in choice["token_ids"]]
            assert all(w > 0 for w in choice["wall_time"])
            # our decoders: one flat list over the turns, summing to the tokens
            if method in ("vanilla", "lookup", "early_exit"):
                assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"])
                assert len(choice["accept_lengths"]) == sum(choice["decoding_steps"])
            else:  # HF generate reports no per-pass accept lengths
                assert choice["accept_lengths"] == []
        assert records[2]["choices"][0]["prompt_cut"][0] > 0  # the long rag question
        assert records[2]["choices"][0]["prompt_tokens"][0] == 320 - 8
    for name in ("summary.json", "summary.md", "summary.png", "specbench.json"):
        assert (out / name).is_file()
    results = summary["results"]
    assert summary["groups"] == ["mt_bench", "qa", "rag", "overall"]
    for group in summary["groups"]:
        for method in ALL_METHODS:
            row = results[group][method]
            for metric in ("speedup", "mat", "tokens_per_s", "vanilla_tokens_per_s", "identical_fraction"):
                assert row[metric]["mean"] > 0, (group, method, metric)
    assert results["overall"]["vanilla"]["speedup"]["mean"] == 1.0
    assert results["overall"]["pld"]["accept_rate"] is not None  # counted by the forward hook
    # generate = one full pass per token; the early exits drafted (threshold 0: max_draft every round)
    assert results["overall"]["generate"]["decoding_steps"] == results["overall"]["generate"]["new_tokens"]
    assert results["overall"]["early_exit"]["decoding_steps"] < results["overall"]["early_exit"]["new_tokens"]
    assert results["overall"]["hf_early_exit"]["decoding_steps"] < results["overall"]["hf_early_exit"]["new_tokens"]


def test_greedy_float64_outputs_identical_to_the_vanilla_loop(float64_run):
    _, _, out = float64_run
    results = json.loads((out / "summary.json").read_text())["results"]
    for method in ALL_METHODS:
        assert results["overall"][method]["identical_fraction"]["mean"] == 1.0, method
    # the second MT-Bench turn continued each method's own conversation, after its first answer
    vanilla = lines(out / "run_1" / "vanilla.jsonl")[0]["choices"][0]
    assert vanilla["prompt_tokens"][1] > vanilla["prompt_tokens"][0] + vanilla["new_tokens"][0] - 2


def test_an_interrupted_run_resumes_to_the_same_files(float64_run, tmp_path, capsys):
    questions, model, out = float64_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for name in ("summary.json", "summary.md", "summary.png"):
        (resumed / name).unlink()
    run_dir = resumed / "run_1"
    vanilla = (run_dir / "vanilla.jsonl").read_text().splitlines(keepends=True)
    # vanilla: the last line half written; pld: its middle line lost; early_exit: only the first line left
    (run_dir / "vanilla.jsonl").write_text("".join(vanilla[:2]) + vanilla[2][: len(vanilla[2]) // 2])
    pld = (run_dir / "pld.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "pld.jsonl").write_text(pld[0] + pld[2])
    (run_dir / "early_exit.jsonl").write_text(
        (run_dir / "early_exit.jsonl").read_text().splitlines(keepends=True)[0])
    kept = lines(run_dir / "generate.jsonl")
    capsys.readouterr()
    assert run(questions, resumed, "--dtype", "float64", "--exit_layer", "1", "--threshold", "0.0", model=model) == 0
    assert "resuming: 1 of 3 questions already answered" in capsys.readouterr().err
    for method in ALL_METHODS:
        got, want = lines(run_dir / f"{method}.jsonl"), lines(out / "run_1" / f"{method}.jsonl")
        assert [without_timings(r) for r in got] == [without_timings(r) for r in want], method
    assert lines(run_dir / "generate.jsonl") == kept  # finished answers were not redone
    a = json.loads((out / "summary.json").read_text())["results"]["overall"]
    b = json.loads((resumed / "summary.json").read_text())["results"]["overall"]
    for method in ALL_METHODS:
        for key in ("questions", "new_tokens", "decoding_steps", "prompts_cut", "mat", "identical_fraction"):
            assert a[method][key] == b[method][key], (method, key)


def test_other_settings_in_the_same_out_dir_are_refused(float64_run, capsys):
    questions, model, out = float64_run
    capsys.readouterr()
    assert run(questions, out, "--dtype", "float64", "--exit_layer", "2", model=model) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out_dir") and "exit_layer 1 there, 2 now" in err and "--overwrite" in err


@pytest.mark.parametrize("change", [["--kernel", "streaming"], ["--turns", "1"], ["--prompt_lookup", "3"]],
                         ids=["kernel", "turns", "prompt_lookup"])
def test_a_resume_with_another_answer_or_timing_setting_is_refused(float64_run, capsys, change):
    """Kernel, turns and prompt lookup change answers or timings: a resume must match them too."""
    questions, model, out = float64_run
    capsys.readouterr()
    assert run(questions, out, "--dtype", "float64", "--exit_layer", "1", "--threshold", "0.0", *change,
               model=model) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out_dir") and f"{change[0][2:]} " in err and "--overwrite" in err


def test_turns_beyond_a_questions_own_are_its_own(tmp_path, tiny_llama_dir, question_file, one_thread):
    """--turns 2 over every subtask: two turns where a question has two, one where it has one."""
    out = tmp_path / "out"
    assert run(question_file, out, "--turns", "2", "--methods", "[vanilla,lookup]", "--exit_layer", "1",
               model=tiny_llama_dir) == 0
    for method in ("vanilla", "lookup"):
        turns = {r["question_id"]: len(r["choices"][0]["turns"]) for r in lines(out / "run_1" / f"{method}.jsonl")}
        assert turns == {81: 2, 321: 1, 481: 1}


def test_trained_draft_from_an_artifact_is_identical_in_float64(tmp_path, tiny_llama_dir, question_file, one_thread):
    from tests.helpers import exported_artifact

    _, _, artifact = exported_artifact(tiny_llama_dir, tmp_path / "train")
    out = tmp_path / "out"
    assert run(question_file, out, "--artifact", str(artifact), "--dtype", "float64", "--subtasks", "[mt_bench,qa]",
               "--methods", "[kangaroo,hf_early_exit]") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["vanilla", "hf_early_exit", "kangaroo"]  # vanilla added: the baseline
    assert summary["exit_layer"] == 1 and summary["artifact"] == str(artifact.resolve())
    for method in summary["methods"]:
        assert summary["results"]["overall"][method]["identical_fraction"]["mean"] == 1.0
    assert not (out / "run_1" / "early_exit.jsonl").exists()


def test_sampling_and_several_runs(tmp_path, tiny_llama_dir, question_file, one_thread):
    out = tmp_path / "out"
    # --prompt_lookup 0 is allowed where no method copies tokens
    assert run(question_file, out, "--temperature", "0.8", "--runs", "2", "--subtasks", "[qa]", "--prompt_lookup", "0",
               "--methods", "[early_exit,generate]", "--exit_layer", "1", model=tiny_llama_dir) == 0
    summary = json.loads((out / "summary.json").read_text())
    row = summary["results"]["overall"]["early_exit"]
    assert row["identical_fraction"] is None and row["runs"] == 2 and len(row["speedup"]["per_run"]) == 2
    assert (out / "run_2" / "early_exit.jsonl").is_file()
    # each question and turn has its own seed, the same in every run: the sampled answers repeat
    one, two = (lines(out / f"run_{k}" / "vanilla.jsonl")[0]["choices"][0]["token_ids"] for k in (1, 2))
    assert one == two


def test_user_mistakes_are_one_line_errors(tmp_path, question_file, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n" + '{"question_id": 5, "category": "qa"}\n')
    assert run(bad, tmp_path / "out") == 2
    assert capsys.readouterr().err.strip() == (f"error: {bad}:2: field 'turns' is missing (fields: ['category', "
                                               "'question_id'])")
    assert run(question_file, tmp_path / "out", "--subtasks", "[chat]") == 2
    assert "unknown subtask(s) 'chat'" in capsys.readouterr().err
    assert run(question_file, tmp_path / "out", "--methods", "[medusa]") == 2
    assert "unknown method(s) 'medusa'" in capsys.readouterr().err
    assert run(tmp_path / "missing.jsonl", tmp_path / "out") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_print_config_round_trips_through_the_dispatcher(tmp_path, capsys):
    from kangaroo_lit.cli import main as kangaroo_lit

    capsys.readouterr()
    with pytest.raises(SystemExit):
        kangaroo_lit(["specbench", "--limit", "3", "--subtasks", "[qa,rag]", "--print_config"])
    config = tmp_path / "sb.yaml"
    config.write_text(capsys.readouterr().out)
    cfg = parse(["--config", str(config), "--max_new_tokens", "64"])
    assert cfg["limit"] == 3 and cfg["subtasks"] == ["qa", "rag"] and cfg["max_new_tokens"] == 64
    assert set(cfg) == set(parse([]))
    assert cfg["progress"] is True and parse(["--no_progress"])["progress"] is False
    with pytest.raises(SystemExit):
        kangaroo_lit(["specbench", "--help"])
    out = capsys.readouterr().out
    assert all(f"--{name}" in out for name in cfg)
