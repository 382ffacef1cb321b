"""Tests that grade the exercises of exercises/make_assignment.py (docs/exercises.md), one function
each, with the answer worked out by hand or by a brute force that calls no other exercise."""
import math

import numpy as np
import pytest
import torch

import knnlm
from helpers import tiny_model
from test_search import assert_exact_neighbours, make_data


# ---------------------------------------------------------------- sliding_windows

def test_sliding_windows_by_hand():
    # windows of 4 tokens advancing by 4 - 2 = 2; each scores the targets after those already scored
    assert knnlm.sliding_windows(10, 4, 2) == [(0, 4, 0), (2, 6, 2), (4, 8, 2), (6, 9, 2)]
    assert knnlm.sliding_windows(10, 4, None) == knnlm.sliding_windows(10, 4, 2)  # default: half the context
    assert knnlm.sliding_windows(10, 4, 0) == [(0, 4, 0), (4, 8, 0), (8, 9, 0)]  # no overlap
    assert knnlm.sliding_windows(12, 4, 1) == [(0, 4, 0), (3, 7, 1), (6, 10, 1), (9, 11, 1)]
    assert knnlm.sliding_windows(3, 16, 8) == [(0, 2, 0)]  # a text shorter than one window
    assert knnlm.sliding_windows(2, 4, 2) == [(0, 1, 0)]   # one target
    with pytest.raises(knnlm.KnnlmError, match="--min-context"):
        knnlm.sliding_windows(10, 4, 4)


# ---------------------------------------------------------------- datastore_rows (eq. 1)

def datastore_text():
    return tiny_model(20), torch.from_numpy(np.random.default_rng(0).integers(0, 20, size=100))


def rows(batches):
    keys, vals = zip(*batches)
    return torch.cat(keys), torch.cat(vals)


@torch.no_grad()
def context_keys(model, tokens, min_context, key_type="ffn_in_ln"):
    """f(c_r) of every row r [n - 1, d], as the datastore pass sees it: in the window that scores row r,
    which starts at a multiple of the stride (the model is causal: later tokens do not matter)."""
    block = model.cfg.block_size
    stride = block - min_context
    begins = [max(0, (r - min_context) // stride * stride) for r in range(len(tokens) - 1)]
    windows = {b: model(tokens[None, b:b + block], key_type=key_type)[1][0] for b in set(begins)}
    return torch.stack([windows[b][r - b] for r, b in enumerate(begins)])


def test_datastore_rows_hold_every_context_key_and_the_next_token():
    model, tokens = datastore_text()
    keys, vals = rows(knnlm.datastore_rows(model, tokens, min_context=6, batch_size=3))
    assert keys.dtype == torch.float32 and keys.shape == (len(tokens) - 1, 16)
    assert torch.equal(vals, tokens[1:])  # row r: the value tokens[r + 1] ...
    assert torch.allclose(keys, context_keys(model, tokens, 6), atol=1e-5)  # ... and the key f(tokens[:r + 1])
    one_by_one, _ = rows(knnlm.datastore_rows(model, tokens, min_context=6, batch_size=1))
    assert torch.allclose(one_by_one, keys, atol=1e-5)
    other, _ = rows(knnlm.datastore_rows(model, tokens, key_type="block_out", min_context=6))
    assert torch.allclose(other, context_keys(model, tokens, 6, "block_out"), atol=1e-5)


def test_datastore_rows_of_given_windows():
    model, tokens = datastore_text()
    # the third and fourth windows (block 16, min_context 6): rows 26..35 and 36..45
    keys, vals = rows(knnlm.datastore_rows(model, tokens, min_context=6, windows=[(20, 36, 6), (30, 46, 6)]))
    assert torch.equal(vals, tokens[27:47])
    assert torch.allclose(keys, context_keys(model, tokens, 6)[26:46], atol=1e-5)


# ---------------------------------------------------------------- topk_l2

@pytest.mark.parametrize("N, k, key_chunk, query_block, key_dtype", [
    (5000, 7, 1 << 18, 256, torch.float32),  # one chunk
    (5000, 1024, 1000, 16, torch.float16),   # k larger than a chunk; the merge keeps the best k
    (4097, 33, 4096, 5, torch.float32),      # the last chunk holds one key
    (1500, 1, 512, 7, torch.float16),
    (300, 300, 128, 7, torch.float32),       # k == N
])
def test_topk_l2_equals_brute_force(N, k, key_chunk, query_block, key_dtype):
    queries, keys = make_data("clustered", N, 24, 33, seed=N + k)
    keys = keys.to(key_dtype)
    dists, ids = knnlm.topk_l2(queries, keys, k, key_chunk=key_chunk, query_block=query_block)
    assert_exact_neighbours(dists, ids, queries, keys, k)  # tests/test_search.py: a float64 brute force
    again = knnlm.topk_l2(queries, keys, k, knnlm.squared_norms(keys), key_chunk=key_chunk, query_block=query_block)
    assert torch.equal(dists, again[0]) and torch.equal(ids, again[1])  # given key norms: the same


# ---------------------------------------------------------------- knn_log_prob (eq. 2)

def test_knn_log_prob_by_hand():
    dists = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 4.0]])
    vals = torch.tensor([[7, 4, 7], [2, 3, 3]])
    e = math.exp
    # weights exp(-d), normalised; the target's are summed
    log_p = knnlm.knn_log_prob(dists, vals, torch.tensor([7, 3]))
    expected = [math.log((e(-1) + e(-3)) / (e(-1) + e(-2) + e(-3))),
                math.log((e(-0.5) + e(-4)) / (2 * e(-0.5) + e(-4)))]
    assert log_p.tolist() == pytest.approx(expected)
    # a temperature divides the distances
    log_p = knnlm.knn_log_prob(dists, vals, torch.tensor([4, 2]), temperature=2.0)
    expected = [math.log(e(-1) / (e(-0.5) + e(-1) + e(-1.5))), math.log(e(-0.25) / (2 * e(-0.25) + e(-2)))]
    assert log_p.tolist() == pytest.approx(expected)
    # every neighbour carries the target: probability 1; none does: 0, not NaN
    assert knnlm.knn_log_prob(dists[:1], torch.full((1, 3), 5), torch.tensor([5])).item() == pytest.approx(0.0)
    assert knnlm.knn_log_prob(dists, vals, torch.tensor([9, 9])).tolist() == [-math.inf, -math.inf]
    # a row whose neighbours are all missing (FAISS found none: distance inf)
    assert knnlm.knn_log_prob(torch.full((1, 3), math.inf), vals[:1], torch.tensor([7])).item() == -math.inf


def test_knn_log_prob_at_extreme_temperatures():
    dists, vals = torch.tensor([[3.0, 5.0, 5.0, 9.0]]), torch.tensor([[7, 8, 9, 7]])
    for T in (1e-300, 1e-40, 1e-3):  # the nearest neighbour takes all the mass
        assert knnlm.knn_log_prob(dists, vals, torch.tensor([7]), T).item() == pytest.approx(0.0, abs=1e-6)
        assert knnlm.knn_log_prob(dists, vals, torch.tensor([8]), T).item() < -1e3  # probability ~0
    for T in (1e6, 1e300):           # every neighbour weighs the same
        assert knnlm.knn_log_prob(dists, vals, torch.tensor([7]), T).item() == pytest.approx(math.log(0.5))
    # far neighbours: the same answer at distances 1e6 away as at distances near 0
    far = knnlm.knn_log_prob(dists + 1e6, vals, torch.tensor([7]), 1.0)
    assert far.item() == pytest.approx(knnlm.knn_log_prob(dists, vals, torch.tensor([7]), 1.0).item(), abs=1e-5)


# ---------------------------------------------------------------- knn_distribution (eq. 2)

def test_knn_distribution_by_hand():
    dists = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    vals = torch.tensor([[7, 4, 7], [1, 1, 2]])
    e = math.exp
    z = e(-1) + e(-2) + e(-3)
    p = knnlm.knn_distribution(dists, vals, vocab_size=10)
    assert p.shape == (2, 10)
    expected = torch.zeros(2, 10)
    expected[0, 7], expected[0, 4] = (e(-1) + e(-3)) / z, e(-2) / z
    expected[1, 1], expected[1, 2] = 2 / 3, 1 / 3
    assert torch.allclose(p, expected)
    z2 = e(-0.5) + e(-1) + e(-1.5)
    assert knnlm.knn_distribution(dists, vals, 10, temperature=2.0)[0, 4].item() == pytest.approx(e(-1) / z2)


# ---------------------------------------------------------------- interpolate (eq. 3)

def test_interpolate_when_a_probability_is_zero():
    log_p_lm = torch.tensor([math.log(0.2), math.log(0.2), -math.inf])
    log_p_knn = torch.tensor([-math.inf, math.log(0.6), math.log(0.6)])
    for lmbda in (0.0, 0.25, 1.0):
        direct = (lmbda * log_p_knn.exp() + (1 - lmbda) * log_p_lm.exp()).log()
        mixed = knnlm.interpolate(log_p_lm, log_p_knn, lmbda)
        assert not mixed.isnan().any() and torch.allclose(mixed, direct), lmbda
    assert torch.equal(knnlm.interpolate(log_p_lm, log_p_knn, 1.0), log_p_knn)  # λ = 1 is p_kNN
    assert knnlm.interpolate(log_p_lm.double(), log_p_knn.double(), 0.5).dtype == torch.float64
