#!/usr/bin/env bash
# The GPU acceptance run: the whole search on a GPU node that reaches no package index, at most 8 minutes.
# Every stage ends with `STAGE: GOAL | measured: FIGURES -> met / NOT met / n/a` lines (bench/acceptance.py).
#
#   install  the wheels carried in .whl/*/ (tune-llama wheelhouse, split in two transfers: bench/README.md)
#            into $WHEELS_SITE (/tmp/wheels-site) with pip --no-index --no-deps --target; put on PYTHONPATH
#   speed    bench/gpu_speed.sh (throughput and MFU goals), when present
#   a        trials per GPU: bench/concurrency.py --gpu-shares 1 0.5 0.25, ~1B random Llama (TinyLlama shape)
#            with LoRA; goal 4 trials/GPU >= 2.5x the trial-steps/h of one; per-trial peak memory
#   b        kill and resume: SIGKILL a GPU search after its first checkpoints, --resume; every trial ends,
#            no checkpointed trial restarts
#   c        QLoRA 4-bit and adamw_8bit steps on CUDA: the loss falls; peak memory vs bf16 LoRA
#   d        export b's search and evaluate it on the GPU (--calculator); batched greedy generation
#            problems/s vs plain model.generate on the same prompts, goal >= 1x
#   e        OOM: a trial whose batch cannot fit halves and goes on, or errors with one line naming the field;
#            the others go on; the search exits 0, or 3 with the errored trial named
#
#   bash bench/gpu_check.sh                      # on the GPU machine, from the repository root
#   STAGES=install bash bench/gpu_check.sh       # first call: only install the first transfer's wheels
#   STAGES="a b" bash bench/gpu_check.sh         # some stages
#   bash bench/gpu_check.sh --smoke-test         # CPU smoke test: random:tiny, small searches; c needs CUDA
#                                                # (n/a), e injects the OOM (TUNE_LLAMA_OOM_ABOVE_ROWS)
#   STAGES="throughput checkpoint memory" ...    # the earlier loop-level benches on the Llama-2-7B shape (~10 min;
#                                                # not in the default run)
# Synthetic GSM8K-style data (no download); a hard timeout per stage; logs in $OUT (else a temporary folder).
set -uo pipefail
source "$(dirname "$0")/smoke_flag.sh"
cd "$(dirname "$0")/.." || exit 1
SITE=${WHEELS_SITE:-/tmp/wheels-site}
export PYTHONPATH=".:$SITE${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error \
    PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1 PATH="$SITE/bin:$PATH"
PY=${PYTHON:-python3}
DIR=$(realpath -m "${OUT:-$(mktemp -d /tmp/gpu-check-XXXXXX)}")
STAGES=" ${STAGES:-install speed a b c d e} "
mkdir -p "$DIR"
: > "$DIR/stages.txt"
STARTED=$(date +%s)
ACCEPT=("$PY" bench/acceptance.py)

if $SMOKE; then
    # Each stage's own --smoke-test: random:tiny and small searches (bench/acceptance.py's SMOKE_SETS: b kills
    # one of two trials side by side mid-epoch, as tests/integration/test_fault_injection.py does; e injects
    # the OOM above 8 rows, no GPU to fill).
    DEVICE=auto
    SPEED=(--smoke-test)
    A=(--smoke-test)
    A_GOAL=()
    B=(--smoke-test)
    C=(--smoke-test)
    D=(--smoke-test)
    E=(--smoke-test)
    LIMITS=(10 60 240 300 30 300 300)  # a loaded 2-core box: b, d and e take 2-5 min
    LOOP=(--smoke-test)
    THROUGHPUT=() CHECKPOINT=() MEMORY=()
else
    DEVICE=cuda
    SPEED=()
    D=()
    GPU=(--set model.dtype=bfloat16 --set training.precision=bf16 --set model.lora.enabled=true
         --set training.device=cuda)
    A=(--gpu-shares 1 0.5 0.25 --trials 4 --set model.name=random:tinyllama-1.1b "${GPU[@]}"
       --set data.synthetic_size=528 --set data.batch_size=8)
    A_GOAL=(--gpu)
    B=(--set model.name=random:smollm2-135m "${GPU[@]}" --set search.num_samples=4 --set search.max_concurrent=4
       --set search.resources.gpu=0.25 --set training.epochs=2 --set training.eval_every=0.25
       --set search.asha.grace_period=2 --set data.synthetic_size=1000)
    C=(--model random:tinyllama-1.1b --data synthetic --examples 256 --batch-size 8 --max-length 512)
    # 1024 rows of ~200 tokens through a 30-layer model: far beyond 141 GiB of activations. One trial at a
    # time, so the one that cannot fit never takes the others' memory.
    E=(--set model.name=random:smollm2-135m "${GPU[@]}" --set data.synthetic_size=1100
       --set search.resources.gpu=1
       --set "search.space={data.batch_size: {choice: [8, 1024]}, training.lr: {loguniform: [1.0e-4, 1.0e-3]}}")
    LIMITS=(60 240 240 120 120 90 120)
    LOOP=(--model random:llama-2-7b --data synthetic --batch-size 8)
    THROUGHPUT=(--seconds 10 --rounds 2 --max-tokens 4096)
    CHECKPOINT=(--full-optimizer "${CKPT_FULL_OPT:-sgd}" --epoch-tokens 1393000)  # a GSM8K train epoch
    MEMORY=(--budget-s 15)
fi

want() { [[ "$STAGES" == *" $1 "* ]]; }

stage() {  # stage NAME LIMIT_S COMMAND...: run with a hard timeout, log to $DIR/NAME.log, record the status
    local name=$1 limit=$2 begin
    shift 2
    begin=$(date +%s)
    echo -e "\n=== $name (limit ${limit} s, $(( begin - STARTED )) s into the check)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$DIR/$name.log"
    echo "$name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - begin )) s" | tee -a "$DIR/stages.txt"
}

if want install; then
    shopt -s nullglob
    wheels=()
    for wheel in .whl/*/*.whl; do  # skip what an earlier call installed (a warm machine keeps /tmp)
        name_version=$(basename "$wheel" | cut -d- -f1-2)
        [ -d "$SITE/$name_version.dist-info" ] || wheels+=("$wheel")
    done
    if [ ${#wheels[@]} -gt 0 ]; then
        stage install "${LIMITS[0]}" "$PY" -m pip install -q --no-index --no-deps --target "$SITE" \
            --disable-pip-version-check "${wheels[@]}"
    else
        echo "install: no wheels in .whl/*/ to install (none carried, or installed by an earlier call)"
    fi
    stage environment 120 "$PY" -c "
import ray, optuna, torch, transformers, peft, tune_llama, importlib.util as u
print('ray', ray.__version__, 'from', ray.__file__, '| optuna', optuna.__version__, '| torch', torch.__version__,
      '| transformers', transformers.__version__, '| peft', peft.__version__,
      '| bitsandbytes', 'yes' if u.find_spec('bitsandbytes') else 'no', '| cuda', torch.cuda.is_available())"
fi
if want speed; then
    if [ -x bench/gpu_speed.sh ]; then
        stage speed "${LIMITS[1]}" bash bench/gpu_speed.sh "${SPEED[@]}"
    else
        echo "speed: throughput/MFU goals | measured: bench/gpu_speed.sh not here -> n/a"
    fi
fi
if want a; then
    stage a "${LIMITS[2]}" bash -c '"$@" > "'"$DIR"'/a.json"' _ "$PY" bench/concurrency.py search_spaces/tiny.yaml \
        --json "${A[@]}"
    "${ACCEPT[@]}" concurrency-goal "$DIR/a.json" "${A_GOAL[@]}" | tee -a "$DIR/a.log"
fi
if want b; then
    rm -rf "$DIR/b"
    stage b "${LIMITS[3]}" "${ACCEPT[@]}" kill-resume search_spaces/tiny.yaml --storage "$DIR/b" "${B[@]}"
fi
if want c; then
    stage c "${LIMITS[4]}" "${ACCEPT[@]}" quantized "${C[@]}"
fi
if want d; then
    if [ -d "$DIR/b/killed" ]; then
        rm -rf "$DIR/d"
        stage d "${LIMITS[5]}" bash -c 'set -e
            "$1" -m tune_llama export "$2/b/killed" --out "$2/d/export"
            "$1" -m tune_llama evaluate "$2/d/export" --data synthetic --limit 64 --calculator --device "$3" \
                --out "$2/d/eval.jsonl"
            "$1" bench/acceptance.py generate "$2/d/export" --limit 64 "${@:4}"' _ "$PY" "$DIR" "$DEVICE" "${D[@]}"
    else
        echo "d. export + evaluate | measured: no search from stage b in $DIR -> n/a"
    fi
fi
if want e; then
    rm -rf "$DIR/e"
    stage e "${LIMITS[6]}" "${ACCEPT[@]}" oom search_spaces/tiny.yaml --storage "$DIR/e" --set training.epochs=1 \
        --set training.eval_every=1 --set search.num_samples=4 --set search.max_concurrent=1 \
        --set search.sampler=random --set search.max_failures=0 "${E[@]}"
fi
want throughput && stage throughput 420 "$PY" bench/throughput.py "${LOOP[@]}" "${THROUGHPUT[@]}"
want checkpoint && stage checkpoint 120 "$PY" bench/checkpoint.py "${LOOP[@]}" "${CHECKPOINT[@]}"
want memory && stage memory 180 "$PY" bench/memory.py "${LOOP[@]}" "${MEMORY[@]}"
echo -e "\n=== $(( $(date +%s) - STARTED )) s in all; logs in $DIR"
cat "$DIR/stages.txt"
echo "--- goals"
cat "$DIR"/*.log 2>/dev/null | grep -E '^(speed|[a-e]\.).*\| measured' || true
