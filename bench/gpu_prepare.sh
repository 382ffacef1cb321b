#!/usr/bin/env bash
# Run on a machine with the internet (or the package mirror) before bench/gpu.sh is sent to a GPU
# machine that has neither: puts what gpu.sh needs and that machine lacks into two folders that git
# ignores and the device run carries (.whl and .gpu-data, about 24 MB):
# - .whl/: faiss-cpu for that machine's Python (3.12; knnlm.py imports faiss);
# - .gpu-data/wikitext-103-small: the corpus (DATA, default ../shared/data/wikitext-103-small).
#
#   bash bench/gpu_prepare.sh [DATA]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/wikitext-103-small}
for f in wiki.train.tokens wiki.valid.tokens wiki.test.tokens; do
    [ -f "$data/$f" ] || { echo "gpu_prepare.sh: no $data/$f" >&2; exit 1; }
done
rm -rf .whl .gpu-data
mkdir -p .whl .gpu-data/wikitext-103-small
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl faiss-cpu
cp "$data"/wiki.{train,valid,test}.tokens .gpu-data/wikitext-103-small/
du -sh .whl .gpu-data
