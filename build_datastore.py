"""
Build the kNN-LM datastore (eq. 1): one forward pass of a trained model over a
split of a corpus, storing for every target token the key f(context) (float16)
and the token itself.

    python build_datastore.py --data ../shared/data/wikitext-103-small

The corpus can differ from the one the model was trained on (domain adaptation):
its words are mapped through the model's vocabulary, unknown ones to <unk>.
An interrupted build (Ctrl-C, a kill, a crash) continues where it stopped when
rerun with the same arguments, and ends identical to an uninterrupted one.
"""
import argparse
import sys

import torch

import knnlm

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", default="data/wikitext-103-small",
                    help="directory with wiki.{train,valid,test}.tokens (default: %(default)s)")
parser.add_argument("--split", default="train", choices=knnlm.SPLITS, help="split to store (default: %(default)s)")
parser.add_argument("--checkpoint", default="runs/model.pt", help="model from train.py (default: %(default)s)")
parser.add_argument("--out", default="runs/datastore", help="datastore directory (default: %(default)s)")
parser.add_argument("--key-type", default="ffn_in_ln", choices=knnlm.KEY_TYPES,
                    help="which hidden state is the key: " + "; ".join(f"{k}: {v}" for k, v in knnlm.KEY_TYPES.items()))
parser.add_argument("--min-context", type=int, default=None,
                    help="every stored target has at least this many tokens of left context "
                         "(default: half the model's context, like the paper's 1536 of 3072)")
parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default: %(default)s)")
parser.add_argument("--commit-seconds", type=float, default=10.0,
                    help="save progress this often; an interrupted build loses at most this much (default: %(default)s)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda when present)")
args = parser.parse_args()

with knnlm.user_errors():
    model, vocab, _ = knnlm.load_checkpoint(args.checkpoint, knnlm.check_device(args.device))
    min_context = knnlm.resolve_min_context(args.min_context, model.cfg.block_size)
    path = knnlm.split_path(knnlm.resolve_corpus(args.data), args.split)
    tokens = vocab.encode_file(path)
    print(f"{path}: {len(tokens):,} tokens -> {len(tokens) - 1:,} datastore entries of dimension {model.cfg.d_model}")
    source = {"file": path, "split": args.split, "sha256": knnlm.file_fingerprint(path)}
    try:
        meta = knnlm.build_datastore(model, vocab, tokens, args.out, key_type=args.key_type, min_context=min_context,
                                     batch_size=args.batch_size, source=source, commit_seconds=args.commit_seconds)
    except KeyboardInterrupt:
        sys.exit("\ninterrupted: rerun the same command to continue where it stopped")
print(f"wrote {meta['count']:,} keys ({args.key_type}) to {args.out}")
