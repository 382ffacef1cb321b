# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # kNN-LM, step by step, on real WikiText-103 text
#
# A walk through *Generalization through Memorization: Nearest Neighbor Language Models*
# (Khandelwal et al., ICLR 2020) with [`knnlm.py`](../knnlm.py), in the paper's order:
# a language model, the datastore of its training contexts (eq. 1), the neighbours of one
# query, p_kNN (eq. 2), the interpolation with the LM (eq. 3), and the perplexity of a split.
#
# Everything is scaled down to run in about two minutes on one CPU core, training included:
#
# | | paper | here |
# | --- | --- | --- |
# | training text (= datastore) | WikiText-103 train, 103 M tokens | its first 200 k tokens |
# | vocabulary | 267 k words | the 3,000 most frequent words of the 0.5 M-token train file |
# | model | 16 layers, d = 1024, context 3072, 247 M parameters | 2 layers, d = 128, context 64, 0.8 M parameters, 800 steps |
# | search | FAISS IVF-PQ over 103 M keys, k = 1024 | exact search over 200 k keys, k = 1024 |
# | λ, T | 0.25, 1 (tuned on valid) | tuned on half of a 15 k-token valid slice, reported on the other half |
#
# Run it as a script from the repository root (`python docs/walkthrough.py`) or as a notebook
# (`jupyter notebook docs/walkthrough.ipynb`). `KNNLM_DATA` points to another corpus,
# `KNNLM_WALKTHROUGH_QUICK=1` shrinks every step (the test runs it on a toy corpus), and
# `KNNLM_WALKTHROUGH_PLOTS=DIR` also saves the plots as PNG files in DIR.

# %%
import math
import os
import sys
import time

import matplotlib
import torch
import torch.nn.functional as F

NOTEBOOK = hasattr(sys, "ps1") or "ipykernel" in sys.modules
if not NOTEBOOK:
    matplotlib.use("Agg")  # a script draws to files only
import matplotlib.pyplot as plt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) if "__file__" in globals() else os.path.abspath("..")
sys.path.insert(0, ROOT)
import knnlm
from knnlm_tools import corpora

QUICK = os.environ.get("KNNLM_WALKTHROUGH_QUICK") == "1"
DATA = os.environ.get("KNNLM_DATA", os.path.join(ROOT, "..", "shared", "data", "wikitext-103-small"))
if "KNNLM_DATA" not in os.environ and not os.path.isdir(DATA):
    DATA = os.path.join(ROOT, "data", "wikitext-103-small")
PLOTS = os.environ.get("KNNLM_WALKTHROUGH_PLOTS")

TRAIN_TOKENS, VALID_TOKENS, STEPS = (3_000, 600, 40) if QUICK else (200_000, 15_000, 800)
BLOCK, D_MODEL = (32, 32) if QUICK else (64, 128)
torch.set_num_threads(1)  # this small model gains little from a second thread, and loses a lot on a busy machine
torch.manual_seed(0)
torch.set_grad_enabled(False)  # the model only predicts, except in the training loop


def show(fig, name):
    """Inline in a notebook; a PNG file in $KNNLM_WALKTHROUGH_PLOTS when it is set."""
    if PLOTS:
        os.makedirs(PLOTS, exist_ok=True)
        fig.savefig(os.path.join(PLOTS, f"{name}.png"), dpi=120, bbox_inches="tight")
        print(f"saved {os.path.join(PLOTS, name)}.png")
    plt.show() if NOTEBOOK else plt.close(fig)


# %% [markdown]
# ## 1. Data
#
# WikiText-103 is already tokenised, one paragraph per line, rare words already `<unk>`; every
# line ends with `<eos>`. The vocabulary comes from the training file (here capped at its
# 3,000 most frequent words: a small softmax keeps the model small, at the price of more
# `<unk>`), and both splits become tensors of word ids.

# %%
data_dir = corpora.resolve_corpus(DATA)
vocab = knnlm.Vocab.build(knnlm.split_path(data_dir, "train"), min_freq=3, max_size=3_000)
train = vocab.encode_file(knnlm.split_path(data_dir, "train"))[:TRAIN_TOKENS]
valid = vocab.encode_file(knnlm.split_path(data_dir, "valid"))[:VALID_TOKENS]
print(f"{data_dir}: vocabulary {len(vocab):,} words, train slice {len(train):,} tokens, "
      f"valid slice {len(valid):,} tokens ({(valid == vocab.unk).float().mean():.0%} <unk>)")
print("train starts:", vocab.decode(train[:40].tolist()))

# %% [markdown]
# ## 2. The language model
#
# kNN-LM adds nothing to training: any trained LM will do. `knnlm.TransformerLM` is a
# GPT-style decoder; here 2 layers of width 128 over a context of 64 tokens, trained as
# `train.py` does it (AdamW, linear warm-up, cosine decay, gradient clipping) for 800 steps of
# 16 random windows from the training slice, about four passes over it. The perplexity is the
# LM's alone, on the valid slice.

# %%
cfg = knnlm.ModelConfig(vocab_size=len(vocab), block_size=BLOCK, n_layer=2, n_head=4, d_model=D_MODEL,
                        dropout=0.0)  # a short run: underfitting is the risk, not overfitting
model = knnlm.TransformerLM(cfg)


def lm_perplexity():
    model.eval()
    return knnlm.perplexity(knnlm.score_split(model, valid, progress=False)["log_p_lm"])


def learning_rate(step, peak=3e-3, floor=3e-4, warmup=STEPS // 10):
    if step < warmup:
        return peak * (step + 1) / warmup
    return floor + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (STEPS - warmup))) * (peak - floor)


print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
      f"valid perplexity before training {lm_perplexity():,.0f}")
optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                              betas=(0.9, 0.95))
model.train()
start = time.time()
for step in range(STEPS):
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step)
    starts = torch.randint(len(train) - BLOCK - 1, (16,)).tolist()
    x = torch.stack([train[s:s + BLOCK] for s in starts])
    y = torch.stack([train[s + 1:s + BLOCK + 1] for s in starts])
    with torch.enable_grad():
        loss = F.cross_entropy(model(x).view(-1, len(vocab)), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
print(f"{STEPS} steps in {time.time() - start:.0f} s, last train loss {loss.item():.2f}; "
      f"valid perplexity after training {lm_perplexity():.1f}")

# %% [markdown]
# ## 3. The key of a context, f(x)
#
# kNN-LM represents a context x by a hidden state of the LM, f(x). The paper compares five
# (Table 5) and keeps the input of the final layer's feed-forward block after its LayerNorm
# (`ffn_in_ln`). `model(x, key_type=...)` returns the logits and that state at every
# position: position t holds the key of the context `x[:t + 1]`, whose next word is `x[t + 1]`.

# %%
x = valid[:BLOCK + 1]  # one window of valid text and the word after it
logits, keys = model(x[None, :-1], key_type="ffn_in_ln")  # [1, T, V], [1, T, d]
print(f"logits {list(logits.shape)}, keys {list(keys.shape)}")
print(f"the key of '... {vocab.decode(x[BLOCK - 6:BLOCK].tolist())}' is keys[0, -1], "
      f"{keys.shape[-1]} numbers: {[round(v, 3) for v in keys[0, -1, :4].tolist()]} ...")
for name, what in knnlm.KEY_TYPES.items():
    print(f"  {name:10s} {what}")

# %% [markdown]
# ## 4. The datastore (eq. 1)
#
# $(\mathcal{K}, \mathcal{V}) = \{(f(c_i), w_i) \mid (c_i, w_i) \in \mathcal{D}\}$: one forward
# pass over the training text stores, for every target word $w_i$, the key of its left
# context $c_i$. The paper slides windows of 3072 tokens and keeps the last 1536 of each, so
# every key sees at least 1536 tokens of context; here windows of 64 keep their last 32.
# Row r is the key of `train[:r + 1]` with the value `train[r + 1]` (`knnlm.row_context`).
# Keys are stored in float16, as in the paper.

# %%
start = time.time()
datastore = knnlm.build_datastore(model.eval(), train, batch_size=64)
print(f"{len(datastore):,} rows: keys {list(datastore.keys.shape)} {datastore.keys.dtype} "
      f"({datastore.keys.numel() * 2 / 2**20:.1f} MiB), values {list(datastore.vals.shape)}, "
      f"built in {time.time() - start:.1f} s")
row = len(datastore) // 2
context, value = knnlm.row_context(train, row, 12)
print(f"row {row:,}: key = f('... {vocab.decode(context.tolist())}'), value = '{vocab.itos[value]}'")

# %% [markdown]
# ## 5. The neighbours of one query
#
# At test time the key of the context, the query, retrieves the k nearest keys of the
# datastore by squared L2 distance (here an exact search, `knnlm.topk_l2`; the paper uses FAISS,
# `knnlm.build_index`). We search with all the keys of section 3, then follow one position
# with at least 32 tokens of context: the one whose next word is the rarest word that some
# neighbour carries (the paper finds kNN-LM helps most on rare patterns such as names).

# %%
K = min(1024, len(datastore))  # the paper's k
targets = x[1:]  # [T]: the word after each context
dists, ids = datastore.search(keys[0], K)  # [T, k] each, nearest first
vals = datastore.vals[ids]  # [T, k]: the word that followed each neighbour's context
carried = (vals == targets[:, None]).any(1)
t = max(range(BLOCK // 2, BLOCK), key=lambda t: carried[t] * targets[t])  # ids are sorted by frequency
target = targets[t]
print(f"query: '... {vocab.decode(x[t - 11:t + 1].tolist())}' -> next word '{vocab.itos[target]}'")
for d, i in zip(dists[t, :5].tolist(), ids[t, :5].tolist()):
    context, value = knnlm.row_context(train, i, 10)
    print(f"  d = {d:.4f}  -> {vocab.itos[value]:10s} '... {vocab.decode(context.tolist())}'")
print(f"{(vals[t] == target).sum()} of the {K} neighbours are followed by '{vocab.itos[target]}'")
if carried[t]:
    rank = (vals[t] == target).nonzero()[0].item()  # the nearest of them
    context, _ = knnlm.row_context(train, ids[t, rank].item(), 10)
    print(f"  the nearest is number {rank + 1}: d = {dists[t, rank]:.4f}, '... {vocab.decode(context.tolist())}'")

# %% [markdown]
# ## 6. p_kNN (eq. 2)
#
# $$p_{kNN}(y \mid x) \propto \sum_{(k_i, v_i) \in \mathcal{N}} \mathbb{1}_{y = v_i} \exp(-d(k_i, f(x)) / T)$$
#
# A softmax over the k neighbours' negative distances, then the weights of the neighbours that
# carry the same word are summed. The paper uses T = 1; so do we here, and tune T in
# section 8 (how far apart keys lie depends on the model, so the best T does too). `knnlm.knn_log_prob` gives log p_kNN of one word (as the evaluation needs it) and
# `knnlm.knn_distribution` the whole distribution over the vocabulary.

# %%
T = 1.0
weights = torch.softmax(-dists[t] / T, dim=0)  # [k]
p_by_hand = weights[vals[t] == target].sum()
p_function = knnlm.knn_log_prob(dists[t:t + 1], vals[t:t + 1], target[None], T).exp()[0]
p_distribution = knnlm.knn_distribution(dists[t:t + 1], vals[t:t + 1], len(vocab), T)[0]  # [V]
assert torch.allclose(p_by_hand, p_function) and torch.allclose(p_by_hand, p_distribution[target])
print(f"p_kNN('{vocab.itos[target]}'): by hand {p_by_hand:.6f} == knn_log_prob {p_function:.6f} "
      f"== knn_distribution {p_distribution[target]:.6f}")
print(f"softmax weights from {weights[0]:.2e} (nearest) to {weights[-1]:.2e} (k-th); uniform would be {1 / K:.2e}")
top = p_distribution.topk(5)
print("most likely under p_kNN:", ", ".join(f"{vocab.itos[w]} {p:.3f}" for p, w in zip(*top)))

# %% [markdown]
# ## 7. Interpolation with the LM (eq. 3)
#
# $$p(y \mid x) = \lambda\, p_{kNN}(y \mid x) + (1 - \lambda)\, p_{LM}(y \mid x)$$
#
# with the paper's λ = 0.25. `knnlm.interpolate` computes it in log space.

# %%
lmbda = 0.25
p_lm = F.softmax(logits[0, t], dim=-1)[target]
p = knnlm.interpolate(p_lm.log(), p_function.log(), lmbda).exp()
assert torch.allclose(p, lmbda * p_function + (1 - lmbda) * p_lm)
print(f"'{vocab.itos[target]}': p_LM {p_lm:.4f}, p_kNN {p_function:.4f}, p at λ = {lmbda}: {p:.4f}")

# %% [markdown]
# ## 8. Evaluation: perplexity over the valid slice
#
# `knnlm.score_split` runs the model over the split in sliding windows and, for every target
# word, keeps log p_LM and its k nearest neighbours (distances and values). Every (λ, T) is then
# a cheap re-mix of that cache (`knnlm.knnlm_log_probs`), so the paper's tuning on valid costs
# one pass. We tune λ and T on the first half of the slice and report the second half: tuning
# and reporting on the same tokens would flatter kNN-LM.

# %%
start = time.time()
cache = knnlm.score_split(model, valid, datastore, k=K, progress=False, keep_queries=True)
print(f"{len(cache['targets']):,} tokens scored with k = {K} in {time.time() - start:.0f} s "
      f"({cache['search_seconds']:.0f} s searching)")
n = len(cache["targets"]) // 2
tune_half = {name: v[:n] for name, v in cache.items() if torch.is_tensor(v)}
report_half = {name: v[n:] for name, v in cache.items() if torch.is_tensor(v)}
best_lmbda, best_T, _, results = knnlm.tune(tune_half, knnlm.LAMBDAS, knnlm.TEMPERATURES)
print(f"tuned on the first half: λ = {best_lmbda}, T = {best_T}")
print(f"second half: LM {knnlm.perplexity(report_half['log_p_lm']):.2f}, "
      f"kNN-LM at the paper's λ = 0.25, T = 1: {knnlm.perplexity(knnlm.knnlm_log_probs(report_half, 0.25, 1.0)):.2f}, "
      f"at the tuned λ, T: {knnlm.perplexity(knnlm.knnlm_log_probs(report_half, best_lmbda, best_T)):.2f}")

# %% [markdown]
# The λ curve: perplexity against λ at the tuned T, on both halves. λ = 0 is the LM alone,
# λ = 1 is p_kNN alone (infinite when some target is carried by none of its k neighbours).

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for half, c in (("tuning half", tune_half), ("reported half", report_half)):
    ax.plot(knnlm.LAMBDAS, [knnlm.perplexity(knnlm.knnlm_log_probs(c, l, best_T)) for l in knnlm.LAMBDAS],
            marker="o", label=half)
ax.axvline(best_lmbda, color="grey", linestyle=":", label=f"tuned λ = {best_lmbda}")
ax.set(xlabel="λ", ylabel="perplexity", title=f"kNN-LM on the valid slice, T = {best_T}")
ax.legend()
show(fig, "lambda_curve")

# %% [markdown]
# ## 9. One explanation: where p_kNN helps most
#
# The token whose p_kNN (at the tuned T) most exceeds its p_LM, among those with at least 32 tokens
# of context, its nearest neighbours in the training text, and p_kNN summed per word. `score_split` kept the query keys
# (`keep_queries=True`), so the neighbours' rows can be searched again to show their contexts.

# %%
p_knn = knnlm.knn_log_prob(cache["dists"], cache["neighbour_vals"], cache["targets"], best_T).exp()
p_lm = cache["log_p_lm"].exp()
i = BLOCK // 2 + (p_knn - p_lm)[BLOCK // 2:].argmax().item()  # scored target i is valid[i + 1]
target = cache["targets"][i]
print(f"'... {vocab.decode(valid[max(0, i - 11):i + 1].tolist())}' -> '{vocab.itos[target]}': "
      f"p_LM {p_lm[i]:.4f}, p_kNN {p_knn[i]:.4f}")
dists, ids = datastore.search(cache["queries"][i:i + 1], 5)
for d, r in zip(dists[0].tolist(), ids[0].tolist()):
    context, value = knnlm.row_context(train, r, 10)
    print(f"  d = {d:.4f}  -> {vocab.itos[value]:10s} '... {vocab.decode(context.tolist())}'")

by_word = knnlm.knn_distribution(cache["dists"][i:i + 1], cache["neighbour_vals"][i:i + 1].long(),
                                 len(vocab), best_T)[0]
top = by_word.topk(min(10, len(vocab)))
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.bar([vocab.itos[w] for w in top.indices], top.values,
       color=["tab:orange" if w == target else "tab:blue" for w in top.indices])
ax.set(ylabel="p_kNN: weights summed per word",
       title=f"next word '{vocab.itos[target]}' (orange): p_LM {p_lm[i]:.3f}, p_kNN {p_knn[i]:.3f}")
ax.tick_params(axis="x", rotation=45)
show(fig, "explanation")
