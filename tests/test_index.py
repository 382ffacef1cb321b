"""The FAISS IVF-PQ index (knnlm.py, section 5): recall, exact re-ranking, save/load,
shards, resumed builds, refused mismatches, and the scripts' --index / --backend faiss."""
import os
import shutil
import subprocess
import sys

import faiss
import numpy as np
import pytest
import torch

import knnlm
from knnlm_tools import files, checkpoints, search, faiss_index, datastores
from helpers import ROOT, clustered_keys, fails, run, tiny_model, write_corpus, write_datastore

N, D = 20000, 64


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A clustered datastore of 20,000 keys with its default index (IVF512,PQ64x4fs)."""
    datastore = write_datastore(tmp_path_factory.mktemp("store"), clustered_keys(N, D))
    faiss_index.build_index(datastore, progress=False)
    return datastore


def queries_near(n=300, seed=1):
    """Queries from the keys' own clusters (seed 0 draws the same cluster centres)."""
    return torch.from_numpy(clustered_keys(n, D, seed=0).astype(np.float32)) + torch.randn(
        n, D, generator=torch.Generator().manual_seed(seed)) * 0.5


def recall(found, exact):
    return np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)])


def test_default_factory_scales_the_papers_index():
    assert knnlm.default_factory(103_000_000, 1024) == "IVF4096,PQ128x4fs"  # the paper's lists, 64-byte codes
    assert knnlm.default_factory(500_000, 256) == "IVF2048,PQ128x4fs"
    assert knnlm.default_factory(20_000, 64) == "IVF512,PQ64x4fs"          # d < 128: one sub-quantiser a dim


def test_recall_at_the_default_nprobe_is_above_the_floor(indexed):
    """Measured 0.96 at k=256 (nprobe 32, recompute on); the floor is 0.9. More lists visited never hurts."""
    queries = queries_near()
    indexed.use("torch")
    _, exact = indexed.search(queries, 256)
    recalls = {}
    for nprobe in (1, 32):
        indexed.use("faiss", nprobe=nprobe)
        recalls[nprobe] = recall(indexed.search(queries, 256)[1], exact)
    assert recalls[32] >= 0.9 and recalls[32] > recalls[1], recalls


def test_recompute_returns_the_exact_distances_of_the_returned_ids(indexed):
    queries = queries_near(50)
    keys = indexed.keys.double()
    for recompute in (True, False):
        indexed.use("faiss", recompute=recompute)
        dists, ids = indexed.search(queries, 100)
        exact = (keys[ids] - queries.double()[:, None]).pow(2).sum(-1)
        assert (dists[:, 1:] >= dists[:, :-1]).all()  # ascending
        if recompute:
            torch.testing.assert_close(dists.double(), exact, rtol=1e-5, atol=1e-3)
        else:  # quantised distances: close, not equal
            assert not torch.allclose(dists.double(), exact, rtol=1e-5, atol=1e-3)


def test_the_torch_rerank_equals_the_kernels(indexed):
    if search.knnlm_ext is None:
        pytest.skip("the C++ extension is not built")
    queries, ids = queries_near(20), torch.randint(N, (20, 33))
    ids[3, 5] = ids[3, 6] = -1  # FAISS found fewer than k: last, with distance inf
    ids[4, 7] = ids[4, 9]       # the same key twice: the tie goes by id, so the two end side by side
    dists, found = torch.ops.knnlm.rerank_l2(queries, indexed.keys, ids)
    torch_dists, torch_found = knnlm.rerank(queries, indexed.keys, ids)
    assert torch.equal(found, torch_found) and torch.isinf(dists[3, -2:]).all() and (found[3, -2:] == -1).all()
    torch.testing.assert_close(dists, torch_dists)
    assert torch.equal(found.sort(1)[0], ids.sort(1)[0])  # the same ids, reordered
    fd = os.open(os.path.join(indexed.path, "keys.npy"), os.O_RDONLY)  # rows read with pread, as for large files
    try:
        from_file = torch.ops.knnlm.rerank_l2(queries, indexed.keys, ids, fd, indexed.key_file.offset)
    finally:
        os.close(fd)
    assert torch.equal(from_file[0], dists) and torch.equal(from_file[1], found)
    with pytest.raises(RuntimeError, match=r"ids must be in \[0, 20000\) or -1"):
        torch.ops.knnlm.rerank_l2(queries, indexed.keys, ids + N)


@pytest.mark.parametrize("k", [33, 255, 256, 1024, 5000])  # from 256 candidates the kernel sorts by radix
def test_the_kernels_rerank_orders_by_distance_then_id(k):
    """Small integer keys and queries: every distance exact in float32, and many equal."""
    if search.knnlm_ext is None:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(k)
    keys = torch.randint(-2, 3, (3000, 16), generator=g).half()
    queries = torch.randint(-2, 3, (6, 16), generator=g).float()
    ids = torch.randint(3000, (6, k), generator=g)
    ids[1, ::7] = -1                          # missing: last, with distance inf
    queries[2] = keys[ids[2, 3]].float()      # a distance of 0
    dists, found = torch.ops.knnlm.rerank_l2(queries, keys, ids)
    exact = (keys.double()[ids.clamp(min=0)] - queries.double()[:, None]).pow(2).sum(-1).masked_fill(ids < 0, np.inf)
    for b in range(len(ids)):  # the expected order: by distance, ties by id (-1, missing, after every id)
        want = sorted(zip(exact[b].tolist(), [i if i >= 0 else 2 ** 32 for i in ids[b].tolist()]))
        assert dists[b].tolist() == [dist for dist, _ in want]
        assert found[b].tolist() == [i if i < 2 ** 32 else -1 for _, i in want]
    assert dists[2, 0] == 0


def test_the_references_index_is_the_one_the_build_writes(indexed):
    """knnlm.build_index (section 5, the keys in memory) and faiss_index's build from the datastore on disk train
    on the same sample (every key here) with the same seed: the same index, whose codes rank the same neighbours
    at the same quantised distances, which the reference's search re-ranks to the same exact distances."""
    keys = indexed.keys
    reference, built = knnlm.build_index(keys), indexed.load_index()
    queries = queries_near(100)
    faiss.extract_index_ivf(reference).nprobe = faiss.extract_index_ivf(built.index).nprobe = 32
    for a, b in zip(reference.search(queries.numpy(), 64), built.index.search(queries.numpy(), 64)):
        np.testing.assert_array_equal(a, b)
    (dists, ids), (built_dists, built_ids) = knnlm.search_index(reference, queries, 64, keys), built.search(queries, 64)
    assert torch.equal(ids.sort(1)[0], built_ids.sort(1)[0])  # the same candidates, re-ranked in torch or in C++
    torch.testing.assert_close(dists, built_dists)


def test_index_save_load_round_trip(indexed, tmp_path):
    index = indexed.load_index()
    faiss_index.write_index(index.index, str(tmp_path / "copy.faiss"))
    again = faiss_index.read_index(str(tmp_path / "copy.faiss"))
    queries = queries_near(50).numpy()
    for a, b in zip(index.index.search(queries, 20), again.search(queries, 20)):
        np.testing.assert_array_equal(a, b)


def test_a_sharded_build_equals_the_unsharded_one(indexed):
    queries = queries_near(100)
    one = indexed.load_index()
    expected = one.search(queries, 64)
    for shards in (2, 3):
        faiss_index.build_index(indexed, shards=shards, name=f"shards{shards}", progress=False)
        found = faiss_index.FaissIndex(indexed, name=f"shards{shards}").search(queries, 64)
        assert torch.equal(found[1], expected[1]) and torch.equal(found[0], expected[0])


def test_an_interrupted_build_finishes_from_its_last_step(indexed):
    """Plan, training and shard 1 of 2 done, then a crash: the rerun adds shard 2 and merges."""
    plan = faiss_index.plan_index(indexed, shards=2, name="resumed")
    faiss_index.train_index(indexed, plan, name="resumed", progress=False)
    faiss_index.add_shard(indexed, plan, 0, name="resumed", progress=False)
    trained_at = os.path.getmtime(os.path.join(indexed.path, "resumed.trained.faiss"))
    assert not os.path.exists(os.path.join(indexed.path, "resumed.json"))
    with pytest.raises(knnlm.KnnlmError, match="factory differs"):  # not a different build on top of it
        faiss_index.build_index(indexed, factory="IVF64,PQ32x4fs", shards=2, name="resumed", progress=False)
    os.utime(os.path.join(indexed.path, "resumed.trained.faiss"), (0, trained_at))
    faiss_index.build_index(indexed, shards=2, name="resumed", progress=False)
    assert sorted(f for f in os.listdir(indexed.path) if f.startswith("resumed")) == ["resumed.faiss", "resumed.json"]
    queries = queries_near(50)
    assert torch.equal(faiss_index.FaissIndex(indexed, name="resumed").search(queries, 16)[1],
                       indexed.load_index().search(queries, 16)[1])


def test_the_plans_seed_seeds_the_k_means_of_the_lists(indexed):
    """With every key in the sample, the seed reaches the index only through FAISS's k-means:
    the same seed trains the same lists, another seed other lists."""
    def lists(seed, name):
        plan = faiss_index.plan_index(indexed, seed=seed, name=name)
        assert plan["train_size"] == N
        faiss_index.train_index(indexed, plan, name=name, progress=False)
        trained = faiss_index.read_index(os.path.join(indexed.path, f"{name}.trained.faiss"))
        for part in ("plan.json", "trained.faiss"):
            os.remove(os.path.join(indexed.path, f"{name}.{part}"))
        quantizer = faiss.extract_index_ivf(trained).quantizer
        return quantizer.reconstruct_n(0, quantizer.ntotal)

    first, again, other = lists(0, "seed0"), lists(0, "seed0again"), lists(1, "seed1")
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    reference = knnlm.build_index(indexed.keys, seed=1)
    quantizer = faiss.extract_index_ivf(reference).quantizer  # section 5's reference: the same lists at the same seed
    np.testing.assert_array_equal(quantizer.reconstruct_n(0, quantizer.ntotal), other)


def test_an_index_of_another_datastore_is_refused(indexed, tmp_path):
    other = write_datastore(tmp_path / "other", clustered_keys(N, D, seed=5), model_fingerprint="another model...")
    for part in ("faiss", "json"):
        shutil.copy(os.path.join(indexed.path, f"index.{part}"), os.path.join(other.path, f"index.{part}"))
    with pytest.raises(knnlm.KnnlmError, match="model_fingerprint differs: its index index.faiss has '0123"):
        datastores.DiskDatastore(other.path).load_index()


def test_a_truncated_index_is_a_clear_error(indexed, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(indexed.path, store)
    with open(store / "index.faiss", "r+b") as f:
        f.truncate(os.path.getsize(store / "index.faiss") // 2)
    with pytest.raises(knnlm.KnnlmError, match="index.faiss has .* bytes where its manifest vouches for .*: truncated"):
        datastores.DiskDatastore(str(store)).load_index()


def test_bad_index_settings_are_clear_errors(indexed, monkeypatch):
    with pytest.raises(knnlm.KnnlmError, match="cannot make an IVF index .* 'IVF64,Nonsense'"):
        faiss_index.plan_index(indexed, factory="IVF64,Nonsense", name="bad")
    with pytest.raises(knnlm.KnnlmError, match="more than the 1,000 keys to train them on"):
        faiss_index.plan_index(indexed, factory="IVF4096,PQ8x4fs", train_size=1000, name="bad")
    for nprobe in (0, 513, 10**10):  # the index has 512 lists
        with pytest.raises(knnlm.KnnlmError, match=r"--nprobe must be in \[1, 512\]"):
            indexed.load_index(nprobe=nprobe)
    with pytest.raises(knnlm.KnnlmError, match="no FAISS index missing in"):
        faiss_index.FaissIndex(indexed, name="missing")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(knnlm.KnnlmError, match="not enough disk space .*: the index needs"):
        faiss_index.plan_index(indexed, name="bad")
    assert not [f for f in os.listdir(indexed.path) if f.startswith("bad")]


def test_estimate_of_the_papers_datastore():
    factory, needs = faiss_index.index_estimate(103_000_000, 1024)
    assert factory == "IVF4096,PQ128x4fs"
    assert needs["disk: keys (float16) and values (int64)"] == 103_000_000 * (2 * 1024 + 8)  # ~212 GB
    assert 7e9 < needs["disk: the index"] < 8e9  # 64-byte codes and 8-byte ids
    out = run("build_datastore.py", "--estimate", "103000000", "1024", cwd=ROOT).stdout
    assert "IVF4096,PQ128x4fs" in out and "211.77 GB  disk: keys" in out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A corpus and an (untrained) checkpoint, as train.py leaves them."""
    root = tmp_path_factory.mktemp("work")
    data = write_corpus(root / "corpus", n_lines=(120, 15, 15))
    vocab = knnlm.Vocab.build(knnlm.split_path(data, "train"))
    checkpoints.save_checkpoint(str(root / "runs" / "model.pt"), tiny_model(len(vocab), d_model=32), vocab)
    return root, data


def test_scripts_build_the_index_and_evaluate_with_it(work):
    """IVF4,Flat stores the keys uncompressed: visiting its 4 lists is exact search, so the
    whole path (index, shards, ids back to values) must give the exact perplexity."""
    root, data = work
    out = run("build_datastore.py", "--data", data, "--index", "--index-shards", "2", "--factory", "IVF4,Flat",
              cwd=root).stdout
    assert "wrote the index IVF4,Flat" in out and "(2 shards)" in out
    ppl = {}
    for backend in ("torch", "faiss"):
        out = run("evaluate.py", "--data", data, "--k", "8", "--backend", backend, "--nprobe", "4", cwd=root).stdout
        assert ("search: FAISS IVF4,Flat, nprobe 4" in out) == (backend == "faiss")
        ppl[backend] = float(out.split("kNN-LM ppl ")[1].split()[0])
    assert ppl["faiss"] == ppl["torch"]
    out = run("evaluate.py", "--data", data, "--k", "8", cwd=root).stdout  # auto: small, so exact
    assert "search: exact" in out
    result = run("evaluate.py", "--data", data, "--backend", "faiss", "--datastore", str(root / "nowhere"),
                 cwd=root, check=False)
    assert result.returncode == 2 and "no datastore at" in result.stderr


IMPOSSIBLE_INDEXES = [(["--factory", "IVF4,Nonsense"], "cannot make an IVF index of dimension 32"),
                      (["--factory", "IVF64,Flat", "--train-size", "10"], "more than the 10 keys"),
                      (["--index-shards", "10000000"], "index shards must be in [1, ")]


@pytest.mark.parametrize("flags, message", IMPOSSIBLE_INDEXES)
def test_index_settings_it_cannot_take_are_refused_before_the_datastore_is_built(work, tmp_path, flags, message):
    root, data = work
    result = run("build_datastore.py", "--data", data, "--index", "--out", tmp_path / "ds", *flags, cwd=root,
                 check=False)
    fails(result, message)
    assert "wrote" not in result.stdout and not (tmp_path / "ds" / "keys.npy").exists()


@pytest.mark.parametrize("flags, message", IMPOSSIBLE_INDEXES)
def test_an_estimate_of_an_index_it_cannot_build_is_refused_as_the_build_would_be(flags, message):
    fails(run("build_datastore.py", "--estimate", "1000", "32", *flags, cwd=ROOT, check=False), message)


def test_torchrun_two_processes_build_the_datastore_and_index_in_two_shards(work, tmp_path):
    """The path past one process: torchrun starts 2 ranks; each writes the rows of its half of
    the text to the datastore memmap and adds them to its index shard; rank 0 merges."""
    root, data = work
    shutil.copytree(root / "runs", tmp_path / "runs", ignore=shutil.ignore_patterns("datastore"))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "build_datastore.py"), "--data", data, "--index"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote the index" in result.stdout and "(2 shards)" in result.stdout
    sharded = datastores.DiskDatastore(str(tmp_path / "runs" / "datastore"))
    assert sorted(os.listdir(sharded.path)) == [".lock", "index.faiss", "index.json", "keys.npy", "meta.json", "vals.npy"]
    assert files.read_json(os.path.join(sharded.path, "index.json"))["shards"] == 2
    run("build_datastore.py", "--data", data, "--out", "one", cwd=tmp_path)  # one process, for comparison
    one = datastores.DiskDatastore(str(tmp_path / "one"))
    assert sharded.meta == one.meta and torch.equal(sharded.vals, one.vals)
    assert sharded.files["vals.npy"] == one.files["vals.npy"]
    torch.testing.assert_close(sharded.keys, one.keys)  # other batches, so maybe other rounding
    dists, ids = sharded.load_index().search(sharded.keys[:20].float(), 1)
    assert (dists[:, 0] < 1e-3).all()  # each key finds itself (or an identical one)
