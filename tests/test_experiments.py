"""The analyses of experiments/: what they compute from a cache equals a fresh evaluation,
explanations find the text behind a datastore row, the raw-text converter writes WikiText,
and every analysis runs from its command on a tiny corpus."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import knnlm
from knnlm_tools import corpora, datastores
from experiments import to_wikitext
from helpers import ROOT, WORDS, fails, run, tiny_model, write_corpus


def run_module(module, *args, cwd, check=True):
    """Run `python -m module` in a subprocess as a user does from the repository root, here from cwd
    (the repository on PYTHONPATH); -> CompletedProcess (asserting success if check)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


# ---------------------------------------------------------------- one cached pass, re-mixed

def test_remixing_the_cache_equals_a_fresh_evaluation(built):
    model, vocab, tokens, datastore, _ = built  # conftest.py
    text = torch.from_numpy(np.random.default_rng(1).integers(0, len(vocab), size=200))  # not the datastore's
    cache = knnlm.score_split(model, text, datastore, k=64, min_context=6, batch_size=4, progress=False,
                              keep_queries=True)
    for k, lmbda, T in [(1, 0.25, 1.0), (7, 0.5, 2.0), (64, 0.9, 0.5)]:
        fresh = knnlm.score_split(model, text, datastore, k=k, min_context=6, batch_size=4, progress=False)
        assert torch.allclose(knnlm.knnlm_log_probs(cache, lmbda, T, k=k),
                              knnlm.knnlm_log_probs(fresh, lmbda, T), atol=1e-5)
        # tuning on the cache at this k finds the same best as tuning the fresh pass
        assert knnlm.tune(cache, [0.1, 0.5], [1.0, 4.0], k=k)[:2] == knnlm.tune(fresh, [0.1, 0.5], [1.0, 4.0])[:2]
    # the cached queries are the model's: searching them again gives the cached neighbours
    dists, vals = knnlm.neighbours(datastore, cache["queries"], 64)
    assert torch.equal(vals, cache["neighbour_vals"]) and torch.allclose(dists, cache["dists"])


def test_the_first_rows_of_a_datastore_are_the_datastore_of_the_first_tokens(built, tmp_path):
    model, vocab, tokens, datastore, _ = built  # conftest.py
    n = 123
    datastores.build_datastore(model, vocab, tokens[:n + 1], str(tmp_path / "head"), min_context=6, batch_size=4,
                              progress=False)
    head, prefix = datastore.head(n), datastores.DiskDatastore(str(tmp_path / "head"))
    assert torch.equal(head.keys, prefix.keys) and torch.equal(head.vals, prefix.vals) and len(head) == n
    queries = torch.randn(5, 16)
    assert all(torch.equal(a, b) for a, b in zip(head.search(queries, 10), prefix.search(queries, 10)))
    with pytest.raises(knnlm.KnnlmError, match="no first"):
        datastore.head(len(datastore) + 1)


# ---------------------------------------------------------------- explanations

def test_a_datastore_row_maps_back_to_the_text_that_produced_it(built):
    model, vocab, tokens, datastore, _ = built  # conftest.py
    windows = knnlm.sliding_windows(len(tokens), model.cfg.block_size, 6)
    for row in [0, 1, 5, 57, 150, len(datastore) - 1]:
        context, value = knnlm.row_context(tokens, row, width=6)
        assert value == tokens[row + 1] == datastore.vals[row]
        assert torch.equal(context, tokens[max(0, row - 5):row + 1])  # the tokens just before the target
        # and the stored key is the model's key of exactly that left context (in the window that scored it)
        begin = next(b for b, e, first in windows if b + first <= row < e)
        with torch.no_grad():
            _, keys = model(tokens[None, begin:row + 1], key_type="ffn_in_ln")
        assert torch.allclose(datastore.keys[row].float(), keys[0, -1], atol=1e-2)


# ---------------------------------------------------------------- raw text -> WikiText

RAW = """The well-known cat sat on 1,000.5 mats.
It didn't mind!

A second paragraph (short).
%
Another document: e-mail me.
%
A third one -- the last.
"""


def test_raw_text_is_converted_into_the_wikitext_format(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.txt").write_text(RAW)
    docs = list(to_wikitext.documents([str(tmp_path / "raw")], separator="%"))
    assert docs == [["The well-known cat sat on 1,000.5 mats. It didn't mind!", "A second paragraph (short)."],
                    ["Another document: e-mail me."], ["A third one -- the last."]]
    tokenizer = to_wikitext.MosesTokenizer(lang="en")
    assert [to_wikitext.wikitext_line(p, tokenizer) for p in docs[0]] == [
        " The well @-@ known cat sat on 1 @,@ 000 @.@ 5 mats . It didn 't mind ! \n",
        " A second paragraph ( short ) . \n"]
    counts = to_wikitext.convert([str(tmp_path / "raw")], str(tmp_path / "out"), separator="%", valid=0.3, test=0.3)
    assert counts == {"valid": 1, "test": 1, "train": 1}
    lines = sorted(line for s in knnlm.SPLITS for line in open(knnlm.split_path(tmp_path / "out", s)))
    assert lines == sorted([" \n"] * 3 + [" The well @-@ known cat sat on 1 @,@ 000 @.@ 5 mats . It didn 't mind ! \n",
                                          " A second paragraph ( short ) . \n", " Another document : e @-@ mail me . \n",
                                          " A third one -- the last . \n"])
    corpora.check_corpus(str(tmp_path / "out"))  # the pipeline reads it as it reads WikiText
    with pytest.raises(knnlm.KnnlmError, match="at least 3"):
        to_wikitext.convert([str(tmp_path / "raw")], str(tmp_path / "out2"))  # one file, no separator: 1 document


def test_the_corpus_is_not_written_among_its_raw_texts(tmp_path):
    """Written there, a second run would read the splits as documents: the test split's text could land in train."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.txt").write_text(RAW)
    for out in [tmp_path / "raw", tmp_path / "raw" / "."]:
        with pytest.raises(knnlm.KnnlmError, match="is among the raw texts"):
            to_wikitext.convert([str(tmp_path / "raw")], str(out), separator="%", valid=0.3, test=0.3)
    to_wikitext.convert([str(tmp_path / "raw")], str(tmp_path / "out"), separator="%", valid=0.3, test=0.3)
    with pytest.raises(knnlm.KnnlmError, match="is among the raw texts"):
        to_wikitext.convert([str(tmp_path / "raw" / "a.txt"), str(tmp_path / "out" / "wiki.test.tokens")],
                            str(tmp_path / "out"), separator="%", valid=0.3, test=0.3)
    assert sorted(os.listdir(tmp_path / "raw")) == ["a.txt"]


def test_a_file_that_is_not_utf8_is_refused_when_named_and_said_when_left_out(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.txt").write_text(RAW)
    (tmp_path / "raw" / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me.\n".encode("latin-1"))
    with pytest.raises(knnlm.KnnlmError, match=r"latin1.txt is not UTF-8 text .*byte 0xe9 at 3\)"):
        list(to_wikitext.documents([str(tmp_path / "raw" / "latin1.txt")]))
    counts = to_wikitext.convert([str(tmp_path / "raw")], str(tmp_path / "out"), separator="%", valid=0.3, test=0.3)
    assert counts == {"valid": 1, "test": 1, "train": 1}
    assert f"left out 1 file that is not UTF-8 text: {tmp_path / 'raw' / 'latin1.txt'}" in capsys.readouterr().out


# ---------------------------------------------------------------- every analysis from its command

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model, its datastore and FAISS index, made with the scripts as a user would."""
    tmp = tmp_path_factory.mktemp("experiments")
    data = write_corpus(tmp / "corpus", n_lines=(200, 30, 30))
    run("train.py", "--data", data, "--preset", "tiny", "--max-iters", "20", "--eval-interval", "10",
        "--batch-size", "4", "--warmup-iters", "5", cwd=tmp)
    run("build_datastore.py", "--data", data, "--index", "--factory", "IVF4,Flat", cwd=tmp)
    return tmp, data


def results(tmp, name):
    assert os.path.getsize(tmp / "out" / f"{name}.png") > 1000
    return json.load(open(tmp / "out" / f"{name}.json"))


def all_lists_reranked_is_exact_search(tmp, best, k=32):
    """IVF4,Flat stores the keys uncompressed, so visiting all 4 lists and re-ranking is exact search, up
    to rounding: FAISS's float32 distances and ours may order two keys at nearly the k-th distance either
    way (this happens on some CPUs). So: the neighbour sets agree except for keys within float error of
    the k-th distance, the sorted distances agree, and where the sets agree p_kNN and perplexity do too."""
    datastore = datastores.DiskDatastore(str(tmp / "runs" / "datastore"))
    cache = next(c for c in map(torch.load, (tmp / "runs" / "cache").glob("valid-*.pt")) if "queries" in c)
    datastore.use("torch", "cpu", k)
    exact_dists, exact_ids = datastore.search(cache["queries"], k)
    datastore.use("faiss", "cpu", k, nprobe=4, recompute=True)
    dists, ids = datastore.search(cache["queries"], k)
    tol = 1e-5 * exact_dists[:, -1:] + 1e-4                               # float32 error of a squared distance
    torch.testing.assert_close(dists, exact_dists, rtol=0, atol=tol.max().item())
    same = torch.ones(len(ids), dtype=torch.bool)
    for row, (a, b) in enumerate(zip(ids.tolist(), exact_ids.tolist())):
        differ = set(a) ^ set(b)
        same[row] = not differ
        for i in differ:  # only keys at the k-th distance, within float error, may differ
            d = (datastore.keys[i].float() - cache["queries"][row]).pow(2).sum()
            assert abs(d - exact_dists[row, -1]) <= tol[row, 0], (row, i, d.item(), exact_dists[row, -1].item())
    assert same.float().mean() > 0.9
    log_p = [knnlm.knnlm_log_probs({**cache, "dists": d[same], "neighbour_vals": datastore.vals[i[same]],
                                    "targets": cache["targets"][same], "log_p_lm": cache["log_p_lm"][same]},
                                   best["lambda"], best["temperature"]) for d, i in ((dists, ids), (exact_dists, exact_ids))]
    torch.testing.assert_close(log_p[0], log_p[1], rtol=0, atol=1e-4)
    assert knnlm.perplexity(log_p[0]) == pytest.approx(knnlm.perplexity(log_p[1]), rel=1e-5)


def test_every_analysis_runs_from_its_command(trained):
    tmp, data = trained
    common = ("--data", data, "--k", "32", "--out", "out")
    run_module("experiments.sweeps", *common, cwd=tmp)
    sweeps = results(tmp, "sweeps")
    assert sweeps["lambda"]["T=1"]["0.0"] == pytest.approx(sweeps["lm_ppl"])  # λ = 0 is the LM alone
    assert sweeps["best"]["ppl"] <= sweeps["lm_ppl"] and list(sweeps["k"]["T=1"]) == ["1", "2", "4", "8", "16", "32"]

    out = run_module("experiments.datastore_size", *common, "--fractions", "0.25", "1", cwd=tmp).stdout
    assert "valid: cached in" in out  # the sweeps' pass, not a new one
    size = results(tmp, "datastore_size")
    assert [s["fraction"] for s in size["sizes"]] == [0.25, 1]
    assert size["sizes"][-1]["tuned"] == sweeps["best"]  # the whole datastore is the sweeps' cache

    run_module("experiments.exact_vs_approx", *common, "--nprobes", "1", "4", cwd=tmp)
    approx = results(tmp, "exact_vs_approx")
    assert [(r["nprobe"], r["recompute"]) for r in approx["faiss"]] == [(1, False), (4, False), (1, True), (4, True)]
    all_lists_reranked_is_exact_search(tmp, sweeps["best"])  # what the nprobe 4 row's perplexity rests on

    run_module("experiments.key_types", *common, "--key-types", "ffn_in_ln", "attn_out", cwd=tmp)
    keys = results(tmp, "key_types")
    assert [r["key_type"] for r in keys["key_types"]] == ["ffn_in_ln", "attn_out"]
    assert keys["key_types"][0]["tuned"] == sweeps["best"]
    assert json.load(open(tmp / "runs" / "datastore-attn_out" / "meta.json"))["key_type"] == "attn_out"

    (tmp / "raw").mkdir()
    rng = np.random.default_rng(2)
    (tmp / "raw" / "other.txt").write_text("\n%\n".join(" ".join(rng.choice(WORDS[::-1] + ["zebra"], 12)) + "."
                                                          for _ in range(120)))
    run_module("experiments.domain_adaptation", *common, "--raw", "raw", "--target-data", "other", cwd=tmp)
    domain = results(tmp, "domain_adaptation")
    ours = domain["datastores"]["other train"]
    assert ours["test_knnlm_ppl"] <= ours["test_lm_ppl"] * 1.05 and ours["unk_rate_test"] > 0  # "zebra" is unknown

    out = run_module("experiments.explain", *common, "--top", "2", "--neighbours", "3", cwd=tmp).stdout
    explain = results(tmp, "explain")
    assert len(explain["records"]) == 2 and "| weight |" in out
    for record in explain["records"]:
        assert record["p_knn"] > record["p_lm"] or record["p_knn"] == 0  # the top of "p_kNN most exceeds p_LM"
        assert len(record["neighbours"]) == 3


def test_a_model_an_analysis_trained_is_used_again_only_on_its_own_text(trained, tmp_path):
    from argparse import Namespace
    from experiments import common
    tmp, data = trained  # runs/model.pt: train.py --preset tiny --max-iters 20 on data
    flags = dict(preset="tiny", max_iters=20, batch_size=4)
    assert common.train_model(Namespace(data=data, device="cpu"), str(tmp / "runs" / "model.pt"), **flags) == 0
    other = write_corpus(tmp_path / "other", n_lines=(200, 30, 30), seed=5)
    with pytest.raises(knnlm.KnnlmError, match="trained with other arguments or text .*train_sha256"):
        common.train_model(Namespace(data=other, device="cpu"), str(tmp / "runs" / "model.pt"), **flags)
    with pytest.raises(knnlm.KnnlmError, match="'batch_size': 4}, not {'batch_size': 8}"):
        common.train_model(Namespace(data=data, device="cpu"), str(tmp / "runs" / "model.pt"), **{**flags, "batch_size": 8})


def test_an_analysis_pass_is_cached_per_datastore_not_per_model_and_text(tmp_path):
    """Two datastores of one model and text, built with other contexts, have other neighbours: each its own cache."""
    from argparse import Namespace
    from experiments import common
    data = write_corpus(tmp_path / "corpus", n_lines=(200, 20, 20))
    vocab = knnlm.Vocab.build(knnlm.split_path(data, "train"))
    model, tokens = tiny_model(len(vocab)), vocab.encode_file(knnlm.split_path(data, "train"))
    args = Namespace(cache_dir=str(tmp_path / "cache"), k=8, split="valid")
    for name, min_context in (("a", 8), ("b", 0)):
        datastores.build_datastore(model, vocab, tokens, str(tmp_path / name), min_context=min_context, progress=False)
        datastore = datastores.DiskDatastore(str(tmp_path / name))
        datastore.use("torch", "cpu", 8)
        own = knnlm.score_split(model, vocab.encode_file(knnlm.split_path(data, "valid")), datastore, 8, progress=False)
        assert torch.equal(common.cached_pass(args, model, vocab, datastore, data)["dists"], own["dists"])
    assert len(list((tmp_path / "cache").glob("valid-*.pt"))) == 2


def test_section_6_and_table_3_analyses_run_from_their_commands(trained):
    """Fig. 7, Table 3 / Fig. 2 and Fig. 8 on the tiny corpus: each mix at weight 0 is in the grid, so never worse
    than what it is added to; the smaller models are train.py runs with the main model's arguments and vocabulary,
    scored on the same tokens as the main model; rerun, nothing is trained again."""
    tmp, data = trained
    run_module("experiments.sweeps", "--data", data, "--k", "32", "--out", "out", cwd=tmp)
    sweeps = results(tmp, "sweeps")

    run_module("experiments.ngrams", "--data", data, "--k", "32", "--out", "out", "--orders", "1", "2", cwd=tmp)
    ngrams = results(tmp, "ngrams")
    assert [r["order"] for r in ngrams["ngrams"]] == [1, 2] and ngrams["lm_ppl"] == pytest.approx(sweeps["lm_ppl"])
    assert {k: ngrams["knnlm"][k] for k in sweeps["best"]} == sweeps["best"]
    for row in ngrams["ngrams"]:
        assert row["lm_plus_ngram_ppl"] <= ngrams["lm_ppl"] and row["plus_knnlm"]["ppl"] <= row["lm_plus_ngram_ppl"]

    common = ("--data", data, "--k", "32", "--out", "out", "--tokens", "100000")  # all of valid: the sweeps' cache

    run_module("experiments.more_data", *common, "--fraction", "0.5", "--sizes", "2", cwd=tmp)
    more = results(tmp, "more_data")
    assert more["whole"]["lm_ppl"] == pytest.approx(sweeps["lm_ppl"]) and more["whole"]["knnlm"] == sweeps["best"]
    small = torch.load(next((tmp / "runs" / "more_data").glob("first-*-tokens-10-steps/model.last.pt")))
    trained_main = torch.load(tmp / "runs" / "model.pt")
    assert small["vocab"] == trained_main["vocab"] and small["step"] == more["part"]["steps"] == 10  # half of 20
    assert small["corpus"]["tokens"] == more["part"]["train_tokens"] == round(more["whole"]["train_tokens"] / 2)
    assert [h["step"] for h in small["history"]] == [5, 10]  # train.py's curve, at each validation
    sizes = more["part"]["datastore_sizes"]
    assert sizes[-1]["keys"] == more["whole"]["datastore"] and sizes[0]["keys"] == round(sizes[-1]["keys"] / 2)
    out = run_module("experiments.more_data", *common, "--fraction", "0.5", "--sizes", "2", cwd=tmp).stdout
    assert "trained (10 steps)" in out and results(tmp, "more_data")["part"] == more["part"]

    run_module("experiments.memorize", *common, "--train-tokens", "200", "--max-iters", "12", cwd=tmp)
    memo = results(tmp, "memorize")
    assert memo["models"]["memorizer"]["dropout"] == 0 and memo["models"]["regular"]["dropout"] == trained_main["config"]["dropout"]
    assert [h["step"] for h in memo["models"]["memorizer"]["history"]] == list(range(1, 13))
    for row in memo["models"].values():  # weight 0 is in the grid: mixing never does worse than the LM
        assert row["mixed_ppl"] <= memo["lm_ppl"] and row["gain"] == pytest.approx(memo["lm_ppl"] - row["mixed_ppl"])
    assert memo["lm_ppl"] == pytest.approx(sweeps["lm_ppl"]) and memo["knnlm"]["same_text"]["keys"] == 200
    assert {k: memo["knnlm"]["whole_split"][k] for k in sweeps["best"]} == sweeps["best"]

    fails(run_module("experiments.more_data", *common, "--fraction", "1", cwd=tmp, check=False), "--fraction must be in (0, 1)")
    fails(run_module("experiments.memorize", *common, "--train-tokens", "5", cwd=tmp, check=False), "--train-tokens must be in")
    fails(run("train.py", "--data", data, "--train-tokens", "10000000", "--out", "x.pt", cwd=tmp, check=False),
          "--train-tokens 10,000,000")
