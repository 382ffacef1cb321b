"""
The project's model through the Hugging Face path against its own path: export.py writes a
checkpoint as a transformers GPT-2 directory; then, for each of the two --checkpoints (the .pt
file and the directory), build_datastore.py over the training split and evaluate.py with λ and
T tuned on valid, run as a user runs them. Compared: the datastores' keys and values, the LM
and kNN-LM perplexities, and each step's time.

    python -m bench.huggingface --data ../shared/data/wikitext-103-small --checkpoint runs/quick/model.pt

The default evaluates the first 20,000 tokens of valid and test (the quick run's setting);
--max-tokens 0 evaluates them whole. Writes bench/results/huggingface.json and .md.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def step(times, name, script, *args):
    """Run one of the scripts as a user would; its time goes to times[name]."""
    start = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], check=True)
    times[name] = round(time.time() - start, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="directory with wiki.{train,valid,test}.tokens")
    parser.add_argument("--checkpoint", default="runs/quick/model.pt", help="a model of train.py (default: %(default)s)")
    parser.add_argument("--work", default="runs/bench-huggingface", help="where the export and datastores go")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=20000, help="tokens of valid and test scored (0: all)")
    parser.add_argument("--backend", default="ext", help="exact search for both paths (default: %(default)s)")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    times, results = {}, {}
    hf_dir = os.path.join(args.work, "model-hf")
    step(times, "export", "export.py", "--checkpoint", args.checkpoint, "--out", hf_dir)
    for path, checkpoint in [("native", args.checkpoint), ("huggingface", hf_dir)]:
        datastore, out = os.path.join(args.work, f"datastore-{path}"), os.path.join(args.work, f"{path}.json")
        step(times, f"{path}: build_datastore", "build_datastore.py", "--data", args.data, "--checkpoint", checkpoint,
             "--out", datastore)
        step(times, f"{path}: evaluate --tune", "evaluate.py", "--data", args.data, "--checkpoint", checkpoint,
             "--datastore", datastore, "--k", args.k, "--tune", "--backend", args.backend, "--results", out,
             *(["--max-tokens", args.max_tokens] if args.max_tokens else []))
        with open(out) as f:
            results[path] = json.load(f)
    keys = {path: np.load(os.path.join(args.work, f"datastore-{path}", "keys.npy")) for path in results}
    vals = {path: np.load(os.path.join(args.work, f"datastore-{path}", "vals.npy")) for path in results}
    native, hf = results["native"], results["huggingface"]
    summary = {
        "command": "python -m bench.huggingface " + " ".join(sys.argv[1:]),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}",
        "checkpoint": args.checkpoint, "k": args.k, "max_tokens": args.max_tokens or None, "backend": args.backend,
        "keys": {"count": len(keys["native"]), "dim": keys["native"].shape[1],
                 "identical_share": float((keys["native"] == keys["huggingface"]).mean()),
                 "max_abs_difference": float(np.abs(keys["native"].astype(np.float32)
                                                    - keys["huggingface"].astype(np.float32)).max())},
        "values_identical": bool(np.array_equal(vals["native"], vals["huggingface"])),
        "perplexity": {path: {"lm": r["lm_ppl"], "knnlm": r["knnlm_ppl"], "lambda": r["lambda"],
                              "temperature": r["temperature"]} for path, r in results.items()},
        "largest_relative_difference": max(abs(hf[kind][split] / native[kind][split] - 1)
                                           for kind in ("lm_ppl", "knnlm_ppl") for split in ("valid", "test")),
        "seconds": times,
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "huggingface.json"), "w") as f:
        json.dump(summary, f, indent=2)
    rows = [f"| {path} | {r['lm_ppl']['valid']:.4f} | {r['lm_ppl']['test']:.4f} | {r['knnlm_ppl']['valid']:.4f} | "
            f"{r['knnlm_ppl']['test']:.4f} | {r['lambda']} | {r['temperature']} | "
            f"{times[path + ': build_datastore']:.0f} s | {times[path + ': evaluate --tune']:.0f} s |"
            for path, r in results.items()]
    with open(os.path.join(HERE, "results", "huggingface.md"), "w") as f:
        f.write(f"`{summary['command']}` on {summary['machine']}\n\n"
                "| --checkpoint | LM valid | LM test | kNN-LM valid | kNN-LM test | λ | T | datastore | evaluate |\n"
                "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
                f"Keys: {summary['keys']['identical_share']:.4%} of the {summary['keys']['count']:,} x "
                f"{summary['keys']['dim']} float16 keys byte-identical, largest difference "
                f"{summary['keys']['max_abs_difference']:.2g}; values identical: {summary['values_identical']}; "
                f"largest relative difference of a perplexity: {summary['largest_relative_difference']:.1e}; "
                f"export {times['export']:.0f} s.\n")
    print(open(os.path.join(HERE, "results", "huggingface.md")).read())


if __name__ == "__main__":
    main()
