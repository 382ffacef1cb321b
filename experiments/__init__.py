"""The analyses of the paper's experiments, each a module run from the repository root:
python -m experiments.sweeps, .datastore_size, .exact_vs_approx, .key_types, .domain_adaptation,
.explain; and python -m experiments.to_wikitext, which turns raw text into a WikiText corpus."""
