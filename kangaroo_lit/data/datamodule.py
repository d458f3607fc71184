"""The LightningDataModule: Dolly 15k instruction data or plain-text continuation data.

Pipeline: read + validate rows (``rows.py``) -> tokenize with prompt masking and truncation
(``tokenize.py``), through an on-disk cache (``cache.py``) -> split by source row, deterministically
by seed -> batches from the length-grouped, resumable, self-sharding sampler (``sampler.py``) ->
right-padded dict batches (``collate.py``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from kangaroo_lit.data.cache import (
    cache_key,
    cache_path,
    default_cache_dir,
    file_sha256,
    load_cached,
    save_cached,
    tokenizer_fingerprint,
)
from kangaroo_lit.data.collate import Collator, resolve_pad_id
from kangaroo_lit.data.dataset import TokenDataset, TokenizedRows
from kangaroo_lit.data.rows import hub_load_dataset, load_file_rows, load_hub_rows
from kangaroo_lit.data.sampler import LengthGroupedBatchSampler
from kangaroo_lit.data.tokenize import RowEncoder, TruncationStats
from kangaroo_lit.embedded import resolve_path
from kangaroo_lit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DOLLY_HUB_NAME = "databricks/databricks-dolly-15k"
# The bundled instruction rows: what a user without the Hub can train on at once.
EMBEDDED_DATA = "embedded:tiny-instruct.jsonl"


@contextlib.contextmanager
def hub_dataset_errors(dataset_name: str):
    """Turn a Hub dataset that cannot be reached or found into one line naming the way out.

    ``data.data_path`` left out means the Hub's ``dataset_name``: offline, or with a mistyped name, the
    datasets library ends in a ``ConnectionError`` or ``FileNotFoundError`` traceback that says nothing
    about ``--data.data_path``.
    """
    try:
        yield
    except (ConnectionError, TimeoutError, FileNotFoundError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"data.data_path is not set, so the data is the Hub dataset {dataset_name!r}, which could not be "
            f"loaded ({reason}). Pass a local file with --data.data_path <file.jsonl>, or the bundled data "
            f"with --data.data_path {EMBEDDED_DATA}"
        ) from err


def _only_item(items: list[dict]) -> dict:
    return items[0]


def count_target_tokens(dataset: TokenDataset, vocab_size: int = 0) -> torch.Tensor:
    """(V,) int64: how often each token id is a target (label != -100) in ``dataset``.

    V is ``vocab_size`` or one more than the largest id seen, whichever is larger.
    """
    rows, indices = dataset.rows, dataset.indices
    lengths = rows.lengths
    starts = rows.offsets[:-1]
    # Per token of the flat storage: its example, and whether it is past that example's prompt.
    example_of = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    position = torch.arange(rows.input_ids.numel()) - starts[example_of]
    in_split = torch.zeros(len(lengths), dtype=torch.bool)
    in_split[indices] = True
    target = in_split[example_of] & (position >= rows.prompt_lens.long()[example_of])
    ids = rows.input_ids[target].long()
    size = max(vocab_size, int(ids.max()) + 1 if ids.numel() else 0)
    return torch.bincount(ids, minlength=size)


def split_count(n: int, fraction: float) -> int:
    """Rows of ``n`` that go to a held-out split: ``round(n * fraction)``, at least 1 when fraction > 0."""
    return 0 if fraction <= 0 else max(1, round(n * fraction))


class InstructionDataModule(L.LightningDataModule):
    """Dolly-format instruction data (or plain text) for training drafts on a causal LM.

    Batches are dicts of (B, T) int64 tensors: ``input_ids`` (right-padded), ``attention_mask``
    (1 real, 0 pad) and ``labels`` (unshifted; -100 on prompt and padding positions).

    After ``setup()``: ``tokenizer``, ``train_dataset``, ``val_dataset``, ``test_dataset``
    (``TokenDataset``; the held-out ones may be empty), ``truncation_stats``, ``pad_id`` and
    ``target_token_counts`` (how often each token id is a target of the train split; what a restricted
    draft head, ``draft.vocab_size``, picks its tokens by).

    Multi-process training: the train sampler shards itself by ``trainer.world_size`` and
    ``trainer.global_rank``; run the Trainer with ``use_distributed_sampler=False``.

    Args:
        tokenizer: Hugging Face tokenizer name or local path (``AutoTokenizer.from_pretrained``);
            the CLI links it from the model's base model. Required by ``setup()``.
        data_path: local data file: ``.jsonl`` or ``.json`` (a list of objects or JSON lines) of
            Dolly rows; for ``format="text"`` a ``.jsonl``/``.json`` with a ``text`` field or a
            ``.txt`` with documents separated by blank lines. None loads ``dataset_name`` from the Hub.
        dataset_name: Hub dataset used when ``data_path`` is None (its ``train`` split).
        format: ``dolly`` (instruction/context/response rows; the prompt is masked) or ``text``
            (plain-text continuation: every token is a target, long documents chunked).
        max_length: longest example in tokens; Dolly rows are cut (prompt first, from the left).
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; None uses ``batch_size``.
        val_fraction: fraction of rows held out for validation (>= 1 row when > 0).
        test_fraction: fraction of rows held out for testing (>= 1 row when > 0).
        seed: seed of the split and of the per-epoch batch order.
        num_workers: dataloader worker processes (0 loads in the main process).
        pin_memory: pin batches in page-locked memory; None pins when CUDA is available.
        use_chat_template: render Dolly rows with the tokenizer's chat template (user = instruction
            + context, assistant = response); falls back to the plain template, with a warning,
            when the tokenizer has none.
        length_grouping: batch examples of similar length (less padding); False batches at random.
        on_bad_row: ``error`` raises on malformed rows (listing file, line and field); ``skip``
            drops them with a warning.
        cache_dir: tokenization cache folder; None uses ``~/.cache/kangaroo_lit/tokenized``.
        use_cache: read and write the tokenization cache; False always re-tokenizes.
        max_rows: use only the first valid rows (quick runs); None uses all.
        pad_to_multiple_of: pad the sequence length T of every batch to a multiple of this.
        predict_path: prompts for ``predict`` (``.txt`` one per line, or JSONL/JSON rows with
            ``prompt`` or ``instruction``/``context``; see ``kangaroo_lit.data.prompt_file``).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        data_path: str | None = None,
        dataset_name: str = DOLLY_HUB_NAME,
        format: Literal["dolly", "text"] = "dolly",
        max_length: int = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 42,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        use_chat_template: bool = False,
        length_grouping: bool = True,
        on_bad_row: Literal["error", "skip"] = "error",
        cache_dir: str | None = None,
        use_cache: bool = True,
        max_rows: int | None = None,
        pad_to_multiple_of: int | None = None,
        predict_path: str | None = None,
    ):
        super().__init__()
        if format not in ("dolly", "text"):
            raise ConfigError(f"format must be 'dolly' or 'text', got {format!r}")
        if on_bad_row not in ("error", "skip"):
            raise ConfigError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        if max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {max_length}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ConfigError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError(
                f"need 0 <= val_fraction, test_fraction and their sum < 1; got {val_fraction}, {test_fraction}"
            )
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        if max_rows is not None and max_rows < 1:
            raise ConfigError(f"max_rows must be >= 1 or None, got {max_rows}")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.data_path = data_path
        self.dataset_name = dataset_name
        self.data_format = format
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.use_chat_template = use_chat_template
        self.length_grouping = length_grouping
        self.on_bad_row = on_bad_row
        self.cache_dir = cache_dir
        self.use_cache = use_cache
        self.max_rows = max_rows
        self.pad_to_multiple_of = pad_to_multiple_of
        self.predict_path = predict_path

        # A tokenizer object may be assigned before setup() (programmatic use); else it is loaded.
        self.tokenizer = None
        self.data: TokenizedRows | None = None
        self.train_dataset: TokenDataset | None = None
        self.val_dataset: TokenDataset | None = None
        self.test_dataset: TokenDataset | None = None
        self.truncation_stats: TruncationStats | None = None
        self.pad_id: int | None = None
        self.target_token_counts: torch.Tensor | None = None
        self.cache_file: str | None = None
        self.loaded_from_cache = False
        self._train_sampler: LengthGroupedBatchSampler | None = None
        self._resume: tuple[int, int] | None = None
        self._position: tuple[int, int] = (0, 0)  # (epoch, training batches taken in it)
        self._source: dict | None = None  # what the rows came from (file hash or Hub fingerprint)

    # ----------------------------------------------------------------------------------------------
    # Loading

    def prepare_data(self) -> None:
        """Download the Hub dataset once per node (local files need nothing here)."""
        if self.data_path is None:
            with hub_dataset_errors(self.dataset_name):
                hub_load_dataset()(self.dataset_name, split="train")

    def _load_tokenizer(self):
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_name is None:
            raise ConfigError(
                "InstructionDataModule needs a tokenizer: pass tokenizer=<HF name or local path> "
                "(with the CLI it is linked from the model's base model)"
            )
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(resolve_path(self.tokenizer_name))

    def _load_rows(self) -> tuple[list[dict], dict]:
        """Validated rows (first ``max_rows``) and the description of their source for the cache key."""
        if self.data_path is not None:
            data_path = resolve_path(self.data_path)
            rows = load_file_rows(data_path, self.data_format, self.on_bad_row)
            source = {"file_sha256": file_sha256(data_path)}
        else:
            with hub_dataset_errors(self.dataset_name):
                rows, fingerprint = load_hub_rows(self.dataset_name, self.data_format, self.on_bad_row)
            source = {"hub": self.dataset_name, "split": "train", "fingerprint": fingerprint}
        if self.max_rows is not None:
            rows = rows[: self.max_rows]
        return rows, {**source, "rows": len(rows), "max_rows": self.max_rows}

    def _tokenize(self, rows: list[dict], source: dict) -> TokenizedRows:
        encoder = RowEncoder(self.tokenizer, self.max_length, self.data_format, self.use_chat_template)
        path = None
        if self.use_cache:
            key = cache_key(
                tokenizer=tokenizer_fingerprint(self.tokenizer),
                source=source,
                encoder=encoder.describe(),
            )
            path = cache_path(self.cache_dir or default_cache_dir(), key)
            self.cache_file = str(path)
            cached = load_cached(path)
            if cached is not None:
                data, meta = cached
                self.loaded_from_cache = True
                self.truncation_stats = TruncationStats(**meta.get("stats", {}))
                log.info("loaded %d rows (%d examples) from cache %s", len(rows), len(data), path)
                if self.truncation_stats.rows:
                    log.info(self.truncation_stats.summary(self.max_length))
                return data
        examples, stats = encoder.encode_rows(rows)
        data = TokenizedRows.from_encoded(examples)
        self.truncation_stats = stats
        if path is not None:
            save_cached(path, data, {"stats": stats.as_dict(), "source": source})
        return data

    def _split(self, data: TokenizedRows, n_rows: int) -> None:
        """Assign whole source rows to test / val / train by a permutation seeded with ``seed``."""
        n_val = split_count(n_rows, self.val_fraction)
        n_test = split_count(n_rows, self.test_fraction)
        if n_rows - n_val - n_test < 1:
            raise ConfigError(
                f"{n_rows} rows are too few for val_fraction={self.val_fraction} and "
                f"test_fraction={self.test_fraction}: no training row would be left"
            )
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(self.seed))
        split_of_row = torch.zeros(n_rows, dtype=torch.int64)  # 0 train, 1 val, 2 test
        split_of_row[perm[:n_val]] = 1
        split_of_row[perm[n_val : n_val + n_test]] = 2
        split_of_example = split_of_row[data.row_ids]
        self.train_dataset, self.val_dataset, self.test_dataset = (
            TokenDataset(data, torch.nonzero(split_of_example == s).flatten()) for s in range(3)
        )

    def setup(self, stage: str | None = None) -> None:
        """Load, validate, tokenize (through the cache) and split; done once, whatever the stage.

        ``predict`` needs only the tokenizer and the prompt file, not the training data.
        """
        if stage == "predict":
            self.tokenizer = self._load_tokenizer()
            return
        if self.data is not None:
            return
        self.tokenizer = self._load_tokenizer()
        self.pad_id = resolve_pad_id(self.tokenizer)
        rows, source = self._load_rows()
        self._source = source
        data = self._tokenize(rows, source)
        if len(data) == 0:
            raise DataError("tokenization produced no examples; nothing to train on")
        self._split(data, len(rows))
        self.target_token_counts = count_target_tokens(self.train_dataset, len(self.tokenizer))
        self.data = data
        log.info(
            "data: %d train / %d val / %d test examples (format=%s, max_length=%d)",
            len(self.train_dataset),
            len(self.val_dataset),
            len(self.test_dataset),
            self.data_format,
            self.max_length,
        )

    # ----------------------------------------------------------------------------------------------
    # Dataloaders

    def _replicas(self) -> tuple[int, int]:
        # With use_distributed_sampler left on, Lightning itself refuses this batch sampler with a
        # message that names the fix (it is not a torch BatchSampler); the CLI turns it off.
        trainer = self.trainer
        return (1, 0) if trainer is None else (int(trainer.world_size), int(trainer.global_rank))

    def _loader(self, dataset: TokenDataset, sampler: LengthGroupedBatchSampler) -> DataLoader:
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=Collator(self.pad_id, self.pad_to_multiple_of),
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=self.num_workers > 0,
            # Each new iterator draws a base seed for its workers; from its own generator, not the
            # global RNG that LoRA dropout uses, so starting an epoch does not shift the dropout
            # masks (an exact resume at an epoch boundary depends on it, see kangaroo_lit.rng).
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _require_setup(self) -> None:
        if self.data is None:
            raise RuntimeError("call setup() before requesting dataloaders")

    def train_dataloader(self) -> DataLoader:
        """Shuffled, length-grouped (unless disabled), sharded by rank, resumable mid-epoch."""
        self._require_setup()
        replicas, rank = self._replicas()
        previous = self._train_sampler
        if self._resume is not None and previous is not None and previous.pending_start is None:
            self._resume = None  # the previous sampler already used (or outlived) the resume position
        sampler = LengthGroupedBatchSampler(
            self.train_dataset.lengths,
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            num_replicas=replicas,
            rank=rank,
            group_by_length=self.length_grouping,
            # The epoch is the trainer's at the moment an iteration starts (no hook needed).
            epoch_fn=(lambda: self.trainer.current_epoch) if self.trainer is not None else None,
        )
        self._train_sampler = sampler
        self._apply_resume()
        return self._loader(self.train_dataset, sampler)

    def _eval_loader(self, dataset: TokenDataset) -> DataLoader | list:
        self._require_setup()
        if len(dataset) == 0:
            return []  # Lightning skips a stage whose loaders are an empty list
        replicas, rank = self._replicas()
        # No shuffle; one global sort by length (longest first) for the least padding, and an
        # early out-of-memory rather than a late one.
        sampler = LengthGroupedBatchSampler(
            dataset.lengths,
            self.eval_batch_size,
            shuffle=False,
            num_replicas=replicas,
            rank=rank,
            mega_batch_mult=-(-len(dataset) // self.eval_batch_size),
        )
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader | list:
        """Deterministic, sorted by length; an empty list when ``val_fraction`` is 0.

        With several ranks each evaluates a disjoint share, padded to equal batch counts by
        repeating batches (as Lightning's ``DistributedSampler`` would).
        """
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader | list:
        """Deterministic, sorted by length; an empty list when ``test_fraction`` is 0."""
        return self._eval_loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        """One prompt at a time (the decoder runs at batch size 1): dicts with ``index``, ``prompt``
        (the rendered text), ``input_ids`` (1, T) and ``source`` (``"<file>:<line>"``, for messages).

        Every prompt is read and tokenized here, before anything is decoded; the module checks them all
        against the model's context in ``on_predict_start``."""
        from kangaroo_lit.data.prompt_file import load_prompt_entries, render_prompt

        if self.predict_path is None:
            raise ConfigError("predict needs prompts: pass --data.predict_path <file> (.txt, .jsonl or .json)")
        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer()
        items = []
        for index, (source, entry) in enumerate(load_prompt_entries(resolve_path(self.predict_path))):
            prompt = render_prompt(entry, self.tokenizer, self.use_chat_template)
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            items.append({"index": index, "prompt": prompt, "input_ids": ids, "source": source})
        # batch_size=1 with an unwrapping collate (not batch_size=None), so Lightning can infer the
        # batch indices the prediction writer receives.
        return DataLoader(items, batch_size=1, shuffle=False, collate_fn=_only_item)

    # ----------------------------------------------------------------------------------------------
    # Resume

    @property
    def train_sampler(self) -> LengthGroupedBatchSampler | None:
        """The sampler of the last ``train_dataloader()``, or None before one was built."""
        return self._train_sampler

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches the loop actually takes (not those a loader prefetched)."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            epoch, done = self._position
            epoch_now = int(trainer.current_epoch)
            self._position = (epoch_now, (done if epoch == epoch_now else 0) + 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The data position, saved in every checkpoint: ``epoch``, ``batches_done`` in it (this rank's
        training batches taken so far), and what makes that position meaningful (``seed``,
        ``batch_size``, ``num_replicas``)."""
        epoch, done = self._position
        return {"epoch": epoch, "batches_done": done, **self._order_defining_state()}

    def _order_defining_state(self) -> dict[str, Any]:
        # What decides which batch comes at which position (besides the code).
        return {"seed": self.seed, "batch_size": self.batch_size, "num_replicas": self._replicas()[0],
                "max_length": self.max_length, "data_source": self._source}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume mid-epoch where the checkpoint left off (:meth:`set_resume_position`).

        A checkpoint made with other data (another file or file content, seed, batch size, max length
        or process count) has other batches: then there is no exact position to resume at, which is
        reported, and the epoch restarts at its first batch.
        """
        current = self._order_defining_state()
        changed = [f"{k}: checkpoint {state_dict.get(k)}, now {v}"
                   for k, v in current.items() if state_dict.get(k) != v]
        if changed:
            log.warning("the data order changed since the checkpoint (%s): the resumed epoch restarts at its "
                        "first batch, so the resume is not exact", "; ".join(changed))
            self.set_resume_position(int(state_dict["epoch"]), 0)
            return
        self.set_resume_position(int(state_dict["epoch"]), int(state_dict["batches_done"]))

    def set_resume_position(self, epoch: int, batches_done: int) -> None:
        """Resume mid-epoch: the next pass over ``epoch`` skips its first ``batches_done`` batches.

        Called by :meth:`load_state_dict` when Lightning restores a checkpoint (before or after the
        train dataloader is built). ``batches_done`` counts this rank's batches, i.e. the trainer's
        batch index within the epoch, so the skipped batches are exactly those already trained on.
        The train dataloader keeps reporting a full epoch's length: Lightning's restored progress
        starts at ``batches_done`` and counts up to it.
        """
        if epoch < 0 or batches_done < 0:
            raise ValueError(f"epoch and batches_done must be >= 0, got {epoch}, {batches_done}")
        self._resume = (int(epoch), int(batches_done))
        self._position = self._resume
        self._apply_resume()

    def _apply_resume(self) -> None:
        # Kept (not cleared) until a sampler has consumed it, so that a train dataloader rebuilt
        # before the resumed epoch starts still skips the done batches.
        if self._resume is not None and self._train_sampler is not None:
            epoch, k = self._resume
            self._train_sampler.set_start_batch(k, epoch=epoch)
