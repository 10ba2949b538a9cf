"""Mutation pass 16: the fixed-shape ("captured") decode step (:mod:`specdec.static_step`, its draft shapes
:mod:`specdec.static_shape`), trees as data (:mod:`specdec.tree`) and the layer-skip self-draft
(:mod:`drafters.layer_skip`).

Each test names the planted bug it catches: small edits (a comparison, a dropped line, a shifted position) that the
rest of the suite let through. The tiny random models hardly depend on positions, so a step that feeds a token at
the wrong position still emits the right greedy tokens: the step's logits are compared with the models' own full
forwards instead.
"""
from __future__ import annotations

import pytest
import torch

from drafters import DraftModelDrafter, LayerSkipDrafter
from drafters.layer_skip import truncated_view
from specdec import SpeculativeDecoder
from specdec.batch_types import BatchAccept
from specdec.errors import ConfigError
from specdec.models import tiny_random_pair
from specdec.static_step import StaticStep
from specdec.tree import best_tree, compile_tree, load_preset
from tests.tiny_models import noisy_copy, pair

ROWS = [[3, 4, 5], [6, 7]]  # two prompts of different lengths
SPARSE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]  # fed nodes at depths 1 and 2, a leaf at each depth


def _drafter(tree=None):
    draft = noisy_copy("llama")
    return DraftModelDrafter(draft, 3) if tree is None else DraftModelDrafter(draft, tree=tree)


def _step(tree=None, limits=(8, 8)) -> StaticStep:
    """A prefilled ``compile=static`` step over :data:`ROWS` (a chain of 3, or ``tree``), greedy."""
    decoder = SpeculativeDecoder(pair("llama")[0], _drafter(tree), compile="static")
    step = StaticStep.for_decoder(decoder, ROWS, list(limits), [0, 1])
    step.prefill(ROWS)
    return step


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()  # [V]


# --------------------------------------------------------------------------- the static step


@pytest.mark.parametrize("tree", [None, SPARSE], ids=["chain3", "sparse"])
def test_every_logit_of_a_step_equals_the_models_own_full_forward(tree):
    """Planted bugs: the verify forward's root at position ``length + 1`` (``ones_like`` for ``zeros_like`` in its
    offsets), and each fed draft node at position ``length + depth`` (``level.depth`` for ``level.depth - 1`` in
    ``_feed``). Greedy tokens and acceptance stayed the same on the tiny models; the logits do not."""
    step = _step(tree)
    fed, verified = [], []
    feed, rule = step._feed, step.rule
    step._feed = lambda ids, level: fed.append((level.fed.tolist(), feed(ids, level))) or fed[-1][1]
    step.rule = lambda t, logits, *a: verified.append((t.tokens.clone(), logits.clone())) or rule(t, logits, *a)
    step.step()
    (tokens, logits), parents = verified[0], step.shape.parents.tolist()

    def path(b: int, node: int) -> list[int]:  # the tokens from the root's child down to ``node``
        out = []
        while node >= 0:
            out.insert(0, int(tokens[b, node]))
            node = parents[node]
        return out

    assert fed and len(verified) == 1
    for b, prompt in enumerate(ROWS):
        checks = [(step.target, prompt, logits[b, 0])]  # the root: the prompt's own next-token logits
        checks += [(step.target, prompt + path(b, i), logits[b, 1 + i]) for i in range(tokens.shape[1])]
        checks += [(step.draft, prompt + path(b, n), out[b, j]) for nodes, out in fed for j, n in enumerate(nodes)]
        for model, ids, got in checks:
            assert torch.allclose(got.float(), _last_logits(model, ids), atol=1e-4), (b, ids)


def test_a_finished_row_reports_nothing_and_keeps_its_caches_in_place():
    """Planted bugs: a finished row's budget not zeroed (``torch.where(self.finished, 0, ...)`` dropped: it reported
    drafts proposed and accepted), and a finished row's caches advanced all the same (the draft cache's catch-up, the
    target's ``counts + 1``, or the draft length set to ``seq_len`` whatever ``live`` says). The step's docstring:
    finished rows compute but change nothing."""
    step = _step()
    step.finished[0] = True  # as if row 0 had stopped on EOS with room left
    seq = step.seq[0].clone()
    lengths = [c.lengths[0].item() for c in (step.t_cache, step.d_cache)]
    report = step.step()
    assert report[0] == [0, 0, 0, 0, 0], report
    assert torch.equal(step.seq[0], seq) and step.new[0].item() == 0
    assert [c.lengths[0].item() for c in (step.t_cache, step.d_cache)] == lengths
    assert report[1][3] >= 1 and step.new[1].item() == report[1][3]  # the live row decoded


def test_non_finite_logits_at_one_draft_node_flag_the_row():
    """Planted bug: a row flagged only when *every* position's logits were non-finite (``.all(-1).any(-1)`` for
    ``.all(-1).all(-1)``): NaN at one draft node (a token that poisons the target) went on silently, where the
    readable path's ``check_finite`` over all the verified logits raises."""
    step = _step()
    vocab = step.target.config.vocab_size
    tokens = torch.tensor([[10, 11, 12], [20, 21, 22]])  # [B, N]
    decided = BatchAccept(torch.tensor([[0, -1, -1], [-1, -1, -1]]), torch.tensor([1, 0]), torch.tensor([13, 23]))
    logits = torch.zeros(2, 4, vocab)  # [B, 1 + N, V]
    logits[1, 3, 5] = float("nan")  # row 1's deepest node only: its root and first nodes are finite
    step._commit(decided, tokens, step.limit - step.new, torch.tensor([3, 3]), logits)
    assert (step.report[:, 4] & 2).tolist() == [0, 2]


def test_an_undone_step_restores_every_buffer_the_next_step_reads():
    """Planted bug: ``new`` (tokens emitted per row) left out of the step's saved state, so undoing the step that
    compiling (or capturing) runs once left every row one step's tokens short of its limit: the rows stopped early.
    (compile=inductor on the CPU is too slow for the other tests to run under mutation; this checks it directly.)"""
    fresh = _step()
    want = fresh.step()
    step = _step()
    saved = step._save()
    step.step()
    step._restore(saved)
    assert step.step() == want
    assert torch.equal(step.seq, fresh.seq)
    assert (step.new.tolist(), step.seq_len.tolist()) == (fresh.new.tolist(), fresh.seq_len.tolist())


def test_batch_steps_counts_the_batchs_last_step():
    """Planted bug: ``batch_steps`` reported as ``n - 1``: in a fixed-shape batch it is the longest row's steps."""
    decoder = SpeculativeDecoder(pair("llama")[0], _drafter(), compile="static")
    out = decoder.generate_batch([torch.tensor([r]) for r in ROWS], [3, 9])
    assert out.stats.batch_steps == max(s.target_forwards for s in out.row_stats) >= 2


def test_a_graph_step_is_not_kept_for_inductor():
    """Planted bug: the kept steps' key without ``compile``: a decoder switched from ``compile=graph`` to
    ``inductor`` (same rows, same capacity bucket) got the graph step back, refilled, and never compiled."""
    from specdec.static_kept import step_for

    decoder = SpeculativeDecoder(pair("llama")[0], _drafter(), compile="graph")
    graph = step_for(decoder, ROWS, [8, 8], [0, 1], "graph")
    inductor = step_for(decoder, ROWS, [8, 8], [0, 1], "inductor")
    assert inductor is not graph and (graph.compile, inductor.compile) == ("graph", "inductor")
    assert step_for(decoder, ROWS, [8, 8], [0, 1], "graph") is graph  # each kept for its own compile mode


def test_a_new_draft_model_on_the_same_drafter_gets_a_step_of_its_own():
    """Planted bug: the objects a kept step serves without the drafter's model: a draft model swapped on the same
    drafter object replayed the kept step, which still holds the old model (and its cache's shapes)."""
    from specdec.static_kept import step_for

    decoder = SpeculativeDecoder(pair("llama")[0], _drafter(), compile="graph")
    kept = step_for(decoder, ROWS, [8, 8], [0, 1], "graph")
    decoder.drafter.model = pair("llama")[1]  # another draft of the same vocabulary
    fresh = step_for(decoder, ROWS, [8, 8], [0, 1], "graph")
    assert fresh is not kept and fresh.draft is pair("llama")[1] and kept.draft is noisy_copy("llama")


def test_a_shape_refuses_children_it_cannot_grow():
    """Planted bug: :class:`StaticShape` took ``without_replacement`` (its mode check widened): such children can be
    dropped past the draft's support, which renumbers the nodes the fixed shape indexes. Only ``static_drafter``
    refused it before; a shape built directly must too."""
    from specdec.static_shape import StaticShape

    with pytest.raises(ValueError, match="not 'without_replacement'"):
        StaticShape(compile_tree(SPARSE), "without_replacement", "cpu")
    assert StaticShape(compile_tree(SPARSE), "with_replacement", "cpu").num_fed == 3


# --------------------------------------------------------------------------- trees as data


def test_an_empty_tree_has_no_depth():
    """Planted bug: ``max_depth`` of a tree with no paths defaulted to 1 (``default=1``): a shape built from it would
    draft one level of nothing."""
    tree = compile_tree([])
    assert (tree.num_nodes, tree.max_depth) == (0, 0)


def test_an_empty_path_in_a_preset_is_named_as_such():
    """Planted bug: the ``len(t) == 0`` check dropped: an empty path then failed inside ``min()`` ("min() arg is an
    empty sequence"), a message that says nothing about tree paths."""
    with pytest.raises(ValueError, match="must be a non-empty list of sibling ranks"):
        compile_tree([[0], []])
    with pytest.raises(ConfigError, match=r"not a valid tree: tree path \[\] must be a non-empty list"):
        load_preset([[0], []])


def test_a_yml_file_is_read_as_a_file_not_looked_up_as_a_preset_name(tmp_path, monkeypatch):
    """Planted bug: only ``.yaml`` counted as a file suffix (``path.suffix != ".yaml"``), so ``tree=mine.yml`` was
    looked up as the preset ``conf/tree/mine.yml.yaml`` and not found."""
    (tmp_path / "mine.yml").write_text("paths: [[0], [1], [0, 0]]\n")
    monkeypatch.chdir(tmp_path)
    assert load_preset("mine.yml") == [[0], [1], [0, 0]]


def test_paths_given_as_a_string_say_so():
    """Planted bugs: the ``str``/``bytes`` check of ``paths`` dropped (a quoted list is a sequence of characters:
    the error blamed "path 0 ([)"), and ``paths: null`` (``paths`` present but empty) read as a list (``"paths"
    not in data`` for ``data.get("paths") is None``: the error said "paths is empty", not what a tree file needs)."""
    with pytest.raises(ConfigError, match=r"paths is a str \(\[\[0\], \[1\]\]\), not a list of paths"):
        load_preset({"paths": "[[0], [1]]"})
    with pytest.raises(ConfigError, match="has no 'paths:' list"):
        load_preset({"paths": None})


def test_best_tree_without_a_depth_limit_may_be_a_chain_of_all_its_nodes():
    """Planted bug: ``max_depth=None`` read as ``num_nodes - 1`` levels: the best 3 nodes under a steep rank
    profile are a chain of 3, which that limit cut to 2 levels and a second-rank sibling."""
    assert best_tree([0.9, 0.01], 3) == [[0], [0, 0], [0, 0, 0]]
    assert best_tree([0.9, 0.01], 3, max_depth=2) == [[0], [0, 0], [1]]


# --------------------------------------------------------------------------- the layer-skip self-draft


def test_a_target_without_one_of_the_shared_modules_is_refused():
    """Planted bug: ``any`` for ``all`` over ``embed_tokens``/``norm``/``rotary_emb``: a target missing one passed the
    layout check and failed later with an ``AttributeError`` instead of the ConfigError naming the layout."""
    target, _, _ = tiny_random_pair("llama", seed=0, layers=3)
    del target.model.rotary_emb
    with pytest.raises(ConfigError, match="model.layers / model.norm / lm_head"):
        truncated_view(target, 1)


def test_the_view_keeps_the_targets_generation_config_and_its_own_layer_types():
    """Planted bugs: ``view.generation_config = target.generation_config`` dropped (the view's EOS became the
    config's default), and ``layer_types`` left at the target's length (3 entries for a 1-layer view)."""
    target, _, _ = tiny_random_pair("qwen2", seed=0, layers=3)
    target.generation_config.eos_token_id = 7
    view = truncated_view(target, 1)
    assert view.generation_config.eos_token_id == 7
    assert view.config.layer_types == ["full_attention"] and len(target.config.layer_types) == 3


def test_binding_twice_keeps_the_view_and_the_drafters_settings():
    """Planted bugs: ``bind`` rebuilt the view on every call (the ``_target_id`` check dropped: a new model and a
    reset drafter each ``start``), and it built the chain drafter with ``fast_forward=True`` or
    ``confidence_threshold=0.0`` instead of the layer-skip drafter's own settings."""
    target, _, _ = tiny_random_pair("llama", seed=0, layers=3)
    drafter = LayerSkipDrafter(layers=1, num_speculative_tokens=2, target=target, fast_forward=False,
                               confidence_threshold=0.3)
    model = drafter.model
    drafter.bind(target)
    assert drafter.model is model
    assert drafter.fast_forward is False and drafter.confidence_threshold == 0.3
