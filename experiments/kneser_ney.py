"""
An interpolated Kneser-Ney n-gram LM over token ids, for section 6's argument (experiments/ngrams.py):
Chen & Goodman (1998), section 3.5 / 4.1.6, with one absolute discount per order.

    p_n(w | h) = max(c_n(h w) - D_n, 0) / c_n(h ·) + D_n N1+(h ·) / c_n(h ·) p_{n-1}(w | h')

where h' is h without its first token; c_n is the count of the n-gram at the highest order and its
continuation count N1+(· h w) (the number of distinct tokens seen before it) at the lower ones;
N1+(h ·) is the number of distinct tokens seen after h; a context never seen backs off whole. The
unigram level is interpolated with the uniform distribution over the vocabulary, so every token
has a probability and, for any context, they sum to 1. D_n = n1 / (n1 + 2 n2) from the number of
n-grams counted once and twice at that order (Chen & Goodman's estimate; n1 at least 1), unless given.

nltk.lm.KneserNeyInterpolated computes the same probabilities (with one fixed discount and no
uniform floor: discounts=(0, D, D, ...)); tests/test_ngrams.py compares the two on a small text.
It scans every n-gram of the next order for each continuation count, which is too slow for
WikiText-103-small: here every count is made in one pass over the text.
"""
import math
from collections import Counter, defaultdict


class KneserNey:
    """An interpolated Kneser-Ney LM of the given order over a text of token ids in [0, vocab_size)."""

    def __init__(self, tokens, order, vocab_size, discounts=None):
        self.order, self.vocab_size = order, vocab_size
        tokens = [int(t) for t in tokens]
        grams = {n: Counter(zip(*(tokens[i:] for i in range(n)))) for n in range(1, order + 1)}
        # c_n: the count at the highest order, the continuation count below it
        self.counts = {order: grams[order]}
        for n in range(1, order):
            self.counts[n] = Counter(gram[1:] for gram in grams[n + 1])
        self.totals, self.followers = {}, {}   # per order: context -> c_n(h ·), N1+(h ·)
        for n, counts in self.counts.items():
            totals, followers = defaultdict(int), defaultdict(int)
            for gram, c in counts.items():
                totals[gram[:-1]] += c
                followers[gram[:-1]] += 1
            self.totals[n], self.followers[n] = dict(totals), dict(followers)
        if discounts is None:
            discounts = []
            for n in range(1, order + 1):
                n1 = sum(1 for c in self.counts[n].values() if c == 1)
                n2 = sum(1 for c in self.counts[n].values() if c == 2)
                n1 = max(n1, 1)  # a discount of 0 would leave no mass for the order below
                discounts.append(n1 / (n1 + 2 * n2))
        if len(discounts) != order or not all(0 <= d <= 1 for d in discounts):
            raise ValueError(f"discounts must be {order} numbers in [0, 1], got {discounts}")
        self.discounts = dict(zip(range(1, order + 1), discounts))

    def prob(self, context, word):
        """p(word | the last order - 1 tokens of context)."""
        context = tuple(int(t) for t in context[len(context) - self.order + 1:]) if self.order > 1 else ()
        return self._prob(context, int(word))

    def _prob(self, context, word):
        n = len(context) + 1
        lower = self._prob(context[1:], word) if n > 1 else 1 / self.vocab_size
        total = self.totals[n].get(context, 0)
        if not total:  # a context never seen: all of its mass from the order below
            return lower
        D = self.discounts[n]
        return (max(self.counts[n].get(context + (word,), 0) - D, 0) + D * self.followers[n][context] * lower) / total

    def log_probs(self, tokens, start=0):
        """log p(tokens[t + 1] | tokens[:t + 1]) for t = start .. len(tokens) - 2: a text scored as
        knnlm.score_split scores it (its targets are tokens[1:])."""
        tokens = [int(t) for t in tokens]
        k = self.order - 1
        return [math.log(self._prob(tuple(tokens[max(0, t + 1 - k):t + 1]) if k else (), tokens[t + 1]))
                for t in range(start, len(tokens) - 1)]
