#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, one part per device call (each well inside 10 minutes).
#
#   bash benchmarks/gpu.sh wheels       # here, once: diffusers (the oracle) as wheels into the ignored .whl/
#   bash benchmarks/gpu.sh check        # on the GPU machine: the device-aware tests with --device cuda
#   bash benchmarks/gpu.sh eager        #   klvae, klvae-fast, -unfused, -unfolded, -nchw, diffusers on whole images
#   bash benchmarks/gpu.sh compiled     #   klvae-compiled, diffusers-compiled (torch.compile + channels_last),
#   bash benchmarks/gpu.sh compiled-encode  # decode cases, then encode cases
#   bash benchmarks/gpu.sh tiled        #   exact strips vs diffusers' enable_tiling() at 2048² and 4096²
#   bash benchmarks/gpu.sh short        #   one call for a short device budget (15 minutes in all, start included):
#                                       #   the targets first, each step stopped at its own time limit
#
# On the device tool: run `bash benchmarks/gpu.sh PART` with carry [".whl"]; JSON and logs land in $OUT
# (docs/ when OUT is unset). The GPU image has torch, so klvae runs from src/ without installing.
set -euo pipefail
part=${1:?usage: bash benchmarks/gpu.sh wheels|check|eager|compiled|compiled-encode|tiled|short}

if [ "$part" = wheels ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 importlib_metadata==8.7.0
    exit 0
fi

out=${OUT:-docs}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu-$part.log"
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)' \
    | tee -a "$out/gpu-$part.log"

bench() { python3 benchmarks/bench.py --device cuda --dtype bf16 "$@" 2>&1 | tee -a "$out/gpu-$part.log"; }
# One step of `short`: at most $1 seconds, and a step that runs out leaves the later ones their time.
step() {
    local limit=$1; shift
    timeout "$limit" python3 "$@" 2>&1 | tee -a "$out/gpu-$part.log" \
        || echo "step stopped (exit ${PIPESTATUS[0]}, limit ${limit}s): python3 $*" | tee -a "$out/gpu-$part.log"
}
case "$part" in
    check)
        python3 -m pytest -p no:cacheprovider --device cuda tests/inference tests/model/test_posterior.py 2>&1 \
            | tee -a "$out/gpu-$part.log" ;;
    eager)
        bench --variants klvae klvae-fast klvae-unfused klvae-unfolded klvae-nchw diffusers \
            --cases decode:512:1 decode:512:8 decode:1024:1 encode:512:1 encode:512:8 encode:1024:1 \
            --json "$out/benchmarks-h100-eager.json" ;;
    compiled)  # each shape compiles once per variant (about a minute each), so decode and encode go apart
        bench --variants klvae-compiled diffusers-compiled \
            --cases decode:512:8 decode:1024:1 --json "$out/benchmarks-h100-compiled.json" ;;
    compiled-encode)
        bench --variants klvae-compiled diffusers-compiled \
            --cases encode:512:8 encode:1024:1 --json "$out/benchmarks-h100-compiled-encode.json" ;;
    tiled)
        bench --variants klvae klvae-fast diffusers --warmup 1 --iters 3 \
            --cases decode:2048:1:tiled encode:2048:1:tiled decode:4096:1:tiled encode:4096:1:tiled \
            --json "$out/benchmarks-h100-tiled.json" ;;
    short)  # about 8.5 minutes: targets (klvae-fast vs diffusers), then tiling, then GPU tests, then compile
        b=(benchmarks/bench.py --device cuda --dtype bf16)
        step 150 "${b[@]}" --variants klvae-fast klvae-unfused diffusers \
            --cases decode:512:8 decode:1024:1 encode:512:8 encode:1024:1 --json "$out/benchmarks-h100-short.json"
        step 120 "${b[@]}" --variants klvae-fast diffusers --warmup 1 --iters 3 \
            --cases decode:4096:1:tiled encode:4096:1:tiled --json "$out/benchmarks-h100-short-tiled.json"
        step 120 -m pytest -p no:cacheprovider -x --device cuda tests/inference/test_inference.py tests/inference/test_fused_norm.py
        step 120 "${b[@]}" --variants klvae-compiled diffusers-compiled \
            --cases decode:512:8 --json "$out/benchmarks-h100-short-compiled.json" ;;
    *) echo "unknown part $part: wheels|check|eager|compiled|compiled-encode|tiled|short" >&2; exit 2 ;;
esac
