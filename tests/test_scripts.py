"""The three scripts end to end, as a user runs them, on a corpus the test writes."""
import json
import os
import subprocess

import knnlm
from helpers import ROOT, run, write_corpus


def test_train_build_datastore_evaluate(tmp_path):
    data = write_corpus(tmp_path / "corpus", n_lines=(200, 30, 30))
    run("train.py", "--data", data, "--preset", "tiny", "--max-iters", "30", "--eval-interval", "10",
        "--batch-size", "4", "--warmup-iters", "5", cwd=tmp_path)
    assert os.path.isfile(tmp_path / "runs" / "model.pt")
    out = run("build_datastore.py", "--data", data, cwd=tmp_path).stdout
    meta = json.load(open(tmp_path / "runs" / "datastore" / "meta.json"))
    assert f"wrote {meta['count']:,} keys" in out and meta["key_type"] == "ffn_in_ln"
    # the paper's headline command, with the defaults finding the model and the datastore
    out = run("evaluate.py", "--data", data, "--k", "1024", "--lambda", "0.25", cwd=tmp_path).stdout
    assert "test:" in out and "kNN-LM ppl" in out
    out = run("evaluate.py", "--data", data, "--k", "64", "--tune", "--results", "r.json", cwd=tmp_path).stdout
    results = json.load(open(tmp_path / "r.json"))
    # a temperature at either end of the grid tuned over is said, and only then
    at_edge = results["lambda"] > 0 and results["temperature"] in (min(knnlm.TEMPERATURES), max(knnlm.TEMPERATURES))
    assert ("note: temperature = " in out) == at_edge, out
    assert set(results["lm_ppl"]) == set(results["knnlm_ppl"]) == {"valid", "test"}
    assert results["datastore_size"] == meta["count"] and results["k"] == 64
    # λ tuned on valid can always fall back to 0, so kNN-LM is never worse than the LM on valid
    assert results["knnlm_ppl"]["valid"] <= results["lm_ppl"]["valid"]


def test_run_sh_refuses_bad_arguments_before_installing_anything(tmp_path):
    """run.sh's own arguments are checked first, in one line, before minutes of installing and compiling;
    a relative DATA_DIR is the caller's, not the repository's."""
    def run_sh(*args):
        return subprocess.run(["bash", os.path.join(ROOT, "run.sh"), *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
    usage = run_sh("--help")
    assert usage.returncode == 0 and "bash run.sh [--quick] [DATA_DIR]" in usage.stdout
    (tmp_path / "notes").mkdir()
    for args, message in [(["--bogus"], "run.sh: unknown option --bogus"),
                          (["--quick", "a", "b"], "run.sh: one DATA_DIR, got a and b"),
                          (["notes"], f"error: {tmp_path}/notes is not a WikiText corpus directory: missing "
                                      f"{tmp_path}/notes/wiki.train.tokens, {tmp_path}/notes/wiki.valid.tokens")]:
        result = run_sh(*args)
        assert (result.returncode, result.stdout) == (2, ""), (args, result.stdout, result.stderr)  # pip said nothing
        assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1, result.stderr
