#!/usr/bin/env bash
# One GPU check of the performance figures (bench/README.md), on the Llama-2-7B shape (random weights, bf16),
# in about 6-7 minutes: throughput against HF Trainer and a llama-recipes-style loop, our loop at batch 1/8/16
# (LoRA and full fine-tune, seq 512), checkpoint cost (save_state alone: the GPU image has no ray), and the
# largest batch per training mode.
#
#   PYTHONPATH=. bash bench/gpu_check.sh          # on the GPU machine, from the repository root
#   SHAPE=tiny bash bench/gpu_check.sh            # CPU smoke test of the same stages on random:tiny (~5 min)
#
# Installs nothing; needs python3 with torch, transformers, peft, safetensors, pyyaml, tqdm, numpy (accelerate
# for the HF Trainer baseline). No ray/optuna/wandb/datasets/bitsandbytes. Data: the synthetic GSM8K generator
# with the built-in character tokenizer (no download). Every python stage has a hard `timeout`; results and logs
# go to $OUT (else a temporary folder), and a summary table is printed at the end.
# Knobs (env): SHAPE=7b|tiny, T_ENV, T_THROUGHPUT, T_SWEEP, T_CHECKPOINT, T_MEMORY (stage limits, s),
#              CKPT_FULL_OPT=sgd|adamw (full fine-tune checkpoint: sgd = weights only, 13.5 GB; adamw = +27 GB),
#              COMPILE=1 (adds a torch.compile sweep of LoRA, T_COMPILE=240 s, beyond the 7-minute budget).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
DIR=${OUT:-$(mktemp -d /tmp/gpu-check-XXXXXX)}
mkdir -p "$DIR"
: > "$DIR/stages.txt"
SHAPE=${SHAPE:-7b}
STARTED=$(date +%s)

if [ "$SHAPE" = tiny ]; then
    MODEL=random:tiny
    THROUGHPUT=(--model "$MODEL" --examples 16 --batch-size 4 --warmup-steps 1)
    SWEEP=(--model "$MODEL" --sweep 1,2,4 --sweep-steps 2 --warmup-steps 1)
    CHECKPOINT=(--model "$MODEL" --batch-size 2 --steps 2)
    MEMORY=(--model "$MODEL" --cpu-smoke --max-batch 4 --dtype float32 --precision fp32)
    DEFAULT_LIMITS=(180 240 150 90 150)
else
    MODEL=random:llama-2-7b
    THROUGHPUT=(--model "$MODEL" --examples 128 --batch-size 8 --warmup-steps 3 --rounds 2)  # round 1 is GPU warm-up
    SWEEP=(--model "$MODEL" --sweep 1,8,16 --sweep-steps 5 --warmup-steps 2)
    CHECKPOINT=(--model "$MODEL" --batch-size 8 --steps 3 --full-optimizer "${CKPT_FULL_OPT:-sgd}")
    MEMORY=(--model "$MODEL" --max-batch 256 --mode-budget-s 16)
    DEFAULT_LIMITS=(50 120 80 70 140)
fi

stage() {  # stage NAME LIMIT_S COMMAND...: run with a hard timeout, log to $DIR/NAME.log, record the status
    local name=$1 limit=$2 begin rc
    shift 2
    begin=$(date +%s)
    echo
    echo "=== $name (limit ${limit} s, $(( begin - STARTED )) s into the check)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$DIR/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $(( $(date +%s) - begin )) s"
    echo "$name $rc $(( $(date +%s) - begin ))" >> "$DIR/stages.txt"
}

read -r T0 T1 T2 T3 T4 <<< "${DEFAULT_LIMITS[*]}"
stage environment "${T_ENV:-$T0}" "$PY" - <<'EOF'
import importlib.util, shutil, sys
blocked = ["ray", "optuna", "wandb", "datasets", "gguf", "pydantic", "bitsandbytes"]
for name in blocked:  # the loop must import without them (the GPU image lacks them)
    sys.modules[name] = None
import torch, transformers, peft
import tune_llama.loop, tune_llama.data, tune_llama.model
print(f"import tune_llama.loop with {', '.join(blocked)} blocked: ok")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, accelerate {'yes' if importlib.util.find_spec('accelerate') else 'no'}")
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"cuda: {torch.cuda.get_device_name(0)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
else:
    print("cuda: none (CPU smoke run)")
print(f"disk free in /tmp: {shutil.disk_usage('/tmp').free / 2**30:.1f} GiB")
EOF

stage throughput "${T_THROUGHPUT:-$T1}" "$PY" bench/throughput.py "${THROUGHPUT[@]}" --source synthetic --keep-going \
    --json "$DIR/throughput.json"
stage sweep "${T_SWEEP:-$T2}" "$PY" bench/throughput.py "${SWEEP[@]}" --source synthetic --json "$DIR/sweep.json"
stage checkpoint "${T_CHECKPOINT:-$T3}" "$PY" bench/checkpoint.py "${CHECKPOINT[@]}" --no-ray --source synthetic \
    --json "$DIR/checkpoint.json"
stage memory "${T_MEMORY:-$T4}" "$PY" bench/memory.py "${MEMORY[@]}" --json "$DIR/memory.json"
if [ "${COMPILE:-0}" = 1 ]; then  # optional, beyond the 7-minute budget: torch.compile start-up is minutes on 7B
    # 3 warmup steps: the first shapes and the first new num_items_in_batch value each compile once more
    stage compile "${T_COMPILE:-240}" "$PY" bench/throughput.py "${SWEEP[@]}" --sweep-modes lora --compile \
        --warmup-steps 3 --source synthetic --json "$DIR/compile.json"
fi

echo
echo "================ summary ($(( $(date +%s) - STARTED )) s in all; results in $DIR)"
"$PY" bench/summary.py "$DIR"
