"""Benchmarks, each a module run from the repository root: python -m bench.search, bench.search_blocks, bench.index.
Their results are in bench/results/."""
