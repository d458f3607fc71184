"""Decode with a draft through Hugging Face ``generate``.

* :func:`kangaroo_generate`: ``model.generate(**inputs, custom_generate=kangaroo_generate(draft), ...)``.
* :func:`generate_with_artifact`: what an exported artifact's ``custom_generate/generate.py`` runs, so
  ``model.generate(**inputs, custom_generate="path/to/artifact", trust_remote_code=True)`` works.
"""

from kangaroo_lit.hf.artifact_generate import generate_with_artifact, write_custom_generate
from kangaroo_lit.hf.custom_generate import KangarooGenerate, kangaroo_generate

__all__ = ["KangarooGenerate", "generate_with_artifact", "kangaroo_generate", "write_custom_generate"]
