"""custom_generate for this kangaroo_lit draft (a self-speculative draft of its base model).

    model.generate(**inputs, custom_generate="<this folder, or its Hub repo>", trust_remote_code=True,
                   max_new_tokens=128)

`model` must be the draft's base model (README.md names it); the draft is built on it from this folder
(kangaroo.json, the adapter, LoRA), so greedy output is identical to plain `model.generate` and sampling
follows the same distribution. Needs the kangaroo_lit package installed.
"""

from kangaroo_lit.hf import generate_with_artifact


def generate(model, **kwargs):
    return generate_with_artifact(model, **kwargs)
