"""
Datastores on disk, built resumably and in shards, loaded with every check, searched as
search.search_backend decides; and what a results file's numbers were measured with.

Keys are float16 and values int64 in .npy memmaps written chunk by chunk, so the datastore never
has to fit in memory. The build commits its progress (a row count at the end of a context window)
every few seconds, so an interrupted build continues where it stopped, with any --batch-size;
under torchrun each process writes the rows of its share of the windows.
"""
import copy
import os
import time
from contextlib import nullcontext
import dataclasses
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

import knnlm
from knnlm import KnnlmError
from knnlm_tools.files import (check_disk_space, check_same, read_json,
                               release_pages, write_json, writer_pid, writing)
from knnlm_tools import huggingface
from knnlm_tools.cpu import autocast, every_core
from knnlm_tools.checkpoints import fingerprint, vocab_fingerprint
from knnlm_tools.manifests import Manifest, WRITTEN_BEFORE, check_files
from knnlm_tools.search import kernel_topk_l2, search_backend
from knnlm_tools.faiss_index import FaissIndex, INDEX_FIELDS, index_path


@torch.no_grad()
def build_datastore(model, vocab, tokens, out_dir, key_type="ffn_in_ln", min_context=None,
                    batch_size=16, source=None, progress=True, commit_seconds=10.0,
                    shard=0, shards=1, barrier=lambda: None, precision="float32"):
    """Write the datastore (eq. 1) of `tokens` to out_dir. Progress is committed every commit_seconds
    (rows flushed to disk first): an interrupted build rerun with the same arguments
    continues from the last commit and ends byte-identical to an uninterrupted one.
    With shards > 1 this process (one of `shards`, e.g. under torchrun, all calling this
    with the same `barrier`) writes the rows of its share of the windows. precision: the forward pass's,
    float32 or bfloat16 (autocast; the keys are float16 on disk either way)."""
    cfg = model.cfg
    min_context = knnlm.resolve_min_context(min_context, cfg.block_size)
    n = len(tokens) - 1
    if n < 1:
        raise KnnlmError(f"{source}: a datastore needs at least two tokens, got {len(tokens)}")
    manifest = Manifest.of(model, vocab, n, key_type, min_context, source, precision)
    device = next(model.parameters()).device.type
    with writing(out_dir, directory=True) if shard == 0 else nullcontext(), autocast(precision, device):
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
    check_processes(out_dir, shards)  # each process's rows are its share of the windows: as many as began it
    windows = knnlm.sliding_windows(len(tokens), cfg.block_size, manifest.min_context)
    windows = windows[len(windows) * shard // shards:len(windows) * (shard + 1) // shards]
    first_row = windows[0][0] + windows[0][2] if windows else n  # the row of the first target scored
    last_row = windows[-1][1] if windows else n
    if os.path.isfile(progress_path):  # interrupted before: continue it if it is the same build
        done = read_json(progress_path, {"manifest": dict, "rows": int})
        check_same(asdict(manifest), {**WRITTEN_BEFORE, **done["manifest"]}, "this build",
                   f"the interrupted build in {out_dir}")
        print(f"resuming at row {done['rows']:,} of {n:,}")
    else:
        done = {"manifest": asdict(manifest), "rows": first_row, "processes": shards}
    # The progress is a row count at the end of a window, so a rerun continues with the next
    # window whatever its --batch-size (a window's rows are the same in any batch).
    skip = sum(end <= done["rows"] for _, end, _ in windows)
    if done["rows"] != (windows[skip - 1][1] if skip else first_row):
        raise KnnlmError(f"{progress_path} records {done['rows']:,} rows, not the end of a window: "
                         f"delete {out_dir} and build again")
    fresh = not progress_files(out_dir)
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
        # refresh=False: shown with the next update, as often as tqdm's mininterval lets: not a line per batch in a log
        bar.set_postfix(tok_per_s=f"{(row - done['rows']) / (time.time() - start):.0f}", refresh=False)
        if time.time() - last_commit > commit_seconds or row == last_row:
            keys.flush(), vals.flush()  # the rows reach the disk before the progress that counts them
            write_json({"manifest": asdict(manifest), "rows": row, "processes": shards}, progress_path)
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


def check_processes(out_dir, shards):
    """Refuse to continue, under another number of processes, a build begun in out_dir: the rows a process
    records as done are of its share of the windows, and another share would skip rows no one wrote."""
    begun = progress_files(out_dir)
    if not begun:
        return
    counts = {1 if f == "progress.json" else read_json(os.path.join(out_dir, f), {"rows": int}).get("processes")
              for f in begun}  # a shard's file written before the count was recorded: None
    if counts == {shards}:
        return
    n = counts.pop() if len(counts) == 1 else None
    raise KnnlmError(f"the interrupted build in {out_dir} was begun by {processes(n) if n else 'processes it did not count'}"
                     f", this one runs in {processes(shards)}: continue it in as many (torchrun --nproc_per_node N, "
                     f"or plain python for one), or delete {out_dir} and build it again")


def processes(n):
    return f"{n} process{'es' if n > 1 else ''}"


def progress_files(out_dir):
    """The progress files of a build begun in out_dir and not finished, sorted; [] if none."""
    return sorted(f for f in os.listdir(out_dir) if f.startswith("progress")) if os.path.isdir(out_dir) else []


def recorded_precision(out_dir):
    """The precision of the datastore built or begun in out_dir (its manifest's), None if there is none:
    what --precision auto continues with, so that adding the index or resuming is not refused."""
    if os.path.isfile(os.path.join(out_dir, "meta.json")):
        return Manifest.read(out_dir)[0].precision
    begun = progress_files(out_dir)
    if begun:
        manifest = read_json(os.path.join(out_dir, begun[0]), {"manifest": dict})["manifest"]
        return {**WRITTEN_BEFORE, **manifest}["precision"]
    return None


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


class DiskDatastore(knnlm.Datastore):
    """A datastore on disk: keys [N, d] float16 and vals [N] int64 memory-mapped, its manifest (meta),
    and how it is searched: exactly (PyTorch or the kernel) or by its FAISS index (see use())."""

    def __init__(self, path):
        if not os.path.isfile(os.path.join(path, "meta.json")):
            if pid := writer_pid(path, directory=True):
                raise KnnlmError(f"the datastore in {path} is being built now (by process {pid}): "
                                 "wait for the build to finish")
            unfinished = bool(progress_files(path))
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
        if self.meta.key_type not in {**knnlm.KEY_TYPES, **huggingface.KEY_TYPES}:
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
        try:
            check_same(wanted, asdict(self.meta), name, "the datastore")
        except KnnlmError as e:
            raise KnnlmError(f"{e}: {self.path} was built with another model or tokenizer; build_datastore.py "
                             "builds one with this model") from None

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

    def load_index(self, nprobe=None, recompute=True, name="index"):
        self.index = FaissIndex(self, nprobe, recompute, name)
        return self.index

    def use(self, backend="auto", device="cpu", k=1, nprobe=None, recompute=True):
        """Decide how this datastore is searched for k neighbours (search_backend) and get ready for it;
        -> the backend."""
        if k > len(self):
            raise KnnlmError(f"--k {k} is larger than the datastore ({len(self):,} keys)")
        on_gpu = torch.device(device).type == "cuda" and fits_on_gpu(self.keys, device)
        self.backend = search_backend(backend, device, device if on_gpu else self.keys.device, k, len(self),
                                      self.has_index())
        if on_gpu and self.backend != "faiss":  # the exact search where the queries are: no keys over PCIe per batch
            self.keys, self.key_norms = self.keys.to(device), self.key_norms.to(device)
        if self.backend == "faiss":
            self.load_index(nprobe, recompute)
        return self.backend

    def search(self, queries, k):
        """queries [B, d] -> (squared distances [B, k] ascending, ids [B, k]), as use() decided, on every
        core even beside a busy process (cpu.every_core)."""
        with every_core():
            if self.backend == "faiss":
                return self.index.search(queries, k)
            if self.backend == "ext":
                return kernel_topk_l2(queries, self.keys, k, self.key_norms)
            return super().search(queries, k)


def fits_on_gpu(keys, device):
    """Whether keys take at most half the GPU's free memory."""
    return keys.numel() * keys.element_size() <= torch.cuda.mem_get_info(torch.device(device))[0] // 2


def measured_with(model_fingerprint, datastore, k, lmbda, temperature, min_context, max_tokens=None,
                  precision="float32"):
    """What a kNN-LM perplexity depends on besides the search, as a results file records it: numbers
    measured with anything else (bench.index's "backends", which compares searches) do not belong beside it."""
    return {"model_fingerprint": model_fingerprint, "datastore_seal": datastore.seal, "k": k, "lambda": lmbda,
            "temperature": temperature, "min_context": min_context, "max_tokens": max_tokens, "precision": precision}
