"""The first ``--kernel streaming`` run says that it compiles (about a minute) instead of staying silent;
a run that loads torch's cached build says nothing (issue 18, point 6). No compiler runs here: ``load_inline``
is replaced by a stub, the build cache is a temporary directory."""

import pytest
import torch

from kangaroo_lit.kernels import streaming_linear

NOTE = "compiling the streaming kernel (once, about a minute)"


@pytest.fixture
def stub_build(tmp_path, monkeypatch):
    """An empty torch extension cache, an AVX2 CPU, and a ``load_inline`` that compiles nothing."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(cpp_extension, "load_inline", lambda **kwargs: object())
    streaming_linear._build.cache_clear()
    yield tmp_path / streaming_linear._EXTENSION_NAME
    streaming_linear._build.cache_clear()  # the next caller builds (or loads) the real kernel


def test_a_first_compile_is_announced_on_stderr(stub_build, capsys):
    module, why = streaming_linear._build()
    assert module is not None and why == ""
    assert NOTE in capsys.readouterr().err


def test_a_cached_build_is_loaded_silently(stub_build, capsys):
    stub_build.mkdir(parents=True, exist_ok=True)
    (stub_build / f"{streaming_linear._EXTENSION_NAME}.so").write_bytes(b"")
    (stub_build / "main.cpp").write_text("#include <torch/extension.h>\n" + streaming_linear._cpp_source())
    streaming_linear._build()
    assert NOTE not in capsys.readouterr().err


def test_a_cached_build_of_another_source_is_a_compile(stub_build, capsys):
    stub_build.mkdir(parents=True, exist_ok=True)
    (stub_build / f"{streaming_linear._EXTENSION_NAME}.so").write_bytes(b"")
    (stub_build / "main.cpp").write_text("// an older kernel\n")
    streaming_linear._build()
    assert NOTE in capsys.readouterr().err
