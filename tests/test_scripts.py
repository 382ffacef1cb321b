"""The three scripts end to end, as a user runs them, on a corpus the test writes."""
import json
import os

from helpers import run, write_corpus


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
    run("evaluate.py", "--data", data, "--k", "64", "--tune", "--results", "r.json", cwd=tmp_path)
    results = json.load(open(tmp_path / "r.json"))
    assert set(results["lm_ppl"]) == set(results["knnlm_ppl"]) == {"valid", "test"}
    assert results["datastore_size"] == meta["count"] and results["k"] == 64
    # λ tuned on valid can always fall back to 0, so kNN-LM is never worse than the LM on valid
    assert results["knnlm_ppl"]["valid"] <= results["lm_ppl"]["valid"]
