"""Spec-Bench parts without a model: the question file, prompt rendering, answer files, the aggregation."""

import json
import math

import pytest

from kangaroo_lit.errors import ConfigError, DataError, DataFileNotFound
from kangaroo_lit.specbench.answers import CHOICE_FIELDS, FIELDS, append_answer, read_answers, reorder
from kangaroo_lit.specbench.conversation import VICUNA_SYSTEM, PromptRenderer, cut_left
from kangaroo_lit.specbench.questions import SUBTASKS, Question, load_questions, select_questions
from kangaroo_lit.specbench.report import group_metrics, markdown, summarize

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorten it."]},
    {"question_id": 90, "category": "coding", "turns": ["Write code.", "Explain it."]},
    {"question_id": 161, "category": "translation", "turns": ["Translate German to English: Hallo Welt"]},
    {"question_id": 321, "category": "qa", "turns": ["Who wrote Hamlet?"]},
    {"question_id": 322, "category": "qa", "turns": ["What is the capital of France?"]},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------------
# Questions
def test_questions_two_turns_and_subtasks(tmp_path):
    questions = load_questions(write_jsonl(tmp_path / "q.jsonl", QUESTIONS))
    assert [q.question_id for q in questions] == [81, 90, 161, 321, 322]
    assert questions[0].turns == ("Write a poem.", "Now shorten it.")
    assert [q.subtask for q in questions] == ["mt_bench", "mt_bench", "translation", "qa", "qa"]
    assert questions[3].line == 4
    picked = select_questions(questions, limit=1)
    assert [q.question_id for q in picked] == [81, 161, 321]
    assert [q.question_id for q in select_questions(questions, ["qa"])] == [321, 322]


@pytest.mark.parametrize("bad, message", [
    ('{"question_id": 5, "category": "qa", "turns": ["x"]', "not valid JSON"),
    ({"question_id": 5, "category": "qa"}, "field 'turns' is missing"),
    ({"question_id": "5", "category": "qa", "turns": ["x"]}, "'question_id' must be an integer"),
    ({"question_id": 5, "category": "poetry", "turns": ["x"]}, "category 'poetry' belongs to no Spec-Bench subtask"),
    ({"question_id": 5, "category": "qa", "turns": []}, "'turns' must be a non-empty list"),
    ({"question_id": 5, "category": "qa", "turns": ["x", 3]}, "'turns' must be a non-empty list"),
    ({"question_id": 81, "category": "qa", "turns": ["x"]}, "question_id 81 repeats the one on line 1"),
    ([1, 2], "expected a JSON object"),
])
def test_a_malformed_line_is_a_data_error_with_its_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "q.jsonl", [QUESTIONS[0], QUESTIONS[2], bad, QUESTIONS[3]])
    with pytest.raises(DataError, match=rf"q\.jsonl:3: .*{message}"):
        load_questions(path)


def test_missing_or_empty_question_file(tmp_path):
    with pytest.raises(DataFileNotFound):
        load_questions(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no question"):
        load_questions(tmp_path / "empty.jsonl")


def test_selection_errors(tmp_path):
    questions = load_questions(write_jsonl(tmp_path / "q.jsonl", QUESTIONS))
    with pytest.raises(ConfigError, match="unknown subtask"):
        select_questions(questions, ["mtbench"])
    with pytest.raises(ConfigError, match="--limit must be >= 1"):
        select_questions(questions, limit=0)
    with pytest.raises(DataError, match="no question of subtask"):
        select_questions(questions, ["rag"])


def test_the_real_question_file(shared_dir):
    questions = load_questions(shared_dir / "data" / "spec_bench_question.jsonl")
    assert len(questions) == 480
    for subtask in SUBTASKS:
        these = [q for q in questions if q.subtask == subtask]
        assert len(these) == 80
        assert all(len(q.turns) == (2 if subtask == "mt_bench" else 1) for q in these)


# --------------------------------------------------------------------------------------------------
# Prompts
def test_vicuna_template_continues_the_conversation(tiny_tokenizer):
    renderer = PromptRenderer(tiny_tokenizer, "auto", context_length=512, max_new_tokens=16)
    assert renderer.template == "vicuna"  # the tiny tokenizer has no chat template
    assert renderer.render(["Hi?"], []) == f"{VICUNA_SYSTEM} USER: Hi? ASSISTANT:"
    assert renderer.render(["Hi?", "More?"], ["Hello."]) == (
        f"{VICUNA_SYSTEM} USER: Hi? ASSISTANT: Hello.</s>USER: More? ASSISTANT:")


def test_instruction_and_chat_templates(tiny_tokenizer):
    renderer = PromptRenderer(tiny_tokenizer, "instruction", 512, 16)
    assert renderer.render(["A", "B"], ["a"]) == (
        "### Instruction:\nA\n\n### Response:\na\n\n### Instruction:\nB\n\n### Response:\n")
    with pytest.raises(ConfigError, match="no chat template"):
        PromptRenderer(tiny_tokenizer, "chat", 512, 16)
    import copy

    chat = copy.deepcopy(tiny_tokenizer)
    chat.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    renderer = PromptRenderer(chat, "auto", 512, 16)
    assert renderer.template == "chat"
    assert renderer.render(["A", "B"], ["a"]) == "<user>A<assistant>a<user>B<assistant>"


def test_long_prompts_are_cut_from_the_left_keeping_bos(tiny_tokenizer):
    assert cut_left([1, 5, 6, 7, 8], 3, bos_id=1) == ([1, 7, 8], 2)
    assert cut_left([5, 6, 7, 8], 3, bos_id=1) == ([6, 7, 8], 1)
    assert cut_left([5, 6], 3, bos_id=1) == ([5, 6], 0)
    renderer = PromptRenderer(tiny_tokenizer, "vicuna", context_length=64, max_new_tokens=16)
    prompt = renderer.encode(["word " * 200], [])
    assert prompt.tokens == 48 and prompt.cut > 0 and prompt.ids.shape == (1, 48)
    assert prompt.ids[0, 0].item() == tiny_tokenizer.bos_token_id
    with pytest.raises(ConfigError, match="leaves no room for a prompt"):
        PromptRenderer(tiny_tokenizer, "vicuna", context_length=64, max_new_tokens=64)


# --------------------------------------------------------------------------------------------------
# Answer files
def test_a_truncated_last_line_is_dropped_and_cut_from_the_file(tmp_path):
    path = tmp_path / "run_1" / "m.jsonl"
    for qid in (1, 2, 3):
        append_answer(path, {"question_id": qid, "x": "y" * 10})
    data = path.read_bytes()
    path.write_bytes(data[:-8])  # the third line loses its end (and its newline)
    assert sorted(read_answers(path)) == [1, 2]
    assert path.read_bytes().count(b"\n") == 2 and path.read_bytes().endswith(b"\n")
    append_answer(path, {"question_id": 3, "x": "z"})
    assert sorted(read_answers(path)) == [1, 2, 3]


def test_a_malformed_line_inside_an_answer_file_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"question_id": 1}\nnot json\n{"question_id": 3}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:2: not an answer line"):
        read_answers(path)


def test_reorder_sorts_by_question_order_and_keeps_one_line_each(tmp_path):
    path = tmp_path / "m.jsonl"
    for qid in (3, 1, 2, 1):
        append_answer(path, {"question_id": qid, "n": qid})
    reorder(path, [1, 2, 3])
    assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == [1, 2, 3]


# --------------------------------------------------------------------------------------------------
# Aggregation (DESIGN §3) against hand-computed values
def answer(qid, category, new_tokens, wall, steps, drafted, accepted, tokens, accept_lengths=None):
    return {"question_id": qid, "category": category, "answer_id": "a", "model_id": "m", "tstamp": 0.0,
            "choices": [{"index": 0, "turns": ["t"] * len(new_tokens), "new_tokens": new_tokens, "wall_time": wall,
                         "decoding_steps": steps, "accept_lengths": accept_lengths or [], "token_ids": tokens,
                         "drafted": drafted, "accepted": accepted, "prompt_cut": [0] * len(new_tokens)}]}


QS = [Question(81, "writing", ("a", "b")), Question(321, "qa", ("c",)), Question(322, "qa", ("d",))]


def synthetic_run(spec_wall_scale=1.0):
    vanilla = {
        81: answer(81, "writing", [10, 10], [1.0, 1.0], [10, 10], [0, 0], [0, 0], [[1], [2]]),   # 10 tok/s
        321: answer(321, "qa", [20], [1.0], [20], [0], [0], [[3]]),                             # 20 tok/s
        322: answer(322, "qa", [30], [2.0], [30], [0], [0], [[4]]),                             # 15 tok/s
    }
    k = spec_wall_scale
    spec = {
        81: answer(81, "writing", [10, 10], [0.5 * k, 0.5 * k], [4, 6], [8, 8], [6, 4], [[1], [2]]),  # 20 / k
        321: answer(321, "qa", [20], [0.5 * k], [5], [10], [15], [[3]]),                           # 40 / k
        322: answer(322, "qa", [30], [1.5 * k], [15], [20], [10], [[9]]),                          # 20 / k, differs
    }
    hf = {q: answer(q, r["category"], r["choices"][0]["new_tokens"], r["choices"][0]["wall_time"],
                    [n // 2 for n in r["choices"][0]["new_tokens"]], [None] * len(r["choices"][0]["new_tokens"]),
                    [None] * len(r["choices"][0]["new_tokens"]), r["choices"][0]["token_ids"])
          for q, r in vanilla.items()}
    return {"vanilla": vanilla, "kangaroo": spec, "pld": hf}


def test_summary_arithmetic_one_run():
    s = summarize({1: synthetic_run()}, QS, ["vanilla", "kangaroo", "pld"])
    assert s["groups"] == ["mt_bench", "qa", "overall"]
    mt, qa, overall = (s["results"][g]["kangaroo"] for g in ("mt_bench", "qa", "overall"))
    assert mt["speedup"]["mean"] == pytest.approx(20 / 10)
    assert mt["mat"]["mean"] == pytest.approx(20 / 10)
    assert mt["accept_rate"]["mean"] == pytest.approx(10 / 16)
    assert mt["identical_fraction"]["mean"] == 1.0
    assert qa["tokens_per_s"]["mean"] == pytest.approx((40 + 20) / 2)
    assert qa["vanilla_tokens_per_s"]["mean"] == pytest.approx((20 + 15) / 2)
    assert qa["speedup"]["mean"] == pytest.approx(30 / 17.5)
    assert qa["mat"]["mean"] == pytest.approx(50 / 20)
    assert qa["accept_rate"]["mean"] == pytest.approx(25 / 30)
    assert qa["identical_fraction"]["mean"] == 0.5
    # overall pools every question: mean of per-question tokens/s, then the ratio of the means
    assert overall["speedup"]["mean"] == pytest.approx(((20 + 40 + 20) / 3) / ((10 + 20 + 15) / 3))
    assert overall["mat"]["mean"] == pytest.approx(70 / 30)
    assert overall["accept_rate"]["mean"] == pytest.approx(35 / 46)
    assert overall["identical_fraction"]["mean"] == pytest.approx(2 / 3)
    assert overall["speedup"]["std"] == 0.0 and overall["runs"] == 1
    assert s["results"]["overall"]["vanilla"]["speedup"]["mean"] == 1.0
    assert s["results"]["overall"]["vanilla"]["accept_rate"] is None  # nothing drafted
    pld = s["results"]["overall"]["pld"]  # HF-style: no accept lengths, drafts unknown
    assert pld["mat"]["mean"] == pytest.approx(70 / 35) and pld["accept_rate"] is None
    assert pld["speedup"]["mean"] == pytest.approx(1.0)


def test_summary_mean_and_std_over_runs():
    s = summarize({1: synthetic_run(1.0), 2: synthetic_run(2.0)}, QS, ["vanilla", "kangaroo"])
    speedup = s["results"]["overall"]["kangaroo"]["speedup"]
    one, two = (80 / 3) / 15, (40 / 3) / 15
    assert speedup["per_run"] == pytest.approx([one, two])
    assert speedup["mean"] == pytest.approx((one + two) / 2)
    assert speedup["std"] == pytest.approx(abs(one - two) / math.sqrt(2))  # sample std, as speed.py's ddof=1
    assert s["results"]["overall"]["kangaroo"]["runs"] == 2


def test_sampling_has_no_identical_fraction_and_markdown_renders():
    s = summarize({1: synthetic_run()}, QS, ["vanilla", "kangaroo", "pld"], greedy=False)
    assert s["results"]["overall"]["kangaroo"]["identical_fraction"] is None
    text = markdown(s, "heading", {"vanilla": "the baseline"})
    assert "| kangaroo | 2.000 | 1.714 | 1.778 |" in text
    # acceptance per subtask (10/16, 25/30, 35/46); nothing drafted (vanilla) or unknown (HF's pld): "-"
    acceptance = text.split("Acceptance (accepted / drafted")[1].split("Overall:")[0]
    assert "| kangaroo | 0.625 | 0.833 | 0.761 |" in acceptance
    assert "| vanilla | - | - | - |" in acceptance and "| pld | - | - | - |" in acceptance
    assert "* `vanilla`: the baseline" in text


def test_group_metrics_uses_only_questions_both_answered():
    run = synthetic_run()
    del run["kangaroo"][322]
    m = group_metrics(run["kangaroo"], run["vanilla"], [81, 321, 322])
    assert m["questions"] == 2
    assert m["speedup"] == pytest.approx(30 / 15)


def test_answer_fields_are_spec_benchs():
    assert FIELDS == ("question_id", "category", "answer_id", "model_id", "choices", "tstamp")
    assert set(CHOICE_FIELDS) == {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}


def test_the_draft_decodes_with_its_recorded_sizing(tmp_path):
    """--threshold / --max_draft / --skip_below left open take the artifact's recorded sizing (all three:
    skip_below was once dropped); a value given wins."""
    import dataclasses
    import shutil
    from pathlib import Path

    from kangaroo_lit.artifact import record_in_manifest
    from kangaroo_lit.specbench.runner import SpecBenchSettings, resolve_draft

    shipped = Path(__file__).resolve().parents[1] / "drafts" / "smollm2-135m-instruct" / "kangaroo.json"
    art = tmp_path / "art"
    art.mkdir()
    shutil.copy(shipped, art / "kangaroo.json")  # the manifest is all resolve_draft reads
    record_in_manifest(art, "sizing", {"threshold": 0.85, "max_draft": 3, "skip_below": 0.05})
    fields = {f.name: None for f in dataclasses.fields(SpecBenchSettings)}
    settings = SpecBenchSettings(**{**fields, "artifact": str(art)})
    draft = resolve_draft(settings)
    assert (draft.threshold, draft.max_draft, draft.skip_below) == (0.85, 3, 0.05)
    draft = resolve_draft(dataclasses.replace(settings, threshold=0.3, skip_below=0.0))
    assert (draft.threshold, draft.max_draft, draft.skip_below) == (0.3, 3, 0.0)


def test_a_folder_older_than_a_setting_resumes_at_its_default(tmp_path):
    """specbench.json written before a setting existed (here the tree fields): resuming is allowed while the
    setting is at its default, refused (naming it) otherwise; a recorded setting that differs is refused."""
    from kangaroo_lit.specbench.runner import ANSWER_SETTINGS, STATE_FILE, check_out_dir

    settings = {k: None for k in ANSWER_SETTINGS}
    settings.update(threshold=0.6, max_draft=6, skip_below=0.0, tree_width=4, tree_nodes=7, tree_depth=6)
    old = {k: v for k, v in settings.items() if not k.startswith("tree_")}
    (tmp_path / STATE_FILE).write_text(json.dumps({"answer_settings": old}))
    check_out_dir(tmp_path, settings, overwrite=False)
    with pytest.raises(ConfigError, match="tree_width 'absent' there, 8 now"):
        check_out_dir(tmp_path, {**settings, "tree_width": 8}, overwrite=False)
    with pytest.raises(ConfigError, match="max_draft 6 there, 1 now"):
        check_out_dir(tmp_path, {**settings, "max_draft": 1}, overwrite=False)


def test_a_folder_older_than_the_sized_lookup_window_resumes_with_the_fixed_one(tmp_path):
    """Lookup windows were fixed before ``lookup_window`` existed (whose default is now ``cost``): a folder that
    does not record it resumes with ``--lookup_window fixed`` only."""
    from kangaroo_lit.specbench.runner import ANSWER_SETTINGS, STATE_FILE, check_out_dir

    assert "lookup_window" in ANSWER_SETTINGS
    settings = {k: None for k in ANSWER_SETTINGS}
    settings.update(threshold=0.6, max_draft=6, skip_below=0.0, lookup_window="fixed")
    old = {k: v for k, v in settings.items() if k != "lookup_window"}
    (tmp_path / STATE_FILE).write_text(json.dumps({"answer_settings": old}))
    check_out_dir(tmp_path, settings, overwrite=False)
    with pytest.raises(ConfigError, match="lookup_window 'absent' there, 'cost' now"):
        check_out_dir(tmp_path, {**settings, "lookup_window": "cost"}, overwrite=False)
