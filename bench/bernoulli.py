"""
Dropout's masks: torch's CPU bernoulli_ (one mt19937 call at a time) against knnlm.bernoulli_
(csrc/bernoulli.cpp, the same numbers drawn in blocks), which train.py installs in its place
(cpu.exact_bernoulli). Measured in one process, in turn (A B A B):

1. the masks alone, of the shapes a training step of the main model draws: the residual
   stream's [8, 256, 256] and the attention's [8, 4, 256, 256];
2. training steps of the main model (its config from --checkpoint, 8 windows of the training
   split, AdamW, --precision as train.py's), two copies of it from the same weights and
   the same random state, one stepped with torch's bernoulli_ and one with knnlm.bernoulli_; after
   the last step their weights must be equal, bit for bit.

    python -m bench.bernoulli --data ../shared/data/wikitext-103-small

Writes bench/results/bernoulli.json and bernoulli.md (or --out's name).
"""
import argparse
import statistics
import sys
import time

import torch

import knnlm
from bench import command_line, environment, in_turn, write_results
from bench.training import batch_of, copies_in_turn, training_step
from knnlm_tools import checkpoints, corpora, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/wikitext-103-small")
    parser.add_argument("--checkpoint", default="runs/model.pt", help="the model whose config is trained")
    parser.add_argument("--steps", type=int, default=10, help="training steps of each copy, after one")
    parser.add_argument("--repeats", type=int, default=20, help="runs of each mask shape")
    parser.add_argument("--precision", choices=cpu.PRECISIONS, default="auto", help="as train.py's")
    parser.add_argument("--out", default="bernoulli")
    args = parser.parse_args()
    cpu.reuse_freed_memory()
    if not cpu.exact_bernoulli():
        raise SystemExit("knnlm.bernoulli_ is not built, or differs from torch's bernoulli_ on this CPU")
    torch_s, ours = (lambda: cpu.exact_bernoulli(install=False)), cpu.exact_bernoulli
    names = {"torch's bernoulli_": torch_s, "knnlm.bernoulli_": ours}

    shapes = {"residual [8, 256, 256]": (8, 256, 256), "attention [8, 4, 256, 256]": (8, 4, 256, 256)}
    masks = {}
    for shape_name, shape in shapes.items():
        x = torch.empty(shape)
        runs = in_turn({name: lambda: x.bernoulli_(0.8) for name in names}, args.repeats, names)
        masks[shape_name] = {name: min(s) for name, s in runs.items()}
        masks[shape_name]["speedup"] = masks[shape_name]["torch's bernoulli_"] / masks[shape_name]["knnlm.bernoulli_"]
        print(shape_name, masks[shape_name], flush=True)

    model, vocab, _ = checkpoints.load_checkpoint(args.checkpoint)
    cfg, precision = model.cfg, cpu.resolve_precision(args.precision, "cpu")
    tokens = vocab.encode_file(knnlm.split_path(corpora.resolve_corpus(args.data), "train"))
    x, y = batch_of(tokens, cfg.block_size, 8)
    runs, same = copies_in_turn(cfg, lambda name, model, optimizer: training_step(model, x, y, optimizer, precision),
                                args.steps, names)
    train = {name: statistics.median(s) for name, s in runs.items()}
    train["speedup"] = train["torch's bernoulli_"] / train["knnlm.bernoulli_"]
    record = {"command": "python -m bench.bernoulli " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "machine": cpu.describe(), "environment": environment(),
              "masks (best seconds)": masks, "precision": precision,
              "training step (median seconds)": train, "steps": runs, "same_weights": same}
    lines = [f"`{command_line(record)}` on {record['machine']}, "
             f"{record['date']}.", "",
             "| what | torch's bernoulli_ | knnlm.bernoulli_ | speedup |", "|---|---:|---:|---:|"]
    lines += [f"| mask {name}, p = 0.8 (best of {args.repeats}) | {m[next(iter(names))] * 1e3:.2f} ms | "
              f"{m['knnlm.bernoulli_'] * 1e3:.2f} ms | {m['speedup']:.2f}x |" for name, m in masks.items()]
    lines += [f"| training step of {cfg.n_layer} layers, d {cfg.d_model}, 8 windows of {cfg.block_size}, {precision} "
              f"(median of {args.steps}) | {train[next(iter(names))]:.3f} s | {train['knnlm.bernoulli_']:.3f} s | "
              f"{train['speedup']:.2f}x |"]
    lines += ["", f"After {args.steps + 1} steps each, the two copies' weights are equal bit for bit: {same}."]
    write_results(args.out, record, "\n".join(lines) + "\n")
    if not same:
        raise SystemExit("the two copies trained apart")


if __name__ == "__main__":
    main()
