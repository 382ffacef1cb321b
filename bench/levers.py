"""
Each lever of the main job's speed, measured in one process as a ratio against the setting
it replaces, on this project's model and WikiText-103-small:

1. search: kNN-LM's test perplexity and search time with exact search (the C++ kernel, else
   PyTorch) and with the paper's FAISS IVF-PQ re-ranked by exact distances, from one LM pass
   over the test split (its queries kept), at the λ and temperature of the results file.
2. the output layer: the datastore's pass computing the keys alone vs also the logits it never
   uses; the evaluation's pass with the logits of each window's scored half vs all of them.
3. memory: a training step with glibc's default (freed big blocks go back to the kernel, and
   their pages fault in again) vs cpu.reuse_freed_memory(), each in a process of its own.
4. precision: a training step and a forward pass in bfloat16 autocast vs float32.
5. threads: a training step of the main model and of the quick run's, alone and beside one busy
   process, with 2 threads, 1 thread, and cpu.Threads()'s choice, each against 2 threads alone.
6. the last block: the datastore's and the evaluation's passes with the last block's MLP and the
   final LayerNorm at every position vs only where a logit is asked for (none for the datastore).
7. the optimizer: a training step of the main model, and its update alone, with AdamW one op at a
   time vs fused into one kernel.
8. the search's threads: exact search in PyTorch, as the quick run's (512 of lever 1's datastore's
   keys among all of them), alone and beside one busy process, on 1 thread (cpu.Threads()'s choice
   beside it, as the scripts searched before cpu.every_core), on every core (cpu.every_core, now) and
   on twice as many threads as cores (not taken: a larger share of the CPUs, taken from the neighbour).

    bash run.sh ../shared/data/wikitext-103-small   # the model, the datastore and its index
    python -m bench.levers --data ../shared/data/wikitext-103-small

Writes bench/results/levers.json and levers.md. Lever 1 searches every test token twice
(--search-tokens for fewer); the others time a few steps, interleaved (A B A B) so that the
machine's drift falls on both sides of a ratio. --only runs some of them (to levers-N-M.json):

    python -m bench.levers --only 6 7
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import knnlm
from bench import best_in_turn, in_turn, write_results
from bench.training import batch_of, training_step
from experiments import common
from knnlm_tools import checkpoints, corpora, cpu, datastores, files, search

HERE = os.path.dirname(os.path.abspath(__file__))
K = 1024


# -----------------------------------------------------------------------------
# 1. Search: exact vs IVF-PQ + re-ranking, the same queries

def search_lever(model, datastore, tokens, results, batch=1024):
    lmbda, temperature, min_context = results["lambda"], results["temperature"], results["min_context"]
    precision = results.get("precision", {}).get("evaluation", "float32")  # as the results file's evaluation ran
    with cpu.autocast(precision, "cpu"):
        cache = knnlm.score_split(model, tokens, min_context=min_context, keep_queries=True, desc="LM pass")
    rows = {}
    exact = "ext" if search.kernel_built() else "torch"
    for name, backend in (("exact", exact), ("IVF-PQ + recompute", "faiss")):
        datastore.use(backend, "cpu", K, recompute=True)
        dists, vals, seconds = common.search_all(datastore, cache["queries"], K, batch, desc=name)
        searched = {**cache, "dists": dists, "neighbour_vals": vals}
        ppl = knnlm.perplexity(knnlm.knnlm_log_probs(searched, lmbda, temperature))
        rows[name] = {"backend": backend, "test_ppl": ppl, "search_seconds": round(seconds, 1),
                      "queries_per_second": round(len(cache["queries"]) / seconds)}
        print(name, rows[name], flush=True)
    exact, approx = rows["exact"], rows["IVF-PQ + recompute"]
    return {"tokens": len(cache["targets"]), "lm_ppl": knnlm.perplexity(cache["log_p_lm"]), "precision": precision,
            "lambda": lmbda, "temperature": temperature, "index": datastore.index.meta["factory"],
            "nprobe": datastore.index.nprobe,
            "rows": rows, "ppl_change_percent": 100 * (approx["test_ppl"] / exact["test_ppl"] - 1),
            "speedup": exact["search_seconds"] / approx["search_seconds"]}


# -----------------------------------------------------------------------------
# 2. The output layer: only where it is needed

def windows_and_masks(model, tokens):
    """16 windows of the text, with the evaluation's mask of them (a window past the first: its second half
    is scored) and the datastore's (no logits)."""
    x, _, _ = next(knnlm.sliding_batches(tokens, model.cfg.block_size, None, 16))
    scored = torch.zeros_like(x, dtype=torch.bool)
    scored[:, model.cfg.block_size // 2:] = True
    return x, scored, torch.zeros_like(scored)


def output_layer_lever(model, tokens, repeats):
    x, scored, none = windows_and_masks(model, tokens)
    with torch.no_grad():
        datastore = best_in_turn({"keys and all logits": lambda: model(x, key_type="ffn_in_ln"),
                                  "keys alone": lambda: model(x, key_type="ffn_in_ln", at=none)}, repeats)
        evaluation = best_in_turn({
            "all logits": lambda: F.log_softmax(model(x, key_type="ffn_in_ln")[0][scored], -1),
            "scored logits": lambda: F.log_softmax(model(x, key_type="ffn_in_ln", at=scored)[0], -1)}, repeats)
    return {"datastore pass": {**datastore, "speedup": datastore["keys and all logits"] / datastore["keys alone"]},
            "evaluation pass": {**evaluation, "speedup": evaluation["all logits"] / evaluation["scored logits"]},
            "windows": len(x)}


# -----------------------------------------------------------------------------
# 3. Freed memory kept: a training step without page faults

def memory_lever(cfg, pairs, steps):
    """Seconds and page faults per training step of the main model, with glibc's default and with
    cpu.reuse_freed_memory(), each in a process of its own (the setting holds for its life), in turn."""
    rows = {"glibc's default": [], "reuse_freed_memory()": []}
    for _ in range(pairs):
        for name, kept in (("glibc's default", "0"), ("reuse_freed_memory()", "1")):
            out = subprocess.run([sys.executable, "-m", "bench.levers", "--phase", "memory", "--kept", kept,
                                  "--vocab-size", str(cfg.vocab_size), "--steps", str(steps)],
                                 capture_output=True, text=True, check=True, cwd=os.path.dirname(HERE))
            rows[name].append(json.loads(out.stdout.splitlines()[-1]))
    best = {name: min(runs, key=lambda r: r["seconds_per_step"]) for name, runs in rows.items()}
    return {**best, "speedup": best["glibc's default"]["seconds_per_step"] / best["reuse_freed_memory()"]["seconds_per_step"],
            "pairs": pairs}


def memory_child(args):
    if args.kept:
        cpu.reuse_freed_memory()
    torch.manual_seed(0)
    cfg = knnlm.ModelConfig(vocab_size=args.vocab_size)  # the main model's shape: 4 layers, 256 wide, 256 tokens
    model = knnlm.TransformerLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randint(cfg.vocab_size, (2, 8, cfg.block_size))
    training_step(model, x, y, optimizer, args.precision)
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(args.steps):
        training_step(model, x, y, optimizer, args.precision)
    print(json.dumps({"seconds_per_step": (time.perf_counter() - start) / args.steps,
                      "page_faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps}))


# -----------------------------------------------------------------------------
# 4. Precision: bfloat16 autocast vs float32

def precision_lever(cfg, tokens, repeats, windows=2):
    """Few windows: on a CPU without bfloat16 instructions a bfloat16 step is tens of times slower."""
    model = knnlm.TransformerLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch_of(tokens, cfg.block_size, windows)
    train = best_in_turn({p: lambda p=p: training_step(model, x, y, optimizer, p) for p in ("float32", "bfloat16")},
                         repeats)
    model.eval()
    with torch.no_grad():
        forward = best_in_turn({p: lambda p=p: forward_pass(model, x, p) for p in ("float32", "bfloat16")}, repeats)
    return {"training step": {**train, "speedup": train["float32"] / train["bfloat16"]},
            "forward pass": {**forward, "speedup": forward["float32"] / forward["bfloat16"]},
            "windows": windows, "native_bfloat16": cpu.native_bfloat16()}


def forward_pass(model, x, precision):
    with cpu.autocast(precision, "cpu"):
        model(x, key_type="ffn_in_ln")


# -----------------------------------------------------------------------------
# 5. Threads beside a busy neighbour

@contextmanager
def neighbour(busy):
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    time.sleep(0.5 if busy else 0)
    try:
        yield
    finally:
        if process:
            process.kill()
            process.wait()


def threads_lever(configs, tokens, steps):
    """Seconds per training step of each model, under each policy, alone and beside a busy process."""
    most = cpu.MOST_THREADS
    policies = {f"{most} threads": lambda: torch.set_num_threads(most), "1 thread": lambda: torch.set_num_threads(1),
                "cpu.Threads()": lambda: cpu.Threads()}
    rows = {}
    for name, (cfg, windows) in configs.items():
        torch.manual_seed(0)
        model = knnlm.TransformerLM(cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, y = batch_of(tokens, cfg.block_size, windows)
        training_step(model, x, y, optimizer)
        for busy in (False, True):
            with neighbour(busy):
                for policy, set_threads in policies.items():
                    chosen = set_threads()
                    start = time.perf_counter()
                    for _ in range(steps):
                        training_step(model, x, y, optimizer)
                    rows[f"{name}, {'beside a busy process' if busy else 'alone'}, {policy}"] = {
                        "seconds_per_step": (time.perf_counter() - start) / steps,
                        "threads": torch.get_num_threads(), **({"saw_busy_cpus": round(chosen.others, 2)} if chosen else {})}
                    print(policy, "busy" if busy else "alone", rows[f"{name}, {'beside a busy process' if busy else 'alone'}, {policy}"], flush=True)
        baseline = rows[f"{name}, alone, {most} threads"]["seconds_per_step"]
        for key in rows:
            if key.startswith(name + ","):
                rows[key]["vs_alone"] = round(rows[key]["seconds_per_step"] / baseline, 2)
    torch.set_num_threads(most)
    return rows


# -----------------------------------------------------------------------------
# 6. The last block's MLP only where a logit is asked for

def whole_last_block(model, x, at):
    """The forward pass as it was: the last block's MLP and the final LayerNorm at every position, then the
    logits at `at`."""
    taps = {}
    h = model.drop(model.wte(x) + model.wpe(torch.arange(x.shape[1])))
    for block in model.blocks[:-1]:
        h = block(h)
    h = model.ln_f(model.blocks[-1](h, taps))
    return h[at] @ model.wte.weight.T, taps["ffn_in_ln"]


def last_block_lever(model, tokens, repeats):
    x, scored, none = windows_and_masks(model, tokens)
    rows = {}
    with torch.no_grad():
        for name, at in (("datastore pass (no logits)", none), ("evaluation pass (scored half)", scored)):
            logits, keys = model(x, key_type="ffn_in_ln", at=at)
            before_logits, before_keys = whole_last_block(model, x, at)
            assert torch.equal(keys, before_keys) and torch.allclose(logits, before_logits, atol=1e-5)
            best = best_in_turn({"every position": lambda at=at: whole_last_block(model, x, at),
                                 "where needed": lambda at=at: model(x, key_type="ffn_in_ln", at=at)}, repeats)
            rows[name] = {**best, "speedup": best["every position"] / best["where needed"]}
    return {**rows, "windows": len(x)}


# -----------------------------------------------------------------------------
# 7. AdamW's update fused

def fused_adamw_lever(cfg, tokens, repeats, windows=8):
    """A training step of train.py's model and optimizer with AdamW one op at a time (torch's default on the
    CPU) and fused into one kernel, in turn."""
    x, y = batch_of(tokens, cfg.block_size, windows)
    models, optimizers = {}, {}
    for name, fused in (("AdamW, one op at a time", False), ("AdamW, fused", True)):
        torch.manual_seed(0)
        models[name] = model = knnlm.TransformerLM(cfg)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizers[name] = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                              {"params": no_decay, "weight_decay": 0.0}],
                                             lr=1e-4, betas=(0.9, 0.95), fused=fused)
    best = best_in_turn({name: lambda name=name: training_step(models[name], x, y, optimizers[name])
                         for name in models}, repeats)
    updates = best_in_turn({name: optimizer.step for name, optimizer in optimizers.items()},
                           repeats * 10)  # the update alone, on the gradients of the last step
    return {"training step": {**best, "speedup": best["AdamW, one op at a time"] / best["AdamW, fused"]},
            "update": {**updates, "speedup": updates["AdamW, one op at a time"] / updates["AdamW, fused"]},
            "windows": windows}


# -----------------------------------------------------------------------------
# 8. The search's threads beside a busy neighbour

def search_threads_lever(datastore, repeats, queries=512):
    """Seconds per exact search in PyTorch (knnlm.topk_l2, as the quick run searches without the kernel,
    k = 1024) of some of the datastore's own keys among all of them, alone and beside a busy process, on 1
    thread, on every core and on twice as many threads as cores, in turn; with the threads cpu.Threads()
    chooses for the model there. Not random keys: with them two threads measured no faster beside the busy
    process, where with real keys they were; the selection's work depends on the keys."""
    g = torch.Generator().manual_seed(0)
    keys, norms = datastore.keys.clone(), datastore.key_norms  # in memory: no page faults in the timing
    q = keys[torch.randint(len(keys), (queries,), generator=g)].float()
    most, rows = cpu.most_threads(), {}
    policies = {"1 thread": 1, f"{most} threads (every core)": most,
                f"{2 * most} threads (twice the cores, not taken)": 2 * most}
    for busy in (False, True):
        with neighbour(busy):
            cpu.Threads()  # sets torch's threads as the scripts' model runs on them
            model_threads = torch.get_num_threads()
            times = in_turn({name: lambda threads=threads: search_on(threads, q, keys, norms)
                             for name, threads in policies.items()}, repeats)
            for name, t in times.items():
                t, row = sorted(t), f"{'beside a busy process' if busy else 'alone'}, {name}"
                rows[row] = {"best": t[0], "median": t[len(t) // 2], "model_threads": model_threads}
                print(row, rows[row], flush=True)
    torch.set_num_threads(most)
    alone = rows[f"alone, {most} threads (every core)"]["median"]
    for row in rows.values():
        row["vs_alone"] = round(row["median"] / alone, 2)
    return {"rows": rows, "queries": queries, "keys": len(keys), "width": keys.shape[1], "repeats": repeats}


def search_on(threads, queries, keys, norms):
    torch.set_num_threads(threads)
    knnlm.topk_l2(queries, keys, K, norms)


def markdown(r):
    lines = [f"`{r['command']}` on {r['machine']}, {r['date']}."]
    if "search" in r:
        s = r["search"]
        lines += ["", f"1. Search, WikiText-103-small test ({s['tokens']:,} tokens, k = {K}, λ = {s['lambda']}, "
                      f"T = {s['temperature']}; LM {s['lm_ppl']:.2f}, its pass in {s.get('precision', 'float32')}):",
                  "",
                  "| search | test ppl | search s | queries/s |", "|---|---|---|---|"]
        lines += [f"| {name} ({row['backend']}) | {row['test_ppl']:.3f} | {row['search_seconds']} | "
                  f"{row['queries_per_second']:,} |" for name, row in s["rows"].items()]
        lines += ["", f"{s['index']}, nprobe {s['nprobe']}: {s['speedup']:.1f}x faster search, perplexity "
                      f"{s['ppl_change_percent']:+.3f}%."]
    if "output layer" in r:
        lines += ["", f"2. The output layer ({r['output layer']['windows']} windows of 256, best of {r['repeats']}):",
                  "", "| pass | before s | after s | speedup |", "|---|---|---|---|"]
        for name, (before, after) in (("datastore pass", ("keys and all logits", "keys alone")),
                                      ("evaluation pass", ("all logits", "scored logits"))):
            row = r["output layer"][name]
            lines.append(f"| {name}: {after} vs {before} | {row[before]:.3f} | {row[after]:.3f} | {row['speedup']:.2f}x |")
    if "memory" in r:
        m = r["memory"]
        lines += ["", f"3. Freed memory kept, a training step of the main model (best of {m['pairs']} processes each):",
                  "", "| malloc | s/step | page faults/step |", "|---|---|---|"]
        lines += [f"| {name} | {m[name]['seconds_per_step']:.3f} | {m[name]['page_faults_per_step']:,.0f} |"
                  for name in ("glibc's default", "reuse_freed_memory()")]
        lines += ["", f"{m['speedup']:.2f}x faster."]
    if "precision" in r:
        p = r["precision"]
        lines += ["", f"4. bfloat16 autocast vs float32 ({p['windows']} windows of 256; native bfloat16: "
                      f"{'yes' if p['native_bfloat16'] else 'no'}):", "",
                  "| | float32 s | bfloat16 s | bfloat16 speedup |", "|---|---|---|---|"]
        lines += [f"| {name} | {p[name]['float32']:.3f} | {p[name]['bfloat16']:.3f} | {p[name]['speedup']:.2f}x |"
                  for name in ("training step", "forward pass")]
    if "threads" in r:
        lines += ["", "5. Threads: seconds per training step, alone and beside one busy process (`python -c 'while "
                      "True: pass'`), against the default alone:", "",
                  "| model, neighbour, policy | threads | s/step | vs alone |", "|---|---|---|---|"]
        lines += [f"| {name} | {row['threads']} | {row['seconds_per_step']:.3f} | {row['vs_alone']:.2f}x |"
                  for name, row in r["threads"].items()]
    if "last block" in r:
        b = r["last block"]
        lines += ["", f"6. The last block's MLP and the final LayerNorm at every position vs only where a logit is "
                      f"asked for ({b['windows']} windows of 256, best of {r['repeats']}; the keys identical):", "",
                  "| pass | every position s | where needed s | speedup |", "|---|---|---|---|"]
        lines += [f"| {name} | {row['every position']:.3f} | {row['where needed']:.3f} | {row['speedup']:.2f}x |"
                  for name, row in b.items() if name != "windows"]
    if "fused AdamW" in r:
        a = r["fused AdamW"]
        lines += ["", f"7. AdamW's update, one op at a time vs fused (the main model, {a['windows']} windows of 256, "
                      f"best of {r['repeats']}; the update alone best of {10 * r['repeats']}):", "",
                  "| | one op at a time s | fused s | speedup |", "|---|---|---|---|"]
        lines += [f"| {name} | {a[name]['AdamW, one op at a time']:.4f} | {a[name]['AdamW, fused']:.4f} | "
                  f"{a[name]['speedup']:.2f}x |" for name in ("training step", "update")]
    if "search threads" in r:
        t = r["search threads"]
        lines += ["", f"8. The search's threads: exact search in PyTorch, as the quick run's ({t['queries']} of the "
                      f"datastore's keys among its {t['keys']:,} of width {t['width']}, k = {K}; {t['repeats']} "
                      "rounds, in turn), alone and beside one busy process, against every core alone:", "",
                  "| neighbour, threads | cpu.Threads() for the model | s/search, best | median | vs alone |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {row['model_threads']} | {row['best']:.3f} | {row['median']:.3f} | "
                  f"{row['vs_alone']:.2f}x |" for name, row in t["rows"].items()]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/wikitext-103-small")
    parser.add_argument("--checkpoint", default="runs/model.pt")
    parser.add_argument("--datastore", default="runs/datastore", help="with its index (build_datastore.py --index)")
    parser.add_argument("--results", default="results/wikitext-103-small.json", help="the λ and T of lever 1")
    parser.add_argument("--search-tokens", type=int, default=None, help="lever 1 on the first N test tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="training steps per thread policy")
    parser.add_argument("--only", type=int, nargs="+", choices=range(1, 9), metavar="N",
                        help="run only these levers (1 to 8; default: all)")
    parser.add_argument("--out", default=None, help="results file name under bench/results/ (default: levers, "
                                                    "with --only levers-N-M)")
    parser.add_argument("--phase", choices=["memory"], help=argparse.SUPPRESS)
    parser.add_argument("--kept", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=cpu.PRECISIONS[1:], default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return memory_child(args)
    only = set(args.only or range(1, 9))
    out = args.out or ("levers" if args.only is None else "levers-" + "-".join(map(str, sorted(only))))
    torch.manual_seed(0)
    model, vocab, _ = checkpoints.load_checkpoint(args.checkpoint)
    data_dir = corpora.resolve_corpus(args.data)
    train = vocab.encode_file(knnlm.split_path(data_dir, "train"))
    searched = search_inputs(args, vocab, data_dir, model) if only & {1, 8} else None  # checked before the long work
    record = {"command": "python -m bench.levers " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "machine": cpu.describe(), "repeats": args.repeats}
    levers = {  # name in the record: (number, how it is measured)
        "output layer": (2, lambda: output_layer_lever(model, train, args.repeats)),
        "memory": (3, lambda: memory_lever(model.cfg, args.repeats, args.steps)),
        "precision": (4, lambda: precision_lever(model.cfg, train, max(1, args.repeats - 1))),
        "threads": (5, lambda: threads_lever({
            "main model (8 windows of 256)": (model.cfg, 8),
            "quick model (16 windows of 64)": (knnlm.ModelConfig(vocab_size=len(vocab), block_size=64, n_layer=2,
                                                                 n_head=4, d_model=128, dropout=0.2), 16)},
            train, args.steps)),
        "last block": (6, lambda: last_block_lever(model, train, args.repeats)),
        "fused AdamW": (7, lambda: fused_adamw_lever(model.cfg, train, args.repeats)),
        "search threads": (8, lambda: search_threads_lever(searched[0], 2 * args.repeats + 1)),
        "search": (1, lambda: search_lever(model, *searched)),
    }
    for name, (number, measure) in levers.items():
        if number in only:
            record[name] = measure()
            print(record[name], flush=True)
    write_results(out, record, markdown(record))


def search_inputs(args, vocab, data_dir, model):
    """Lever 1's datastore (with its index), test tokens and results file."""
    datastore = datastores.DiskDatastore(args.datastore)
    datastore.check_model(model, vocab)
    test = vocab.encode_file(knnlm.split_path(data_dir, "test"))
    results = files.read_json(args.results, {"lambda": (int, float), "temperature": (int, float), "min_context": int})
    return datastore, test[:None if args.search_tokens is None else args.search_tokens + 1], results


if __name__ == "__main__":
    main()
