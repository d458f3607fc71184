"""``kangaroo-lit bench decode`` and ``bench cost_model`` on tiny models: the reports' numbers must agree
with the times and token counts they record (and with DESIGN §3's definitions), not only exist."""

import json
import statistics
import time
from pathlib import Path

import pytest
import torch

from kangaroo_lit.bench.common import pyplot
from kangaroo_lit.bench.decode import aggregate

pytestmark = pytest.mark.usefixtures("one_thread")

SPEED_ROW_KEYS = {"exit_layer", "threshold", "tokens_per_s", "speedup_vs_vanilla", "speedup_vs_generate",
                  "vanilla_over_generate", "mat", "accept_rate", "identical_fraction", "identical_spec_vanilla",
                  "identical_vanilla_generate", "new_tokens_mean"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tps(rec) -> float:
    """A record's tokens/s recomputed from its token count and wall time (seconds)."""
    return rec["new_tokens"] / rec["wall_time_s"]


@pytest.fixture(scope="module")
def speed_run(tiny_llama_dir, tmp_path_factory):
    """Two prompts, two thresholds, two runs, through the top-level ``kangaroo-lit`` dispatcher."""
    from kangaroo_lit.cli import main

    tmp = tmp_path_factory.mktemp("speed")
    prompts = tmp / "prompts.txt"
    prompts.write_text("What is 2 plus 3?\nOnce upon a time\n")
    out = tmp / "out"
    start = time.perf_counter()
    code = main(["bench", "decode", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompts",
                 str(prompts), "--max_new_tokens", "8", "--thresholds", "[0,0.6]", "--max_draft", "3", "--runs", "2",
                 "--warmup", "0", "--dtype", "float64", "--out_dir", str(out)])
    elapsed = time.perf_counter() - start
    assert code == 0
    return json.loads((out / "decode_speed.json").read_text()), out, elapsed


def test_speed_report_files_and_keys(speed_run):
    report, out, _ = speed_run
    markdown = (out / "decode_speed.md").read_text()
    assert markdown.count("\n| 1 | 0 |") == 1 and markdown.count("\n| 1 | 0.6 |") == 1
    assert (out / "decode_speed.png").read_bytes()[:8] == PNG_MAGIC
    assert report["mode"] == "speed" and report["num_prompts"] == 2
    assert report["config"]["max_new_tokens"] == 8 and report["config"]["thresholds"] == [0, 0.6]
    machine = report["machine"]
    assert machine["versions"]["torch"] == machine["torch"] and machine["torch_threads"] == 1
    assert {"cpu", "cpu_count", "load_average_1_5_15", "git_revision", "date"} <= set(machine)
    assert [(r["exit_layer"], r["threshold"]) for r in report["rows"]] == [(1, 0.0), (1, 0.6)]
    for row in report["rows"]:
        assert set(row) == SPEED_ROW_KEYS
        assert set(row["tokens_per_s"]) == {"speculative", "vanilla", "generate"}
    # 2 runs x 2 prompts x (vanilla, generate, 2 thresholds); greedy float64: all methods agree, up to 8 tokens.
    assert len(report["records"]) == 16
    assert all(r["identical"] and 1 <= r["new_tokens"] <= 8 for r in report["records"])


def test_speed_records_are_seconds_and_tokens(speed_run):
    report, _, elapsed = speed_run
    records = report["records"]
    # Seconds, not milliseconds: every decode happened inside the command's own wall time.
    assert 0 < sum(r["wall_time_s"] for r in records) < elapsed
    for r in records:
        assert r["tokens_per_s"] == pytest.approx(_tps(r), rel=1e-9)
        if r["method"] != "generate":  # DESIGN §3: one accept length per full-model pass, summing to the tokens
            assert sum(r["accept_lengths"]) == r["new_tokens"] and len(r["accept_lengths"]) == r["full_passes"]
        if r["method"] == "vanilla":
            assert set(r["accept_lengths"]) == {1} and r["drafted"] == 0


def test_speed_rows_recomputed_from_records(speed_run):
    report, _, _ = speed_run
    records, runs = report["records"], report["config"]["runs"]
    for row in report["rows"]:
        spec = [r for r in records if r["method"] == "speculative" and r["threshold"] == row["threshold"]]
        per_run = {m: [] for m in ("speculative", "vanilla", "generate", "speedup")}
        for run in range(runs):
            mean = {m: statistics.fmean(_tps(r) for r in records if r["run"] == run and r["method"] == m
                                        and (m != "speculative" or r in spec))
                    for m in ("speculative", "vanilla", "generate")}
            for m, v in mean.items():
                per_run[m].append(v)
            per_run["speedup"].append(mean["speculative"] / mean["vanilla"])
        for m in ("speculative", "vanilla", "generate"):
            assert row["tokens_per_s"][m]["mean"] == pytest.approx(statistics.fmean(per_run[m]), rel=1e-9)
            assert row["tokens_per_s"][m]["std"] == pytest.approx(statistics.stdev(per_run[m]), rel=1e-9)
        assert row["speedup_vs_vanilla"]["mean"] == pytest.approx(statistics.fmean(per_run["speedup"]), rel=1e-9)
        # MAT = new tokens / full-model passes, pooled; acceptance = accepted / drafted.
        assert row["mat"] == pytest.approx(sum(r["new_tokens"] for r in spec) / sum(r["full_passes"] for r in spec))
        assert row["accept_rate"] == pytest.approx(sum(r["accepted"] for r in spec) / sum(r["drafted"] for r in spec))
        assert row["identical_fraction"] == 1.0


def test_speedup_is_a_ratio_of_mean_tokens_per_s():
    """DESIGN §3: mean over prompts of the method's tokens/s over the mean of vanilla's (not a mean of ratios)."""
    def rec(method, prompt, tps, **kw):
        return {"run": 0, "prompt": prompt, "method": method, "tokens_per_s": tps, "new_tokens": 10,
                "identical": True, **kw}

    spec = dict(exit_layer=1, threshold=0.6, full_passes=5, drafted=8, accepted=6, identical_to_vanilla=True,
                accept_lengths=[1, 3, 2, 2, 2])
    records = [rec("speculative", 0, 10.0, **spec), rec("speculative", 1, 30.0, **spec),
               rec("vanilla", 0, 5.0), rec("vanilla", 1, 20.0), rec("generate", 0, 5.0), rec("generate", 1, 15.0)]
    row = aggregate(records, 1, 0.6, runs=1)
    assert row["speedup_vs_vanilla"]["mean"] == pytest.approx(20.0 / 12.5)  # a mean of ratios would give 1.75
    assert row["speedup_vs_generate"]["mean"] == pytest.approx(2.0)
    assert row["vanilla_over_generate"]["mean"] == pytest.approx(1.25)
    assert row["mat"] == pytest.approx(2.0) and row["accept_rate"] == pytest.approx(0.75)


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cost_run(tmp_path_factory):
    from kangaroo_lit.bench.cli import main

    out = tmp_path_factory.mktemp("cost")
    start = time.perf_counter()
    code = main(["cost_model", "--shape", "tiny", "--device", "cpu", "--context", "32", "--ks", "[2,3,4]",
                 "--repeats", "3", "--max_draft", "3", "--runs", "1", "--forced_new_tokens", "17",
                 "--out_dir", str(out)])
    elapsed = time.perf_counter() - start
    assert code == 0
    assert "realised / predicted" in (out / "decode_cost_tiny_cpu.md").read_text()
    return json.loads((out / "decode_cost_tiny_cpu.json").read_text()), elapsed


def test_cost_ratios_recomputed_from_times(cost_run):
    report, elapsed = cost_run
    assert report["mode"] == "cost_model" and report["shape"]["name"] == "tiny"
    (layer,) = report["layers"]
    assert layer["exit_layer"] == 1 and layer["context"] == 32
    times = layer["times_s"]
    ks = ["2", "3", "4"]  # JSON keys
    assert set(times) == {"full", "full_blocks", "draft", "exit_no_adapter", "shallow",
                          *(f"verify_{k}" for k in ks), *(f"raw_{k}" for k in ks)}
    assert 0 < 3 * sum(times.values()) < elapsed  # medians of 3 repeats, in seconds
    full = times["full"]
    assert layer["c"] == pytest.approx(times["draft"] / full)
    assert layer["c_no_adapter"] == pytest.approx(times["exit_no_adapter"] / full)
    assert layer["c_shallow"] == pytest.approx(times["shallow"] / full)
    assert layer["full_blocks_over_hf"] == pytest.approx(times["full_blocks"] / full)
    assert set(layer["v"]) == set(layer["raw"]) == set(ks)
    for k in ks:
        assert layer["v"][k] == pytest.approx(times[f"verify_{k}"] / full)
        assert layer["raw"][k] == pytest.approx(times[f"raw_{k}"] / full)
        q1, median, q3 = layer["quartiles_s"][f"verify_{k}"]
        assert q1 <= median <= q3 and median == pytest.approx(times[f"verify_{k}"])


def test_forced_acceptance_accepts_every_draft_and_matches_its_formulas(cost_run):
    report, _ = cost_run
    layer = report["layers"][0]
    f = layer["forced"]
    # 17 tokens at K = 3 with every draft accepted: the prefill's token, then 4 rounds of 3 drafts + 1.
    assert f["accept_lengths"] == [1, 4, 4, 4, 4] and f["mat"] == pytest.approx(3.4)
    assert f["accept_rate"] == 1.0 and f["identical"]
    assert f["new_tokens"] == {"speculative": 17, "vanilla": 17, "generate": 17}
    k, c, v = f["max_draft"], layer["c"], layer["v"]
    assert f["predicted"] == pytest.approx((k + 1) / (k * c + v[str(k + 1)]))
    assert f["predicted_refined"] == pytest.approx((k + 1) / (k * c + layer["c_shallow"] + v[str(k + 1)]))
    tps, decode_tps = f["tokens_per_s"], f["decode_tokens_per_s"]
    for m, n in f["new_tokens"].items():
        assert tps[m] == pytest.approx(n / f["wall_time_s"][m])
        assert decode_tps[m] == pytest.approx((n - 1) / (f["wall_time_s"][m] - f["prefill_wall_time_s"][m]))
    assert f["realised"] == pytest.approx(tps["speculative"] / tps["vanilla"])
    assert f["vanilla_over_generate"] == pytest.approx(tps["vanilla"] / tps["generate"])
    assert f["realised_decode_only"] == pytest.approx(decode_tps["speculative"] / decode_tps["vanilla"])
    assert f["realised_over_predicted"] == pytest.approx(f["realised_decode_only"] / f["predicted"])


def test_default_prompts_follow_the_drafts_training_data(tiny_tokenizer):
    from kangaroo_lit.bench.decode import DEFAULT_TEXT_PROMPTS, default_prompt_texts

    embedded = default_prompt_texts(tiny_tokenizer, {"data_path": "embedded:tiny-instruct.jsonl", "format": "dolly"})
    assert len(embedded) == 12 and "Add 7 and 1." in embedded[0]  # the bundled held-out instructions
    assert all("### Instruction" in p or "Instruction" in p for p in embedded)  # rendered as in training
    dolly = default_prompt_texts(tiny_tokenizer, {"data_path": "my.jsonl", "format": "dolly"})
    assert "What is the capital of France?" in dolly[1] and dolly[1] != "What is the capital of France?"
    assert default_prompt_texts(tiny_tokenizer, {"data_path": "s.jsonl", "format": "text"}) == DEFAULT_TEXT_PROMPTS
    assert default_prompt_texts(tiny_tokenizer, {}) == DEFAULT_TEXT_PROMPTS  # nothing recorded: plain text


def test_cost_model_with_streaming_kernel_and_restricted_head(tmp_path):
    """The options reach the model: the restricted head scores K ids, the kernel is recorded; forced refused."""
    from kangaroo_lit.bench.cost_model import cost_model
    from kangaroo_lit.errors import ConfigError
    from kangaroo_lit.kernels import streaming_linear

    with pytest.raises(ConfigError, match="--forced false"):
        cost_model(shape="tiny", device="cpu", draft_vocab_size=64)
    kernel = "streaming" if streaming_linear.available()[0] else "eager"
    report = cost_model(shape="tiny", device="cpu", context=16, ks=(2,), repeats=2, forced=False,
                        kernel=kernel, draft_vocab_size=64, out_dir=str(tmp_path))
    assert report["config"]["kernel"] == kernel and report["config"]["draft_vocab_size"] == 64
    with pytest.raises(ConfigError, match="draft_vocab_size must be in 1..512"):  # the tiny shape's vocabulary
        cost_model(shape="tiny", device="cpu", forced=False, draft_vocab_size=10**6)


def test_cost_model_times_an_adapter_with_an_mlp():
    """--adapter_mlp builds the wider draft, and its forced-acceptance run still accepts every draft."""
    from kangaroo_lit.bench.cost_model import build_cost_model, cost_model, force_acceptance
    from kangaroo_lit.errors import ConfigError

    model, _ = build_cost_model("tiny", None, 1, "float32", torch.device("cpu"), 0, adapter_mlp=48)
    assert model.adapter.mlp is not None and model.adapter.mlp.down_proj.in_features == 48
    # A built adapter starts with a zero MLP output; a trained one does not, and forcing must silence it too.
    with torch.no_grad():
        model.adapter.mlp.down_proj.weight.normal_()
    force_acceptance(model)
    assert not model.adapter.mlp.down_proj.weight.any()
    report = cost_model(shape="tiny", device="cpu", context=16, ks=(2, 3), repeats=2, max_draft=2, runs=1,
                        adapter_mlp=48)
    forced = report["layers"][0]["forced"]
    assert report["config"]["adapter_mlp"] == 48
    assert forced["accept_rate"] == 1.0 and forced["identical"]
    with pytest.raises(ConfigError, match="--adapter_mlp must be >= 0"):
        cost_model(shape="tiny", device="cpu", forced=False, adapter_mlp=-1)


def test_decode_writes_its_files_into_a_fresh_run_directory_by_default(tiny_llama_dir, tmp_path, monkeypatch,
                                                                       capsys):
    """Without --out_dir the JSON, table and PNG still appear, in runs/bench/decode-<time>, and it says where."""
    from kangaroo_lit.cli import main

    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 plus 3?\n")
    args = ["bench", "decode", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompts", str(prompts),
            "--max_new_tokens", "4", "--thresholds", "[0]", "--runs", "1", "--warmup", "0", "--threads", "1"]
    assert main(args) == 0
    assert main(args) == 0  # a second run gets its own directory
    runs = sorted((tmp_path / "runs" / "bench").glob("decode-*"))
    assert len(runs) == 2
    for run in runs:
        expected = {"decode_speed.json", "decode_speed.md"} | ({"decode_speed.png"} if pyplot() else set())
        assert {p.name for p in run.iterdir()} == expected
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"bench decode: results in {Path('runs') / 'bench' / runs[-1].name}"
    assert json.loads((runs[0] / "decode_speed.json").read_text())["config"]["out_dir"] == str(
        Path("runs") / "bench" / runs[0].name)
