"""The per-category table of the suite benchmark (Spec-Bench's layout), on hand-made timings."""
from __future__ import annotations

import pytest

from experiments.bench_methods import Method
from experiments.bench_suite import category_table


def _method(name: str, seconds: list[float], taus: list[float] | None = None, matches: bool = True) -> Method:
    m = Method(name, run=None, ours=True)
    m.times = {i: [s] for i, s in enumerate(seconds)}
    m.new_tokens = dict.fromkeys(range(len(seconds)), 12)
    m.tau = dict(enumerate(taus)) if taus else {}
    m.forwards = {i: round(12 / t) for i, t in enumerate(taus)} if taus else {}
    m.matches = matches
    return m


def test_speedup_and_tau_per_category_and_overall():
    categories = ["coding", "coding", "qa", "math_reasoning"]
    base = _method("hf_plain", [1.0, 1.0, 1.0, 1.0])
    fast = _method("ours_x", [0.5, 0.5, 1.0, 2.0], taus=[3.0, 2.0, 1.0, 1.5], matches=False)
    rows, table = category_table([base, fast], categories, "hf_plain")
    mine = rows[1]
    # tau pooled over the category's prompts, as Spec-Bench's: 24 tokens in 4 + 6 forwards, not (3 + 2) / 2
    assert mine["coding"]["speedup"] == pytest.approx(2.0) and mine["coding"]["tau"] == pytest.approx(2.4)
    assert mine["qa"]["speedup"] == pytest.approx(1.0) and mine["math_reasoning"]["speedup"] == pytest.approx(0.5)
    assert mine["overall"]["speedup"] == pytest.approx(48 / 4.0 / (48 / 4.0))  # 48 tokens in 4 s, as the baseline
    lines = table.splitlines()
    assert lines[0] == "| method | coding | qa | math_reasoning | overall | output = HF plain greedy |"  # suite order
    assert lines[3].startswith("| ours_x | 2.00x (tau 2.40) |") and lines[3].endswith("| NO |")
    _, sampled = category_table([base, fast], categories, "hf_plain", checked=False)
    assert "HF plain" not in sampled and not sampled.splitlines()[3].endswith("| NO |")


def test_a_category_without_target_forwards_has_no_tau():
    """Prompts ended by the prefill's own token (EOS first, or ``--max-new-tokens 1``) make no verify forward:
    the category's pooled tau is None (shown as such), not a ZeroDivisionError that loses the whole benchmark."""
    from experiments.bench_methods import pooled_tau

    base = _method("hf_plain", [1.0, 1.0, 1.0])
    ours = _method("ours_x", [0.5, 0.5, 1.0], taus=[3.0, 2.0, 1.0])
    ours.new_tokens[0] = ours.new_tokens[1] = 1
    ours.forwards[0] = ours.forwards[1] = 0
    rows, _ = category_table([base, ours], ["coding", "coding", "qa"], "hf_plain")
    assert rows[1]["coding"]["tau"] is None and rows[1]["qa"]["tau"] == pytest.approx(1.0)
    assert pooled_tau(ours) == pytest.approx(14 / 12) and pooled_tau(ours, [0, 1]) is None
    assert pooled_tau(base) is None  # HF's methods count no forwards
    from experiments.bench_methods import tau_cell  # bench's and bench_drafters' cell: no TypeError on None
    assert tau_cell({"tau": 0.0, "tau_pooled": None}) == "0.00 / -" and tau_cell({"tau": None, "tau_pooled": None}) == ""


ARGS = ["--k", "3", "--confidence", "0.3", "--eagle", ",", "--layer-skip", "1"]  # ",": no EAGLE heads


def test_confidence_thresholds_add_dynamic_length_rows():
    """``--confidence 0.3``: each draft-model chain (and HF assisted generation) also with the threshold; with
    ``--methods`` only the picked methods' drafters are timed (every drafter's forward was)."""
    from experiments.bench_suite import build_methods, parse_args, picked_drafters
    from tests.tiny_models import noisy_copy, pair

    target = pair("llama")[0]
    args = parse_args(ARGS)
    names = [m.name for m in build_methods(target, noisy_copy("llama"), None, args)]
    assert {"hf_assisted_k3", "hf_assisted_k3_conf0.3", "ours_draft_k3", "ours_draft_k3_conf0.3"} <= set(names)
    from experiments.bench_suite import drafters_for

    found = drafters_for(target, noisy_copy("llama"), None, args)
    assert found["ours_draft_k3_conf0.3"].confidence_threshold == 0.3 and found["ours_draft_k3"].confidence_threshold == 0

    picked = build_methods(target, noisy_copy("llama"), None, parse_args([*ARGS, "--methods", "ours_draft_k3"]))
    assert list(picked_drafters(target, noisy_copy("llama"), None, args, picked)) == ["ours_draft_k3"]  # costs: these
    hybrid = parse_args([*ARGS, "--hybrid", "2", "--methods", "ours_ngram+layer_skip1_k3"])  # its model part's cost
    picked = build_methods(target, noisy_copy("llama"), None, hybrid)
    assert list(picked_drafters(target, noisy_copy("llama"), None, hybrid, picked)) == ["ours_layer_skip1_k3"]


def test_hybrid_puts_each_model_drafter_behind_lookup():
    """``--hybrid 2``: every drafter that runs a model (draft chain, layer-skip) also behind prompt lookup, sharing
    its model; the n-gram and the autoregressive loop get no twin."""
    from drafters import HybridDrafter, NGramDrafter
    from experiments.bench_suite import build_methods, parse_args
    from tests.tiny_models import noisy_copy, pair

    target, draft = pair("llama")[0], noisy_copy("llama")
    args = parse_args(["--k", "3", "--eagle", ",", "--layer-skip", "1", "--hybrid", "2", "--ngram-tokens", "6"])
    names = [m.name for m in build_methods(target, draft, None, args)]
    assert sorted(n for n in names if "+" in n) == ["ours_ngram+draft_k3", "ours_ngram+layer_skip1_k3"]
    from experiments.bench_suite import behind_lookup_all, drafters_for

    ours = drafters_for(target, draft, None, args)
    twins = behind_lookup_all(ours, args)
    hybrid = twins["ours_ngram+draft_k3"]
    assert isinstance(hybrid, HybridDrafter) and isinstance(hybrid.first, NGramDrafter)
    assert hybrid.first.min_ngram == 2 and hybrid.first.k == 6
    assert hybrid.second is not ours["ours_draft_k3"] and hybrid.second.model is ours["ours_draft_k3"].model
    assert not hybrid.merge
    args.merge = True  # --merge: each twin also with merged trees
    merged = behind_lookup_all(ours, args)
    assert sorted(merged) == ["ours_ngram+draft_k3", "ours_ngram+draft_k3_merged", "ours_ngram+layer_skip1_k3",
                              "ours_ngram+layer_skip1_k3_merged"]
    assert merged["ours_ngram+draft_k3_merged"].merge and not merged["ours_ngram+draft_k3"].merge
    args.temperature = 0.7  # sampled chains cannot be merged: no merged row (the decoder refused it, mid-bench)
    assert sorted(behind_lookup_all(ours, args)) == ["ours_ngram+draft_k3", "ours_ngram+layer_skip1_k3"]
    args.hybrid = 0
    assert behind_lookup_all(ours, args) == {}


def test_reduced_precision_rows_show_the_greedy_deficit():
    """``--dtype bfloat16``: each row also says whether its outputs are greedy up to rounding, with the largest deficit."""
    categories = ["coding", "qa"]
    base, mine = _method("hf_plain", [1.0, 1.0]), _method("ours_x", [0.5, 1.0], taus=[2.0, 1.0], matches=False)
    rows, table = category_table([base, mine], categories, "hf_plain", deficits={"hf_plain": (0.1, True),
                                                                                 "ours_x": (2.5, False)})
    lines = table.splitlines()
    assert lines[0].endswith("| output = HF plain greedy | greedy up to rounding (largest deficit) |")
    assert lines[1].count("---") == 6  # method, 2 categories, overall, 2 checks
    assert lines[2].endswith("| yes | yes (0.100) |") and lines[3].endswith("| NO | NO (2.500) |")
    assert rows[1]["greedy_deficit"] == 2.5 and rows[1]["greedy_up_to_rounding"] is False


def test_an_unknown_model_is_named_before_other_flags(capsys):
    """``bench --model <unknown>`` with flags the suite bench does not take: the error names the unknown model (its
    type check runs as it is parsed), not only the flags (found by a new-user trial)."""
    from experiments.bench import main

    with pytest.raises(SystemExit) as exit_:
        main(["--prompts", "2", "--ks", "2", "--model", "nosuchmodel"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --model: unknown pretrained model 'nosuchmodel'; choose one of ['smollm2']")
    assert err.count("\n") == 1


def test_draft_cost_ratios_time_width_one_only(monkeypatch):
    """``drafter_costs`` divides one draft forward (a probe's call where the drafter has one) by one target forward
    and asks for width 1 only: the target's whole width curve (15 widths, measured twice and never cached where
    a busy machine made it look implausible, again per drafter) took most of a suite run's time."""
    from types import SimpleNamespace

    from experiments import cost_measure
    from experiments.bench_suite import drafter_costs

    asked = []

    def curves(requests, *args, **kwargs):
        asked.append([(model, widths) for model, _, widths in requests])
        return [({1: 0.01 if model == "target" else 0.004}, False) for model, _, _ in requests]

    monkeypatch.setattr(cost_measure, "cost_curves", curves)
    monkeypatch.setattr(cost_measure, "time_probe", lambda probe: probe())

    def drafter(model=None, probe=None):
        return SimpleNamespace(step_shape=lambda target: SimpleNamespace(draft_model=model, draft_probe=probe))

    methods = {"draft": drafter(model="draft"), "heads": drafter(probe=lambda: 0.002), "lookup": drafter()}
    ratios = drafter_costs("target", methods, context=64)
    assert ratios == pytest.approx({"draft": 0.4, "heads": 0.2})  # a lookup runs no model: no ratio
    assert asked == [[("target", (1,)), ("draft", (1,))], [("target", (1,))]]


@pytest.mark.parametrize("argv, draft_missing, medusa, eagle, says", [
    (["--draft-vocab-from", "/h"], "the distilled draft of smollm2 is not built: build it once with `B`", None, [],
     "--draft-vocab-from adds a row of the distilled draft, but the distilled draft of smollm2 is not built"),
    (["--medusa-nodes", "8"], None, None, [], "--medusa-nodes adds Medusa rows, but no Medusa heads are cached"),
    (["--medusa-dynamic", "8"], None, None, [], "train_medusa target=smollm2 generated_source=chats`, give --medusa"),
    (["--eagle-budget", "8"], None, "/m", [], "--eagle-budget adds EAGLE rows, but no EAGLE heads are cached"),
    (["--confidence", "0.5"], "not built", "/m", [], "--confidence adds draft-model and EAGLE rows"),
    (["--confidence", "0.5"], None, None, [], None),  # the draft's chains and HF assisted read it
    (["--confidence", "0.5", "--eagle-budget", "8"], "not built", None, ["/e"], None),  # the EAGLE rows read both
    (["--medusa-nodes", "8", "--draft-vocab-from", "/h"], None, "/m", [], None),
])
def test_options_that_would_add_no_row_are_one_error(argv, draft_missing, medusa, eagle, says, monkeypatch):
    """An option whose rows need a drafter that is not there (no distilled draft, no cached heads) would leave its
    rows out of the table without a word: one error naming the flag and how to get the drafter, before anything
    runs. With the drafter there, nothing is refused."""
    from experiments import bench_suite_inputs
    from experiments.bench_suite import parse_args
    from specdec.errors import SpecDecError

    monkeypatch.setattr(bench_suite_inputs, "eagle_dirs", lambda args, target: eagle)
    args = parse_args(argv)
    if says is None:
        bench_suite_inputs.check_rows(args, draft_missing, medusa, target=None)
        return
    with pytest.raises(SpecDecError, match="^" + argv[0]) as err:
        bench_suite_inputs.check_rows(args, draft_missing, medusa, target=None)
    assert says in str(err.value) and f"or leave {argv[0]} out" in str(err.value)


def test_medusa_rows_default_to_sixteen_nodes(tmp_path):
    """``--medusa-nodes`` defaults to None (so that given without heads it is an error): left out, one row of a
    16-node tree; given, a row per count."""
    from drafters.medusa_heads import MedusaHeads, save_heads
    from experiments.bench_suite import drafters_for, parse_args
    from tests.tiny_models import pair

    target = pair("llama")[0]
    save_heads(MedusaHeads.for_target(target, 2, init="random", seed=0), tmp_path)
    for argv, rows in (([], {"ours_medusa16": 16}), (["--medusa-nodes", "4,6"], {"ours_medusa4": 4, "ours_medusa6": 6})):
        found = drafters_for(target, None, str(tmp_path), parse_args(["--eagle", ",", "--layer-skip", "1", *argv]))
        medusa = {name: d for name, d in found.items() if name.startswith("ours_medusa")}
        assert {name: d.tree_nodes for name, d in medusa.items()} == rows
