"""The DataModule end to end: splits, batches, text format, chat template, resume, sharding, a Trainer run."""

import copy
import gc
import inspect
import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from kangaroo_lit.data import InstructionDataModule
from kangaroo_lit.data.collate import Collator, padding_fraction
from kangaroo_lit.data.tokenize import IGNORE_INDEX

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def make_dm(tmp_path, tok_dir):
    def make(data_path=FIXTURES / "dolly-tiny.jsonl", setup=True, **kw):
        kw = {"tokenizer": str(tok_dir), "cache_dir": str(tmp_path / "cache"), "num_workers": 0, **kw}
        dm = InstructionDataModule(data_path=str(data_path), **kw)
        if setup:
            dm.setup("fit")
        return dm

    return make


def check_batch(batch, eos_id, max_length, every_token_a_target=False):
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == torch.int64
    assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= max_length
    lengths = mask.sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
        assert (labels[i, n:] == IGNORE_INDEX).all()
        targets = labels[i, :n] != IGNORE_INDEX
        assert targets.any()
        assert (labels[i, :n][targets] == ids[i, :n][targets]).all()  # unshifted
        if every_token_a_target:
            # plain text: every token, except the context-only overlap of a document's tail window
            first = int(targets.nonzero()[0])
            assert targets[first:].all()
            assert first == 0 or n == max_length  # only full-length tail windows carry context
        else:
            # the prompt is a masked prefix, the targets a contiguous suffix
            first = int(targets.nonzero()[0])
            assert targets[first:].all() and not targets[:first].any() and first > 0
    assert (ids[mask == 0] == eos_id).all()  # the tiny tokenizer has no pad token: EOS pads


def test_init_signature_is_cli_friendly():
    sig = inspect.signature(InstructionDataModule.__init__)
    doc = InstructionDataModule.__doc__
    for name, param in list(sig.parameters.items())[1:]:
        assert param.annotation is not inspect.Parameter.empty, name
        assert param.default is not inspect.Parameter.empty, name
        assert f"    {name}: " in doc, name


def test_jsonargparse_reads_the_signature_and_docstrings():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(InstructionDataModule, "data")
    cfg = parser.parse_args(["--data.format", "text", "--data.pin_memory", "false", "--data.max_rows", "3"])
    assert (cfg.data.format, cfg.data.pin_memory, cfg.data.max_rows, cfg.data.tokenizer) == ("text", False, 3, None)
    assert "plain-text continuation" in " ".join(parser.format_help().split())


def test_hub_loading_path(make_dm, monkeypatch):
    import datasets

    rows = [json.loads(line) for line in (FIXTURES / "dolly-tiny.jsonl").read_text().splitlines()]
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = make_dm(setup=False)
    dm.data_path = None
    dm.prepare_data()
    dm.setup("fit")
    assert calls == [("databricks/databricks-dolly-15k", "train")] * 2
    assert len(dm.data) == 10 and not dm.loaded_from_cache
    dm2 = make_dm(setup=False)
    dm2.data_path = None
    dm2.setup("fit")
    assert dm2.loaded_from_cache  # same Hub fingerprint

    rows[4] = {"instruction": "x", "context": "", "response": 5, "category": "c"}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(rows[4:5] * 2))
    bad = make_dm(setup=False)
    bad.data_path = None
    with pytest.raises(
        ValueError, match=r"databricks/databricks-dolly-15k \(split 'train'\), element 0, field 'response'"
    ):
        bad.setup("fit")


def test_max_rows(make_dm):
    dm = make_dm(max_rows=4, val_fraction=0.25, test_fraction=0.0)
    assert len(dm.data) == 4 and (len(dm.train_dataset), len(dm.val_dataset)) == (3, 1)


def test_tokenizer_is_required(tmp_path):
    dm = InstructionDataModule(data_path=str(FIXTURES / "dolly-tiny.jsonl"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        dm.setup("fit")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        InstructionDataModule(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="format"):
        InstructionDataModule(format="chat")


def test_splits_are_deterministic_disjoint_and_cover_all_rows(make_dm):
    dm = make_dm(val_fraction=0.2, test_fraction=0.1)
    parts = [set(d.row_ids) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]
    assert [len(p) for p in parts] == [7, 2, 1]
    assert set.union(*parts) == set(range(10)) and sum(map(len, parts)) == 10
    again = make_dm(val_fraction=0.2, test_fraction=0.1)
    assert torch.equal(again.val_dataset.indices, dm.val_dataset.indices)
    other = make_dm(val_fraction=0.2, test_fraction=0.1, seed=7)
    assert set(other.val_dataset.row_ids) != parts[1] or set(other.test_dataset.row_ids) != parts[2]


def test_tiny_datasets_still_get_a_validation_row(make_dm, tmp_path):
    small = tmp_path / "three.jsonl"
    small.write_text("".join((FIXTURES / "dolly-tiny.jsonl").read_text().splitlines(True)[:3]))
    dm = make_dm(small, val_fraction=0.05, test_fraction=0.0)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (2, 1, 0)
    assert dm.test_dataloader() == []
    one = tmp_path / "one.jsonl"
    one.write_text((FIXTURES / "dolly-tiny.jsonl").read_text().splitlines(True)[0])
    with pytest.raises(ValueError, match="too few"):
        make_dm(one)


def test_batches_are_well_formed(make_dm, tiny_tokenizer):
    dm = make_dm(batch_size=3, max_length=64, val_fraction=0.2)
    eos = tiny_tokenizer.eos_token_id
    batches = list(dm.train_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == len(dm.train_dataset)
    for batch in batches:
        check_batch(batch, eos, 64)
    for batch in dm.val_dataloader():
        check_batch(batch, eos, 64)
    # every untruncated example ends with its EOS as a target
    for i in range(len(dm.train_dataset)):
        ids = dm.train_dataset[i]["input_ids"]
        labels = dm.train_dataset[i]["labels"]
        if len(ids) < 64:
            assert ids[-1] == eos and labels[-1] == eos


def test_skip_bad_rows_and_error_bad_rows(make_dm):
    dm = make_dm(FIXTURES / "dolly-malformed.jsonl", on_bad_row="skip", val_fraction=0.0, test_fraction=0.0)
    assert len(dm.train_dataset) == 3
    with pytest.raises(ValueError, match=r"dolly-malformed.jsonl, line 2: not valid JSON"):
        make_dm(FIXTURES / "dolly-malformed.jsonl")


@pytest.mark.parametrize("name", ["stories.txt", "stories.jsonl"])
def test_text_format(make_dm, tiny_tokenizer, name):
    dm = make_dm(FIXTURES / name, format="text", max_length=24, val_fraction=0.25, test_fraction=0.0, batch_size=2)
    assert len(dm.data) > 4  # long documents are chunked, not dropped
    assert len(set(dm.val_dataset.row_ids)) == 1
    assert not set(dm.val_dataset.row_ids) & set(dm.train_dataset.row_ids)  # split by document
    for batch in dm.train_dataloader():
        check_batch(batch, tiny_tokenizer.eos_token_id, 24, every_token_a_target=True)


def test_chat_template_through_the_datamodule(make_dm, tiny_tokenizer, tmp_path):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tok.save_pretrained(tmp_path / "chat")
    dm = make_dm(tokenizer=str(tmp_path / "chat"), use_chat_template=True, val_fraction=0.0, test_fraction=0.0)
    ids = dm.train_dataset[0]["input_ids"]
    labels = dm.train_dataset[0]["labels"]
    n = int((labels == IGNORE_INDEX).sum())
    assert tok.decode(ids[:n]).startswith("<s>[user] ") and tok.decode(ids[:n]).endswith("[assistant] ")
    plain = make_dm(use_chat_template=True, val_fraction=0.0, test_fraction=0.0)  # no template: fallback
    assert "### Instruction:" in tiny_tokenizer.decode(plain.train_dataset[0]["input_ids"])


def test_resume_position_skips_exactly_the_done_batches(make_dm):
    dm = make_dm(batch_size=2, val_fraction=0.0, test_fraction=0.0)
    full = [b["input_ids"].tolist() for b in dm.train_dataloader()]
    assert len(full) == 5
    dm.set_resume_position(epoch=0, batches_done=3)  # e.g. from on_load_checkpoint
    resumed = dm.train_dataloader()
    assert len(resumed) == 5  # a full epoch's length; the trainer's progress is already at 3
    assert [b["input_ids"].tolist() for b in resumed] == full[3:]
    assert [b["input_ids"].tolist() for b in resumed] == full  # next pass: from the start

    fresh = make_dm(batch_size=2, val_fraction=0.0, test_fraction=0.0)
    loader = fresh.train_dataloader()
    fresh.set_resume_position(epoch=0, batches_done=4)  # after the loader was built
    assert [b["input_ids"].tolist() for b in loader] == full[4:]


def test_sharding_from_the_trainer(make_dm):
    dm = make_dm(batch_size=1, val_fraction=0.0, test_fraction=0.0)
    shares = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=3)
        shares.append([b["input_ids"].tolist() for b in dm.train_dataloader()])
        assert dm.train_sampler.epoch == 3
    assert len(shares[0]) == len(shares[1]) == 5
    assert not {str(b) for b in shares[0]} & {str(b) for b in shares[1]}


def test_workers_and_padding_to_a_multiple(make_dm):
    dm = make_dm(batch_size=4, num_workers=2, pad_to_multiple_of=8)
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    batches = list(loader)
    # Each batch holds the rows of the sampler's index batch, padded to the multiple of 8 at or above
    # its longest row; its padding fraction follows from those rows' lengths alone.
    index_batches = dm.train_sampler.batches_for_epoch(0)
    assert len(batches) == len(index_batches) == 2
    fractions = []
    for batch, indices in zip(batches, index_batches):
        lengths = [len(dm.train_dataset[i]["input_ids"]) for i in indices]
        width = 8 * math.ceil(max(lengths) / 8)
        assert batch["input_ids"].shape == (len(indices), width)
        assert batch["attention_mask"].sum(1).tolist() == lengths
        fractions.append(padding_fraction(batch))
        assert fractions[-1] == pytest.approx(1 - sum(lengths) / (len(lengths) * width))
    assert all(f > 0 for f in fractions)  # rows of different lengths, widths rounded up: real padding
    # Shut the persistent workers down now: left to a later garbage collection (e.g. inside an
    # import in another test), their shutdown can stall on its join timeouts.
    del loader
    gc.collect()


def _loaders(dm):
    return [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]


@pytest.mark.parametrize("pin", [True, False])
def test_explicit_pin_memory_reaches_every_loader(make_dm, monkeypatch, pin):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: not pin)  # an explicit choice wins over CUDA
    dm = make_dm(pin_memory=pin, val_fraction=0.2, test_fraction=0.1)
    assert [loader.pin_memory for loader in _loaders(dm)] == [pin] * 3


@pytest.mark.parametrize("cuda", [True, False])
def test_pin_memory_by_default_follows_cuda_availability(make_dm, monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    dm = make_dm(val_fraction=0.2, test_fraction=0.1)  # pin_memory left at its default, None
    assert dm.pin_memory is None
    assert [loader.pin_memory for loader in _loaders(dm)] == [cuda] * 3


def test_real_dolly_sample(shared_dir, tok_dir, tmp_path, tiny_tokenizer):
    path = shared_dir / "data" / "dolly-sample.jsonl"
    dm = InstructionDataModule(
        tokenizer=str(tok_dir), data_path=str(path), cache_dir=str(tmp_path), num_workers=0, batch_size=8
    )
    dm.setup("fit")
    assert len(dm.data) == 609
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (549, 30, 30)
    assert dm.truncation_stats.prompt_cut > 0  # some Wikipedia contexts exceed 512 tiny-BPE tokens
    eos = tiny_tokenizer.eos_token_id
    seen = 0
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for batch in loader:
            check_batch(batch, eos, 512)
            seen += len(batch["input_ids"])
    assert seen == 609
    # length grouping keeps padding low on real, widely varied lengths
    pads = [padding_fraction(b) for b in dm.train_dataloader()]
    assert sum(pads) / len(pads) < 0.1


class _TinyModule(L.LightningModule):
    """Records the batches it sees; trains one embedding so that the Trainer has something to step."""

    def __init__(self, vocab):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 4)
        self.seen = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(batch["input_ids"].tolist())
        return self.emb(batch["input_ids"]).float().mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_sets_the_epoch_each_epoch(make_dm, tiny_tokenizer):
    dm = make_dm(setup=False, batch_size=2, val_fraction=0.2, test_fraction=0.0)
    module = _TinyModule(len(tiny_tokenizer))
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert len(module.seen[0]) == len(module.seen[1]) == 4
    collate = Collator(dm.pad_id)
    for epoch in (0, 1):
        batches = dm.train_sampler.batches_for_epoch(epoch)
        expected = [collate([dm.train_dataset[i] for i in b])["input_ids"].tolist() for b in batches]
        assert module.seen[epoch] == expected
    assert module.seen[0] != module.seen[1]
    assert json.loads(json.dumps(dict(dm.hparams)))["batch_size"] == 2


class _Interrupt(Exception):
    pass


class _ResumableModule(_TinyModule):
    """Saves a checkpoint after batch ``stop_at=(epoch, batch_idx)`` and dies; resumes like the training module."""

    def __init__(self, vocab, ckpt_path, stop_at=None):
        super().__init__(vocab)
        self.ckpt_path, self.stop_at, self.resume = ckpt_path, stop_at, None

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.seen_flat.append((self.current_epoch, batch_idx, batch["input_ids"].tolist()))
        return loss

    def on_fit_start(self):
        self.seen_flat = []
        if self.resume is not None:
            self.trainer.datamodule.set_resume_position(*self.resume)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.stop_at == (self.current_epoch, batch_idx):
            self.trainer.save_checkpoint(self.ckpt_path)
            raise _Interrupt

    def on_load_checkpoint(self, checkpoint):
        loops = checkpoint["loops"]["fit_loop"]
        self.resume = (
            loops["epoch_progress"]["current"]["processed"],
            loops["epoch_loop.batch_progress"]["current"]["processed"],
        )


@pytest.mark.parametrize("stop_at", [(1, 1), (1, 4)])
def test_trainer_resume_mid_epoch_is_exact(make_dm, tiny_tokenizer, tmp_path, stop_at):
    kw = dict(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    vocab, ckpt = len(tiny_tokenizer), str(tmp_path / "mid.ckpt")

    def dm():
        return make_dm(setup=False, batch_size=2, val_fraction=0.1, test_fraction=0.0)

    reference = _ResumableModule(vocab, ckpt)
    L.Trainer(**kw).fit(reference, datamodule=dm())
    first = _ResumableModule(vocab, ckpt, stop_at=stop_at)
    with pytest.raises(_Interrupt):
        L.Trainer(**kw).fit(first, datamodule=dm())
    second = _ResumableModule(vocab, ckpt)
    L.Trainer(**kw).fit(second, datamodule=dm(), ckpt_path=ckpt)
    assert len(reference.seen_flat) == 15
    assert first.seen_flat + second.seen_flat == reference.seen_flat
