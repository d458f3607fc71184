"""Data: prompt templates, Dolly-format instruction data and plain-text continuation data."""

__all__ = ["InstructionDataModule"]


def __getattr__(name: str):
    # Lazy, so that ``kangaroo_lit.data.prompts`` stays importable without loading Lightning.
    if name == "InstructionDataModule":
        from kangaroo_lit.data.datamodule import InstructionDataModule

        return InstructionDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
