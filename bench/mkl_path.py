"""
MKL's code path on an AMD CPU: the float32 matrix products of torch's CPU wheel go through
Intel's MKL, which picks its AVX2 kernels only where it believes the CPU is Intel's, and on an
AMD CPU runs a generic path (MKL_VERBOSE names it). knnlm_mkl_avx2 (csrc/mkl_avx2.cpp, built by
`pip install --no-build-isolation -e .`) defines MKL's own `mkl_serv_intel_cpu_true` (and
`mkl_serv_intel_cpu`) to return 1; loaded first (LD_PRELOAD, as run.sh does on an AMD CPU with
AVX2) it makes MKL take the path it runs on an Intel CPU with the same instructions: AVX2, or
AVX-512 on a CPU that has it. This measures
what that path gives a training step of the main model, each setting in a process of its own,
in turn (A B A B; the step and its process are bench.levers' lever 3, freed memory kept), and which
path MKL says it took.

    python -m bench.mkl_path [--out mkl_path-avx512]

Writes bench/results/mkl_path.json and mkl_path.md (or --out's name). The other path computes other
last bits: the same recipe trains another model.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

from bench import write_results
from knnlm_tools import cpu

HERE = os.path.dirname(os.path.abspath(__file__))


def mkl_path(env):
    """The CPU path MKL reports for one product, from its MKL_VERBOSE banner."""
    out = subprocess.run([sys.executable, "-c", "import torch; a = torch.ones(64, 64); a @ a"],
                         env={**env, "MKL_VERBOSE": "1"}, capture_output=True, text=True, check=True)
    banner = next((line for line in out.stdout.splitlines() if "for Intel(R) 64 architecture" in line), "")
    return banner.split("for Intel(R) 64 architecture", 1)[-1].split(", Lnx")[0].strip() or "not reported"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4, help="processes of each setting, in turn")
    parser.add_argument("--steps", type=int, default=6, help="training steps timed per process")
    parser.add_argument("--vocab-size", type=int, default=13759, help="the main model's on WikiText-103-small")
    parser.add_argument("--precision", choices=cpu.PRECISIONS[1:], default="float32",
                        help="of the training step (bfloat16: autocast, as train.py on a CPU with native bfloat16)")
    parser.add_argument("--out", default="mkl_path", help="results file name under bench/results/")
    args = parser.parse_args()
    spec = importlib.util.find_spec(cpu.MKL_AVX2)
    if spec is None:
        parser.error(f"{cpu.MKL_AVX2} is not built: pip install --no-build-isolation -e .")
    intel = "Intel's path (LD_PRELOAD)"
    envs = {"MKL's choice": dict(os.environ), intel: {**os.environ, "LD_PRELOAD": spec.origin}}
    paths = {name: mkl_path(env) for name, env in envs.items()}
    runs = {name: [] for name in envs}
    for _ in range(args.pairs):
        for name, env in envs.items():
            out = subprocess.run([sys.executable, "-m", "bench.levers", "--phase", "memory", "--kept", "1",  # its step
                                  "--steps", str(args.steps), "--vocab-size", str(args.vocab_size),
                                  "--precision", args.precision], env=env,
                                 capture_output=True, text=True, check=True, cwd=os.path.dirname(HERE))
            runs[name].append(json.loads(out.stdout.splitlines()[-1])["seconds_per_step"])
            print(name, f"{runs[name][-1]:.3f} s/step", flush=True)
    best = {name: min(r) for name, r in runs.items()}
    record = {"command": " ".join(["python -m bench.mkl_path", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
              "machine": cpu.describe(), "precision": args.precision, "mkl_path": paths, "seconds_per_step": runs,
              "best": best, "speedup": best["MKL's choice"] / best[intel]}
    lines = [f"`{record['command']}` on {record['machine']}, {record['date']}.", "",
             f"A training step of the main model (8 windows of 256, {args.precision}), best of {args.pairs} processes "
             "each, in turn:", "",
             "| setting | MKL's path | s/step (each process) | best |", "|---|---|---|---|"]
    lines += [f"| {name} | {paths[name]} | {', '.join(f'{s:.3f}' for s in runs[name])} | {best[name]:.3f} |"
              for name in envs]
    lines += ["", f"Intel's path ({paths[intel]}): {record['speedup']:.2f}x."]
    write_results(args.out, record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
