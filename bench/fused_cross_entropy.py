"""
The training loss's backward in one pass (bench/fused_cross_entropy.cpp), against torch's
F.cross_entropy: a lever measured and not taken (docs/speed.md, "Tried and not taken"). In one
process, on torch's CPU capability (AVX2 or AVX-512; nothing to measure elsewhere):

1. the bits: loss and gradient of the fused version against F.cross_entropy's, on logits of
   several shapes and scales (float32, and bfloat16 under autocast where the CPU has it);
2. the backward alone on the main model's [8 x 256, vocabulary] logits (best of --repeats);
3. training steps of the main model (its config from --checkpoint, 8 windows, AdamW, --precision
   as train.py's), two copies from the same weights and random state stepped in turn on the same
   batches, one with each loss; after the last step their weights must be equal, bit for bit.

    python -m bench.fused_cross_entropy --data ../shared/data/wikitext-103-small

Compiles the kernel on the fly (torch.utils.cpp_extension.load, about 10 s). Writes
bench/results/fused_cross_entropy.json and .md (or --out's name).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import knnlm
from bench import command_line, environment, timed, write_results
from bench.training import batch_of, copies_in_turn, training_step
from knnlm_tools import checkpoints, corpora, cpu

WIDTH = {"AVX2": 8, "AVX512": 16}


class FusedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy's forward (log_softmax, then nll_loss: the same ops), the backward in one pass."""

    @staticmethod
    def forward(ctx, logits, targets):
        log_p = torch.log_softmax(logits.float(), 1)
        ctx.save_for_backward(log_p, targets)
        ctx.dtype = logits.dtype
        return F.nll_loss(log_p, targets)

    @staticmethod
    def backward(ctx, grad):
        log_p, targets = ctx.saved_tensors
        width = WIDTH[torch.backends.cpu.get_cpu_capability()]
        return torch.ops.knnlm_bench.cross_entropy_backward(log_p, targets, grad.item(), width).to(ctx.dtype), None


def loss_and_grad(loss_fn, logits, targets, precision):
    logits = logits.detach().requires_grad_()
    with cpu.autocast(precision, "cpu"):
        loss = loss_fn(logits, targets)
    return (loss, *torch.autograd.grad(loss, logits))


def same_bits(precision):
    """Loss and gradient equal, bit for bit, on every shape and scale."""
    generator = torch.Generator().manual_seed(0)
    cases = 0
    for n, v in [(2048, 13759), (1999, 13759), (100, 77), (37, 5)]:
        for scale in (1, 5, 30):
            logits = torch.randn(n, v, generator=generator) * scale
            targets = torch.randint(v, (n,), generator=generator)
            if precision == "bfloat16":
                logits = logits.bfloat16()
            ours = loss_and_grad(FusedCrossEntropy.apply, logits, targets, precision)
            theirs = loss_and_grad(F.cross_entropy, logits, targets, precision)
            if not all(torch.equal(a, b) for a, b in zip(ours, theirs)):
                return False, cases
            cases += 1
    return True, cases


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/wikitext-103-small")
    parser.add_argument("--checkpoint", default="runs/model.pt", help="the model whose config is trained")
    parser.add_argument("--steps", type=int, default=10, help="training steps of each copy, after one")
    parser.add_argument("--repeats", type=int, default=10, help="runs of the backward alone")
    parser.add_argument("--precision", choices=cpu.PRECISIONS, default="auto", help="as train.py's")
    parser.add_argument("--out", default="fused_cross_entropy")
    args = parser.parse_args()
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in WIDTH:
        raise SystemExit(f"torch runs its {capability} kernels here: the fused backward is written for AVX2 and AVX-512")
    from torch.utils.cpp_extension import load
    with tempfile.TemporaryDirectory() as build:
        load("fused_cross_entropy", [os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_cross_entropy.cpp")],
             extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False, build_directory=build)
    cpu.reuse_freed_memory()
    cpu.exact_bernoulli()  # dropout's masks as train.py draws them
    precision = cpu.resolve_precision(args.precision, "cpu")
    bits = {p: same_bits(p) for p in ["float32"] + (["bfloat16"] if precision == "bfloat16" else [])}
    print("same bits:", bits, flush=True)

    model, vocab, _ = checkpoints.load_checkpoint(args.checkpoint)
    cfg = model.cfg
    logits = torch.randn(8 * cfg.block_size, cfg.vocab_size, generator=torch.Generator().manual_seed(1)).requires_grad_()
    targets = torch.randint(cfg.vocab_size, (8 * cfg.block_size,))
    losses = {"F.cross_entropy": F.cross_entropy, "fused backward": FusedCrossEntropy.apply}
    backward = {}
    for name, loss_fn in losses.items():
        loss = loss_fn(logits, targets)
        backward[name] = min(timed(lambda: torch.autograd.grad(loss, logits, retain_graph=True))
                             for _ in range(args.repeats + 1))
    backward["speedup"] = backward["F.cross_entropy"] / backward["fused backward"]

    tokens = vocab.encode_file(knnlm.split_path(corpora.resolve_corpus(args.data), "train"))
    x, y = batch_of(tokens, cfg.block_size, 8)
    runs, same = copies_in_turn(cfg, lambda name, model, optimizer: training_step(model, x, y, optimizer, precision,
                                                                                  losses[name], grad_clip=1.0),
                                args.steps, {name: lambda: None for name in losses})
    train = {name: statistics.median(s) for name, s in runs.items()}
    train["speedup"] = train["F.cross_entropy"] / train["fused backward"]
    record = {"command": "python -m bench.fused_cross_entropy " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "machine": cpu.describe(),
              "environment": environment(),
              "same_bits": {p: {"equal": ok, "cases": n} for p, (ok, n) in bits.items()}, "precision": precision,
              "backward (best seconds)": backward, "training step (median seconds)": train, "steps": runs,
              "same_weights": same}
    lines = [f"`{command_line(record)}` on {record['machine']}, "
             f"{record['date']}.", "",
             "| what | F.cross_entropy | fused backward | speedup |", "|---|---:|---:|---:|",
             f"| the backward of [{8 * cfg.block_size}, {cfg.vocab_size}] float32 logits (best of {args.repeats}) | "
             f"{backward['F.cross_entropy'] * 1e3:.1f} ms | {backward['fused backward'] * 1e3:.1f} ms | "
             f"{backward['speedup']:.2f}x |",
             f"| training step of {cfg.n_layer} layers, d {cfg.d_model}, 8 windows of {cfg.block_size}, {precision} "
             f"(median of {args.steps}) | {train['F.cross_entropy']:.3f} s | {train['fused backward']:.3f} s | "
             f"{train['speedup']:.3f}x |", ""]
    lines += [f"Loss and gradient equal to F.cross_entropy's, bit for bit, in {p}: {ok} ({n} cases)."
              for p, (ok, n) in bits.items()]
    lines += [f"After {args.steps + 1} steps each, the two copies' weights are equal bit for bit: {same}."]
    write_results(args.out, record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
