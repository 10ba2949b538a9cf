"""Batched sampling is lossless per row, and a row never sees another row or a stale slot.

- Chi-square per row: a batch of rows with different prompts (and lengths), each row's 3-token
  continuation counted over seeded batched runs and compared with the row's exactly enumerated
  warped target distribution (Bonferroni over rows), for a sampled chain at temperature 1.0 and a
  tree drawn without replacement at 0.7 with top-k; every row's depth-1 acceptance is in the batch-1 cells'
  band (it accepts drafts and rejects them often). A planted off-by-one in the row index of the rows' offsets fails the
  same test, for both.
- Leak: noise in the other rows and in a row's stale slots leaves that row's logits unchanged.
- Hypothesis: after any sequence of ragged tree writes, compactions, rollbacks, row drops and rows
  admitted later (continuous batching), each row's slots hold exactly what a batch-1 prefill of
  that row's committed tokens would write.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drafters import DraftModelDrafter
from specdec import SamplingParams, SpeculativeDecoder
from specdec.batch_cache import BatchCache
from specdec.stats import DecodeStats
from tests.lossless import ACCEPTANCE_BAND, ALPHA, NEW, chi_square_pvalue, exact_distribution
from tests.tiny_models import pair, peaky_noisy_pair
from verifier.batch import block_forward, prefill_rows

#: Ragged rows (5, 2 and 7 tokens) after which both cases accept about half of their depth-1 drafts on every row
#: (chain 0.43-0.57, tree 0.52-0.72): each row's reject branch runs hundreds of times.
ROW_PROMPTS = [[2, 3, 2, 4, 1], [5, 2], [2, 3, 0, 0, 5, 1, 1]]
SEED_BASE = 10**6  # seeds apart from those of the batch-1 distribution tests
CASES = {
    "chain_t1.0": (lambda d: DraftModelDrafter(d, num_speculative_tokens=2), SamplingParams(temperature=1.0)),
    "tree_without_t0.7_topk3": (lambda d: DraftModelDrafter(d, tree=[[0], [1], [0, 0]], tree_sampling="without_replacement"),
                                SamplingParams(temperature=0.7, top_k=3)),
}


def _row_counts(target, drafter, sampling, runs: int) -> tuple[list[dict], list[float]]:
    """Each row's continuation counts over ``runs`` batched runs, and each row's depth-1 acceptance over them."""
    dec = SpeculativeDecoder(target, drafter, "rejection", sampling)
    prompts = [torch.tensor([p]) for p in ROW_PROMPTS]
    counts: list[dict] = [{} for _ in prompts]
    stats: list[list] = [[] for _ in prompts]
    for run in range(runs):
        out = dec.generate_batch(prompts, max_new_tokens=NEW, seed=SEED_BASE + run * len(prompts))  # distinct seeds
        for row, seq in enumerate(out.sequences):
            key = tuple(seq[0, -NEW:].tolist())
            counts[row][key] = counts[row].get(key, 0) + 1
            stats[row].append(out.row_stats[row])
    return counts, [DecodeStats.merge(s).acceptance_rate_by_depth[0] for s in stats]


def _pvalues(case: str, runs: int) -> tuple[list[float], list[float]]:
    """Each row's chi-square p-value against its exact distribution, and its depth-1 acceptance."""
    target, draft = peaky_noisy_pair()
    make, sampling = CASES[case]
    counts, rates = _row_counts(target, make(draft), sampling, runs)
    return [chi_square_pvalue(c, exact_distribution(target, sampling, torch.tensor([p])), runs)
            for c, p in zip(counts, ROW_PROMPTS)], rates


@pytest.mark.parametrize("case", list(CASES))
def test_every_row_follows_its_target_distribution(case):
    """Every row passes, and every row's depth-1 acceptance is in the band: it accepts drafts (a rule that rejected
    every draft would pass the chi-square test by sampling the target alone) and rejects them often (else the
    reject branch, its residual distribution, would barely run on that row)."""
    pvalues, rates = _pvalues(case, 1500)
    assert min(pvalues) > ALPHA / len(ROW_PROMPTS), pvalues  # Bonferroni over the rows
    low, high = ACCEPTANCE_BAND
    assert all(low <= rate <= high for rate in rates), rates


@pytest.mark.parametrize("case", list(CASES))
def test_a_planted_row_offset_bug_fails(monkeypatch, case):
    """Each row's key mask built with the previous row's length (an off-by-one in the row index of the
    offsets): rows see too much or too little of their own prefix, and the test must notice, for the chain and
    for the tree."""
    original = BatchCache.block_mask

    def shifted(self, tree_mask):
        own = self.lengths
        self.lengths = torch.roll(own, 1)  # row b gets row b - 1's offset
        try:
            return original(self, tree_mask)
        finally:
            self.lengths = own

    monkeypatch.setattr(BatchCache, "block_mask", shifted)
    pvalues, _ = _pvalues(case, 1000)
    assert min(pvalues) < ALPHA / len(ROW_PROMPTS), pvalues


def test_other_rows_and_stale_slots_do_not_leak():
    target = pair("llama")[0]
    rows = [[5, 9, 13, 2, 7], [3, 4], [8, 8, 8, 1, 6, 6, 6, 2]]
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool).expand(3, 3, 3)  # root + 2 children
    ids, depth = torch.tensor([[11, 3, 4]] * 3), torch.tensor([[0, 1, 1]] * 3)

    @torch.inference_mode()
    def verify(noise: bool) -> torch.Tensor:
        cache = BatchCache.for_model(target, 32, 3)
        prefill_rows(target, cache, rows, output_hidden=False)
        if noise:
            gen = torch.Generator().manual_seed(0)
            for layer in cache.layers:
                for buf in (layer.keys, layer.values):
                    clean = buf[0, :, : len(rows[0])].clone()
                    buf.copy_(torch.randn(buf.shape, generator=gen) * 50)  # other rows and row 0's stale slots
                    buf[0, :, : len(rows[0])] = clean
        logits, _ = block_forward(target, cache, ids, depth, tree)  # [3, 3, V]
        return logits[0]

    torch.testing.assert_close(verify(noise=True), verify(noise=False), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the per-row cache, property-based

H, D = 2, 3


def _kv(tokens: list[int], positions: list[int]) -> torch.Tensor:
    """What a model would write for ``tokens`` at ``positions``: ``[H, n, D]`` (keys; values are the negation)."""
    code = torch.tensor([t * 1000 + p for t, p in zip(tokens, positions)], dtype=torch.float32)  # [n]
    return code[None, :, None].expand(H, -1, D) + torch.arange(H, dtype=torch.float32)[:, None, None]


def _write_block(cache: BatchCache, blocks: list[tuple[list[int], list[int]]]) -> None:
    """Write every row's block (tokens, depths), right-padded, through the layer's ``update``."""
    n = max(len(t) for t, _ in blocks)
    cache.begin_block(n)
    keys = torch.zeros(cache.batch, H, n, D)
    for b, (tokens, depths) in enumerate(blocks):
        pad = n - len(tokens)
        keys[b] = _kv(tokens + [0] * pad, [cache.host_lengths[b] + d for d in depths] + [0] * pad)
    cache.layers[0].update(keys, -keys)


@st.composite
def _ops(draw):
    rows = draw(st.integers(1, 4))
    prompts = [draw(st.lists(st.integers(1, 50), min_size=1, max_size=6)) for _ in range(rows)]
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["tree", "tree", "rollback", "drop", "admit"]))
        trees = []
        for _ in range(rows + 6):  # admitted rows need trees too
            n = draw(st.integers(0, 6))
            parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
            trees.append((parents, draw(st.lists(st.integers(1, 50), min_size=n + 1, max_size=n + 1)),
                          draw(st.integers(0, n))))
        steps.append((kind, trees, draw(st.integers(0, 3)), draw(st.integers(0, 10))))
    return prompts, steps


def _path(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@settings(max_examples=1000, deadline=None)
@given(_ops())
@torch.inference_mode()
def test_each_row_holds_a_prefill_of_its_tokens(case):
    prompts, steps = case
    cache = BatchCache(num_layers=1, capacity=64, batch=len(prompts))
    committed = [list(p) for p in prompts]
    _write_block(cache, [(p, list(range(len(p)))) for p in prompts])
    cache.keep_block([list(range(len(p))) for p in prompts])
    for kind, trees, row, cut in steps:
        live = len(committed)
        if kind == "drop" and live > 1:
            keep = [i for i in range(live) if i != row % live]
            cache.select_rows(keep)
            committed = [committed[i] for i in keep]
        elif kind == "admit":  # continuous batching: a new prompt prefilled on its own, appended
            prompt = trees[0][1]
            fresh = BatchCache(num_layers=1, capacity=64, batch=1)
            _write_block(fresh, [(prompt, list(range(len(prompt))))])
            fresh.keep_block([list(range(len(prompt)))])
            cache.extend(fresh)
            committed.append(list(prompt))
        elif kind == "rollback":
            lengths = [max(1, n - cut) for n in cache.host_lengths]
            cache.set_lengths(lengths)
            committed = [c[:n] for c, n in zip(committed, lengths)]
        else:  # a verify block: root + tree per row, then keep root + one accepted path
            blocks, keeps = [], []
            for (parents, tokens, pick), _ in zip(trees[:live], range(live)):
                depth = [0] + [len(_path(parents, i)) for i in range(len(parents))]
                blocks.append((tokens, depth))
                path = _path(parents, pick - 1) if pick else []
                keeps.append([0] + [1 + i for i in path])
            _write_block(cache, blocks)
            cache.keep_block(keeps)
            for c, (tokens, _), keep in zip(committed, blocks, keeps):
                c.extend(tokens[j] for j in keep)
        for b, tokens in enumerate(committed):
            assert cache.host_lengths[b] == len(tokens) == int(cache.lengths[b])
            want = _kv(tokens, list(range(len(tokens))))  # [H, n, D]
            assert torch.equal(cache.layers[0].keys[b, :, : len(tokens)], want)
            assert torch.equal(cache.layers[0].values[b, :, : len(tokens)], -want)
