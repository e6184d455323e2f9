#!/usr/bin/env bash
# BENCHMARKS.md's GPU numbers in one run: DiffVQA generation in bf16 + SDPA (the card's naive loop, the dynamic
# cache, the static cache compiled with CUDA graphs), the ViT-L/14 encoder and captioning model, and training
# throughput of the DiffVQA, captioning and detection heads.
#
#     bash benchmarks/gpu.sh OUT_DIR      # Markdown tables and JSON under OUT_DIR
#     PYTHON=.venv/bin/python bash benchmarks/gpu.sh OUT_DIR   # another interpreter than python3
set -uo pipefail  # not -e: a failing benchmark must not lose the others' numbers
# LAPVQA_BENCH_TIMEOUT: seconds each benchmark may take (default 240); the compiled ones come last.
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
python=$(command -v "${PYTHON:-python3}") || { echo "no ${PYTHON:-python3} on PATH" >&2; exit 1; }
python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"  # absolute (the script changes directory), links kept
mkdir -p "$out"
cd "$(dirname "$0")"
run() {  # run NAME ARGS...: one benchmark, its table in OUT_DIR/NAME.md
    local name=$1
    shift
    echo "== $name: python $*"
    timeout "${LAPVQA_BENCH_TIMEOUT:-240}" "$python" "$@" 2>"$out/$name.err" | tee "$out/$name.md"
    tail -n 3 "$out/$name.err"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
# Importing lapvqa_hf refuses a transformers release below the package's floor: stop here rather than measure on it.
"$python" -c "import lapvqa_hf, torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
run generate-dynamic generate.py --device cuda --dtype bfloat16 --batch-sizes 1,8,64,256 --modes dynamic --repeats 5 --json "$out/generate-dynamic.json"
run generate-fast-greedy generate.py --device cuda --dtype bfloat16 --batch-sizes 1,8,64,256 --modes fast-greedy --repeats 5 --json "$out/generate-fast-greedy.json"
run generate-naive generate.py --device cuda --dtype bfloat16 --batch-sizes 1,8 --modes naive --repeats 1
run encode encode.py --device cuda --dtype bfloat16 --image-sizes 224,378 --batch-sizes 1,64,256 --caption-batch-sizes 1,64,256 --repeats 3
for task in diffvqa captioning detection; do
    run "train-$task" train.py --task "$task" --device cuda --dtype bfloat16 --batch-sizes 32,128 --steps 10
done
run answer answer.py --device cuda --dtype bfloat16 --rows 64 --batch-size 32
run generate-static generate.py --device cuda --dtype bfloat16 --batch-sizes 1,256 --modes static-compiled --repeats 5 --json "$out/generate-static.json"
run encode-compiled encode.py --device cuda --dtype bfloat16 --compile --image-sizes 224 --batch-sizes 64,256 --caption-batch-sizes 64 --repeats 5
