#!/usr/bin/env bash
# TTFT sweep, text vs cache, on a randomly initialised model with Qwen3-14B's shapes in bf16 on one GPU
# (timing does not depend on weight values, so nothing is downloaded). Takes about five minutes on an H200.
#   benchmarks/gpu_qwen3_14b.sh [OUT.json] [extra `parsyn bench` options, e.g. --tokenizer DIR, or --graphs
#   to time both routes' prefills and a decode step replayed from CUDA graphs too]
set -euo pipefail
out=${1:-results/bench-qwen3-14b.json}
shift || true
${PARSYN:-python3 -m parsyn} bench --random-shape qwen3-14b --device cuda \
    --branches 1,2,4,8 --lengths 128,256,512,1024 --repeats 5 --out "$out" "$@"
