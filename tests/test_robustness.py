"""Nothing lost, nothing mismatched: every bad input gets one clear line and exit code 2;
interrupted work resumes to the identical result; artifacts that don't belong together are refused."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import knnlm
from helpers import ROOT, run, tiny_model, write_corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus, an (untrained) checkpoint and its datastore, as the scripts leave them."""
    root = tmp_path_factory.mktemp("work")
    data = write_corpus(root / "corpus", n_lines=(80, 15, 15))
    vocab = knnlm.Vocab.build(knnlm.split_path(data, "train"))
    knnlm.save_checkpoint(str(root / "runs" / "model.pt"), tiny_model(len(vocab)), vocab)
    run("build_datastore.py", "--data", data, cwd=root)
    return root, data


def fails(result, message):
    """The script ended with exit code 2 and one clear line, not a traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def copy_work(setup, tmp_path):
    root, data = setup
    shutil.copytree(root / "runs", tmp_path / "runs")
    return tmp_path, data


# ---------------------------------------------------------------- bad input

def test_missing_corpus_file(setup, tmp_path):
    root, data = setup
    shutil.copytree(data, tmp_path / "corpus")
    os.remove(tmp_path / "corpus" / "wiki.test.tokens")
    fails(run("evaluate.py", "--data", tmp_path / "corpus", cwd=root, check=False), "missing")


def test_empty_corpus_file(setup, tmp_path):
    root, data = setup
    shutil.copytree(data, tmp_path / "corpus")
    open(tmp_path / "corpus" / "wiki.valid.tokens", "w").close()
    fails(run("train.py", "--data", tmp_path / "corpus", "--preset", "tiny", cwd=tmp_path, check=False),
          "empty corpus file")


def test_directory_without_the_three_splits(setup, tmp_path):
    root, _ = setup
    fails(run("build_datastore.py", "--data", tmp_path, cwd=root, check=False), "is not a WikiText corpus directory")


def test_non_utf8_text(setup, tmp_path):
    root, data = setup
    shutil.copytree(data, tmp_path / "corpus")
    with open(tmp_path / "corpus" / "wiki.test.tokens", "ab") as f:
        f.write(b" caf\xe9 latin-1 \n")
    fails(run("evaluate.py", "--data", tmp_path / "corpus", cwd=root, check=False), "is not UTF-8 text")


@pytest.mark.parametrize("flag, value, message", [
    ("--k", "0", "--k must be positive"),
    ("--k", "-3", "--k must be positive"),
    ("--k", "100000", "larger than the datastore"),
    ("--lambda", "1.5", "--lambda must be in [0, 1]"),
    ("--lambda", "-0.1", "--lambda must be in [0, 1]"),
    ("--temperature", "0", "--temperature must be > 0"),
    ("--min-context", "16", "--min-context must be in [0, 16)"),
])
def test_bad_evaluation_settings(setup, flag, value, message):
    root, data = setup
    fails(run("evaluate.py", "--data", data, flag, value, cwd=root, check=False), message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script", ["train.py", "build_datastore.py", "evaluate.py"])
def test_cuda_request_without_cuda(setup, script, tmp_path):
    root, data = setup
    fails(run(script, "--data", data, "--device", "cuda", cwd=root, check=False), "sees no CUDA GPU")


def test_truncated_and_corrupt_datastore(setup, tmp_path):
    work, data = copy_work(setup, tmp_path)
    keys = work / "runs" / "datastore" / "keys.npy"
    with open(keys, "r+b") as f:
        f.truncate(os.path.getsize(keys) // 2)
    fails(run("evaluate.py", "--data", data, cwd=work, check=False), "corrupt or truncated")
    with open(keys, "r+b") as f:
        f.write(b"garbage!")
    fails(run("evaluate.py", "--data", data, cwd=work, check=False), "corrupt or truncated")


def test_truncated_checkpoint(setup, tmp_path):
    work, data = copy_work(setup, tmp_path)
    ckpt = work / "runs" / "model.pt"
    with open(ckpt, "r+b") as f:
        f.truncate(os.path.getsize(ckpt) // 2)
    fails(run("evaluate.py", "--data", data, cwd=work, check=False), "cannot read checkpoint")


def test_nan_keys(setup, tmp_path):
    work, data = copy_work(setup, tmp_path)
    keys = np.load(work / "runs" / "datastore" / "keys.npy", mmap_mode="r+")
    keys[5, 3] = np.nan
    keys.flush()
    del keys
    fails(run("evaluate.py", "--data", data, cwd=work, check=False), "NaN or infinite keys (first at row 5)")


def test_datastore_key_dimension_differs_from_the_model(setup, tmp_path):
    work, data = copy_work(setup, tmp_path)
    _, vocab, _ = knnlm.load_checkpoint(str(work / "runs" / "model.pt"))
    wider = tiny_model(len(vocab), d_model=24)
    tokens = vocab.encode_file(knnlm.split_path(data, "train"))
    knnlm.build_datastore(wider, vocab, tokens, str(work / "wide"), progress=False)
    fails(run("evaluate.py", "--data", data, "--datastore", "wide", cwd=work, check=False),
          "dim differs: the datastore has 24, runs/model.pt has 16")


def test_disk_too_small_for_the_datastore(setup, tmp_path):
    root, data = setup
    # run the script in a real process in which the disk reports 1 kB free
    code = ("import runpy, shutil, sys; shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000);"
            f"sys.path.insert(0, {ROOT!r}); sys.argv = ['build_datastore.py', '--data', {str(data)!r}, '--out', {str(tmp_path / 'ds')!r}];"
            f"runpy.run_path({os.path.join(ROOT, 'build_datastore.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    fails(result, "not enough disk space")
    assert not os.path.exists(tmp_path / "ds" / "keys.npy")


# ---------------------------------------------------------------- manifests

def edit_meta(work, **changes):
    path = work / "runs" / "datastore" / "meta.json"
    meta = json.load(open(path))
    meta.update(changes)
    json.dump(meta, open(path, "w"))


@pytest.mark.parametrize("field, value, message", [
    ("model_fingerprint", "0123456789abcdef", "model_fingerprint differs: the datastore has '0123456789abcdef'"),
    ("vocab_fingerprint", "0123456789abcdef", "vocab_fingerprint differs: the datastore has '0123456789abcdef'"),
    ("key_dtype", "float32", "key_dtype differs"),
    ("count", 7, "count differs"),
    ("dim", 99, "dim differs"),
    ("key_type", "final_layer", "unknown key type 'final_layer'"),
])
def test_evaluate_refuses_a_datastore_whose_manifest_does_not_match(setup, tmp_path, field, value, message):
    work, data = copy_work(setup, tmp_path)
    edit_meta(work, **{field: value})
    fails(run("evaluate.py", "--data", data, cwd=work, check=False), message)


def test_evaluate_refuses_a_datastore_built_by_another_model(setup, tmp_path):
    work, data = copy_work(setup, tmp_path)
    _, vocab, _ = knnlm.load_checkpoint(str(work / "runs" / "model.pt"))
    knnlm.save_checkpoint(str(work / "other.pt"), tiny_model(len(vocab), seed=1), vocab)
    fails(run("evaluate.py", "--data", data, "--checkpoint", "other.pt", cwd=work, check=False),
          "model_fingerprint differs")


def test_a_datastore_of_another_corpus_is_allowed(setup, tmp_path):
    """Domain adaptation: the same model, a datastore built from a different corpus."""
    work, data = copy_work(setup, tmp_path)
    other = write_corpus(tmp_path / "other", n_lines=(40, 10, 10), seed=7)
    run("build_datastore.py", "--data", other, "--out", "other_ds", cwd=work)
    out = run("evaluate.py", "--data", data, "--datastore", "other_ds", "--k", "8", cwd=work).stdout
    assert "kNN-LM ppl" in out


@pytest.mark.parametrize("flag, value, field", [
    ("--key-type", "block_out", "key_type differs"),
    ("--split", "valid", "count differs"),
    ("--min-context", "4", "min_context differs"),
])
def test_build_refuses_to_mix_into_a_datastore_of_other_arguments(setup, tmp_path, flag, value, field):
    work, data = copy_work(setup, tmp_path)
    fails(run("build_datastore.py", "--data", data, flag, value, cwd=work, check=False), field)


def test_build_refuses_another_corpus_of_the_same_size(setup, tmp_path):
    work, data = copy_work(setup, tmp_path)
    shutil.copytree(data, tmp_path / "changed")
    train = tmp_path / "changed" / "wiki.train.tokens"
    train.write_text(train.read_text().replace(" cat ", " dog "))
    fails(run("build_datastore.py", "--data", tmp_path / "changed", cwd=work, check=False), "source differs")


# ---------------------------------------------------------------- interruptions

@pytest.fixture(scope="module")
def slow_build(tmp_path_factory):
    """A model and corpus for which a datastore build takes a few seconds, one window at a time."""
    root = tmp_path_factory.mktemp("slow")
    data = write_corpus(root / "corpus", n_lines=(1500, 10, 10))
    vocab = knnlm.Vocab.build(knnlm.split_path(data, "train"))
    knnlm.save_checkpoint(str(root / "model.pt"), tiny_model(len(vocab), block_size=32, d_model=64), vocab)
    args = ["--data", data, "--checkpoint", root / "model.pt", "--batch-size", "1", "--commit-seconds", "0"]
    run("build_datastore.py", *args, "--out", root / "uninterrupted", cwd=root)
    return root, args


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_datastore_build_resumes_to_identical_files(slow_build, tmp_path, sig):
    root, args = slow_build
    out = tmp_path / "ds"
    command = [sys.executable, os.path.join(ROOT, "build_datastore.py"), *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not (out / "progress.json").exists() or json.load(open(out / "progress.json"))["rows"] < 1000:
        assert proc.poll() is None, "the build ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0 and not (out / "meta.json").exists()
    rows_done = json.load(open(out / "progress.json"))["rows"]
    resumed = run("build_datastore.py", *args, "--out", out, cwd=root)
    assert f"resuming at row {rows_done:,}" in resumed.stdout
    for name in ["keys.npy", "vals.npy", "meta.json"]:
        assert open(out / name, "rb").read() == open(root / "uninterrupted" / name, "rb").read(), name
    assert not (out / "progress.json").exists()


def test_interrupted_build_tells_evaluate_to_finish_it(slow_build, tmp_path):
    root, args = slow_build
    shutil.copytree(root / "uninterrupted", tmp_path / "ds")
    os.rename(tmp_path / "ds" / "meta.json", tmp_path / "ds" / "progress.json")
    with pytest.raises(knnlm.KnnlmError, match="was interrupted: rerun build_datastore.py"):
        knnlm.Datastore(str(tmp_path / "ds"))


def test_interrupted_training_resumes_to_the_same_model(tmp_path):
    data = write_corpus(tmp_path / "corpus", n_lines=(300, 20, 20))
    args = ["--data", data, "--preset", "tiny", "--max-iters", "150", "--eval-interval", "10", "--batch-size", "8"]
    run("train.py", *args, "--out", tmp_path / "a" / "model.pt", cwd=tmp_path)
    last = tmp_path / "b" / "model.last.pt"
    command = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, args), "--out", str(tmp_path / "b" / "model.pt")]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not last.exists():
        assert proc.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = run("train.py", *args, "--out", tmp_path / "b" / "model.pt", "--resume", cwd=tmp_path)
    assert "resuming" in resumed.stdout
    for name in ["model.pt", "model.last.pt"]:
        a = torch.load(tmp_path / "a" / name, weights_only=False)
        b = torch.load(tmp_path / "b" / name, weights_only=False)
        assert a["step"] == b["step"] and a["fingerprint"] == b["fingerprint"], name


def test_resume_refuses_other_arguments(tmp_path):
    data = write_corpus(tmp_path / "corpus", n_lines=(100, 10, 10))
    run("train.py", "--data", data, "--preset", "tiny", "--max-iters", "10", "--eval-interval", "10", cwd=tmp_path)
    fails(run("train.py", "--data", data, "--preset", "cpu-small", "--resume", cwd=tmp_path, check=False),
          "config differs")


def test_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    vocab = knnlm.Vocab([knnlm.EOS, knnlm.UNK, "a"])
    path = str(tmp_path / "model.pt")
    knnlm.save_checkpoint(path, tiny_model(3), vocab, step=1)
    before = open(path, "rb").read()

    def save_half_then_die(obj, f):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(knnlm.torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        knnlm.save_checkpoint(path, tiny_model(3, seed=1), vocab, step=2)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["model.pt"]
    monkeypatch.undo()
    assert knnlm.load_checkpoint(path)[2]["step"] == 1
