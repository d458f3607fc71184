"""The CPU thread rule: never more threads than free cores (affinity minus the load average's busy ones),
one for tiny models, always said on stderr."""

import pytest

from kangaroo_lit import threads
from kangaroo_lit.errors import ConfigError

REAL_MODEL = 134_515_008  # SmolLM2-135M


@pytest.mark.parametrize(("cores", "load", "expected"), [
    (2, 0.0, 2),   # idle: every core
    (2, 0.98, 1),  # another job on one core: the free one only
    (2, 2.7, 1),   # everything busy: still one
    (16, 3.4, 13),
    (1, 0.2, 1),
])
def test_real_models_get_the_free_cores(monkeypatch, cores, load, expected):
    monkeypatch.setattr(threads, "cpu_cores", lambda: cores)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    assert threads.choose_threads(REAL_MODEL) == expected
    assert threads.choose_threads(threads.SMALL_MODEL_PARAMETERS - 1) == 1
    assert threads.choose_threads(REAL_MODEL, requested=3) == 3
    assert threads.choose_threads(REAL_MODEL, decoding=True) == 1  # batch-1 decoding: one thread


def test_unknown_load_counts_no_core_busy(monkeypatch):
    def unavailable():
        raise OSError("no load average")

    monkeypatch.setattr(threads, "cpu_cores", lambda: 4)
    monkeypatch.setattr(threads.os, "getloadavg", unavailable)
    assert threads.free_cores() == 4


def test_the_choice_is_said(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(threads, "cpu_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.1, 1.0, 1.0))
    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(REAL_MODEL, None) == 1
        assert torch.get_num_threads() == 1
        err = capsys.readouterr().err
        assert "note: 1 torch CPU thread(s) for a 134.5M-parameter model (2 cores, 1 busy" in err and "--threads" in err
        threads.apply_threads(REAL_MODEL, 2)
        assert "2 torch CPU thread(s) as asked" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        threads.choose_threads(REAL_MODEL, requested=0)


def test_generate_says_its_threads(tiny_llama_dir, capsys):
    from kangaroo_lit.cli import main

    assert main(["generate", "--base_model", str(tiny_llama_dir), "--exit_layer", "1", "--prompt", "hi",
                 "--max_new_tokens", "2"]) == 0
    assert "note: 1 torch CPU thread(s) for batch-1 decoding" in capsys.readouterr().err
