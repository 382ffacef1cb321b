"""The n-gram LM of section 6's analysis (experiments/kneser_ney.py): nltk's interpolated Kneser-Ney on a small
text, probabilities that sum to 1 over the vocabulary, and its interpolation with the LM at weight 0 is the LM."""
import math

import numpy as np
import pytest
import torch
from nltk.lm import KneserNeyInterpolated
from nltk.util import everygrams

import knnlm
from experiments.kneser_ney import KneserNey
from helpers import WORDS


def small_text(n=400, seed=0):
    """Words with some structure: a few fixed phrases among random words."""
    rng = np.random.default_rng(seed)
    words, phrases = sorted(set(WORDS)), [["the", "cat", "sat"], ["on", "a", "mat"], ["the", "dog", "ran"]]
    out = []
    while len(out) < n:
        out += phrases[rng.integers(3)] if rng.random() < 0.5 else [words[rng.integers(len(words))]]
    return out[:n], words


@pytest.mark.parametrize("order", [2, 3, 4])
def test_the_same_probabilities_as_nltk(order):
    text, words = small_text()
    ids = {w: i for i, w in enumerate(words)}
    theirs = KneserNeyInterpolated(order, discount=0.1)
    theirs.fit([list(everygrams(text, max_len=order))], vocabulary_text=text)
    ours = KneserNey([ids[w] for w in text], order, len(words), discounts=[0.0] + [0.1] * (order - 1))
    checked = 0
    for t in range(order, len(text), 7):  # contexts past the start of the text (nltk divides by 0 there)
        context = text[t - order + 1:t]
        for w in words:
            assert ours.prob([ids[c] for c in context], ids[w]) == pytest.approx(theirs.score(w, context), rel=1e-9,
                                                                                   abs=1e-12)
            checked += 1
    assert checked > 500


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_probabilities_sum_to_one_over_the_vocabulary(order):
    text, words = small_text()
    V = len(words) + 3  # three words never seen: the uniform floor gives them a share
    ours = KneserNey([words.index(w) for w in text], order, V)
    contexts = [[words.index(w) for w in text[t - 4:t]] for t in (10, 50, 200)] + [[V - 1, V - 2, V - 3, V - 1], []]
    for context in contexts:  # seen, and never seen
        probs = [ours.prob(context, w) for w in range(V)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-12)
        assert min(probs) > 0


def test_log_probs_score_a_text_as_the_evaluation_does():
    text, words = small_text()
    tokens = [words.index(w) for w in text]
    ours = KneserNey(tokens[:300], 3, len(words))
    log_p = ours.log_probs(tokens)
    assert len(log_p) == len(tokens) - 1
    assert log_p[50] == pytest.approx(math.log(ours.prob(tokens[49:51], tokens[51])))


def test_interpolation_with_an_ngram_lm_at_weight_zero_is_the_lm():
    text, words = small_text()
    tokens = [words.index(w) for w in text]
    log_p_ngram = torch.tensor(KneserNey(tokens, 3, len(words)).log_probs(tokens))
    log_p_lm = torch.log_softmax(torch.randn(len(tokens) - 1, len(words)), 1)[torch.arange(len(tokens) - 1),
                                                                              torch.tensor(tokens[1:])]
    assert torch.equal(knnlm.interpolate(log_p_lm, log_p_ngram, 0.0), log_p_lm)


def test_bad_discounts_are_refused():
    with pytest.raises(ValueError, match="discounts must be 2 numbers"):
        KneserNey([0, 1, 0], 2, 2, discounts=[0.5])
