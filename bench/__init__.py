"""Benchmarks, each a module run from the repository root: python -m bench.search, bench.search_blocks, bench.index.
Their results are in bench/results/."""
import os

from knnlm_tools import files

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(name, record, markdown):
    """bench/results/NAME.json (the record) and NAME.md (its tables), and the tables printed."""
    os.makedirs(RESULTS, exist_ok=True)
    files.write_json(record, os.path.join(RESULTS, f"{name}.json"))
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(markdown)
    print(markdown)
