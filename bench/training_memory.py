"""
What a training step takes of the memory, against cpu.training_memory(), the lower bound train.py
refuses a step by (when it exceeds the memory free). Each configuration in --runs processes of
its own: the peak resident memory after two training steps (AdamW, --precision's autocast, dropout
as given), less the process's before the model was built. The peak differs from one process to the
next (the two threads' allocations interleave differently), so the bound is held against the least.

    python -m bench.training_memory [--precision auto]

Writes bench/results/training_memory.json and .md (or --out's name).
"""
import argparse
import json
import subprocess
import sys
import time

from bench import write_results
from knnlm_tools import cpu

# n_layer, n_head, d_model, block_size, batch, vocabulary, dropout
CONFIGS = [(2, 4, 128, 64, 16, 13759, 0.2), (4, 4, 256, 256, 8, 13759, 0.2), (4, 4, 256, 256, 16, 13759, 0.2),
           (4, 4, 256, 512, 8, 13759, 0.2), (8, 8, 512, 512, 8, 13759, 0.2), (4, 4, 256, 256, 8, 1000, 0.2),
           (2, 4, 512, 1024, 4, 1000, 0.2), (2, 16, 256, 1024, 4, 1000, 0.2), (2, 16, 256, 1024, 4, 1000, 0.0)]

STEP = """
import json, resource, sys, torch
import knnlm
from bench.training import training_step
from knnlm_tools import cpu
n_layer, n_head, d, T, B, V, dropout, precision = json.loads(sys.argv[1])
cpu.reuse_freed_memory(); cpu.exact_bernoulli()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cfg = knnlm.ModelConfig(vocab_size=V, block_size=T, n_layer=n_layer, n_head=n_head, d_model=d, dropout=dropout)
model = knnlm.TransformerLM(cfg).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randint(V, (B, T)), torch.randint(V, (B, T))
for _ in range(2):
    training_step(model, x, y, optimizer, precision)
print(json.dumps({"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "bound": cpu.training_memory(cfg, B)}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=cpu.PRECISIONS, default="auto", help="as train.py's")
    parser.add_argument("--runs", type=int, default=3, help="processes per configuration (default: %(default)s)")
    parser.add_argument("--out", default="training_memory")
    args = parser.parse_args()
    precision = cpu.resolve_precision(args.precision, "cpu")
    rows = []
    for config in CONFIGS:
        steps = []
        for _ in range(args.runs):
            result = subprocess.run([sys.executable, "-c", STEP, json.dumps([*config, precision])], check=True,
                                    capture_output=True, text=True)
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            steps.append(measured["peak"] - measured["before"])
        rows.append({"config": dict(zip(("n_layer", "n_head", "d_model", "block_size", "batch", "vocab", "dropout"),
                                        config)), "step_bytes": min(steps), "step_bytes_runs": steps,
                     "bound_bytes": measured["bound"], "bound_holds": measured["bound"] <= min(steps)})
        print(rows[-1], flush=True)
    record = {"command": "python -m bench.training_memory " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "machine": cpu.describe(), "precision": precision, "rows": rows,
              "bound_holds_everywhere": all(r["bound_holds"] for r in rows)}
    lines = [f"`{record['command']}` on {record['machine']}, {record['date']}; {precision}.", "",
             f"| layers, heads, d, context | windows | vocabulary | dropout | a step took (least - most of {args.runs}) "
             "| cpu.training_memory | bound / least |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {c['n_layer']}, {c['n_head']}, {c['d_model']}, {c['block_size']} | {c['batch']} | {c['vocab']:,} | "
              f"{c['dropout']} | {r['step_bytes'] / 1e9:.3f} - {max(r['step_bytes_runs']) / 1e9:.3f} GB | "
              f"{r['bound_bytes'] / 1e9:.3f} GB | "
              f"{r['bound_bytes'] / r['step_bytes']:.2f} |" for r in rows for c in [r["config"]]]
    lines += ["", f"The bound is below the least a step took in every row: {record['bound_holds_everywhere']}."]
    write_results(args.out, record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
