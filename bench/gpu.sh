#!/usr/bin/env bash
# The GPU half in one run (issue #23), on a machine with an NVIDIA GPU, no network and no FAISS:
# build the CUDA kernel against the torch there, run the search tests (the CUDA ones among them:
# the kernel against a float64 brute force on every shape the CPU tests use), the main job on the
# GPU (train.py, build_datastore.py, evaluate.py --tune --cache, each step timed), the search
# benchmark (python -m bench.gpu_search) and a bfloat16 training, in that order, each step logged,
# stopping before a step that the time left (GPU_SECONDS, default 420) would not cover.
#
#   bash bench/gpu_prepare.sh            # first, where pip reaches a package index: .whl/ and .gpu-data/
#   bash bench/gpu.sh OUT [--rehearse]   # on the GPU machine, carrying .whl and .gpu-data
#
# OUT gets at most 8 files: env.txt, build.log, tests.log, gpu.log (everything else printed),
# gpu_search.json and .md, wikitext-103-small-gpu.json (Table 1) and wikitext-103-small-gpu-times.txt.
# --rehearse: tiny sizes on whatever machine this is (a CPU one too), to try the script before a
# GPU's time is spent on it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu.sh OUT [--rehearse]}
rehearse=0
if [ "${2:-}" = "--rehearse" ]; then rehearse=1; fi
mkdir -p "$out"
exec > >(tee -a "$out/gpu.log") 2>&1
deadline=$((SECONDS + ${GPU_SECONDS:-420}))
data=.gpu-data/wikitext-103-small
[ -d "$data" ] || data=../shared/data/wikitext-103-small
times=()
step() {  # step NAME SECONDS_NEEDED COMMAND...: run it if the time left covers it, and keep how long it took
    local name=$1 needed=$2 start=$SECONDS
    if [ $((deadline - SECONDS)) -lt "$needed" ]; then
        echo "== $name: skipped, $((deadline - SECONDS)) s left and it needs about $needed s"; times+=("$name skipped")
        return 1
    fi
    echo "== $name: ${*:3}"
    "${@:3}"
    local rc=$?
    times+=("$name $((SECONDS - start)) s$([ $rc = 0 ] || echo " (exit $rc)")")
    return $rc
}

# the machine, and what the project needs that it lacks
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30  # progress bars: few lines
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  nproc; python3 -c "import sys, torch, faiss; print(sys.version.split()[0], 'torch', torch.__version__,
    'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(), 'faiss', faiss.__version__)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
gpu=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$gpu" = 1 ]; then
    device=cuda
    export KNNLM_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c \
        "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")}
    if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then export CUDA_HOME=/usr/local/cuda; fi
elif [ "$rehearse" = 1 ]; then
    device=cpu
else
    echo "gpu.sh: torch sees no GPU here (--rehearse runs it on a CPU)"; exit 1
fi

# 1. the kernel, built against this torch; 2. the search tests
step build 120 env MAX_JOBS=$(nproc) python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 || {
    tail -30 "$out/build.log"  # the rest still runs: the main job with PyTorch's search on the GPU
    echo "gpu.sh: the CUDA build failed; building the CPU kernel only"
    step build-cpu 60 env KNNLM_CUDA=0 MAX_JOBS=$(nproc) python3 setup.py build_ext --inplace >> "$out/build.log" 2>&1; }
python3 -c "import torch, knnlm_ext; print('knnlm_ext: cuda', knnlm_ext.cuda)"
step tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_search.py > "$out/tests.log" 2>&1
tail -5 "$out/tests.log"

# 3. the main job on the GPU: run.sh's steps with the exact search (the kernel) instead of the index
runs=runs/gpu
if [ "$rehearse" = 1 ]; then
    small=(--preset tiny --max-iters 3 --eval-interval 3 --eval-tokens 2000)
    few=(--max-tokens 3000)
else
    small=(--eval-interval 300)  # as run.sh: validations at 300 and 600
    few=()
fi
main_start=$SECONDS
step train 150 python3 train.py --data "$data" --device "$device" "${small[@]}" --out $runs/model.pt &&
step datastore 60 python3 build_datastore.py --data "$data" --device "$device" --checkpoint $runs/model.pt \
    --out $runs/datastore &&
step evaluate 150 python3 evaluate.py --data "$data" --device "$device" --checkpoint $runs/model.pt \
    --datastore $runs/datastore --k 1024 --tune --cache --backend auto "${few[@]}" \
    --results "$out/wikitext-103-small-gpu.json" &&
times+=("main-job $((SECONDS - main_start)) s")

# 4. the benchmark; 5. training in bfloat16 autocast, timed beside step 3's float32
grid=$([ "$rehearse" = 1 ] && echo tiny || echo full)
name=$([ "$rehearse" = 1 ] && echo gpu_search-rehearsal || echo gpu_search)
step benchmark 60 python3 -m bench.gpu_search --grid "$grid" --name "$name" --seconds $((deadline - SECONDS - 60)) &&
    cp "bench/results/$name.json" "bench/results/$name.md" "$out/"
if [ "$rehearse" = 1 ]; then rm -f "bench/results/$name.json" "bench/results/$name.md"; fi  # bench/results/ as it was
step train-bfloat16 150 python3 train.py --data "$data" --device "$device" --precision bfloat16 "${small[@]}" \
    --out $runs/model-bfloat16.pt

{ printf '%s\n' "${times[@]}"
  python3 -c "import os, torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (rehearsal)',
    f'host {os.cpu_count()} cores, torch {torch.__version__}, $(date -u +%F)')"
} | tee "$out/wikitext-103-small-gpu-times.txt"
