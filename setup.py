"""Builds knnlm_ext, the C++ search kernels of csrc/, against the installed torch:

    pip install --no-build-isolation -e .

Importing knnlm_ext registers the ops torch.ops.knnlm.topk_l2 and torch.ops.knnlm.rerank_l2.
Beside it, knnlm_mkl_avx2 (csrc/mkl_avx2.cpp), a library that is never imported: run.sh loads
it first on an AMD CPU with AVX2 (LD_PRELOAD), and MKL then runs its AVX2 kernels there (its
AVX-512 ones where the CPU has AVX-512).

The kernels run their loops on OpenMP threads; a compiler that does not take -fopenmp (Apple's
clang) builds them to run on one thread, with the same results.

The CUDA kernel is built too when torch is a CUDA build and a CUDA toolkit is found;
KNNLM_CUDA=1 forces it, KNNLM_CUDA=0 skips it.
"""
import os
import shlex
import subprocess
import tempfile

import torch
from setuptools import Extension, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, get_cxx_compiler


def compiler_takes_openmp():
    """Whether the C++ compiler torch builds with compiles and links -fopenmp (Apple's clang does not)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "omp.cpp")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint threads() { return omp_get_max_threads(); }\n")
        command = [*shlex.split(get_cxx_compiler()), "-fopenmp", "-fPIC", "-shared", source, "-o", os.path.join(tmp, "omp.so")]
        try:
            return subprocess.run(command, capture_output=True).returncode == 0
        except OSError:
            return False

want_cuda = os.environ.get("KNNLM_CUDA", "auto")
if want_cuda not in ("auto", "0", "1"):
    raise SystemExit(f"KNNLM_CUDA must be auto, 0 or 1, got {want_cuda!r}")
with_cuda = want_cuda == "1" or (want_cuda == "auto" and torch.version.cuda is not None and CUDA_HOME is not None)

sources = ["csrc/topk_l2.cpp", "csrc/rerank_l2.cpp", "csrc/bernoulli.cpp"]
# at::parallel_for runs its loop on OpenMP threads only when compiled with it; without (Apple's clang),
# the kernels run on one thread and give the same results
openmp = ["-fopenmp"] if compiler_takes_openmp() else []
if not openmp:
    print(f"knnlm: {get_cxx_compiler()} does not take -fopenmp: the C++ kernels will run on one thread")
cxx = ["-O3", "-g0", *openmp]  # -g0: no debug info for the torch headers (Python's own flags ask for it)
if with_cuda:
    ext = CUDAExtension("knnlm_ext", [*sources, "csrc/topk_l2_cuda.cu"],
                        define_macros=[("WITH_CUDA", None)],
                        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=openmp)
else:
    ext = CppExtension("knnlm_ext", sources,
                       extra_compile_args={"cxx": cxx}, extra_link_args=openmp)

mkl_avx2 = Extension("knnlm_mkl_avx2", ["csrc/mkl_avx2.cpp"], extra_compile_args=["-O2", "-g0"])

setup(
    name="knnlm",
    version="0.1.0",
    description="kNN-LM (Khandelwal et al., ICLR 2020): a minimal, readable reference implementation",
    py_modules=["knnlm"],
    packages=["knnlm_tools"],
    ext_modules=[ext, mkl_avx2],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
)
