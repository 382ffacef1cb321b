#!/usr/bin/env bash
# Which library's code path decides the model: bench/avx2_paths.sh holds five libraries at AVX2;
# this trains a few steps of the main model (float32, knnlm_mkl_avx2 loaded first as run.sh does)
# with each of several sets of them held, and prints each checkpoint's fingerprint, then the oneDNN
# primitives that torch ran there. Sets with the same fingerprint computed the same
# bits. Meant for a CPU with AVX-512 (on an AVX2 CPU every set gives one fingerprint).
#
#   bash bench/avx2_libraries.sh [DATA_DIR] > bench/results/avx2_libraries.md
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-data/wikitext-103-small}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
library=$(python -c "from knnlm_tools import cpu; print(cpu.mkl_avx2_library() or '')")
train() {  # train OUT VAR=VALUE...: 8 steps, one validation on 2,000 tokens
    local out=$1; shift
    env LD_PRELOAD="$library" "$@" python train.py --data "$data" --precision float32 --max-iters 8 \
        --warmup-iters 2 --eval-interval 8 --eval-tokens 2000 --out "$out" > "$out.log" 2>&1
}
torch=ATEN_CPU_CAPABILITY=avx2 mkl=MKL_ENABLE_INSTRUCTIONS=AVX2 onednn=ONEDNN_MAX_CPU_ISA=AVX2
echo "| held at AVX2 | fingerprint after 8 steps |"
echo "| --- | --- |"
for set in "nothing" "$torch" "$mkl $onednn" "$torch $onednn" "$torch $mkl" "$torch $mkl $onednn" \
           "$torch $mkl $onednn FAISS_SIMD_LEVEL=AVX2 OPENBLAS_CORETYPE=Haswell"; do
    out=$tmp/$RANDOM.pt
    if [ "$set" = nothing ]; then train "$out"; else train "$out" $set; fi
    echo "| \`$set\` | $(python -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['fingerprint'])" "$out") |"
done
echo
echo "oneDNN primitives that ran in those 8 steps and their validation, torch and MKL held (ONEDNN_VERBOSE=1; count, kind, implementation, pass, algorithm, shape):"
echo
echo '```'
ONEDNN_VERBOSE=1 train "$tmp/verbose.pt" "$torch" "$mkl" || true
grep -o 'primitive,exec,cpu,.*' "$tmp/verbose.pt.log" | cut -d, -f4,5,6,9,10 | sed 's/,/, /g' | sort | uniq -c
echo '```'
echo
python -m knnlm_tools.cpu | tail -1
