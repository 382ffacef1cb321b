#!/usr/bin/env bash
# The main job on the AVX2 machine's code paths, on a CPU with AVX-512: `bash run.sh DATA` with
# every library held at AVX2, as it is on an AVX2 CPU. torch's own kernels (ATEN_CPU_CAPABILITY, and
# --precision auto then picks float32), MKL's (MKL_ENABLE_INSTRUCTIONS), oneDNN's
# (ONEDNN_MAX_CPU_ISA: torch runs GELU there; bench/avx2_libraries.sh), FAISS's (FAISS_SIMD_LEVEL) and the OpenBLAS of faiss-cpu's k-means
# (OPENBLAS_CORETYPE); csrc/'s kernels take AVX2 at most anyway. On an EPYC of family 25 it
# trained the AVX2 machine's model bit for bit (docs/speed.md); the speed is this CPU's, not the
# AVX2 machine's. The times file's last line names what each library ran.
#
#   bash bench/avx2_paths.sh [DATA_DIR]
#   bash bench/avx2_paths.sh -- COMMAND...    any other command on those paths, e.g. the tests:
#   bash bench/avx2_paths.sh -- python -m pytest -n auto
set -euo pipefail
export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
    FAISS_SIMD_LEVEL=AVX2 OPENBLAS_CORETYPE=Haswell
if [ "${1:-}" = "--" ]; then shift; exec "$@"; fi
exec bash "$(dirname "$0")/../run.sh" "$@"
