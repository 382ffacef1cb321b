"""What the analyses share: their command-line options, the one cached pass over a split
(p_LM, the query keys and the k nearest neighbours of every token, kept on disk so that
every analysis and every rerun re-mixes it instead of searching again), tuning, and
writing each analysis's numbers (JSON) and plot (PNG) to experiments/results/."""
import argparse
import hashlib
import math
import os
import platform
import subprocess
import sys
import time

import torch
from tqdm import tqdm

import knnlm
from knnlm_tools import files, corpora, checkpoints, search, datastores, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
KS = [2 ** i for i in range(11)]                          # 1, 2, 4, ..., 1024 (λ and T: knnlm.LAMBDAS, TEMPERATURES)


class Parser(argparse.ArgumentParser):
    """An analysis's flags, checked before any work: --out must be a directory that can be written."""

    def parse_args(self, *a, **kw):
        args = super().parse_args(*a, **kw)
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            self.error(f"--out {args.out} is a file, not a directory")
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            self.error(f"--out {args.out}: cannot make the directory: {e.strerror}")
        if not os.access(args.out, os.W_OK):
            self.error(f"--out {args.out}: cannot write there")
        return args


def parser(doc, split="valid"):
    p = Parser(prog=program(), description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
               parents=[cli.arguments("data", "checkpoint", "window", "datastore", "k", "device")])
    cli.backend_argument(p, choices=("auto", "torch", "ext"))  # the analyses search exactly
    p.add_argument("--split", default=split, choices=knnlm.SPLITS, help="split to analyse (default: %(default)s)")
    p.add_argument("--cache-dir", default="runs/cache",
                   help="where the cached passes are kept (default: %(default)s)")
    p.add_argument("--out", default=RESULTS, help="where the JSON and PNG go (default: experiments/results)")
    return p


def load(args, datastore=None, checkpoint=None):
    """-> (model, vocab, datastore, the corpus directory) from the common options (or another
    datastore and checkpoint), checked; the datastore is searched exactly, by --backend."""
    checkpoint = checkpoint or args.checkpoint
    with cli.user_errors():
        model, vocab, _ = checkpoints.load_model(checkpoint, cli.check_device(args.device), args.window)
        datastore = datastores.DiskDatastore(datastore or args.datastore)
        datastore.check_model(model, vocab, checkpoint)
        datastore.use(exact_backend(args, datastore), args.device, args.k)
        data_dir = corpora.resolve_corpus(args.data)
    return model, vocab, datastore, data_dir


def exact_backend(args, datastore):
    """The exact search backend (--backend) for this datastore: the kernel when built, else PyTorch.
    (Not datastore.use(args.backend, ...) alone: its "auto" may pick the FAISS index of a large datastore.)"""
    return search.search_backend(args.backend, args.device, datastore.keys.device, args.k)


def build_datastore(args, data, out, key_type="ffn_in_ln", checkpoint=None):
    """Build (or finish) a datastore with build_datastore.py, as a user would. One already in out is kept
    if it is this one (of this model, text and key), and refused, with build_datastore.py's line, if not."""
    built = subprocess.run([sys.executable, os.path.join(ROOT, "build_datastore.py"), "--data", data,
                            "--checkpoint", checkpoint or args.checkpoint, "--key-type", key_type, "--out", out,
                            *(["--window", str(args.window)] if args.window else []),
                            "--device", args.device])
    if built.returncode != 0:
        raise knnlm.KnnlmError(f"building the datastore {out} of {data} failed (build_datastore.py exited with "
                               f"{built.returncode}; its message is above)")


def train_model(args, out, **flags):
    """Train (or finish) a model with train.py, as a user would, with these flags (max_iters=120 ->
    --max-iters 120) on args.data: skipped when out's last state has reached --max-iters with the same flags and text,
    resumed (--resume) when it stopped short. -> the seconds train.py ran (0 when skipped)."""
    last_path = os.path.splitext(out)[0] + ".last.pt"
    resume = []
    if os.path.isfile(last_path) and os.path.isfile(out):
        with cli.user_errors():
            _, _, last = checkpoints.load_checkpoint(last_path)
            train = knnlm.split_path(corpora.resolve_corpus(args.data), "train")
        wanted = {**flags, "train_sha256": corpora.file_fingerprint(train)}
        found = {**last["args"], "train_sha256": last["corpus"]["sha256"]}
        other = {name: found.get(name) for name in wanted if found.get(name) != wanted[name]}
        if other:
            raise knnlm.KnnlmError(f"{out} is a model trained with other arguments or text ({other}, not "
                                   f"{ {name: wanted[name] for name in other} }): remove it, or pass another --work")
        if last["step"] >= flags["max_iters"]:
            print(f"{out}: trained ({last['step']} steps)")
            return 0
        resume = ["--resume"]
    start = time.time()
    trained = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", args.data, "--out", out,
                              "--device", args.device, *resume,
                              *(f for name, value in flags.items() for f in (f"--{name.replace('_', '-')}", str(value)))])
    if trained.returncode != 0:
        raise knnlm.KnnlmError(f"training {out} failed (train.py exited with {trained.returncode}; its message is above)")
    return time.time() - start


def cached(args, prefix, key, compute):
    """compute() -> dict, done once: kept in args.cache_dir under a name made from everything it
    depends on (key, checked again when loaded), so later calls (any analysis, any rerun) load it.
    An analysis that finds another computing it waits for that one's result instead of computing it too."""
    path = os.path.join(args.cache_dir, f"{prefix}-{hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:12]}.pt")
    found = load_cached(path, prefix, key)
    if found is None:
        os.makedirs(args.cache_dir, exist_ok=True)
        holder = files.writer_pid(path)
        if holder:
            print(f"{prefix}: pid {holder} is computing {path}; waiting for it", flush=True)
        with files.writing(path, patience=math.inf):
            found = load_cached(path, prefix, key, quiet=True)  # what the process waited for wrote
            if found is None:
                result = {**compute(), "key": key}
                with files.atomic_write(path) as tmp:
                    torch.save(result, tmp)
                return result
    print(f"{prefix}: cached in {path}")
    return found


def load_cached(path, prefix, key, quiet=False):
    """The cache at path if it is there, readable and of this key, else None (quiet: no word of an
    unreadable one, already said)."""
    if not os.path.isfile(path):
        return None
    try:
        found = torch.load(path)
    except Exception as e:  # a cache cut short (a full disk, a copy): computed again
        if not quiet:
            print(f"{prefix}: the cache {path} is unreadable ({type(e).__name__}), computing it again")
        return None
    return found if found.get("key") == key else None


def cached_pass(args, model, vocab, datastore, data_dir, split=None, tokens=None):
    """score_split over a split, or its first `tokens` tokens (p_LM, the neighbours and the query
    keys of every token), cached."""
    split = split or args.split
    path = knnlm.split_path(data_dir, split)
    with cli.user_errors():
        corpora.check_not_built_from(datastore, [path])
    key = {"model": checkpoints.fingerprint(model, vocab), "window": model.cfg.block_size,
           "text": corpora.file_fingerprint(path), "k": args.k,
           "datastore": datastore.seal,  # its manifest whole (context, precision, the files' checksums), not some fields
           **({"tokens": tokens} if tokens is not None else {})}

    def compute():
        return knnlm.score_split(model, vocab.encode_file(path)[:tokens], datastore, args.k,
                                 desc=f"{split} (one pass, then cached)", keep_queries=True)
    return cached(args, split if tokens is None else f"{split}-first{tokens}", key, compute)


def search_all(datastore, queries, k, batch=2048, desc="search"):
    """The k nearest neighbours of all cached queries [n, d] in another datastore (or a part of one),
    searched as its use() decided, in batches: -> (dists [n, k], neighbour_vals [n, k], like a
    score_split cache, and the seconds taken)."""
    dists = vals = None
    t = time.time()
    for s in tqdm(range(0, len(queries), batch), desc=desc, unit="batch"):
        d, v = knnlm.neighbours(datastore, queries[s:s + batch].float(), k)
        if dists is None:  # all rows allocated once, as knnlm.score_split's: no batches kept, then copied
            dists, vals = d.new_empty((len(queries), d.shape[1])), v.new_empty((len(queries), v.shape[1]))
        dists[s:s + len(d)], vals[s:s + len(v)] = d, v
    return dists, vals, time.time() - t


def first_rows(args, cache, datastore, n, prefix):
    """A cached pass (with its queries) searched again in the datastore's first n rows, the datastore of
    its text's first n tokens: -> the pass with those neighbours, themselves cached under prefix-first{n}."""
    if n >= len(datastore):
        return cache

    def search():
        dists, vals, seconds = search_all(datastore.head(n), cache["queries"], args.k, desc=f"{n:,} keys")
        return {"dists": dists, "neighbour_vals": vals, "search_seconds": seconds}
    return {**cache, **cached(args, f"{prefix}-first{n}", {**cache["key"], "first_rows": n}, search)}


def best(cache, lambdas=knnlm.LAMBDAS, temperatures=knnlm.TEMPERATURES, k=None):
    """The lowest perplexity over a (λ, T) grid: -> {"ppl", "lambda", "temperature"}."""
    lmbda, T, ppl, _ = knnlm.tune(cache, lambdas, temperatures, k)
    return {"ppl": ppl, "lambda": lmbda, "temperature": T}


def lambda_curve(cache, T=1.0, k=None):
    """Perplexity at every λ of the grid, at temperature T: {λ: ppl}."""
    return {lmbda: ppl for ppl, lmbda, _ in knnlm.tune(cache, knnlm.LAMBDAS, [T], k)[3]}


def program():
    """How this analysis is run: python -m experiments.NAME."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"


def command():
    """The command line that ran this analysis: python -m experiments.NAME ARGS."""
    return " ".join([program()] + sys.argv[1:])


def machine():
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def corpus_name(args):
    return os.path.basename(os.path.normpath(args.data))


def save(args, name, numbers, fig):
    """Write experiments/results/<name>.json (with the command that made it) and <name>.png."""
    os.makedirs(args.out, exist_ok=True)
    numbers = {**numbers, "command": command(), "machine": machine()}
    files.write_json(numbers, os.path.join(args.out, f"{name}.json"))  # inf (λ = 1: a token without neighbour) -> null
    with files.atomic_write(os.path.join(args.out, f"{name}.png")) as tmp:  # Ctrl-C here leaves the last plot whole
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    print(f"wrote {os.path.join(args.out, name)}.json and .png")
