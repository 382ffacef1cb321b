"""
Generate text with the LM and with kNN-LM side by side, and show the neighbours behind
each kNN-LM token (the paper's Table 6, live).

    python sample.py --prompt "The game was released in" --show-neighbours

First the LM's continuation (p_LM alone), then kNN-LM's: p = λ p_kNN + (1 - λ) p_LM (eq. 3),
p_kNN over the whole vocabulary from the k nearest datastore keys (eq. 2). Each step feeds the
model's context window (the last block_size tokens) and searches with the key of the last
position. Greedy by default; --sample draws from the final distribution (after --top-k/--top-p).
The prompt is split on whitespace like WikiText (unknown words become <unk>) and begins a new
paragraph: it follows an <eos> (¶), and an empty prompt starts from that <eos> alone.
--show-neighbours reads the datastore's source text (once) to show what each neighbour stored.
λ and T default to the paper's; `python evaluate.py --tune` prints the values tuned on valid
for a model and datastore, to pass here.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

import knnlm
from knnlm_tools import corpora, checkpoints, datastores, cli

CONTEXT_WORDS = 12  # words of stored text shown before a neighbour

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                 parents=[cli.arguments("checkpoint", "window", "datastore", "k", "lambda", "temperature",
                                                              "nprobe", "device")])
parser.add_argument("--prompt", default="", help="words to continue (default: empty, a new paragraph)")
parser.add_argument("--tokens", type=cli.positive_int, default=40, help="tokens to generate (default: %(default)s)")
parser.add_argument("--sample", action="store_true", help="sample from the distribution (default: greedy)")
parser.add_argument("--top-k", type=cli.positive_int, default=None, help="--sample: only the k likeliest tokens")
parser.add_argument("--top-p", type=float, default=None,
                    help="--sample: only the likeliest tokens whose probabilities sum to p (nucleus sampling)")
parser.add_argument("--seed", type=int, default=0, help="random seed of --sample, the same for both (default: %(default)s)")
cli.backend_argument(parser)
parser.add_argument("--show-neighbours", type=cli.positive_int, nargs="?", const=3, default=0, metavar="N",
                    help="for each kNN-LM token: p_LM, p_kNN, p, and its N nearest neighbours with the text "
                         "before them (default N: %(const)s)")
args = parser.parse_args()
cli.check_knnlm_arguments(parser, args)
if args.top_p is not None and not 0 < args.top_p <= 1:
    parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
if (args.top_k or args.top_p) and not args.sample:
    parser.error("--top-k and --top-p cut the distribution --sample draws from: add --sample")

with cli.user_errors(interrupted="nothing was generated"):
    model, vocab, _ = checkpoints.load_model(args.checkpoint, cli.check_device(args.device), args.window)
    datastore = datastores.DiskDatastore(args.datastore)
    datastore.check_model(model, vocab, args.checkpoint)
    backend = datastore.use(args.backend, args.device, args.k, args.nprobe)
prompt = vocab.encode_prompt(args.prompt)
print(f"model {args.checkpoint}, datastore {args.datastore}: {len(datastore):,} keys ({datastore.key_type}), "
      f"search {backend}; k = {args.k}, λ = {args.lmbda}, T = {args.temperature}, "
      + (f"sampled (seed {args.seed})" if args.sample else "greedy"))


def text(ids):
    return vocab.decode(ids).replace(knnlm.EOS, "¶").replace("\n", "¶")


def pick(log_p, generator):
    """The next token from log p [V]: the likeliest, or a draw after the top-k / top-p cut."""
    if not args.sample:
        return log_p.argmax().item()
    probs, ids = log_p.exp().sort(descending=True)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if args.top_k:
        keep[args.top_k:] = False
    if args.top_p:
        keep &= probs.cumsum(0) - probs < args.top_p  # the smallest prefix whose mass reaches p
    return ids[torch.multinomial(probs * keep, 1, generator=generator)].item()


@torch.no_grad()
def generate(use_knn):
    """--tokens tokens after the prompt; -> (their ids, per token what --show-neighbours prints: the token,
    its p_LM, p_kNN and p, and the distances, weights and rows of its nearest neighbours)."""
    tokens, steps = list(prompt), []
    generator = torch.Generator().manual_seed(args.seed)  # the same draws for the LM and kNN-LM
    for _ in range(args.tokens):
        x = torch.tensor(tokens[-model.cfg.block_size:], device=args.device)[None]
        logits, keys = model(x, key_type=datastore.key_type)
        log_p_lm = F.log_softmax(logits[0, -1].float(), dim=-1).cpu()                # [V]
        if not use_knn:
            tokens.append(pick(log_p_lm, generator))
            continue
        dists, ids = (t.cpu() for t in datastore.search(keys[0, -1:].float(), args.k))  # [1, k]
        vals = datastore.vals[ids]
        p_knn = knnlm.knn_distribution(dists, vals, len(vocab), args.temperature)[0]  # eq. 2
        log_p = knnlm.interpolate(log_p_lm, p_knn.log(), args.lmbda)                 # eq. 3
        tokens.append(pick(log_p, generator))
        if args.show_neighbours:  # what is printed, not three distributions over the vocabulary per token
            token, n = tokens[-1], args.show_neighbours
            weights = torch.softmax(knnlm.neighbour_scores(dists, args.temperature)[0], dim=0)  # eq. 2's weights
            steps.append((token, log_p_lm[token].exp().item(), p_knn[token].item(), log_p[token].exp().item(),
                          dists[0, :n].tolist(), weights[:n].tolist(), ids[0, :n].tolist()))
    return tokens[len(prompt):], steps


with cli.user_errors(interrupted="nothing was generated"):
    lm_tokens, _ = generate(use_knn=False)
    knn_tokens, steps = generate(use_knn=True)
print(f"prompt: {text(prompt)}")
print(f"LM:     {text(lm_tokens)}")
print(f"kNN-LM: {text(knn_tokens)}")
if not args.show_neighbours:
    sys.exit()

# The text behind each neighbour: datastore row r is the key of source[:r + 1], its value source[r + 1]
source, source_tokens = datastore.meta.source, None
if source is None:
    print("(the datastore records no source text: neighbours are shown without their context)")
elif not os.path.isfile(source["file"]):
    print(f"({source['file']}, the datastore's source, is missing: neighbours are shown without their context)")
elif corpora.file_fingerprint(source["file"]) != source["sha256"]:
    print(f"({source['file']} changed since the datastore was built: neighbours are shown without their context)")
else:
    with cli.user_errors(interrupted="the neighbours' text was not shown"):
        source_tokens = vocab.encode_file(source["file"])

for i, (token, p_lm, p_knn, p, dists, weights, ids) in enumerate(steps, 1):
    print(f"\n{i}. {text([token])!r}: p_LM {p_lm:.4f} | p_kNN {p_knn:.4f} | p {p:.4f}")
    print(f"   {'distance²':>10} {'weight':>7}  {'row':>9}  text before it [value]")
    for d, w, row in zip(dists, weights, ids):
        value = text([datastore.vals[row].item()])
        before = "" if source_tokens is None else ("… " * (row + 1 > CONTEXT_WORDS) + text(
            knnlm.row_context(source_tokens, row, CONTEXT_WORDS)[0].tolist()) + " ")
        print(f"   {d:10.3f} {w:7.3f}  {row:9d}  {before}[{value}]")
