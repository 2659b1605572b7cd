"""Length-sorted sub-batches: one collected batch of texts run as a few forward passes of texts of
similar token length, instead of one pass padded to the longest text.

A batch of 32 mixed texts (a 5-token question beside a 120-token review) padded to the longest
spends most of its compute on padding. The texts are sorted by token length and cut into
consecutive groups so as to minimise the padded tokens computed plus a fixed cost per forward
pass (`overhead_tokens`, in token-equivalents): an exact split by dynamic programming over the
sorted lengths (n <= a batch, so O(n^2) is nothing). Each text's result goes back to its place.
"""

from __future__ import annotations

from typing import Sequence

from hm3.errors import Hm3Error

# Measured on the zoo's merged MiniLM, one CPU thread: one forward pass costs about as much as
# ~10-20 padded tokens of work beyond its tokens (batch 1 of 16 tokens ~18 ms; batch 32 of 32
# tokens ~1.1 s, ~1.1 ms a token). RESULTS.md §6 has the A/B measurement of the split.
OVERHEAD_TOKENS = 16


def length_buckets(lengths: Sequence[int],
                   overhead_tokens: float = OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices of `lengths` in sub-batches: sorted by length, consecutive, each padded to its own
    longest; the split minimises sum over sub-batches of (overhead_tokens + size * longest)."""
    if overhead_tokens < 0:
        raise Hm3Error(f"overhead_tokens must be 0 or more, got {overhead_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    # best[j]: the least cost of the first j sorted texts; cut[j]: where its last group starts
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + overhead_tokens + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def predict_by_length(classifier, texts: Sequence[str],
                      overhead_tokens: float = OVERHEAD_TOKENS) -> list[dict]:
    """`classifier.predict(texts)` (an `hm3.model.MultiTaskClassifier`), run in length-sorted
    sub-batches (`length_buckets` over the truncated token lengths); results in `texts`' order."""
    texts = list(texts)
    if len(texts) < 2:  # nothing to sort: skip the tokenisation that measures lengths
        return classifier.predict(texts, batch_size=1) if texts else []
    ids = classifier.tokenizer(texts, truncation=True, max_length=classifier.max_length,
                               verbose=False)["input_ids"]
    results: list = [None] * len(texts)
    for group in length_buckets([len(x) for x in ids], overhead_tokens):
        answers = classifier.predict([texts[i] for i in group], batch_size=len(group))
        for i, answer in zip(group, answers):
            results[i] = answer
    return results
