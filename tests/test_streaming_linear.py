"""The streaming CPU kernel for linears over a few rows: values, batch invariance, patching, decoding.

The reference is ``F.linear`` in float64. The kernel is compiled on first use (about a minute); where it
cannot be built (no C++ compiler or AVX2) the tests skip with the reason and eager stays the default.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder
from kangaroo_lit.kernels import streaming_linear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kernel():
    ok, why = streaming_linear.available()
    if not ok:
        pytest.skip(f"streaming kernel not available here: {why}")
    return streaming_linear


@pytest.mark.parametrize(("in_features", "out_features", "bias"), [(64, 96, False), (75, 33, True)])
def test_values_match_float64_and_rows_are_batch_invariant(kernel, in_features, out_features, bias):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(8, in_features, generator=gen)
    alone = [kernel.few_rows_linear(x[i : i + 1], w, b) for i in range(8)]
    for rows in range(1, 9):
        got = kernel.few_rows_linear(x[:rows], w, b)
        want = F.linear(x[:rows].double(), w.double(), None if b is None else b.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        for i in range(rows):  # a row's result does not depend on the rows beside it (bitwise)
            assert torch.equal(got[i], alone[i][0])
    # leading dimensions are flattened and restored
    assert kernel.few_rows_linear(x[:6].view(2, 3, in_features), w, b).shape == (2, 3, out_features)


def test_patch_routes_small_inputs_only_and_restores(kernel, monkeypatch):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    calls = []
    real = kernel.few_rows_linear
    monkeypatch.setattr(streaming_linear, "few_rows_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randn(3, 16)
    with torch.no_grad():
        eager = model(x)
        with streaming_linear.streaming_linears(model) as patched:
            assert patched == 2
            torch.testing.assert_close(model(x), eager, rtol=1e-5, atol=1e-6)
            assert len(calls) == 2
            model(torch.randn(9, 16))  # more than 8 rows: F.linear
            model.double()(torch.randn(2, 16).double())  # not float32: F.linear
            model.float()
            assert len(calls) == 2
    with streaming_linear.streaming_linears(model):  # gradients needed: F.linear, and they flow
        model(x).sum().backward()
    assert len(calls) == 2 and model[0].weight.grad is not None
    assert "forward" not in vars(model[0])  # the class's forward is back
    with streaming_linear.streaming_linears(model, enabled=False) as patched:
        assert patched == 0


def test_decoding_with_the_kernel_matches_eager_generate(kernel, tiny_model_dirs):
    """float32 tiny Llama: the vanilla loop and the speculative decoder under the kernel give HF's eager greedy."""
    from tests.conftest import build_decoding_model, greedy_reference

    model = build_decoding_model(tiny_model_dirs["llama"], exit_layer=1, mode="draft", seed=2).float()
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=gen)
        reference = greedy_reference(model, ids, 20)
        with streaming_linear.streaming_linears(model) as patched:
            assert patched > 0
            assert VanillaDecoder(model).generate(ids, 20).tokens == reference
            spec = SelfSpeculativeDecoder(model, threshold=0.0, max_draft=4, prompt_lookup=3)
            assert spec.generate(ids, 20).tokens == reference


def test_the_row_limit_is_the_settings_limit_and_is_checked(monkeypatch):
    """More than KERNEL_MAX_ROWS rows: the kernel itself refuses (before any build), a patched linear uses
    F.linear. Needs no compiler: the check comes first, and a patched forward never reaches the kernel."""
    from kangaroo_lit.settings import KERNEL_MAX_ROWS

    assert streaming_linear.MAX_ROWS == KERNEL_MAX_ROWS
    monkeypatch.setattr(streaming_linear, "_build", lambda: pytest.fail("the kernel was reached"))
    w = torch.randn(4, 16)
    for rows in (0, KERNEL_MAX_ROWS + 1):
        with pytest.raises(ValueError, match=f"1 to {KERNEL_MAX_ROWS} input rows, got {rows}"):
            streaming_linear.few_rows_linear(torch.randn(rows, 16), w)
    linear = nn.Linear(16, 4)
    x = torch.randn(3, 3, 16)  # 9 rows through leading dimensions
    with torch.no_grad():
        assert not streaming_linear.uses_kernel(linear, x)
        assert streaming_linear.uses_kernel(linear, x[:2, :2])  # 4 rows: the kernel's
        torch.testing.assert_close(streaming_linear._streaming_forward(linear, x), linear(x))


def test_unavailable_kernel_messages_are_neutral_and_commands_word_theirs(monkeypatch):
    from kangaroo_lit.cli_scaffold import kernel_linears
    from kangaroo_lit.errors import ConfigError

    monkeypatch.setattr(streaming_linear, "available", lambda: (False, "no compiler"))
    model = nn.Linear(2, 2)
    with pytest.raises(streaming_linear.KernelUnavailable) as info, streaming_linear.streaming_linears(model):
        pass
    assert info.value.reason == "no compiler" and "--" not in str(info.value)
    with pytest.raises(ConfigError, match="^--kernel streaming: no compiler; use --kernel eager$"):
        kernel_linears(model, "streaming")
    with kernel_linears(model, "eager") as patched:
        assert patched == 0
