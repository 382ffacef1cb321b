// knnlm_mkl_avx2: MKL's AVX2 (or AVX-512) kernels on an AMD CPU. torch's CPU wheel multiplies float32
// matrices with Intel's MKL, which picks its AVX2 kernels only on a CPU it takes for Intel's
// (it asks these two functions of its own) and on any other runs a generic path. Loaded before
// MKL (LD_PRELOAD; run.sh does it on an AMD CPU with AVX2), these definitions answer yes: MKL
// then takes the path it takes on an Intel CPU with the same instructions: AVX2, or AVX-512 on
// a CPU that has it. bench/mkl_path.py measures it.
extern "C" int mkl_serv_intel_cpu_true() { return 1; }
extern "C" int mkl_serv_intel_cpu() { return 1; }
