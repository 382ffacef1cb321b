"""
Benchmark of the FAISS IVF-PQ index (knnlm.py, section 5) against exact search.

1. Synthetic datastores of clustered keys, N in {0.5 M, 2 M, 8 M}, d = 512 (8 M keys
   are 16 GB as float32, 8 GB as the float16 on disk): build time, index size, peak
   resident memory of building and of searching (each in a process of its own), and
   queries/s and recall vs exact search at nprobe in {8, 32, 128}, recompute on.
2. The same on the real WikiText-103-small datastore, queried with the model's keys
   for the first tokens of the test split.
3. End to end on WikiText-103-small test: exact vs IVF-PQ vs IVF-PQ + recompute (the
   paper's section 5), at the λ and temperature of results/wikitext-103-small.json;
   written there under "backends".

    python -m bench.index --data ../shared/data/wikitext-103-small

Writes bench/results/index.json and index.md. The paper's 8-bit PQ64 against the default:

    python -m bench.index --sizes --no-end-to-end --factories IVF2048,PQ64 IVF2048,PQ128x4fs --out index-pq64
 recall@1024: the share of the exact
1024 nearest keys among the 1024 found; recall@16: of the exact 16 nearest among
the first 16 found (after re-ranking).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import faiss
import numpy as np
import torch

import knnlm
from knnlm_tools import files, corpora, checkpoints, manifests, search, faiss_index, datastores

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
K = 1024


def max_rss():
    """This process's peak resident memory in bytes. Not getrusage's ru_maxrss: Linux carries
    that over from the parent through fork and exec, so a child would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def make_synthetic(path, n, d, seed=0, batch=1 << 16):
    """A datastore of n clustered float16 keys (topics, subtopics, noise), written batch by batch."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    g = torch.Generator().manual_seed(seed)
    topics = torch.randn(1000, d, generator=g) * 2
    subtopics = topics.repeat_interleave(20, 0) + torch.randn(20000, d, generator=g)
    keys = datastores.open_npy(os.path.join(path, "keys.npy"), "w+", np.float16, (n, d))
    for start in range(0, n, batch):
        rows = min(batch, n - start)
        chunk = subtopics[torch.randint(len(subtopics), (rows,), generator=g)] + torch.randn(rows, d, generator=g) * 0.7
        keys[start:start + rows] = chunk.half().numpy()
        keys.flush()
        files.release_pages(keys)
    del keys
    np.save(os.path.join(path, "vals.npy"), np.zeros(n, np.int64))
    manifests.Manifest(count=n, dim=d, key_dtype="float16", key_type="ffn_in_ln", model_fingerprint=f"synthetic-{seed}",
                       vocab_fingerprint="synthetic", vocab_size=1, min_context=0, block_size=0,
                       source={"synthetic": n}).write(path, progress=True)
    torch.save(subtopics[torch.randint(len(subtopics), (1024,), generator=g)] + torch.randn(1024, d, generator=g) * 0.7,
               os.path.join(path, "queries.pt"))


def child(args):
    """--phase build|search in a process of its own, so that its peak memory is its own."""
    datastore = datastores.DiskDatastore(args.store)
    if args.phase == "build":
        start = time.time()
        plan = faiss_index.build_index(datastore, factory=args.factory, progress=False)
        print(json.dumps({"factory": plan["factory"], "train_size": plan["train_size"],
                          "build_seconds": time.time() - start,
                          "index_bytes": os.path.getsize(os.path.join(args.store, "index.faiss")),
                          "build_max_rss": max_rss()}))
        return
    queries, truth = torch.load(args.queries), torch.load(args.truth)
    out = []
    for nprobe in args.nprobe:
        index = datastore.load_index(nprobe, recompute=True)
        index.search(queries[:64], K)  # warm up
        start = time.time()
        _, ids = index.search(queries, K)
        seconds = time.time() - start
        out.append({"nprobe": nprobe, "qps": len(queries) / seconds,
                    "recall@1024": overlap(ids, truth), "recall@16": overlap(ids[:, :16], truth[:, :16])})
    print(json.dumps({"search": out, "search_max_rss": max_rss()}))


def overlap(found, exact):
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


def run_child(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "bench.index", *map(str, args)], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        sys.exit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_store(name, store, queries, nprobes, scratch, factory=None):
    """Build the index and search it in child processes; exact search here gives the truth."""
    datastore = datastores.DiskDatastore(store)
    query_file, truth_file = os.path.join(scratch, f"{name}-queries.pt"), os.path.join(scratch, f"{name}-truth.pt")
    torch.save(queries, query_file)
    datastore.use(exact_backend(datastore, queries.device), queries.device, K)
    start = time.time()
    _, truth = datastore.search(queries, K)
    exact_qps = len(queries) / (time.time() - start)
    torch.save(truth, truth_file)
    for f in os.listdir(store):
        if f.startswith("index."):
            os.remove(os.path.join(store, f))
    record = {"data": name, "N": len(datastore), "d": datastore.meta.dim, "exact_qps": exact_qps}
    record.update(run_child("--phase", "build", "--store", store, *(["--factory", factory] if factory else [])))
    record.update(run_child("--phase", "search", "--store", store, "--queries", query_file, "--truth", truth_file,
                            "--nprobe", *nprobes))
    print(json.dumps(record), flush=True)
    return record


def exact_backend(datastore, device):
    """Exact search ("auto" among the exact backends: the kernel when built, else PyTorch), however many keys
    (datastore.use("auto") would take the FAISS index of a datastore beyond search.EXACT_MAX_KEYS keys)."""
    return search.search_backend("auto", device, datastore.keys.device, K)


def wikitext_queries(model, tokens, key_type, n=1024):
    """The model's keys for the first n scored tokens of a split: real kNN-LM queries."""
    keys = []
    with torch.no_grad():
        for x, _, scored in knnlm.sliding_batches(tokens, model.cfg.block_size, None, 16):
            keys.append(model(x, key_type=key_type)[1][scored])
            if sum(map(len, keys)) >= n:
                break
    return torch.cat(keys)[:n].float()


def end_to_end(model, vocab, data_dir, datastore, results_path):
    """Test perplexity of kNN-LM with each search, at the tuned λ and temperature of the results file,
    written into it (its writer's lock held) with what it was measured with."""
    with files.writing(results_path):
        return measure_backends(model, vocab, data_dir, datastore, results_path)


def measure_backends(model, vocab, data_dir, datastore, results_path):
    results = files.read_json(results_path, {"lambda": (int, float), "temperature": (int, float),
                                                 "min_context": int})
    tokens = vocab.encode_file(knnlm.split_path(data_dir, "test"))
    device = next(model.parameters()).device
    rows = {}
    for name, backend, recompute in (("exact", exact_backend(datastore, device), None), ("IVF-PQ", "faiss", False),
                                     ("IVF-PQ + recompute", "faiss", True)):
        datastore.use(backend, device, K, nprobe=32, recompute=bool(recompute))
        start = time.time()
        cache = knnlm.score_split(model, tokens, datastore, K, results["min_context"], desc=name)
        ppl = knnlm.perplexity(knnlm.knnlm_log_probs(cache, results["lambda"], results["temperature"]))
        rows[name] = {"test_ppl": ppl, "seconds": round(time.time() - start, 1),
                      "queries_per_second": round(len(cache["targets"]) / cache["search_seconds"], 1),
                      "search": "exact" if recompute is None else f"{datastore.index.meta['factory']}, nprobe 32"}
        print(name, rows[name], flush=True)
        del cache
    results["backends"] = {**rows, "setting": f"k={K}, λ={results['lambda']}, T={results['temperature']}, test split, "
                                              "command: python -m bench.index",
                           "measured_with": datastores.measured_with(checkpoints.fingerprint(model, vocab), datastore, K,
                                                                    results["lambda"], results["temperature"],
                                                                    results["min_context"])}
    files.write_json(results, results_path)
    return rows


def markdown(records, rows, machine):
    lines = [f"Measured on {machine}.", "",
             "| data | N | d | index | build s | index MB | build peak RSS GB | search peak RSS GB | nprobe "
             "| queries/s | vs exact | recall@1024 | recall@16 |", "|" + "---|" * 13]
    for r in records:
        for s in r["search"]:
            lines.append(f"| {r['data']} | {r['N'] / 1e6:.1f} M | {r['d']} | {r['factory']} | {r['build_seconds']:.0f} "
                         f"| {r['index_bytes'] / 1e6:.0f} | {r['build_max_rss'] / 1e9:.2f} | "
                         f"{r['search_max_rss'] / 1e9:.2f} | {s['nprobe']} | {s['qps']:,.0f} | "
                         f"{s['qps'] / r['exact_qps']:.1f}x | {s['recall@1024']:.3f} | {s['recall@16']:.3f} |")
    if rows:
        lines += ["", "End to end, WikiText-103-small test (k=1024, tuned λ and T):", "",
                  "| search | test ppl | seconds (LM + search) | search queries/s |", "|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} ({r['search']}) | {r['test_ppl']:.2f} | {r['seconds']:.0f} | "
                         f"{r['queries_per_second']:,.0f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/wikitext-103-small", help="WikiText directory")
    parser.add_argument("--checkpoint", default="runs/model.pt")
    parser.add_argument("--datastore", default="runs/datastore", help="the WikiText-103-small datastore")
    parser.add_argument("--results", default="results/wikitext-103-small.json")
    parser.add_argument("--sizes", type=int, nargs="*", default=[500_000, 2_000_000, 8_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--work", default="/tmp/knnlm-bench-index", help="where the synthetic datastores go")
    parser.add_argument("--no-end-to-end", action="store_true")
    parser.add_argument("--factories", nargs="+", default=[None],
                        help="index factories to compare on WikiText-103-small (default: the default factory; "
                             "the last one stays in the datastore)")
    parser.add_argument("--out", default="index", help="results file name under bench/results/ (default: %(default)s)")
    parser.add_argument("--factory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["build", "search"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--queries", help=argparse.SUPPRESS)
    parser.add_argument("--truth", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return child(args)

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, torch {torch.__version__}, "
               f"faiss {faiss.__version__}")
    records = []
    os.makedirs(args.work, exist_ok=True)
    for n in args.sizes:
        store = os.path.join(args.work, f"synthetic-{n}x{args.dim}")
        make_synthetic(store, n, args.dim)
        records.append(bench_store("synthetic", store, torch.load(os.path.join(store, "queries.pt")), args.nprobe,
                                   args.work))
    model, vocab, _ = checkpoints.load_checkpoint(args.checkpoint)
    data_dir = corpora.resolve_corpus(args.data)
    datastore = datastores.DiskDatastore(args.datastore)
    datastore.check_model(model, vocab)
    queries = wikitext_queries(model, vocab.encode_file(knnlm.split_path(data_dir, "test")), datastore.key_type)
    for factory in args.factories:  # each rebuilds the datastore's index
        records.append(bench_store("WikiText-103-small", args.datastore, queries, args.nprobe, args.work, factory))
    rows = {} if args.no_end_to_end else end_to_end(model, vocab, data_dir, datastores.DiskDatastore(args.datastore),
                                                      args.results)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    files.write_json({"machine": machine, "command": "python -m bench.index " + " ".join(sys.argv[1:]),
                      "records": records, "end_to_end": rows}, os.path.join(HERE, "results", f"{args.out}.json"))
    with open(os.path.join(HERE, "results", f"{args.out}.md"), "w") as f:
        f.write(markdown(records, rows, machine))
    print(markdown(records, rows, machine))


if __name__ == "__main__":
    main()
