"""What the CPU gives a run (knnlm_tools/cpu.py): threads from the CPUs other processes leave free,
bfloat16 autocast only where asked or native, and the scripts saying which ran."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import knnlm
from knnlm_tools import checkpoints, cpu, datastores, search
from helpers import ROOT, clustered_keys, run, tiny_model, untrained_work, write_corpus, write_datastore


def test_threads_left_keeps_at_least_one():
    assert cpu.threads_left(2, 0.0) == 2
    assert cpu.threads_left(2, 0.3) == 2  # a little background work is not a neighbour
    assert cpu.threads_left(2, 0.8) == 1
    assert cpu.threads_left(2, 2.7) == 1
    assert cpu.threads_left(16, 3.2) == 13


@pytest.fixture
def busy_neighbour():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)
    yield
    busy.kill()
    busy.wait()


@pytest.mark.skipif(not os.path.isfile("/proc/stat"), reason="reads /proc/stat")
def test_a_busy_neighbour_takes_a_thread(monkeypatch, busy_neighbour):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        threads = cpu.Threads(first_look=1.0)
        assert threads.others >= 0.5  # a busy loop kept (most of) a CPU for the whole look
        assert torch.get_num_threads() == cpu.threads_left(threads.most, threads.others) < threads.most or threads.most == 1
    finally:
        torch.set_num_threads(before)


def test_omp_num_threads_is_obeyed():
    script = ("import torch; from knnlm_tools import cpu; t = cpu.Threads(); "
              "print(t.fixed, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split() == ["True", "1"]


def test_threads_look_again_before_a_forward_pass(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        threads = cpu.Threads(every=0.0, first_look=0.0)
        model = tiny_model(20)
        threads.follow(model)
        looked = threads.last[0]
        time.sleep(0.01)
        model(torch.zeros(1, 4, dtype=torch.long))
        assert threads.fixed or threads.last[0] > looked
    finally:
        torch.set_num_threads(before)


def test_the_search_runs_on_every_core_and_the_model_keeps_its_threads(monkeypatch, tmp_path):
    """Beside a busy process cpu.Threads() leaves the model one thread; a search's coarse work still takes
    every core (cpu.every_core), and the model's count is back after it. OMP_NUM_THREADS is obeyed instead."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    datastore = write_datastore(tmp_path / "store", clustered_keys(300, 8))
    datastore.use("torch", k=4)
    seen, search = [], knnlm.Datastore.search
    monkeypatch.setattr(knnlm.Datastore, "search",
                        lambda self, q, k: seen.append(torch.get_num_threads()) or search(self, q, k))
    queries = torch.from_numpy(clustered_keys(5, 8, seed=1)).float()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as cpu.Threads() sets it beside a busy process
        dists, ids = datastore.search(queries, 4)
        assert seen == [cpu.most_threads()] and torch.get_num_threads() == 1
        assert torch.allclose(dists, knnlm.topk_l2(queries, datastore.keys, 4)[0], rtol=1e-5)  # the same search
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        datastore.search(queries, 4)
        assert seen[-1] == 1
    finally:
        torch.set_num_threads(before)


def test_precision_auto_is_bfloat16_only_where_native():
    assert cpu.resolve_precision("auto", "cpu") == ("bfloat16" if cpu.native_bfloat16() else "float32")
    assert cpu.resolve_precision("auto", "cuda") == "float32"
    assert cpu.resolve_precision("bfloat16", "cpu") == "bfloat16"
    assert cpu.resolve_precision("float32", "cpu") == "float32"
    # torch held at AVX2 (ATEN_CPU_CAPABILITY, read when it loads), as on an AVX2 CPU: float32, whatever this CPU has
    code = "from knnlm_tools import cpu; print(cpu.native_bfloat16(), cpu.resolve_precision('auto', 'cpu'))"
    for capability in ("avx2", "default"):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
                             capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["False", "float32"], out.stdout


def test_the_times_file_names_what_each_library_ran():
    """bench/avx2_paths.sh holds every library at AVX2: the line run.sh ends with says so."""
    pytest.importorskip("faiss")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "FAISS_SIMD_LEVEL": "AVX2"}
    out = subprocess.run([sys.executable, "-m", "knnlm_tools.cpu", "train 75"], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.split("\n")[0].split() == ["train", "1", "min", "15", "s"]
    assert "torch uses AVX2; native bfloat16: no" in out.stdout and "FAISS's: AVX2)" in out.stdout, out.stdout


def test_bfloat16_autocast_scores_near_float32():
    model = tiny_model(30, block_size=16, d_model=32)
    tokens = torch.randint(30, (200,))
    exact = knnlm.score_split(model, tokens, progress=False)
    with cpu.autocast("bfloat16", "cpu"):
        approx = knnlm.score_split(model, tokens, progress=False)
    assert approx["log_p_lm"].dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa: the log-probabilities agree to a few hundredths of a nat
    assert (approx["log_p_lm"] - exact["log_p_lm"]).abs().max() < 0.05
    assert not torch.equal(approx["log_p_lm"], exact["log_p_lm"])  # and it did run in bfloat16


def test_the_scripts_say_which_precision_and_search_ran(tmp_path):
    root, data = untrained_work(tmp_path, (120, 30, 30), "--precision", "bfloat16")
    meta = json.load(open(root / "runs" / "datastore" / "meta.json"))
    assert meta["precision"] == "bfloat16" and meta["key_dtype"] == "float16"
    run("evaluate.py", "--data", data, "--k", "8", "--tune", "--precision", "float32", "--backend", "torch",
        "--results", "r.json", cwd=root)
    results = json.load(open(root / "r.json"))
    assert results["precision"] == {"evaluation": "float32", "datastore": "bfloat16", "training": None}
    assert results["search"] == "exact (torch)" and results["measured_with"]["precision"] == "float32"
    assert results["mkl"] == {"evaluation": cpu.mkl_path(), "training": None}  # the scripts' own choice here
    # a datastore of another precision is another datastore: its build is not reused
    out = run("build_datastore.py", "--data", data, "--precision", "float32", cwd=root, check=False)
    assert out.returncode == 2 and "precision" in out.stderr


def test_precision_auto_continues_a_datastore_in_its_own_precision(tmp_path):
    """Built in the precision auto would not pick here, then --index with auto: added, not refused."""
    other = "float32" if cpu.resolve_precision("auto", "cpu") == "bfloat16" else "bfloat16"
    root, data = untrained_work(tmp_path, (120, 30, 30), "--precision", other)
    ds = root / "runs" / "datastore"
    keys = (ds / "keys.npy").read_bytes()
    out = run("build_datastore.py", "--data", data, "--index", "--factory", "IVF4,Flat", cwd=root)
    assert other in out.stdout and "already holds this datastore" in out.stdout
    assert (ds / "keys.npy").read_bytes() == keys and datastores.recorded_precision(ds) == other
    # a build begun and interrupted is continued in its precision too (its progress file records it)
    meta = json.load(open(ds / "meta.json"))
    os.remove(ds / "meta.json")
    json.dump({"manifest": {k: meta[k] for k in meta if k not in ("files", "seal")}, "rows": 0},
              open(ds / "progress.json", "w"))
    assert datastores.recorded_precision(ds) == other
    assert datastores.recorded_precision(tmp_path / "nothing") is None


def test_a_checkpoint_from_before_precision_was_recorded_trained_in_float32():
    """One rule for train.py --resume, evaluate.py's results and the analyses that train the model again."""
    assert checkpoints.training_args({"args": {"lr": 0.001}}) == {"lr": 0.001, "precision": "float32"}
    assert checkpoints.training_args({"args": {"precision": "bfloat16"}})["precision"] == "bfloat16"
    assert checkpoints.training_args({"config": {}}) is None  # not written by train.py


def test_training_records_its_precision_and_resumes_only_in_it(tmp_path):
    data = write_corpus(tmp_path / "corpus", n_lines=(120, 20, 20))
    args = ["--data", data, "--preset", "tiny", "--max-iters", "4", "--eval-interval", "2", "--batch-size", "2"]
    run("train.py", *args, "--precision", "bfloat16", cwd=tmp_path)
    ckpt = torch.load(tmp_path / "runs" / "model.pt", weights_only=True)
    assert ckpt["args"]["precision"] == "bfloat16"
    assert ckpt["args"]["mkl"] == cpu.mkl_path()  # not loaded first here: MKL's own choice (None without MKL)
    out = run("train.py", *args, "--precision", "float32", "--resume", cwd=tmp_path, check=False)
    assert out.returncode == 2 and "--precision" in out.stderr


def test_knnlm_mkl_avx2_loaded_first_makes_mkl_take_its_intel_path():
    """run.sh on an AMD CPU with AVX2: MKL then says it runs the kernels it runs on an Intel CPU with these
    instructions (AVX2, or AVX-512 where the CPU has it), mkl_path() says the same (the checkpoint and the
    results record it), and a float32 product is still float32's rounding of float64's."""
    library = cpu.mkl_avx2_library()
    if library is None:
        pytest.skip("not an AMD CPU with AVX2 and MKL, or knnlm_mkl_avx2 not built (pip install -e .)")
    code = ("import torch; from knnlm_tools import cpu; g = torch.Generator().manual_seed(0); "
            "a, b = torch.randn(300, 256, generator=g), torch.randn(256, 500, generator=g); "
            "error = (a @ b).double() - a.double() @ b.double(); "  # within float32's bound for 256-term sums
            "assert (error.abs() <= 256 * 2 ** -24 * (a.abs() @ b.abs()).double()).all(); print(cpu.mkl_path())")
    banners = {"AVX2 (knnlm_mkl_avx2)": "(Intel(R) AVX2) enabled processors",
               "AVX-512 (knnlm_mkl_avx2)": "(Intel(R) AVX-512)"}
    for preload, limit in ((library, ""), ("", ""), (library, "AVX2")):  # AVX2: MKL held there, as on an AVX2 CPU
        env = {**os.environ, "LD_PRELOAD": preload, "MKL_VERBOSE": "1", "MKL_ENABLE_INSTRUCTIONS": limit}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
        lines = out.stdout.splitlines()
        path = lines[-1]
        assert path in banners if preload else path == "its own choice"
        assert path != "AVX-512 (knnlm_mkl_avx2)" or not limit
        banner = next(line for line in lines if line.startswith("MKL_VERBOSE oneMKL"))
        for label, named in banners.items():  # MKL names the path mkl_path() names, and no other
            assert (named in banner) == (path == label), banner


def test_cpuinfo_reads_the_field_named_not_one_it_begins(tmp_path):
    (tmp_path / "cpuinfo").write_text("vendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel name\t: AMD EPYC\n"
                                      "model\t\t: 2\nflags\t\t: fpu avx2\n\nprocessor\t: 1\nmodel\t\t: 9\n")
    read = lambda field: cpu.cpuinfo(field, str(tmp_path / "cpuinfo"))
    assert (read("model"), read("model name"), read("cpu family"), read("flags")) == ("2", "AMD EPYC", "26", "fpu avx2")
    assert read("stepping") is None and cpu.cpuinfo("flags", str(tmp_path / "missing")) is None


needs_kernel = pytest.mark.skipif(search.knnlm_ext is None, reason="knnlm_ext not built")
TORCH_DRAWS_ITSELF = cpu.cpuinfo("vendor_id") != "GenuineIntel" or not torch.backends.mkl.is_available()
draws_itself = pytest.mark.skipif(not TORCH_DRAWS_ITSELF, reason="on an Intel CPU torch's bernoulli_ draws with MKL")


def kernels_run(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {event.key for event in prof.key_averages()}


@needs_kernel
@draws_itself
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_knnlm_bernoulli_draws_what_torchs_own_draws(dtype):
    """The same elements and the generator left in the same state, whatever the size, p and the state
    (mt19937 regenerates its 624 numbers: sizes around 312 and 624 elements, two numbers each)."""
    for n in (0, 1, 311, 312, 313, 624, 2049, 10_000):
        for p in (0.0, 0.1, 0.8, 0.7071, 1.0):
            for before in (0, 1, 623, 624, 1000):
                g = torch.Generator().manual_seed(1000 * n + before)
                torch.rand(before, generator=g, dtype=torch.float64)
                start = g.get_state()
                want = torch.empty(n, dtype=dtype).bernoulli_(p, generator=g)
                want_state = g.get_state()
                g.set_state(start)
                got = torch.ops.knnlm.bernoulli_(torch.empty(n, dtype=dtype), p, g)
                assert torch.equal(got, want) and torch.equal(g.get_state(), want_state), (n, p, before)
    torch.manual_seed(5)  # no generator: the default one, as dropout's
    want, want_next = torch.empty(3000, dtype=dtype).bernoulli_(0.9), torch.rand(2)
    torch.manual_seed(5)
    got, got_next = torch.ops.knnlm.bernoulli_(torch.empty(3000, dtype=dtype), 0.9), torch.rand(2)
    assert torch.equal(got, want) and torch.equal(got_next, want_next)


@needs_kernel
def test_knnlm_bernoulli_leaves_what_it_does_not_handle_to_torch():
    for make in (lambda: torch.empty(40, 30).t(), lambda: torch.empty(500, dtype=torch.int64)):  # strided, integer
        torch.manual_seed(1)
        want = make().bernoulli_(0.6)
        torch.manual_seed(1)
        assert torch.equal(torch.ops.knnlm.bernoulli_(make(), 0.6), want)
    with pytest.raises(RuntimeError, match="p"):
        torch.ops.knnlm.bernoulli_(torch.empty(3), 1.5)


@needs_kernel
def test_exact_bernoulli_gives_dropout_the_same_bits_through_the_kernel():
    cfg = knnlm.ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, d_model=32, dropout=0.2)
    model = knnlm.TransformerLM(cfg).train()  # dropout in the blocks and inside the attention
    x = torch.randint(50, (4, 32), generator=torch.Generator().manual_seed(0))

    def step():
        torch.manual_seed(0)
        model.zero_grad()
        logits = model(x)
        logits = logits[0] if isinstance(logits, tuple) else logits
        logits.float().sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    (want, want_grads), torchs = kernels_run(step)
    assert "knnlm::bernoulli_" not in torchs
    try:
        assert cpu.exact_bernoulli() == TORCH_DRAWS_ITSELF
        (got, grads), ours = kernels_run(step)
    finally:
        cpu.exact_bernoulli(install=False)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(grads, want_grads))
    assert ("knnlm::bernoulli_" in ours) == TORCH_DRAWS_ITSELF
    assert "knnlm::bernoulli_" not in kernels_run(step)[1]  # taken away again
