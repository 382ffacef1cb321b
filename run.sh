#!/usr/bin/env bash
# The main job on a fresh machine: install, train the LM, build the datastore from
# its training split, then evaluate kNN-LM (λ and temperature tuned on valid only).
#
#   bash run.sh [DATA_DIR]
#
# DATA_DIR holds wiki.{train,valid,test}.tokens. The default, data/wikitext-103-small,
# is made from the official WikiText-103 download (valid and test whole, the first
# 2.5 MiB of train). The numbers go to results/<name of DATA_DIR>.json.
set -euo pipefail
cd "$(dirname "$0")"
data=${1:-data/wikitext-103-small}
pip install -r requirements.txt
pip install --no-build-isolation -e .   # the C++ search kernel of csrc/
python train.py --data "$data"
python build_datastore.py --data "$data"
python evaluate.py --data "$data" --k 1024 --tune --results "results/$(basename "$data").json"
