"""
The FAISS index of a datastore on disk (knnlm.py, section 5, says what it is): planned,
trained, filled in shards and merged from the keys on disk, resumably; then checked against its
datastore and searched, re-ranked exactly.

Built in shards: trained once; each shard (a process of its own, or one after another) adds its
row range of the keys to a copy of the trained index; FAISS merges the shards' lists. Keys are
read in batches whose pages are released, so neither building nor searching holds the key matrix
in memory. Each step is kept as it finishes, so an interrupted build does only what is missing.
"""
import os
from dataclasses import asdict

import faiss
import numpy as np
from tqdm import tqdm

import knnlm
from knnlm import KnnlmError
from knnlm_tools.files import (atomic_write, check_disk_space, check_same, read_json,
                               release_pages, write_json, writer_pid, writing)
from knnlm_tools.manifests import check_files, file_checksums
from knnlm_tools.search import kernel_built, rerank


NPROBE = 32  # FAISS: lists visited per query, as in the paper (all of them if there are fewer)
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


def index_estimate(n, d, factory=None, train_size=None, shards=1, k=1024):
    """-> (factory, {what: bytes}) for a datastore of n keys of dimension d and its index, or the
    one-line error the index's build would end with."""
    factory, ivf, sample = check_plan(n, d, factory, train_size, shards)
    index = index_bytes(n, d, ivf)
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


def check_plan(n, d, factory=None, train_size=None, shards=1):
    """-> (factory, its IVF part, train_size) of an index of n keys of dimension d, or the one-line error
    its build would end with: build_datastore.py --index asks before it builds the datastore."""
    factory = factory or knnlm.default_factory(n, d)
    _, ivf = empty_index(d, factory)
    train_size = index_train_size(n, ivf.nlist, train_size)
    if train_size < ivf.nlist:
        raise KnnlmError(f"{factory} has {ivf.nlist} lists, more than the {train_size:,} keys to train them on")
    if not 1 <= shards <= n:
        raise KnnlmError(f"the number of index shards must be in [1, {n:,}], got {shards}")
    return factory, ivf, train_size


def plan_index(datastore, factory=None, train_size=None, shards=1, seed=0, name="index"):
    """Fix what the index will be, and write it down (name.plan.json) so that every shard
    process, and a rerun after an interruption, builds the same index."""
    n, d = len(datastore), datastore.meta.dim
    factory, ivf, train_size = check_plan(n, d, factory, train_size, shards)
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
    """Train the IVF centroids and the PQ codebooks on a random sample of the keys. The plan's seed draws the
    sample and is added to the seed of FAISS's k-means of the lists (its own default at seed 0)."""
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
    ivf.cp.seed += plan["seed"]
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
        if datastore.key_file.nbytes > RERANK_MMAP_MAX_BYTES and kernel_built():
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
