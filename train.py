"""
Train the Transformer LM that kNN-LM builds on.

    python train.py --data ../shared/data/wikitext-103-small

The defaults train a 4-layer, 256-wide model on the 0.5 M-token WikiText-103-small
training split in about 15 minutes on a 2-core CPU; the best checkpoint by
validation perplexity is written to --out (atomically), and at every validation the
latest state (weights, optimizer, schedule step, random state) to --out's .last.pt,
from which --resume continues. --preset picks larger configs.
"""
import argparse
import math
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import knnlm
from knnlm_tools import files, corpora, checkpoints, cli, cpu

PRESETS = {  # name: (n_layer, n_head, d_model, block_size)
    "tiny": (2, 2, 32, 32),  # for tests and smoke runs
    "quick": (2, 4, 128, 64),  # the 5-minute class run (run.sh --quick)
    "cpu-small": (4, 4, 256, 256),
    "medium": (8, 8, 512, 512),
    "paper": (16, 16, 1024, 3072),  # Baevski & Auli's WikiText-103 model size (the paper uses adaptive softmax)
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                 parents=[cli.arguments("data", "batch_size", "device", "precision", batch_size=8)])
parser.add_argument("--out", default="runs/model.pt", help="checkpoint path (default: %(default)s)")
parser.add_argument("--preset", default="cpu-small", choices=PRESETS,
                    help="model size: n_layer, n_head, d_model, context (default: %(default)s)")
parser.add_argument("--min-freq", type=cli.positive_int, default=3,
                    help="words seen fewer times in train become <unk> (default: %(default)s)")
parser.add_argument("--max-vocab", type=cli.positive_int, default=None, help="cap on the vocabulary size, <eos> and <unk> included")
parser.add_argument("--train-tokens", type=cli.positive_int, default=None,
                    help="train on the first N tokens of the training split only; the vocabulary still comes from all "
                         "of it (the analyses' smaller models; default: all of it)")
parser.add_argument("--dropout", type=cli.finite_float(0, 1, high_open=True), default=0.2,
                    help="dropout, in [0, 1) (default: %(default)s)")
parser.add_argument("--max-iters", type=cli.positive_int, default=600, help="optimizer steps (default: %(default)s)")
parser.add_argument("--lr", type=cli.finite_float(0, 1, low_open=True), default=1e-3,
                    help="peak learning rate, in (0, 1] (default: %(default)s)")
parser.add_argument("--min-lr", type=cli.finite_float(0), default=1e-4,
                    help="learning rate at the end of the cosine, at most --lr (default: %(default)s)")
parser.add_argument("--warmup-iters", type=cli.non_negative_int, default=50,
                    help="linear warm-up steps (default: %(default)s)")
parser.add_argument("--weight-decay", type=cli.finite_float(0), default=0.1,
                    help="AdamW weight decay on matrices (default: %(default)s)")
parser.add_argument("--grad-clip", type=cli.finite_float(0, low_open=True), default=1.0,
                    help="clip the gradient norm to this, > 0 (default: %(default)s)")
parser.add_argument("--eval-interval", type=cli.positive_int, default=200,
                    help="steps between validations, and saves for --resume (default: %(default)s)")
parser.add_argument("--eval-tokens", type=cli.positive_int, default=50_000,
                    help="validation tokens per periodic check, from the start of valid (default: %(default)s)")
parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
parser.add_argument("--resume", action="store_true",
                    help="continue from --out's .last.pt: weights, optimizer, schedule step and random state")
args = parser.parse_args()
cpu.reuse_freed_memory()  # the big blocks of one step kept for the next: no page faults
if args.min_lr > args.lr:
    parser.error(f"--min-lr ({args.min_lr}) must not be above --lr ({args.lr})")
last_path = os.path.splitext(args.out)[0] + ".last.pt"
# what the model of a run depends on besides the config, vocabulary and corpus: --resume must be given the same
RESUME_ARGUMENTS = ("lr", "min_lr", "warmup_iters", "weight_decay", "grad_clip", "batch_size", "max_iters",
                    "eval_interval", "eval_tokens", "seed", "train_tokens", "precision")


def learning_rate(step):
    """Linear warm-up, then cosine decay to min_lr."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    progress = (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def random_batch():
    starts = torch.randint(len(train) - block_size - 1, (args.batch_size,))
    x = torch.stack([train[s:s + block_size] for s in starts])
    y = torch.stack([train[s + 1:s + block_size + 1] for s in starts])
    return x.to(args.device), y.to(args.device)


@torch.no_grad()
def validation_ppl():
    model.eval()
    with cpu.autocast(args.precision, args.device):
        cache = knnlm.score_split(model, valid, batch_size=16, progress=False)
    model.train()
    return knnlm.perplexity(cache["log_p_lm"])


def saved_so_far(best_step, best_ppl):
    """What --out holds now, said when a run fails: this run's best model, or nothing of this run."""
    if best_step is None:
        return (f"nothing was saved, and {args.out} is not this run's model" if os.path.exists(args.out)
                else "nothing was saved")
    return f"{args.out} holds this run's best model so far (step {best_step}, valid ppl {best_ppl:.2f})"


random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
n_layer, n_head, d_model, block_size = PRESETS[args.preset]
# one writer of a checkpoint at a time; its directory is checked writable before any work
interrupted = f"rerun with --resume to continue from the last validation ({last_path})"
with cli.user_errors(interrupted), files.writing(args.out), files.writing(last_path):
    for path in (args.out, last_path):
        checkpoints.check_replaceable(path)
    # data
    cli.check_device(args.device)
    args.precision = cpu.resolve_precision(args.precision, args.device)  # the checkpoint records which ran
    args.mkl = cpu.mkl_path()  # and which kernels of MKL multiplied (run.sh: AVX2 on an AMD CPU)
    data_dir = corpora.resolve_corpus(args.data)
    train_path = knnlm.split_path(data_dir, "train")
    vocab = knnlm.Vocab.build(train_path, args.min_freq, args.max_vocab)
    train = corpora.check_has_words(vocab.encode_file(train_path), train_path, "train on")
    corpus = {"file": train_path, "sha256": corpora.file_fingerprint(train_path)}
    if args.train_tokens is not None:
        if args.train_tokens > len(train):
            raise knnlm.KnnlmError(f"--train-tokens {args.train_tokens:,}: {train_path} has {len(train):,} tokens")
        train, corpus["tokens"] = train[:args.train_tokens], args.train_tokens
    valid_path = knnlm.split_path(data_dir, "valid")
    valid = corpora.check_has_words(vocab.encode_file(valid_path), valid_path, "validate on")[:args.eval_tokens]
    if len(train) < block_size + 2 or len(valid) < 2:
        raise knnlm.KnnlmError(f"{data_dir}: train has {len(train)} tokens and valid {len(valid)}; "
                               f"training needs more than the context of {block_size} tokens")
    print(f"vocabulary {len(vocab)} words, train {len(train):,} tokens, validating on {len(valid):,} tokens")

    # model
    cfg = knnlm.ModelConfig(vocab_size=len(vocab), block_size=block_size, n_layer=n_layer, n_head=n_head,
                            d_model=d_model, dropout=args.dropout)
    need, free = cpu.training_memory(cfg, args.batch_size, args.device), cpu.memory_free(args.device)
    if free is not None and need > free:
        raise knnlm.KnnlmError(f"a training step of --preset {args.preset} with --batch-size {args.batch_size} "
                               f"needs at least {need / 1e9:,.1f} GB, more than the {free / 1e9:,.1f} GB free on "
                               f"{args.device}: lower --batch-size, or pick a smaller --preset")
    model = knnlm.TransformerLM(cfg).to(args.device)
    threads = cpu.Threads().follow(model)
    masks = "knnlm.bernoulli_" if cpu.exact_bernoulli() else "torch's bernoulli_"  # the same bits, faster
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {cfg}; {args.precision}, {threads}; "
          f"dropout masks by {masks}")

    # optimizer: weight decay on matrices only, not on biases and LayerNorm gains
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    first_step, best_ppl, best_step = 0, math.inf, None
    history, losses = [], []  # the curve, at each validation: step, mean training loss since the last, valid ppl
    if args.resume:
        _, last_vocab, last = checkpoints.load_checkpoint(last_path, args.device)
        files.check_same({"config": asdict(cfg), "vocab": checkpoints.vocab_fingerprint(vocab), "corpus": corpus["sha256"],
                              **{f"--{name.replace('_', '-')}": getattr(args, name) for name in RESUME_ARGUMENTS}},
                             {"config": last["config"], "vocab": checkpoints.vocab_fingerprint(last_vocab),
                              "corpus": last["corpus"]["sha256"],
                              **{f"--{name.replace('_', '-')}": checkpoints.training_args(last).get(name)
                                 for name in RESUME_ARGUMENTS}},
                             "these arguments", last_path)
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        first_step, best_ppl, history = last["step"], last["best_ppl"], last.get("history", [])
        best_step = last.get("best_step", first_step if math.isfinite(best_ppl) else None)  # (older .last.pt files)
        torch.set_rng_state(last["rng"])
        if "cuda_rng" in last:
            torch.cuda.set_rng_state_all(last["cuda_rng"])
        print(f"resuming {last_path} at step {first_step} (best valid ppl {best_ppl:.2f})")

    # training loop
    start = time.time()
    bar = tqdm(range(first_step, args.max_iters), desc="train", unit="step", initial=first_step, total=args.max_iters)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        x, y = random_batch()
        with cpu.autocast(args.precision, args.device):
            loss = F.cross_entropy(model(x).view(-1, len(vocab)), y.view(-1))
        if not torch.isfinite(loss):
            raise knnlm.KnnlmError(f"the training loss is {loss.item()} at step {step + 1} (the run diverged: try a "
                                   f"lower --lr than {args.lr}); " + saved_so_far(best_step, best_ppl))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}",
                        tok_per_s=f"{(step + 1 - first_step) * x.numel() / (time.time() - start):.0f}", refresh=False)
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
            ppl = validation_ppl()
            history.append({"step": step + 1, "train_loss": sum(losses) / len(losses), "valid_ppl": ppl})
            losses = []
            if ppl < best_ppl:
                best_ppl, best_step = ppl, step + 1
                checkpoints.save_checkpoint(args.out, model, vocab, step=step + 1, valid_ppl=ppl, corpus=corpus,
                                            history=history, args=vars(args))
            cuda_rng = {"cuda_rng": torch.cuda.get_rng_state_all()} if args.device.startswith("cuda") else {}
            checkpoints.save_checkpoint(last_path, model, vocab, step=step + 1, valid_ppl=ppl, best_ppl=best_ppl,
                                      best_step=best_step, corpus=corpus, history=history,
                                  optimizer=optimizer.state_dict(), rng=torch.get_rng_state(), **cuda_rng, args=vars(args))
            tqdm.write(f"step {step + 1}: train loss {loss.item():.3f}, valid ppl {ppl:.2f} "
                       f"(best {best_ppl:.2f}), {time.time() - start:.0f}s")
    if best_step is None:  # every validation perplexity was NaN or infinite
        raise knnlm.KnnlmError("the validation perplexity was never finite: " + saved_so_far(best_step, best_ppl))
    print(f"best valid perplexity {best_ppl:.2f} at step {best_step} (on the first {len(valid):,} valid tokens), "
          f"saved to {args.out}")
