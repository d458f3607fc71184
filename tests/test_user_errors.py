"""User mistakes in artifacts, generate options and base model paths: one clear line, never a traceback.

Each case is a mistake a newcomer made: an edited or incomplete artifact, an out-of-range option, a
model path that does not exist or holds no model.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kangaroo_lit.architectures import load_base_model, load_tokenizer, looks_like_local_path
from kangaroo_lit.artifact import load_artifact
from kangaroo_lit.cli import main
from kangaroo_lit.errors import CheckpointError, ModelSourceError
from kangaroo_lit.settings import LoraSettings
from tests.helpers import exported_artifact

# --------------------------------------------------------------------------------------------------
# Artifacts checked against their files


@pytest.fixture(scope="module")
def artifact(tiny_llama_dir, tmp_path_factory):
    """An exported draft with LoRA rank 4 on layers 0..1 (copied by each test before it is edited)."""
    return exported_artifact(tiny_llama_dir, tmp_path_factory.mktemp("art"), lora=LoraSettings(rank=4))[2]


def edit_manifest(art, change):
    manifest = json.loads((art / "kangaroo.json").read_text())
    change(manifest)
    (art / "kangaroo.json").write_text(json.dumps(manifest))


def edit_tensors(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _drop_layer_1(tensors):
    for name in [n for n in tensors if ".layers.1." in n]:
        del tensors[name]


def _rank_2_everywhere(manifest):
    manifest["lora"]["rank"] = 2
    manifest["training"]["model"]["lora"]["rank"] = 2


EDITS = {
    # kangaroo.json edited to a higher exit layer: LoRA for layer 2 would be missing
    "higher-exit-layer": (lambda a: edit_manifest(a, lambda m: m.update(exit_layer=2)),
                          ["exit_layer", "2", "[0, 1]"]),
    # a lower rank: a raw PEFT size-mismatch traceback before
    "lower-rank": (lambda a: edit_manifest(a, lambda m: m["lora"].update(rank=2)), ["lora.rank", "2", "4"]),
    # the same, with the training record edited too: lora/adapter_config.json still says r 4
    "lower-rank-consistent": (lambda a: edit_manifest(a, _rank_2_everywhere), ["lora.rank", "is 2", "r 4"]),
    "lora-key-missing": (lambda a: edit_manifest(a, lambda m: m.pop("lora")), ["'lora'", "missing"]),
    "adapter-extra-tensor": (lambda a: edit_tensors(a / "kangaroo_adapter.safetensors",
                                                    lambda t: t.update(extra=torch.zeros(3))),
                             ["kangaroo_adapter.safetensors", "'extra'", "[3]"]),
    "adapter-wrong-shape": (lambda a: edit_tensors(a / "kangaroo_adapter.safetensors",
                                                   lambda t: t.update({"input_norm.weight": torch.ones(32)})),
                            ["'input_norm.weight'", "[32]", "[64]"]),
    "lora-tensors-missing": (lambda a: edit_tensors(a / "lora" / "adapter_model.safetensors", _drop_layer_1),
                             ["adapter_model.safetensors", "lacks", "layers.1."]),
    "lora-dir-missing": (lambda a: shutil.rmtree(a / "lora"), ["lora/adapter_config.json is missing"]),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_artifact_that_disagrees_with_its_files_is_refused(artifact, tmp_path, case):
    edit, expected = EDITS[case]
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    edit(art)
    with pytest.raises(CheckpointError) as info:
        load_artifact(art)
    message = str(info.value)
    assert message.startswith(f"artifact {art}:") and "\n" not in message
    assert all(part in message for part in expected), message


def test_an_edited_artifact_is_one_line_in_generate(artifact, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    edit_manifest(art, lambda m: m.update(exit_layer=2))
    assert main(["generate", "--artifact", str(art), "--prompt", "hi", "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: artifact") and len(err.strip().splitlines()) == 1


def test_a_moved_base_model_says_to_pass_base_model(artifact, tiny_llama_dir, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    edit_manifest(art, lambda m: m.update(base_model=str(tmp_path / "moved-away" / "llama")))
    with pytest.raises(ModelSourceError, match=r"moved-away/llama \(recorded in kangaroo.json\) no longer exists; "
                                               r"pass --base_model <path or hub name>"):
        load_artifact(art)
    assert load_artifact(art, base_model=str(tiny_llama_dir)).exit_layer == 1  # the fix it suggests works
    code = main(["generate", "--artifact", str(art), "--base_model", str(tiny_llama_dir), "--prompt", "hi",
                 "--max_new_tokens", "2", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["new_tokens"] == 2


# --------------------------------------------------------------------------------------------------
# generate: option values


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--threshold", "2"], "--threshold must be in [0, 1], got 2"),
        (["--threshold", "-0.1"], "--threshold must be in [0, 1]"),
        (["--max_draft", "0"], "--max_draft must be >= 1"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--top_k", "-1"], "--top_k must be >= 0"),
        (["--exit_layer", "-1"], "--exit_layer must be >= 0"),
        (["--device", "gpu"], "--device 'gpu' is not a torch device"),
        (["--drafter", "lookup"], "--drafter lookup needs --prompt_lookup >= 1"),
        (["--kernel", "streaming", "--prompt_lookup", "10"], "--kernel streaming verifies at most 8 tokens a pass"),
        (["--kernel", "streaming", "--max_draft", "8"], "--kernel streaming verifies at most 8 tokens a pass"),
    ],
)
def test_generate_refuses_out_of_range_options(tiny_llama_dir, argv, expected, capsys):
    args = ["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompt", "hi",
            "--max_new_tokens", "2", *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1, err


def test_generate_cuda_without_cuda_is_a_usage_error(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompt", "hi", "--device", "cuda"]
    assert main(args) == 2
    assert capsys.readouterr().err == ("error: --device cuda: CUDA is not available in this torch build/machine; "
                                       "use --device cpu\n")
    monkeypatch.setenv("KANGAROO_DEBUG", "1")  # the traceback, for a bug report
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: --device cuda: CUDA is not available in this torch "
                                               "build/machine; use --device cpu\n")


# --------------------------------------------------------------------------------------------------
# Base model paths


def test_local_paths_and_hub_ids_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    for path in ["/nonexistent", "./model", "../model", "~/model", "runs/x", "runs/y/hf", ".", "a/b/c"]:
        assert looks_like_local_path(path), path
    for hub_id in ["gpt2", "meta-llama/Llama-2-7b-hf", "runs/y"]:  # runs/y does not exist: read as a Hub id
        assert not looks_like_local_path(hub_id), hub_id


def test_base_model_path_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelSourceError, match="^no such directory: /nonexistent/model$"):
        load_base_model("/nonexistent/model")
    with pytest.raises(ModelSourceError, match=f"^no config.json in {tmp_path} "):
        load_base_model(str(tmp_path))
    weights_only = tmp_path / "no-tokenizer"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, weights_only / name)
    assert load_base_model(str(weights_only)) is not None
    with pytest.raises(ModelSourceError, match=f"^no tokenizer files in {weights_only} "):
        load_tokenizer(str(weights_only))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", no_weights / "config.json")
    with pytest.raises(ModelSourceError, match=f"^cannot load the model in {no_weights}: .*model.safetensors"):
        load_base_model(str(no_weights))


def test_a_hub_id_missing_from_the_cache_in_offline_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    with pytest.raises(ModelSourceError, match=r"^model 'kangaroo-test/not-cached' is not in the local Hugging "
                                               r"Face cache and offline mode is on"):
        load_base_model("kangaroo-test/not-cached")


def test_generate_reports_base_model_paths_in_one_line(tiny_llama_dir, tmp_path, capsys):
    for base, expected in [("/nonexistent", "error: no such directory: /nonexistent\n"),
                           (str(tmp_path), f"error: no config.json in {tmp_path} ")]:
        assert main(["generate", "--base_model", base, "--exit_layer", "1", "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and len(err.strip().splitlines()) == 1, err
    weights_only = tmp_path / "no-tokenizer"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, weights_only / name)
    assert main(["generate", "--base_model", str(weights_only), "--exit_layer", "1", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.startswith(f"error: no tokenizer files in {weights_only} ")
