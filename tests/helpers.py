"""Shared by the tests: tiny corpora, tiny models, running the scripts as a user does."""
import os
import subprocess
import sys

import numpy as np
import torch

import knnlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the cat sat on a mat and the dog ran to the park while it rained on the town".split()


def write_corpus(dir, n_lines=(60, 12, 12), seed=0):
    """A small WikiText-format corpus: article headings, paragraphs, blank lines."""
    rng = np.random.default_rng(seed)
    os.makedirs(dir, exist_ok=True)
    for split, n in zip(knnlm.SPLITS, n_lines):
        with open(knnlm.split_path(dir, split), "w", encoding="utf-8") as f:
            for i in range(n):
                if i % 10 == 0:
                    f.write(f" \n = Article {split} {i} = \n \n")
                f.write(" " + " ".join(rng.choice(WORDS, size=rng.integers(5, 30))) + " \n")
    return str(dir)


def tiny_model(vocab_size, block_size=16, d_model=16, seed=0):
    torch.manual_seed(seed)
    cfg = knnlm.ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, d_model=d_model,
                            dropout=0.0)
    return knnlm.TransformerLM(cfg).eval()


def run(script, *args, cwd, check=True, **kwargs):
    """Run one of the three scripts in a subprocess; -> CompletedProcess (asserting success if check)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=300, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr
    return result
