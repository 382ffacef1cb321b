"""Benchmarks, each a module run from the repository root (python -m bench.search, bench.levers, ...; each
docstring says what it measures and how), with their results in bench/results/. bench/training.py is the
training step several of them take; what they all share is here: timing in turn, and writing the results."""
import os
import time

from knnlm_tools import files

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "LD_PRELOAD", "OMP_NUM_THREADS")  # recorded when set


def timed(fn):
    """The seconds fn() takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def in_turn(fns, repeats, setups=None):
    """{name: the seconds of each of `repeats` runs}: the functions run in turn (A B A B ...) after one warm-up
    each, so that the machine's drift falls on both sides of a ratio; setups[name]() (untimed) before each run."""
    seconds = {name: [] for name in fns}
    for run in range(repeats + 1):
        for name, fn in fns.items():
            if setups:
                setups[name]()
            s = timed(fn)
            if run:
                seconds[name].append(s)
    return seconds


def best_in_turn(fns, repeats):
    """{name: the best seconds of `repeats` runs}, the functions run in turn."""
    return {name: min(runs) for name, runs in in_turn(fns, repeats).items()}


def environment():
    """{name: value} of the variables of ENVIRONMENT that are set: they choose the libraries' code paths."""
    return {name: os.environ[name] for name in ENVIRONMENT if name in os.environ}


def command_line(record):
    """The record's command as it was run: its environment's variables, then the command."""
    return " ".join([f"{name}={value}" for name, value in record["environment"].items()] + [record["command"]])


def write_results(name, record, markdown):
    """bench/results/NAME.json (the record) and NAME.md (its tables), and the tables printed."""
    os.makedirs(RESULTS, exist_ok=True)
    files.write_json(record, os.path.join(RESULTS, f"{name}.json"))
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(markdown)
    print(markdown)
