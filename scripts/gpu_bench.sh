#!/usr/bin/env bash
# One command for the GPU figures of the scale issue: speed and memory, bf16, on one NVIDIA GPU.
#
#     bash scripts/gpu_bench.sh                 # writes ./gpu-results (or $OUT) in under ~10 minutes
#     OUT=/tmp/r BUDGET_S=300 bash scripts/gpu_bench.sh
#     bash scripts/gpu_bench.sh --tiny          # a short smoke run of every step (also on a GPU)
#
# Steps, most important first, each under `timeout` with what is left of BUDGET_S (default 540 s,
# so the script ends inside 10 minutes even when a step hangs; a cut step is marked and skipped):
#   1. env.txt: nvidia-smi, torch/CUDA/transformers/kronfluence versions, git revision
#   2. memory.py, GPT-2 small (12 layers, d=768, 512 tokens, batch 8): plain step, fit, score and each
#      pass alone; MLP and all layers
#   3. speed.py, GPT-2 small: tokens/s of fit and score as ratios to forward+backward, kronfluence beside it
#      when it is importable (bash scripts/install_peers.sh; the GPU machine may have no network)
#   4. memory.py, a random ~1.1B Llama (TinyLlama's shape: 22 layers, d=2048, FFN 5632): the passes, MLP
#   5. speed.py on the same Llama, when speed.py has --arch (skipped with a note otherwise)
#   6. speed.py --compile, GPT-2 small: the same rows for torch.compile(model) beside eager
# Without a CUDA device (or with --tiny) every step runs a tiny config, on the CPU without one: that
# is how this script is tested on a machine without a GPU. Needs the repo's .venv (CUDA torch on a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=0
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_bench.sh: unknown argument $arg (use --tiny or --help)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-./gpu-results}"
BUDGET_S="${BUDGET_S:-540}"
mkdir -p "$OUT"
if [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
PY="${PYTHON:-python}"
START=$(date +%s)

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DEVICE=cuda
  DTYPE=bf16
else
  DEVICE=cpu
  DTYPE=fp32
  TINY=1
  echo "no CUDA device: running the tiny config on the CPU (fp32)" | tee "$OUT/NO_GPU.txt"
fi

# memory.py: the whole phases (fit, score: factors included) and the passes alone (what streaming
# capture bounds); the Llama gets the passes only, each of its children fits 66 factors up to 5632^2.
MEM_GPT2="--phases plain,fit,score,cov-pass,lambda-pass,score-pass"
MEM_LLAMA="--modules mlp --phases plain,cov-pass,lambda-pass,score-pass"
if [ "$TINY" = 1 ]; then
  GPT2="--layers 2 --d 64 --tokens 32 --vocab 500"
  LLAMA="--arch llama --layers 2 --d 64 --tokens 32 --vocab 500"
  MEM="--batch-size 2"
  SPEED_GPT2="--train 8 --queries 2 --batch-size 4 --repeats 1"
  SPEED_LLAMA="$SPEED_GPT2"
else
  GPT2="--layers 12 --d 768 --tokens 512 --vocab 50257"
  LLAMA="--arch llama --layers 22 --d 2048 --ffn 5632 --tokens 512 --vocab 32000"
  MEM="--batch-size 8"
  SPEED_GPT2="--train 256 --queries 16 --batch-size 8 --repeats 2"
  SPEED_LLAMA="--train 64 --queries 8 --batch-size 8 --repeats 2"
fi
COMMON="--device $DEVICE --dtype $DTYPE"

SUMMARY="$OUT/summary.md"
{
  echo "# headwater GPU benchmarks"
  echo
  echo "Command: \`bash scripts/gpu_bench.sh $*\` (device $DEVICE, dtype $DTYPE, budget ${BUDGET_S} s)"
  echo
} >"$SUMMARY"

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# step NAME CAP_SECONDS COMMAND...: run under timeout min(CAP, time left), log to $OUT/NAME.txt
step() {
  local name="$1" cap="$2"
  shift 2
  local remaining limit rc t0
  remaining=$(left)
  if [ "$remaining" -lt 20 ]; then
    echo "| $name | skipped: budget spent | - |" >>"$OUT/steps.md"
    return
  fi
  limit=$((cap < remaining ? cap : remaining))
  t0=$(date +%s)
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  local status="ok"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && status="cut at ${limit} s (partial output kept)"
  [ "$rc" != 0 ] && [ "$status" = ok ] && status="failed (exit $rc, see $name.txt)"
  echo "| $name | $status | $(($(date +%s) - t0)) |" >>"$OUT/steps.md"
  {
    echo "## $name"
    echo
    echo "\`$*\` ($status)"
    echo
    grep -E '^(\||#|plain|headwater)' "$OUT/$name.txt" || true
    echo
  } >>"$SUMMARY"
}

echo "| step | status | seconds |" >"$OUT/steps.md"
echo "|---|---|---|" >>"$OUT/steps.md"

{
  date -u
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1 || true
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
for mod in ("transformers", "kronfluence"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as e:  # kronfluence is optional
        print(mod, "not importable:", type(e).__name__)
EOF
} >"$OUT/env.txt" 2>&1
echo "| env | ok | 0 |" >>"$OUT/steps.md"

# shellcheck disable=SC2086  # the configs are word lists on purpose
step memory_gpt2 180 "$PY" benchmarks/memory.py $GPT2 $MEM $MEM_GPT2 $COMMON --json "$OUT/memory_gpt2.json"
# shellcheck disable=SC2086
step speed_gpt2 150 "$PY" benchmarks/speed.py $GPT2 $SPEED_GPT2 $COMMON
# shellcheck disable=SC2086
step memory_llama 150 "$PY" benchmarks/memory.py $LLAMA $MEM $MEM_LLAMA $COMMON --json "$OUT/memory_llama.json"
if "$PY" benchmarks/speed.py --help 2>/dev/null | grep -q -- "--arch"; then
  # shellcheck disable=SC2086
  step speed_llama 240 "$PY" benchmarks/speed.py $LLAMA $SPEED_LLAMA $COMMON
else
  echo "| speed_llama | skipped: benchmarks/speed.py has no --arch option yet | - |" >>"$OUT/steps.md"
fi

# shellcheck disable=SC2086
step speed_gpt2_compile 150 "$PY" benchmarks/speed.py $GPT2 $SPEED_GPT2 $COMMON --compile --no-kronfluence

{
  echo "## steps"
  echo
  cat "$OUT/steps.md"
  echo
  echo "Total: $(($(date +%s) - START)) s. Raw output: $OUT/*.txt, $OUT/*.json; machine: $OUT/env.txt."
} >>"$SUMMARY"
cat "$SUMMARY"
