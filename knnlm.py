"""
kNN-LM: "Generalization through Memorization: Nearest Neighbor Language Models"
(Khandelwal et al., ICLR 2020), in one module that reads top to bottom like the paper.

    1. Data          WikiText files -> vocabulary -> integer tensors
    2. Model         a decoder-only Transformer LM that also returns the kNN key f(c)
    3. Datastore     (f(c_i), w_i) for every training context, on disk      (eq. 1)
    4. Search        the k nearest keys by squared L2
    5. FAISS index   the paper's approximate search (IVF-PQ), for datastores too big to scan
    6. kNN-LM        p_kNN from the neighbours (eq. 2), mixed with p_LM (eq. 3)
    7. Evaluation    perplexity over a whole split with a sliding window
"""
import argparse
import copy
import fcntl
import glob
import hashlib
import json
import math
import mmap
import os
import shutil
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import faiss
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

try:  # the C++/CUDA search kernel of csrc/, built by `pip install --no-build-isolation -e .`
    import knnlm_ext
except ImportError:
    knnlm_ext = None

class KnnlmError(Exception):
    """Bad input or mismatched files: the scripts print the message in one line and exit with code 2."""


@contextmanager
def user_errors():
    """Around a script's work on user input: a KnnlmError ends it with one line and exit code 2."""
    try:
        yield
    except KnnlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def positive_int(text):
    """argparse type: an integer of at least 1 (a batch size, a count of steps or shards)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def check_device(device):
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KnnlmError(f"--device {device} was asked for, but this torch build sees no CUDA GPU: use --device cpu")
    return device


# -----------------------------------------------------------------------------
# 1. Data
# WikiText `wiki.{train,valid,test}.tokens`: one paragraph per line, already
# tokenised, rare words already <unk>. Every line ends with an <eos> token.

SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"
WIKITEXT_URLS = {  # the official archives, newest location first
    "wikitext-103": ["https://wikitext.smerity.com/wikitext-103-v1.zip",
                     "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"],
    "wikitext-2": ["https://wikitext.smerity.com/wikitext-2-v1.zip",
                   "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"],
}
SMALL_TRAIN_BYTES = int(2.5 * 2**20)  # wikitext-103-small: the first 2.5 MiB of train


def split_path(data_dir, split):
    return os.path.join(data_dir, f"wiki.{split}.tokens")


def check_corpus(data_dir):
    """Fail early, with one clear line, unless data_dir holds the three WikiText splits."""
    missing = [split_path(data_dir, s) for s in SPLITS if not os.path.isfile(split_path(data_dir, s))]
    if missing:
        raise KnnlmError(f"{data_dir} is not a WikiText corpus directory: missing " + ", ".join(missing))
    empty = [split_path(data_dir, s) for s in SPLITS if os.path.getsize(split_path(data_dir, s)) == 0]
    if empty:
        raise KnnlmError("empty corpus file: " + ", ".join(empty))
    return data_dir


def file_fingerprint(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def read_words(path):
    """The tokens of a WikiText file: each line's words, then <eos>."""
    with open(path, encoding="utf-8") as f:
        try:
            for line in f:
                yield from line.split()
                yield EOS
        except UnicodeDecodeError as e:
            raise KnnlmError(f"{path} is not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x})") from None


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

    def decode(self, ids):
        return " ".join(self.itos[i] for i in ids)

    def fingerprint(self):
        return hashlib.sha256("\n".join(self.itos).encode()).hexdigest()[:16]


def download_wikitext(name, root):
    """Download and unpack an official WikiText archive into root/name; returns that directory."""
    target = os.path.join(root, name)
    os.makedirs(root, exist_ok=True)
    errors = []
    for url in WIKITEXT_URLS[name]:
        try:
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                archive = os.path.join(tmp, "archive.zip")
                with tqdm(unit="B", unit_scale=True, desc=f"download {name}") as bar:
                    def hook(blocks, block_size, total):
                        bar.total = total if total > 0 else None
                        bar.update(blocks * block_size - bar.n)
                    urllib.request.urlretrieve(url, archive, reporthook=hook)
                with zipfile.ZipFile(archive) as z:
                    z.extractall(tmp)
                os.replace(os.path.join(tmp, name), target)  # the archive unpacks to <name>/
            return check_corpus(target)
        except OSError as e:
            errors.append(f"{url}: {e}")
    raise KnnlmError(f"could not download {name} (no internet?). Tried:\n  " + "\n  ".join(errors)
                       + f"\nPut wiki.{{train,valid,test}}.tokens in a directory and pass it with --data.")


def make_small(src_dir, dst_dir, train_bytes=SMALL_TRAIN_BYTES):
    """wikitext-103-small: official valid and test; train cut to its first articles
    (the longest prefix of at most train_bytes that ends where an article begins)."""
    os.makedirs(dst_dir, exist_ok=True)
    for split in ("valid", "test"):
        shutil.copyfile(split_path(src_dir, split), split_path(dst_dir, split))
    with open(split_path(src_dir, "train"), "rb") as f:
        head = f.read(train_bytes + 1)
    lines = head.splitlines(keepends=True)
    cut, size = 0, 0
    for i, line in enumerate(lines[:-1]):  # an article starts with " \n" then " = Title = \n"
        if line == b" \n" and lines[i + 1].startswith(b" = ") and not lines[i + 1].startswith(b" = = "):
            if size <= train_bytes:
                cut = size
        size += len(line)
    with open(split_path(dst_dir, "train"), "wb") as f:
        f.write(head[:cut] if len(head) > train_bytes else head)
    return check_corpus(dst_dir)


def resolve_corpus(data_dir):
    """A directory with the three splits is used as it is. A missing directory named
    wikitext-103, wikitext-2 or wikitext-103-small is downloaded (and cut) first."""
    if os.path.isdir(data_dir):
        return check_corpus(data_dir)
    root, name = os.path.split(os.path.normpath(data_dir))
    if name in WIKITEXT_URLS:
        return download_wikitext(name, root or ".")
    if name == "wikitext-103-small":
        full = os.path.join(root or ".", "wikitext-103")
        if not os.path.isdir(full):
            download_wikitext("wikitext-103", root or ".")
        return make_small(full, data_dir)
    return check_corpus(data_dir)


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

    def forward(self, x, taps=None):
        attn_out = self.attn(self.ln_1(x))
        ffn_in = x + attn_out
        ffn_in_ln = self.ln_2(ffn_in)
        out = ffn_in + self.mlp(ffn_in_ln)
        if taps is not None:  # the candidate kNN keys of Table 5
            taps.update(block_in=x, attn_out=attn_out, ffn_in=ffn_in, ffn_in_ln=ffn_in_ln, block_out=out)
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

    def forward(self, idx, key_type=None):
        """idx [B, T] -> logits [B, T, V], and the keys [B, T, d] if key_type is given."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context {self.cfg.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        taps = {}
        for i, block in enumerate(self.blocks):
            x = block(x, taps if i == len(self.blocks) - 1 else None)
        logits = self.ln_f(x) @ self.wte.weight.T  # tied input/output embeddings
        return logits if key_type is None else (logits, taps[key_type])


def fingerprint(model, vocab):
    """A short hash of the weights, the config and the vocabulary: what a datastore depends on."""
    h = hashlib.sha256(json.dumps(asdict(model.cfg), sort_keys=True).encode())
    h.update("\n".join(vocab.itos).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@contextmanager
def atomic_write(path):
    """Yield a temporary name beside path, rename it to path once written: a crash
    never leaves half a file under the final name (and the next write removes what a
    killed writer left). A failed write (a full disk) is a KnnlmError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        remove_stale_tmp(glob.escape(path))
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise KnnlmError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_tmp(pattern):
    """Remove the files pattern.tmpPID whose writer (process PID) is dead: a kill -9 left them."""
    for tmp in glob.glob(pattern + ".tmp[0-9]*"):
        pid = tmp.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            os.remove(tmp)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


# One writer at a time. Every script that writes a datastore directory, a checkpoint or a
# results file first takes an OS file lock (flock) on a lock file: in the directory, or
# beside the file. The OS releases it when the process ends however it ends, so a kill -9
# never leaves a stale lock; a second writer is refused in one line naming the holder.
_held_locks = {}  # lock file -> descriptor, the locks this process holds


def lock_path(path, directory):
    if directory:
        return os.path.join(path, ".lock")
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.lock")


@contextmanager
def writing(path, directory=False, patience=0.5):
    """Be the only process writing `path` (a directory, or a file) while inside; the temporary files a
    killed writer left there are removed. Creating the lock checks up front that path can be written.
    Reentrant: inside, the same process may take it again (a script and the library it calls)."""
    lock = lock_path(path, directory)
    if lock in _held_locks:
        yield
        return
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise KnnlmError(f"{path} is a file, not a directory")
    if not directory and os.path.isdir(path):
        raise KnnlmError(f"{path} is a directory, not a file")
    try:
        os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise KnnlmError(f"cannot write to {os.path.dirname(lock) or '.'}: {e.strerror}") from None
    deadline = time.time() + patience  # a reader peeking at the lock (writer_pid) holds it for microseconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() < deadline:
                time.sleep(0.02)
                continue
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise KnnlmError(f"{path} is being written by another process"
                             f"{f' (pid {holder})' if holder else ''}: wait for it to end, or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held_locks[lock] = fd
    try:
        remove_stale_tmp(glob.escape(path) + ("/*" if directory else ""))
        yield
    finally:
        del _held_locks[lock]
        os.close(fd)  # releases the lock


def writer_pid(path, directory=False):
    """The pid of another process writing path now (as a string), or None."""
    lock = lock_path(path, directory)
    if lock in _held_locks:
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)


def json_ready(obj, where=""):
    """-> (obj with every NaN or infinite float replaced by None, {where: "inf" | "-inf" | "nan"})."""
    if isinstance(obj, dict):
        pairs = [(k, json_ready(v, f"{where}.{k}" if where else str(k))) for k, v in obj.items()]
        return {k: v for k, (v, _) in pairs}, {p: w for _, (_, bad) in pairs for p, w in bad.items()}
    if isinstance(obj, (list, tuple)):
        items = [json_ready(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return [v for v, _ in items], {p: w for _, bad in items for p, w in bad.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, {where: str(obj)}
    return obj, {}


def write_json(obj, path):
    """Standard JSON, written atomically. A NaN or infinite number becomes null, and a dict
    records which ones in "non_finite" (e.g. {"knnlm_ppl.test": "inf"})."""
    obj, bad = json_ready(obj)
    if bad and isinstance(obj, dict):
        obj["non_finite"] = bad
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")


def save_checkpoint(path, model, vocab, **extra):
    with atomic_write(path) as tmp:
        try:
            torch.save({"config": asdict(model.cfg), "model": model.state_dict(), "vocab": vocab.itos,
                        "fingerprint": fingerprint(model, vocab), **extra}, tmp)
        except RuntimeError as e:  # torch's writer failed, e.g. on a full disk
            raise KnnlmError(f"cannot write {path}: {e}") from None


CHECKPOINT_FIELDS = ("config", "model", "vocab", "fingerprint")


def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode, vocab, the whole checkpoint dict)."""
    if not os.path.isfile(path):
        raise KnnlmError(f"no checkpoint at {path}: train one with train.py (or pass --checkpoint)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise KnnlmError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    missing = [f for f in CHECKPOINT_FIELDS if f not in ckpt] if isinstance(ckpt, dict) else CHECKPOINT_FIELDS
    if missing:
        raise KnnlmError(f"{path} is not a checkpoint of train.py: it has no {', '.join(missing)}")
    try:
        model = TransformerLM(ModelConfig(**ckpt["config"])).to(device)
        model.load_state_dict(ckpt["model"])
        vocab = Vocab(ckpt["vocab"])
    except Exception as e:  # a config, weights or vocabulary of the wrong shape
        raise KnnlmError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if fingerprint(model, vocab) != ckpt["fingerprint"]:
        raise KnnlmError(f"checkpoint {path} is corrupt: its weights do not match its fingerprint")
    return model.eval(), vocab, ckpt


# -----------------------------------------------------------------------------
# Sliding windows, shared by the datastore (section 3) and the evaluation (7).
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
# Keys are float16 and values int64 in .npy memmaps written chunk by chunk, so
# the datastore never has to fit in memory. Row r holds the target tokens[r + 1].

def datastore_manifest(model, vocab, n, key_type, min_context, source):
    """Everything a datastore depends on. A rerun of the build with the same manifest
    resumes or reuses it; anything else is refused."""
    return {"count": n, "dim": model.cfg.d_model, "key_dtype": "float16", "key_type": key_type,
            "model_fingerprint": fingerprint(model, vocab), "vocab_fingerprint": vocab.fingerprint(),
            "vocab_size": len(vocab), "min_context": min_context, "block_size": model.cfg.block_size,
            "source": source}


def check_same(wanted, found, wanted_name, found_name):
    """Refuse, in one line naming both sides, the first field where found differs from wanted."""
    for field, value in wanted.items():
        if found.get(field) != value:
            raise KnnlmError(f"{field} differs: {found_name} has {found.get(field)!r}, {wanted_name} has {value!r}")


@torch.no_grad()
def build_datastore(model, vocab, tokens, out_dir, key_type="ffn_in_ln", min_context=None,
                    batch_size=16, source=None, progress=True, commit_seconds=10.0,
                    shard=0, shards=1, barrier=lambda: None):
    """Write the datastore of `tokens` to out_dir. Progress is committed every commit_seconds
    (rows flushed to disk first): an interrupted build rerun with the same arguments
    continues from the last commit and ends byte-identical to an uninterrupted one.
    With shards > 1 this process (one of `shards`, e.g. under torchrun, all calling this
    with the same `barrier`) writes the rows of its share of the windows."""
    cfg = model.cfg
    min_context = resolve_min_context(min_context, cfg.block_size)
    n = len(tokens) - 1
    if n < 1:
        raise KnnlmError(f"{source}: a datastore needs at least two tokens, got {len(tokens)}")
    manifest = datastore_manifest(model, vocab, n, key_type, min_context, source)
    with writing(out_dir, directory=True) if shard == 0 else nullcontext():  # shard 0 holds it for all
        return write_datastore(model, tokens, out_dir, manifest, batch_size, progress, commit_seconds,
                               shard, shards, barrier)


def write_datastore(model, tokens, out_dir, manifest, batch_size, progress, commit_seconds, shard, shards, barrier):
    cfg, device = model.cfg, next(model.parameters()).device
    n, key_type, min_context = manifest["count"], manifest["key_type"], manifest["min_context"]
    meta_path = os.path.join(out_dir, "meta.json")
    progress_path = progress_file(out_dir, shard, shards)
    if os.path.isfile(meta_path):  # finished before: reuse it if it is the same datastore
        check_same(manifest, read_meta(meta_path), "this build", f"the datastore in {out_dir}")
        print(f"{out_dir} already holds this datastore")
        return manifest
    windows = sliding_windows(len(tokens), cfg.block_size, min_context)
    windows = windows[len(windows) * shard // shards:len(windows) * (shard + 1) // shards]
    first_row = windows[0][0] + windows[0][2] if windows else n  # the row of the first target scored
    last_row = windows[-1][1] if windows else n
    if os.path.isfile(progress_path):  # interrupted before: continue it if it is the same build
        done = read_json(progress_path, {"manifest": dict, "rows": int})
        check_same(manifest, done["manifest"], "this build", f"the interrupted build in {out_dir}")
        print(f"resuming at row {done['rows']:,} of {n:,}")
    else:
        done = {"manifest": manifest, "rows": first_row}
    # The progress is a row count at the end of a window, so a rerun continues with the next
    # window whatever its --batch-size (a window's rows are the same in any batch).
    skip = sum(end <= done["rows"] for _, end, _ in windows)
    if done["rows"] != (windows[skip - 1][1] if skip else first_row):
        raise KnnlmError(f"{progress_path} records {done['rows']:,} rows, not the end of a window: "
                         f"delete {out_dir} and build again")
    fresh = not any(f.startswith("progress") for f in os.listdir(out_dir)) if os.path.isdir(out_dir) else True
    barrier()  # every shard has looked before the first one creates the files
    if shard == 0 and fresh:
        os.makedirs(out_dir, exist_ok=True)
        check_disk_space(out_dir, n * (cfg.d_model * 2 + 8))
        create_npy(os.path.join(out_dir, "keys.npy"), np.float16, (n, cfg.d_model))
        create_npy(os.path.join(out_dir, "vals.npy"), np.int64, (n,))
        write_json(done, progress_path)
    barrier()
    keys = open_npy(os.path.join(out_dir, "keys.npy"), "r+", np.float16, (n, cfg.d_model))
    vals = open_npy(os.path.join(out_dir, "vals.npy"), "r+", np.int64, (n,))
    row, start, last_commit = done["rows"], time.time(), time.time()
    bar = tqdm(total=last_row - first_row, initial=row - first_row, unit="tok", disable=not progress,
               desc="datastore" if shards == 1 else f"datastore shard {shard + 1}/{shards}")
    for x, y, scored in sliding_batches(tokens, cfg.block_size, min_context, batch_size, windows[skip:]):
        _, k = model(x.to(device), key_type=key_type)
        k, v = k[scored.to(device)].cpu(), y[scored]
        if not torch.isfinite(k).all():
            raise KnnlmError(f"the model gives NaN or infinite keys at datastore row {row}: is the checkpoint broken?")
        keys[row:row + len(v)] = k.numpy()
        vals[row:row + len(v)] = v.numpy()
        row += len(v)
        bar.update(len(v))
        bar.set_postfix(tok_per_s=f"{(row - done['rows']) / (time.time() - start):.0f}")
        if time.time() - last_commit > commit_seconds or row == last_row:
            keys.flush(), vals.flush()  # the rows reach the disk before the progress that counts them
            write_json({"manifest": manifest, "rows": row}, progress_path)
            last_commit = time.time()
    bar.close()
    assert row == last_row, (row, last_row)
    barrier()  # every shard has written its rows
    if shard == 0:
        write_meta(out_dir, manifest, progress)
        for s in range(shards):
            if os.path.exists(progress_file(out_dir, s, shards)):  # a shard without windows wrote none
                os.remove(progress_file(out_dir, s, shards))
    barrier()  # the datastore is finished for every shard
    return manifest


def check_not_built_from(datastore, path):
    """Refuse to evaluate the text a datastore was built from: each token would find its own
    context at distance ~0 among the neighbours, and the perplexity would mean nothing."""
    source = datastore.meta.get("source") or {}
    if source.get("sha256") == file_fingerprint(path):
        raise KnnlmError(f"the datastore {datastore.path} was built from {path}, the text being evaluated: every "
                         "token would find itself among its neighbours and the perplexity would mean nothing. "
                         "Build it from another split, or pass --allow-eval-split-datastore to do it anyway")


def row_context(tokens, row, width):
    """Where datastore row `row` comes from in the text `tokens` it was built from: its key is
    f(tokens[:row + 1]) and its value tokens[row + 1]. -> (the last `width` tokens of that
    context, the value). Explanations use it to show the text behind a neighbour."""
    return tokens[max(0, row + 1 - width):row + 1], tokens[row + 1]


def progress_file(out_dir, shard, shards):
    return os.path.join(out_dir, "progress.json" if shards == 1 else f"progress.shard{shard}.json")


def open_npy(path, mode, dtype, shape):
    try:
        return np.lib.format.open_memmap(path, mode, dtype, shape)
    except (OSError, ValueError) as e:
        raise KnnlmError(f"cannot open {path}: {e}") from None


def create_npy(path, dtype, shape):
    """A new .npy file with its whole size reserved on the disk now (a memmap's file is otherwise
    sparse, and a disk that fills up later kills the writer with SIGBUS when it touches a page)."""
    open_npy(path, "w+", dtype, shape).flush()  # the header; the rest of the file is a hole
    size, fd = os.path.getsize(path), os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        os.remove(path)
        raise KnnlmError(f"cannot reserve {size / 1e9:.2f} GB for {path}: {e.strerror}: "
                         "free some space and rerun") from None
    finally:
        os.close(fd)


def check_disk_space(path, needed, what="the datastore"):
    free = shutil.disk_usage(path).free
    if free < needed:
        raise KnnlmError(f"not enough disk space in {path}: {what} needs {needed / 1e9:.2f} GB, "
                         f"{free / 1e9:.2f} GB are free")


def read_json(path, fields=None):
    """A JSON object; fields ({name: type}) are checked to be there with those types."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise KnnlmError(f"cannot read {path}: {e}") from None
    if fields is not None:
        if not isinstance(obj, dict):
            raise KnnlmError(f"{path} holds a JSON {type(obj).__name__}, not the object expected")
        for name, kind in fields.items():
            if not isinstance(obj.get(name), kind) or (kind is int and isinstance(obj.get(name), bool)):
                raise KnnlmError(f"{path} is not what it should be: field {name!r} is {obj.get(name)!r}")
    return obj


# meta.json: the manifest, the size and checksums of the files it vouches for, and a seal over all that
META_FIELDS = {"count": int, "dim": int, "key_dtype": str, "key_type": str, "model_fingerprint": str,
               "vocab_fingerprint": str, "vocab_size": int, "min_context": int, "block_size": int,
               "source": (dict, type(None)), "files": dict, "seal": str}
DATASTORE_FILES = ("keys.npy", "vals.npy")
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 4096


def file_checksums(path, progress=False):
    """{bytes, sample (sha256 of 64 blocks spread over the file: cheap, checked at every load),
    sha256 (of the whole file: checked on request, --verify)}."""
    return {"bytes": os.path.getsize(path), "sample": sampled_sha256(path), "sha256": sha256_of(path, progress)}


def sampled_sha256(path):
    size, h = os.path.getsize(path), hashlib.sha256()
    with open(path, "rb") as f:
        for i in range(SAMPLE_BLOCKS):
            h.update(os.pread(f.fileno(), SAMPLE_BLOCK_BYTES, max(0, size - SAMPLE_BLOCK_BYTES) * i // (SAMPLE_BLOCKS - 1)))
    return h.hexdigest()[:16]


def sha256_of(path, progress=False, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                      desc=f"sha256 {os.path.basename(path)}", disable=not progress) as bar:
        while block := f.read(chunk):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()[:16]


def seal(meta):
    """A checksum of a manifest's own fields: a meta.json edited by hand no longer matches it."""
    return hashlib.sha256(json.dumps({f: v for f, v in meta.items() if f != "seal"}, sort_keys=True).encode()).hexdigest()[:16]


def write_meta(path, manifest, progress=False):
    """Finish a datastore: meta.json, with the checksums of its files and its seal."""
    meta = {**manifest, "files": {name: file_checksums(os.path.join(path, name), progress) for name in DATASTORE_FILES}}
    write_json({**meta, "seal": seal(meta)}, os.path.join(path, "meta.json"))


def read_meta(path):
    meta = read_json(path, META_FIELDS)
    if seal(meta) != meta["seal"]:
        raise KnnlmError(f"{path} was edited: its fields no longer match their seal. Rebuild the datastore "
                         "rather than edit its manifest")
    return meta


def check_files(directory, files, full=False):
    """Each file is the one the manifest vouches for: its size and sampled checksum (full: its sha256)."""
    for name, want in files.items():
        path = os.path.join(directory, name)
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if not isinstance(want, dict) or size != want.get("bytes"):
            raise KnnlmError(f"{path} has {size} bytes where its manifest vouches for {want.get('bytes') if isinstance(want, dict) else want}: "
                             "truncated, or not this datastore's file")
        if sampled_sha256(path) != want.get("sample") or (full and sha256_of(path, progress=True) != want.get("sha256")):
            raise KnnlmError(f"{path} is not the file its manifest vouches for (its checksum differs): a file of "
                             "another datastore? Rebuild it")


class Datastore:
    """A datastore on disk: keys [N, d] float16 and vals [N] int64, memory-mapped,
    and its FAISS index (section 5) when one was built."""

    def __init__(self, path):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            if writer_pid(path, directory=True):
                raise KnnlmError(f"the datastore in {path} is being built now (by process {writer_pid(path, True)}): "
                                 "wait for the build to finish")
            unfinished = os.path.isdir(path) and any(f.startswith("progress") for f in os.listdir(path))
            raise KnnlmError(f"the datastore build in {path} was interrupted: rerun build_datastore.py with the "
                             "same arguments to finish it" if unfinished else
                             f"no datastore at {path} (no meta.json): build one with build_datastore.py")
        self.path, self.meta = path, read_json(meta_path, META_FIELDS)
        try:  # mode "c" (copy-on-write) gives torch writable arrays without ever touching the files
            self.key_file = np.load(os.path.join(path, "keys.npy"), mmap_mode="c")
            vals = np.load(os.path.join(path, "vals.npy"), mmap_mode="c")
        except (OSError, ValueError) as e:
            raise KnnlmError(f"datastore {path} is corrupt or truncated: {e}") from None
        keys = self.key_file
        found = {"count": len(keys), "dim": keys.shape[1] if keys.ndim == 2 else None, "key_dtype": str(keys.dtype)}
        check_same({f: self.meta.get(f) for f in found}, found, f"{path}/meta.json", f"{path}/keys.npy")
        check_same({"count": self.meta["count"]}, {"count": len(vals)}, f"{path}/meta.json", f"{path}/vals.npy")
        if self.meta["key_type"] not in KEY_TYPES:
            raise KnnlmError(f"datastore {path} has an unknown key type {self.meta['key_type']!r}")
        self.keys, self.vals = torch.from_numpy(keys), torch.from_numpy(vals)
        self.key_norms = squared_norms(self.keys, release=self.key_file)
        if not torch.isfinite(self.key_norms).all():
            bad = (~torch.isfinite(self.key_norms)).nonzero()[0, 0].item()
            raise KnnlmError(f"datastore {path} has NaN or infinite keys (first at row {bad})")
        read_meta(meta_path)  # the seal: the manifest is as the build wrote it
        check_files(path, self.meta["files"])
        if len(self.vals) and not (0 <= self.vals.min() and self.vals.max() < self.meta["vocab_size"]):
            raise KnnlmError(f"{path}/vals.npy holds token ids outside [0, {self.meta['vocab_size']}), "
                             "the vocabulary of its model")
        self.index = None

    def verify(self):
        """The expensive checks: the whole of every file against its sha256 in the manifests."""
        check_files(self.path, self.meta["files"], full=True)
        if self.has_index():
            check_files(self.path, read_json(index_path(self, "index", "json"), INDEX_FIELDS)["files"], full=True)

    def __len__(self):
        return len(self.vals)

    def check_model(self, model, vocab, name="the model"):
        """Refuse a model this datastore was not built by (a datastore of another corpus is fine)."""
        wanted = {"dim": model.cfg.d_model, "vocab_fingerprint": vocab.fingerprint(),
                  "model_fingerprint": fingerprint(model, vocab)}
        check_same(wanted, self.meta, name, "the datastore")

    def head(self, n):
        """The datastore of its first n rows, i.e. of the first n + 1 tokens of its text (exact search only)."""
        if not 1 <= n <= len(self):
            raise KnnlmError(f"a datastore of {len(self):,} keys has no first {n:,} rows")
        part = copy.copy(self)
        part.keys, part.vals, part.key_norms, part.index = self.keys[:n], self.vals[:n], self.key_norms[:n], None
        part.meta = {**self.meta, "count": n}
        return part

    def has_index(self, name="index"):
        return os.path.isfile(index_path(self, name, "json"))

    def load_index(self, nprobe=None, recompute=True):
        self.index = FaissIndex(self, nprobe, recompute)
        return self.index

    def search(self, queries, k, backend="auto"):
        """queries [B, d] -> (squared distances [B, k] ascending, ids [B, k]). backend "faiss"
        searches the index of load_index; the others search exactly (section 4)."""
        if backend == "faiss":
            return self.index.search(queries, k)
        return topk_l2(queries, self.keys, k, key_norms=self.key_norms, backend=backend)


def release_pages(memmap):
    """Drop the pages of a memory-mapped file that this process has read from its resident memory
    (the OS keeps them cached). A pass over keys larger than RAM then holds one batch at a time."""
    memmap._mmap.madvise(mmap.MADV_DONTNEED)


# -----------------------------------------------------------------------------
# 4. Search
# Exact k-nearest-neighbour search by squared L2 distance:
#     ||q - k||^2 = ||q||^2 - 2 q.k + ||k||^2
# with the key norms computed once, the inner products by one matmul per chunk
# of keys, a top-k per chunk, and a merge with the best found so far.
# float16 keys are converted to float32 chunk by chunk (CPU fp16 matmul is slow).
# topk_l2_torch is the readable reference; csrc/ holds the same steps as a C++
# kernel (and a CUDA one) with a cheaper selection, used when it is built.
# Equal distances go to the smaller id (the reference: only among the k it
# returns, as torch.topk picks freely among keys tied for the k-th place).

SEARCH_BACKENDS = ("auto", "torch", "ext")


def squared_norms(keys, chunk_size=1 << 16, release=None):
    """||k||^2 for every key, chunk by chunk (release: the np.memmap behind keys, let go of as it is read)."""
    norms = []
    for i in range(0, len(keys), chunk_size):
        norms.append(keys[i:i + chunk_size].float().pow(2).sum(1))
        if release is not None:
            release_pages(release)
    return torch.cat(norms)


def search_backend(backend, queries_device, keys_device, k):
    """What "auto" means for this search: the kernel when built for these devices, else torch."""
    if backend == "ext" and knnlm_ext is None:
        raise KnnlmError("the C++ search kernel is not built: run `pip install --no-build-isolation -e .` "
                         "or use the torch backend")
    if backend != "auto":
        return backend
    queries_device, keys_device = torch.device(queries_device), torch.device(keys_device)
    usable = knnlm_ext is not None and queries_device == keys_device and (queries_device.type == "cpu" or (
        queries_device.type == "cuda" and knnlm_ext.cuda and k <= knnlm_ext.CUDA_MAX_K))
    return "ext" if usable else "torch"


def topk_l2(queries, keys, k, key_norms=None, backend="auto"):
    """The k keys nearest to each query. queries [B, d] float32, keys [N, d] float16/32,
    key_norms [N] float32 (computed when not given). Returns (dists [B, k] float32 ascending,
    ids [B, k] int64). backend: "torch", "ext" (the kernel of csrc/) or "auto" (ext when built)."""
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
    if key_norms is None:
        key_norms = squared_norms(keys)
    if key_norms.dtype != torch.float32 or key_norms.shape != (N,):
        raise TypeError(f"key_norms must be float32 [{N}], got {key_norms.dtype} {list(key_norms.shape)}")
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(SEARCH_BACKENDS)}, got {backend!r}")
    same_device = queries.device == keys.device == key_norms.device
    backend = search_backend(backend, queries.device, keys.device, k)
    if backend == "torch":
        return topk_l2_torch(queries, keys, k, key_norms)
    if not same_device:
        raise ValueError(f"queries, keys and key_norms must be on one device for the kernel, got "
                         f"{queries.device}, {keys.device}, {key_norms.device}")
    return knnlm_ext.topk_l2(queries, keys, k, key_norms)


def topk_l2_torch(queries, keys, k, key_norms, key_chunk=1 << 18, query_block=256):
    """topk_l2 in plain PyTorch. The keys may live on the CPU (a memmap) with the queries on a GPU."""
    N, d = keys.shape
    B, device = len(queries), queries.device
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


# -----------------------------------------------------------------------------
# 5. FAISS index: the paper's approximate search, for datastores too big to scan
# The paper's index over 103 M keys: an inverted file (IVF) of 4096 k-means
# lists, every key stored as a 64-byte product-quantisation (PQ) code, trained
# on a sample of 1 M keys. A query scans the codes of its 32 nearest lists
# (nprobe) and ranks them by quantised distance; the k it retrieves then get
# exact distances from the float16 keys (recompute: perplexity 16.5 -> 16.06).
# Our default keeps that shape, with 4 sqrt(N) lists (FAISS's rule of thumb, capped
# at the paper's 4096) and the 64 bytes spent on 128 four-bit sub-quantisers, which FAISS
# scans with SIMD ("fast-scan"): on our CPU 3.7x the queries/s of 8-bit PQ64 and 3x
# faster to build, the same nearest neighbours once re-ranked (README, bench/index.py).
# `--factory IVF4096,PQ64` gives the paper's own.
# The index is built in shards: trained once; each shard (a process of its own,
# or one after another) adds its row range of the keys to a copy of the trained
# index; FAISS merges the shards' lists. Keys are read in batches whose pages are
# released, so neither building nor searching holds the key matrix in memory.

INDEX_TRAIN_SIZE = 1_000_000  # keys sampled to train the index, as in the paper
NPROBE = 32                   # lists visited per query, as in the paper (all of them if there are fewer)
INDEX_BATCH = 1 << 16         # keys read from the memmap and added per step
EXACT_MAX_KEYS = 2_000_000    # beyond this, backend "auto" uses the FAISS index when there is one
RERANK_MMAP_MAX_BYTES = 2 << 30  # beyond this, re-ranking reads key rows with pread, not through the memmap
INDEX_DATASTORE_FIELDS = ("count", "dim", "key_dtype", "key_type", "model_fingerprint", "vocab_fingerprint", "source",
                          "files")  # the datastore's files' checksums too: its index fits no other datastore
PLAN_FIELDS = {"datastore": dict, "factory": str, "train_size": int, "shards": int, "seed": int}
INDEX_FIELDS = {**PLAN_FIELDS, "files": dict}  # index.json: the plan, and the checksums of name.faiss


def default_factory(n, d):
    """The paper's IVF4096,PQ64 scaled to n keys of dimension d."""
    nlist = min(4096, 2 ** round(math.log2(4 * math.sqrt(n))))  # FAISS's guide: 4 sqrt(n) lists or more
    m = max(m for m in range(1, min(d, 128) + 1) if d % m == 0)  # 128 x 4 bits = 64 bytes when d allows
    return f"IVF{nlist},PQ{m}x4fs"


def empty_index(d, factory):
    """-> (the untrained index of a FAISS factory string, its IVF part)."""
    try:
        index = faiss.index_factory(d, factory)
        return index, faiss.extract_index_ivf(index)
    except RuntimeError as e:
        raise KnnlmError(f"FAISS cannot make an IVF index of dimension {d} from the factory string {factory!r}: "
                         f"{faiss_message(e)}") from None


def faiss_message(error):
    return str(error).strip().splitlines()[-1][:300]


def index_train_size(n, nlist, train_size=None):
    """The paper's 1 M-key sample, but not more than FAISS's k-means uses (256 keys per list)."""
    return min(n, train_size or min(INDEX_TRAIN_SIZE, 256 * nlist))


def index_bytes(n, d, ivf):
    return n * (ivf.code_size + 8) + ivf.nlist * d * 4  # per key a code and an int64 id; the centroids


def index_estimate(n, d, factory=None, train_size=None, k=1024):
    """-> (factory, {what: bytes}) for a datastore of n keys of dimension d and its index."""
    factory = factory or default_factory(n, d)
    _, ivf = empty_index(d, factory)
    index = index_bytes(n, d, ivf)
    sample = index_train_size(n, ivf.nlist, train_size)
    return factory, {
        "disk: keys (float16) and values (int64)": n * (2 * d + 8),
        "disk: the index": index,
        "disk: building the index (its shards, then the merged index)": 2 * index,
        "memory: training (the float32 sample and its residuals)": 2 * sample * d * 4,
        "memory: adding (the merged index and a batch of keys)": index + INDEX_BATCH * d * 6,
        "memory: searching (the index)": index,
        f"memory: evaluation cache, per million tokens (k={k} distances and values)": 10 ** 6 * k * 8}


def index_manifest(datastore):
    """What an index records of the datastore it indexes, and is checked against."""
    return {f: datastore.meta.get(f) for f in INDEX_DATASTORE_FIELDS}


def index_path(datastore, name, part):
    return os.path.join(datastore.path, f"{name}.{part}")


def read_index(path):
    try:
        return faiss.read_index(path)
    except RuntimeError as e:
        raise KnnlmError(f"FAISS index {path} is corrupt or truncated: {faiss_message(e)}") from None


def write_index(index, path):
    with atomic_write(path) as tmp:
        try:
            faiss.write_index(index, tmp)
        except RuntimeError as e:  # e.g. a full disk
            raise KnnlmError(f"cannot write {path}: {faiss_message(e)}") from None


def plan_index(datastore, factory=None, train_size=None, shards=1, seed=0, name="index"):
    """Fix what the index will be, and write it down (name.plan.json) so that every shard
    process, and a rerun after an interruption, builds the same index."""
    n, d = len(datastore), datastore.meta["dim"]
    factory = factory or default_factory(n, d)
    _, ivf = empty_index(d, factory)
    train_size = index_train_size(n, ivf.nlist, train_size)
    if train_size < ivf.nlist:
        raise KnnlmError(f"{factory} has {ivf.nlist} lists, more than the {train_size:,} keys to train them on")
    if not 1 <= shards <= n:
        raise KnnlmError(f"the number of index shards must be in [1, {n:,}], got {shards}")
    plan = {"datastore": index_manifest(datastore), "factory": factory,
            "train_size": train_size, "shards": shards, "seed": seed}
    for part, what in (("json", "the index"), ("plan.json", "the unfinished index build")):
        if os.path.isfile(index_path(datastore, name, part)):
            check_same(plan, read_json(index_path(datastore, name, part), PLAN_FIELDS), "this index build",
                       f"{what} {index_path(datastore, name, part)} (delete {name}.* there to build another)")
            return plan
    check_disk_space(datastore.path, 2 * index_bytes(n, d, ivf), "the index")  # its shards, then the merged index
    write_json(plan, index_path(datastore, name, "plan.json"))
    return plan


def train_index(datastore, plan, name="index", progress=True):
    """Train the IVF centroids and the PQ codebooks on a random sample of the keys."""
    path = index_path(datastore, name, "trained.faiss")
    if os.path.isfile(path) or os.path.isfile(index_path(datastore, name, "json")):
        return
    index, ivf = empty_index(datastore.meta["dim"], plan["factory"])
    rng = np.random.default_rng(plan["seed"])
    rows = np.sort(rng.choice(len(datastore), plan["train_size"], replace=False))
    sample = np.empty((len(rows), datastore.meta["dim"]), np.float32)
    for i in tqdm(range(0, len(rows), INDEX_BATCH), desc="index: read sample", unit_scale=INDEX_BATCH,
                  unit="key", disable=not progress):
        sample[i:i + INDEX_BATCH] = datastore.key_file[rows[i:i + INDEX_BATCH]]
        release_pages(datastore.key_file)
    if faiss.get_num_gpus() > 0:  # k-means on the GPUs (with a faiss-gpu build)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(datastore.meta["dim"]))
    ivf.cp.verbose = progress  # FAISS reports each iteration of the k-means of the lists
    print(f"index: training {plan['factory']} on {len(rows):,} keys")
    index.train(sample)
    write_index(index, path)


def shard_rows(n, shard, shards):
    return n * shard // shards, n * (shard + 1) // shards


def add_shard(datastore, plan, shard, name="index", progress=True):
    """Add the rows of one shard (ids = datastore rows) to a copy of the trained index."""
    path = index_path(datastore, name, f"shard{shard}.faiss")
    if os.path.isfile(path) or os.path.isfile(index_path(datastore, name, "json")):
        return
    index = read_index(index_path(datastore, name, "trained.faiss"))
    start, stop = shard_rows(len(datastore), shard, plan["shards"])
    bar = tqdm(total=stop - start, unit="key", desc=f"index: shard {shard + 1}/{plan['shards']}", disable=not progress)
    for begin in range(start, stop, INDEX_BATCH):
        end = min(begin + INDEX_BATCH, stop)
        index.add_with_ids(np.asarray(datastore.key_file[begin:end], np.float32), np.arange(begin, end))
        release_pages(datastore.key_file)
        bar.update(end - begin)
    bar.close()
    write_index(index, path)


def merge_index(datastore, plan, name="index"):
    """Merge the shards' inverted lists into name.faiss; name.json, written last, marks it done."""
    if os.path.isfile(index_path(datastore, name, "json")):
        return
    index = read_index(index_path(datastore, name, "shard0.faiss"))
    for shard in range(1, plan["shards"]):
        index.merge_from(read_index(index_path(datastore, name, f"shard{shard}.faiss")), 0)
    assert index.ntotal == len(datastore), (index.ntotal, len(datastore))
    write_index(index, index_path(datastore, name, "faiss"))
    files = {f"{name}.faiss": file_checksums(index_path(datastore, name, "faiss"))}
    write_json({**plan, "files": files}, index_path(datastore, name, "json"))
    for part in ["plan.json", "trained.faiss"] + [f"shard{s}.faiss" for s in range(plan["shards"])]:
        os.remove(index_path(datastore, name, part))


def build_index(datastore, factory=None, train_size=None, shards=1, seed=0, name="index", progress=True):
    """Plan, train, fill shard by shard and merge the index of a datastore in this process.
    Finished steps are kept: a rerun after an interruption does only what is missing."""
    with writing(datastore.path, directory=True):
        plan = plan_index(datastore, factory, train_size, shards, seed, name)
        train_index(datastore, plan, name, progress)
        for shard in range(shards):
            add_shard(datastore, plan, shard, name, progress)
        merge_index(datastore, plan, name)
    return plan


class FaissIndex:
    """search(queries, k) by a datastore's FAISS index: the codes of the nprobe nearest lists ranked
    by quantised distance, then (recompute) exact distances from the float16 keys of the k retrieved."""

    def __init__(self, datastore, nprobe=None, recompute=True, name="index"):
        meta_path = index_path(datastore, name, "json")
        if not os.path.isfile(meta_path):
            if writer_pid(datastore.path, directory=True):
                raise KnnlmError(f"the FAISS index {name} of {datastore.path} is being built now (by process "
                                 f"{writer_pid(datastore.path, True)}): wait for the build to finish")
            raise KnnlmError(f"no FAISS index {name} in {datastore.path}: build one with "
                             f"`python build_datastore.py --index`, or search exactly")
        self.meta = read_json(meta_path, INDEX_FIELDS)
        check_same(index_manifest(datastore), self.meta["datastore"],
                   f"the datastore in {datastore.path}", f"its index {name}.faiss")
        check_files(datastore.path, self.meta["files"])
        self.index = read_index(index_path(datastore, name, "faiss"))
        nlist = faiss.extract_index_ivf(self.index).nlist
        nprobe = min(NPROBE, nlist) if nprobe is None else nprobe
        if not 1 <= nprobe <= nlist:
            raise KnnlmError(f"--nprobe must be in [1, {nlist}] (the lists of {name}.faiss), got {nprobe}")
        if (self.index.ntotal, self.index.d) != (len(datastore), datastore.meta["dim"]):
            raise KnnlmError(f"index {index_path(datastore, name, 'faiss')} holds {self.index.ntotal:,} keys of "
                             f"dimension {self.index.d}, the datastore {len(datastore):,} of {datastore.meta['dim']}")
        faiss.extract_index_ivf(self.index).nprobe = nprobe
        self.datastore, self.nprobe, self.recompute = datastore, nprobe, recompute
        # Every row read through a memmap makes the kernel map 64 KB of cached file around it
        # (fault-around): random rows of a large key file soon put all of it in this process's
        # resident memory. Past RERANK_MMAP_MAX_BYTES the kernel reads rows with pread instead.
        self.key_reader = None
        if datastore.key_file.nbytes > RERANK_MMAP_MAX_BYTES and knnlm_ext is not None:
            self.key_reader = open(os.path.join(datastore.path, "keys.npy"), "rb")

    def search(self, queries, k):
        """queries [B, d] -> (squared distances [B, k] ascending, ids [B, k]), ties by id."""
        q = queries.detach().float().cpu()
        dists, ids = map(torch.from_numpy, self.index.search(q.numpy(), k))  # quantised distances
        if self.recompute:
            fd = self.key_reader.fileno() if self.key_reader else -1
            dists, ids = rerank(q, self.datastore.keys, ids, fd=fd, offset=self.datastore.key_file.offset)
            release_pages(self.datastore.key_file)
        else:
            dists[ids < 0] = math.inf
            dists, ids = sort_neighbours(dists, ids)
        ids = ids.clamp(min=0)  # id -1: the nprobe lists held fewer than k keys; its distance is inf
        return dists.to(queries.device), ids.to(queries.device)


def rerank(queries, keys, ids, use_ext=True, block=8, fd=-1, offset=0):
    """The exact ||q - keys[i]||^2 of every query [B, d] to each of its ids [B, k], sorted (ties by id),
    reading only those rows, in blocks of queries small enough for the cache. Id -1 gets
    distance inf. knnlm_ext.rerank_l2 does the same in C++ (reading the rows from the open
    file fd, where keys start at byte offset, when fd >= 0)."""
    if use_ext and knnlm_ext is not None and keys.device.type == "cpu":
        return knnlm_ext.rerank_l2(queries, keys, ids, fd, offset)
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


def sort_neighbours(dists, ids):
    """Each row ascending by distance, equal distances by id."""
    ids, order = ids.sort(dim=1)
    dists, order2 = dists.gather(1, order).sort(dim=1, stable=True)
    return dists, ids.gather(1, order2)


# -----------------------------------------------------------------------------
# 6. kNN-LM
# eq. 2: p_kNN(y | x) ∝ sum over neighbours (k_i, v_i) with v_i = y of exp(-d(k_i, f(x)) / T)
# eq. 3: p(y | x) = λ p_kNN(y | x) + (1 - λ) p_LM(y | x)
# Both in log space. The paper uses T = 1; a temperature is kept as an option.

def knn_log_prob(dists, neighbour_vals, targets, temperature=1.0):
    """log p_kNN(target | x) from the neighbours' squared distances [B, k] and values [B, k].
    A target that no neighbour carries gets log p_kNN = -inf (probability 0), never NaN.
    Distances count from the nearest neighbour's (the softmax is the same), so that float32 keeps
    its precision however far the neighbours are; T is kept within float32's range."""
    finfo = torch.finfo(dists.dtype)
    T = min(max(temperature, finfo.tiny), finfo.max)
    nearest = dists.amin(dim=1, keepdim=True)
    nearest = torch.where(torch.isfinite(nearest), nearest, 0.0)        # a row with no neighbour at all
    scores = (dists - nearest).div_(-T)                                    # [B, k]
    carries_target = neighbour_vals == targets[:, None]                   # [B, k]
    log_norm = torch.logsumexp(scores, dim=1)
    log_p = torch.logsumexp(scores.masked_fill_(~carries_target, -math.inf), dim=1) - log_norm
    return log_p.masked_fill_(torch.isneginf(log_norm), -math.inf)


def knn_distribution(dists, neighbour_vals, vocab_size, temperature=1.0):
    """The whole p_kNN(. | x) over the vocabulary [B, V]: softmax weights summed per token id."""
    weights = torch.softmax(-dists / temperature, dim=1)
    return torch.zeros(len(dists), vocab_size, device=dists.device).scatter_add_(1, neighbour_vals, weights)


def interpolate(log_p_lm, log_p_knn, lmbda):
    """eq. 3 in log space: log(λ p_kNN + (1 - λ) p_LM). λ = 0 returns log p_LM exactly."""
    lmbda = torch.as_tensor(lmbda, dtype=log_p_lm.dtype)
    return torch.logaddexp(log_p_knn + lmbda.log(), log_p_lm + torch.log1p(-lmbda))


# -----------------------------------------------------------------------------
# 7. Evaluation
# One pass over a split computes, for every target token, log p_LM and the k
# nearest neighbours of its query key. Any (λ, T) is then a cheap re-mix of that
# cache, so tuning on the validation split costs one pass.

@torch.no_grad()
def score_split(model, tokens, datastore=None, k=1024, min_context=None, batch_size=16,
                key_type="ffn_in_ln", backend="auto", progress=True, desc="evaluate", keep_queries=False):
    """-> dict with targets [n], log_p_lm [n], and with a datastore dists [n, k], neighbour_vals [n, k]
    and search_seconds (the time spent searching). keep_queries also keeps the query keys
    [n, d], so that other datastores can be searched later without the model."""
    cfg = model.cfg
    device = next(model.parameters()).device
    if len(tokens) < 2:
        raise KnnlmError(f"{desc}: {len(tokens)} token(s), nothing to score (a text needs at least two)")
    out = {"targets": [], "log_p_lm": [], "queries": [], "dists": [], "neighbour_vals": []}
    search_seconds = 0.0
    bar = tqdm(total=len(tokens) - 1, unit="tok", desc=desc, disable=not progress)
    for x, y, scored in sliding_batches(tokens, cfg.block_size, min_context, batch_size):
        x, y, scored = x.to(device), y.to(device), scored.to(device)
        logits, keys = model(x, key_type=key_type)
        log_p = F.log_softmax(logits[scored].float(), dim=-1)
        targets, queries = y[scored], keys[scored].float()
        out["targets"].append(targets.cpu())
        out["log_p_lm"].append(log_p.gather(1, targets[:, None])[:, 0].cpu())
        if keep_queries:
            out["queries"].append(queries.cpu())
        if datastore is not None:
            t = time.time()
            dists, vals = neighbours(datastore, queries, k, backend)
            search_seconds += time.time() - t
            out["dists"].append(dists), out["neighbour_vals"].append(vals)
        bar.update(len(targets))
    bar.close()
    return {**{name: torch.cat(parts) for name, parts in out.items() if parts}, "search_seconds": search_seconds}


def neighbours(datastore, queries, k, backend="auto"):
    """The k nearest neighbours of queries [B, d]: (squared distances [B, k], their values [B, k] int32)."""
    dists, ids = datastore.search(queries, k, backend)
    return dists.cpu(), datastore.vals[ids.cpu()].int()  # int32: half the memory


def knnlm_log_probs(cache, lmbda, temperature=1.0, k=None):
    """Re-mix a score_split cache: log p(target) of kNN-LM at (λ, T) for every token, from the
    nearest k of its neighbours (default: all). The neighbours are sorted, so a smaller k is a
    prefix of the cache: one pass at k = 1024 serves every k below."""
    log_p_knn = knn_log_prob(cache["dists"][:, :k], cache["neighbour_vals"][:, :k], cache["targets"], temperature)
    return interpolate(cache["log_p_lm"], log_p_knn, lmbda)


def perplexity(log_probs):
    """exp(mean negative log-probability); inf when a token has probability 0 or the mean is beyond exp's range."""
    try:
        return math.exp(-log_probs.double().mean().item())
    except OverflowError:
        return math.inf


def tune(cache, lambdas, temperatures, k=None):
    """Grid search of (λ, T) on a cache (its nearest k neighbours); -> (best λ, best T, its perplexity, all results)."""
    results = []
    for T in temperatures:
        log_p_knn = knn_log_prob(cache["dists"][:, :k], cache["neighbour_vals"][:, :k], cache["targets"], T)
        for lmbda in lambdas:
            results.append((perplexity(interpolate(cache["log_p_lm"], log_p_knn, lmbda)), lmbda, T))
    ppl, lmbda, T = min(results)
    return lmbda, T, ppl, results
