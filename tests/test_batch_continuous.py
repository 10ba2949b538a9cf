"""Continuous batching: ``generate_batch(..., max_rows=m)`` decodes at most m rows at once and admits
the next waiting prompt when a row finishes. Rows admitted late start at their own step 0, so every
row still equals its batch-1 run (greedy: HF ``generate``; sampled: ``generate`` with the row's seed)."""
from __future__ import annotations

import pytest
import torch

from specdec import SamplingParams, SpecDecError, SpeculativeDecoder
from specdec.errors import ConfigError
from tests.test_batch import _limits, drafters, setup  # noqa: F401  (fixture)
from tests.test_sweeps import compose_cfg, prompts_file, tiny_args  # noqa: F401  (fixture)


@pytest.mark.parametrize("max_rows", [1, 3])
@pytest.mark.parametrize("shape", ["ar", "chain3", "tree", "ngram", "medusa", "layer_skip"])
def test_greedy_rows_equal_generate_with_refill(setup, shape, max_rows):  # noqa: F811
    arch, target, rows = setup
    limits = _limits(len(rows))
    out = SpeculativeDecoder(target, drafters(arch)[shape]()).generate_batch(rows, limits, seed=3, max_rows=max_rows)
    eos = target.generation_config.eos_token_id
    for i, ids in enumerate(rows):
        ref = target.generate(ids, do_sample=False, max_new_tokens=limits[i], pad_token_id=eos)
        assert out.sequences[i].tolist() == ref.tolist(), f"row {i}"
    assert out.stats.new_tokens == sum(s.new_tokens for s in out.row_stats)
    assert len(out.row_stats) == len(rows)


@pytest.mark.parametrize("shape,sampling", [("chain3", SamplingParams(temperature=1.0)),
                                            ("ngram", SamplingParams(temperature=0.8, top_k=20))])
def test_sampled_rows_equal_their_batch_one_runs_with_refill(setup, shape, sampling):  # noqa: F811
    arch, target, rows = setup
    make, limits = drafters(arch)[shape], _limits(len(rows))
    out = SpeculativeDecoder(target, make(), "rejection", sampling).generate_batch(rows, limits, seed=5, max_rows=3)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, make(), "rejection", sampling).generate(ids, limits[i], seed=5 + i)
        assert out.sequences[i].tolist() == single.sequences.tolist(), f"row {i}"
        assert out.row_stats[i].accepted_per_step == single.stats.accepted_per_step


def test_refill_keeps_at_most_max_rows_and_admits_in_order(setup):  # noqa: F811
    arch, target, rows = setup
    decoder = SpeculativeDecoder(target, drafters(arch)["chain3"]())
    widths = []
    verify = __import__("verifier.batch", fromlist=["verify_rows"])
    original = verify.verify_rows

    def spy(model, cache, roots, tree, step):
        widths.append((len(roots), list(cache.rows)))
        return original(model, cache, roots, tree, step)

    verify.verify_rows = spy
    try:
        decoder.generate_batch(rows, _limits(len(rows)), max_rows=3)
    finally:
        verify.verify_rows = original
    assert max(w for w, _ in widths) == 3 and widths[0] == (3, [0, 1, 2])
    seen = []
    for _, ids in widths:
        seen += [r for r in ids if r not in seen]
    assert seen == list(range(len(rows))), "waiting prompts are admitted in their order"


def test_bad_max_rows():
    from tests.tiny_models import pair

    dec = SpeculativeDecoder(pair("llama")[0], drafters("llama")["ar"]())
    with pytest.raises(SpecDecError, match="max_rows=0"):
        dec.generate_batch([torch.tensor([[1, 2]])], 4, max_rows=0)


# --------------------------------------------------------------------------- experiments.decode batch_mode=continuous


def test_decode_continuous_writes_records_as_rows_finish(prompts_file, tmp_path):  # noqa: F811
    """batch_mode=continuous, batch_size=2 over 4 prompts: the same tokens and per-prompt records as
    batch_size=1; records come in the order rows finish; the summary's tokens/s is the whole batch's
    aggregate (the last record's batch entry); a resumed run continues batch ids after the earlier ones."""
    import json

    from experiments import decode

    base = ["costs=false", "acceptance=rejection", "sampling.temperature=1.0", "drafter.num_speculative_tokens=2"]
    runs = {}
    for name, extra in {"one": ["batch_size=1"], "cont": ["batch_size=2", "batch_mode=continuous"]}.items():
        cfg = compose_cfg(*tiny_args(prompts_file, num_prompts=4), *base, *extra)
        runs[name] = decode.run(cfg, tmp_path / name)
        lines = (tmp_path / name / "records.jsonl").read_text().splitlines()
        runs[name]["records"] = [json.loads(line) for line in lines]
        assert len(lines) == 8  # 4 prompts x (speculative, baseline)
    tokens = {name: {(r["question_id"], r["method"]): r["tokens"] for r in run["records"]} for name, run in runs.items()}
    assert tokens["one"] == tokens["cont"]
    spec_records = [r for r in runs["cont"]["records"] if r["method"] == "speculative"]
    assert {r["batch"]["id"] for r in spec_records} == {0} and spec_records[0]["batch"]["mode"] == "continuous"
    totals = [r["batch"]["new_tokens"] for r in spec_records]
    assert totals == sorted(totals) and totals[-1] == sum(r["new_tokens"] for r in spec_records)
    spec = runs["cont"]["metrics"]["speculative"]
    assert spec["batch_size"] == 2
    assert spec["tokens_per_s"] == pytest.approx(spec["new_tokens"] / spec_records[-1]["batch"]["time_total"])
    for r in runs["cont"]["records"]:  # a row's phases are its batch's: null in its record, not 0 s and "other"
        assert [r["stats"][k] for k in ("time_prefill", "time_draft", "time_verify", "time_other")] == [None] * 4
        assert r["stats"]["time_total"] > 0 and r["batch"]["time_verify"] > 0
    assert all(r["stats"]["time_verify"] > 0 for r in runs["one"]["records"])  # batch 1: its own phases
    assert spec["time_verify"] > 0 and sum(spec["time_split"].values()) == pytest.approx(1.0)


def test_decode_continuous_bad_config(prompts_file, tmp_path):  # noqa: F811
    from experiments import decode

    with pytest.raises(ConfigError, match="batch_mode='sideways' is unknown"):
        decode.run(compose_cfg(*tiny_args(prompts_file), "batch_mode=sideways"), tmp_path / "a")
    with pytest.raises(ConfigError, match="batch_mode=continuous needs compile=none"):
        decode.run(compose_cfg(*tiny_args(prompts_file), "batch_mode=continuous", "compile=static"), tmp_path / "b")
    # a trial's compile=graph on a CPU ran the eager step and its summary said compile=graph: refused, with the fix
    with pytest.raises(ConfigError, match=r"compile=graph .* needs model.device=cuda \(got cpu\); on a CPU, "
                                          "compile=static runs the same fixed-shape step"):
        decode.run(compose_cfg(*tiny_args(prompts_file), "compile=graph"), tmp_path / "c")



def test_compile_graph_on_a_numbered_cuda_device_passes_the_check(prompts_file, tmp_path, monkeypatch):  # noqa: F811
    """model.device=cuda:0 is a CUDA device (a review caught the first check comparing the string to "cuda"): the
    run does not stop at the compile=graph check (with no GPU here and the device check patched out, the tiny model
    stays on the CPU, where the decoder's own fallback runs the step)."""
    from experiments import decode
    from specdec import models

    monkeypatch.setattr(models, "check_device", lambda *args: None)  # as if a GPU were present
    try:
        decode.run(compose_cfg(*tiny_args(prompts_file), "compile=graph", "model.device=cuda:0"), tmp_path / "d")
    except ConfigError as failed:
        assert "compile=graph captures" not in str(failed), failed


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_resumed_batched_run_keeps_the_earlier_batches_time(prompts_file, tmp_path, mode):  # noqa: F811
    """Killed after the first batches' records: the resumed run's batches get new ids, so the summary's
    aggregate time is the earlier batches' plus the new ones' (an id reused from 0 dropped the earlier). A
    continuous batch (one per method) that lost rows is not kept whole: its prompts are decoded again (its time
    covered work on every row), and the earlier records are copied aside first."""
    import json

    from experiments import decode

    cfg = compose_cfg(*tiny_args(prompts_file, num_prompts=4), "costs=false", "batch_size=2", f"batch_mode={mode}")
    decode.run(cfg, tmp_path)
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))  # two baseline records lost
    summary = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    again = decode.run(cfg, tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert again["status"] == "complete" and len(records) == 8
    tokens = {(r["question_id"], r["method"]): r["tokens"] for r in map(json.loads, lines)}
    assert {(r["question_id"], r["method"]): r["tokens"] for r in records} == tokens
    batches = {}
    for r in records:
        if r["method"] == "speculative":
            batches[r["batch"]["id"]] = r["batch"]  # the last entry per id, as the summary keeps it
    assert len(batches) == {"static": 2, "continuous": 1}[mode], batches.keys()
    assert len(list(tmp_path.glob("superseded-*"))) == 1  # the records decoded again (both modes) are kept there
    spec = again["metrics"]["speculative"]
    assert spec["tokens_per_s"] == pytest.approx(spec["new_tokens"] / sum(b["time_total"] for b in batches.values()))


def test_a_prompt_cut_between_its_methods_is_decoded_again_and_its_record_kept_aside(prompts_file, tmp_path,  # noqa: F811
                                                                                     capsys):
    """A batch-1 run cut after prompt 1's speculative record (its baseline never ran): the rerun decodes prompt 1
    again and says so; the record it drops is not lost: the earlier records are copied to ``superseded-*``."""
    import json

    from experiments import decode

    cfg = compose_cfg(*tiny_args(prompts_file, num_prompts=2), "costs=false")
    decode.run(cfg, tmp_path)
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert [json.loads(line)["method"] for line in lines] == ["speculative", "baseline"] * 2
    path.write_text("".join(lines[:-1]))  # prompt 1's baseline lost: the run was cut there
    summary = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    capsys.readouterr()
    again = decode.run(cfg, tmp_path)
    err = capsys.readouterr().err
    assert "1 earlier prompt(s) that not every method finished (a run cut mid-prompt or mid-batch) are decoded " \
           "again" in err and "1 of 2 prompts already decoded by every method and kept, 1 to decode" in err
    assert again["status"] == "complete" and path.read_text().count("\n") == 4
    aside = list(tmp_path.glob("superseded-*"))
    assert len(aside) == 1 and (aside[0] / "records.jsonl").read_text() == "".join(lines[:-1])


def test_a_batch_decoded_again_gets_an_id_after_every_kept_one(prompts_file, tmp_path):  # noqa: F811
    """A lost line in the first batch (batch 0 decoded again, batch 1 kept): the new batch's id comes after 1, not
    at len(kept batches) = 1, where it replaced the kept batch's time in the summary."""
    import json

    from experiments import decode

    cfg = compose_cfg(*tiny_args(prompts_file, num_prompts=4), "costs=false", "batch_size=2")
    decode.run(cfg, tmp_path)
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if json.loads(line)["question_id"] != 0 or
                            json.loads(line)["method"] != "baseline"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    again = decode.run(cfg, tmp_path)
    batches = {}
    for r in map(json.loads, path.read_text().splitlines()):
        if r["method"] == "speculative":
            batches.setdefault(r["batch"]["id"], r["batch"])
    assert sorted(batches) == [1, 2]
    spec = again["metrics"]["speculative"]
    assert spec["tokens_per_s"] == pytest.approx(spec["new_tokens"] / sum(b["time_total"] for b in batches.values()))


def test_batched_benchmark_table_has_a_chain_per_k_and_tau(tmp_path):
    """``experiments.bench --batch-sizes``' table: one chain per draft length (draft model and, given a head,
    EAGLE, and each behind prompt lookup), each with its tau and its per-rep speedups over our AR loop (a continuous
    method also over our AR loop batched continuously, `ours_ar_continuous`); every
    row checked against HF greedy (a random pair with a noisy copy as draft)."""
    from drafters.eagle_heads import save_head
    from experiments.bench_batch import markdown, run_batch_sizes
    from tests.test_eagle import trained_head
    from tests.tiny_models import noisy_copy, pair
    from tests.tiny_models import prompts as make_prompts

    target, _, tok = pair("llama")
    head_dir = save_head(trained_head("llama", "eagle3"), tmp_path / "eagle3")
    rows = run_batch_sizes(target, noisy_copy("llama"), make_prompts(tok, 3), [1, 2], 6, 2, [2, 3], 2, 2,
                           confidence=(0.0061,), eagle=(str(head_dir), "float32"), hybrid=2)
    names = {r["method"] for r in rows}
    assert sorted(n for n in names if "+" in n and not n.endswith("_continuous")) == [
        "ours_ngram+chain_k2", "ours_ngram+chain_k3", "ours_ngram+eagle3_k2", "ours_ngram+eagle3_k3"]  # chains only
    assert {"ours_chain_k2", "ours_chain_k3", "ours_chain_k2_continuous", "ours_ar", "hf_plain",
            "ours_chain_k3_conf0.0061", "ours_chain_k3_conf0.0061_continuous", "ours_eagle3_k2",
            "ours_eagle3_k3_continuous", "ours_eagle3_k2_per_row"} <= names
    assert all(r["matches_hf_greedy"] for r in rows)
    by = {(r["batch_size"], r["method"]): r for r in rows}
    assert by[(2, "hf_plain")]["tau"] is None and by[(2, "ours_ar")]["tau"] == 1.0
    assert 1.0 < by[(2, "ours_chain_k3")]["tau"] <= 4.0
    assert 1.0 < by[(2, "ours_eagle3_k3")]["tau"] <= 4.0
    assert by[(2, "ours_eagle3_k3_per_row")]["tau"] == by[(2, "ours_eagle3_k3")]["tau"]  # the same drafts
    assert by[(2, "ours_eagle3_k3_hf_forward")]["tau"] == by[(2, "ours_eagle3_k3")]["tau"]  # the head's other forward
    assert 1.0 <= by[(2, "ours_chain_k3_conf0.0061")]["tau"] <= 4.0
    assert by[(2, "ours_ar")]["vs_ours_ar_reps"] == [1.0, 1.0] and len(by[(2, "ours_eagle3_k2")]["vs_ours_ar_reps"]) == 2
    same, cont = by[(2, "ours_chain_k2")], by[(2, "ours_chain_k2_continuous")]  # each over our AR batched its way
    assert same["vs_ours_ar_same_batching"] == same["vs_ours_ar"] and by[(2, "ours_ar_continuous")]["tau"] == 1.0
    assert cont["vs_ours_ar_same_batching"] == pytest.approx(
        cont["tokens_per_s"] / by[(2, "ours_ar_continuous")]["tokens_per_s"])
    assert "| 2 | ours_chain_k3 |" in markdown(rows)


def test_rows_finishing_in_the_same_step_are_all_replaced_at_once(monkeypatch):
    """Two rows admitted together finish together (no drafts, one token a step): both places are refilled
    in the next step, so the batch stays at max_rows while prompts wait."""
    from drafters import NoDrafter
    from tests.tiny_models import pair, prompts
    from verifier import batch as verifier_batch

    widths = []
    original = verifier_batch.verify_rows

    def spy(model, cache, roots, tree, step):
        widths.append(len(roots))
        return original(model, cache, roots, tree, step)

    monkeypatch.setattr(verifier_batch, "verify_rows", spy)
    target, _, tok = pair("llama")
    out = SpeculativeDecoder(target, NoDrafter()).generate_batch(prompts(tok, 5, seed=4), 3, max_rows=2)
    assert [s.new_tokens for s in out.row_stats] == [3] * 5
    assert widths == [2] * 6 + [1] * 3


def test_sampled_trees_drafted_per_row_equal_their_batch_one_runs_with_refill(setup):  # noqa: F811
    """Trees drafted by one drafter copy per row, their children sampled (keyed by the row's own step): rows
    admitted late draw what their batch-1 runs draw."""
    from drafters import DraftModelDrafter
    from tests.tiny_models import noisy_copy

    arch, target, rows = setup
    rows, limits, sampling = rows[:5], _limits(5), SamplingParams(temperature=1.0)
    make = lambda: DraftModelDrafter(noisy_copy(arch), tree="binary", tree_sampling="with_replacement")
    out = SpeculativeDecoder(target, make(), "rejection", sampling).generate_batch(rows, limits, seed=5, max_rows=2)
    for i, ids in enumerate(rows):
        single = SpeculativeDecoder(target, make(), "rejection", sampling).generate(ids, limits[i], seed=5 + i)
        assert out.sequences[i].tolist() == single.sequences.tolist(), f"row {i}"
        assert out.row_stats[i].accepted_per_step == single.stats.accepted_per_step, f"row {i}"


def test_each_method_is_set_against_the_ar_loop_batched_and_compiled_its_way():
    """``vs_ours_ar_same_batching``'s reference: a continuous method's is ``ours_ar_continuous``, a fixed-shape
    method's (``--compile static``: ``ours_chain_k2_static``) ``ours_ar_static`` (it was the eager ``ours_ar``, so a
    compiled chain's gain over the compiled AR step had to be worked out by hand), any other's ``ours_ar``."""
    from experiments.bench_batch import same_batching

    assert same_batching("ours_chain_k2_continuous", "static") == "ours_ar_continuous"
    assert same_batching("ours_chain_k2_static", "static") == "ours_ar_static"
    assert same_batching("ours_ar_inductor", "inductor") == "ours_ar_inductor"
    assert same_batching("ours_chain_k2", "static") == "ours_ar"
    assert same_batching("ours_chain_k2_static") == "ours_ar"  # no compile: no compiled rows


def test_the_batched_table_sets_a_compiled_chain_against_the_compiled_ar_loop(monkeypatch):
    """The table's wiring (stand-in methods and timings): ``ours_chain_k2_static`` at 0.5 s over ``ours_ar_static``
    at 1.0 s is 2.0x "batched the same way" (the eager ``ours_ar``, 2.0 s, gave 4.0x) and 4.0x over our AR loop."""
    from types import SimpleNamespace

    from experiments import bench_batch

    seconds = {"hf_plain": 4.0, "ours_ar": 2.0, "ours_chain_k2": 1.0, "ours_ar_static": 1.0,
               "ours_chain_k2_static": 0.5}
    monkeypatch.setattr(bench_batch, "methods", lambda *args, **kwargs: dict.fromkeys(seconds))
    monkeypatch.setattr(bench_batch, "_time_size", lambda table, prompts, size, max_new, reps: (
        {name: [[seconds[name]] * reps] for name in table}, {name: [[7] * 8] for name in table},
        {name: [] for name in table}))
    target = SimpleNamespace(generate=lambda ids, **kwargs: torch.tensor([[1, 2] + [7] * 8]),
                             generation_config=SimpleNamespace(pad_token_id=0))
    rows = bench_batch.run_batch_sizes(target, None, [torch.tensor([[1, 2]])], [1], 8, 2, [2], 2, 2, compile="static")
    by = {r["method"]: r for r in rows}
    assert by["ours_chain_k2_static"]["vs_ours_ar_same_batching"] == pytest.approx(2.0)
    assert by["ours_chain_k2_static"]["vs_ours_ar"] == pytest.approx(4.0)
    assert by["ours_chain_k2"]["vs_ours_ar_same_batching"] == pytest.approx(2.0)
    assert all(r["matches_hf_greedy"] for r in rows)


def test_a_ctrl_c_keeps_the_batch_sizes_finished(monkeypatch, capsys):
    """Ctrl-C while batch size 4 is timed keeps batch size 2's rows (and says so); during the first batch size it
    goes on up (nothing to show)."""
    from types import SimpleNamespace

    from experiments import bench_batch

    def time_size(table, prompts, size, max_new, reps):
        if size == 4:
            raise KeyboardInterrupt
        return {name: [[1.0] * reps] for name in table}, {name: [[7] * 8] for name in table}, {n: [] for n in table}

    monkeypatch.setattr(bench_batch, "methods", lambda *args, **kwargs: dict.fromkeys(("hf_plain", "ours_ar")))
    monkeypatch.setattr(bench_batch, "_time_size", time_size)
    target = SimpleNamespace(generate=lambda ids, **kwargs: torch.tensor([[1, 2] + [7] * 8]),
                             generation_config=SimpleNamespace(pad_token_id=0))
    rows = bench_batch.run_batch_sizes(target, None, [torch.tensor([[1, 2]])], [2, 4, 8], 8, 2, [2], 2, 2)
    assert [(r["batch_size"], r["method"]) for r in rows] == [(2, "hf_plain"), (2, "ours_ar")]
    assert "interrupted (Ctrl-C) at batch size 4: the table covers the batch sizes before it" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        bench_batch.run_batch_sizes(target, None, [torch.tensor([[1, 2]])], [4, 8], 8, 2, [2], 2, 2)


def test_a_runs_summary_keeps_the_warm_ups_compile_seconds(prompts_file, tmp_path, monkeypatch):  # noqa: F811
    """``decode.run`` puts what the warm-up spent compiling into the summary (``warmup_time_compile``), on disk too
    (with the default ``warmup=1`` the timed decodes find the step compiled: it was reported nowhere); an eager
    run's summary has no such key."""
    import json

    from experiments import decode

    plain = decode.run(compose_cfg(*tiny_args(prompts_file), "costs=false"), tmp_path / "eager")
    assert "warmup_time_compile" not in plain
    monkeypatch.setattr(decode, "warm_up", lambda decoders, encoded, cfg: {"speculative": 3.0})
    summary = decode.run(compose_cfg(*tiny_args(prompts_file), "costs=false"), tmp_path / "warmed")
    on_disk = json.loads((tmp_path / "warmed" / "summary.json").read_text())
    assert summary["warmup_time_compile"] == on_disk["warmup_time_compile"] == {"speculative": 3.0}
