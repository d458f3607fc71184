#!/usr/bin/env bash
# Draft agreement against training-set size and adapter capacity on SmolLM2-135M-Instruct, one held-out set.
#   bash scripts/bench/smollm2_data_sweep.sh data/self_instruct/smollm2-135m-instruct/answers.jsonl.gz
# The first 60 answers are held out; drafts train on the next 169 / 338 / 676 (configs/smollm2.yaml, 4 epochs,
# 1 thread each) and are validated on the held-out ones. Results: runs/smollm2/sweep/<name>.val.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
SOURCE=${1:?answers file (.jsonl or .jsonl.gz)}
mkdir -p runs/smollm2/data runs/smollm2/sweep
.venv/bin/python - "$SOURCE" <<'PY'
import gzip, sys
path = sys.argv[1]
opener = gzip.open if path.endswith(".gz") else open
rows = [line for line in opener(path, "rt") if line.strip()]
if len(rows) < 736:
    sys.exit(f"{path} has {len(rows)} answers; the sweep needs 736")
for name, part in (("si-heldout", rows[:60]), ("si-train-169", rows[60:229]), ("si-train-338", rows[60:398]),
                   ("si-train-676", rows[60:736])):
    with gzip.open(f"runs/smollm2/data/{name}.jsonl.gz", "wt") as f:
        f.writelines(part)
PY
run() {  # name, training file, extra fit arguments
  .venv/bin/kangaroo-lit fit --config configs/smollm2.yaml --data.data_path "runs/smollm2/data/$2.jsonl.gz" \
    --data.val_fraction 0.0 --data.test_fraction 0.0 --trainer.default_root_dir "runs/smollm2/sweep/$1" \
    --trainer.max_epochs 4 --threads 1 "${@:3}" > "runs/smollm2/sweep/$1.fit.log" 2>&1
  .venv/bin/kangaroo-lit validate --config "runs/smollm2/sweep/$1/lightning_logs/version_0/config.yaml" \
    --data.data_path runs/smollm2/data/si-heldout.jsonl.gz --data.val_fraction 0.9 --data.test_fraction 0.0 \
    --ckpt_path "runs/smollm2/sweep/$1/checkpoints/last.ckpt" --trainer.default_root_dir "runs/smollm2/sweep/$1-val" \
    --threads 1 > "runs/smollm2/sweep/$1.val.log" 2>&1
}
run ce-169 si-train-169
run ce-338 si-train-338
run ce-676 si-train-676
run mlp1536-676 si-train-676 --model.draft.adapter_mlp 1536
