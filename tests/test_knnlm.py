"""The paper's claims, one test each, on tiny data the tests make themselves."""
import math
import os

import pytest
import torch

import knnlm
from knnlm_tools import corpora, checkpoints, search
from helpers import tiny_model, write_corpus


# ---------------------------------------------------------------- 1. data

def test_vocab_maps_rare_and_unseen_words_to_unk(tmp_path):
    path = tmp_path / "wiki.train.tokens"
    path.write_text(" a a a b b c \n <unk> a \n", encoding="utf-8")
    vocab = knnlm.Vocab.build(path, min_freq=2)
    assert vocab.itos == [knnlm.EOS, knnlm.UNK, "a", "b"]
    other = tmp_path / "other.tokens"
    other.write_text(" a c zebra \n", encoding="utf-8")
    assert vocab.decode(vocab.encode_file(other).tolist()) == "a <unk> <unk> <eos>"


def test_missing_split_is_a_clear_error(tmp_path):
    write_corpus(tmp_path)
    os.remove(knnlm.split_path(tmp_path, "valid"))
    with pytest.raises(knnlm.KnnlmError, match="wiki.valid.tokens"):
        corpora.resolve_corpus(str(tmp_path))


def test_make_small_cuts_train_at_an_article_boundary(tmp_path):
    src = write_corpus(tmp_path / "full")
    full = open(knnlm.split_path(src, "train"), "rb").read()
    small = corpora.make_small(src, str(tmp_path / "small"), train_bytes=len(full) // 2)
    cut = open(knnlm.split_path(small, "train"), "rb").read()
    assert 0 < len(cut) <= len(full) // 2 and full.startswith(cut)
    assert full[len(cut):].startswith(b" \n = Article train")  # the next article starts right after
    assert open(knnlm.split_path(small, "test"), "rb").read() == open(knnlm.split_path(src, "test"), "rb").read()


def test_sliding_windows_score_every_target_once_with_min_context():
    tokens = torch.arange(1000)
    block, min_context = 32, 20
    seen = []
    for x, y, scored in knnlm.sliding_batches(tokens, block, min_context, batch_size=3):
        assert torch.equal(y[:, :-1][x[:, 1:] != 0], x[:, 1:][x[:, 1:] != 0])  # targets are inputs shifted
        for row in range(len(x)):
            positions = scored[row].nonzero()[:, 0]
            seen += y[row, positions].tolist()
            context = positions + 1  # tokens x[row, :p + 1] precede target p
            assert (context >= min_context).all() or x[row, 0] == 0  # only the text's first window is exempt
    assert seen == list(range(1, 1000))


# ---------------------------------------------------------------- 2. model

def test_model_returns_every_key_type_of_table_5():
    model = tiny_model(50)
    x = torch.randint(50, (2, 10))
    logits = model(x)
    for key_type in knnlm.KEY_TYPES:
        same_logits, keys = model(x, key_type=key_type)
        assert torch.equal(logits, same_logits) and keys.shape == (2, 10, 16)
    _, ffn_in = model(x, key_type="ffn_in")
    _, ffn_in_ln = model(x, key_type="ffn_in_ln")
    assert torch.allclose(ffn_in_ln, model.blocks[-1].ln_2(ffn_in))  # the default key is after the LayerNorm


def test_logits_at_some_positions_are_those_of_the_whole_window():
    model = tiny_model(50)
    x = torch.randint(50, (3, 10))
    at = torch.rand(3, 10) < 0.5
    rows = []  # what the last block's MLP is given: only the positions whose logits are asked for
    model.blocks[-1].mlp.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[:-1]))
    for key_type in knnlm.KEY_TYPES:
        logits, keys = model(x, key_type=key_type)
        some, same_keys = model(x, key_type=key_type, at=at)
        assert torch.allclose(some, logits[at], atol=1e-6) and torch.equal(keys, same_keys)
        none, keys_alone = model(x, key_type=key_type, at=torch.zeros_like(at))  # the datastore's pass
        assert none.shape == (0, 50) and torch.equal(keys_alone, keys)
    rows = iter(rows)
    for key_type in knnlm.KEY_TYPES:  # block_out is itself the MLP's output: it runs at every position
        expected = [(3, 10)] * 3 if key_type == "block_out" else [(3, 10), (int(at.sum()),), (0,)]
        assert [tuple(next(rows)) for _ in range(3)] == expected, key_type


def test_model_is_causal():
    model = tiny_model(50)
    x = torch.randint(50, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 50
    assert torch.allclose(model(x)[0, :8], model(y)[0, :8], atol=1e-6)


# ---------------------------------------------------------------- 3. datastore (eq. 1)

def test_datastore_stores_every_next_token_as_value(built):
    model, vocab, tokens, datastore, meta = built
    assert meta.count == len(datastore) == len(tokens) - 1
    assert torch.equal(datastore.vals, tokens[1:])  # row r holds the target tokens[r + 1]
    assert meta.model_fingerprint == checkpoints.fingerprint(model, vocab) and meta.dim == 16


def test_keys_written_equal_the_models_keys(built):
    model, vocab, tokens, datastore, meta = built
    # the target tokens[r + 1] at row r = 100: its window starts at a multiple of the stride
    r, stride = 100, model.cfg.block_size - meta.min_context
    begin = ((r - meta.min_context) // stride) * stride
    with torch.no_grad():
        _, keys = model(tokens[None, begin:begin + model.cfg.block_size], key_type="ffn_in_ln")
    assert torch.allclose(datastore.keys[r].float(), keys[0, r - begin], atol=1e-2, rtol=1e-3)  # float16 storage


def test_the_datastore_in_memory_is_the_one_written_to_disk(built):
    model, vocab, tokens, datastore, meta = built
    in_memory = knnlm.build_datastore(model, tokens, min_context=6, batch_size=4)
    assert torch.equal(in_memory.keys, datastore.keys) and torch.equal(in_memory.vals, datastore.vals)
    queries = torch.randn(5, 16)
    assert all(torch.equal(a, b) for a, b in zip(in_memory.search(queries, 7), datastore.search(queries, 7)))


def test_stored_context_retrieves_itself(built):
    model, vocab, tokens, datastore, meta = built
    rows = torch.tensor([3, 50, 120, 298])
    queries = datastore.keys[rows].float()
    dists, ids = datastore.search(queries, k=5)
    assert torch.equal(ids[:, 0], rows) and (dists[:, 0] < 1e-3).all()
    assert torch.equal(datastore.vals[ids[:, 0]], tokens[rows + 1])


# ---------------------------------------------------------------- 4. search: tests/test_search.py


# ---------------------------------------------------------------- 5. kNN-LM (eqs. 2 and 3)

def test_knn_distribution_sums_weights_per_token():
    dists = torch.tensor([[1.0, 2.0, 3.0]])
    vals = torch.tensor([[7, 4, 7]])
    # by hand: weights exp(-1), exp(-2), exp(-3), normalised; token 7 gets the first and the third
    z = math.exp(-1) + math.exp(-2) + math.exp(-3)
    p = knnlm.knn_distribution(dists, vals, vocab_size=10)
    assert p[0, 7].item() == pytest.approx((math.exp(-1) + math.exp(-3)) / z)
    assert p[0, 4].item() == pytest.approx(math.exp(-2) / z)
    assert p.sum().item() == pytest.approx(1.0)
    log_p7 = knnlm.knn_log_prob(dists, vals, torch.tensor([7]))
    assert log_p7.item() == pytest.approx(math.log(p[0, 7].item()))
    # a temperature divides the distances
    log_p4 = knnlm.knn_log_prob(dists, vals, torch.tensor([4]), temperature=2.0)
    z2 = math.exp(-0.5) + math.exp(-1) + math.exp(-1.5)
    assert log_p4.item() == pytest.approx(math.log(math.exp(-1) / z2))


def test_knn_log_prob_of_many_temperatures_at_once_is_each_alone():
    g = torch.Generator().manual_seed(0)
    dists = torch.rand(50, 16, generator=g).sort(dim=1).values * 10
    dists[3, 10:] = math.inf                                    # FAISS found fewer than k
    dists[4] = math.inf                                         # and none at all
    vals, targets = torch.randint(5, (50, 16), generator=g, dtype=torch.int32), torch.randint(5, (50,), generator=g)
    temperatures = [0.5, 1.0, 8.0]
    together = knnlm.knn_log_prob_grid(dists, vals, targets, temperatures, block=7)  # rows in blocks too
    for T, row in zip(temperatures, together):
        alone = knnlm.knn_log_prob(dists, vals, targets, T)
        assert torch.equal(torch.isneginf(row), torch.isneginf(alone))   # the same targets get probability 0
        torch.testing.assert_close(row, alone, rtol=1e-6, atol=1e-6)    # and the others float32's rounding of it


def test_knn_log_prob_grid_floors_only_what_p_lm_outweighs():
    """One neighbour carries the target, 2,000 (squared distance) beyond the nearest: at T = 1 its weight,
    e^-2000, is below exp(EXP_FLOOR). knn_log_prob says -2000; the grid says about EXP_FLOOR. Mixed with
    any p_LM by eq. 3 (λ < 1), both give the same log-probability."""
    dists, vals = torch.tensor([[0.0, 1.0, 2000.0]]), torch.tensor([[1, 2, 3]], dtype=torch.int32)
    exact = knnlm.knn_log_prob(dists, vals, torch.tensor([3]), 1.0)
    floored = knnlm.knn_log_prob_grid(dists, vals, torch.tensor([3]), [1.0])[0]
    assert exact.item() < -1999 and floored.item() == pytest.approx(knnlm.EXP_FLOOR - math.log(1 + math.exp(-1)))
    for log_p_lm in (-1.0, -20.0, -60.0):
        for lmbda in (0.05, 0.25, 0.9):
            lm = torch.tensor([log_p_lm])
            assert torch.equal(knnlm.interpolate(lm, floored, lmbda), knnlm.interpolate(lm, exact, lmbda))


def test_token_without_neighbour_gets_zero_knn_probability_without_nan():
    dists = torch.tensor([[1.0, 2.0]])
    vals = torch.tensor([[3, 3]])
    log_p_knn = knnlm.knn_log_prob(dists, vals, torch.tensor([5]))
    assert log_p_knn.item() == -math.inf
    mixed = knnlm.interpolate(torch.tensor([math.log(0.2)]), log_p_knn, 0.25)
    assert mixed.item() == pytest.approx(math.log(0.75 * 0.2))
    huge = knnlm.knn_log_prob(torch.tensor([[1e4, 2e4]]), vals, torch.tensor([3]))  # far neighbours
    assert huge.item() == pytest.approx(0.0)


def test_interpolation_in_log_space_equals_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    p_lm, p_knn = torch.rand(100, generator=g), torch.rand(100, generator=g)
    for lmbda in [0.0, 0.25, 0.65, 1.0]:
        direct = lmbda * p_knn + (1 - lmbda) * p_lm
        assert torch.allclose(knnlm.interpolate(p_lm.log(), p_knn.log(), lmbda).exp(), direct, atol=1e-6)


def test_lambda_zero_is_the_lm():
    log_p_lm = torch.log_softmax(torch.randn(50), 0)
    log_p_knn = torch.tensor([-math.inf, 0.0, -3.0]).repeat(17)[:50]
    assert torch.equal(knnlm.interpolate(log_p_lm, log_p_knn, 0.0), log_p_lm)


# ---------------------------------------------------------------- 6. evaluation

def test_evaluation_scores_every_token_and_knn_helps_on_memorised_text(built):
    model, vocab, tokens, datastore, meta = built
    cache = knnlm.score_split(model, tokens, datastore, k=8, min_context=6, batch_size=4, progress=False)
    assert torch.equal(cache["targets"], tokens[1:])
    # the LM scores agree with a plain forward pass at the same positions
    with torch.no_grad():
        log_p = torch.log_softmax(model(tokens[None, :16]), -1)[0]
    assert torch.allclose(cache["log_p_lm"][:15], log_p[torch.arange(15), tokens[1:16]], atol=1e-5)
    # evaluating on the datastore's own text: each token's nearest neighbour is itself
    lm = knnlm.perplexity(cache["log_p_lm"])
    assert knnlm.perplexity(knnlm.knnlm_log_probs(cache, 0.0)) == pytest.approx(lm)
    assert knnlm.perplexity(knnlm.knnlm_log_probs(cache, 0.5)) < lm / 1.5
    lmbda, T, ppl, results = knnlm.tune(cache, [0.0, 0.5, 0.9], [1.0, 2.0])
    assert ppl == min(r[0] for r in results) and len(results) == 6


@pytest.mark.skipif(search.knnlm_ext is None, reason="knnlm_ext not built")
def test_evaluation_is_the_same_with_either_search_backend(built):
    model, vocab, tokens, datastore, meta = built
    caches = []
    for backend in ("torch", "ext"):
        assert datastore.use(backend) == backend
        caches.append(knnlm.score_split(model, tokens, datastore, k=32, min_context=6, batch_size=4, progress=False))
    assert torch.allclose(caches[0]["dists"], caches[1]["dists"], rtol=1e-5, atol=1e-5)
    ppl = [knnlm.perplexity(knnlm.knnlm_log_probs(cache, 0.25)) for cache in caches]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)


def test_perplexity_of_uniform_distribution_is_vocab_size():
    assert knnlm.perplexity(torch.full((100,), -math.log(37))) == pytest.approx(37)


def test_download_unpacks_the_official_archive_layout(tmp_path, monkeypatch):
    src = write_corpus(tmp_path / "src")

    def fake_urlretrieve(url, filename, reporthook=None):  # the archive holds wikitext-103/wiki.*.tokens
        import zipfile
        with zipfile.ZipFile(filename, "w") as z:
            for split in knnlm.SPLITS:
                z.write(knnlm.split_path(src, split), f"wikitext-103/wiki.{split}.tokens")
        reporthook(1, os.path.getsize(filename), os.path.getsize(filename))

    monkeypatch.setattr(corpora.urllib.request, "urlretrieve", fake_urlretrieve)
    small = corpora.resolve_corpus(str(tmp_path / "data" / "wikitext-103-small"))
    assert os.path.isfile(tmp_path / "data" / "wikitext-103" / "wiki.train.tokens")
    assert open(knnlm.split_path(small, "valid")).read() == open(knnlm.split_path(src, "valid")).read()


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    def offline(url, filename, reporthook=None):
        raise OSError("Name or service not known")

    monkeypatch.setattr(corpora.urllib.request, "urlretrieve", offline)
    with pytest.raises(knnlm.KnnlmError, match="pass it with --data"):
        corpora.resolve_corpus(str(tmp_path / "wikitext-2"))


def test_a_partial_wikitext_103_is_named_before_wikitext_103_small_is_cut(tmp_path):
    (tmp_path / "wikitext-103").mkdir()
    (tmp_path / "wikitext-103" / "wiki.train.tokens").write_text(" a b \n")
    with pytest.raises(knnlm.KnnlmError, match="wikitext-103 is not a WikiText corpus directory: missing .*wiki.valid"):
        corpora.resolve_corpus(str(tmp_path / "wikitext-103-small"))
    assert not (tmp_path / "wikitext-103-small").exists()


def test_an_interrupted_cut_leaves_no_wikitext_103_small_behind(tmp_path, monkeypatch):
    write_corpus(tmp_path / "wikitext-103")
    copyfile, copied = corpora.shutil.copyfile, []

    def interrupted_after_one(src, dst):  # valid is copied, then Ctrl-C
        if copied:
            raise KeyboardInterrupt
        copied.append(dst)
        return copyfile(src, dst)

    monkeypatch.setattr(corpora.shutil, "copyfile", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        corpora.resolve_corpus(str(tmp_path / "wikitext-103-small"))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["wikitext-103"]
    monkeypatch.undo()
    small = corpora.resolve_corpus(str(tmp_path / "wikitext-103-small"))  # the next run cuts it whole
    for split in knnlm.SPLITS[1:]:
        assert open(knnlm.split_path(small, split)).read() == open(knnlm.split_path(tmp_path / "wikitext-103", split)).read()


REAL = os.environ.get("KNNLM_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                 "wikitext-103-small"))


@pytest.mark.skipif(not os.path.isdir(REAL), reason="no real WikiText-103-small beside the checkout")
def test_real_wikitext_token_counts():
    """The official valid and test splits have 217,646 and 245,569 tokens (words + one <eos> a line)."""
    vocab = knnlm.Vocab.build(knnlm.split_path(REAL, "train"), min_freq=3)
    assert len(vocab.encode_file(knnlm.split_path(REAL, "valid"))) == 217_646
    assert len(vocab.encode_file(knnlm.split_path(REAL, "test"))) == 245_569
