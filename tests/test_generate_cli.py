"""``kangaroo-lit generate``: JSON output parsed, text equals the verifier's greedy output."""

import json

import torch
from transformers import AutoTokenizer

from kangaroo_lit.cli import main
from kangaroo_lit.decoding import VanillaDecoder
from kangaroo_lit.settings import LoraSettings
from tests.helpers import trained_checkpoint

KEYS = {"text", "new_tokens", "wall_time_s", "tokens_per_s", "decoding_steps", "accept_lengths", "mat", "accept_rate"}


def test_generate_json_from_an_artifact(tiny_llama_dir, tmp_path, capsys):
    _, ckpt = trained_checkpoint(tiny_llama_dir, tmp_path, lora=LoraSettings(rank=4, scope="draft"))
    art = tmp_path / "art"
    assert main(["export", "--ckpt_path", str(ckpt), "--out_dir", str(art)]) == 0
    capsys.readouterr()
    code = main(["generate", "--artifact", str(art), "--prompt", "What is 2 plus 3?", "--format", "instruction",
                 "--max_new_tokens", "16", "--compare_vanilla", "--json", "--dtype", "float64"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)  # stdout holds exactly one JSON object
    assert KEYS | {"vanilla_tokens_per_s", "speedup", "identical"} <= set(data)
    assert data["identical"] is True
    assert sum(data["accept_lengths"]) == data["new_tokens"] == 16
    assert data["accept_lengths"][0] == 1 and len(data["accept_lengths"]) == data["decoding_steps"]
    assert data["mat"] == data["new_tokens"] / data["decoding_steps"]
    assert 0.0 <= data["accept_rate"] <= 1.0
    # an artifact fixes its exit layer: asking for another one is an error, not a silent override
    assert main(["generate", "--artifact", str(art), "--exit_layer", "2", "--prompt", "x"]) == 2
    assert "exit layer 1" in capsys.readouterr().err


def test_generate_defaults_to_the_artifacts_recorded_sizing(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """Without --threshold / --max_draft / --skip_below, generate decodes with the chain sizing the artifact
    records (``bench threshold_curve --record``); a flag given wins over the record."""
    from kangaroo_lit import cli_generate
    from kangaroo_lit.artifact import record_in_manifest

    _, ckpt = trained_checkpoint(tiny_llama_dir, tmp_path, lora=LoraSettings(rank=4, scope="draft"))
    art = tmp_path / "art"
    assert main(["export", "--ckpt_path", str(ckpt), "--out_dir", str(art)]) == 0
    record_in_manifest(art, "sizing", {"threshold": 0.85, "max_draft": 3, "skip_below": 0.05})
    used = []
    real = cli_generate.decode_one

    def spy(opts, model, tokenizer, ids, stream, decoding):
        used.append(decoding)
        return real(opts, model, tokenizer, ids, stream, decoding)

    monkeypatch.setattr(cli_generate, "decode_one", spy)
    args = ["generate", "--artifact", str(art), "--prompt", "hi", "--max_new_tokens", "4", "--json"]
    assert main(args) == 0
    assert main([*args, "--threshold", "0.3", "--max_draft", "5"]) == 0
    assert main(["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompt", "hi",
                 "--max_new_tokens", "4", "--json"]) == 0
    capsys.readouterr()
    sizing = [(d.threshold, d.max_draft, d.skip_below) for d in used]
    assert sizing == [(0.85, 3, 0.05), (0.3, 5, 0.05), (0.6, 6, 0.0)]


def test_generate_streams_text_and_summary(tiny_llama_dir, capsys):
    code = main(["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompt", "hello",
                 "--max_new_tokens", "10", "--dtype", "float64"])
    captured = capsys.readouterr()
    assert code == 0
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    from kangaroo_lit.architectures import load_base_model
    from kangaroo_lit.model import KangarooModel

    model = KangarooModel(load_base_model(str(tiny_llama_dir), "float64"), 1, trainable_dtype=torch.float64).eval()
    expected = VanillaDecoder(model).generate(tok("hello", return_tensors="pt").input_ids, 10, tok.eos_token_id)
    assert captured.out == tok.decode(expected.tokens, skip_special_tokens=True) + "\n"
    assert "tokens/s, MAT" in captured.err


def test_an_empty_prompt_decodes_from_bos_and_null_stays_text(tiny_llama_dir, capsys):
    """--prompt "" (or blank) starts from the BOS token, as HF generate without input; "null" is a word."""
    from kangaroo_lit.architectures import load_base_model
    from kangaroo_lit.model import KangarooModel

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = KangarooModel(load_base_model(str(tiny_llama_dir), "float64"), 1, trainable_dtype=torch.float64).eval()
    for prompt, ids in (("", [[tok.bos_token_id]]), (" ", [[tok.bos_token_id]]),
                        ("null", tok("null", return_tensors="pt").input_ids.tolist())):
        code = main(["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompt", prompt,
                     "--max_new_tokens", "6", "--dtype", "float64", "--json"])
        assert code == 0
        expected = VanillaDecoder(model).generate(torch.tensor(ids), 6, tok.eos_token_id)
        assert json.loads(capsys.readouterr().out)["text"] == tok.decode(expected.tokens, skip_special_tokens=True)


def test_generate_with_the_lookup_drafter_equals_vanilla(tiny_llama_dir, capsys):
    code = main(["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompt", "a b c a b c a b",
                 "--max_new_tokens", "12", "--dtype", "float64", "--drafter", "lookup", "--prompt_lookup", "3",
                 "--compare_vanilla", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["identical"] is True


def test_generate_sampling_json_has_null_identical(tiny_llama_dir, capsys):
    code = main(["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompt", "hi",
                 "--max_new_tokens", "8", "--temperature", "0.8", "--top_p", "0.9", "--compare_vanilla", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["identical"] is None


def test_generate_errors_are_clear(tiny_llama_dir, tmp_path, capsys):
    assert main(["generate", "--base_model", str(tiny_llama_dir), "--prompt", "x"]) == 2
    assert "--base_model without --artifact needs --exit_layer" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x"]) == 2
    assert "give --artifact, or --base_model with --exit_layer" in capsys.readouterr().err
    for prompts in ([], ["--prompt", "x", "--prompt_file", str(tmp_path / "p.txt")]):
        assert main(["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", *prompts]) == 2
        assert "give exactly one of --prompt and --prompt_file" in capsys.readouterr().err
    assert main(["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompt", "x " * 600,
                 "--max_new_tokens", "8"]) == 2
    assert "512" in capsys.readouterr().err  # names the context length
    assert main(["generate", "--artifact", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a kangaroo_lit artifact" in capsys.readouterr().err


def test_generate_prompt_file_from_a_config_file(tiny_llama_dir, tmp_path, capsys):
    """The model and decoding settings from --config, the prompts from a file: one JSON object each."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n# a heading, not a YAML comment\n")
    config = tmp_path / "generate.yaml"
    config.write_text(f"base_model: {tiny_llama_dir}\nexit_layer: 1\nmax_new_tokens: 6\ndtype: float64\n")
    code = main(["generate", "--config", str(config), "--prompt_file", str(prompts), "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # one JSON object per line
    assert len(rows) == 2 and all(isinstance(row, dict) for row in rows)
    assert all(KEYS <= set(row) and row["new_tokens"] == 6 for row in rows)


def count_decodes(monkeypatch):
    """Count SelfSpeculativeDecoder.generate calls (the prompts actually decoded)."""
    from kangaroo_lit.decoding import SelfSpeculativeDecoder

    calls = []
    real = SelfSpeculativeDecoder.generate

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SelfSpeculativeDecoder, "generate", counting)
    return calls


def test_generate_checks_every_prompt_before_decoding_the_first(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """A prompt too long for the context, third in the file, stops the run before anything is decoded."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n\nonce upon a time\n" + "x " * 600 + "\n")
    calls = count_decodes(monkeypatch)
    code = main(["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompt_file", str(prompts),
                 "--max_new_tokens", "8", "--json"])
    captured = capsys.readouterr()
    assert code == 2 and calls == [] and captured.out == ""
    assert "Traceback" not in captured.err
    err = [line for line in captured.err.splitlines() if line.startswith("error:")]  # after HF's progress bars
    assert len(err) == 1 and err[0].startswith(f"error: {prompts}:4: prompt of ")  # the file's own line number
    assert "+ --max_new_tokens 8 =" in err[0] and "max_position_embeddings 512" in err[0]


def test_generate_json_writes_each_prompt_as_it_finishes(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """One JSON object per line, each printed (and flushed) before the next prompt is decoded."""
    from kangaroo_lit import cli_generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "once"}\n{"prompt": "upon"}\n')
    seen_before = []
    real = cli_generate.decode_one

    def spy(*args, **kwargs):
        seen_before.append(capsys.readouterr().out)  # what stdout held when this prompt started
        return real(*args, **kwargs)

    monkeypatch.setattr(cli_generate, "decode_one", spy)
    code = main(["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompt_file", str(prompts),
                 "--max_new_tokens", "4", "--json"])
    assert code == 0
    outputs = [*seen_before[1:], capsys.readouterr().out]
    assert seen_before[0] == "" and all(len(out.splitlines()) == 1 for out in outputs), outputs
    assert all(json.loads(out)["new_tokens"] == 4 for out in outputs)


def test_generate_picks_one_thread_for_a_tiny_model(tiny_llama_dir, capsys):
    import torch

    from kangaroo_lit.cli import main

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        args = ["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompt", "Once",
                "--max_new_tokens", "4", "--device", "cpu"]
        assert main(args) == 0
        assert torch.get_num_threads() == 1  # a 0.3M-parameter model gains nothing from a second thread
        assert main([*args, "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
