"""Every config parses and runs (fast_dev_run, tiny model and CPU substituted); --print_config round-trips."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kangaroo_lit.cli import main, run_lightning
from kangaroo_lit.embedded import ASSETS_DIR
from tests.conftest import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
# applied on top of another config
OVERLAYS = {"joint.yaml", "shared-lora.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml"}
DOLLY_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "dolly-tiny.jsonl"
STORIES_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "stories.jsonl"


def cpu_overrides(tmp_path, model_dir, data_format="dolly"):
    """What makes a GPU/Hub config run here: the tiny model, local data, CPU fp32, tmp dirs."""
    data = DOLLY_FIXTURE if data_format == "dolly" else STORIES_FIXTURE
    return [
        "--model.base_model", str(model_dir), "--model.exit_layer", "1", "--model.dtype", "float32",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path),
        "--data.data_path", str(data), "--data.num_workers", "0", "--data.batch_size", "2",
        "--data.cache_dir", str(tmp_path / "cache"), "--data.max_length", "128",
    ]


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "sgp.yaml", "kangaroo.yaml", "joint.yaml", "shared-lora.yaml"} <= names


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name not in OVERLAYS], ids=lambda p: p.name)
def test_every_config_runs_fast_dev_run(config, tmp_path, tiny_llama_dir):
    data_format = yaml.safe_load(config.read_text())["data"].get("format", "dolly")
    original = yaml.safe_load(config.read_text())["model"]
    extra = []
    if original.get("draft", {}).get("vocab_size"):  # a real model's K exceeds the tiny model's 320 ids
        original["draft"]["vocab_size"] = 64
        extra = ["--model.draft.vocab_size", "64"]
    cli = run_lightning(["fit", "--config", str(config), *cpu_overrides(tmp_path, tiny_llama_dir, data_format), *extra])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    # the config's meaning survives the substitutions: every grouped setting it gives reaches the module
    for group in ("lora", "draft", "loss", "optimizer", "decoding"):
        for key, value in original.get(group, {}).items():
            assert getattr(getattr(cli.model.settings, group), key) == pytest.approx(value), f"{group}.{key}"


def test_fit_on_the_embedded_model_without_a_config(tmp_path):
    """The defaults alone (the embedded base, its default exit layer) train: only data and CPU are given."""
    cli = run_lightning(["fit", "--model.base_model", "embedded:tiny-llama", "--trainer.accelerator", "cpu",
                         "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path),
                         "--data.data_path", str(DOLLY_FIXTURE), "--data.num_workers", "0",
                         "--data.cache_dir", str(tmp_path / "cache")])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert cli.model.settings.exit_layer == 1


def test_overlays_set_scope_and_joint_mode(tmp_path, tiny_llama_dir):
    cli = run_lightning(["fit", "--config", str(REPO_ROOT / "configs/sgp.yaml"),
                         "--config", str(REPO_ROOT / "configs/shared-lora.yaml"),
                         "--config", str(REPO_ROOT / "configs/joint.yaml"), *cpu_overrides(tmp_path, tiny_llama_dir)])
    assert cli.model.settings.loss.detach_exit is False
    assert cli.model.settings.lora.scope == "shared"
    assert cli.model.settings.lora.rank == 8  # the rest of sgp.yaml's LoRA group is kept


def test_print_config_round_trips(tmp_path, capsys):
    config = REPO_ROOT / "configs" / "sgp.yaml"
    with pytest.raises(SystemExit):
        run_lightning(["fit", "--config", str(config), "--model.exit_layer", "5", "--model.lora.scope", "shared",
                       "--print_config"])
    printed = capsys.readouterr().out
    dumped = tmp_path / "printed.yaml"
    dumped.write_text(printed)
    with pytest.raises(SystemExit):
        run_lightning(["fit", "--config", str(dumped), "--print_config"])
    again = capsys.readouterr().out
    assert yaml.safe_load(again) == yaml.safe_load(printed)
    parsed = yaml.safe_load(printed)
    assert parsed["model"]["exit_layer"] == 5 and parsed["model"]["lora"]["scope"] == "shared"


@pytest.mark.skipif(not (ASSETS_DIR / "tiny-llama").is_dir(), reason="embedded model not built")
def test_console_script_fit_on_the_embedded_default(tmp_path, capsys):
    """The README's main job through the installed entry point (shortened), then export and generate."""
    cmd = [sys.executable, "-m", "kangaroo_lit", "fit", "--config", str(REPO_ROOT / "configs/tiny.yaml"),
           "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
           "--trainer.default_root_dir", str(tmp_path),
           "--data.cache_dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    logs = list(Path(tmp_path).rglob("metrics.csv"))
    assert logs and "val/expected_accept" in logs[0].read_text()
    assert list(Path(tmp_path).rglob("run_info.json")) and list(Path(tmp_path).rglob("config.yaml"))

    import json

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert main(["export", "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "art")]) == 0
    capsys.readouterr()
    assert main(["generate", "--artifact", str(tmp_path / "art"), "--format", "instruction", "--prompt",
                 "What is 7 plus 1?", "--max_new_tokens", "24", "--compare_vanilla", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["identical"] is True and data["text"].strip() == "7 plus 1 is 8."  # the base model's answer
    assert sum(data["accept_lengths"]) == data["new_tokens"]


def test_resume_cli_reports_disagreeing_arguments(tmp_path, tiny_llama_dir, capsys):
    args = ["fit", "--config", str(REPO_ROOT / "configs/tiny.yaml"), *cpu_overrides(tmp_path, tiny_llama_dir)]
    args[args.index("--trainer.fast_dev_run") + 1] = "false"
    args += ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    run_lightning(args)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    code = main([*args, "--model.exit_layer", "2", "--model.loss.beta_exit", "0.3", "--model.decoding.threshold",
                 "0.3", "--ckpt_path", str(last)])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.exit_layer: checkpoint has 1, this run asks for 2" in err
    assert "model.loss.beta_exit: checkpoint has 0.7, this run asks for 0.3" in err
    assert "decoding.threshold" not in err  # decoding settings are free to change on resume


def test_resume_cli_adopts_checkpoint_settings_left_at_default(tmp_path, tiny_llama_dir, capsys):
    """``--ckpt_path`` with a config that leaves a setting at its default resumes the checkpoint's value."""
    args = ["fit", "--config", str(REPO_ROOT / "configs/tiny.yaml"), *cpu_overrides(tmp_path, tiny_llama_dir)]
    args[args.index("--trainer.fast_dev_run") + 1] = "false"
    args += ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    run_lightning([*args, "--model.loss.kd_weight", "0.25"])
    last = tmp_path / "checkpoints" / "last.ckpt"
    cli = run_lightning([*args, "--trainer.max_steps", "2", "--ckpt_path", str(last)])
    assert cli.model.settings.loss.kd_weight == 0.25  # default 0.5 in the command line: adopted
    assert cli.trainer.global_step == 2


def test_usage_without_arguments(capsys):
    assert main([]) == 2
    assert "kangaroo-lit {fit,validate,test,predict}" in capsys.readouterr().out


@pytest.mark.parametrize("overlay", sorted((REPO_ROOT / "callbacks").glob("*.yaml")), ids=lambda p: p.name)
def test_callback_overlays_run(overlay, tmp_path, tiny_llama_dir):
    cli = run_lightning(["fit", "--config", str(REPO_ROOT / "configs/tiny.yaml"), "--config", str(overlay),
                         *cpu_overrides(tmp_path, tiny_llama_dir)])
    wanted = yaml.safe_load(overlay.read_text())["trainer"]["callbacks+"]
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {w["class_path"].rsplit(".", 1)[1] for w in wanted} <= names
    assert "RunInfoCallback" in names and "KangarooCheckpoint" in names


def test_predict_decodes_prompts_losslessly(tmp_path, tiny_llama_dir):
    """predict with a trained checkpoint writes the verifier's own greedy output for every prompt."""
    import json

    import torch

    from kangaroo_lit.artifact import export_checkpoint, load_artifact
    from kangaroo_lit.decoding import VanillaDecoder

    args = ["--config", str(REPO_ROOT / "configs/tiny.yaml"), *cpu_overrides(tmp_path, tiny_llama_dir)]
    args[args.index("--trainer.fast_dev_run") + 1] = "false"
    run_lightning(["fit", *args, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Name a colour."}\n{"prompt": "Once upon a time"}\n')
    out = tmp_path / "preds.jsonl"
    run_lightning(["predict", *args, "--data.predict_path", str(prompts), "--model.decoding.max_new_tokens", "12",
                   "--ckpt_path", str(ckpt), "--trainer.callbacks+=kangaroo_lit.callbacks.JsonlPredictionWriter",
                   "--trainer.callbacks.output_path", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all(r["new_tokens"] > 0 for r in rows)
    model = load_artifact(export_checkpoint(ckpt, tmp_path / "art"), dtype="float32")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for row in rows:
        ids = tok(row["prompt"], return_tensors="pt").input_ids
        expected = VanillaDecoder(model).generate(ids, 12, tok.eos_token_id).tokens
        assert row["response"] == tok.decode(expected, skip_special_tokens=True)
        assert torch.isfinite(torch.tensor(row["mat"])) and row["mat"] >= 1.0


def test_deepspeed_overlay_parses_and_builds_its_strategy(capsys):
    """DeepSpeed runs only on CUDA: here the overlay must parse and its strategy object must build."""
    with pytest.raises(SystemExit):
        run_lightning(["fit", "--config", str(REPO_ROOT / "configs/sgp.yaml"),
                       "--config", str(REPO_ROOT / "configs/deepspeed-zero2.yaml"), "--print_config"])
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert strategy["class_path"] == "kangaroo_lit.checkpointing.KangarooDeepSpeedStrategy"
    pytest.importorskip("deepspeed")
    from kangaroo_lit.checkpointing import KangarooDeepSpeedStrategy

    built = KangarooDeepSpeedStrategy(**{k: strategy["init_args"][k] for k in ("stage", "exclude_frozen_parameters")})
    assert built.config["zero_optimization"]["stage"] == 2


def test_slurm_script_resumes_from_last_checkpoint(tmp_path):
    """The sbatch script's command line, with srun and kangaroo-lit replaced by an echo."""
    script = REPO_ROOT / "scripts" / "slurm" / "fit.sbatch"
    fake = tmp_path / "srun"
    fake.write_text('#!/usr/bin/env bash\necho "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "ROOT": str(tmp_path / "run"), "KANGAROO": "kl",
           "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2"}
    first = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert first.returncode == 0, first.stderr
    assert "kl fit --config configs/sgp.yaml --config configs/deepspeed-zero2.yaml" in first.stdout
    assert "--trainer.devices 4 --trainer.num_nodes 2" in first.stdout and "--ckpt_path" not in first.stdout
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").mkdir()  # DeepSpeed writes a directory
    again = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert f"--ckpt_path {tmp_path}/run/checkpoints/last.ckpt" in again.stdout


def predict_run(tmp_path, model_dir, prompts, output, max_new_tokens=4, spy=None):
    """``trainer.predict`` as ``kangaroo-lit predict`` runs it (module, data module, the JSONL writer), without
    the CLI's parsing and without a checkpoint: fast. ``spy(module, batch_idx)`` runs before each prompt."""
    import lightning as L

    from kangaroo_lit.callbacks import JsonlPredictionWriter
    from kangaroo_lit.data import InstructionDataModule
    from kangaroo_lit.settings import DecodingSettings
    from tests.helpers import make_module

    module = make_module(model_dir, decoding=DecodingSettings(max_new_tokens=max_new_tokens))
    if spy is not None:
        real = module.predict_step

        def predict_step(batch, batch_idx):
            spy(module, batch_idx)
            return real(batch, batch_idx)

        module.predict_step = predict_step
    # data_path: prepare_data would otherwise fetch the Hub dataset, even for predict
    data = InstructionDataModule(tokenizer=str(model_dir), predict_path=str(prompts), data_path=str(DOLLY_FIXTURE),
                                 num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                        callbacks=[JsonlPredictionWriter(str(output))], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(module, datamodule=data, return_predictions=False)


def test_predict_checks_every_prompt_before_decoding_the_first(tmp_path, tiny_llama_dir):
    """The third prompt is too long: predict stops before the first is decoded, naming file, line and lengths."""
    from kangaroo_lit.errors import DataError

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "once"}\n\n{"prompt": "' + "x " * 600 + '"}\n')
    output = tmp_path / "preds.jsonl"
    output.write_text('{"from": "an earlier run"}\n')
    decoded = []
    with pytest.raises(DataError) as info:
        predict_run(tmp_path, tiny_llama_dir, prompts, output, spy=lambda module, i: decoded.append(i))
    message = str(info.value)
    assert message.startswith(f"{prompts}:4: prompt of ") and "max_position_embeddings 512" in message
    assert "--model.decoding.max_new_tokens 4" in message
    assert decoded == []
    assert output.read_text() == '{"from": "an earlier run"}\n'  # nothing decoded, nothing overwritten


def test_predict_writes_each_prompt_as_it_finishes(tmp_path, tiny_llama_dir):
    """Every finished prompt is on disk before the next is decoded; a new run starts the file afresh."""
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nonce upon\na time\n")
    output = tmp_path / "preds.jsonl"
    output.write_text('{"from": "an earlier run"}\n')
    on_disk = []
    predict_run(tmp_path, tiny_llama_dir, prompts, output,
                spy=lambda module, i: on_disk.append(output.read_text() if i else None))
    lines = output.read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 2]
    assert on_disk[1:] == ["\n".join(lines[:1]) + "\n", "\n".join(lines[:2]) + "\n"]
