"""
Exact top-k L2 search on a GPU, on kNN-LM shapes, in one process: queries per second of
- the CUDA kernel (torch.ops.knnlm.topk_l2, csrc/topk_l2_cuda.cu: cuBLAS's float16 GEMM on the
  tensor cores for split float32 queries, float32 accumulation, our own selection),
- PyTorch on the same GPU (knnlm.topk_l2: chunks of keys in float32, torch.addmm + torch.topk),
- faiss-cpu on the host's cores (IndexFlatL2 over the keys in float32), on the smaller shapes only;
each with its useful arithmetic (2 B N d) as a fraction of the GPU's float16 matmul rate measured
here, and the neighbours each finds against a float64 brute force on the first queries: how many of
the float64 k nearest it returns (recall) and its largest distance error.

    python -m bench.gpu_search                    # the grid below, a few minutes on an H200
    python -m bench.gpu_search --grid tiny        # a rehearsal, on the CPU too

Keys are float16 (as datastores hold them), in clusters like a datastore's; queries are keys
with noise. Writes bench/results/gpu_search.json and .md (or --name's).
"""
import argparse
import os
import sys
import time

import faiss
import torch

import knnlm
from bench import write_results
from knnlm_tools import search

GRIDS = {  # N, d, B, k: the grid, trimmed to fit one device run (faiss: N = 1M and B <= 1024 only)
    "full": {"N": [1_000_000, 10_000_000], "d": [256, 1024], "B": [64, 1024, 8192], "k": [16, 1024]},
    "tiny": {"N": [5_000, 20_000], "d": [24, 64], "B": [8, 40], "k": [7, 300]},
}
FAISS_MAX = {"full": (1_000_000, 1024), "tiny": (20_000, 40)}  # largest N and B faiss-cpu is timed on
CHECKED_QUERIES = 32  # against float64


def timed(fn, device, repeats, slow=2.0):
    """Median seconds of fn() after one warm-up, by CUDA events on a GPU; one timed call only when the
    warm-up took over `slow` seconds."""
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    if time.perf_counter() - start > slow:
        repeats = 1
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def matmul_rate(device, dtype, n=8192):
    """FLOP/s of an n^3 product on random data: the ceiling the searches' arithmetic is held against."""
    n = n if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, device, 10)


def make_keys(N, d, device, seed, clusters=1024):
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(clusters, d, device=device, generator=g)
    keys = torch.empty(N, d, device=device, dtype=torch.float16)
    for i in range(0, N, 1 << 20):  # in pieces: no float32 copy of all the keys at once
        n = min(1 << 20, N - i)
        which = torch.randint(clusters, (n,), device=device, generator=g)
        keys[i:i + n] = centres[which] + 0.5 * torch.randn(n, d, device=device, generator=g)
    return keys


def float64_neighbours(queries, keys, k, chunk=1 << 20):
    """The k nearest by float64 distances (ties to the smaller id): [Q, k] distances and ids."""
    q = queries.double()
    best_d = torch.empty(len(q), 0, dtype=torch.float64, device=q.device)
    best_i = torch.empty(len(q), 0, dtype=torch.long, device=q.device)
    for i in range(0, len(keys), chunk):
        part = keys[i:i + chunk].double()
        dists = (q.pow(2).sum(1, keepdim=True) - 2 * q @ part.T + part.pow(2).sum(1)).clamp(min=0)
        best_d, best_i = torch.cat([best_d, dists], 1), torch.cat([best_i, torch.arange(i, i + len(part),
                                                                                       device=q.device).expand_as(dists)], 1)
        best_d, pos = best_d.topk(min(k, best_d.shape[1]), dim=1, largest=False)
        best_i = best_i.gather(1, pos)
    return best_d, best_i


def accuracy(found, ref, keys, queries):
    """Recall of the float64 k nearest, and the largest |distance - float64 distance of that key|
    relative to the k-th float64 distance."""
    dists, ids = (t[:len(ref[0])].cpu() for t in found)
    ref_d, ref_i = (t.cpu() for t in ref)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, ref_i)) / ref_i.numel()
    exact = ((queries[:len(ids)].double()[:, None, :].cpu() - keys[ids.flatten()].double().cpu().view(*ids.shape, -1))
             ** 2).sum(-1)
    error = ((dists.double() - exact).abs().max(1).values / ref_d[:, -1].clamp(min=1e-12)).max().item()
    return {"recall": recall, "max_relative_distance_error": error}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method and shape; the median counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="faiss-cpu's")
    parser.add_argument("--seconds", type=float, default=None,
                        help="start no new shape after this many seconds (the rows so far are written)")
    parser.add_argument("--name", default=None, help="results file name (default: gpu_search, or gpu_search-tiny)")
    args = parser.parse_args()
    device, began = torch.device(args.device), time.perf_counter()
    if search.knnlm_ext is None or (device.type == "cuda" and not search.knnlm_ext.cuda):
        sys.exit("knnlm_ext is not built for this device: KNNLM_CUDA=1 python setup.py build_ext --inplace")
    faiss.omp_set_num_threads(args.threads)
    grid = GRIDS[args.grid]
    name = args.name or ("gpu_search" if args.grid == "full" else f"gpu_search-{args.grid}")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (rehearsal)"
    rates = {"float16": matmul_rate(device, torch.float16 if device.type == "cuda" else torch.float32),
             "float32": matmul_rate(device, torch.float32)}
    record = {"command": " ".join(["python -m bench.gpu_search", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{machine}; host {os.cpu_count()} cores; torch {torch.__version__}",
              "matmul_flops": rates, "grid": grid, "rows": []}
    print(f"{machine}: float16 matmul {rates['float16'] / 1e12:.1f} TFLOP/s, float32 {rates['float32'] / 1e12:.1f}",
          flush=True)
    for N in grid["N"]:
        for d in grid["d"]:
            keys = make_keys(N, d, device, seed=N + d)
            norms = knnlm.squared_norms(keys)
            host_keys = keys.float().cpu().numpy() if N <= FAISS_MAX[args.grid][0] else None
            if host_keys is not None:
                index = faiss.IndexFlatL2(d)
                index.add(host_keys)
            for B in grid["B"]:
                g = torch.Generator(device=device).manual_seed(B)
                picks = torch.randint(N, (B,), device=device, generator=g)
                queries = keys[picks].float() + 0.1 * torch.randn(B, d, device=device, generator=g)
                for k in grid["k"]:
                    if args.seconds is not None and time.perf_counter() - began > args.seconds:
                        record["stopped"] = f"after {args.seconds:.0f} s, before N={N:,} d={d} B={B} k={k}"
                        print(record["stopped"], flush=True)
                        return write_results(name, record, markdown(record))
                    row = {"N": N, "d": d, "B": B, "k": k}
                    ref = float64_neighbours(queries[:CHECKED_QUERIES], keys, k)
                    methods = {"kernel": lambda: torch.ops.knnlm.topk_l2(queries, keys, k, norms),
                               "torch": lambda: knnlm.topk_l2(queries, keys, k, norms)}
                    if host_keys is not None and B <= FAISS_MAX[args.grid][1]:
                        host_queries = queries.cpu().numpy()
                        methods["faiss-cpu"] = lambda: index.search(host_queries, k)
                    for method, fn in methods.items():
                        seconds = timed(fn, device if method != "faiss-cpu" else torch.device("cpu"), args.repeats)
                        found = fn()
                        if method == "faiss-cpu":
                            found = (torch.from_numpy(found[0]), torch.from_numpy(found[1]))
                        row[method] = {"seconds": seconds, "queries_per_s": B / seconds,
                                       "fraction_of_float16_matmul": 2 * B * N * d / seconds / rates["float16"],
                                       **accuracy(found, ref, keys, queries)}
                    row["kernel_vs_torch"] = row["torch"]["seconds"] / row["kernel"]["seconds"]
                    record["rows"].append(row)
                    print(row, flush=True)
            del keys, norms, host_keys
    write_results(name, record, markdown(record))


def markdown(r):
    lines = [f"`{r['command']}` on {r['machine']}, {r['date']}.", "",
             f"Measured matmul rate: float16 {r['matmul_flops']['float16'] / 1e12:.1f} TFLOP/s, float32 "
             f"{r['matmul_flops']['float32'] / 1e12:.1f} TFLOP/s. Queries per second (median of the timed calls); "
             "in brackets the useful arithmetic, 2 B N d, as a fraction of the float16 rate; recall: of the float64 "
             f"k nearest of the first {CHECKED_QUERIES} queries, the share returned.", "",
             "| N | d | B | k | kernel | PyTorch (GPU) | faiss-cpu | kernel / PyTorch | recall: kernel, PyTorch |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in r["rows"]:
        cell = lambda m: (f"{row[m]['queries_per_s']:,.0f} ({row[m]['fraction_of_float16_matmul']:.1%})"
                          if m in row else "—")
        lines.append(f"| {row['N']:,} | {row['d']} | {row['B']} | {row['k']} | {cell('kernel')} | {cell('torch')} | "
                     f"{cell('faiss-cpu')} | {row['kernel_vs_torch']:.2f}x | "
                     f"{row['kernel']['recall']:.4f}, {row['torch']['recall']:.4f} |")
    if "stopped" in r:
        lines += ["", f"The grid was cut short: stopped {r['stopped']} (--seconds)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
