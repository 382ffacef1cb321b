"""sample.py as a user runs it: the LM and kNN-LM continuations side by side, and the neighbours behind them."""
import re

import pytest

import knnlm
from knnlm_tools import checkpoints
from helpers import run, tiny_model, untrained_work


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus, an (untrained) checkpoint, and its datastore with a small FAISS index."""
    return untrained_work(tmp_path_factory.mktemp("sample"), (40, 5, 5), "--index", "--factory", "IVF4,Flat")


def sample(setup, *args, check=True):
    return run("sample.py", "--k", 32, "--tokens", 8, "--prompt", "the cat sat", *args, cwd=setup[0], check=check)


def continuations(out):
    """-> {"LM": ..., "kNN-LM": ...}: the generated text of each."""
    return dict(re.findall(r"^(LM|kNN-LM): +(.*)$", out, re.M))


def test_greedy_is_deterministic_and_neighbours_come_from_the_training_text(setup):
    root, data = setup
    plain = sample(setup).stdout
    shown = sample(setup, "--show-neighbours", 2).stdout
    assert continuations(plain) == continuations(shown) and len(continuations(plain)["kNN-LM"].split()) == 8
    # per generated token: its probabilities, then 2 neighbours "distance² weight row  … text before it [value]"
    assert len(re.findall(r"^\d+\. '.+': p_LM [\d.]+ \| p_kNN [\d.]+ \| p [\d.]+$", shown, re.M)) == 8
    rows = re.findall(r"^ +([\d.]+) +([\d.]+) +(\d+)  (?:… )?(.*) \[(.+)\]$", shown, re.M)
    assert len(rows) == 2 * 8
    train = " ".join(knnlm.read_words(knnlm.split_path(data, "train"))).replace(knnlm.EOS, "¶")
    for dist, weight, row, before, value in rows:
        assert 0 <= float(weight) <= 1
        assert f" {before} {value} " in f" {train} ", (before, value)  # the stored text, then its value


def test_lambda_zero_is_the_lm(setup):
    # the same seed for both: with λ = 0 kNN-LM draws exactly the LM's tokens, sampled as well as greedy
    out = continuations(sample(setup, "--lambda", 0, "--sample", "--top-k", 5, "--top-p", 0.9, "--seed", 3).stdout)
    assert out["LM"] == out["kNN-LM"]


def test_faiss_backend(setup):
    out = sample(setup, "--backend", "faiss", "--nprobe", 2, "--show-neighbours").stdout
    assert "search faiss" in out and len(continuations(out)["kNN-LM"].split()) == 8


@pytest.mark.parametrize("args, message", [
    (["--lambda", 1.5], "--lambda must be in [0, 1]"),
    (["--temperature", 0], "--temperature must be > 0"),
    (["--top-p", 0], "--top-p must be in (0, 1]"),
    (["--tokens", 0], "must be a positive integer"),
    (["--top-k", 5], "add --sample"),
    (["--k", 100_000], "is larger than the datastore"),
    (["--datastore", "nowhere"], "no datastore at nowhere"),
])
def test_bad_input_is_one_line_and_exit_code_2(setup, args, message):
    result = run("sample.py", *args, cwd=setup[0], check=False)
    assert result.returncode == 2 and message in result.stderr.splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_a_datastore_of_another_model_is_refused(setup, tmp_path):
    root, data = setup
    vocab = knnlm.Vocab.build(knnlm.split_path(data, "train"))
    checkpoints.save_checkpoint(str(tmp_path / "other.pt"), tiny_model(len(vocab), seed=1), vocab)
    result = run("sample.py", "--k", 8, "--checkpoint", tmp_path / "other.pt", cwd=root, check=False)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
