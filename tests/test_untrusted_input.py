"""What a user can lose or be fooled by: checkpoints that carry code, runs that fail but look saved,
a copy of the evaluated text slipped into the datastore, numbers of one run beside another's, and
the inputs, signals and consoles that used to end in a traceback."""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch

import knnlm
from knnlm_tools import files, corpora, checkpoints, faiss_index, datastores
from helpers import ROOT, default_sigint, fails, run, tiny_model, write_corpus


def start(script, *args, cwd, log, env=None):
    """A script in the background with SIGINT at its default (as from a terminal, whatever this suite inherited),
    its output unbuffered into the file log."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *([os.path.join(ROOT, script)] if script else []), *map(str, args)],
                                cwd=cwd, stdout=f, stderr=f, preexec_fn=default_sigint,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for(text, log, proc, timeout=120):
    deadline = time.time() + timeout
    while text not in open(log).read():
        assert proc.poll() is None, open(log).read()
        assert time.time() < deadline, open(log).read()
        time.sleep(0.02)


@contextmanager
def written_elsewhere(path, tmp_path):
    """Another process holding files.writing(path) while inside: -> that process."""
    holder = start(None, "-c", f"import sys, time; sys.path.insert(0, {ROOT!r}); from knnlm_tools import files\n"
                   f"with files.writing({str(path)!r}):\n    print('held', flush=True); time.sleep(600)",
                   cwd=tmp_path, log=tmp_path / "holder.log")
    try:
        wait_for("held", tmp_path / "holder.log", holder)
        yield holder
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- a checkpoint runs no code

class Payload:
    """What a malicious checkpoint holds: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(work, path, fmt):
    """The project's own checkpoint with a payload hidden in it, saved in one of the formats torch.load reads."""
    ckpt = torch.load(work / "runs" / "model.pt", weights_only=True)
    ckpt["args"] = Payload(path.parent / "PWNED")
    if fmt == "zip":
        torch.save(ckpt, path)
    elif fmt == "legacy":
        torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle
        with open(path, "wb") as f:
            pickle.dump(ckpt, f, protocol=2)
    return path


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_a_checkpoint_that_carries_code_is_refused_before_it_runs(work, tmp_path, fmt):
    root, data = work
    evil = malicious_checkpoint(root, tmp_path / "evil.pt", fmt)
    pickle.loads(pickle.dumps(Payload(tmp_path / "live")))  # the payload works: an unsafe load would run it
    assert (tmp_path / "live").exists()
    fails(run("evaluate.py", "--data", data, "--checkpoint", evil, cwd=root, check=False), f"refused to load {evil}")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content", [None, "root:x:0:0:root:/root:/bin/bash\n"], ids=["corpus", "passwd"])
def test_a_text_file_given_as_the_checkpoint_is_not_called_dangerous(work, tmp_path, content):
    root, data = work
    text = os.path.join(data, "wiki.test.tokens")
    if content is not None:  # torch.load fails on it with an IndexError, not an UnpicklingError
        text = tmp_path / "passwd"
        text.write_text(content)
    result = run("evaluate.py", "--data", data, "--checkpoint", text, cwd=root, check=False)
    fails(result, f"cannot read checkpoint {text}: not a file that torch.save writes")
    assert "could run code" not in result.stderr


def test_an_empty_file_given_as_the_checkpoint_is_called_empty(work, tmp_path):
    root, data = work
    (tmp_path / "empty.pt").write_bytes(b"")
    fails(run("evaluate.py", "--data", data, "--checkpoint", tmp_path / "empty.pt", cwd=root, check=False),
          f"cannot read checkpoint {tmp_path / 'empty.pt'}: the file is empty")


@pytest.mark.parametrize("script, args", [("build_datastore.py", ["--out", "ds"]), ("sample.py", []),
                                          ("train.py", ["--resume", "--preset", "tiny"])])
def test_no_script_loads_a_checkpoint_that_carries_code(work, tmp_path, script, args):
    root, data = work
    name = "model.last.pt" if script == "train.py" else "evil.pt"  # train.py --resume reads --out's .last.pt
    evil = malicious_checkpoint(root, tmp_path / name, "zip")
    where = ["--out", tmp_path / "model.pt"] if script == "train.py" else ["--checkpoint", evil]
    result = run(script, *([] if script == "sample.py" else ["--data", data]), *where,
                 *[tmp_path / a if a == "ds" else a for a in args], cwd=root, check=False)
    fails(result, "refused to load")
    assert not (tmp_path / "PWNED").exists()


def test_the_projects_own_checkpoints_load_with_weights_only(tmp_path):
    data = write_corpus(tmp_path / "corpus", n_lines=(100, 10, 10))
    run("train.py", "--data", data, "--preset", "tiny", "--max-iters", "10", "--eval-interval", "5", cwd=tmp_path)
    for name in ("model.pt", "model.last.pt"):  # the .last.pt has the optimizer, the random state and the args
        ckpt = torch.load(tmp_path / "runs" / name, weights_only=True)
        assert checkpoints.load_checkpoint(str(tmp_path / "runs" / name))[2]["step"] == ckpt["step"] in (5, 10)
    assert "optimizer" in ckpt and ckpt["step"] == 10


# ---------------------------------------------------------------- a failed run is not called saved

def train_patched(tmp_path, data, patch, *args):
    """train.py in a real process, with one line of Python run first (a loss or a perplexity made NaN)."""
    code = (f"import runpy, sys; sys.path.insert(0, {ROOT!r}); {patch}; "
            f"sys.argv = ['train.py', '--data', {str(data)!r}, *{list(map(str, args))!r}]; "
            f"runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.fixture
def older_model(tmp_path):
    """A corpus and a model already at runs/model.pt, from an earlier run."""
    data = write_corpus(tmp_path / "corpus", n_lines=(100, 10, 10))
    run("train.py", "--data", data, "--preset", "tiny", "--max-iters", "10", "--eval-interval", "10", cwd=tmp_path)
    return data, open(tmp_path / "runs" / "model.pt", "rb").read()


def test_a_run_whose_validation_is_never_finite_fails_and_leaves_the_older_model_alone(tmp_path, older_model):
    data, before = older_model
    result = train_patched(tmp_path, data, "import knnlm; knnlm.perplexity = lambda log_p: float('nan')",
                           "--preset", "tiny", "--max-iters", "20", "--eval-interval", "10", "--seed", "1")
    fails(result, "the validation perplexity was never finite: nothing was saved, and runs/model.pt is not this run's model")
    assert "saved to" not in result.stdout
    assert open(tmp_path / "runs" / "model.pt", "rb").read() == before


def test_a_nan_loss_stops_the_run_at_once(tmp_path, older_model):
    data, before = older_model
    result = train_patched(tmp_path, data, "import torch.nn.functional as F; ce = F.cross_entropy; "
                           "F.cross_entropy = lambda *a, **k: ce(*a, **k) * float('nan')",
                           "--preset", "tiny", "--max-iters", "500", "--eval-interval", "10", "--seed", "1")
    fails(result, "the training loss is nan at step 1 (the run diverged: try a lower --lr than 0.001); nothing was saved")
    assert "nothing was saved" in result.stderr and "step 2" not in result.stderr + result.stdout
    assert open(tmp_path / "runs" / "model.pt", "rb").read() == before


def test_a_training_split_of_blank_lines_is_refused(work, tmp_path):
    _, data = work
    shutil.copytree(data, tmp_path / "corpus")
    (tmp_path / "corpus" / "wiki.train.tokens").write_text(" \n \n\n" * 50)
    result = run("train.py", "--data", tmp_path / "corpus", "--preset", "tiny", cwd=tmp_path, check=False)
    fails(result, "wiki.train.tokens has no words, only blank lines: nothing to train on")
    assert not (tmp_path / "runs" / "model.pt").exists()


# ---------------------------------------------------------------- the evaluated text is never in the datastore

def corpus_with_train(work, tmp_path, text):
    """work's corpus with another training split."""
    shutil.copytree(work[1], tmp_path / "corpus")
    (tmp_path / "corpus" / "wiki.train.tokens").write_bytes(text)
    return tmp_path / "corpus"


def evaluate_with_datastore_of(work, tmp_path, corpus, *flags):
    root, data = work
    run("build_datastore.py", "--data", corpus, "--out", tmp_path / "ds", cwd=root)
    return run("evaluate.py", "--data", data, "--datastore", tmp_path / "ds", "--k", "8", *flags, cwd=root, check=False)


@pytest.mark.parametrize("copy", ["crlf", "bom", "spaces"])
def test_a_byte_different_copy_of_the_evaluated_split_is_refused(work, tmp_path, copy):
    test = open(knnlm.split_path(work[1], "test"), "rb").read()
    text = {"crlf": test.replace(b"\n", b"\r\n"), "bom": b"\xef\xbb\xbf" + test,
            "spaces": test.replace(b" ", b"  ").replace(b"\n", b" \t\n")}[copy]
    assert text != test
    corpus = corpus_with_train(work, tmp_path, text)
    fails(evaluate_with_datastore_of(work, tmp_path, corpus), "wiki.test.tokens, the text being evaluated")


@pytest.mark.parametrize("how", ["train + test", "half of test + train"])
def test_a_datastore_whose_text_holds_the_evaluated_split_is_refused(work, tmp_path, how):
    train, test = (open(knnlm.split_path(work[1], s), "rb").read() for s in ("train", "test"))
    text = train + test if how == "train + test" else test[:len(test) // 2].rsplit(b"\n", 1)[0] + b"\n" + train
    result = evaluate_with_datastore_of(work, tmp_path, corpus_with_train(work, tmp_path, text))
    fails(result, "of the words of ")
    assert "wiki.test.tokens, the text being evaluated (its paragraphs, verbatim)" in result.stderr
    share = int(result.stderr.split("which holds ")[1].split("%")[0])
    assert share == 100 if how == "train + test" else 30 <= share <= 70
    out = evaluate_with_datastore_of(work, tmp_path, tmp_path / "corpus", "--allow-eval-split-datastore")
    assert out.returncode == 0 and "kNN-LM ppl" in out.stdout


def test_a_datastore_whose_source_is_gone_is_evaluated_with_a_note(work, tmp_path):
    root, data = work
    corpus = corpus_with_train(work, tmp_path, open(knnlm.split_path(data, "train"), "rb").read())
    run("build_datastore.py", "--data", corpus, "--out", tmp_path / "ds", cwd=root)
    os.remove(corpus / "wiki.train.tokens")
    result = run("evaluate.py", "--data", data, "--datastore", tmp_path / "ds", "--k", "8", cwd=root)
    assert "whether it holds the text being evaluated is not checked" in result.stderr


def test_the_token_stream_is_what_a_reader_sees(tmp_path):
    """A byte-order mark is no word and a stray \\r no line end; the hash follows the words, not the bytes."""
    path = tmp_path / "a.tokens"
    path.write_bytes(b"\xef\xbb\xbf = Title = \r\n a b\rc \r\n\n")
    assert list(knnlm.read_words(str(path))) == ["=", "Title", "=", knnlm.EOS, "a", "b", "c", knnlm.EOS, knnlm.EOS]
    (tmp_path / "b.tokens").write_text(" = Title = \n a b c \n \n")
    assert corpora.text_fingerprint(str(path)) == corpora.text_fingerprint(str(tmp_path / "b.tokens"))
    (tmp_path / "c.tokens").write_text(" = Title = \n a b c d \n \n")
    assert corpora.text_fingerprint(str(path)) != corpora.text_fingerprint(str(tmp_path / "c.tokens"))


# ---------------------------------------------------------------- numbers of one run are not shown beside another's

def test_backend_numbers_are_kept_only_beside_the_run_they_belong_to(work, tmp_path):
    root, data = work
    results = tmp_path / "r.json"
    evaluate = ["evaluate.py", "--data", data, "--k", "8", "--tune", "--results", results]
    run(*evaluate, cwd=root)
    first = json.load(open(results))
    backends = {"exact": {"test_ppl": 1.0}, "measured_with": first["measured_with"]}  # as bench.index writes them
    json.dump({**first, "backends": backends}, open(results, "w"))
    out = run(*evaluate, cwd=root).stdout  # the same model, datastore and settings: kept
    assert json.load(open(results))["backends"] == backends and "dropped" not in out
    json.dump({**first, "backends": backends}, open(results, "w"))
    out = run(*evaluate[:4], "16", *evaluate[5:], cwd=root).stdout  # another k: dropped, and said
    assert "backends" not in json.load(open(results)) and "dropped the 'backends' table" in out
    json.dump({**first, "backends": {"exact": {"test_ppl": 1.0}}}, open(results, "w"))  # one that records nothing
    run(*evaluate, cwd=root)
    assert "backends" not in json.load(open(results))


def test_bench_index_writes_the_results_file_only_under_its_lock(work, tmp_path):
    from bench import index as bench_index
    results = tmp_path / "r.json"
    results.write_text("{}")
    with written_elsewhere(results, tmp_path) as holder:
        with pytest.raises(knnlm.KnnlmError, match=f"is being written by another process \\(pid {holder.pid}\\)"):
            bench_index.end_to_end(None, None, None, None, str(results))


def test_a_results_file_named_through_a_symlink_has_one_lock(tmp_path):
    real, alias = tmp_path / "results.json", tmp_path / "alias.json"
    real.write_text("{}")
    alias.symlink_to(real)
    with written_elsewhere(real, tmp_path):
        with pytest.raises(knnlm.KnnlmError, match="is being written by another process"):
            with files.writing(str(alias)):
                pass
    files.write_json({"a": 1}, str(alias))  # written through the link: the link stays, the file changes
    assert alias.is_symlink() and json.load(open(real)) == {"a": 1}


def test_a_corpus_being_fetched_by_another_process_is_not_fetched_twice(tmp_path):
    with written_elsewhere(tmp_path / "wikitext-2", tmp_path) as holder:
        with pytest.raises(knnlm.KnnlmError, match=f"wikitext-2 is being written by another process \\(pid {holder.pid}\\)"):
            corpora.resolve_corpus(str(tmp_path / "wikitext-2"))


# ---------------------------------------------------------------- one line, not a traceback

@pytest.mark.parametrize("script, flag, value, message", [
    ("train.py", "--grad-clip", "-1", "argument --grad-clip: must be a finite number in (0, inf)"),
    ("train.py", "--grad-clip", "0", "argument --grad-clip: must be a finite number in (0, inf)"),
    ("train.py", "--lr", "1e30", "argument --lr: must be a finite number in (0, 1]"),
    ("train.py", "--lr", "nan", "argument --lr: must be a finite number in (0, 1]"),
    ("train.py", "--lr", "-1e-3", "argument --lr: must be a finite number in (0, 1]"),
    ("train.py", "--min-lr", "0.5", "--min-lr (0.5) must not be above --lr (0.001)"),
    ("train.py", "--dropout", "1", "argument --dropout: must be a finite number in [0, 1)"),
    ("train.py", "--dropout", "-0.1", "argument --dropout: must be a finite number in [0, 1)"),
    ("train.py", "--warmup-iters", "-1", "argument --warmup-iters: must be an integer >= 0, got -1"),
    ("train.py", "--weight-decay", "inf", "argument --weight-decay: must be a finite number in [0, inf)"),
    ("train.py", "--min-freq", "0", "argument --min-freq: must be a positive integer, got 0"),
    ("train.py", "--device", "meta", "--device must be cpu, cuda or cuda:N, got 'meta'"),
    ("train.py", "--device", "gpu0", "--device must be cpu, cuda or cuda:N, got 'gpu0'"),
    ("build_datastore.py", "--commit-seconds", "nan", "argument --commit-seconds: must be a finite number in [0, inf)"),
    ("build_datastore.py", "--commit-seconds", "-1", "argument --commit-seconds: must be a finite number in [0, inf)"),
    ("evaluate.py", "--device", "meta", "--device must be cpu, cuda or cuda:N, got 'meta'"),
])
def test_bad_flags_get_one_line(work, tmp_path, script, flag, value, message):
    root, data = work
    out = [] if script == "evaluate.py" else ["--out", tmp_path / "out"]
    result = run(script, "--data", data, *out, f"{flag}={value}", cwd=root, check=False)
    fails(result, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, flag, longer", [
    (["sample.py"], "--data", "--datastore"),        # sample.py reads no corpus: --data is another script's flag
    (["build_datastore.py"], "--k", "--key-type"),   # a datastore has no k
    (["-m", "experiments.sweeps"], "--cache", "--cache-dir"),
])
def test_a_flag_is_never_read_as_a_longer_one(command, flag, longer):
    """argparse would take a prefix of one flag for that flag (sample.py --data DIR: "no datastore at DIR"):
    the scripts take whole flags only, so another script's flag is refused by name, before any work."""
    result = subprocess.run([sys.executable, *command, flag, "x"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    fails(result, f"unrecognized arguments: {flag} x")
    assert longer not in result.stderr.splitlines()[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny training run with its .last.pt, to resume."""
    root = tmp_path_factory.mktemp("resume")
    data = write_corpus(root / "corpus", n_lines=(100, 10, 10))
    args = ["--data", data, "--preset", "tiny", "--max-iters", "10", "--eval-interval", "10"]
    run("train.py", *args, cwd=root)
    return root, args


@pytest.mark.parametrize("flag, value, was", [("--lr", "0.002", "0.001"), ("--batch-size", "4", "8"),
                                              ("--seed", "3", "0"), ("--max-iters", "20", "10"),
                                              ("--eval-tokens", "100", "50000"), ("--grad-clip", "0.5", "1.0")])
def test_resume_refuses_arguments_the_run_depends_on(trained, flag, value, was):
    root, args = trained
    if flag in args:  # this flag's value replaced
        i = args.index(flag)
        args = args[:i] + args[i + 2:]
    result = run("train.py", *args, flag, value, "--resume", cwd=root, check=False)
    fails(result, f"{flag} differs: runs/model.last.pt has {was}, these arguments have {value}")
    assert "resuming" not in result.stdout


def test_resume_with_the_same_arguments_continues(trained):
    root, args = trained
    out = run("train.py", *args, "--resume", cwd=root).stdout
    assert "resuming runs/model.last.pt at step 10" in out


def test_experiments_refuse_bad_flags_before_any_work(work, tmp_path):
    root, data = work
    for args, message in ((["--k", "0"], "argument --k: must be a positive integer, got 0"),
                          (["--out", work[0] / "runs" / "model.pt"], "is a file, not a directory")):
        result = subprocess.run([sys.executable, "-m", "experiments.sweeps", "--data", data, *map(str, args)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        fails(result, message)


def test_domain_adaptation_says_one_line_when_its_datastore_build_fails(work, tmp_path):
    root, data = work
    (tmp_path / "a_file").write_text("")
    result = subprocess.run([sys.executable, "-m", "experiments.domain_adaptation", "--data", data,
                             "--checkpoint", root / "runs" / "model.pt", "--target-data", data,
                             "--target-datastore", tmp_path / "a_file", "--out", tmp_path / "out"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    fails(result, "building the datastore")
    assert "is a file, not a directory" in result.stderr  # build_datastore.py's own line, above it


def test_domain_adaptation_takes_no_corpus_or_datastore_made_from_other_text(work, tmp_path):
    """A corpus or a datastore left by an earlier run is used only if it is of the text asked for."""
    root, data = work
    other, third = (write_corpus(tmp_path / name, n_lines=(40, 10, 10), seed=seed) for name, seed in (("o", 1), ("t", 2)))
    (tmp_path / "raw.txt").write_text("\n%\n".join(f"the cat sat on mat number {i} ." for i in range(30)))

    def analysis(target, datastore, *args):
        return subprocess.run([sys.executable, "-m", "experiments.domain_adaptation", "--data", data, "--checkpoint",
                               root / "runs" / "model.pt", "--datastore", root / "runs" / "datastore", "--k", "8",
                               "--target-data", target, "--target-datastore", tmp_path / datastore, "--cache-dir",
                               tmp_path / "cache", "--out", tmp_path / "out", *map(str, args)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert analysis(other, "ds").returncode == 0
    built = json.load(open(tmp_path / "ds" / "meta.json"))
    result = analysis(third, "ds")  # ds holds the datastore of `other`
    fails(result, "building the datastore")
    assert "differs" in result.stderr and json.load(open(tmp_path / "ds" / "meta.json")) == built
    texts = [open(knnlm.split_path(other, split)).read() for split in knnlm.SPLITS]
    fails(analysis(other, "ds", "--raw", tmp_path / "raw.txt"), f"{other} holds another corpus than")
    assert [open(knnlm.split_path(other, split)).read() for split in knnlm.SPLITS] == texts  # left as it was
    for _ in range(2):  # the corpus the raw text makes, then the same again: kept
        assert analysis(tmp_path / "from_raw", "ds_raw", "--raw", tmp_path / "raw.txt").returncode == 0


def test_a_cut_short_experiments_cache_is_computed_again(tmp_path):
    from experiments import common

    class Args:
        cache_dir = str(tmp_path)
    first = common.cached(Args, "x", {"a": 1}, lambda: {"v": torch.arange(1000)})
    [path] = tmp_path.glob("x-*.pt")
    os.truncate(path, os.path.getsize(path) // 2)
    again = common.cached(Args, "x", {"a": 1}, lambda: {"v": torch.arange(1000)})
    assert torch.equal(again["v"], first["v"]) and torch.load(path)["key"] == {"a": 1}


def test_two_analyses_at_once_compute_their_cache_once(tmp_path):
    """The second waits for the first's pass (minutes on the real data) and loads it, not computing it too."""
    script = ("import sys, time, torch\n"
              "from experiments import common\n"
              "class Args:\n    cache_dir = sys.argv[1]\n"
              "def compute():\n"
              "    open(sys.argv[2], 'a').write('computed\\n')\n    time.sleep(3)\n    return {'v': torch.arange(10)}\n"
              "print(common.cached(Args, 'x', {'a': 1}, compute)['v'].sum().item())\n")
    runs = [subprocess.Popen([sys.executable, "-c", script, tmp_path / "cache", tmp_path / "log"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [r.communicate(timeout=120) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs
    assert [out.split()[-1] for out, _ in outs] == ["45", "45"]
    assert (tmp_path / "log").read_text() == "computed\n", outs


def test_make_assignment_onto_a_file_says_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "exercises", "make_assignment.py"), tmp_path / "f"],
                            capture_output=True, text=True, timeout=60)
    fails(result, "is a file: the copy goes into a new or empty directory", code=1)


def test_a_console_that_cannot_print_lambda_still_gets_the_results(work, tmp_path):
    root, data = work
    result = run("evaluate.py", "--data", data, "--k", "8", "--tune", "--results", tmp_path / "r.json", cwd=root,
                 env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert "tuned on valid: \\u03bb = " in result.stdout and json.load(open(tmp_path / "r.json"))["lm_ppl"]["test"]


def test_an_infinite_perplexity_is_not_a_percentage(work):
    root, data = work
    out = run("evaluate.py", "--data", data, "--k", "1", "--lambda", "1", cwd=root).stdout
    assert "(infinite)" in out and "inf%" not in out


def test_a_perplexity_above_the_lms_is_said_higher_not_negative_lower(work):
    root, data = work
    out = run("evaluate.py", "--data", data, "--k", "1", "--lambda", "0.9", cwd=root).stdout
    assert re.search(r"kNN-LM ppl [0-9.]+ \([0-9.]+% higher\)", out) and "-" not in out.split("kNN-LM ppl")[1].split(")")[0]


def test_a_half_built_index_is_reported_as_interrupted(work, tmp_path):
    root, data = work
    shutil.copytree(root / "runs" / "datastore", tmp_path / "ds")
    datastore = datastores.DiskDatastore(str(tmp_path / "ds"))
    faiss_index.plan_index(datastore, "IVF4,Flat")  # the first step of a build, then it stopped
    with pytest.raises(knnlm.KnnlmError, match="the FAISS index build in .* was interrupted: rerun"):
        datastore.load_index()
    os.remove(tmp_path / "ds" / "index.plan.json")
    with pytest.raises(knnlm.KnnlmError, match=r"^no FAISS index in .*: build one"):
        datastore.load_index()


# ---------------------------------------------------------------- Ctrl-C

@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A model, corpus and datastore for which evaluating test and sampling take many seconds."""
    root = tmp_path_factory.mktemp("slow")
    data = write_corpus(root / "corpus", n_lines=(100, 10, 1500))
    vocab = knnlm.Vocab.build(knnlm.split_path(data, "train"))
    checkpoints.save_checkpoint(str(root / "runs" / "model.pt"), tiny_model(len(vocab), block_size=32, d_model=64), vocab)
    run("build_datastore.py", "--data", data, cwd=root)
    return root, data


@pytest.mark.parametrize("script, args, ready, message", [
    ("train.py", ["--preset", "tiny", "--max-iters", "100000", "--eval-interval", "5", "--out", "m.pt"],
     "step 5:", "interrupted: rerun with --resume to continue from the last validation (m.last.pt)"),
    ("evaluate.py", ["--batch-size", "1", "--k", "8"], "search: exact", "interrupted: nothing was written"),
    ("sample.py", ["--tokens", "100000", "--k", "8"], "greedy", "interrupted: nothing was generated"),
])
def test_ctrl_c_ends_a_script_with_one_line(slow, tmp_path, script, args, ready, message):
    root, data = slow
    proc = start(script, *([] if script == "sample.py" else ["--data", data]), *args, cwd=root, log=tmp_path / "log")
    wait_for(ready, tmp_path / "log", proc)
    time.sleep(0.3)  # in the middle of the work
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, open(tmp_path / "log").read()
    log = open(tmp_path / "log").read()
    assert message in log and "Traceback" not in log, log
