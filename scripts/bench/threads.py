"""CPU threads for batch-1 decoding: 1 thread, every core, and the project's rule, on an idle machine and
with one core kept busy by another process. Plain greedy decoding of the verifying model (the vanilla
loop), the same prompt, each setting repeated; tokens/s per repeat, so a spread shows.

    python scripts/bench/threads.py --base_model model:smollm2-135m-instruct --repeats 3 --max_new_tokens 64

Stop other jobs first (``kill -STOP <pid>``, then ``kill -CONT``): "idle" must be idle. The "loaded"
condition starts its own busy process (one spinning core) and stops it afterwards.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time


def spin() -> None:
    while True:
        pass


def decode_speed(model, ids, max_new_tokens: int, threads: int) -> float:
    import torch

    from kangaroo_lit.decoding import VanillaDecoder

    torch.set_num_threads(threads)
    result = VanillaDecoder(model).generate(ids, max_new_tokens)
    return result.tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="model:smollm2-135m-instruct")
    parser.add_argument("--exit_layer", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from kangaroo_lit.architectures import load_base_model
    from kangaroo_lit.embedded import resolve_path
    from kangaroo_lit.model import KangarooModel
    from kangaroo_lit.threads import choose_threads, cpu_cores

    path = resolve_path(args.base_model)
    tok = AutoTokenizer.from_pretrained(path)
    model = KangarooModel(load_base_model(path, "float32"), args.exit_layer).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    ids = tok("The history of the printing press begins", return_tensors="pt").input_ids
    cores = cpu_cores()
    decode_speed(model, ids, 8, 1)  # warm-up
    rows = []
    for condition in ("idle", "one core busy"):
        busy = None
        if condition != "idle":
            busy = multiprocessing.Process(target=spin, daemon=True)
            busy.start()
            time.sleep(65)  # let the 1-minute load average see it, as the rule reads it
        try:
            rule = choose_threads(params)
            for name, threads in (("1 thread", 1), (f"every core ({cores})", cores), (f"the rule ({rule})", rule)):
                speeds = [decode_speed(model, ids, args.max_new_tokens, threads) for _ in range(args.repeats)]
                rows.append({"condition": condition, "setting": name, "threads": threads, "tokens_per_s": speeds,
                             "load_average": os.getloadavg()[0]})
                print(f"{condition:14s} {name:16s} " + " ".join(f"{s:6.1f}" for s in speeds) + " tokens/s",
                      flush=True)
        finally:
            if busy is not None:
                busy.terminate()
    torch.set_num_threads(1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cores": cores, "model": args.base_model, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
