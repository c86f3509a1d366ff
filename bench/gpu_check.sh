#!/usr/bin/env bash
# The loop-level benches on a GPU, Llama-2-7B shape (random weights, bf16), in about 14 minutes: the speed
# goals (bench/gpu_speed.sh: LoRA and full fine-tune MFU, ours against the HF Trainer variants and a
# llama-recipes-style loop, each at its best batch; at most 8 minutes, ends with `goal | measured` lines),
# checkpoint cost (save_state), and the largest batch per training mode. The GPU image has no ray/optuna/wandb: startup.py and
# search_efficiency.py are CPU-side benches.
#
#   PYTHONPATH=. bash bench/gpu_check.sh      # on the GPU machine, from the repository root
#   SHAPE=tiny bash bench/gpu_check.sh        # CPU smoke test of the same stages on random:tiny (~3 min)
#
# Synthetic GSM8K data (no download); a hard timeout per stage; logs in $OUT (else a temporary folder).
# Knobs (env): SHAPE=7b|tiny, CKPT_FULL_OPT=sgd|adamw (a 7B AdamW checkpoint is ~40 GB).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error \
    PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
DIR=${OUT:-$(mktemp -d /tmp/gpu-check-XXXXXX)}
mkdir -p "$DIR"
: > "$DIR/stages.txt"
STARTED=$(date +%s)
if [ "${SHAPE:-7b}" = tiny ]; then
    COMMON=(--model random:tiny --data synthetic --examples 64 --batch-size 4)
    CHECKPOINT=(--steps 2)
    MEMORY=(--cpu-smoke --max-batch 4 --max-length 64)
    LIMITS=(60 240 90 90)  # environment, speed, checkpoint, memory
else
    COMMON=(--model random:llama-2-7b --data synthetic --batch-size 8)
    CHECKPOINT=(--full-optimizer "${CKPT_FULL_OPT:-sgd}" --epoch-tokens 1393000)  # a GSM8K train epoch
    MEMORY=(--budget-s 15)
    LIMITS=(60 500 120 180)
fi

stage() {  # stage NAME LIMIT_S COMMAND...: run with a hard timeout, log to $DIR/NAME.log, record the status
    local name=$1 limit=$2 begin
    shift 2
    begin=$(date +%s)
    echo -e "\n=== $name (limit ${limit} s, $(( begin - STARTED )) s into the check)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$DIR/$name.log"
    echo "$name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - begin )) s" | tee -a "$DIR/stages.txt"
}

stage environment "${LIMITS[0]}" "$PY" - <<'EOF'
import importlib.util, shutil, sys
for name in ["ray", "optuna", "wandb", "datasets", "gguf", "pydantic", "bitsandbytes"]:
    sys.modules[name] = None  # the loop must import without them (the GPU image lacks them)
import torch, transformers, peft
import tune_llama.loop, tune_llama.data, tune_llama.model
print(f"tune_llama.loop imports without ray/optuna/wandb/datasets/bitsandbytes; torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, "
      f"accelerate {'yes' if importlib.util.find_spec('accelerate') else 'no (HF Trainer contenders skipped)'}")
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"cuda: {torch.cuda.get_device_name(0)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
print(f"disk free in /tmp: {shutil.disk_usage('/tmp').free / 2**30:.1f} GiB")
EOF
OUT="$DIR/speed" stage speed "${LIMITS[1]}" bash bench/gpu_speed.sh
stage checkpoint "${LIMITS[2]}" "$PY" bench/checkpoint.py "${COMMON[@]}" "${CHECKPOINT[@]}"
stage memory "${LIMITS[3]}" "$PY" bench/memory.py "${COMMON[@]}" "${MEMORY[@]}"
echo -e "\n=== $(( $(date +%s) - STARTED )) s in all; logs in $DIR"
cat "$DIR/stages.txt"
