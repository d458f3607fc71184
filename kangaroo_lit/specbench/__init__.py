"""Spec-Bench for self-speculative decoding: ``kangaroo-lit specbench`` (DESIGN §4).

* :mod:`~kangaroo_lit.specbench.questions`: the question file and its six subtasks;
* :mod:`~kangaroo_lit.specbench.conversation`: turns rendered as prompts (chat template or a named one),
  cut from the left to fit the context;
* :mod:`~kangaroo_lit.specbench.methods`: the decoding methods compared (vanilla loop, HF ``generate``,
  prompt lookup, HF early exit, the self-speculative decoder);
* :mod:`~kangaroo_lit.specbench.answers`: Spec-Bench answer files, appended line by line, resumable;
* :mod:`~kangaroo_lit.specbench.report`: the aggregation of DESIGN §3, tables and plot;
* :mod:`~kangaroo_lit.specbench.runner`: the run itself; :mod:`~kangaroo_lit.specbench.cli`: the command.
"""
