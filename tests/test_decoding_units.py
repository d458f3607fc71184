"""Unit tests of the decoding building blocks: cache rollback, logits warping, rejection sampling, results."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from kangaroo_lit.decoding import DecodeResult, SamplingConfig, cache_length, crop_layers, rejection_sample, warp_logits


def filled_cache(lengths: dict[int, int]) -> DynamicCache:
    cache = DynamicCache()
    for layer_idx, length in lengths.items():
        kv = torch.randn(1, 2, length, 4)
        cache.update(kv, kv.clone(), layer_idx)
    return cache


def test_cache_length_of_unwritten_layers_is_zero():
    cache = filled_cache({2: 5, 3: 5})  # a deep-segment cache: layers 0, 1 never written
    assert [cache_length(cache, i) for i in range(5)] == [0, 0, 5, 5, 0]


def test_crop_layers_only_removes_with_negative_counts(monkeypatch):
    calls = []
    original = DynamicLayer.crop

    def spy(self, n):
        calls.append(n)
        return original(self, n)

    monkeypatch.setattr(DynamicLayer, "crop", spy)
    cache = filled_cache({0: 7, 1: 7})
    keys_before = cache.layers[0].keys.clone()
    crop_layers(cache, range(2), 7)  # nothing to remove: crop must not be called (crop(0) differs by version)
    assert calls == []
    crop_layers(cache, range(2), 4)
    assert calls == [-3, -3]
    assert [cache_length(cache, i) for i in range(2)] == [4, 4]
    assert torch.equal(cache.layers[0].keys, keys_before[:, :, :4])
    crop_layers(cache, [0], 0)
    assert cache_length(cache, 0) == 0 and cache_length(cache, 1) == 4
    with pytest.raises(ValueError, match="longer"):
        crop_layers(cache, [1], 5)


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(temperature=0.7),
        SamplingConfig(temperature=1.3, top_k=5),
        SamplingConfig(temperature=1.0, top_p=0.8),
        SamplingConfig(temperature=0.5, top_k=10, top_p=0.6),
        SamplingConfig(temperature=1.0, top_k=1),
    ],
)
def test_warping_matches_hugging_face(config):
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    expected = TemperatureLogitsWarper(config.temperature)(None, logits.clone())
    if config.top_k:
        expected = TopKLogitsWarper(config.top_k)(None, expected)
    if config.top_p < 1:
        expected = TopPLogitsWarper(config.top_p)(None, expected)
    ours = warp_logits(logits, config)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    finite = ~torch.isinf(ours)
    torch.testing.assert_close(ours[finite], expected[finite])


def test_sampling_config_validation():
    assert SamplingConfig().greedy
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


@pytest.mark.parametrize("k", [1, 2])
def test_rejection_sampling_emits_target_distribution(k):
    """Draft ~ q, then accept/resample: the first emitted token must follow p_0 exactly."""
    gen = torch.Generator().manual_seed(0)
    vocab = 5
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6], [0.2] * 5], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3], [0.3, 0.3, 0.2, 0.1, 0.1]], dtype=torch.float64)
    draws = 5000
    first = torch.zeros(vocab, dtype=torch.float64)
    rejections = 0
    for _ in range(draws):
        drafts = torch.stack([torch.multinomial(q[i], 1, generator=gen)[0] for i in range(k)])
        n_acc, nxt = rejection_sample(drafts, q[:k], p[: k + 1], gen)
        tokens = drafts[:n_acc].tolist() + [nxt]
        first[tokens[0]] += 1
        rejections += n_acc < k
        assert tokens[0] != 4, "p_0 gives token 4 probability 0"
    assert rejections > 0
    tv = 0.5 * (first / draws - p[0]).abs().sum()
    assert tv < 0.03


def test_rejection_sampling_accepts_identical_distributions():
    p = torch.tensor([[0.3, 0.7], [0.5, 0.5]])
    for _ in range(50):
        n_acc, _ = rejection_sample(torch.tensor([1]), p[:1], p, torch.Generator().manual_seed(_))
        assert n_acc == 1


def test_decode_result_statistics():
    r = DecodeResult(
        tokens=[5, 6, 7, 8, 9],
        accept_lengths=[1, 3, 1],
        drafted=6,
        accepted=2,
        full_passes=3,
        draft_steps=6,
        wall_time_s=0.5,
    )
    assert r.new_tokens == 5 and r.mat == 5 / 3 and r.accept_rate == 2 / 6 and r.tokens_per_s == 10
    empty = DecodeResult()
    assert empty.mat == 0 and empty.accept_rate == 0 and empty.tokens_per_s == 0 and empty.new_tokens == 0
