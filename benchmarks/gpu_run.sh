#!/usr/bin/env bash
# The GPU checks of issue 3, as one script for a lent CUDA machine (it has torch and
# transformers but no network): CUDA equivalence tests, the in-process engine, and
# compare_llm.py on the GPU. Missing pure-Python dependencies travel as wheels in .whl/
# (see docs/benchmarks.md). Every stage has its own deadline; logs and JSON go to $OUT.
set -u
OUT="${OUT:-/tmp/lmaas-gpu}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/lmaas-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/lmaas-site"
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
stage() {  # stage NAME SECONDS CMD...: run CMD under a deadline, log to $OUT/NAME.log
    local name="$1" seconds="$2"
    shift 2
    echo "=== $name ($(date +%T))"
    timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name exit $? ($(date +%T))"
    tail -n "${TAIL:-25}" "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
stage gpu-tests "${T_TESTS:-180}" python3 -m pytest tests/gpu -q -p no:cacheprovider -x --timeout 120 \
    -k "not compiled_stages"
stage engine-inprocess "${T_ENGINE:-90}" python3 benchmarks/engine_inprocess.py --device cuda
# The serving option compile=on (inductor-fused layer stages, fused.py; triton on CUDA): its
# equivalence test, then off vs on interleaved in one process (startup times printed too).
# SKIP_COMPILE=1 leaves it out.
if [ -z "${SKIP_COMPILE:-}" ]; then
    stage compile-test "${T_COMPILE_TEST:-60}" python3 -m pytest tests/gpu -q -p no:cacheprovider \
        --timeout 55 -k compiled_stages
    stage engine-compile-ab "${T_COMPILE:-120}" python3 benchmarks/engine_inprocess.py \
        --device cuda --compile off,on --rounds 3
fi
stage compare-64 "${T_COMPARE:-240}" python3 benchmarks/compare_llm.py --device cuda \
    --skip tf-serve --phase-timeout 150 --json "$OUT/compare-64.json"
if [ -n "${BIG:-}" ]; then
    stage compare-256 "${T_BIG:-200}" python3 benchmarks/compare_llm.py --device cuda \
        --skip tf-serve --requests 256 --single-requests 1 --phase-timeout 120 \
        --json "$OUT/compare-256.json"
fi
