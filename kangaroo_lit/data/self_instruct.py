"""Instructions written by the model itself (Magpie, arXiv 2406.08464): on-policy data with no dataset.

An aligned chat model, given its chat template up to the opening of a user turn, continues with a
plausible user request. Answered by the same model, such requests make instruction data of any size
whose answers are exactly what the verifier says, which is what a draft must learn to predict.

This module holds the pieces that do not need a model, so they are tested on fixed text:

* :data:`CATEGORIES`: the kinds of work to steer towards (a hint in the system prompt, plus a few
  openings of the user turn, since the hint alone steers a small model only weakly). They follow the
  kinds of work Spec-Bench measures (translate, summarise, answer, solve, answer from a passage, write)
  without ever reading its questions: those are the test set.
* :func:`query_prefix`: the template text up to where the user's words start.
* :func:`reject_reason`: the filters (length, cut off, language, refusals, template debris, loops).
* :class:`DuplicateIndex`: exact and near-duplicate detection (MinHash over word 3-grams, banded).
* :func:`diversity`: distinct n-gram ratios and category counts, for the report.

The generation loop that uses them is :func:`kangaroo_lit.distill.self_instruct`.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from kangaroo_lit.errors import ConfigError


@dataclass(frozen=True)
class Category:
    """A kind of request to steer the model towards.

    Attributes:
        name: short name, stored in each row's ``category``.
        hint: appended to the system prompt.
        openings: the first words of the user turn, one chosen per sample ("" lets the model start).
        max_new_tokens: the longest request; requests that carry their own passage need more room.
    """

    name: str
    hint: str
    openings: tuple[str, ...]
    max_new_tokens: int = 96


CATEGORIES: dict[str, Category] = {
    c.name: c
    for c in (
        Category(
            "translation",
            "The user asks you to translate a sentence or a short text between English and another language.",
            ("Translate", "Translate the following sentence into", "How do you say", "Can you translate"),
        ),
        Category(
            "summarization",
            "The user gives you a passage (a news article, a report, a story) and asks for a short summary.",
            ("Summarize the following", "Please summarize this article:", "Give me a short summary of this text:"),
            max_new_tokens=256,
        ),
        Category(
            "qa",
            "The user asks a factual question about history, science, geography, people or everyday life.",
            ("What", "Who", "Why", "How", "When", "Which", "Explain"),
        ),
        Category(
            "math",
            "The user asks you to solve a math word problem step by step.",
            ("Solve", "A store", "If", "John has", "A train", "Calculate", "There are"),
        ),
        Category(
            "context",
            "The user gives you a passage and asks a question that the passage answers.",
            ("Read the following passage and answer the question", "Based on this text,", "Given the paragraph below,"),
            max_new_tokens=256,
        ),
        Category(
            "writing",
            "The user asks you to write something: an email, a story, a poem, a list of ideas, a plan or advice.",
            ("Write", "Compose", "Give me", "Can you help me", "I need", "Create", ""),
        ),
        Category(
            "open",
            "",
            ("",),
        ),
    )
}

DEFAULT_SYSTEM = "You are a helpful AI assistant."

# Placeholder whose position in the rendered template marks where the user's words begin.
_SENTINEL = "\u2063KANGAROO_USER_TEXT\u2063"


def query_prefix(tokenizer, system: str, opening: str = "") -> tuple[str, bool]:
    """The text the model continues to write a user request: the template up to the user's words.

    With a chat template the system message is rendered and the user turn opened; without one (a base
    model) the plain instruction template's opening is used, so self-instruct still runs there.

    Args:
        tokenizer: a Hugging Face tokenizer.
        system: the system prompt ("" for none).
        opening: the first words of the request (part of the request the model continues).

    Returns:
        ``(prefix, chat)``: ``prefix`` ends with ``opening``; ``chat`` says whether a chat template was
        used (its text carries its own special tokens, so tokenize it without adding any).
    """
    from kangaroo_lit.data.prompts import PROMPT_NO_CONTEXT
    from kangaroo_lit.data.tokenize import has_chat_template

    if not has_chat_template(tokenizer):
        head = PROMPT_NO_CONTEXT.split("{instruction}")[0]
        return (f"{system}\n\n" if system else "") + head + opening, False
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": _SENTINEL})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    if _SENTINEL not in rendered:
        raise ConfigError(f"the chat template of {tokenizer.name_or_path!r} drops the user's text; "
                          "self-instruct needs a template that renders it")
    return rendered[: rendered.index(_SENTINEL)] + opening, True


# Text that means the model did not write a clean request: chat-template markup, the next turn's
# role, the plain template's headers.
_DEBRIS = re.compile(r"<\||\|>|<s>|</s>|\[INST\]|###|^\s*(user|assistant|system)\s*[:\n]", re.IGNORECASE | re.MULTILINE)
_REFUSAL = re.compile(
    r"\b(I'?m sorry|I am sorry|I apologi[sz]e|as an AI|I cannot|I can'?t (help|assist|provide)|"
    r"I'?m (just )?an AI|I do not have (access|the ability)|I'?m not able to)\b",
    re.IGNORECASE,
)


def latin_fraction(text: str) -> float:
    """Share of the letters in ``text`` that are Latin script (1.0 for text without letters)."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 1.0
    latin = sum(1 for ch in letters if "LATIN" in unicodedata.name(ch, ""))
    return latin / len(letters)


def longest_repeat(words: list[str], n: int = 4) -> int:
    """How often the most frequent word ``n``-gram occurs (a degenerate loop repeats one)."""
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return max(grams.values(), default=0)


def reject_reason(text: str, hit_max_tokens: bool, min_words: int = 4, max_chars: int = 2000,
                  min_latin: float = 0.9, allow_non_latin: bool = False) -> str | None:
    """Why a generated request is not kept, or None to keep it.

    Args:
        text: the request, stripped.
        hit_max_tokens: the model was cut off before it ended its turn (the request is incomplete).
        min_words: shortest request kept.
        max_chars: longest request kept.
        min_latin: least share of Latin-script letters (the answers are English; a translation request
            quotes some foreign text, so this is a share, not all).
        allow_non_latin: skip the script check.

    Returns:
        One of ``"cut_off"``, ``"too_short"``, ``"too_long"``, ``"language"``, ``"debris"``,
        ``"refusal"``, ``"loop"``, or None.
    """
    if hit_max_tokens:
        return "cut_off"
    words = text.split()
    if len(words) < min_words:
        return "too_short"
    if len(text) > max_chars:
        return "too_long"
    if not allow_non_latin and latin_fraction(text) < min_latin:
        return "language"
    if _DEBRIS.search(text):
        return "debris"
    if _REFUSAL.search(text):
        return "refusal"
    if longest_repeat([w.lower() for w in words]) >= 3:
        return "loop"
    return None


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: what makes two requests "the same"."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def shingles(text: str, n: int = 3) -> set[str]:
    """The word ``n``-grams of the normalized text (the whole text when shorter)."""
    words = normalize(text).split()
    if len(words) <= n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """``|a & b| / |a | b|`` (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


_MERSENNE_61 = 2**61 - 1


class DuplicateIndex:
    """Exact and near-duplicate detection over the requests kept so far.

    Near duplicates are pairs whose word-3-gram Jaccard similarity is at least ``threshold``. MinHash
    signatures (``bands * rows`` hash minima) banded into buckets find the candidate pairs without
    comparing every pair; each candidate is then checked exactly, so a reported duplicate is a real one.
    With 16 bands of 4 rows a pair at Jaccard 0.7 shares a bucket with probability 1 - (1 - 0.7^4)^16
    ≈ 0.997 (0.6: 0.93).

    Args:
        threshold: Jaccard similarity from which two requests count as duplicates.
        bands: MinHash bands.
        rows: hash minima per band.
    """

    def __init__(self, threshold: float = 0.7, bands: int = 16, rows: int = 4):
        if not 0 < threshold <= 1:
            raise ConfigError(f"duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.bands, self.rows = bands, rows
        rng = random.Random(0)  # fixed: signatures must not change between runs
        self._coefficients = [(rng.randrange(1, _MERSENNE_61), rng.randrange(_MERSENNE_61))
                              for _ in range(bands * rows)]
        self._exact: set[str] = set()
        self._shingles: list[set[str]] = []
        self._buckets: dict[tuple[int, bytes], list[int]] = {}

    def __len__(self) -> int:
        return len(self._shingles)

    def _signature(self, grams: set[str]) -> list[int]:
        # Each gram's stable 64-bit hash (blake2b, unlike hash(), is the same in every process), mapped
        # by ``bands * rows`` fixed universal hash functions (a*h + b) mod p; the minima are the signature.
        bases = [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams]
        return [min((a * h + b) % _MERSENNE_61 for h in bases) for a, b in self._coefficients]

    def _keys(self, grams: set[str]) -> list[tuple[int, bytes]]:
        sig = self._signature(grams)
        keys = []
        for band in range(self.bands):
            chunk = sig[band * self.rows : (band + 1) * self.rows]
            keys.append((band, b"".join(v.to_bytes(8, "little") for v in chunk)))
        return keys

    def duplicate_of(self, text: str) -> str | None:
        """``"exact"`` or ``"near"`` if ``text`` repeats a kept request, else None (nothing is added)."""
        if normalize(text) in self._exact:
            return "exact"
        grams = shingles(text)
        seen: set[int] = set()
        for key in self._keys(grams):
            for index in self._buckets.get(key, ()):
                if index not in seen:
                    seen.add(index)
                    if jaccard(grams, self._shingles[index]) >= self.threshold:
                        return "near"
        return None

    def add(self, text: str) -> None:
        """Keep ``text`` (call after :meth:`duplicate_of` said it is new)."""
        grams = shingles(text)
        index = len(self._shingles)
        self._shingles.append(grams)
        self._exact.add(normalize(text))
        for key in self._keys(grams):
            self._buckets.setdefault(key, []).append(index)


def diversity(texts: Iterable[str], categories: Iterable[str] = ()) -> dict:
    """Distinct-n ratios (unique n-grams / all n-grams over the corpus), lengths and category counts."""
    texts = list(texts)
    out: dict = {"requests": len(texts)}
    for n in (1, 2, 3):
        grams = [g for t in texts for g in zip(*(normalize(t).split()[i:] for i in range(n)))]
        out[f"distinct_{n}"] = round(len(set(grams)) / len(grams), 4) if grams else 0.0
    words = sorted(len(t.split()) for t in texts)
    out["median_words"] = words[len(words) // 2] if words else 0
    out["categories"] = dict(sorted(Counter(categories).items()))
    return out
