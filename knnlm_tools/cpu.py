"""
What the CPU can give a run: how many threads, whether it computes in bfloat16, its memory (how
much is free, what a training step needs of it, its pages kept from one step to the next), MKL's
kernels and dropout's masks.

Threads: torch runs one thread per core, and its threads wait for each other at every operation,
so a single busy process beside it on a 2-core machine slows it several times over
(bench/results/levers.md, lever 5). Threads() watches how much of the machine other processes use
(the CPU time /proc/stat counts on our CPUs, less this process's own) and runs on what is left,
looking again every few seconds: a busy neighbour that comes or goes is followed. A search is
coarser work, whose threads seldom wait: every_core() runs it on every core even beside a busy
process. OMP_NUM_THREADS, when set, is obeyed instead.

bfloat16: autocast to bfloat16 is faster where the CPU has the instructions (AVX512-BF16 or
AMX; bench/results/levers-avx512.md, lever 4) and far slower where oneDNN has to emulate them
(AVX2), so "auto" asks torch's own CPU feature detection (cpuinfo) at run time.

MKL: torch's float32 matrix products run in Intel's MKL, which takes its AVX2 and AVX-512 kernels
only on a CPU it believes is Intel's. On an AMD CPU with AVX2, run.sh loads knnlm_mkl_avx2 first
(csrc/mkl_avx2.cpp): MKL then takes the kernels it takes on an Intel CPU with the same
instructions, AVX2, or AVX-512 where the CPU has it. mkl_path() says which path a process runs.

Dropout's masks: torch's bernoulli_ draws them one mt19937 call at a time on a CPU that is not
Intel's; exact_bernoulli() puts knnlm.bernoulli_ (csrc/bernoulli.cpp) in its place, the same numbers
drawn in blocks, where a check finds them the same.
"""
import ctypes
import importlib.util
import os
import time
import warnings
from contextlib import contextmanager, nullcontext

import torch

PRECISIONS = ("auto", "float32", "bfloat16")
MOST_THREADS = torch.get_num_threads()  # torch's own choice, one per core, before any Threads() changes it


# -----------------------------------------------------------------------------
# Memory: how much is free, and what a training step needs, known before it runs

def memory_free(device="cpu"):
    """Bytes free on device: the GPU's free memory, or the kernel's MemAvailable (None where unknown)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def training_memory(cfg, batch_size, device="cpu"):
    """Bytes that a training step of knnlm.TransformerLM(cfg) on batch_size windows needs at least, counted
    from what it must hold at once: the weights, their gradients and AdamW's two moments (16 bytes a
    parameter); for each token, its logits, their log-softmax and its gradient (12 bytes a word of the
    vocabulary); in each layer, the activations kept for the backward pass (32 bytes per d_model, as
    many as bfloat16 autocast keeps; float32 keeps more) and, on the CPU with dropout, the attention's
    weights, their dropped copy and the mask (13 bytes per head and position: there torch computes an
    attention with dropout without its fused kernel). A lower bound: the step needs more."""
    import knnlm
    with torch.device("meta"):  # the parameters counted, not allocated
        parameters = sum(p.numel() for p in knnlm.TransformerLM(cfg).parameters())
    attention = 13 * cfg.n_head * cfg.block_size if torch.device(device).type == "cpu" and cfg.dropout > 0 else 0
    per_token = 12 * cfg.vocab_size + cfg.n_layer * (32 * cfg.d_model + attention)
    return 16 * parameters + batch_size * cfg.block_size * per_token


# -----------------------------------------------------------------------------
# Freed memory kept for the next step

def reuse_freed_memory():
    """Keep freed blocks in the process's heap (glibc: no mmap, no trim). By default glibc returns every
    block over 32 MiB to the kernel when freed, and the next step's logits ([tokens, vocabulary] floats)
    fault their pages in again, every step (bench/results/levers.md, lever 3, measures what that
    costs). A few hundred MB more stay resident. Nothing changes off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    except (OSError, AttributeError):
        pass


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h


# -----------------------------------------------------------------------------
# bfloat16 where the CPU has it

def native_bfloat16():
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), as torch's cpuinfo reads them, and
    torch may use them: not when ATEN_CPU_CAPABILITY holds it at AVX2, as on an AVX2 CPU."""
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(check is None for check in checks):  # a torch without them: the kernel's flags
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return any(check() for check in checks if check is not None)


def cpuinfo(field, path="/proc/cpuinfo"):
    """The value of the first `field` line of /proc/cpuinfo ("flags", "vendor_id", "model name", "model");
    None off Linux."""
    try:
        with open(path) as f:
            return next((value.strip() for key, _, value in (line.partition(":") for line in f)
                         if key.strip() == field), None)
    except OSError:
        return None


def cpu_flags():
    return set((cpuinfo("flags") or "").split())


def resolve_precision(precision, device):
    """--precision auto -> bfloat16 on a CPU with native bfloat16, float32 elsewhere (on CUDA too, until
    measured there); an explicit float32 or bfloat16 is kept."""
    if precision != "auto":
        return precision
    return "bfloat16" if device == "cpu" and native_bfloat16() else "float32"


def autocast(precision, device):
    """The forward passes' context: bfloat16 autocast, or nothing for float32."""
    if precision == "float32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


# -----------------------------------------------------------------------------
# MKL's Intel path on an AMD CPU: AVX2, or AVX-512 where the CPU has it

MKL_AVX2 = "knnlm_mkl_avx2"  # built by setup.py from csrc/mkl_avx2.cpp


def mkl_avx2_library():
    """The file of knnlm_mkl_avx2 where loading it first (LD_PRELOAD) changes MKL's path: torch multiplies
    with MKL and the CPU is an AMD one with AVX2. None elsewhere, or when it is not built."""
    if not torch.backends.mkl.is_available() or cpuinfo("vendor_id") != "AuthenticAMD" or "avx2" not in cpu_flags():
        return None
    spec = importlib.util.find_spec(MKL_AVX2)
    return spec.origin if spec is not None else None


AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}  # what MKL's AVX-512 kernels ask of a CPU


def mkl_path():
    """Which kernels MKL multiplies with in this process: "AVX2 (knnlm_mkl_avx2)" when that library is
    loaded ("AVX-512 (knnlm_mkl_avx2)" on a CPU with AVX-512 unless MKL_ENABLE_INSTRUCTIONS holds MKL
    below it), else "its own choice"; None when torch has no MKL."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        with open("/proc/self/maps") as f:
            forced = any(MKL_AVX2 in line for line in f)
    except OSError:
        forced = False
    if not forced:
        return "its own choice"
    limit = (os.environ.get("MKL_ENABLE_INSTRUCTIONS") or "AVX512").upper()  # MKL's own cap, read when it loads
    return f"{'AVX-512' if AVX512 <= cpu_flags() and limit.startswith('AVX512') else 'AVX2'} ({MKL_AVX2})"


# -----------------------------------------------------------------------------
# Dropout's masks drawn in blocks

_bernoulli_override = None  # the torch.library.Library that holds the override, while installed


def bernoulli_checks():
    """(tensor, p, how many numbers the generator gave before) cases on which knnlm.bernoulli_ must draw
    what torch's own bernoulli_ draws: every dtype it handles, sizes around the mt19937's 624-number
    state, a state part used."""
    return [(torch.empty(n, dtype=dtype), p, before) for dtype in (torch.float32, torch.bfloat16, torch.float64)
            for n, p, before in ((0, 0.9, 0), (1, 0.5, 3), (625, 0.8, 0), (5000, 0.9, 623), (3000, 0.0, 1),
                                 (3000, 1.0, 2))]


def bernoulli_agrees(draw):
    """Whether draw(tensor, p, generator) fills and advances a generator as torch's own bernoulli_ does."""
    for seed, (x, p, before) in enumerate(bernoulli_checks()):
        g = torch.Generator().manual_seed(seed)
        torch.rand(before, generator=g, dtype=torch.float64)  # one number each, as bernoulli_ draws
        start = g.get_state()
        want, want_state = x.clone().bernoulli_(p, generator=g), g.get_state()
        g.set_state(start)
        got = draw(x.clone(), p, g)
        if not (torch.equal(got, want) and torch.equal(g.get_state(), want_state)):
            return False
    return True


def exact_bernoulli(install=True):
    """Dropout draws its masks with torch's bernoulli_, which on a CPU that is not Intel's draws every
    element through the generator's mt19937 one call at a time, a large part of a training step.
    knnlm.bernoulli_ (csrc/bernoulli.cpp) draws the same numbers in blocks, several times faster
    (bench/results/bernoulli.md). This makes it torch's bernoulli_(p) on the CPU for the rest of the
    process (an override of aten::bernoulli_.float, which every dropout calls), where the kernel is
    built and draws exactly what torch's own does here, checked first; elsewhere (on an Intel CPU,
    where torch draws with MKL) nothing changes. -> whether it is installed. install=False takes the
    override away."""
    global _bernoulli_override
    if not install:
        if _bernoulli_override is not None:
            _bernoulli_override._destroy()
            _bernoulli_override = None
        return False
    if _bernoulli_override is not None:
        return True
    try:
        import knnlm_ext  # noqa: F401  (registers torch.ops.knnlm.bernoulli_)
    except ImportError:
        return False
    if not hasattr(torch.ops.knnlm, "bernoulli_") or not bernoulli_agrees(torch.ops.knnlm.bernoulli_):
        return False
    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # torch warns that the CPU kernel is overridden: that is the point
        warnings.simplefilter("ignore")
        library.impl("bernoulli_.float",
                     lambda self, p=0.5, generator=None: torch.ops.knnlm.bernoulli_(self, p, generator), "CPU")
    _bernoulli_override = library
    return True


# -----------------------------------------------------------------------------
# Threads from what the machine can give

def busy_seconds(cpus):
    """CPU seconds spent busy so far on these CPUs, by every process (/proc/stat); None off Linux."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return None
    ticks = 0
    for name, *fields in lines:
        if int(name[3:]) in cpus:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
            ticks += user + nice + system + irq + softirq + steal  # steal: a neighbour on the host
    return ticks / os.sysconf("SC_CLK_TCK")


def usable_cpus():
    """The CPUs this process may run on (its affinity); empty where the OS does not say."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()


def most_threads():
    """One thread per CPU this process may run on, at most torch's own choice."""
    return min(MOST_THREADS, len(usable_cpus()) or MOST_THREADS)


def threads_left(cpus, others):
    """The threads to run on `cpus` CPUs when other processes keep `others` of them busy: at least one."""
    return max(1, cpus - round(others))


class Threads:
    """torch's thread count, set from the CPUs other processes leave free, and looked at again at most
    every `every` seconds by check() (Threads.follow(model) calls it before every forward pass)."""

    def __init__(self, every=5.0, first_look=0.25):
        self.cpus = usable_cpus()
        self.most = most_threads()
        self.every, self.others, self.last = every, 0.0, self.sample()
        self.fixed = "OMP_NUM_THREADS" in os.environ or self.last[1] is None
        if not self.fixed:
            time.sleep(first_look)
            self.check(force=True)

    def sample(self):
        return time.monotonic(), busy_seconds(self.cpus), time.process_time()

    def check(self, force=False):
        if self.fixed or (not force and time.monotonic() - self.last[0] < self.every):
            return
        now = self.sample()
        wall, busy, own = (b - a for a, b in zip(self.last, now))
        self.last, self.others = now, max(0.0, (busy - own) / wall) if wall > 0 else 0.0
        threads = threads_left(self.most, self.others)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def follow(self, model):
        """Look again (at most every `every` seconds) before each forward pass of the model."""
        model.register_forward_pre_hook(lambda module, args: self.check())
        return self

    def __str__(self):
        n = torch.get_num_threads()
        threads = f"{n} thread{'s' if n > 1 else ''}"
        return threads if self.fixed else f"{threads} (of {self.most}; other processes busy on {self.others:.1f} CPUs)"


@contextmanager
def every_core():
    """torch's threads on every CPU this process may use, for the while: a search's big products and
    selections come in coarse pieces, whose threads seldom wait for each other, so that beside a busy
    process two threads still search faster than one (bench.levers' lever 8), where a training step's
    small operations are slower. OMP_NUM_THREADS, when set, is obeyed instead."""
    before, most = torch.get_num_threads(), most_threads()
    if "OMP_NUM_THREADS" in os.environ or before == most:
        yield
        return
    torch.set_num_threads(most)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -----------------------------------------------------------------------------
# What a run ran on: run.sh ends with `python -m knnlm_tools.cpu STEP SECONDS ...`

def describe():
    """This machine in one line: the CPU, its vector and bfloat16 instructions, cores, torch."""
    name = cpuinfo("model name") or "unknown CPU"
    if cpuinfo("cpu family") and cpuinfo("model"):  # the generation: e.g. AMD's family 25 is Zen 3 and 4, 26 Zen 5
        name += f" (family {cpuinfo('cpu family')}, model {cpuinfo('model')})"
    flags = cpu_flags()
    features = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    mkl = f"; MKL's path: {mkl_path()}" if torch.backends.mkl.is_available() else ""
    level = faiss_level()
    faiss = f"; FAISS's: {level}" if level else ""
    return (f"{name}, {os.cpu_count()} cores, {', '.join(features) or 'no AVX2'} (torch uses "
            f"{torch.backends.cpu.get_cpu_capability()}; native bfloat16: {'yes' if native_bfloat16() else 'no'}"
            f"{mkl}{faiss}), torch {torch.__version__}")


def faiss_level():
    """The vector instructions FAISS searches with ("AVX512", "AVX2"; FAISS_SIMD_LEVEL caps them); None
    without FAISS, or with one too old to say."""
    try:
        import faiss
        return faiss.SIMDConfig.get_level_name()
    except (ImportError, AttributeError):
        return None


if __name__ == "__main__":
    import sys
    steps = [step.rsplit(" ", 1) for step in sys.argv[1:]]
    for name, seconds in steps:
        print(f"{name:10s} {int(seconds) // 60:3d} min {int(seconds) % 60:02d} s")
    total = sum(int(seconds) for _, seconds in steps)
    print(f"{'total':10s} {total // 60:3d} min {total % 60:02d} s")
    print(time.strftime("%Y-%m-%d") + " on " + describe())
