#!/usr/bin/env bash
# The speed goals on one GPU, Llama-2-7B shape (random weights, bf16, synthetic GSM8K-length rows), in
# at most 8 minutes, ending with a block of `goal | measured` lines:
#   1. LoRA r=8: ours (packed batches, flex_attention, compiled layers, Liger; best of batch 8/16/32 and a
#      16k-token budget) against hf-grouped, hf-flat and recipes, each at its best of batch 8/16/32;
#   2. full fine-tune: ours alone, batch 16 and an 8k-token budget (MFU only).
#
#   PYTHONPATH=. bash bench/gpu_speed.sh      # on the GPU machine, from the repository root
#   bash bench/gpu_speed.sh --smoke-test      # CPU smoke test of the same stages on random:tiny (~2 min)
#
# Liger: imported if installed; else installed from a wheel in $WHEELS (default shared/wheels, then
# bench/wheels) into a temporary folder; else ours runs without it and the log says so.
# Knobs (env): OUT (logs), OURS_SET (spec fields for ours, space-separated),
# CONTENDERS (default "ours ours-budget hf-grouped hf-flat recipes"; add hf-trainer for all of them).
set -uo pipefail
source "$(dirname "$0")/smoke_flag.sh"
cd "$(dirname "$0")/.." || exit
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error \
    PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
DIR=${OUT:-$(mktemp -d /tmp/gpu-speed-XXXXXX)}
mkdir -p "$DIR"
STARTED=$(date +%s)
read -r -a CONTENDERS <<< "${CONTENDERS:-ours ours-budget hf-grouped hf-flat recipes}"

if $SMOKE; then
    COMMON=(--model random:tiny --data synthetic --examples 64 --warmup-steps 1)
    LORA=(--batches 4 8 --max-tokens 1024 --seconds 1 --rounds 1)
    FULL=(--batches 8 --max-tokens 1024 --seconds 1 --rounds 1)
    LIMITS=(150 90)
    DEFAULT_OURS_SET=""
else
    COMMON=(--model random:llama-2-7b --data synthetic --examples 4000 --warmup-steps 2)
    LORA=(--batches 8 16 32 --max-tokens 16384 --seconds 6 --rounds 1)
    FULL=(--batches 16 --max-tokens 8192 --seconds 8 --rounds 1)
    LIMITS=(330 130)
    DEFAULT_OURS_SET="model.attn_implementation=flex_attention model.kernels=liger"
fi
read -r -a OURS_FIELDS <<< "${OURS_SET-$DEFAULT_OURS_SET}"

if [[ " ${OURS_FIELDS[*]} " == *" model.kernels=liger "* ]] && ! "$PY" -c "import liger_kernel" 2>/dev/null; then
    WHEEL=$(ls "${WHEELS:-shared/wheels}"/liger_kernel-*.whl bench/wheels/liger_kernel-*.whl 2>/dev/null | head -1)
    if [ -n "$WHEEL" ] && "$PY" -m pip install -q --no-deps --no-index --target "$DIR/site" "$WHEEL"; then
        export PYTHONPATH="$PYTHONPATH:$DIR/site"
        echo "liger-kernel installed from $WHEEL"
    else
        echo "liger-kernel: not installed and no wheel found; ours runs without model.kernels=liger"
        OURS_FIELDS=("${OURS_FIELDS[@]/model.kernels=liger/}")
    fi
fi
OURS_ARGS=()
for field in "${OURS_FIELDS[@]}"; do [ -n "$field" ] && OURS_ARGS+=(--ours-set "$field"); done

speed() {  # speed NAME LIMIT_S ARGS...: throughput.py --json into $DIR/NAME.json, progress into $DIR/NAME.log
    local name=$1 limit=$2 begin
    shift 2
    begin=$(date +%s)
    echo -e "\n=== $name (limit ${limit} s, $(( begin - STARTED )) s in)"
    timeout --kill-after=10 "$limit" "$PY" bench/throughput.py "${COMMON[@]}" "$@" --json \
        > "$DIR/$name.json" 2> >(tee "$DIR/$name.log" >&2)
    echo "$name: exit $? after $(( $(date +%s) - begin )) s"
}

speed lora "${LIMITS[0]}" "${LORA[@]}" --only "${CONTENDERS[@]}" "${OURS_ARGS[@]}"
speed full "${LIMITS[1]}" "${FULL[@]}" --full --only ours ours-budget "${OURS_ARGS[@]}"

echo -e "\n=== $(( $(date +%s) - STARTED )) s in all; logs in $DIR; ours with: ${OURS_FIELDS[*]:-defaults}"
"$PY" - "$DIR" <<'EOF'
import json, sys
from pathlib import Path

def load(name):
    try:
        return json.loads((Path(sys.argv[1]) / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}

def best_mfu(result):
    mfu = {k: v for k, v in result.get("mfu", {}).items() if k.startswith("ours")}
    if not mfu:
        return "not measured (no GPU: no MFU)" if result else "not measured (the stage failed: see its log)"
    name = max(mfu, key=mfu.get)
    return f"{100 * mfu[name]:.1f}% ({name}, {result[name]:,.0f} real tok/s)"

lora, full = load("lora"), load("full")
ratio = lora.get("ratio_vs_strongest")
best = lora.get("best", {})
strongest = max((f for f in best if f != "ours"), key=lambda f: lora[best[f]], default=None)
print("goal | measured")
print(f"LoRA MFU >= 50% | {best_mfu(lora)}")
print(f"full fine-tune MFU >= 55% | {best_mfu(full)}")
print(f"ours / strongest contender, each at its best >= 1.5x | "
      + (f"{ratio:.2f}x ({best.get('ours')} vs {best.get(strongest)})" if ratio else "not measured"))
EOF
