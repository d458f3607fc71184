"""The cost model a drafter sizes its drafts by: a draft step and a verification pass, in full steps.

``c`` is one draft-path step (shallow layers + adapter + exit head, one token) over one step of the
plain decoding loop; ``v_k`` is the verification pass over ``k`` tokens (``x`` and ``k - 1`` drafts)
over the same step. ``kangaroo-lit bench cost_model --out_dir DIR`` measures both on a device and writes
them to ``DIR/decode_cost_*.json``, which :meth:`DecodeCost.from_report` reads. Without a report the
decoder uses a table measured here for the device and kernel (:func:`default_cost`): they differ by
an order of magnitude (a GPU verifies 16 tokens for about the price of one; one CPU core pays 1.6
steps for 8), so a draft sized for one is wrong on the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kangaroo_lit.errors import ConfigError


@dataclass(frozen=True)
class DecodeCost:
    """Costs relative to one plain decoding step.

    Attributes:
        draft_step: ``c``, one draft-path step (its one-token form; a step over a few tree nodes costs
            about the same on both CPU and GPU at these sizes).
        verify: ``{k: v_k}`` for the pass over ``k`` tokens; other ``k`` are interpolated linearly
            (extrapolated from the last two points beyond the table; ``v_1`` is 1 unless given).
        source: where the figures come from (a report's path, or the built-in table's name).
    """

    draft_step: float
    verify: dict[int, float] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.draft_step >= 0:
            raise ConfigError(f"cost model: draft step cost must be >= 0, got {self.draft_step}")
        bad = {k: v for k, v in self.verify.items() if int(k) < 1 or not v > 0}
        if bad:
            raise ConfigError(f"cost model: verification costs need k >= 1 and v_k > 0, got {bad}")

    def verify_cost(self, k: int) -> float:
        """``v_k``: the verification pass over ``k >= 1`` tokens, in plain steps."""
        table = {1: 1.0, **{int(key): float(value) for key, value in self.verify.items()}}
        if k in table:
            return table[k]
        ks = sorted(table)
        below = [x for x in ks if x < k]
        above = [x for x in ks if x > k]
        if below and above:
            lo, hi = below[-1], above[0]
        elif len(ks) >= 2:  # beyond the table: the last (or first) two points' slope
            lo, hi = (ks[-2], ks[-1]) if below else (ks[0], ks[1])
        else:
            return table[ks[0]]
        slope = (table[hi] - table[lo]) / (hi - lo)
        return max(table[lo] + slope * (k - lo), 1e-6)

    @classmethod
    def from_report(cls, path: str | Path, exit_layer: int) -> DecodeCost:
        """Read ``c`` and ``v_k`` of ``exit_layer`` from a ``bench cost_model`` JSON report.

        Raises:
            ConfigError: the file is missing, not such a report, or has no entry for ``exit_layer``.
        """
        path = Path(path)
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"cost model {path}: cannot read it as a bench cost_model report ({err})") from None
        layers = report.get("layers") if isinstance(report, dict) else None
        if not isinstance(layers, list):
            raise ConfigError(f"cost model {path}: no 'layers' list; write one with "
                              "`kangaroo-lit bench cost_model --out_dir DIR` (decode_cost_*.json)")
        for entry in layers:
            if entry.get("exit_layer") == exit_layer:
                return cls(draft_step=float(entry["c"]), verify={int(k): float(v) for k, v in entry["v"].items()},
                           source=str(path))
        found = sorted(entry.get("exit_layer") for entry in layers)
        raise ConfigError(f"cost model {path} has exit layers {found}, not the draft's {exit_layer}; "
                          f"measure it: kangaroo-lit bench cost_model --exit_layer {exit_layer} --out_dir DIR")


# Built-in tables (BENCHMARKS.md). CPU: SmolLM2-135M-Instruct, exit layer 1, 1 idle CPU thread, context
# 128, measured with the streaming kernel (draft head K = 8192); with F.linear v_k was measured, c is the
# full-head draft step of the same table. GPU: the Llama-2-7B shape's raw PyTorch reference of the cost
# issue (c = 0.095 + the adapter, v = 1.1 up to 8 tokens); the 64-token figure is assumed (EAGLE-2
# verifies ~60-token trees for about a step), not measured here. A loaded CPU core pays far more for
# wide passes (8 tokens: 2.5 steps with both cores busy): measure with bench cost_model where you decode.
CPU_STREAMING = DecodeCost(draft_step=0.126, verify={1: 0.93, 2: 1.03, 3: 1.15, 4: 1.20, 5: 1.25, 8: 1.61},
                           source="built-in: CPU, streaming kernel (SmolLM2-135M, 1 thread)")
CPU_EAGER = DecodeCost(draft_step=0.21, verify={2: 1.58, 4: 1.82, 7: 2.08, 8: 1.98},
                       source="built-in: CPU, F.linear (SmolLM2-135M, 1 thread)")
GPU = DecodeCost(draft_step=0.1, verify={2: 1.1, 8: 1.1, 64: 1.3},
                 source="built-in: GPU (Llama-2-7B shape reference; 64 tokens assumed)")


BUILTIN = {"cpu_streaming": CPU_STREAMING, "cpu_eager": CPU_EAGER, "gpu": GPU}


def default_cost(device_type: str, kernel: str = "eager") -> DecodeCost:
    """The built-in table for a device type (``"cpu"``, ``"cuda"``, ...) and kernel."""
    if device_type != "cpu":
        return GPU
    return CPU_STREAMING if kernel == "streaming" else CPU_EAGER


def load_cost(spec: str, exit_layer: int) -> DecodeCost:
    """``builtin:cpu_streaming|cpu_eager|gpu``, or the path of a ``bench cost_model`` report (its ``exit_layer``).

    Raises:
        ConfigError: an unknown built-in name, or a report that cannot be read or lacks the exit layer.
    """
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise ConfigError(f"cost {spec!r}: the built-in tables are {', '.join('builtin:' + n for n in BUILTIN)}")
        return BUILTIN[name]
    return DecodeCost.from_report(spec, exit_layer)
