#!/usr/bin/env bash
# The main job on a fresh machine: install, train the LM, build the datastore from
# its training split, then evaluate kNN-LM (λ and temperature tuned on valid only) and,
# in the main job, the paper's Table 1: LM, + continuous cache, kNN-LM, kNN-LM + cache.
#
#   bash run.sh [--quick] [DATA_DIR]
#
# DATA_DIR holds wiki.{train,valid,test}.tokens. The default, data/wikitext-103-small,
# is made from the official WikiText-103 download (valid and test whole, the first
# 2.5 MiB of train). The numbers go to results/<name of DATA_DIR>.json, each step's time
# and the CPU's features to results/<name of DATA_DIR>-times.txt.
# --quick is the class run, under 5 minutes on a 2-core CPU and with no compiler (it
# searches with the PyTorch code of knnlm.py, not the C++ kernel): a 2-layer model trained
# for 150 steps, its datastore over the whole training split, and valid and test scored on
# their first 20,000 tokens; the numbers go to results/<name of DATA_DIR>-quick.json.
set -euo pipefail
usage="usage: bash run.sh [--quick] [DATA_DIR]"
quick=0 data=
for arg in "$@"; do
    case $arg in
        --quick) quick=1 ;;
        -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "run.sh: unknown option $arg ($usage)" >&2; exit 2 ;;
        *) if [ -n "$data" ]; then echo "run.sh: one DATA_DIR, got $data and $arg ($usage)" >&2; exit 2; fi
           data=$arg; [ "$data" = / ] || data=${data%/} ;;
    esac
done
caller=$PWD
cd "$(dirname "$0")"
if [ -n "$data" ] && [ "${data#/}" = "$data" ] && [ "$caller" != "$PWD" ]; then data="$caller/$data"; fi  # as the caller meant it
check_data() {  # before installing anything: a DATA_DIR without the three splits ends here, in train.py's words
    # (a missing directory named wikitext-103, wikitext-2 or wikitext-103-small is downloaded instead)
    local split missing=() list
    case $(basename "$data") in wikitext-103|wikitext-2|wikitext-103-small) [ -d "$data" ] || return 0 ;; esac
    for split in train valid test; do [ -f "$data/wiki.$split.tokens" ] || missing+=("$data/wiki.$split.tokens"); done
    if [ ${#missing[@]} -gt 0 ]; then
        printf -v list '%s, ' "${missing[@]}"
        echo "error: $data is not a WikiText corpus directory: missing ${list%, }" >&2
        exit 2
    fi
}
data=${data:-data/wikitext-103-small}
check_data
name=$(basename "$data")$([ "$quick" = 1 ] && echo -quick || true)
times=()
mkl_avx2() {  # MKL multiplies torch's float32 matrices with its AVX2 (AVX-512) kernels only on a CPU it takes for
    # Intel's: on an AMD CPU with AVX2, knnlm_mkl_avx2 (csrc/mkl_avx2.cpp) loaded first makes it (docs/speed.md).
    # Not with KNNLM_MKL_AVX2=0
    local library
    library=$([ "${KNNLM_MKL_AVX2:-1}" = 0 ] || python -c "from knnlm_tools import cpu; print(cpu.mkl_avx2_library() or '')")
    if [ -n "$library" ]; then export LD_PRELOAD="$library${LD_PRELOAD:+:$LD_PRELOAD}"; fi
}
step() {  # step NAME COMMAND...: run it, and keep how long it took
    local start=$SECONDS
    "${@:2}"
    times+=("$1 $((SECONDS - start))")
}
step install pip install -r requirements.txt
if [ "$quick" = 1 ]; then  # no C++ kernel to compile: the exact search of knnlm.py in PyTorch
    step train python train.py --data "$data" --preset quick --max-iters 150 --batch-size 16 --lr 2e-3 \
        --warmup-iters 15 --eval-interval 150 --eval-tokens 10000 --out runs/quick/model.pt
    step datastore python build_datastore.py --data "$data" --checkpoint runs/quick/model.pt --out runs/quick/datastore
    step evaluate python evaluate.py --data "$data" --checkpoint runs/quick/model.pt --datastore runs/quick/datastore \
        --k 1024 --tune --max-tokens 20000 --results "results/$name.json"
else  # the paper's search: FAISS IVF-PQ, re-ranked by exact distances (--backend ext: exact, one flag away)
    step compile pip install --no-build-isolation -e .   # the C++ search kernel of csrc/
    step mkl mkl_avx2
    step train python train.py --data "$data" --eval-interval 300  # validations at 300 and 600: the same model
    step datastore python build_datastore.py --data "$data"
    # the index's lists trained on 262,144 keys, on WikiText-103-small 128 a list of its 2,048 (by default all its
    # 501,310: FAISS's k-means takes up to 256 a list): half the time, the same perplexity within the noise of
    # the sample (docs/speed.md, "The index trained on half the keys")
    step index python build_datastore.py --data "$data" --index --train-size 262144
    step evaluate python evaluate.py --data "$data" --k 1024 --tune --cache --backend faiss --results "results/$name.json"
fi
python -m knnlm_tools.cpu "${times[@]}" | tee "results/$name-times.txt"  # each step's time, and this CPU
