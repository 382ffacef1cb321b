"""Nothing lost, nothing mismatched: every bad input gets one clear line and exit code 2;
interrupted work resumes to the identical result; artifacts that don't belong together are refused."""
import json
import math
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
from knnlm_tools import files, checkpoints, cpu, manifests, datastores
from helpers import ROOT, default_sigint, fails, run, tiny_model, write_corpus


def copy_work(work, tmp_path):
    root, data = work
    shutil.copytree(root / "runs", tmp_path / "runs")
    return tmp_path, data


# ---------------------------------------------------------------- bad input

def test_missing_corpus_file(work, tmp_path):
    root, data = work
    shutil.copytree(data, tmp_path / "corpus")
    os.remove(tmp_path / "corpus" / "wiki.test.tokens")
    fails(run("evaluate.py", "--data", tmp_path / "corpus", cwd=root, check=False), "missing")


def test_empty_corpus_file(work, tmp_path):
    root, data = work
    shutil.copytree(data, tmp_path / "corpus")
    open(tmp_path / "corpus" / "wiki.valid.tokens", "w").close()
    fails(run("train.py", "--data", tmp_path / "corpus", "--preset", "tiny", cwd=tmp_path, check=False),
          "empty corpus file")


def test_directory_without_the_three_splits(work, tmp_path):
    root, _ = work
    fails(run("build_datastore.py", "--data", tmp_path, cwd=root, check=False), "is not a WikiText corpus directory")


def test_non_utf8_text(work, tmp_path):
    root, data = work
    shutil.copytree(data, tmp_path / "corpus")
    with open(tmp_path / "corpus" / "wiki.test.tokens", "ab") as f:
        f.write(b" caf\xe9 latin-1 \n")
    fails(run("evaluate.py", "--data", tmp_path / "corpus", cwd=root, check=False), "is not UTF-8 text")


@pytest.mark.parametrize("flag, value, message", [
    ("--k", "0", "argument --k: must be a positive integer, got 0"),
    ("--k", "-3", "argument --k: must be a positive integer, got -3"),
    ("--k", "100000", "larger than the datastore"),
    ("--lambda", "1.5", "--lambda must be in [0, 1]"),
    ("--lambda", "-0.1", "--lambda must be in [0, 1]"),
    ("--temperature", "0", "--temperature must be > 0"),
    ("--min-context", "16", "--min-context must be in [0, 16)"),
])
def test_bad_evaluation_settings(work, flag, value, message):
    root, data = work
    fails(run("evaluate.py", "--data", data, flag, value, cwd=root, check=False), message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script", ["train.py", "build_datastore.py", "evaluate.py"])
def test_cuda_request_without_cuda(work, script, tmp_path):
    root, data = work
    fails(run(script, "--data", data, "--device", "cuda", cwd=root, check=False), "sees no CUDA GPU")


def test_truncated_and_corrupt_datastore(work, tmp_path):
    work, data = copy_work(work, tmp_path)
    keys = work / "runs" / "datastore" / "keys.npy"
    with open(keys, "r+b") as f:
        f.truncate(os.path.getsize(keys) // 2)
    fails(run("evaluate.py", "--data", data, cwd=work, check=False), "corrupt or truncated")
    with open(keys, "r+b") as f:
        f.write(b"garbage!")
    fails(run("evaluate.py", "--data", data, cwd=work, check=False), "corrupt or truncated")


def test_truncated_checkpoint(work, tmp_path):
    work, data = copy_work(work, tmp_path)
    ckpt = work / "runs" / "model.pt"
    with open(ckpt, "r+b") as f:
        f.truncate(os.path.getsize(ckpt) // 2)
    fails(run("evaluate.py", "--data", data, cwd=work, check=False), "cannot read checkpoint")


def test_nan_keys(work, tmp_path):
    work, data = copy_work(work, tmp_path)
    keys = np.load(work / "runs" / "datastore" / "keys.npy", mmap_mode="r+")
    keys[5, 3] = np.nan
    keys.flush()
    del keys
    fails(run("evaluate.py", "--data", data, cwd=work, check=False), "NaN or infinite keys (first at row 5)")


def test_datastore_key_dimension_differs_from_the_model(work, tmp_path):
    work, data = copy_work(work, tmp_path)
    _, vocab, _ = checkpoints.load_checkpoint(str(work / "runs" / "model.pt"))
    wider = tiny_model(len(vocab), d_model=24)
    tokens = vocab.encode_file(knnlm.split_path(data, "train"))
    datastores.build_datastore(wider, vocab, tokens, str(work / "wide"), progress=False)
    fails(run("evaluate.py", "--data", data, "--datastore", "wide", cwd=work, check=False),
          "dim differs: the datastore has 24, runs/model.pt has 16")


def test_disk_too_small_for_the_datastore(work, tmp_path):
    root, data = work
    # run the script in a real process in which the disk reports 1 kB free
    code = ("import runpy, shutil, sys; shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000);"
            f"sys.path.insert(0, {ROOT!r}); sys.argv = ['build_datastore.py', '--data', {str(data)!r}, '--out', {str(tmp_path / 'ds')!r}];"
            f"runpy.run_path({os.path.join(ROOT, 'build_datastore.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    fails(result, "not enough disk space")
    assert not os.path.exists(tmp_path / "ds" / "keys.npy")


# ---------------------------------------------------------------- manifests

def edit_meta(work, seal=True, **changes):
    """Change fields of the datastore's manifest; seal: as a build with those fields would have written
    it (a genuine datastore of another model, say), else as an edit by hand."""
    path = work / "runs" / "datastore" / "meta.json"
    meta = json.load(open(path))
    meta.update(changes)
    if seal:
        meta["seal"] = manifests.seal(meta)
    json.dump(meta, open(path, "w"))


@pytest.mark.parametrize("field, value, message", [
    ("model_fingerprint", "0123456789abcdef", "model_fingerprint differs: the datastore has '0123456789abcdef'"),
    ("vocab_fingerprint", "0123456789abcdef", "vocab_fingerprint differs: the datastore has '0123456789abcdef'"),
    ("key_dtype", "float32", "key_dtype differs"),
    ("count", 7, "count differs"),
    ("dim", 99, "dim differs"),
    ("key_type", "final_layer", "unknown key type 'final_layer'"),
])
def test_evaluate_refuses_a_datastore_whose_manifest_does_not_match(work, tmp_path, field, value, message):
    work, data = copy_work(work, tmp_path)
    edit_meta(work, **{field: value})
    fails(run("evaluate.py", "--data", data, cwd=work, check=False), message)


def test_evaluate_refuses_a_datastore_built_by_another_model(work, tmp_path):
    work, data = copy_work(work, tmp_path)
    _, vocab, _ = checkpoints.load_checkpoint(str(work / "runs" / "model.pt"))
    checkpoints.save_checkpoint(str(work / "other.pt"), tiny_model(len(vocab), seed=1), vocab)
    fails(run("evaluate.py", "--data", data, "--checkpoint", "other.pt", cwd=work, check=False),
          "model_fingerprint differs")


def test_a_datastore_of_another_corpus_is_allowed(work, tmp_path):
    """Domain adaptation: the same model, a datastore built from a different corpus."""
    work, data = copy_work(work, tmp_path)
    other = write_corpus(tmp_path / "other", n_lines=(40, 10, 10), seed=7)
    run("build_datastore.py", "--data", other, "--out", "other_ds", cwd=work)
    out = run("evaluate.py", "--data", data, "--datastore", "other_ds", "--k", "8", cwd=work).stdout
    assert "kNN-LM ppl" in out


@pytest.mark.parametrize("flag, value, field", [
    ("--key-type", "block_out", "key_type differs"),
    ("--split", "valid", "count differs"),
    ("--min-context", "4", "min_context differs"),
])
def test_build_refuses_to_mix_into_a_datastore_of_other_arguments(work, tmp_path, flag, value, field):
    work, data = copy_work(work, tmp_path)
    fails(run("build_datastore.py", "--data", data, flag, value, cwd=work, check=False), field)


def test_build_refuses_another_corpus_of_the_same_size(work, tmp_path):
    work, data = copy_work(work, tmp_path)
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
    checkpoints.save_checkpoint(str(root / "model.pt"), tiny_model(len(vocab), block_size=32, d_model=64), vocab)
    args = ["--data", data, "--checkpoint", root / "model.pt", "--batch-size", "1", "--commit-seconds", "0"]
    run("build_datastore.py", *args, "--out", root / "uninterrupted", cwd=root)
    return root, args


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_datastore_build_resumes_to_identical_files(slow_build, tmp_path, sig):
    root, args = slow_build
    out = tmp_path / "ds"
    command = [sys.executable, os.path.join(ROOT, "build_datastore.py"), *map(str, args), "--out", str(out)]
    with open(tmp_path / "log", "w") as log:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen(command, cwd=root, stdout=log, stderr=log, preexec_fn=default_sigint)
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
        datastores.DiskDatastore(str(tmp_path / "ds"))


def test_interrupted_training_resumes_to_the_same_model(tmp_path):
    data = write_corpus(tmp_path / "corpus", n_lines=(300, 20, 20))
    args = ["--data", data, "--preset", "tiny", "--max-iters", "150", "--eval-interval", "10", "--batch-size", "8"]
    run("train.py", *args, "--out", tmp_path / "a" / "model.pt", cwd=tmp_path)
    last = tmp_path / "b" / "model.last.pt"
    command = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, args), "--out", str(tmp_path / "b" / "model.pt")]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=log)
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
    checkpoints.save_checkpoint(path, tiny_model(3), vocab, step=1)
    before = open(path, "rb").read()

    def save_half_then_die(obj, f):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(knnlm.torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, tiny_model(3, seed=1), vocab, step=2)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["model.pt"]
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(path)[2]["step"] == 1


# ---------------------------------------------------------------- one writer at a time

def start(script, *args, cwd, log):
    """Start a script in the background, its output to the file log (a pipe nobody reads would fill up)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                                stdout=f, stderr=f)


def wait_until(condition, proc):
    while not condition():
        assert proc.poll() is None, "the process ended too soon"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def quick_build(slow_build):
    """slow_build's model and corpus, 16 windows a batch (the tests that pause a writer need no slow build),
    and its datastore built uninterrupted in root/quick."""
    root, args = slow_build
    quick = [a if a != "1" else "16" for a in args]
    run("build_datastore.py", *quick, "--out", root / "quick", cwd=root)
    return root, quick


@pytest.fixture(scope="module")
def second_model(quick_build):
    """Another model of the same shape and vocabulary as quick_build's, and its datastore in root/other_quick."""
    root, args = quick_build
    _, vocab, _ = checkpoints.load_checkpoint(str(root / "model.pt"))
    checkpoints.save_checkpoint(str(root / "other.pt"), tiny_model(len(vocab), block_size=32, d_model=64, seed=1), vocab)
    other = [a if a != root / "model.pt" else root / "other.pt" for a in args]
    run("build_datastore.py", *other, "--out", root / "other_quick", cwd=root)
    return other


def same_files(a, b, names=("keys.npy", "vals.npy", "meta.json")):
    return all(open(a / n, "rb").read() == open(b / n, "rb").read() for n in names)


def test_a_second_build_into_the_same_out_is_refused_and_evaluate_says_it_is_in_progress(quick_build, second_model,
                                                                                          tmp_path):
    root, args = quick_build
    out = tmp_path / "ds"
    first = start("build_datastore.py", *args, "--out", out, cwd=root, log=tmp_path / "first.log")
    wait_until(lambda: files.writer_pid(str(out), directory=True) == str(first.pid), first)
    first.send_signal(signal.SIGSTOP)  # holds its lock, however slow or fast this machine is
    try:
        fails(run("build_datastore.py", *second_model, "--out", out, cwd=root, check=False),
              f"is being written by another process (pid {first.pid})")
        fails(run("evaluate.py", "--data", args[1], "--checkpoint", root / "model.pt", "--datastore", out, cwd=root,
                  check=False), f"is being built now (by process {first.pid})")
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert same_files(out, root / "quick")  # nothing of the second model's in it


def test_two_builds_started_together_never_mix(quick_build, second_model, tmp_path):
    root, args = quick_build
    out = tmp_path / "ds"
    procs = [start("build_datastore.py", *a, "--out", out, cwd=root, log=tmp_path / f"{i}.log")
             for i, a in enumerate([args, second_model])]
    codes = [p.wait(timeout=300) for p in procs]
    assert sorted(codes) == [0, 2], codes
    winner = ["quick", "other_quick"][codes.index(0)]
    loser_log = open(tmp_path / f"{codes.index(2)}.log").read()
    # refused by the lock, or (if the winner was done before it started) by the finished datastore's manifest
    assert "is being written by another process" in loser_log or "model_fingerprint differs" in loser_log, loser_log
    assert same_files(out, root / winner)


def test_a_second_training_on_the_same_out_is_refused(tmp_path):
    data = write_corpus(tmp_path / "corpus", n_lines=(100, 10, 10))
    args = ["--data", data, "--preset", "tiny", "--max-iters", "20", "--eval-interval", "10", "--out", "model.pt"]
    first = start("train.py", *args, cwd=tmp_path, log=tmp_path / "first.log")
    wait_until(lambda: files.writer_pid(str(tmp_path / "model.pt")) == str(first.pid), first)
    first.send_signal(signal.SIGSTOP)
    try:
        second = run("train.py", *args, "--seed", "1", cwd=tmp_path, check=False)
        fails(second, f"model.pt is being written by another process (pid {first.pid})")
        assert "saved to" not in second.stdout
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0 and "saved to model.pt" in open(tmp_path / "first.log").read()
    assert checkpoints.load_checkpoint(str(tmp_path / "model.pt"))[2]["args"]["seed"] == 0


def test_a_killed_writer_leaves_no_lock_and_no_temporary_file_behind(quick_build, tmp_path):
    """kill -9 in the middle of an atomic write: the OS drops the lock, and the rerun removes the half file."""
    root, args = quick_build
    out = tmp_path / "ds"
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); from knnlm_tools import files\n"
            f"with files.writing({str(out)!r}, directory=True), files.atomic_write({str(out / 'progress.json')!r}) as tmp:\n"
            "    open(tmp, 'w').write('half')\n"
            "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = out / f"progress.json.tmp{proc.pid}"
    wait_until(tmp.exists, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert tmp.exists() and files.writer_pid(str(out), directory=True) is None
    run("build_datastore.py", *args, "--out", out, cwd=root)
    assert not tmp.exists() and same_files(out, root / "quick")
    assert sorted(os.listdir(out)) == [".lock", "keys.npy", "meta.json", "vals.npy"]


def test_resuming_with_another_batch_size_gives_the_same_datastore(slow_build, tmp_path):
    root, args = slow_build  # batch size 1
    # in float32: other batch shapes round differently, and bfloat16 (--precision auto on a CPU with native
    # bfloat16) rounds at its 8 bits, where float32 leaves only the float16 keys' rounding to compare
    args, whole = [*args, "--precision", "float32"], tmp_path / "whole"
    run("build_datastore.py", *args, "--out", whole, cwd=root)
    out = tmp_path / "ds"
    proc = start("build_datastore.py", *args, "--out", out, cwd=root, log=tmp_path / "log")
    wait_until(lambda: (out / "progress.json").exists() and json.load(open(out / "progress.json"))["rows"] >= 1000, proc)
    proc.kill()
    proc.wait(timeout=60)
    rows_done = json.load(open(out / "progress.json"))["rows"]
    other_batch = [a if a != "1" else "7" for a in args]
    assert f"resuming at row {rows_done:,}" in run("build_datastore.py", *other_batch, "--out", out, cwd=root).stdout
    assert same_files(out, whole, names=("vals.npy",))
    resumed, whole = datastores.DiskDatastore(str(out)), datastores.DiskDatastore(str(whole))
    torch.testing.assert_close(resumed.keys, whole.keys)  # other batch shapes: maybe other rounding
    assert "already holds this datastore" in run("build_datastore.py", *args, "--out", out, cwd=root).stdout


def test_a_build_begun_by_two_processes_is_continued_only_by_two(tmp_path, monkeypatch):
    """Each process of a build writes the rows of its share of the windows and records how far it got.
    Under another number of processes the shares move, and a process would skip rows recorded as done
    that no process wrote: refused, in one line; continued by two processes, it ends as a whole build."""
    data = write_corpus(tmp_path / "corpus", n_lines=(400, 12, 12))
    vocab = knnlm.Vocab.build(knnlm.split_path(data, "train"))
    model, tokens = tiny_model(len(vocab)), vocab.encode_file(knnlm.split_path(data, "train"))

    def build(out, shard=0, shards=1):  # one process's part of the build
        datastores.build_datastore(model, vocab, tokens, str(out), min_context=8, batch_size=2, progress=False,
                                   commit_seconds=0, shard=shard, shards=shards)

    def three_batches_then_ctrl_c(*args, rows=knnlm.datastore_rows):
        for i, batch in enumerate(rows(*args)):
            if i == 3:
                raise KeyboardInterrupt
            yield batch

    build(tmp_path / "whole")
    out = tmp_path / "ds"
    monkeypatch.setattr(knnlm, "datastore_rows", three_batches_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        build(out, 0, 2)  # the first of two processes stopped early
    monkeypatch.undo()
    build(out, 1, 2)  # the second one finished its share
    for shard, shards in [(0, 3), (1, 3), (2, 3), (0, 1)]:
        with pytest.raises(knnlm.KnnlmError, match=f"was begun by 2 processes, this one runs in {shards} process"):
            build(out, shard, shards)
    build(out, 1, 2)
    build(out, 0, 2)
    assert sorted(os.listdir(out)) == [".lock", "keys.npy", "meta.json", "vals.npy"]
    assert same_files(out, tmp_path / "whole", names=("vals.npy",))
    torch.testing.assert_close(datastores.DiskDatastore(str(out)).keys, datastores.DiskDatastore(str(tmp_path / "whole")).keys)


# ---------------------------------------------------------------- a full disk, a read-only directory

@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 8 MB (tmpfs), mounted at tmp_path/disk; skipped where mounting needs a root we lack."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk):
    """Fill the filesystem to the last byte."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:  # ENOSPC
            pass


def test_a_disk_that_fills_up_during_a_build_gives_a_clear_error_and_the_rerun_resumes(slow_build, small_disk):
    root, args = slow_build  # one window a batch, a progress record after each
    out = small_disk / "ds"
    proc = start("build_datastore.py", *args, "--out", out, cwd=root, log=small_disk.parent / "log")
    wait_until(lambda: (out / "progress.json").exists(), proc)
    proc.send_signal(signal.SIGSTOP)
    fill(small_disk)  # the keys and values have their space already; the next progress record has none
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=300) == 2
    log = open(small_disk.parent / "log").read()
    assert "error: cannot write" in log and "No space left on device" in log and "Traceback" not in log, log
    os.remove(small_disk / "filler")
    assert "resuming at row" in run("build_datastore.py", *args, "--out", out, cwd=root).stdout
    assert same_files(out, root / "uninterrupted")


def test_a_disk_too_full_for_the_files_is_refused_before_any_work(quick_build, small_disk, tmp_path):
    """The space is reserved when the files are made: here a free-space check that lies (another
    process fills the disk right after it) still ends in one clear line, not SIGBUS later."""
    root, args = quick_build
    out = small_disk / "ds"
    fill(small_disk)
    os.truncate(small_disk / "filler", os.path.getsize(small_disk / "filler") - 2 * 10**6)  # 2 MB left of 3.7 needed
    code = ("import runpy, shutil, sys; shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**9, 0, 10**9);"
            f"sys.path.insert(0, {ROOT!r}); sys.argv = ['build_datastore.py', *{list(map(str, args))!r}, '--out', {str(out)!r}];"
            f"runpy.run_path({os.path.join(ROOT, 'build_datastore.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    fails(result, "No space left on device: free some space and rerun")
    assert "cannot reserve" in result.stderr and not (out / "keys.npy").exists()
    os.remove(small_disk / "filler")
    run("build_datastore.py", *args, "--out", out, cwd=root)
    assert same_files(out, root / "quick")


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no one may write in: a read-only filesystem for root (who ignores permissions), else mode 555."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only filesystem here: {mounted.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("script, flag, name, extra", [("train.py", "--out", "model.pt", ["--preset", "tiny"]),
                                                       ("build_datastore.py", "--out", "ds", []),
                                                       ("evaluate.py", "--results", "results.json", ["--k", "8"])])
def test_a_read_only_output_directory_is_refused_before_any_work(work, read_only_dir, script, flag, name, extra):
    root, data = work
    result = run(script, "--data", data, *extra, flag, read_only_dir / name, cwd=root, check=False)
    fails(result, f"cannot write to {read_only_dir}")
    assert "step" not in result.stdout and "tokens |" not in result.stdout  # refused before training or scoring


# ---------------------------------------------------------------- every output checked before the work

@pytest.mark.parametrize("content, message", [(None, "is a directory, not a file"),
                                              ("{not json", "cannot read"),
                                              ("[1, 2]", "holds a JSON list, not the object expected"),
                                              ('{"count": 500, "dim": 16}', "is not a results file of evaluate.py")])
def test_a_bad_results_path_is_refused_before_the_evaluation(work, tmp_path, content, message):
    root, data = work
    path = tmp_path / "results.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    result = run("evaluate.py", "--data", data, "--k", "8", "--results", path, cwd=root, check=False)
    fails(result, message)
    assert "tokens |" not in result.stdout  # no split was scored


@pytest.mark.parametrize("name, content", [("keys.npy", b"\x93NUMPY\x01\x00"), ("results.json", b'{"lm_ppl": 1}')])
def test_a_checkpoint_is_never_written_over_a_file_that_is_not_one(work, tmp_path, name, content):
    root, data = work
    (tmp_path / name).write_bytes(content)
    result = run("train.py", "--data", data, "--preset", "tiny", "--max-iters", "2", "--out", tmp_path / name,
                 cwd=root, check=False)
    fails(result, f"{tmp_path / name} exists and is not a checkpoint")
    assert (tmp_path / name).read_bytes() == content and "step" not in result.stdout


# ---------------------------------------------------------------- silent wrong answers

def test_a_datastore_of_the_evaluated_split_is_refused_unless_asked_for(work, tmp_path):
    work, data = copy_work(work, tmp_path)
    run("build_datastore.py", "--data", data, "--split", "test", "--out", "test_ds", cwd=work)
    for flags in ([], ["--tune"]):  # the test split scored, or valid for tuning as well
        fails(run("evaluate.py", "--data", data, "--datastore", "test_ds", "--k", "8", *flags, cwd=work, check=False),
              "was built from")
    run("build_datastore.py", "--data", data, "--split", "valid", "--out", "valid_ds", cwd=work)
    fails(run("evaluate.py", "--data", data, "--datastore", "valid_ds", "--k", "8", "--tune", cwd=work, check=False),
          "wiki.valid.tokens, the text being evaluated")
    out = run("evaluate.py", "--data", data, "--datastore", "test_ds", "--k", "8", "--allow-eval-split-datastore",
              cwd=work).stdout
    assert "kNN-LM ppl" in out


def test_a_temperature_tuned_at_the_end_of_its_grid_is_said(work, tmp_path):
    """Tuned on a datastore of valid itself, each token finds its own context at distance 0, and the smallest
    temperature, which trusts that neighbour most, is best: the end of the grid, which evaluate.py says."""
    work, data = copy_work(work, tmp_path)
    run("build_datastore.py", "--data", data, "--split", "valid", "--out", "valid_ds", cwd=work)
    out = run("evaluate.py", "--data", data, "--datastore", "valid_ds", "--k", "8", "--tune",
              "--allow-eval-split-datastore", "--results", "r.json", cwd=work).stdout
    results = json.load(open(work / "r.json"))
    assert results["lambda"] > 0 and results["temperature"] == min(knnlm.TEMPERATURES)
    assert (f"note: temperature = {min(knnlm.TEMPERATURES)} is at the end of the grid tuned over "
            f"(knnlm.TEMPERATURES: {min(knnlm.TEMPERATURES)} to {max(knnlm.TEMPERATURES)})") in out


def other_datastore(work, tmp_path, seed=1):
    """A datastore of the same shape built by another model (same vocabulary)."""
    root, data = work
    _, vocab, _ = checkpoints.load_checkpoint(str(root / "runs" / "model.pt"))
    checkpoints.save_checkpoint(str(tmp_path / "other.pt"), tiny_model(len(vocab), seed=seed), vocab)
    run("build_datastore.py", "--data", data, "--checkpoint", tmp_path / "other.pt", "--out", tmp_path / "other",
        cwd=tmp_path)
    return tmp_path / "other"


@pytest.mark.parametrize("name", ["keys.npy", "vals.npy"])
def test_a_file_swapped_in_from_another_datastore_is_refused(work, tmp_path, name):
    here, data = copy_work(work, tmp_path)
    other = other_datastore(work, tmp_path)
    if name == "vals.npy":  # the other model's values are the same text's: make them another text's
        vals = np.load(other / name)
        np.save(other / name, np.roll(vals, 1))
    shutil.copy(other / name, here / "runs" / "datastore" / name)
    fails(run("evaluate.py", "--data", data, cwd=here, check=False),
          f"runs/datastore/{name} is not the file its manifest vouches for")


def test_a_hand_edited_manifest_is_refused(work, tmp_path):
    work, data = copy_work(work, tmp_path)
    edit_meta(work, seal=False, key_type="attn_out")  # a key type it was not built with
    fails(run("evaluate.py", "--data", data, cwd=work, check=False), "meta.json was edited")


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_values_outside_the_vocabulary_are_refused(tmp_path, bad):
    from helpers import write_datastore
    vals_path = tmp_path / "ds" / "vals.npy"
    write_datastore(tmp_path / "ds", np.ones((50, 4), np.float16), vocab_size=100)
    vals = np.load(vals_path)
    vals[17] = bad
    np.save(vals_path, vals)
    meta = json.load(open(tmp_path / "ds" / "meta.json"))
    manifests.Manifest(**{f: v for f, v in meta.items() if f not in ("files", "seal")}).write(str(tmp_path / "ds"))
    with pytest.raises(knnlm.KnnlmError, match=r"vals.npy holds token ids outside \[0, 100\)"):
        datastores.DiskDatastore(str(tmp_path / "ds"))


def test_verify_reads_every_byte(quick_build, tmp_path):
    """One key changed where the sampled checksum does not look: loading accepts it, --verify does not."""
    root, args = quick_build
    shutil.copytree(root / "quick", tmp_path / "ds")
    path = tmp_path / "ds" / "keys.npy"
    size = os.path.getsize(path)
    sampled = [max(0, size - 4096) * i // 63 for i in range(64)]
    offset = sampled[31] + 4096 + 100  # between two sampled blocks
    assert offset < sampled[32]
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))
    evaluate = ["evaluate.py", *args[:4], "--k", "8"]
    assert "kNN-LM ppl" in run(*evaluate, "--datastore", tmp_path / "ds", cwd=root).stdout
    fails(run(*evaluate, "--datastore", tmp_path / "ds", "--verify", cwd=root, check=False),
          "keys.npy is not the file its manifest vouches for")
    assert "kNN-LM ppl" in run(*evaluate, "--datastore", root / "quick", "--verify", cwd=root).stdout


def test_an_index_file_of_another_datastore_of_the_same_shape_is_refused(work, tmp_path):
    here, data = copy_work(work, tmp_path)
    other = other_datastore(work, tmp_path)
    for ds in (here / "runs" / "datastore", other):
        run("build_datastore.py", "--data", data, "--out", ds, "--index", "--factory", "IVF4,Flat",
            "--checkpoint", here / "runs" / "model.pt" if ds != other else tmp_path / "other.pt", cwd=here)
    shutil.copy(other / "index.faiss", here / "runs" / "datastore" / "index.faiss")  # index.json left as it was
    fails(run("evaluate.py", "--data", data, "--k", "8", "--backend", "faiss", "--nprobe", "4", cwd=here, check=False),
          "index.faiss")
    fails(run("evaluate.py", "--data", data, "--k", "8", "--backend", "faiss", "--nprobe", "5", cwd=work[0],
              check=False), "no FAISS index")


# ---------------------------------------------------------------- numbers at the edges

def test_a_tiny_temperature_is_the_nearest_neighbour_limit_not_nan(work):
    root, data = work
    dists = torch.tensor([[3.0, 5.0, 5.0, 9.0]])
    for T in (1e-300, 1e-40, 1e-3):
        log_p = knnlm.knn_log_prob(dists, torch.tensor([[7, 8, 9, 7]]), torch.tensor([7]), T)
        assert log_p.item() == pytest.approx(0.0, abs=1e-6)  # all the mass on the nearest, which carries 7
        p = knnlm.knn_distribution(dists, torch.tensor([[7, 8, 9, 7]]), 10, T)
        assert p[0, 7].item() == pytest.approx(1.0, abs=1e-6) and torch.isfinite(p).all()
    out = run("evaluate.py", "--data", data, "--k", "8", "--temperature", "1e-300", cwd=root).stdout
    ppl = float(out.split("kNN-LM ppl ")[1].split()[0])
    assert 0 < ppl < float("inf")


def test_far_neighbours_keep_their_precision_in_float32():
    """float32 p_kNN of neighbours at distances ~2e3 and ~1e6 equals float64's of the same distances
    (without counting from the nearest, exp(-1e6 / T) underflows to 0 for every neighbour)."""
    g = torch.Generator().manual_seed(0)
    vals, targets = torch.randint(5, (64, 32), generator=g), torch.randint(5, (64,), generator=g)
    for offset in (2e3, 1e6):
        dists = (offset + torch.rand(64, 32, generator=g) * 20).sort(1)[0].float()
        exact = knnlm.knn_log_prob(dists.double(), vals, targets, 3.0)
        found = knnlm.knn_log_prob(dists, vals, targets, 3.0)
        torch.testing.assert_close(found.double(), exact, rtol=0, atol=1e-5)


def test_perplexity_beyond_exp_range_is_inf():
    assert knnlm.perplexity(torch.full((10,), -800.0)) == float("inf")
    assert knnlm.perplexity(torch.tensor([0.0, -math.inf])) == float("inf")


def test_an_infinite_perplexity_is_written_as_null_and_said_why(work, tmp_path):
    root, data = work
    out = run("evaluate.py", "--data", data, "--k", "1", "--lambda", "1", "--results", tmp_path / "r.json", cwd=root).stdout
    assert "the kNN-LM perplexity is infinite" in out
    results = json.loads(open(tmp_path / "r.json").read(),
                         parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert results["knnlm_ppl"]["test"] is None and results["non_finite"]["knnlm_ppl.test"] == "inf"


# ---------------------------------------------------------------- one line, not a traceback

@pytest.mark.parametrize("script", ["train.py", "build_datastore.py", "evaluate.py"])
@pytest.mark.parametrize("value", ["0", "-4"])
def test_a_batch_size_below_one_is_refused(work, script, value):
    root, data = work
    fails(run(script, "--data", data, "--batch-size", value, cwd=root, check=False),
          "argument --batch-size: must be a positive integer")


def test_a_training_step_too_big_for_the_memory_is_refused_before_it_runs(work, tmp_path):
    root, data = work
    out = tmp_path / "model.pt"
    result = run("train.py", "--data", data, "--preset", "tiny", "--batch-size", 10 ** 8, "--out", out, cwd=root,
                 check=False)
    fails(result, "a training step of --preset tiny with --batch-size 100000000 needs at least ")
    assert "GB free on cpu: lower --batch-size" in result.stderr and not out.exists()


def test_the_training_memory_bound_counts_what_a_step_must_hold():
    cfg = knnlm.ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, d_model=8, dropout=0.1)
    parameters = sum(p.numel() for p in knnlm.TransformerLM(cfg).parameters())
    assert cpu.training_memory(cfg, 0) == 16 * parameters  # weights, gradients, AdamW's two moments
    per_token = 12 * 100 + 2 * (32 * 8 + 13 * 2 * 16)  # logits thrice; each layer's activations and attention
    assert cpu.training_memory(cfg, 3) == 16 * parameters + 3 * 16 * per_token
    assert cpu.training_memory(cfg, 3, "cuda") == 16 * parameters + 3 * 16 * (12 * 100 + 2 * 32 * 8)  # fused attention
    no_dropout = knnlm.ModelConfig(**{**cfg.__dict__, "dropout": 0.0})
    assert cpu.training_memory(no_dropout, 3) == cpu.training_memory(cfg, 3, "cuda")


@pytest.mark.parametrize("script, flag", [("train.py", "--max-iters"), ("build_datastore.py", "--train-size"),
                                          ("build_datastore.py", "--index-shards")])
def test_zero_is_refused_not_taken_for_the_default(work, tmp_path, script, flag):
    root, data = work
    result = run(script, "--data", data, "--out", tmp_path / "out", flag, "0", cwd=root, check=False)
    fails(result, f"argument {flag}: must be a positive integer, got 0")
    assert "saved to" not in result.stdout and not (tmp_path / "out").exists()


def test_a_vocabulary_of_fewer_than_three_words_is_refused(work, tmp_path):
    root, data = work
    fails(run("train.py", "--data", data, "--max-vocab", "1", "--out", tmp_path / "m.pt", cwd=root, check=False),
          "--max-vocab must be at least 3")
    assert len(knnlm.Vocab.build(knnlm.split_path(data, "train"), max_size=3)) == 3


@pytest.mark.parametrize("name, content, message", [
    ("meta.json", "[]", "holds a JSON list, not the object expected"),
    ("meta.json", '{"count": "many"}', "field 'count' is 'many'"),
    ("index.json", '{"factory": 4}', "field 'datastore' is None"),
])
def test_manifests_of_the_wrong_shape_are_refused(work, tmp_path, name, content, message):
    work, data = copy_work(work, tmp_path)
    if name == "index.json":
        run("build_datastore.py", "--data", data, "--index", "--factory", "IVF4,Flat", cwd=work)
    (work / "runs" / "datastore" / name).write_text(content)
    fails(run("evaluate.py", "--data", data, "--k", "8", "--backend", "faiss" if name == "index.json" else "auto",
              "--nprobe", "4", cwd=work, check=False), message)


@pytest.mark.parametrize("missing", ["fingerprint", "vocab"])
def test_a_checkpoint_without_its_fingerprint_or_vocabulary_is_refused(work, tmp_path, missing):
    work, data = copy_work(work, tmp_path)
    ckpt = torch.load(work / "runs" / "model.pt", weights_only=False)
    del ckpt[missing]
    torch.save(ckpt, work / "runs" / "model.pt")
    fails(run("evaluate.py", "--data", data, cwd=work, check=False),
          f"runs/model.pt is not a checkpoint of train.py: it has no {missing}")


def test_a_split_of_blank_lines_is_refused_before_the_evaluation(work, tmp_path):
    root, data = work
    shutil.copytree(data, tmp_path / "corpus")
    (tmp_path / "corpus" / "wiki.test.tokens").write_text(" \n \n\n")
    result = run("evaluate.py", "--data", tmp_path / "corpus", "--tune", cwd=root, check=False)
    fails(result, "wiki.test.tokens has no words, only blank lines")
    assert "tokens |" not in result.stdout  # valid was not scored first
