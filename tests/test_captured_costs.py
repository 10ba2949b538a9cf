"""The fixed-shape step's forward costs, the read floor, and how ``experiments.bench --compile`` judges
its captured rows with them (efficiency over the captured AR loop from the captured costs)."""
from __future__ import annotations

import pytest
import torch

from experiments.bench import spread_cell, summarize
from experiments.bench_methods import Method
from experiments.captured_costs import kv_bytes_per_token, read_floor_s, static_costs, static_curve
from experiments.synthetic import synthetic_pair


@pytest.fixture(scope="module")
def micro():
    return synthetic_pair("llama-micro", "cpu", torch.float32, draft_layers=2)


def test_the_read_floor_is_weights_read_plus_kv_over_bandwidth(micro):
    """A forward reads every weight but the input embedding table (one row per token), unless the output head
    shares the table and reads it whole."""
    target, _ = micro
    assert kv_bytes_per_token(target) == 2 * 4 * 2 * 32 * 4  # K and V, 4 layers, 2 KV heads of 32, fp32
    table = target.get_input_embeddings().weight.numel() * 4
    weights = sum(p.numel() * 4 for p in target.parameters())
    assert read_floor_s(target, 100, 1e9) == pytest.approx((weights - table + 100 * 2048) / 1e9)
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    assert read_floor_s(tied, 0, 1.0) == sum(p.numel() * 4 for p in tied.parameters())  # the table counted once


def test_static_curve_times_the_static_block_forward_without_moving_the_cache(micro):
    target, draft = micro
    curve, captured = static_curve(target, 24, (1, 4), reps=2)
    assert set(curve) == {1, 4} and all(t > 0 for t in curve.values()) and captured == (target.device.type == "cuda")
    costs = static_costs(target, draft, 24, [3], reps=2)
    assert set(costs["target"]) == {1, 2, 3, 4} and costs["draft"] > 0
    assert costs["bandwidth"] > 0 and costs["floor_s"] == pytest.approx(read_floor_s(target, 24, costs["bandwidth"]))


def _method(name: str, seconds: float, k: int | None = None, peer: str | None = None) -> Method:
    ours = name.startswith("ours")
    return Method(name, run=None, ours=ours, k=k, peer=peer, times={0: [seconds]}, new_tokens={0: 30},
                  tau={0: 3.0} if ours else {}, acceptance={0: 0.5} if k else {}, prefill_s={0: [0.01]} if ours else {},
                  forwards={0: 10 if k else 30} if ours else {})  # a chain's 10 verifies; the AR loop's one per token


def test_a_captured_chain_is_judged_against_the_captured_loop_and_costs():
    methods = [_method("hf_plain", 1.0), _method("ours_ar", 0.8), _method("hf_assisted_k2", 1.0, 2),
               _method("ours_chain_k2", 0.5, 2, "hf_assisted_k2"), _method("ours_ar_graph", 0.3),
               _method("ours_chain_k2_graph", 0.15, 2, "hf_assisted_k2")]
    eager = {"target": {1: 0.02, 3: 0.025}, "draft": 0.005}
    static = {"target": {1: 0.01, 2: 0.011, 3: 0.012}, "draft": 0.002, "floor_s": 0.005, "bandwidth": 1e9,
              "captured": True}
    rows, table = summarize(methods, eager, static, "graph")
    by = {r["method"]: r for r in rows}
    # eager chain: 0.8 / 0.5 = 1.60x over ours_ar, predicted (0.01 + 30 * 0.02) / (0.01 + 10 * (2 * 0.005 + 0.025))
    # = 0.61 / 0.36 = 1.69x: 0.94
    assert spread_cell(by["ours_chain_k2"]["efficiency"]) == "0.94 (0.94-0.94)"
    # captured chain: 0.3 / 0.15 = 2.00x over ours_ar_graph, predicted (0.01 + 30 * 0.01) / (0.01 + 10 * 0.016)
    # = 0.31 / 0.17 = 1.82x: 1.10
    assert spread_cell(by["ours_chain_k2_graph"]["efficiency"]) == "1.10 (1.10-1.10)"
    assert by["ours_ar_graph"]["per_token_vs_read_floor"] == pytest.approx(0.3 / 30 / 0.005)
    # after prefill: (0.3 - 0.01) / 30 tokens over the floor; HF's rows have no prefill split
    assert by["ours_ar_graph"]["decode_per_token_vs_read_floor"] == pytest.approx(0.29 / 30 / 0.005)
    assert by["hf_plain"]["decode_per_token_vs_read_floor"] is None
    assert "time per token / target's read floor" in table.splitlines()[0]
    assert "read floor" not in summarize(methods[:4], eager)[1]  # no --compile: no floor column


def test_only_float32_runs_fail_on_a_greedy_mismatch():
    """In bf16 a kernel of another shape rounds differently and near-ties flip: the match column is shown,
    noted, and not an error; in fp32 a mismatch is a lossless bug: exit status 1."""
    from experiments.bench_output import exit_status, match_note

    rows = [{"matches_hf_plain": True}, {"matches_hf_plain": False}]
    assert exit_status(rows, "float32") == 1 and exit_status(rows[:1], "float32") == 0
    assert exit_status(rows, "bfloat16") == 0 and exit_status(rows, "float16") == 0
    assert exit_status([{"matches_hf_greedy": False}], "float32", "matches_hf_greedy") == 1
    assert match_note("float32") == "" and "not checked" in match_note("bfloat16")


def test_compiled_costs_time_the_end_widths_and_compile_each(micro, monkeypatch):
    """``compile="inductor"``: each timed forward goes through torch.compile (here a recording stand-in: a real
    compile costs tens of seconds), and only widths 1 and k + 1 are timed (the rest interpolated)."""
    target, draft = micro
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    costs = static_costs(target, draft, 24, [3], reps=1, compile="inductor")
    assert set(costs["target"]) == {1, 4} and len(compiled) == 3 and all(kw == {"dynamic": False} for kw in compiled)


def test_step_profile_lists_variants_and_kernels(tmp_path, capsys):
    from experiments import step_profile

    md = tmp_path / "profile.md"
    args = ["--synthetic", "llama-micro", "--device", "cpu", "--dtype", "float32", "--context", "32", "--widths",
            "1,4", "--variants", "graph-sdpa-fused,graph-sdpa", "--profile", "graph-sdpa-fused", "--top", "3",
            "--reps", "2",
            "--markdown", str(md), "--json", str(tmp_path / "profile.json")]
    assert step_profile.main(args) == 0
    text = md.read_text()
    assert text.index("| graph-sdpa |") < text.index("| graph-sdpa-fused |")  # fusing is in place: fused ones last
    assert "T(w4) / T(w1)" in text and text.count("| `aten::") == 3 and "(graph-sdpa-fused)" in text
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:  # argparse: exit status 2, one line naming the choices
        step_profile.main(["--variants", "graph-flash", "--device", "cpu"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2 and "error:" in last and "graph-flash" in last and "inductor-triton" in last
    with pytest.raises(SystemExit):  # an unfused profile after fused variants would profile the fused model
        step_profile.parse_args(["--variants", "graph-sdpa-fused", "--profile", "graph-sdpa"])
    assert "cannot follow fused" in capsys.readouterr().err


def test_the_batch_table_refuses_the_compile_rows_flags(capsys):
    """``--attn-backend`` / ``--fuse-projections`` shape the batch-1 table's ``--compile`` rows: with
    ``--batch-sizes`` they would do nothing, so they are one error line before anything loads."""
    from experiments import bench

    assert bench.main(["--batch-sizes", "2", "--fuse-projections"]) == 2
    assert "--fuse-projections applies to the batch-1 table: run without --batch-sizes" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--draft", "/my/draft"], "--draft /my/draft needs --target"),
    (["--synthetic", "llama-micro", "--target", "/t"], "--synthetic builds its own"),
    (["--batch-sizes", "2", "--trees", "nosuchtree", "--hf-compile"],
     "--trees, --hf-compile apply to the batch-1 table: run without --batch-sizes, or leave them out"),
    (["--batch-sizes", "2", "--verify-curve", "--backends", "triton"], "--verify-curve applies to the batch-1"),
    (["--batch-sizes", "2", "--no-hf-dynamic"], "--no-hf-dynamic applies to the batch-1"),
    (["--eagle", "/heads", "--hybrid", "2"], "--eagle, --hybrid apply to the --batch-sizes tables: add --batch-sizes"),
    (["--context", "512"], "--context applies to the --verify-curve timing: add --verify-curve, or leave it out"),
    (["--verify-widths", "1,4"], "--verify-widths applies to the --verify-curve timing"),
    (["--fuse-projections"], "--fuse-projections applies to the --compile rows"),
    (["--attn-backend", "triton"], "--attn-backend applies to the --compile rows"),
    (["--prompt-len", "64"], "--prompt-len applies to --synthetic's random target and prompts: add --synthetic NAME"),
    (["--draft-layers", "3", "--prompt-len", "8"], "--draft-layers, --prompt-len apply to --synthetic's"),
    (["--synthetic", "llama-micro", "--dataset", "q.jsonl"], "--dataset applies to a real model pair and its prompts"),
    (["--synthetic", "llama-micro", "--max-prompt-tokens", "64", "--size", "micro"],
     ("--max-prompt-tokens, --size apply to a real model pair and its prompts (--synthetic builds random ones): drop "
      "--synthetic, or leave them out")),
    (["--target", "/t", "--size", "micro"], "--size applies to the embedded pair (--target loads yours): drop --target"),
    (["--synthetic", "llama-8b", "--draft-layers", "32"], "--draft-layers 32: use 1..31 (--synthetic llama-8b has 32"),
    (["--synthetic", "llama-9b"], "--synthetic 'llama-9b' is unknown"),  # both before an 8B target is built
    (["--model", "smollm2", "--merge"], "--merge merges the --hybrid rows' trees: add --hybrid N"),
    (["--model", "smollm2", "--datastore", "/no/rows"], "--datastore=/no/rows: no rows.safetensors there"),
    (["--batch-sizes", "1,4,8", "--prompts", "2"],  # a batch of 2 rows was labelled 4
     ("--batch-sizes 4,8: more than the 2 prompts (--prompts 2), so such a batch would hold 2 rows under a larger "
      "label: give --prompts 8 or more, or smaller batch sizes")),
])
def test_options_the_chosen_table_would_ignore_are_one_error(argv, says, capsys):
    """An option the chosen table never reads (the embedded pair's draft measured where the user named theirs, a
    batch-1 row asked of the batched table, a batched row of the batch-1 table) is one error line before anything
    loads, not a table without it."""
    from experiments import bench

    try:
        status = bench.main(argv)
    except SystemExit as exit_:  # argparse's own checks exit
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1


def test_a_batch_size_above_the_prompts_a_dataset_held_is_one_error():
    """``--dataset`` with fewer prompts than ``--prompts``: a batch of 4 would hold the 2 there are, labelled 4."""
    import argparse

    from experiments.bench_batch import batched_main
    from specdec.errors import SpecDecError

    args = argparse.Namespace(batch_sizes=[1, 4], dataset="q.jsonl")
    with pytest.raises(SpecDecError, match=r"^--batch-sizes 4: more than the 2 prompts loaded \(q.jsonl holds no more"):
        batched_main(None, None, [torch.tensor([[1, 2]])] * 2, args, [])


def test_a_chains_efficiency_is_taken_per_prompt_against_its_own_forwards():
    """Three prompts of 32 tokens, each decoded exactly as fast as its forwards cost (tau 2, 2 and 8; efficiency 1.0
    on each): the row says 1.00 on every prompt. A prediction from the mean tau over prompts (4.0, raised by the one
    prompt that accepts everything) against the median speedup would have said under 0.5."""
    chain_forwards = {0: 16, 1: 16, 2: 4}
    eager = {"target": {1: 0.02, 3: 0.025}, "draft": 0.005}  # a chain's verify costs 2 * 0.005 + 0.025
    prompts = list(chain_forwards)
    shared = {"new_tokens": dict.fromkeys(prompts, 32), "prefill_s": {i: [0.01] for i in prompts}}
    ar_s, chain_s = {i: [0.01 + 32 * 0.02] for i in prompts}, {i: [0.01 + f * 0.035] for i, f in chain_forwards.items()}
    hf = {"times": {i: [1.0] for i in prompts}, "new_tokens": shared["new_tokens"]}
    methods = [Method("hf_plain", None, False, **hf),
               Method("ours_ar", None, True, times=ar_s, tau=dict.fromkeys(prompts, 1.0),
                      forwards=dict.fromkeys(prompts, 32), **shared),
               Method("hf_assisted_k2", None, False, 2, **hf),
               Method("ours_chain_k2", None, True, 2, peer="hf_assisted_k2", times=chain_s,
                      tau={i: 32 / f for i, f in chain_forwards.items()}, acceptance=dict.fromkeys(prompts, 0.5),
                      forwards=chain_forwards, **shared)]
    rows, _ = summarize(methods, eager)
    assert spread_cell({r["method"]: r for r in rows}["ours_chain_k2"]["efficiency"]) == "1.00 (1.00-1.00)"


def test_a_chains_efficiency_predicts_tokens_per_second_when_the_loops_emit_different_counts():
    """A chain that stops after 20 tokens (an early end of sequence; in bf16 the loops may part) against an AR loop
    of 30, each exactly as fast as its forwards cost: efficiency 1.00. A ratio of seconds against the measured ratio
    of tokens/s would have said 0.67."""
    eager = {"target": {1: 0.02, 3: 0.025}, "draft": 0.005}
    ar_s, chain_s = 0.01 + 30 * 0.02, 0.01 + 8 * 0.035
    methods = [Method("hf_plain", None, False, times={0: [1.0]}, new_tokens={0: 30}),
               Method("ours_ar", None, True, times={0: [ar_s]}, new_tokens={0: 30}, tau={0: 1.0}, prefill_s={0: [0.01]},
                      forwards={0: 30}),
               Method("hf_assisted_k2", None, False, 2, times={0: [1.0]}, new_tokens={0: 30}),
               Method("ours_chain_k2", None, True, 2, peer="hf_assisted_k2", times={0: [chain_s]}, new_tokens={0: 20},
                      tau={0: 2.5}, acceptance={0: 0.5}, prefill_s={0: [0.01]}, forwards={0: 8})]
    rows, _ = summarize(methods, eager)
    assert spread_cell({r["method"]: r for r in rows}["ours_chain_k2"]["efficiency"]) == "1.00 (1.00-1.00)"
