"""
kNN-LM: "Generalization through Memorization: Nearest Neighbor Language Models"
(Khandelwal et al., ICLR 2020): the method, in one module that reads top to bottom like the paper.

    1. Data          WikiText files -> vocabulary -> integer tensors
    2. Model         a decoder-only Transformer LM that also returns the kNN key f(c)
    3. Datastore     (f(c_i), w_i) for every training context                  (eq. 1)
    4. Exact search  the k nearest keys by squared L2
    5. FAISS index   the paper's approximate search (IVF-PQ), re-ranked exactly
    6. kNN-LM        p_kNN from the neighbours (eq. 2), mixed with p_LM (eq. 3)
    7. Cache         the continuous cache of Table 1 (Grave et al., 2017): the text's own recent past
    8. Evaluation    perplexity over a whole split with a sliding window

Everything around the method (downloads, checkpoints, datastores on disk and their manifests,
resumable and sharded builds, the FAISS index build pipeline, the C++/CUDA kernel, locks)
lives in the package knnlm_tools/, one module per concern.
"""
import math
import os
import time
from collections import Counter
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


class KnnlmError(Exception):
    """Bad input or mismatched files: the scripts print the message in one line and exit with code 2."""


# -----------------------------------------------------------------------------
# 1. Data
# WikiText `wiki.{train,valid,test}.tokens`: one paragraph per line, already
# tokenised, rare words already <unk>. Every line ends with an <eos> token.

SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"


def split_path(data_dir, split):
    return os.path.join(data_dir, f"wiki.{split}.tokens")


def read_lines(path, desc=None):
    """The words of each line of a WikiText file. A line ends at \\n only (a \\r is a space, so
    CRLF files read the same), and a UTF-8 byte-order mark is not a word. A file of 16 MB or more
    (WikiText-103's train) shows a progress bar while it is read."""
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        try:
            for line in tqdm(f, desc=desc or f"read {os.path.basename(path)}", unit=" lines", leave=False,
                             disable=os.path.getsize(path) < 1 << 24):
                yield line.split()
        except UnicodeDecodeError as e:
            raise KnnlmError(f"{path} is not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x})") from None


def read_words(path):
    """The tokens of a WikiText file: each line's words, then <eos>."""
    for words in read_lines(path):
        yield from words
        yield EOS


class Vocab:
    """Word <-> id. Built from the training split; anything else maps to <unk>."""

    def __init__(self, words):
        self.itos = list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.unk = self.stoi[UNK]

    @classmethod
    def build(cls, path, min_freq=1, max_size=None):
        if max_size is not None and max_size < 3:
            raise KnnlmError(f"--max-vocab must be at least 3 (<eos>, <unk> and one word), got {max_size}")
        counts = Counter(read_words(path))
        counts.pop(EOS, None), counts.pop(UNK, None)
        words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls([EOS, UNK] + words[:None if max_size is None else max_size - 2])

    def __len__(self):
        return len(self.itos)

    def encode_file(self, path):
        get, unk = self.stoi.get, self.unk
        return torch.tensor([get(w, unk) for w in read_words(path)], dtype=torch.long)

    def encode_prompt(self, text):
        """A prompt that begins a new paragraph: <eos>, then its words."""
        return [self.stoi[EOS]] + [self.stoi.get(w, self.unk) for w in text.split()]

    def decode(self, ids):
        return " ".join(self.itos[i] for i in ids)


# -----------------------------------------------------------------------------
# 2. Model
# A GPT-style pre-LayerNorm Transformer LM with tied input/output embeddings.
# Besides the logits it returns the kNN key f(c): by default the input of the
# final layer's feed-forward block after its LayerNorm, the paper's best key
# (Table 5). The other keys of Table 5 are reachable by name.

KEY_TYPES = {
    "ffn_in_ln": "input of the final FFN block, after its LayerNorm (paper's best, default)",
    "ffn_in": "input of the final FFN block, before its LayerNorm",
    "attn_out": "output of the final self-attention (before the residual add)",
    "block_in": "input of the final Transformer block",
    "block_out": "output of the final Transformer block, before the final LayerNorm",
}


@dataclass
class ModelConfig:
    vocab_size: int
    block_size: int = 256  # context length
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    dropout: float = 0.1


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # causal: each position attends only to itself and the positions to its left
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.d_model), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)

    def forward(self, x, taps=None, at=None):
        """x [B, T, d] -> [B, T, d]; with `at`, a bool mask [B, T], the output at its positions only [n, d]:
        the feed-forward part acts on each position alone, so it runs only where the output is needed."""
        attn_out = self.attn(self.ln_1(x))
        ffn_in = x + attn_out
        ffn_in_ln = self.ln_2(ffn_in)
        if taps is not None:  # the candidate kNN keys of Table 5
            taps.update(block_in=x, attn_out=attn_out, ffn_in=ffn_in, ffn_in_ln=ffn_in_ln)
        if at is not None:
            ffn_in, ffn_in_ln = ffn_in[at], ffn_in_ln[at]
        out = ffn_in + self.mlp(ffn_in_ln)
        if taps is not None:
            taps["block_out"] = out
        return out


class TransformerLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, key_type=None, at=None):
        """idx [B, T] -> logits [B, T, V], and the keys [B, T, d] if key_type is given. With `at`, a bool
        mask [B, T], only the logits at its positions [n, V]: the output layer is most of a small model's
        work, and a sliding window scores half its positions (none: the datastore needs the keys alone). The
        last block's MLP and the final LayerNorm then run only there too."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context {self.cfg.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        taps = {}
        for block in self.blocks[:-1]:
            x = block(x)
        if key_type == "block_out":  # a key needed at every position
            x = self.blocks[-1](x, taps)
            x = x if at is None else x[at]
        else:  # past the last attention each position is on its own: the rest runs only where a logit is asked for
            x = self.blocks[-1](x, taps, at)
        logits = self.ln_f(x) @ self.wte.weight.T  # tied input/output embeddings
        return logits if key_type is None else (logits, taps[key_type])


# -----------------------------------------------------------------------------
# Sliding windows, shared by the datastore (section 3) and the evaluation (8).
# Every target token is scored exactly once and, past the start of the text,
# with at least `min_context` tokens of left context: windows of `block_size`
# tokens advance by `block_size - min_context`, and only the targets not yet
# scored count (the paper: windows of 3072, the last 1536 scored).

def resolve_min_context(min_context, block_size):
    """None means half the context, as in the paper (1536 of 3072)."""
    if min_context is None:
        return block_size // 2
    if not 0 <= min_context < block_size:
        raise KnnlmError(f"--min-context must be in [0, {block_size}) for this model's context, got {min_context}")
    return min_context


def sliding_windows(n, block_size, min_context):
    """The windows (begin, end, first scored position) over a text of n tokens. A window's
    scored targets tokens[begin + first + 1 : end + 1] are datastore rows begin + first .. end - 1."""
    min_context = resolve_min_context(min_context, block_size)
    stride = block_size - min_context
    windows, scored_up_to = [], 0  # targets tokens[1 : scored_up_to + 1] are done
    for begin in range(0, n - 1, stride):
        end = min(begin + block_size, n - 1)
        windows.append((begin, end, scored_up_to - begin))
        scored_up_to = end
        if end == n - 1:
            break
    return windows


def sliding_batches(tokens, block_size, min_context, batch_size, windows=None):
    """Yield (inputs [b, T], targets [b, T], scored [b, T] bool), in text order.
    Over all batches the scored targets are exactly tokens[1:], in order (or those of `windows`)."""
    if windows is None:
        windows = sliding_windows(len(tokens), block_size, min_context)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        T = max(end - begin for begin, end, _ in chunk)
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.zeros(len(chunk), T, dtype=torch.long)
        scored = torch.zeros(len(chunk), T, dtype=torch.bool)
        for j, (begin, end, first) in enumerate(chunk):
            x[j, :end - begin] = tokens[begin:end]
            y[j, :end - begin] = tokens[begin + 1:end + 1]
            scored[j, first:end - begin] = True  # right padding is never scored
        yield x, y, scored


# -----------------------------------------------------------------------------
# 3. Datastore (eq. 1)
# (K, V) = {(f(c_i), w_i) | (c_i, w_i) in D}: one forward pass over a text
# stores, for every target token w_i, the key f(c_i) of its left context.
# Row r holds the key of tokens[:r + 1] and the value tokens[r + 1]. Keys are
# kept in float16, half the memory of float32 (the paper does the same).

@torch.no_grad()
def datastore_rows(model, tokens, key_type="ffn_in_ln", min_context=None, batch_size=16, windows=None):
    """eq. 1, batch by batch: yield (keys [b, d] float32, values [b]) for the next b rows, in row order
    (with `windows`, those windows' rows only)."""
    device = next(model.parameters()).device
    min_context = resolve_min_context(min_context, model.cfg.block_size)
    for x, y, scored in sliding_batches(tokens, model.cfg.block_size, min_context, batch_size, windows):
        scored = scored.to(device)
        _, keys = model(x.to(device), key_type=key_type, at=torch.zeros_like(scored))  # the keys alone, no logits
        yield keys[scored].float().cpu(), y[scored.cpu()]


class Datastore:
    """keys [N, d] (float16) and vals [N]: the (f(c_i), w_i) of eq. 1, and how to search them.
    Here the search is exact (section 4); datastores.DiskDatastore is one on disk, searched by
    the C++/CUDA kernel or the FAISS index."""

    def __init__(self, keys, vals, key_type="ffn_in_ln"):
        self.keys, self.vals, self.key_type = keys, vals, key_type
        self.key_norms = squared_norms(keys)

    def __len__(self):
        return len(self.vals)

    def search(self, queries, k):
        """queries [B, d] -> (squared distances [B, k] ascending, ids [B, k])."""
        return topk_l2(queries, self.keys, k, self.key_norms)


def build_datastore(model, tokens, key_type="ffn_in_ln", min_context=None, batch_size=16):
    """The datastore of a text, in memory (datastores.build_datastore writes one to disk, resumably)."""
    keys, vals = zip(*datastore_rows(model, tokens, key_type, min_context, batch_size))
    return Datastore(torch.cat(keys).half(), torch.cat(vals), key_type)


def row_context(tokens, row, width):
    """Where datastore row `row` comes from in the text `tokens` it was built from: its key is
    f(tokens[:row + 1]) and its value tokens[row + 1]. -> (the last `width` tokens of that
    context, the value). Explanations use it to show the text behind a neighbour."""
    return tokens[max(0, row + 1 - width):row + 1], tokens[row + 1]


# -----------------------------------------------------------------------------
# 4. Exact search
# Exact k-nearest-neighbour search by squared L2 distance:
#     ||q - k||^2 = ||q||^2 - 2 q.k + ||k||^2
# with the key norms computed once, the inner products by one matmul per chunk
# of keys, a top-k per chunk, and a merge with the best found so far.
# float16 keys are converted to float32 chunk by chunk (CPU fp16 matmul is slow).
# This is the readable reference; csrc/ holds the same steps as a C++ and a CUDA
# kernel with a cheaper selection (torch.ops.knnlm.topk_l2; knnlm_tools/search.py picks it).
# Equal distances go to the smaller id (here only among the k returned, as
# torch.topk picks freely among keys tied for the k-th place).

def squared_norms(keys, chunk_size=1 << 16, release=lambda: None):
    """||k||^2 for every key, chunk by chunk (release() after each: lets a memory-mapped file's pages go)."""
    norms = []
    for i in range(0, len(keys), chunk_size):
        norms.append(keys[i:i + chunk_size].float().pow(2).sum(1))
        release()
    return torch.cat(norms)


def check_search_inputs(queries, keys, k, key_norms):
    """The shapes and types topk_l2 (and the kernel) take, or a clear error."""
    if keys.dim() != 2:
        raise ValueError(f"keys must be [N, d], got {tuple(keys.shape)}")
    N, d = keys.shape
    if queries.dim() != 2 or queries.shape[1] != d:
        raise ValueError(f"queries must be [B, {d}] like the keys, got {tuple(queries.shape)}")
    if not 0 < k <= N:
        raise ValueError(f"k must be in [1, {N}] (the number of keys), got {k}")
    if queries.dtype != torch.float32:
        raise TypeError(f"queries must be float32, got {queries.dtype}")
    if keys.dtype not in (torch.float16, torch.float32):
        raise TypeError(f"keys must be float16 or float32, got {keys.dtype}")
    if key_norms.dtype != torch.float32 or key_norms.shape != (N,):
        raise TypeError(f"key_norms must be float32 [{N}], got {key_norms.dtype} {list(key_norms.shape)}")


def topk_l2(queries, keys, k, key_norms=None, key_chunk=1 << 18, query_block=256):
    """The k keys nearest to each query. queries [B, d] float32, keys [N, d] float16/32, key_norms [N]
    float32 (computed when not given) -> (dists [B, k] float32 ascending, ids [B, k] int64).
    The keys may live on the CPU (a memmap) with the queries on a GPU."""
    key_norms = squared_norms(keys) if key_norms is None else key_norms
    check_search_inputs(queries, keys, k, key_norms)
    (N, d), B, device = keys.shape, len(queries), queries.device
    best_dists = torch.full((B, 0), math.inf, device=device)              # [B, <=k]
    best_ids = torch.zeros((B, 0), dtype=torch.long, device=device)
    # buffers reused across chunks: fresh memory is slow to touch
    chunk_buf = torch.empty(min(key_chunk, N), d, device=device)
    dist_buf = torch.empty(min(query_block, B) * min(key_chunk, N), device=device)
    for start in range(0, N, key_chunk):
        chunk = chunk_buf[:min(key_chunk, N - start)].copy_(keys[start:start + key_chunk])
        norms = key_norms[start:start + len(chunk)].to(device)
        new_dists, new_ids = [], []
        for q in queries.split(query_block):
            # ||k||^2 - 2 q.k; ||q||^2 is the same along a row, so it is added after selection
            dists = torch.addmm(norms, q, chunk.T, alpha=-2,
                                out=dist_buf[:len(q) * len(chunk)].view(len(q), len(chunk)))
            dists, ids = dists.topk(min(k, len(chunk)), dim=1, largest=False, sorted=False)
            new_dists.append(dists)
            new_ids.append(ids + start)
        best_dists = torch.cat([best_dists, torch.cat(new_dists)], 1)
        best_ids = torch.cat([best_ids, torch.cat(new_ids)], 1)
        if best_dists.shape[1] > k:  # merge: keep the k best seen so far
            best_dists, pos = best_dists.topk(k, dim=1, largest=False, sorted=False)
            best_ids = best_ids.gather(1, pos)
    best_dists, best_ids = sort_neighbours(best_dists, best_ids)
    best_dists += queries.pow(2).sum(1, keepdim=True)
    return best_dists.clamp_(min=0), best_ids


def sort_neighbours(dists, ids):
    """Each row ascending by distance, equal distances by id."""
    ids, order = ids.sort(dim=1)
    dists, order2 = dists.gather(1, order).sort(dim=1, stable=True)
    return dists, ids.gather(1, order2)


# -----------------------------------------------------------------------------
# 5. FAISS index: the paper's approximate search, for datastores too big to scan
# The paper's index over 103 M keys: an inverted file (IVF) of 4096 k-means
# lists, every key stored as a 64-byte product-quantisation (PQ) code, trained
# on a sample of 1 M keys. A query scans the codes of its 32 nearest lists
# (nprobe) and ranks them by quantised distance; the k it retrieves then get
# exact distances from the float16 keys (recompute: perplexity 16.5 -> 16.06).
# Our default keeps that shape, with 4 sqrt(N) lists (FAISS's rule of thumb, capped
# at the paper's 4096) and the 64 bytes spent on 128 four-bit sub-quantisers, which FAISS
# scans with SIMD ("fast-scan"); bench/results/index-pq64.md compares it with the
# paper's 8-bit PQ64 (`--factory IVF4096,PQ64`). knnlm_tools/faiss_index.py builds large indexes
# in shards and resumably, from keys on disk.

def default_factory(n, d):
    """The paper's IVF4096,PQ64 scaled to n keys of dimension d."""
    nlist = min(4096, 2 ** round(math.log2(4 * math.sqrt(n))))  # FAISS's guide: 4 sqrt(n) lists or more
    m = max(m for m in range(1, min(d, 128) + 1) if d % m == 0)  # 128 x 4 bits = 64 bytes when d allows
    return f"IVF{nlist},PQ{m}x4fs"


def build_index(keys, factory=None, train_size=1_000_000, seed=0):
    """The FAISS index of keys [N, d] in memory: its lists and codebooks trained on a random sample.
    The seed draws the sample and is added to the seed of FAISS's k-means of the lists."""
    n, d = keys.shape
    index = faiss.index_factory(d, factory or default_factory(n, d))
    faiss.extract_index_ivf(index).cp.seed += seed
    sample = np.sort(np.random.default_rng(seed).choice(n, min(n, train_size), replace=False))
    index.train(keys[sample].float().numpy())
    index.add_with_ids(keys.float().numpy(), np.arange(n))
    return index


def search_index(index, queries, k, keys, nprobe=32, recompute=True, rerank_fn=None):
    """queries [B, d] -> (squared distances [B, k] ascending, ids [B, k]): the codes of the nprobe
    nearest lists ranked by quantised distance, then (recompute) the exact distances of the k
    retrieved, from the keys. Id -1 (the lists held fewer than k keys) gets distance inf."""
    faiss.extract_index_ivf(index).nprobe = nprobe
    q = queries.detach().float().cpu()
    dists, ids = map(torch.from_numpy, index.search(q.numpy(), k))    # quantised distances
    if recompute:
        return (rerank_fn or rerank)(q, keys, ids)
    dists[ids < 0] = math.inf
    return sort_neighbours(dists, ids)


def rerank(queries, keys, ids, block=8):
    """The exact ||q - keys[i]||^2 of every query [B, d] to each of its ids [B, k], sorted (ties by id),
    reading only those rows, in blocks of queries small enough for the cache. Id -1 gets
    distance inf. (torch.ops.knnlm.rerank_l2 does the same in C++.)"""
    (B, k), d = ids.shape, keys.shape[1]
    dists = torch.empty(B, k)
    rows = torch.empty(min(block, B) * k, d, dtype=keys.dtype)  # buffers reused across blocks
    rows32 = torch.empty(min(block, B) * k, d)
    for s in range(0, B, block):
        i = ids[s:s + block].reshape(-1).clamp(min=0)
        r = rows32[:len(i)].copy_(torch.index_select(keys, 0, i, out=rows[:len(i)])).view(-1, k, d)
        dists[s:s + block] = r.sub_(queries[s:s + block, None]).pow_(2).sum(-1)
    dists[ids < 0] = math.inf
    return sort_neighbours(dists, ids)


# -----------------------------------------------------------------------------
# 6. kNN-LM
# eq. 2: p_kNN(y | x) ∝ sum over neighbours (k_i, v_i) with v_i = y of exp(-d(k_i, f(x)) / T)
# eq. 3: p(y | x) = λ p_kNN(y | x) + (1 - λ) p_LM(y | x)
# Both in log space. The paper uses T = 1; a temperature is kept as an option.

EXP_FLOOR = -87.0  # about log of float32's smallest normal number: below it a CPU's exp takes a slow path

def neighbour_scores(dists, temperature=1.0):
    """The exponents of eq. 2, -d / T [B, k], with the distances counted from the nearest neighbour's:
    the softmax is the same, and float32 keeps its precision however far the neighbours are.
    T is kept within float32's range (a tiny T is the nearest-neighbour limit, not NaN)."""
    finfo = torch.finfo(dists.dtype)
    T = min(max(temperature, finfo.tiny), finfo.max)
    nearest = dists.amin(dim=1, keepdim=True)
    nearest = torch.where(torch.isfinite(nearest), nearest, 0.0)        # a row with no neighbour at all
    return (dists - nearest).div_(-T)


def knn_log_prob(dists, neighbour_vals, targets, temperature=1.0):
    """log p_kNN(target | x) from the neighbours' squared distances [B, k] and values [B, k].
    A target that no neighbour carries gets log p_kNN = -inf (probability 0), never NaN."""
    scores = neighbour_scores(dists, temperature)                          # [B, k]
    carries_target = neighbour_vals == targets[:, None].to(neighbour_vals.dtype)   # [B, k]
    log_norm = torch.logsumexp(scores, dim=1)
    log_p = torch.logsumexp(scores.masked_fill_(~carries_target, -math.inf), dim=1) - log_norm
    return log_p.masked_fill_(torch.isneginf(log_norm), -math.inf)


def knn_log_prob_grid(dists, neighbour_vals, targets, temperatures, block=4096):
    """knn_log_prob at each of the temperatures -> [len(temperatures), B], `block` rows at a time for all of
    them (the [block, k] temporaries stay in the CPU's cache): the tuning's way. One exp per neighbour
    where knn_log_prob's two logsumexps take two, and no weight below exp(EXP_FLOOR): the same numbers to
    float32's rounding, except for a target whose every weight is below it (p_kNN < 1e-37), which gets
    about EXP_FLOOR instead of less; mixed with p_LM by eq. 3 that changes nothing."""
    out = dists.new_empty(len(temperatures), len(dists))
    for s in range(0, len(dists), block):
        d, vals, y = dists[s:s + block], neighbour_vals[s:s + block], targets[s:s + block]
        carries_target = (vals == y[:, None].to(vals.dtype)) & torch.isfinite(d)    # a missing neighbour: none
        for j, T in enumerate(temperatures):
            weights = neighbour_scores(d, T).clamp_(min=EXP_FLOOR).exp_()          # the nearest weighs 1
            log_norm = weights.sum(dim=1).log_()
            out[j, s:s + block] = weights.mul_(carries_target).sum(dim=1).log_() - log_norm
    return out


def knn_distribution(dists, neighbour_vals, vocab_size, temperature=1.0):
    """The whole p_kNN(. | x) over the vocabulary [B, V]: softmax weights summed per token id
    (all zero for a row without any neighbour)."""
    weights = torch.softmax(neighbour_scores(dists, temperature), dim=1).nan_to_num_(0.0)
    return torch.zeros(len(dists), vocab_size, device=dists.device).scatter_add_(1, neighbour_vals, weights)


def interpolate(log_p_lm, log_p_knn, lmbda):
    """eq. 3 in log space: log(λ p_kNN + (1 - λ) p_LM). λ = 0 returns log p_LM exactly."""
    lmbda = torch.as_tensor(lmbda, dtype=log_p_lm.dtype)
    return torch.logaddexp(log_p_knn + lmbda.log(), log_p_lm + torch.log1p(-lmbda))


# -----------------------------------------------------------------------------
# 7. Continuous cache (Grave et al., 2017): Table 1's other memory
# The hidden states h_i of the previous W positions of the text being scored, each
# with the token x_{i+1} that followed it; for position t
#     p_cache(w | x) ∝ Σ_{t-W ≤ i < t, x_{i+1} = w} exp(θ h_t · h_i)
# It reaches back W tokens (thousands), beyond the model's context, into the same
# document: names and rare words seen there come back. Mixed like p_kNN:
#     p' = λ_c p_cache + (1 - λ_c) p_LM,   then kNN-LM on top: p = λ p_kNN + (1 - λ) p'.
# h is the kNN query key (the datastore's key type, by default the paper's best),
# so one forward pass serves both memories. Only tokens up to t enter p at t: h_i
# sees x_{≤i} and its value x_{i+1} is at most x_t, the last token the model read.

CACHE_WINDOW = 2048                                         # W: previous positions kept
CACHE_THETAS = [2.0 ** i for i in range(-8, 3)]             # θ, tuned on valid: 1/256 ... 4
CACHE_LAMBDAS = [i / 20 for i in range(20)]                 # λ_c, tuned on valid: 0, 0.05, ..., 0.95


def cache_log_prob(keys, targets, theta, window=CACHE_WINDOW, block=512):
    """log p_cache(target_t) for every position t of one text: keys [n, d] float32 (h_t) and targets
    [n] (x_{t+1}), in text order. A position whose cache holds no target gets -inf, the first
    (an empty cache) too. With a list of θs -> [len(θs), n], the dot products computed once for all.
    One exp per cached position, counted from the nearest as in eq. 2 (knn_log_prob's two logsumexps
    would take two), none below exp(EXP_FLOOR): a target whose every weight is below it (p_cache < 1e-37)
    gets about EXP_FLOOR instead of less, which mixed with p_LM changes nothing."""
    thetas = theta if isinstance(theta, (list, tuple)) else [theta]
    n, out, tiny = len(keys), keys.new_empty(len(thetas), len(keys)), torch.finfo(keys.dtype).tiny  # θ = 0: uniform
    for s in range(0, n, block):
        e, lo = min(s + block, n), max(0, s - window)
        t, i = torch.arange(s, e)[:, None], torch.arange(lo, e)[None]
        dots = keys[s:e] @ keys[lo:e].T                                      # h_t · h_i  [b, e - lo]
        cached = (i < t) & (i >= t - window)                                 # only the W positions before t
        dots.masked_fill_(~cached, -math.inf)
        dots -= dots.amax(dim=1, keepdim=True).nan_to_num_(0.0, neginf=0.0)  # from the nearest: exp keeps its range
        same = (targets[lo:e][None] == targets[s:e, None]) & cached          # x_{i+1} = x_{t+1}, among them
        for j, th in enumerate(thetas):
            weights = (dots * max(th, tiny)).clamp_(min=EXP_FLOOR).exp_()    # exp(θ h_t · h_i), the nearest 1
            log_norm = weights.sum(dim=1).log_()
            log_p = weights.mul_(same).sum(dim=1).log_() - log_norm           # -inf: no cached target
            out[j, s:e] = log_p.masked_fill_(torch.isneginf(log_norm), -math.inf)  # (an empty cache, if unfloored)
    return out if isinstance(theta, (list, tuple)) else out[0]


# -----------------------------------------------------------------------------
# 8. Evaluation
# One pass over a split computes, for every target token, log p_LM and the k
# nearest neighbours of its query key. Any (λ, T) is then a cheap re-mix of that
# cache, so tuning on the validation split costs one pass.

LAMBDAS = [i / 20 for i in range(21)]                      # 0, 0.05, ..., 1: the grid tuned on valid
TEMPERATURES = [2.0 ** i for i in range(-3, 9)]            # 0.125, 0.25, ..., 256


@torch.no_grad()
def score_split(model, tokens, datastore=None, k=1024, min_context=None, batch_size=16, progress=True,
                desc="evaluate", keep_queries=False):
    """-> dict with targets [n], log_p_lm [n], and with a datastore dists [n, k], neighbour_vals [n, k]
    and search_seconds (the time spent searching). The query keys are of the datastore's key type;
    keep_queries also keeps them [n, d], so that other datastores can be searched later without the model."""
    if len(tokens) < 2:
        raise KnnlmError(f"{desc}: {len(tokens)} token(s), nothing to score (a text needs at least two)")
    cfg, device = model.cfg, next(model.parameters()).device
    key_type = datastore.key_type if datastore is not None else "ffn_in_ln"
    n, done, out = len(tokens) - 1, 0, {}
    search_seconds = 0.0
    bar = tqdm(total=n, unit="tok", desc=desc, disable=not progress)
    for x, y, scored in sliding_batches(tokens, cfg.block_size, min_context, batch_size):
        x, y, scored = x.to(device), y.to(device), scored.to(device)
        logits, keys = model(x, key_type=key_type, at=scored)
        log_p = F.log_softmax(logits.float(), dim=-1)
        targets, queries = y[scored], keys[scored].float()
        parts = {"targets": targets, "log_p_lm": log_p.gather(1, targets[:, None])[:, 0]}
        if keep_queries:
            parts["queries"] = queries
        if datastore is not None:
            t = time.time()
            parts["dists"], parts["neighbour_vals"] = neighbours(datastore, queries, k)
            search_seconds += time.time() - t
        for name, part in parts.items():  # into the split's rows, allocated once: kept batch by batch, the parts
            if name not in out:           # would fragment the heap, and each batch's big temporaries fault in anew
                out[name] = torch.empty((n, *part.shape[1:]), dtype=part.dtype)
            out[name][done:done + len(part)] = part
        done += len(targets)
        bar.update(len(targets))
    bar.close()
    assert done == n, "sliding_batches scores every token but the first once"
    return {**out, "search_seconds": search_seconds}


def neighbours(datastore, queries, k):
    """The k nearest neighbours of queries [B, d]: (squared distances [B, k], their values [B, k] int32)."""
    dists, ids = datastore.search(queries, k)
    return dists.cpu(), datastore.vals[ids.cpu()].int()  # int32: half the memory


def nearest_k(cache, k=None):
    """A score_split cache's nearest k neighbours of every token (default: all) and its targets: (dists,
    neighbour_vals, targets). The neighbours are sorted, so a smaller k is a prefix of the cache: one pass
    at k = 1024 serves every k below."""
    return cache["dists"][:, :k], cache["neighbour_vals"][:, :k], cache["targets"]


def knnlm_log_probs(cache, lmbda, temperature=1.0, k=None, log_p_knn=None):
    """Re-mix a score_split cache: log p(target) of kNN-LM at (λ, T) for every token, from the
    nearest k of its neighbours (default: all). log_p_knn (at T): if already computed."""
    if log_p_knn is None:
        log_p_knn = knn_log_prob(*nearest_k(cache, k), temperature)
    return interpolate(cache["log_p_lm"], log_p_knn, lmbda)


def perplexity(log_probs):
    """exp(mean negative log-probability); inf when a token has probability 0 or the mean is beyond exp's range."""
    try:
        return math.exp(-log_probs.double().mean().item())
    except OverflowError:
        return math.inf


def knn_grid(cache, temperatures, k=None):
    """log p_kNN of every token of a cache at each temperature (its nearest k neighbours) -> [len(temperatures), n]:
    what the grid searches below re-mix, computed once when several of them share it."""
    return knn_log_prob_grid(*nearest_k(cache, k), temperatures)


def tune(cache, lambdas, temperatures, k=None, grid=None):
    """Grid search of (λ, T) on a cache (its nearest k neighbours); -> (best λ, best T, its perplexity, all results).
    grid: knn_grid(cache, temperatures, k), if already computed."""
    results = []
    for T, log_p_knn in zip(temperatures, knn_grid(cache, temperatures, k) if grid is None else grid):
        for lmbda in lambdas:
            results.append((perplexity(interpolate(cache["log_p_lm"], log_p_knn, lmbda)), lmbda, T))
    ppl, lmbda, T = min(results)
    return lmbda, T, ppl, results


def cache_grid(cache, thetas, window=CACHE_WINDOW):
    """log p_cache of every token of a cache kept with its queries (keep_queries) at each θ -> [len(thetas), n]."""
    return cache_log_prob(cache["queries"], cache["targets"], list(thetas), window)


def cache_log_probs(cache, theta, lambda_cache, window=CACHE_WINDOW, lmbda=0.0, temperature=1.0, k=None,
                    log_p_cache=None, log_p_knn=None):
    """Re-mix a score_split cache kept with its queries (keep_queries) with the continuous cache: log p(target)
    of LM + cache at (θ, λ_c) for every token, and of kNN-LM on top of it at (λ, T) when λ > 0.
    log_p_cache (at θ) and log_p_knn (at T): if already computed."""
    if log_p_cache is None:
        log_p_cache = cache_log_prob(cache["queries"], cache["targets"], theta, window)
    log_p = interpolate(cache["log_p_lm"], log_p_cache, lambda_cache)
    if not lmbda:
        return log_p
    if log_p_knn is None:
        log_p_knn = knn_log_prob(*nearest_k(cache, k), temperature)
    return interpolate(log_p, log_p_knn, lmbda)


def tune_cache(cache, window=CACHE_WINDOW, thetas=CACHE_THETAS, cache_lambdas=CACHE_LAMBDAS, lambdas=(0.0,),
               temperatures=(1.0,), k=None, grid=None, log_p_caches=None):
    """Grid search of the cache's θ and λ_c on a cache kept with its queries: over LM + cache alone
    (lambdas (0,)), or jointly with kNN-LM's λ and T on top; -> (θ, λ_c, λ, T, perplexity), the best.
    grid: knn_grid(cache, temperatures, k), and log_p_caches: cache_grid(cache, thetas, window), if already computed."""
    if not any(lambdas):
        knn = [(temperatures[0], None)]
    else:
        knn = list(zip(temperatures, knn_grid(cache, temperatures, k) if grid is None else grid))
    best = (math.inf, None, None, None, None)
    for theta, log_p_cache in zip(thetas, cache_grid(cache, thetas, window) if log_p_caches is None else log_p_caches):
        for lambda_cache in cache_lambdas:
            base = interpolate(cache["log_p_lm"], log_p_cache, lambda_cache)
            for T, log_p_knn in knn:
                for lmbda in lambdas:
                    log_p = base if log_p_knn is None else interpolate(base, log_p_knn, lmbda)
                    best = min(best, (perplexity(log_p), theta, lambda_cache, lmbda, T), key=lambda r: r[0])
    ppl, theta, lambda_cache, lmbda, T = best
    return theta, lambda_cache, lmbda, T, ppl
