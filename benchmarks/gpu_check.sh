#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build exaone_ext with its CUDA kernels against the torch
# already installed, run the test suite (the CUDA variants run because a device is present), then
# the benchmarks on the GPU. Results go to ${OUT:-out}/ (logs and a JSON of every benchmark row).
#
#   OUT=out bash benchmarks/gpu_check.sh [pytest -k expression for the benchmarks]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
ARCH=$($PY -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}{p.minor}')")
echo "GPU: $($PY -c 'import torch; print(torch.cuda.get_device_name(0))') (sm_$ARCH), torch $($PY -c 'import torch; print(torch.__version__)')" | tee "$OUT/summary.txt"

start=$(date +%s)
EXAONE_EXT_CUDA=ON EXAONE_EXT_CUDA_ARCHS="$ARCH" MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16 \
  $PY -m pip install -q --no-build-isolation --no-deps --config-settings=build-dir=build/gpu . > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
[ $rc = 0 ] || { tail -50 "$OUT/build.log"; exit 1; }
(cd /tmp && $PY -c "import exaone_ext, json; print(json.dumps(exaone_ext.build_info()))") | tee -a "$OUT/summary.txt"

# The CUDA tests first (ids with "cuda"; each file bounded in time, no -x: the whole picture in one
# run), then everything else once.
for t in tests/test_attention_cuda.py tests/test_swiglu.py tests/test_rms_norm.py tests/test_rope.py \
         tests/test_linear.py tests/test_linear_cross_entropy.py tests/test_quant.py tests/test_attention.py tests/test_compile.py \
         tests/test_model.py tests/test_engine.py; do
  timeout 240 $PY -m pytest -q "$t" -p no:cacheprovider -k cuda > "$OUT/$(basename "$t" .py).log" 2>&1
  echo "$t rc=$? : $(tail -1 "$OUT/$(basename "$t" .py).log")" | tee -a "$OUT/summary.txt"
done
timeout 300 $PY -m pytest -q tests -p no:cacheprovider -k "not cuda" > "$OUT/tests.log" 2>&1
echo "all tests rc=$? : $(tail -1 "$OUT/tests.log")" | tee -a "$OUT/summary.txt"

# EXAONE_BENCH_LONG=1: attention also at seq 8192 (the H200 targets are stated there).
EXAONE_BENCH_LONG=${EXAONE_BENCH_LONG:-1} EXAONE_BENCH_JSON="$OUT/bench.json" timeout ${BENCH_TIMEOUT:-300} \
  $PY -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-min-rounds=10 --benchmark-max-time=0.5 ${1:+-k "$1"} > "$OUT/bench.log" 2>&1
echo "benchmarks rc=$?" | tee -a "$OUT/summary.txt"
sed -n '/rates and speed-ups/,/^---/p' "$OUT/bench.log" | tee -a "$OUT/summary.txt"

# Fused linear + cross-entropy at the training shape: peak memory and time against the unfused loss.
timeout 240 $PY benchmarks/bench_linear_cross_entropy.py --tokens 8192 --vocab 102400 --hidden 2560 \
  > "$OUT/bench_linear_cross_entropy.log" 2>&1
echo "bench_linear_cross_entropy rc=$?" | tee -a "$OUT/summary.txt"
tail -5 "$OUT/bench_linear_cross_entropy.log" | tee -a "$OUT/summary.txt"

# The whole model on the GPU against transformers on the same weights (decode, prefill 2048, batch 8).
timeout ${MODEL_TIMEOUT:-240} $PY benchmarks/bench_model.py --device cuda --layers 30 --prompt 128 --decode 64 \
  --prefill 2048 --batch 8 --repeat 3 --json "$OUT/bench_model.json" > "$OUT/bench_model.log" 2>&1
echo "bench_model rc=$?" | tee -a "$OUT/summary.txt"
grep -v Warning "$OUT/bench_model.log" | tail -12 | tee -a "$OUT/summary.txt"

# The server (continuous batching, CUDA graphs) at 1 / 8 / 32 clients, then the Engine alone.
timeout ${SERVER_TIMEOUT:-150} $PY benchmarks/bench_server.py --device cuda --layers 30 --levels 1,8,32 \
  --prompt-tokens 32 --max-tokens 32 --seconds 6 --engine > "$OUT/bench_server.log" 2>&1
echo "bench_server rc=$?" | tee -a "$OUT/summary.txt"
tail -12 "$OUT/bench_server.log" | tee -a "$OUT/summary.txt"

# Training tokens/s against transformers (bf16 autocast on both sides).
timeout ${TRAIN_TIMEOUT:-150} $PY benchmarks/bench_training.py --device cuda --bf16 --steps 5 --rounds 1 \
  > "$OUT/bench_training.log" 2>&1
echo "bench_training rc=$?" | tee -a "$OUT/summary.txt"
tail -6 "$OUT/bench_training.log" | tee -a "$OUT/summary.txt"
