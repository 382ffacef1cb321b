#!/usr/bin/env bash
# The main job on a fresh machine: install, train the LM, build the datastore from
# its training split, then evaluate kNN-LM (λ and temperature tuned on valid only) and,
# in the main job, the paper's Table 1: LM, + continuous cache, kNN-LM, kNN-LM + cache.
#
#   bash run.sh [--quick] [DATA_DIR]
#
# DATA_DIR holds wiki.{train,valid,test}.tokens. The default, data/wikitext-103-small,
# is made from the official WikiText-103 download (valid and test whole, the first
# 2.5 MiB of train). The numbers go to results/<name of DATA_DIR>.json.
# --quick is the class run, under 5 minutes on a 2-core CPU and with no compiler (it
# searches with the PyTorch code of knnlm.py, not the C++ kernel): a 2-layer model trained
# for 150 steps, its datastore over the whole training split, and valid and test scored on
# their first 20,000 tokens; the numbers go to results/<name of DATA_DIR>-quick.json.
set -euo pipefail
cd "$(dirname "$0")"
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
data=${1:-data/wikitext-103-small}
pip install -r requirements.txt
if [ "$quick" = 1 ]; then  # no C++ kernel to compile: the exact search of knnlm.py in PyTorch
    python train.py --data "$data" --preset quick --max-iters 150 --batch-size 16 --lr 2e-3 --warmup-iters 15 \
        --eval-interval 150 --eval-tokens 10000 --out runs/quick/model.pt
    python build_datastore.py --data "$data" --checkpoint runs/quick/model.pt --out runs/quick/datastore
    python evaluate.py --data "$data" --checkpoint runs/quick/model.pt --datastore runs/quick/datastore \
        --k 1024 --tune --max-tokens 20000 --results "results/$(basename "$data")-quick.json"
else
    pip install --no-build-isolation -e .   # the C++ search kernel of csrc/
    python train.py --data "$data"
    python build_datastore.py --data "$data"
    python evaluate.py --data "$data" --k 1024 --tune --cache --results "results/$(basename "$data").json"
fi
