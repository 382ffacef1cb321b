"""
Build the kNN-LM datastore (eq. 1): one forward pass of a trained model over a
split of a corpus, storing for every target token the key f(context) (float16)
and the token itself.

    python build_datastore.py --data ../shared/data/wikitext-103-small

The corpus can differ from the one the model was trained on (domain adaptation):
its words are mapped through the model's vocabulary, unknown ones to <unk>.
An interrupted build (Ctrl-C, a kill, a crash) continues where it stopped when
rerun with the same arguments, and ends identical to an uninterrupted one.

    python build_datastore.py --data ../shared/data/wikitext-103-small --index
    python build_datastore.py --estimate 103000000 1024    # what the paper's datastore needs

--index also builds the datastore's FAISS IVF-PQ index (knnlm.py, section 5), for
evaluate.py --backend faiss. Under torchrun every process writes the rows of its
share of the text to the datastore and adds them to the index (its shard); the
first process merges the shards:

    torchrun --nproc_per_node 2 build_datastore.py --data ../shared/data/wikitext-103-small --index
"""
import argparse
import os
import sys
from contextlib import nullcontext

import torch

import knnlm
from knnlm_tools import files, corpora, checkpoints, faiss_index, datastores, cli, cpu

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                 parents=[cli.arguments("data", "checkpoint", "window", "min_context", "batch_size", "device",
                                                       "precision")])
parser.add_argument("--split", default="train", choices=knnlm.SPLITS, help="split to store (default: %(default)s)")
parser.add_argument("--out", default="runs/datastore", help="datastore directory (default: %(default)s)")
parser.add_argument("--key-type", default="ffn_in_ln", choices=knnlm.KEY_TYPES,
                    help="which hidden state is the key: " + "; ".join(f"{k}: {v}" for k, v in knnlm.KEY_TYPES.items()))
parser.add_argument("--commit-seconds", type=cli.finite_float(0), default=10.0,
                    help="save progress this often; an interrupted build loses at most this much (default: %(default)s)")
parser.add_argument("--index", action="store_true", help="also build the FAISS index of the datastore")
parser.add_argument("--factory", default=None,
                    help="FAISS index factory string (default: the paper's IVF-PQ scaled to the datastore, "
                         "e.g. IVF512,PQ128x4fs for 0.5 M keys; IVF4096,PQ64 is the paper's own)")
parser.add_argument("--train-size", type=cli.positive_int, default=None,
                    help=f"keys sampled to train the index (default: {faiss_index.INDEX_TRAIN_SIZE:,} as in the paper, "
                         "or fewer when k-means would not use them all)")
parser.add_argument("--index-shards", type=cli.positive_int, default=None,
                    help="add the keys to the index in this many shards (default: one per torchrun process)")
parser.add_argument("--estimate", nargs=2, type=cli.positive_int, metavar=("N", "D"),
                    help="only print the disk and memory a datastore of N keys of dimension D and its index need")
args = parser.parse_args()
cpu.reuse_freed_memory()  # the big blocks of one step kept for the next: no page faults

if args.estimate:
    with cli.user_errors():
        n, d = args.estimate
        factory, needs = faiss_index.index_estimate(n, d, args.factory, args.train_size, args.index_shards or 1)
    print(f"{n:,} keys of dimension {d}, index {factory}:")
    for what, size in needs.items():
        print(f"  {size / 1e9:10.2f} GB  {what}")
    sys.exit()

# under torchrun, every process builds its shard of the datastore and of the index
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    torch.distributed.init_process_group("gloo")
barrier = torch.distributed.barrier if world > 1 else lambda: None

# rank 0 holds the lock of --out for the whole job: a second build into it is refused at once
interrupted = "rerun the same command to continue where it stopped"
with cli.user_errors(interrupted), files.writing(args.out, directory=True) if rank == 0 else nullcontext():
    model, vocab, _ = checkpoints.load_model(args.checkpoint, cli.check_device(args.device), args.window)
    threads = cpu.Threads().follow(model)
    # auto continues a datastore in the precision it was begun in: --index or a resume is not refused
    precision = (args.precision == "auto" and datastores.recorded_precision(args.out)
                 or cpu.resolve_precision(args.precision, args.device))
    key_type = checkpoints.key_type(model, args.key_type)
    min_context = knnlm.resolve_min_context(args.min_context, model.cfg.block_size)
    path = knnlm.split_path(corpora.resolve_corpus(args.data), args.split)
    tokens = vocab.encode_file(path)
    if args.index:  # a factory, sample or shard count the index cannot take is refused before the datastore's pass
        faiss_index.check_plan(len(tokens) - 1, model.cfg.d_model, args.factory, args.train_size,
                               args.index_shards or world)
    print(f"{path}: {len(tokens):,} tokens -> {len(tokens) - 1:,} datastore entries of dimension {model.cfg.d_model}; "
          f"{precision}, {threads}")
    source = {"file": os.path.realpath(path), "split": args.split, "sha256": corpora.file_fingerprint(path),
              "tokens_sha256": corpora.text_fingerprint(path)}
    meta = datastores.build_datastore(model, vocab, tokens, args.out, key_type=key_type,
                                     min_context=min_context, batch_size=args.batch_size, source=source,
                                     commit_seconds=args.commit_seconds, shard=rank, shards=world, barrier=barrier,
                                     precision=precision)
    if rank == 0:
        print(f"wrote {meta.count:,} keys ({key_type}) to {args.out}")
    if args.index:
        datastore = datastores.DiskDatastore(args.out)
        plan = faiss_index.plan_index(datastore, args.factory, args.train_size, args.index_shards or world)
        if rank == 0:
            faiss_index.train_index(datastore, plan)
        barrier()
        for shard in range(rank, plan["shards"], world):
            faiss_index.add_shard(datastore, plan, shard)
        barrier()
        if rank == 0:
            faiss_index.merge_index(datastore, plan)
            print(f"wrote the index {plan['factory']} of {args.out} ({plan['shards']} shard{'s' if plan['shards'] > 1 else ''})")
