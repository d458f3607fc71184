"""Nothing a user does loses work: no silent overwrite, the final step saved, preemption saved and failed."""

import re
import signal

import pytest
import torch

from kangaroo_lit.checkpointing import ExistingRunError, load_checkpoint_file
from kangaroo_lit.cli import main
from kangaroo_lit.errors import CheckpointError
from tests.conftest import REPO_ROOT

DOLLY_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "dolly-tiny.jsonl"


def fit_args(root, model_dir, *extra):
    return ["fit", "--config", str(REPO_ROOT / "configs/tiny.yaml"), "--model.base_model", str(model_dir),
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "0", "--data.data_path", str(DOLLY_FIXTURE), "--data.batch_size", "2",
            "--data.max_length", "64", "--data.cache_dir", str(root / "cache"), *extra]


def global_step(path):
    return torch.load(path, weights_only=True)["global_step"]


def test_final_step_is_saved_once_whatever_the_interval(tmp_path, tiny_llama_dir):
    # every_n_train_steps 4 and 7 steps: Lightning alone would leave step 4 in last.ckpt
    assert main(fit_args(tmp_path, tiny_llama_dir, "--trainer.max_steps", "7",
                         "--checkpoint.every_n_train_steps", "4")) == 0
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt"]  # no unranked duplicate beside it
    assert global_step(tmp_path / "checkpoints" / "last.ckpt") == 7


def test_new_fit_over_a_trained_run_is_refused(tmp_path, tiny_llama_dir, capsys):
    assert main(fit_args(tmp_path, tiny_llama_dir, "--trainer.max_steps", "2")) == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    capsys.readouterr()
    assert main(fit_args(tmp_path, tiny_llama_dir, "--trainer.max_steps", "3")) == 2
    err = capsys.readouterr().err
    assert "already holds a trained run" in err and f"--ckpt_path {last}" in err
    assert "--trainer.default_root_dir" in err and "Traceback" not in err
    assert last.read_bytes() == before
    # resuming it is the way forward
    assert main(fit_args(tmp_path, tiny_llama_dir, "--trainer.max_steps", "3", "--ckpt_path", str(last))) == 0
    assert global_step(last) == 3


def test_existing_run_error_is_raised_by_the_callback_itself(tmp_path, tiny_llama_dir):
    """The refusal lives in KangarooCheckpoint, so a Python user of the Trainer gets it too."""
    import lightning as L
    from torch.utils.data import DataLoader

    from kangaroo_lit.checkpointing import KangarooCheckpoint
    from tests.helpers import make_module, toy_batches

    def trainer():
        return L.Trainer(max_steps=1, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         callbacks=[KangarooCheckpoint()], enable_progress_bar=False, enable_model_summary=False)

    trainer().fit(make_module(tiny_llama_dir), DataLoader(toy_batches(2), batch_size=None))
    with pytest.raises(ExistingRunError):
        trainer().fit(make_module(tiny_llama_dir), DataLoader(toy_batches(2), batch_size=None))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preemption_saves_the_step_and_exits_non_zero(tmp_path, tiny_llama_dir, capsys, signum):
    code = main(fit_args(tmp_path, tiny_llama_dir, "--trainer.max_steps", "50", "--checkpoint.every_n_train_steps",
                         "20", "--trainer.callbacks+=tests.helpers.SendSignalAt",
                         "--trainer.callbacks.step", "3", "--trainer.callbacks.signum", str(int(signum))))
    assert code == 128 + signum
    assert global_step(tmp_path / "checkpoints" / "last.ckpt") == 3  # the periodic save would hold nothing
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name} after step 3" in err
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)  # handlers restored


def test_logs_follow_the_root_directory(tmp_path, tiny_llama_dir):
    assert main(fit_args(tmp_path / "run", tiny_llama_dir, "--trainer.max_steps", "2",
                         "--trainer.log_every_n_steps", "1")) == 0
    logs = tmp_path / "run" / "lightning_logs" / "version_0"
    assert (logs / "metrics.csv").is_file() and (logs / "run_info.json").is_file()


@pytest.mark.parametrize("content, reason", [
    (b"PK\x03\x04 truncated zip", "not a (complete) checkpoint"),
    (bytes(range(256)) * 4, "not a (complete) checkpoint"),
    (b"just some text\n", "not a (complete) checkpoint"),
])
def test_broken_checkpoint_files_are_named(tmp_path, content, reason):
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {reason}")):
        load_checkpoint_file(path)


def test_cli_refuses_remote_and_foreign_checkpoints_in_one_line(tmp_path, tiny_llama_dir, capsys):
    args = fit_args(tmp_path, tiny_llama_dir, "--trainer.max_steps", "1")
    assert main([*args, "--ckpt_path", "https://example.invalid/last.ckpt"]) == 2
    assert "remote checkpoints are not loaded" in capsys.readouterr().err
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert main([*args, "--ckpt_path", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "holds no 'kangaroo_settings'" in err and "Traceback" not in err
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04")
    assert main([*args, "--ckpt_path", str(truncated)]) == 2
    assert f"{truncated}: not a (complete) checkpoint" in capsys.readouterr().err


def test_data_errors_are_one_line_with_exit_code_2(tmp_path, tiny_llama_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "context": "", "response": "b", "category": "x"}\n{not json\n')
    args = fit_args(tmp_path, tiny_llama_dir, "--trainer.max_steps", "1")
    args[args.index("--data.data_path") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err
    # one "error:" line naming the file, then the malformed rows with their line numbers
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1
    assert f"{bad}, line 2: not valid JSON" in err and "Traceback" not in err


def test_cpu_threads_suit_the_model_size(tmp_path, tiny_llama_dir, capsys):
    import torch

    from kangaroo_lit.threads import SMALL_MODEL_PARAMETERS, approx_parameters, choose_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(fit_args(tmp_path, tiny_llama_dir, "--trainer.max_steps", "1")) == 0
        assert torch.get_num_threads() == 1  # a tiny model: one thread
        assert "note: 1 torch CPU thread(s) for a 0." in capsys.readouterr().err
        assert main(fit_args(tmp_path / "b", tiny_llama_dir, "--trainer.max_steps", "1", "--threads", "2")) == 0
        assert torch.get_num_threads() == 2 and "2 torch CPU thread(s) as asked" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
    from transformers import AutoConfig

    smol = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                tie_word_embeddings=True)
    assert approx_parameters(smol) == pytest.approx(134_515_008, rel=0.01)  # SmolLM2-135M, norms aside
    assert choose_threads(SMALL_MODEL_PARAMETERS - 1) == 1


def test_resume_prints_no_wrong_dataloader_warning(tmp_path, tiny_llama_dir, recwarn):
    assert main(fit_args(tmp_path, tiny_llama_dir, "--trainer.max_steps", "3")) == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert main(fit_args(tmp_path, tiny_llama_dir, "--trainer.max_steps", "5", "--ckpt_path", str(last))) == 0
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "not resumable" in m or "in eval mode" in m], messages
