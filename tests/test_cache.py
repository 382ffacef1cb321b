"""The continuous cache of the paper's Table 1 (knnlm.py, section 7): weight 0 is the LM, a repeated
document's rare words come from the cache, nothing after t enters p at t, and evaluate.py --cache."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import knnlm
from helpers import fails, run, tiny_model


def random_cache(n=300, d=8, V=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (n,), generator=g)
    log_p_lm = F.log_softmax(torch.randn(n, V, generator=g), dim=1).gather(1, targets[:, None])[:, 0]
    return {"queries": torch.randn(n, d, generator=g), "targets": targets, "log_p_lm": log_p_lm}


def test_a_cache_weight_of_zero_is_the_lm_exactly():
    cache = random_cache()
    assert torch.equal(knnlm.cache_log_probs(cache, theta=0.5, lambda_cache=0.0, window=50), cache["log_p_lm"])
    assert not torch.equal(knnlm.cache_log_probs(cache, theta=0.5, lambda_cache=0.1, window=50), cache["log_p_lm"])


def test_p_cache_is_eq_by_hand_and_sums_to_one():
    cache = random_cache(n=40)
    keys, targets, theta, window = cache["queries"], cache["targets"], 0.7, 10
    got = knnlm.cache_log_prob(keys, targets, theta, window, block=7)
    assert got[0] == -math.inf  # nothing before the first position
    for t in range(1, 40):
        i = torch.arange(max(0, t - window), t)
        weights = torch.softmax(theta * keys[i] @ keys[t], dim=0)
        p = torch.zeros(20).index_add_(0, targets[i], weights)
        assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert got[t].exp().item() == pytest.approx(p[targets[t]].item(), abs=1e-6)


def test_p_cache_at_theta_zero_is_the_share_of_the_window_and_far_keys_keep_their_precision():
    cache = random_cache(n=60)
    keys, targets, window = cache["queries"], cache["targets"], 10
    uniform = knnlm.cache_log_prob(keys, targets, 0.0, window).exp()
    for t in range(1, 60):
        seen = targets[max(0, t - window):t]
        assert uniform[t].item() == pytest.approx((seen == targets[t]).float().mean().item(), abs=1e-6)
    far = torch.cat([keys, torch.full((60, 1), 300.0)], dim=1)  # dots ~9e4: exp(θ h_t · h_i) overflows float32
    exact = knnlm.cache_log_prob(keys.double(), targets, 0.5, window)  # the constant 9e4 cancels out
    torch.testing.assert_close(knnlm.cache_log_prob(far, targets, 0.5, window).double(), exact, rtol=0, atol=1e-2)


def test_p_cache_of_many_thetas_at_once_is_each_alone():
    g = torch.Generator().manual_seed(0)
    keys, targets = torch.randn(300, 8, generator=g), torch.randint(6, (300,), generator=g)
    thetas = [0.1, 1.0, 3.0]
    together = knnlm.cache_log_prob(keys, targets, thetas, window=50, block=32)
    for theta, row in zip(thetas, together):
        assert torch.equal(row, knnlm.cache_log_prob(keys, targets, theta, window=50, block=32))


def test_tunings_given_the_grids_already_computed_find_the_same():
    """evaluate.py computes p_kNN at every T and p_cache at every θ once and hands them to each grid search."""
    cache = random_cache(n=200)
    g = torch.Generator().manual_seed(1)
    cache["dists"] = torch.rand(200, 16, generator=g).sort(dim=1).values * 10
    cache["neighbour_vals"] = torch.randint(0, 20, (200, 16), generator=g, dtype=torch.int32)
    thetas, temperatures, window = [0.25, 1.0], [0.5, 4.0], 50
    grid, log_p_caches = knnlm.knn_grid(cache, temperatures), knnlm.cache_grid(cache, thetas, window)
    assert knnlm.tune(cache, knnlm.LAMBDAS, temperatures, grid=grid) == knnlm.tune(cache, knnlm.LAMBDAS, temperatures)
    assert (knnlm.tune_cache(cache, window, thetas, log_p_caches=log_p_caches)
            == knnlm.tune_cache(cache, window, thetas))
    joint = dict(thetas=thetas, lambdas=knnlm.LAMBDAS, temperatures=temperatures)
    assert (knnlm.tune_cache(cache, window, **joint, grid=grid, log_p_caches=log_p_caches)
            == knnlm.tune_cache(cache, window, **joint))
    given = knnlm.cache_log_probs(cache, thetas[1], 0.3, window, 0.2, temperatures[1], log_p_cache=log_p_caches[1],
                                  log_p_knn=grid[1])
    # the grid's p_kNN is knn_log_prob's to float32's rounding (knn_log_prob_grid), and so are the mixtures
    torch.testing.assert_close(given, knnlm.cache_log_probs(cache, thetas[1], 0.3, window, 0.2, temperatures[1]))
    torch.testing.assert_close(knnlm.knnlm_log_probs(cache, 0.2, temperatures[1], log_p_knn=grid[1]),
                               knnlm.knnlm_log_probs(cache, 0.2, temperatures[1]))


def test_a_document_repeated_gets_its_rare_words_from_the_cache():
    """Each rare word r_i follows a word a_i seen nowhere else; keys are the input word's one-hot
    vector, so in the second copy the key before r_i is the first copy's, and p_cache(r_i) is ~1."""
    n_rare, the = 30, 0
    doc = [w for i in range(n_rare) for w in (1 + i, 1 + n_rare + i, the)]  # a_i, r_i, the
    text = torch.tensor(doc + doc)
    keys, targets = F.one_hot(text[:-1], 1 + 2 * n_rare).float(), text[1:]
    p = knnlm.cache_log_prob(keys, targets, theta=20.0, window=len(text)).exp()
    rare = [j for j in range(len(targets)) if 1 + n_rare <= targets[j] < 1 + 2 * n_rare]
    first, second = [j for j in rare if j < len(doc)], [j for j in rare if j >= len(doc)]
    assert len(first) == len(second) == n_rare
    assert (p[first] == 0).all()        # a word never seen before is not in the cache
    assert (p[second] > 0.99).all()     # seen once, one document ago: the cache has it


def test_nothing_after_t_enters_p_at_t():
    cache = random_cache(n=200)
    t = 120
    changed = {name: v.clone() for name, v in cache.items()}
    changed["queries"][t + 1:] = torch.randn(len(cache["queries"]) - t - 1, 8)
    changed["targets"][t + 1:] = (changed["targets"][t + 1:] + 1) % 20  # every token after x_{t+1}
    for window in (16, 1000):
        a = knnlm.cache_log_prob(cache["queries"], cache["targets"], 0.3, window, block=32)
        b = knnlm.cache_log_prob(changed["queries"], changed["targets"], 0.3, window, block=32)
        assert torch.equal(a[:t + 1], b[:t + 1])
        assert not torch.equal(a[t + 1:], b[t + 1:])


def test_nothing_after_t_enters_p_at_t_through_the_model():
    """The same through the model: the texts agree up to token m, so every p up to position m - 1
    (target tokens[m]) is the same, cache and all."""
    model, m = tiny_model(20), 150
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 20, (300,), generator=g)
    b = a.clone()
    b[m + 1:] = torch.randint(0, 20, (300 - m - 1,), generator=g)
    p = [knnlm.cache_log_probs(knnlm.score_split(model, text, min_context=8, progress=False, keep_queries=True),
                               theta=0.5, lambda_cache=0.3, window=64) for text in (a, b)]
    torch.testing.assert_close(p[0][:m], p[1][:m], rtol=1e-6, atol=1e-6)


def test_evaluate_prints_and_writes_table_1(work):
    root, data = work
    run("evaluate.py", "--data", data, "--k", 8, "--tune", "--cache", "--cache-window", 64, "--results", "t1.json",
        cwd=root)
    results = json.loads((root / "t1.json").read_text())
    for split in ("valid", "test"):
        assert math.isfinite(results["cache_ppl"][split]) and math.isfinite(results["knnlm_cache_ppl"][split])
    cache = results["cache"]
    assert cache["window"] == 64 and cache["theta"] in knnlm.CACHE_THETAS and cache["lambda"] in knnlm.CACHE_LAMBDAS
    # tuned on valid: each memory at its best there is no worse than the LM alone (weight 0 is in the grid)
    assert results["cache_ppl"]["valid"] <= results["lm_ppl"]["valid"]
    assert results["knnlm_cache_ppl"]["valid"] <= results["knnlm_ppl"]["valid"] * (1 + 1e-9)
    # at the given θ and weight 0, the cache rows are the LM's and kNN-LM's
    run("evaluate.py", "--data", data, "--k", 8, "--cache", "--cache-window", 64, "--cache-theta", 1,
        "--cache-lambda", 0, "--lambda", 0.25, "--temperature", 8, "--results", "t0.json", cwd=root)
    zero = json.loads((root / "t0.json").read_text())
    assert zero["cache_ppl"] == zero["lm_ppl"] and zero["knnlm_cache_ppl"] == zero["knnlm_ppl"]


@pytest.mark.parametrize("flags, message", [
    (["--cache-window", "0"], "--cache-window: must be a positive integer"),
    (["--cache-theta", "0"], "--cache-theta: must be a finite number in (0, inf)"),
    (["--cache-theta", "inf"], "--cache-theta: must be a finite number"),
    (["--cache-lambda", "1.5"], "--cache-lambda: must be a finite number in [0, 1]"),
    (["--cache"], "--cache needs --cache-theta and --cache-lambda, or --tune"),
    (["--cache", "--tune", "--cache-window", "100000"], "the cache would never fill"),
])
def test_bad_cache_arguments_get_one_line(work, flags, message):
    root, data = work
    fails(run("evaluate.py", "--data", data, "--k", 8, *flags, cwd=root, check=False), message)
