"""``kangaroo-lit bench decode``: the speed comparison and the cost model on tiny models."""

import json
import os
import subprocess
import sys

import pytest

from kangaroo_lit.bench_decode import aggregate, build_parser, decode_main

SPEED_ROW_KEYS = {"exit_layer", "threshold", "tokens_per_s", "speedup_vs_vanilla", "speedup_vs_generate",
                  "vanilla_over_generate", "mat", "accept_rate", "identical_fraction", "identical_spec_vanilla",
                  "identical_vanilla_generate", "new_tokens_mean"}


def test_speed_comparison_through_the_cli(tiny_llama_dir, tmp_path):
    from kangaroo_lit.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 plus 3?\nOnce upon a time\n")
    out = tmp_path / "out"
    code = main(["bench", "decode", "--model", str(tiny_llama_dir), "--exit-layer", "1", "--prompts", str(prompts),
                 "--max-new-tokens", "8", "--thresholds", "0.3", "--runs", "1", "--warmup", "0",
                 "--dtype", "float64", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "decode_speed.json").read_text())
    assert (out / "decode_speed.md").read_text().count("\n| 1 | 0.3 |") == 1
    assert (out / "decode_speed.png").stat().st_size > 0
    assert report["num_prompts"] == 2 and report["machine"]["torch"]
    (row,) = report["rows"]
    assert SPEED_ROW_KEYS <= set(row)
    assert set(row["tokens_per_s"]) == {"speculative", "vanilla", "generate"}
    assert all(row["tokens_per_s"][m]["mean"] > 0 for m in row["tokens_per_s"])
    assert row["identical_fraction"] == 1.0  # greedy, float64: speculative == vanilla == HF generate
    assert row["mat"] >= 1.0 and 0.0 <= row["accept_rate"] <= 1.0
    # 2 prompts x 3 methods, every method generated the same tokens.
    assert len(report["records"]) == 6
    assert {r["new_tokens"] for r in report["records"]} == {8}


def test_speedup_is_a_ratio_of_mean_tokens_per_s():
    """DESIGN §3: mean over prompts of the method's tokens/s over the mean of vanilla's (not a mean of ratios)."""
    def rec(method, prompt, tps, **kw):
        return {"run": 0, "prompt": prompt, "method": method, "tokens_per_s": tps, "new_tokens": 10,
                "identical": True, **kw}

    spec = dict(exit_layer=1, threshold=0.6, full_passes=5, drafted=8, accepted=6, identical_to_vanilla=True)
    records = [rec("speculative", 0, 10.0, **spec), rec("speculative", 1, 30.0, **spec),
               rec("vanilla", 0, 5.0), rec("vanilla", 1, 20.0), rec("generate", 0, 5.0), rec("generate", 1, 15.0)]
    row = aggregate(records, 1, 0.6, runs=1)
    assert row["speedup_vs_vanilla"]["mean"] == pytest.approx(20.0 / 12.5)
    assert row["speedup_vs_generate"]["mean"] == pytest.approx(2.0)
    assert row["vanilla_over_generate"]["mean"] == pytest.approx(1.25)
    assert row["mat"] == pytest.approx(2.0) and row["accept_rate"] == pytest.approx(0.75)


@pytest.fixture(scope="module")
def tiny_cost_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost")
    args = build_parser().parse_args(
        ["decode", "--cost-model", "--shape", "tiny", "--device", "cpu", "--context", "32", "--ks", "2-4",
         "--repeats", "3", "--max-draft", "3", "--runs", "1", "--forced-new-tokens", "17", "--out", str(out)])
    report = decode_main(args)
    assert (out / "decode_cost_tiny_cpu.json").is_file() and (out / "decode_cost_tiny_cpu.md").is_file()
    return report


def test_cost_model_ratios_are_positive(tiny_cost_report):
    (layer,) = tiny_cost_report["layers"]
    assert layer["exit_layer"] == 1 and layer["context"] == 32
    for key in ("c", "c_no_adapter", "c_shallow", "full_blocks_over_hf"):
        assert layer[key] > 0
    assert set(layer["v"]) == set(layer["raw"]) == {2, 3, 4}
    assert all(v > 0 for v in layer["v"].values()) and all(r > 0 for r in layer["raw"].values())


def test_forced_acceptance_accepts_nearly_every_draft(tiny_cost_report):
    forced = tiny_cost_report["layers"][0]["forced"]
    assert forced["accept_rate"] > 0.9
    assert forced["mat"] > 3.0  # 17 tokens = prefill 1 + 4 rounds of 3 drafts + 1 when all are accepted
    assert forced["predicted"] > 0 and forced["realised"] > 0 and forced["realised_over_predicted"] > 0
    assert forced["identical"] and forced["new_tokens"] == {"speculative": 17, "vanilla": 17, "generate": 17}
    assert forced["vanilla_over_generate"] > 0


def test_module_entry_avoids_lightning_cli_dependencies():
    """The GPU image has no jsonargparse: ``python -m kangaroo_lit.bench_decode`` must not need it."""
    code = ("import sys, kangaroo_lit.bench_decode as b; "
            "bad = [m for m in ('jsonargparse', 'lightning', 'datasets') if m in sys.modules]; "
            "assert not bad, bad; assert callable(b.main)")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
