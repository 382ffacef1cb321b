"""
The machinery around the method of knnlm.py: what a reader of the paper need not meet.

    Scripts       one-line errors, the command-line flags the scripts and experiments share
    Corpora       WikiText download, wikitext-103-small, checks
    Files         atomic writes, one writer at a time (OS locks), JSON, checkpoints
    Manifests     what a datastore is (a dataclass), its files' checksums and seal
    Datastores    on disk: built resumably and in shards (torchrun), loaded with checks
    Search        the C++/CUDA kernel (torch.ops.knnlm) and the one place that decides
                  how a datastore is searched: exact (PyTorch or the kernel) or FAISS
    FAISS index   planned, trained, filled in shards and merged from keys on disk, resumably
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
import pickle
import shutil
import sys
import tempfile
import time
import urllib.request
import warnings
import zipfile
from contextlib import contextmanager, nullcontext
import dataclasses
from dataclasses import asdict, dataclass, fields

import faiss
import numpy as np
import torch
from tqdm import tqdm

import knnlm
from knnlm import KnnlmError

try:  # the C++/CUDA search kernel of csrc/, built by `pip install --no-build-isolation -e .`
    import knnlm_ext
except ImportError:
    knnlm_ext = None


# -----------------------------------------------------------------------------
# Scripts

for _stream in (sys.stdout, sys.stderr):  # the scripts print λ, ¶, …: on a console that cannot, as \u escapes
    if hasattr(_stream, "reconfigure"):
        _stream.reconfigure(errors="backslashreplace")


@contextmanager
def user_errors(interrupted=None):
    """Around a script's work on user input: a KnnlmError ends it with one line and exit code 2;
    with interrupted (what to do about it), Ctrl-C ends it with that line and exit code 130."""
    try:
        yield
    except KnnlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        sys.exit(130)


def positive_int(text, low=1, what="a positive integer"):
    """argparse type: an integer of at least 1 (a batch size, a count of steps or shards)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def non_negative_int(text):
    """argparse type: an integer of at least 0 (a count of warm-up steps)."""
    return positive_int(text, 0, "an integer >= 0")


def check_device(device):
    """--device: cpu, cuda or cuda:N, and there."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        kind = None
    if kind is None or kind.type not in ("cpu", "cuda"):
        raise KnnlmError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise KnnlmError(f"--device {device} was asked for, but this torch build sees no CUDA GPU: use --device cpu")
    if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
        raise KnnlmError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def finite_float(low=None, high=None, low_open=False, high_open=False):
    """argparse type: a finite number in [low, high] (an end open where said), e.g. a rate or a weight."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            where = (f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
                     f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}")
            raise argparse.ArgumentTypeError(f"must be a finite number in {where}, got {text}")
        return value
    return parse


NPROBE = 32  # FAISS: lists visited per query, as in the paper (all of them if there are fewer)
ARGUMENTS = {  # the flags the scripts and experiments share: name -> (flag, its add_argument options)
    "data": ("--data", dict(default="data/wikitext-103-small",
                            help="directory with wiki.{train,valid,test}.tokens; a missing wikitext-103, wikitext-2 "
                                 "or wikitext-103-small directory is downloaded (default: %(default)s)")),
    "checkpoint": ("--checkpoint", dict(default="runs/model.pt", help="model from train.py (default: %(default)s)")),
    "datastore": ("--datastore", dict(default="runs/datastore",
                                      help="datastore from build_datastore.py, from this corpus or another "
                                           "(default: %(default)s)")),
    "k": ("--k", dict(type=positive_int, default=1024, help="neighbours per token (default: %(default)s, the paper's)")),
    "min_context": ("--min-context", dict(type=int, default=None,
                                          help="every token has at least this many tokens of left context "
                                               "(default: half the model's context, like the paper's 1536 of 3072)")),
    "batch_size": ("--batch-size", dict(type=positive_int, default=16, help="windows per forward pass (default: %(default)s)")),
    "device": ("--device", dict(default="cuda" if torch.cuda.is_available() else "cpu",
                                help="cpu or cuda (default: cuda when present)")),
    "lambda": ("--lambda", dict(dest="lmbda", type=float, default=0.25,
                                help="interpolation weight of p_kNN (default: %(default)s, the paper's in-domain value)")),
    "temperature": ("--temperature", dict(type=float, default=1.0,
                                          help="p_kNN ∝ exp(-d / temperature) (default: %(default)s, as in the paper)")),
    "nprobe": ("--nprobe", dict(type=int, default=None,
                                help=f"faiss: inverted lists visited per query (default: the paper's {NPROBE}, or all "
                                     "lists when the index has fewer)")),
}


def check_knnlm_arguments(parser, args):
    """The flags of eqs. 2 and 3 (--lambda, --temperature) in range, or the parser's one-line error
    (--k is a positive_int)."""
    if not 0 <= args.lmbda <= 1:
        parser.error(f"--lambda must be in [0, 1], got {args.lmbda}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")


def arguments(*names, **defaults):
    """A parent parser (argparse's parents=[...]) with the shared flags named, defaults overridden by name."""
    parser = argparse.ArgumentParser(add_help=False)
    for name in names:
        flag, options = ARGUMENTS[name]
        parser.add_argument(flag, **{**options, **({"default": defaults[name]} if name in defaults else {})})
    return parser


def backend_argument(parser, choices=("auto", "torch", "ext", "faiss")):
    meaning = {"torch": "exact, chunked matmul + top-k in PyTorch", "ext": "exact, the C++ kernel of csrc/",
               "faiss": "the datastore's IVF-PQ index (build_datastore.py --index)",
               "auto": (f"faiss beyond {EXACT_MAX_KEYS:,} keys when the index exists, else " if "faiss" in choices
                        else "") + "ext when built, else torch"}
    parser.add_argument("--backend", default="auto", choices=choices,
                        help="nearest-neighbour search: " + "; ".join(f"{c} = {meaning[c]}" for c in choices[1:] + choices[:1])
                             + " (default: %(default)s)")


# -----------------------------------------------------------------------------
# Corpora

WIKITEXT_URLS = {  # the official archives, newest location first
    "wikitext-103": ["https://wikitext.smerity.com/wikitext-103-v1.zip",
                     "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"],
    "wikitext-2": ["https://wikitext.smerity.com/wikitext-2-v1.zip",
                   "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"],
}
SMALL_TRAIN_BYTES = int(2.5 * 2**20)  # wikitext-103-small: the first 2.5 MiB of train


def check_corpus(data_dir):
    """Fail early, with one clear line, unless data_dir holds the three WikiText splits."""
    missing = [knnlm.split_path(data_dir, s) for s in knnlm.SPLITS if not os.path.isfile(knnlm.split_path(data_dir, s))]
    if missing:
        raise KnnlmError(f"{data_dir} is not a WikiText corpus directory: missing " + ", ".join(missing))
    empty = [knnlm.split_path(data_dir, s) for s in knnlm.SPLITS if os.path.getsize(knnlm.split_path(data_dir, s)) == 0]
    if empty:
        raise KnnlmError("empty corpus file: " + ", ".join(empty))
    return data_dir


def check_has_words(tokens, vocab, path, what):
    """tokens, unless the text they were read from has no word at all (only blank lines)."""
    if not (tokens != vocab.stoi[knnlm.EOS]).any():
        raise KnnlmError(f"{path} has no words, only blank lines: nothing to {what}")
    return tokens


def file_fingerprint(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


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
                     + "\nPut wiki.{train,valid,test}.tokens in a directory and pass it with --data.")


def make_small(src_dir, dst_dir, train_bytes=SMALL_TRAIN_BYTES):
    """wikitext-103-small: official valid and test; train cut to its first articles
    (the longest prefix of at most train_bytes that ends where an article begins)."""
    os.makedirs(dst_dir, exist_ok=True)
    for split in ("valid", "test"):
        shutil.copyfile(knnlm.split_path(src_dir, split), knnlm.split_path(dst_dir, split))
    with open(knnlm.split_path(src_dir, "train"), "rb") as f:
        head = f.read(train_bytes + 1)
    lines = head.splitlines(keepends=True)
    cut, size = 0, 0
    for i, line in enumerate(lines[:-1]):  # an article starts with " \n" then " = Title = \n"
        if line == b" \n" and lines[i + 1].startswith(b" = ") and not lines[i + 1].startswith(b" = = "):
            if size <= train_bytes:
                cut = size
        size += len(line)
    with open(knnlm.split_path(dst_dir, "train"), "wb") as f:
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
# Files: written atomically, by one writer at a time


@contextmanager
def atomic_write(path):
    """Yield a temporary name beside path, rename it to path once written: a crash
    never leaves half a file under the final name (and the next write removes what a
    killed writer left). A failed write (a full disk) is a KnnlmError."""
    path = os.path.realpath(path)  # through a symlink: the file it names is replaced, not the link
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
    path = os.path.realpath(path)  # one lock for a file however it is named (a symlink, ../x)
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


def check_same(wanted, found, wanted_name, found_name):
    """Refuse, in one line naming both sides, the first field where found differs from wanted."""
    for field, value in wanted.items():
        if found.get(field) != value:
            raise KnnlmError(f"{field} differs: {found_name} has {found.get(field)!r}, {wanted_name} "
                             f"{'have' if wanted_name.endswith('arguments') else 'has'} {value!r}")


# -----------------------------------------------------------------------------
# Checkpoints: the model, its vocabulary and a fingerprint of both

def vocab_fingerprint(vocab):
    return hashlib.sha256("\n".join(vocab.itos).encode()).hexdigest()[:16]


def fingerprint(model, vocab):
    """A short hash of the weights, the config and the vocabulary: what a datastore depends on."""
    h = hashlib.sha256(json.dumps(asdict(model.cfg), sort_keys=True).encode())
    h.update("\n".join(vocab.itos).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path, model, vocab, **extra):
    with atomic_write(path) as tmp:
        try:
            torch.save({"config": asdict(model.cfg), "model": model.state_dict(), "vocab": vocab.itos,
                        "fingerprint": fingerprint(model, vocab), **extra}, tmp)
        except RuntimeError as e:  # torch's writer failed, e.g. on a full disk
            raise KnnlmError(f"cannot write {path}: {e}") from None


CHECKPOINT_FIELDS = ("config", "model", "vocab", "fingerprint")


def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode, vocab, the whole checkpoint dict). Only tensors and plain data are
    read (torch.load's weights_only): a checkpoint is a pickle, and a pickle of any other object
    can run code as it is loaded; such a file is refused before anything in it runs."""
    if not os.path.isfile(path):
        raise KnnlmError(f"no checkpoint at {path}: train one with train.py (or pass --checkpoint)")
    try:
        with warnings.catch_warnings():  # e.g. on the pickle protocol of a file that is refused anyway
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only refuses: objects other than tensors and plain data
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise KnnlmError(f"refused to load {path}: it holds Python objects other than tensors and plain data, "
                         f"which could run code when loaded ({detail or 'weights_only'}); train.py's checkpoints "
                         "hold none") from None
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise KnnlmError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    missing = [f for f in CHECKPOINT_FIELDS if f not in ckpt] if isinstance(ckpt, dict) else CHECKPOINT_FIELDS
    if missing:
        raise KnnlmError(f"{path} is not a checkpoint of train.py: it has no {', '.join(missing)}")
    try:
        model = knnlm.TransformerLM(knnlm.ModelConfig(**ckpt["config"])).to(device)
        model.load_state_dict(ckpt["model"])
        vocab = knnlm.Vocab(ckpt["vocab"])
    except Exception as e:  # a config, weights or vocabulary of the wrong shape
        raise KnnlmError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if fingerprint(model, vocab) != ckpt["fingerprint"]:
        raise KnnlmError(f"checkpoint {path} is corrupt: its weights do not match its fingerprint")
    return model.eval(), vocab, ckpt


# -----------------------------------------------------------------------------
# Manifests: what a datastore is, written once by its build (meta.json), checked by every reader

@dataclass
class Manifest:
    """Everything a datastore depends on. A rerun of the build with the same manifest resumes or
    reuses it; anything else is refused. meta.json adds the size and checksums of the files and a
    seal (a checksum of all its fields: a hand-edited manifest no longer matches it)."""
    count: int
    dim: int
    key_dtype: str
    key_type: str
    model_fingerprint: str
    vocab_fingerprint: str
    vocab_size: int
    min_context: int
    block_size: int
    source: dict = None  # the corpus file: its path, split and sha256 (None for made-up keys)

    @classmethod
    def of(cls, model, vocab, n, key_type, min_context, source):
        return cls(n, model.cfg.d_model, "float16", key_type, fingerprint(model, vocab), vocab_fingerprint(vocab),
                   len(vocab), min_context, model.cfg.block_size, source)

    @classmethod
    def read(cls, path):
        """-> (the manifest in path/meta.json, the checksums of its files, its seal), its fields' types and seal checked."""
        meta = read_json(os.path.join(path, "meta.json"), {})
        for name, kind, optional in [(f.name, f.type, f.default is None) for f in fields(cls)] + [
                ("files", dict, False), ("seal", str, False)]:
            value = meta.get(name)
            if not (isinstance(value, kind) and not isinstance(value, bool) or optional and value is None):
                raise KnnlmError(f"{path}/meta.json is not what it should be: field {name!r} is {value!r}")
        if seal(meta) != meta["seal"]:
            raise KnnlmError(f"{path}/meta.json was edited: its fields no longer match their seal. Rebuild the "
                             "datastore rather than edit its manifest")
        return cls(**{f.name: meta[f.name] for f in fields(cls)}), meta["files"], meta["seal"]

    def write(self, path, progress=False):
        """Finish a datastore: meta.json, with the checksums of its files and its seal."""
        meta = {**asdict(self), "files": {name: file_checksums(os.path.join(path, name), progress)
                                          for name in DATASTORE_FILES}}
        write_json({**meta, "seal": seal(meta)}, os.path.join(path, "meta.json"))


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


# -----------------------------------------------------------------------------
# Datastores on disk
# Keys are float16 and values int64 in .npy memmaps written chunk by chunk, so the
# datastore never has to fit in memory. The build commits its progress (a row count
# at the end of a context window) every few seconds, so an interrupted build continues
# where it stopped, with any --batch-size; under torchrun each process writes the rows
# of its share of the windows.


@torch.no_grad()
def build_datastore(model, vocab, tokens, out_dir, key_type="ffn_in_ln", min_context=None,
                    batch_size=16, source=None, progress=True, commit_seconds=10.0,
                    shard=0, shards=1, barrier=lambda: None):
    """Write the datastore (eq. 1) of `tokens` to out_dir. Progress is committed every commit_seconds
    (rows flushed to disk first): an interrupted build rerun with the same arguments
    continues from the last commit and ends byte-identical to an uninterrupted one.
    With shards > 1 this process (one of `shards`, e.g. under torchrun, all calling this
    with the same `barrier`) writes the rows of its share of the windows."""
    cfg = model.cfg
    min_context = knnlm.resolve_min_context(min_context, cfg.block_size)
    n = len(tokens) - 1
    if n < 1:
        raise KnnlmError(f"{source}: a datastore needs at least two tokens, got {len(tokens)}")
    manifest = Manifest.of(model, vocab, n, key_type, min_context, source)
    with writing(out_dir, directory=True) if shard == 0 else nullcontext():  # shard 0 holds it for all
        return write_datastore(model, tokens, out_dir, manifest, batch_size, progress, commit_seconds,
                               shard, shards, barrier)


def write_datastore(model, tokens, out_dir, manifest, batch_size, progress, commit_seconds, shard, shards, barrier):
    cfg, n = model.cfg, manifest.count
    meta_path = os.path.join(out_dir, "meta.json")
    progress_path = progress_file(out_dir, shard, shards)
    if os.path.isfile(meta_path):  # finished before: reuse it if it is the same datastore
        check_same(asdict(manifest), asdict(Manifest.read(out_dir)[0]), "this build", f"the datastore in {out_dir}")
        print(f"{out_dir} already holds this datastore")
        return manifest
    windows = knnlm.sliding_windows(len(tokens), cfg.block_size, manifest.min_context)
    windows = windows[len(windows) * shard // shards:len(windows) * (shard + 1) // shards]
    first_row = windows[0][0] + windows[0][2] if windows else n  # the row of the first target scored
    last_row = windows[-1][1] if windows else n
    if os.path.isfile(progress_path):  # interrupted before: continue it if it is the same build
        done = read_json(progress_path, {"manifest": dict, "rows": int})
        check_same(asdict(manifest), done["manifest"], "this build", f"the interrupted build in {out_dir}")
        print(f"resuming at row {done['rows']:,} of {n:,}")
    else:
        done = {"manifest": asdict(manifest), "rows": first_row}
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
    for k, v in knnlm.datastore_rows(model, tokens, manifest.key_type, manifest.min_context, batch_size, windows[skip:]):
        if not torch.isfinite(k).all():
            raise KnnlmError(f"the model gives NaN or infinite keys at datastore row {row}: is the checkpoint broken?")
        keys[row:row + len(v)] = k.numpy()
        vals[row:row + len(v)] = v.numpy()
        row += len(v)
        bar.update(len(v))
        bar.set_postfix(tok_per_s=f"{(row - done['rows']) / (time.time() - start):.0f}")
        if time.time() - last_commit > commit_seconds or row == last_row:
            keys.flush(), vals.flush()  # the rows reach the disk before the progress that counts them
            write_json({"manifest": asdict(manifest), "rows": row}, progress_path)
            last_commit = time.time()
    bar.close()
    assert row == last_row, (row, last_row)
    barrier()  # every shard has written its rows
    if shard == 0:
        manifest.write(out_dir, progress)
        for s in range(shards):
            if os.path.exists(progress_file(out_dir, s, shards)):  # a shard without windows wrote none
                os.remove(progress_file(out_dir, s, shards))
    barrier()  # the datastore is finished for every shard
    return manifest


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


def release_pages(memmap):
    """Drop the pages of a memory-mapped file that this process has read from its resident memory
    (the OS keeps them cached). A pass over keys larger than RAM then holds one batch at a time."""
    memmap._mmap.madvise(mmap.MADV_DONTNEED)


class DiskDatastore(knnlm.Datastore):
    """A datastore on disk: keys [N, d] float16 and vals [N] int64 memory-mapped, its manifest (meta),
    and how it is searched: exactly (PyTorch or the kernel) or by its FAISS index (see use())."""

    def __init__(self, path):
        if not os.path.isfile(os.path.join(path, "meta.json")):
            if pid := writer_pid(path, directory=True):
                raise KnnlmError(f"the datastore in {path} is being built now (by process {pid}): "
                                 "wait for the build to finish")
            unfinished = os.path.isdir(path) and any(f.startswith("progress") for f in os.listdir(path))
            raise KnnlmError(f"the datastore build in {path} was interrupted: rerun build_datastore.py with the "
                             "same arguments to finish it" if unfinished else
                             f"no datastore at {path} (no meta.json): build one with build_datastore.py")
        self.path = path
        self.meta, self.files, self.seal = Manifest.read(path)  # its fields' types and its seal checked
        try:  # mode "c" (copy-on-write) gives torch writable arrays without ever touching the files
            self.key_file = np.load(os.path.join(path, "keys.npy"), mmap_mode="c")
            vals = np.load(os.path.join(path, "vals.npy"), mmap_mode="c")
        except (OSError, ValueError) as e:
            raise KnnlmError(f"datastore {path} is corrupt or truncated: {e}") from None
        keys, meta = self.key_file, asdict(self.meta)
        found = {"count": len(keys), "dim": keys.shape[1] if keys.ndim == 2 else None, "key_dtype": str(keys.dtype)}
        check_same({f: meta[f] for f in found}, found, f"{path}/meta.json", f"{path}/keys.npy")
        check_same({"count": meta["count"]}, {"count": len(vals)}, f"{path}/meta.json", f"{path}/vals.npy")
        if self.meta.key_type not in knnlm.KEY_TYPES:
            raise KnnlmError(f"datastore {path} has an unknown key type {self.meta.key_type!r}")
        self.keys, self.vals, self.key_type = torch.from_numpy(keys), torch.from_numpy(vals), self.meta.key_type
        self.key_norms = knnlm.squared_norms(self.keys, release=lambda: release_pages(self.key_file))
        if not torch.isfinite(self.key_norms).all():
            bad = (~torch.isfinite(self.key_norms)).nonzero()[0, 0].item()
            raise KnnlmError(f"datastore {path} has NaN or infinite keys (first at row {bad})")
        check_files(path, self.files)
        if len(self.vals) and not (0 <= self.vals.min() and self.vals.max() < self.meta.vocab_size):
            raise KnnlmError(f"{path}/vals.npy holds token ids outside [0, {self.meta.vocab_size}), "
                             "the vocabulary of its model")
        self.backend, self.index = "torch", None

    def verify(self):
        """The expensive checks: the whole of every file against its sha256 in the manifests."""
        check_files(self.path, self.files, full=True)
        if self.has_index():
            check_files(self.path, read_json(index_path(self, "index", "json"), INDEX_FIELDS)["files"], full=True)

    def check_model(self, model, vocab, name="the model"):
        """Refuse a model this datastore was not built by (a datastore of another corpus is fine)."""
        wanted = {"dim": model.cfg.d_model, "vocab_fingerprint": vocab_fingerprint(vocab),
                  "model_fingerprint": fingerprint(model, vocab)}
        check_same(wanted, asdict(self.meta), name, "the datastore")

    def head(self, n):
        """The datastore of its first n rows, i.e. of the first n + 1 tokens of its text (exact search only)."""
        if not 1 <= n <= len(self):
            raise KnnlmError(f"a datastore of {len(self):,} keys has no first {n:,} rows")
        part = copy.copy(self)
        part.keys, part.vals, part.key_norms, part.index = self.keys[:n], self.vals[:n], self.key_norms[:n], None
        part.meta = dataclasses.replace(self.meta, count=n)
        part.backend = "torch" if self.backend == "faiss" else self.backend
        return part

    def has_index(self, name="index"):
        return os.path.isfile(index_path(self, name, "json"))

    def load_index(self, nprobe=None, recompute=True):
        self.index = FaissIndex(self, nprobe, recompute)
        return self.index

    def use(self, backend="auto", device="cpu", k=1, nprobe=None, recompute=True):
        """Decide how this datastore is searched for k neighbours (search_backend) and get ready for it;
        -> the backend."""
        if k > len(self):
            raise KnnlmError(f"--k {k} is larger than the datastore ({len(self):,} keys)")
        self.backend = search_backend(backend, device, self.keys.device, k, len(self), self.has_index())
        if self.backend == "faiss":
            self.load_index(nprobe, recompute)
        return self.backend

    def search(self, queries, k):
        """queries [B, d] -> (squared distances [B, k] ascending, ids [B, k]), as use() decided."""
        if self.backend == "faiss":
            return self.index.search(queries, k)
        if self.backend == "ext":
            return kernel_topk_l2(queries, self.keys, k, self.key_norms)
        return super().search(queries, k)


SHARED_MIN_WORDS = 10    # paragraphs this long are (nearly) never in two WikiText splits: 0.005% of test's words
SHARED_MAX_SHARE = 0.1   # a datastore whose source holds more of an evaluated text's words is refused


def measured_with(model_fingerprint, datastore, k, lmbda, temperature, min_context, max_tokens=None):
    """What a kNN-LM perplexity depends on, as a results file records it: numbers measured with
    anything else (bench.index's "backends") do not belong beside it."""
    return {"model_fingerprint": model_fingerprint, "datastore_seal": datastore.seal, "k": k, "lambda": lmbda,
            "temperature": temperature, "min_context": min_context, "max_tokens": max_tokens}


def check_not_built_from(datastore, paths):
    """Refuse to evaluate text a datastore was built from: each token would find its own context at
    distance ~0 among the neighbours, and the perplexity would mean nothing. Caught: the same text,
    however its bytes differ (other line ends, a byte-order mark, other spaces: the token streams'
    hashes are compared); and, while the datastore's source file is there unchanged, a source that
    holds the text's paragraphs (more than SHARED_MAX_SHARE of its words in paragraphs of
    SHARED_MIN_WORDS words or more found verbatim there: train + test in one file, or half of test)."""
    source, paths = datastore.meta.source or {}, list(paths)
    advice = ("every token would find itself among its neighbours and the perplexity would mean nothing. Build it "
              "from another text, or pass --allow-eval-split-datastore to do it anyway")
    for path in paths:
        same = (source.get("tokens_sha256") == text_fingerprint(path) if "tokens_sha256" in source
                else source.get("sha256") == file_fingerprint(path))  # a datastore built before tokens_sha256
        if same:
            raise KnnlmError(f"the datastore {datastore.path} was built from {path}, the text being evaluated: {advice}")
    if not source.get("file"):
        return
    if not os.path.isfile(source["file"]) or file_fingerprint(source["file"]) != source.get("sha256"):
        print(f"note: {source['file']}, the datastore's source, is missing or changed: whether it holds the "
              "text being evaluated is not checked", file=sys.stderr)
        return
    for path, share in shared_paragraphs(paths, source["file"]).items():
        if share > SHARED_MAX_SHARE:
            raise KnnlmError(f"the datastore {datastore.path} was built from {source['file']}, which holds {share:.0%} "
                             f"of the words of {path}, the text being evaluated (its paragraphs, verbatim): {advice}")


def text_fingerprint(path):
    """A short sha256 of the token stream a reader sees in a WikiText file (knnlm.read_lines): the
    same for a copy with other line ends, a byte-order mark or other spaces."""
    h = hashlib.sha256()
    for words in knnlm.read_lines(path):
        h.update(" ".join(words).encode() + b"\n")
    return h.hexdigest()[:16]


def shared_paragraphs(paths, source_file, min_words=SHARED_MIN_WORDS):
    """{path: the share of its words, in paragraphs of min_words or more, whose paragraph is also in source_file}."""
    texts = {path: [" ".join(words) for words in knnlm.read_lines(path) if len(words) >= min_words] for path in paths}
    wanted, found = set().union(*texts.values()), set()
    for words in tqdm(knnlm.read_lines(source_file), desc="is the evaluated text in the datastore's?", unit=" lines",
                      leave=False, disable=os.path.getsize(source_file) < 1 << 28):
        if len(words) >= min_words and (line := " ".join(words)) in wanted:
            found.add(line)
    share = {}
    for path, lines in texts.items():
        words = [line.count(" ") + 1 for line in lines]
        share[path] = sum(n for n, line in zip(words, lines) if line in found) / max(1, sum(words))
    return share


# -----------------------------------------------------------------------------
# Search: the kernel of csrc/, and the one place that decides how to search

SEARCH_BACKENDS = ("auto", "torch", "ext", "faiss")
EXACT_MAX_KEYS = 2_000_000    # beyond this, backend "auto" uses the FAISS index when there is one


def search_backend(backend, queries_device, keys_device, k, n_keys=0, has_index=False):
    """What a search will use: "faiss" (the index) when asked, or for "auto" beyond EXACT_MAX_KEYS keys
    when there is an index; else "ext" (the kernel) when asked, or for "auto" when it is built for
    these devices; else "torch"."""
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(SEARCH_BACKENDS)}, got {backend!r}")
    if backend == "faiss" or (backend == "auto" and n_keys > EXACT_MAX_KEYS and has_index):
        return "faiss"
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
    """knnlm.topk_l2 by the backend search_backend picks: the PyTorch reference or the kernel."""
    key_norms = knnlm.squared_norms(keys) if key_norms is None else key_norms
    if search_backend(backend, queries.device, keys.device, k) == "ext":
        return kernel_topk_l2(queries, keys, k, key_norms)
    return knnlm.topk_l2(queries, keys, k, key_norms)


def kernel_topk_l2(queries, keys, k, key_norms):
    """knnlm.topk_l2 by the C++/CUDA kernel (torch.ops.knnlm.topk_l2)."""
    knnlm.check_search_inputs(queries, keys, k, key_norms)
    if not queries.device == keys.device == key_norms.device:
        raise ValueError(f"queries, keys and key_norms must be on one device for the kernel, got "
                         f"{queries.device}, {keys.device}, {key_norms.device}")
    return torch.ops.knnlm.topk_l2(queries, keys, k, key_norms)


def rerank(queries, keys, ids, fd=-1, offset=0):
    """knnlm.rerank, by the kernel when it is built (reading the rows from the open file fd, where
    the keys start at byte offset, when fd >= 0)."""
    if knnlm_ext is not None and keys.device.type == "cpu":
        return torch.ops.knnlm.rerank_l2(queries, keys, ids, fd, offset)
    return knnlm.rerank(queries, keys, ids)


# -----------------------------------------------------------------------------
# The FAISS index of a datastore on disk (knnlm.py, section 5, says what it is)
# Built in shards: trained once; each shard (a process of its own, or one after
# another) adds its row range of the keys to a copy of the trained index; FAISS
# merges the shards' lists. Keys are read in batches whose pages are released, so
# neither building nor searching holds the key matrix in memory. Each step is kept
# as it finishes, so an interrupted build does only what is missing.

INDEX_TRAIN_SIZE = 1_000_000  # keys sampled to train the index, as in the paper
INDEX_BATCH = 1 << 16         # keys read from the memmap and added per step
RERANK_MMAP_MAX_BYTES = 2 << 30  # beyond this, re-ranking reads key rows with pread, not through the memmap
INDEX_DATASTORE_FIELDS = ("count", "dim", "key_dtype", "key_type", "model_fingerprint", "vocab_fingerprint", "source")
PLAN_FIELDS = {"datastore": dict, "factory": str, "train_size": int, "shards": int, "seed": int}
INDEX_FIELDS = {**PLAN_FIELDS, "files": dict}  # index.json: the plan, and the checksums of name.faiss


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
    factory = factory or knnlm.default_factory(n, d)
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
    """What an index records of the datastore it indexes (its files' checksums too: it fits no other)."""
    meta = asdict(datastore.meta)
    return {**{f: meta[f] for f in INDEX_DATASTORE_FIELDS}, "files": datastore.files}


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
    n, d = len(datastore), datastore.meta.dim
    factory = factory or knnlm.default_factory(n, d)
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
    index, ivf = empty_index(datastore.meta.dim, plan["factory"])
    rng = np.random.default_rng(plan["seed"])
    rows = np.sort(rng.choice(len(datastore), plan["train_size"], replace=False))
    sample = np.empty((len(rows), datastore.meta.dim), np.float32)
    for i in tqdm(range(0, len(rows), INDEX_BATCH), desc="index: read sample", unit_scale=INDEX_BATCH,
                  unit="key", disable=not progress):
        sample[i:i + INDEX_BATCH] = datastore.key_file[rows[i:i + INDEX_BATCH]]
        release_pages(datastore.key_file)
    if faiss.get_num_gpus() > 0:  # k-means on the GPUs (with a faiss-gpu build)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(datastore.meta.dim))
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
    """A datastore's FAISS index (name.faiss), checked against the datastore, searched as knnlm.search_index
    does, the re-ranking by the kernel when it is built."""

    def __init__(self, datastore, nprobe=None, recompute=True, name="index"):
        meta_path = index_path(datastore, name, "json")
        if not os.path.isfile(meta_path):
            if pid := writer_pid(datastore.path, directory=True):
                raise KnnlmError(f"the FAISS index {name} of {datastore.path} is being built now (by process "
                                 f"{pid}): wait for the build to finish")
            what = "no FAISS index" + ("" if name == "index" else f" {name}")
            if os.path.isfile(index_path(datastore, name, "plan.json")):
                raise KnnlmError(f"the FAISS index build in {datastore.path} was interrupted: rerun "
                                 "`python build_datastore.py --index` with the same arguments to finish it")
            raise KnnlmError(f"{what} in {datastore.path}: build one with `python build_datastore.py --index`, "
                             "or search exactly")
        self.meta = read_json(meta_path, INDEX_FIELDS)
        check_same(index_manifest(datastore), self.meta["datastore"],
                   f"the datastore in {datastore.path}", f"its index {name}.faiss")
        check_files(datastore.path, self.meta["files"])
        self.index = read_index(index_path(datastore, name, "faiss"))
        nlist = faiss.extract_index_ivf(self.index).nlist
        nprobe = min(NPROBE, nlist) if nprobe is None else nprobe
        if not 1 <= nprobe <= nlist:
            raise KnnlmError(f"--nprobe must be in [1, {nlist}] (the lists of {name}.faiss), got {nprobe}")
        if (self.index.ntotal, self.index.d) != (len(datastore), datastore.meta.dim):
            raise KnnlmError(f"index {index_path(datastore, name, 'faiss')} holds {self.index.ntotal:,} keys of "
                             f"dimension {self.index.d}, the datastore {len(datastore):,} of {datastore.meta.dim}")
        self.datastore, self.nprobe, self.recompute = datastore, nprobe, recompute
        # Every row read through a memmap makes the kernel map 64 KB of cached file around it
        # (fault-around): random rows of a large key file soon put all of it in this process's
        # resident memory. Past RERANK_MMAP_MAX_BYTES the kernel reads rows with pread instead.
        self.key_reader = None
        if datastore.key_file.nbytes > RERANK_MMAP_MAX_BYTES and knnlm_ext is not None:
            self.key_reader = open(os.path.join(datastore.path, "keys.npy"), "rb")

    def rerank(self, queries, keys, ids):
        fd = self.key_reader.fileno() if self.key_reader else -1
        found = rerank(queries, keys, ids, fd=fd, offset=self.datastore.key_file.offset)
        release_pages(self.datastore.key_file)
        return found

    def search(self, queries, k):
        """queries [B, d] -> (squared distances [B, k] ascending, ids [B, k]), ties by id."""
        dists, ids = knnlm.search_index(self.index, queries, k, self.datastore.keys, self.nprobe, self.recompute,
                                        rerank_fn=self.rerank)
        ids = ids.clamp(min=0)  # id -1: the nprobe lists held fewer than k keys; its distance is inf
        return dists.to(queries.device), ids.to(queries.device)
