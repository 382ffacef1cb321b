"""Exact k-nearest-neighbour search (section 4): the PyTorch reference and the C++/CUDA
kernel of csrc/ (the ops torch.ops.knnlm.*) against a float64 brute force, on the CPU and,
when present, the GPU."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import knnlm
from knnlm_tools import search
from helpers import ROOT

ext = search.knnlm_ext
IN_CI = bool(os.environ.get("CI"))


def backend_param(backend, device="cpu"):
    marks = []
    if backend == "ext" and ext is None:  # CI builds it (.ci/run); not having it there is a failure
        marks.append(pytest.mark.skipif(not IN_CI, reason="knnlm_ext not built"))
    if device == "cuda":
        marks.append(pytest.mark.skipif(not torch.cuda.is_available() or ext is None or not ext.cuda,
                                        reason="no GPU, or knnlm_ext built without CUDA"))
    return pytest.param(backend, device, marks=marks, id=f"{backend}-{device}")


BACKENDS = [backend_param("torch"), backend_param("ext"), backend_param("ext", "cuda")]
KERNEL_DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(ext is None, reason="knnlm_ext not built")),
                  pytest.param("cuda", marks=pytest.mark.skipif(
                      not torch.cuda.is_available() or ext is None or not ext.cuda,
                      reason="no GPU, or knnlm_ext built without CUDA"))]


def brute_force(queries, keys, k):
    """float64 squared distances; the k smallest, ties to the smaller id (a stable sort)."""
    dists = ((queries.double()[:, None, :] - keys.double()[None, :, :]) ** 2).sum(-1)  # [B, N]
    sorted_dists, ids = dists.sort(dim=1, stable=True)
    return dists, sorted_dists[:, :k], ids[:, :k]


def make_data(kind, N, d, B, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        keys = torch.randn(N, d, generator=g)
    else:  # tight clusters: many near-equal distances
        centres = torch.randn(10, d, generator=g) * 5
        keys = centres[torch.randint(10, (N,), generator=g)] + 0.1 * torch.randn(N, d, generator=g)
    queries = keys[torch.randint(N, (B,), generator=g)] + 0.05 * torch.randn(B, d, generator=g)
    return queries, keys


def assert_exact_neighbours(dists, ids, queries, keys, k):
    """dists equal the brute force's within float32 error; ids equal its ids except between keys
    whose distances are equal within that error, and each returned id really is that far away."""
    all_dists, ref_dists, ref_ids = brute_force(queries, keys, k)
    dists, ids = dists.cpu(), ids.cpu()
    assert dists.shape == ids.shape == (len(queries), k) and dists.dtype == torch.float32 and ids.dtype == torch.int64
    tol = 1e-5 * all_dists.max().item() + 1e-4
    assert (dists[:, 1:] >= dists[:, :-1]).all()  # ascending
    assert torch.allclose(dists.double(), ref_dists, rtol=0, atol=tol)
    assert torch.allclose(all_dists.gather(1, ids), ref_dists, rtol=0, atol=tol)
    assert (ids.sort(1)[0][:, 1:] != ids.sort(1)[0][:, :-1]).all()  # no id twice
    near_tie = torch.zeros_like(ids, dtype=torch.bool)
    near_tie[:, 1:] |= (ref_dists[:, 1:] - ref_dists[:, :-1]) < 2 * tol
    near_tie[:, :-1] |= (ref_dists[:, 1:] - ref_dists[:, :-1]) < 2 * tol
    assert ((ids == ref_ids) | near_tie).all()


def nearest(backend, device, queries, keys, k, key_norms=None):
    queries, keys = queries.to(device), keys.to(device)
    key_norms = None if key_norms is None else key_norms.to(device)
    return search.topk_l2(queries, keys, k, key_norms=key_norms, backend=backend)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("N, k", [(5000, 1), (5000, 7), (5000, 1024),  # N not a multiple of any block size
                                  (1500, 7),                           # N smaller than one block
                                  (300, 300)])                         # k == N
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16])
def test_search_equals_brute_force(backend, device, kind, N, k, key_dtype):
    queries, keys = make_data(kind, N, 24, 33, seed=N + k)
    keys = keys.to(key_dtype)
    dists, ids = nearest(backend, device, queries, keys, k)
    assert_exact_neighbours(dists, ids, queries, keys, k)  # the reference sees the same (float16) keys


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_search_of_one_query_and_of_non_contiguous_inputs(backend, device):
    queries, keys = make_data("clustered", 3000, 16, 20, seed=1)
    keys_t = keys.T.contiguous().T           # column-major [N, d]: not contiguous
    queries_strided = torch.cat([queries, queries], 1)[:, ::2]  # every other column: not contiguous
    assert not keys_t.is_contiguous() and not queries_strided.is_contiguous()
    for q, kk in [(queries[:1], keys), (queries_strided, keys_t), (queries[::3], keys[::2])]:
        dists, ids = nearest(backend, device, q, kk, 50)
        assert_exact_neighbours(dists, ids, q, kk, 50)


@pytest.mark.parametrize("backend, device", [p for p in BACKENDS if "torch" not in p.id])
def test_exact_ties_go_to_the_smaller_id(backend, device):
    """Small integer coordinates: float32 arithmetic is exact and distances tie a lot, so the kernel's
    answer is fully determined, whatever its blocking: the order of (distance, id)."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(-2, 3, (6000, 8), generator=g).float()
    queries = torch.randint(-2, 3, (40, 8), generator=g).float()
    for k in (1, 7, 1024):
        dists, ids = nearest(backend, device, queries, keys, k)
        _, ref_dists, ref_ids = brute_force(queries, keys, k)
        assert torch.equal(ids.cpu(), ref_ids) and torch.equal(dists.cpu().double(), ref_dists)


@pytest.mark.parametrize("backend, device", [p for p in BACKENDS if "torch" not in p.id])
def test_selection_of_keys_in_distance_order_and_at_one_distance(backend, device):
    """Keys met in order of rising or of falling distance (the selection's cuts then see sorted
    candidates, a quickselect's classic worst case), and keys all at one distance (ids decide).
    Distances are squares of integers < 2^12: exact in float32."""
    line = torch.arange(4000.0)[:, None] * torch.tensor([[1.0, 0.0]])
    queries = torch.zeros(3, 2)
    for keys in (line, line.flip(0), torch.ones(4000, 2)):
        for k in (7, 1024):
            dists, ids = nearest(backend, device, queries, keys, k)
            _, ref_dists, ref_ids = brute_force(queries, keys, k)
            assert torch.equal(ids.cpu(), ref_ids) and torch.equal(dists.cpu().double(), ref_dists)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16])
def test_kernel_is_deterministic_and_right_for_any_blocking(device, key_dtype):
    """The same call gives the same bits; other block sizes change only the GEMM's rounding."""
    queries, keys = make_data("random", 5000, 24, 37, seed=3)
    keys = keys.to(key_dtype)
    queries_d, keys_d = queries.to(device), keys.to(device)
    key_norms = knnlm.squared_norms(keys_d)
    dists, ids = torch.ops.knnlm.topk_l2(queries_d, keys_d, 100, key_norms)
    again = torch.ops.knnlm.topk_l2(queries_d, keys_d, 100, key_norms)
    assert torch.equal(dists, again[0]) and torch.equal(ids, again[1])
    for key_chunk, query_block in [(1, 1), (129, 5), (4999, 36), (10_000, 1000)]:
        dists, ids = torch.ops.knnlm.topk_l2(queries_d, keys_d, 100, key_norms, key_chunk, query_block)
        assert_exact_neighbours(dists, ids, queries, keys, 100)


def split_inner_products(queries, keys):
    """The CUDA kernel's arithmetic for float16 keys, on the CPU: q = s (hi + lo) with s a power of two
    and hi, lo float16; q.k = s (hi.k + lo.k), products of float16s summed in float32."""
    largest = queries.abs().amax(1)
    scale = torch.where(largest > 0, torch.ldexp(torch.ones_like(largest), torch.frexp(largest).exponent - 14.0), 1.0)
    x = queries / scale[:, None]
    hi = x.half()
    lo = (x - hi.float()).half()
    return (hi.float() @ keys.float().T + lo.float() @ keys.float().T) * scale[:, None]


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_split_queries_give_float16_products_float32_precision(kind):
    """Why the CUDA kernel splits its queries: with float16 keys on the tensor cores, queries rounded to
    float16 miss float32's exact neighbours; split into two float16 rows they find them (the GPU's own
    results are test_search_equals_brute_force's)."""
    queries, keys = make_data(kind, 5000, 24, 33, seed=6)
    keys = keys.half()
    for inner_products, exact in [(split_inner_products(queries, keys), True),
                                  (queries.half().float() @ keys.float().T, False)]:
        dists = keys.float().pow(2).sum(1) - 2 * inner_products
        dists, ids = knnlm.sort_neighbours(*dists.topk(1024, dim=1, largest=False))
        dists = (dists + queries.pow(2).sum(1, keepdim=True)).clamp(min=0)
        if exact:
            assert_exact_neighbours(dists, ids, queries, keys, 1024)
        else:
            with pytest.raises(AssertionError):
                assert_exact_neighbours(dists, ids, queries, keys, 1024)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_a_datastore_searched_on_the_gpu_holds_its_keys_there_and_finds_the_nearest(built):
    *_, datastore, _ = built
    queries = datastore.keys[:20].float() + 0.01
    assert datastore.use("auto", "cuda", k=5) == ("ext" if ext is not None and ext.cuda else "torch")
    assert datastore.keys.device.type == datastore.key_norms.device.type == "cuda"
    dists, ids = datastore.search(queries.cuda(), 5)
    assert_exact_neighbours(dists, ids, queries, datastore.keys.cpu(), 5)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_search_rejects_bad_input_clearly(backend, device):
    keys, queries = torch.randn(10, 4, device=device), torch.randn(2, 4, device=device)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        search.topk_l2(queries, keys, 11, backend=backend)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        search.topk_l2(queries, keys, 0, backend=backend)
    with pytest.raises(ValueError, match=r"queries must be \[B, 4\]"):
        search.topk_l2(torch.randn(2, 5, device=device), keys, 3, backend=backend)
    with pytest.raises(TypeError, match="queries must be float32"):
        search.topk_l2(queries.double(), keys, 3, backend=backend)
    with pytest.raises(TypeError, match="keys must be float16 or float32"):
        search.topk_l2(queries, keys.long(), 3, backend=backend)
    with pytest.raises(TypeError, match=r"key_norms must be float32 \[10\]"):
        search.topk_l2(queries, keys, 3, key_norms=torch.zeros(9, device=device), backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        search.topk_l2(queries, keys, 3, backend="magic")


@pytest.mark.skipif(ext is None, reason="knnlm_ext not built")
def test_kernel_rejects_bad_input_itself():
    """The op checks its inputs too: it is callable without the Python wrapper. Keys on the meta
    device send the call to the Meta kernel, which runs the same checks."""
    keys, queries, norms = torch.randn(10, 4), torch.randn(2, 4), torch.zeros(10)
    for args, message in [((queries, keys, 11, norms), r"k must be in \[1, 10\]"),
                          ((queries, keys, 0, norms), r"k must be in \[1, 10\]"),
                          ((torch.randn(2, 5), keys, 3, norms), "differ in dimension"),
                          ((queries.double(), keys, 3, norms), "queries must be float32"),
                          ((queries, keys.long(), 3, norms), "keys must be float16 or float32"),
                          ((queries, keys, 3, norms[:9]), "key_norms must be float32"),
                          ((queries, keys.to("meta"), 3, norms), "must be on one device")]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.knnlm.topk_l2(*args)


@pytest.mark.skipif(ext is None, reason="knnlm_ext not built")
def test_kernel_refuses_keys_on_another_device():
    with pytest.raises(ValueError, match="must be on one device"):
        search.topk_l2(torch.randn(2, 4), torch.randn(10, 4, device="meta"), 3, backend="ext")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_topk_l2_is_a_well_formed_torch_op(device):
    """torch.library.opcheck: the schema, and the Meta kernel against the real one (with the shapes
    symbolic too, as torch.compile traces them)."""
    queries, keys = make_data("clustered", 700, 16, 9, seed=5)
    for key_dtype in (torch.float32, torch.float16):
        keys_d = keys.to(device, key_dtype)
        key_norms = knnlm.squared_norms(keys_d)
        for k, blocks in [(1, ()), (7, ()), (40, (129, 4))]:
            torch.library.opcheck(torch.ops.knnlm.topk_l2.default, (queries.to(device), keys_d, k, key_norms, *blocks))


@pytest.mark.parametrize("device", KERNEL_DEVICES[:1])  # rerank_l2 runs on the CPU only
def test_rerank_l2_is_a_well_formed_torch_op(device):
    queries, keys = make_data("random", 500, 16, 6, seed=6)
    ids = torch.randint(500, (6, 9), generator=torch.Generator().manual_seed(6))
    ids[2, 4] = -1  # FAISS found fewer than k
    for key_dtype in (torch.float32, torch.float16):
        torch.library.opcheck(torch.ops.knnlm.rerank_l2.default, (queries, keys.to(key_dtype), ids))
        torch.library.opcheck(torch.ops.knnlm.rerank_l2.default, (queries, keys.to(key_dtype), ids[:, :1]))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_torch_compile_traces_code_that_searches(device):
    """The Meta kernel gives torch.compile the shapes of the op's results, so a function that calls the
    op compiles into one graph; it computes what it computes eagerly."""
    def nearest_weights(queries, keys, key_norms):  # p_kNN's weights, eq. (2), up to the normalisation
        dists, ids = torch.ops.knnlm.topk_l2(queries, keys, 8, key_norms)
        return torch.softmax(-dists, dim=1), ids

    compiled = torch.compile(nearest_weights, backend="aot_eager", fullgraph=True)
    for B in (5, 11):  # the second shape recompiles, with symbolic shapes
        queries, keys = make_data("random", 600, 16, B, seed=B)
        queries, keys = queries.to(device), keys.to(device)
        key_norms = knnlm.squared_norms(keys)
        weights, ids = compiled(queries, keys, key_norms)
        eager_weights, eager_ids = nearest_weights(queries, keys, key_norms)
        assert torch.equal(ids, eager_ids) and torch.equal(weights, eager_weights)


def test_ext_backend_without_the_kernel_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(search, "knnlm_ext", None)
    with pytest.raises(knnlm.KnnlmError, match="pip install --no-build-isolation -e ."):
        search.topk_l2(torch.randn(2, 4), torch.randn(10, 4), 3, backend="ext")
    assert search.topk_l2(torch.randn(2, 4), torch.randn(10, 4), 3, backend="auto")[1].shape == (2, 3)  # torch


@pytest.mark.skipif(ext is None, reason="knnlm_ext not built")
def test_auto_backend_uses_the_kernel_when_built(monkeypatch):
    calls, op = [], torch.ops.knnlm.topk_l2
    monkeypatch.setattr(torch.ops.knnlm, "topk_l2", lambda *a: calls.append(a) or op(*a))
    search.topk_l2(torch.randn(2, 4), torch.randn(10, 4), 3)
    assert len(calls) == 1


def test_cuda_kernel_compiles_with_plain_nvcc(tmp_path):
    """CI has nvcc but no GPU: a broken .cu must still fail CI."""
    nvcc = shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.isfile(p)), None)
    if nvcc is None:
        if IN_CI:
            pytest.fail("nvcc not found: CI must compile csrc/topk_l2_cuda.cu")
        pytest.skip("nvcc not found")
    result = subprocess.run([nvcc, "-c", os.path.join(ROOT, "csrc", "topk_l2_cuda.cu"), "-o",
                             str(tmp_path / "topk_l2_cuda.o"), "-Werror", "all-warnings"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert os.path.getsize(tmp_path / "topk_l2_cuda.o") > 0


@pytest.mark.skipif(ext is None and not IN_CI, reason="knnlm_ext not built: nothing to compare with")
def test_the_kernels_build_without_openmp_and_give_the_same_neighbours(tmp_path):
    """A compiler that refuses -fopenmp (Apple's clang) still builds the kernels: on one thread, the
    same neighbours and distances as the OpenMP build."""
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    for name, real in (("c++", shutil.which("c++") or shutil.which("g++")), ("cc", shutil.which("cc") or shutil.which("gcc"))):
        (wrappers / name).write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "{name}: error: '
                                     f"unsupported option '-fopenmp'\" >&2; exit 1; }}; done\nexec {real} \"$@\"\n")
        (wrappers / name).chmod(0o755)
    tree, root = tmp_path / "tree", Path(ROOT)
    shutil.copytree(root / "csrc", tree / "csrc")
    shutil.copytree(root / "knnlm_tools", tree / "knnlm_tools", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("setup.py", "knnlm.py"):
        shutil.copy(root / f, tree)
    cc = str(wrappers / "cc")
    env = {**os.environ, "CXX": str(wrappers / "c++"), "CC": cc, "LDSHARED": f"{cc} -shared",
           "LDCXXSHARED": f"{wrappers / 'c++'} -shared", "KNNLM_CUDA": "0"}
    built = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "does not take -fopenmp: the C++ kernels will run on one thread" in built.stdout
    library = next(tree.glob("knnlm_ext*.so"))
    assert b"GOMP_parallel" not in library.read_bytes()
    check = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import knnlm_ext; "
             "assert knnlm_ext.__file__.startswith(sys.argv[1]); g = torch.Generator().manual_seed(0); "
             "q, k = torch.randn(300, 24, generator=g), torch.randn(5000, 24, generator=g).half(); "
             "n = q.new_tensor(k.float().pow(2).sum(1)); "
             "torch.save(torch.ops.knnlm.topk_l2(q, k, 64, n), sys.argv[2])")
    for name, where in (("alone", tree), ("openmp", ROOT)):
        subprocess.run([sys.executable, "-c", check, str(where), str(tmp_path / f"{name}.pt")], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=120)
    (dists, ids), (dists_omp, ids_omp) = (torch.load(tmp_path / f"{n}.pt") for n in ("alone", "openmp"))
    assert torch.equal(ids, ids_omp) and torch.equal(dists, dists_omp)
