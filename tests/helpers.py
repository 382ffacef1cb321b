"""Shared by the tests: tiny corpora, tiny models, running the scripts as a user does."""
import os
import signal
import subprocess
import sys

import numpy as np
import torch

import knnlm
from knnlm_tools import checkpoints, manifests, datastores

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


def untrained_work(root, n_lines, *build_args):
    """A corpus, an untrained tiny checkpoint (runs/model.pt) and its datastore built by build_datastore.py
    (with build_args), as the scripts leave them in root: -> (root, the corpus directory)."""
    data = write_corpus(root / "corpus", n_lines=n_lines)
    vocab = knnlm.Vocab.build(knnlm.split_path(data, "train"))
    checkpoints.save_checkpoint(str(root / "runs" / "model.pt"), tiny_model(len(vocab)), vocab)
    run("build_datastore.py", "--data", data, *build_args, cwd=root)
    return root, data


def run(script, *args, cwd, check=True, **kwargs):
    """Run one of the three scripts in a subprocess; -> CompletedProcess (asserting success if check)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=300, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def clustered_keys(n, d, n_clusters=100, seed=0):
    """Keys in clusters within clusters, like a language model's contexts: float16 [n, d]."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)) * 4
    sub = centers.repeat(10, 0) + rng.standard_normal((n_clusters * 10, d)) * 2
    return (sub[rng.integers(0, len(sub), n)] + rng.standard_normal((n, d))).astype(np.float16)


def write_datastore(path, keys, vocab_size=100, seed=0, **fields):
    """A datastore directory as build_datastore writes it, around given keys (random values);
    fields replace those of its manifest."""
    os.makedirs(path, exist_ok=True)
    np.save(os.path.join(path, "keys.npy"), keys)
    np.save(os.path.join(path, "vals.npy"), np.random.default_rng(seed).integers(0, vocab_size, len(keys)))
    meta = {"count": len(keys), "dim": keys.shape[1], "key_dtype": str(keys.dtype), "key_type": "ffn_in_ln",
            "model_fingerprint": "0123456789abcdef", "vocab_fingerprint": "fedcba9876543210",
            "vocab_size": vocab_size, "min_context": 8, "block_size": 16, "source": None, **fields}
    manifests.Manifest(**meta).write(str(path))
    return datastores.DiskDatastore(str(path))


def default_sigint():
    """preexec_fn of a child the test will send SIGINT: the signal at its default disposition, so that Python
    turns it into KeyboardInterrupt even when the suite runs in a background job, which starts with SIGINT
    ignored and passes that on through exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def fails(result, message, code=2):
    """The script ended with one clear line on stderr (and that exit code), not a traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
