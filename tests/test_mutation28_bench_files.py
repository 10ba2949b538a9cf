"""Mutation pass 28 over the batched benchmark (:mod:`experiments.bench_batch`), the suite benchmark
(:mod:`experiments.bench_suite`), atomic files and the run lock (:mod:`specdec.files`) and the heads' teacher
(:mod:`experiments.head_teachers`). Each test pins what a mutant that survived the earlier tests changed; stand-in
methods and timings as in ``tests/test_batch_continuous.py`` and ``tests/test_bench_suite.py``."""
from __future__ import annotations

import copy
import fcntl
import io
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from experiments import bench_batch
from experiments.bench_methods import Method
from experiments.bench_suite import category_table
from experiments.head_teachers import MemoTeacher, argmax_teacher, teacher
from specdec.files import atomic_write, held_lock
from specdec.stats import DecodeStats
from tests.tiny_models import pair

# --------------------------------------------------------------------------- specdec.files


def test_the_temp_file_is_hidden_beside_the_target_and_an_interrupt_removes_it(tmp_path):
    """The temp file lies in the target's own folder (``os.replace`` is atomic only within one file system) as a
    hidden ``.<name>.*.tmp``; a Ctrl-C mid-write (``KeyboardInterrupt``, not an ``Exception``) leaves the old file and
    no temp file. Catches ``mkstemp`` without ``dir=``, the prefix without its dot, ``except Exception``."""
    path = tmp_path / "records.jsonl"
    path.write_text("old\n", encoding="utf-8")
    seen = []

    def write(tmp):
        seen.append(Path(tmp))
        Path(tmp).write_text("new\n", encoding="utf-8")

    atomic_write(path, write)
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".records.jsonl.") and seen[0].suffix == ".tmp"
    assert path.read_text(encoding="utf-8") == "new\n" and not seen[0].exists()

    def interrupted(tmp):
        Path(tmp).write_text("half", encoding="utf-8")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_text(encoding="utf-8") == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]


def test_text_is_written_as_utf8_whatever_the_locale(tmp_path):
    """Records keep non-ASCII text (``ensure_ascii=False``): under an ASCII locale (``LC_ALL=C`` with neither locale
    coercion nor UTF-8 mode) the file is still UTF-8. Catches ``encoding="utf-8"`` dropped (a UnicodeEncodeError
    that loses the record). The module runs alone in the child, as in ``tests/test_support_edges.py``."""
    import os
    import subprocess
    import sys

    source = Path(__file__).resolve().parents[1] / "specdec" / "files.py"
    child = (f"import importlib.util\nspec = importlib.util.spec_from_file_location('files', {str(source)!r})\n"
             f"files = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(files)\n"
             f"files.atomic_write_json({str(tmp_path / 'r.json')!r}, {{'prompt': 'caf\\u00e9 \\u2192 \\u03c4'}}, "
             f"ensure_ascii=False)\n")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0")
    subprocess.run([sys.executable, "-c", child], env=env, check=True, timeout=60)
    assert json.loads((tmp_path / "r.json").read_bytes().decode("utf-8")) == {"prompt": "caf\u00e9 \u2192 \u03c4"}


def test_a_holder_that_wrote_no_pid_is_named_as_unknown(tmp_path):
    """A lock held by someone who has not written a pid yet (an empty lock file): the waiting line says ``?``, on
    the stream given, and the block runs once the holder lets go. Catches ``or "?"`` dropped (``waiting for ``)."""
    lock = tmp_path / ".run.lock"
    lock.touch()
    stream, entered = io.StringIO(), threading.Event()
    with open(lock, "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)

        def wait_for_it():
            with held_lock(lock, lambda pid: f"waiting for {pid}", stream):
                entered.set()

        thread = threading.Thread(target=wait_for_it)
        thread.start()
        deadline = time.time() + 30
        while not stream.getvalue() and time.time() < deadline:
            time.sleep(0.01)
        assert not entered.is_set()
        fcntl.flock(holder, fcntl.LOCK_UN)
    thread.join(30)
    assert entered.is_set() and stream.getvalue() == "waiting for ?\n"


# --------------------------------------------------------------------------- experiments.head_teachers


def test_the_teacher_gives_the_hidden_state_the_lm_head_reads_in_float32_without_grad():
    """The heads learn from the state the target's LM head turns into its logits (the last, normed one), as
    float32 whatever the target's dtype, with no autograd graph kept (the memo holds them for the whole run); the
    labels are the target's argmax. Catches ``hidden_states[-2]``, ``.float()`` dropped, ``argmin`` for
    ``argmax`` and ``@torch.no_grad`` dropped."""
    target = pair("llama")[0]
    batch = torch.randint(0, target.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))  # [B, T]
    hidden, logits = teacher(target, batch)
    assert torch.allclose(target.lm_head(hidden), logits, atol=1e-5)
    assert not hidden.requires_grad and not logits.requires_grad
    _, labels = argmax_teacher(target, batch)
    with torch.no_grad():
        assert torch.equal(labels, target(input_ids=batch).logits.argmax(-1))
    half = copy.deepcopy(target).to(torch.bfloat16)
    hidden, logits = teacher(half, batch)
    assert hidden.dtype == logits.dtype == torch.float32
    assert MemoTeacher()(half, batch)[0].dtype == torch.float32


# --------------------------------------------------------------------------- experiments.bench_batch


def test_hf_batched_left_pads_and_cuts_each_row_after_its_first_eos():
    """HF's batched rows: left-padded with the mask on the prompt tokens only, each row cut just after its first EOS
    (of a list of EOS ids), as unbatched ``generate`` stops. Catches the EOS dropped (``i`` for ``i + 1``) and a
    list of EOS ids read as one id."""
    calls = []

    def generate(ids, attention_mask, **kwargs):
        calls.append((ids.tolist(), attention_mask.tolist()))
        return torch.cat([ids, torch.tensor([[4, 9, 4, 4], [4, 4, 5, 9]])], 1)  # [B, T + 4]

    target = SimpleNamespace(generate=generate, generation_config=SimpleNamespace(eos_token_id=[5, 9]))
    new, stats = bench_batch.hf_batched(target, [torch.tensor([[1, 2, 3]]), torch.tensor([[7]])], 4, pad=0)
    assert calls == [([[1, 2, 3], [0, 0, 7]], [[1, 1, 1], [0, 0, 1]])]
    assert new == [[4, 9], [4, 4, 5]] and stats is None
    target.generation_config.eos_token_id = None
    assert bench_batch.hf_batched(target, [torch.tensor([[1, 2, 3]]), torch.tensor([[7]])], 4, 0)[0][1] == [4, 4, 5, 9]


def test_time_size_warms_up_rotates_and_keeps_the_first_reps_outputs():
    """``_time_size`` on stand-in methods (5 prompts, batch size 2, 2 reps): a plain method warms up on its first
    group, a ``_graph`` one on every group; a continuous one warms up on as many prompts as the batch size and is timed
    on all prompts, the batch size its ``max_rows``;
    rep 1 runs the methods rotated by one; outputs and stats are rep 0's alone. Catches the warm-up of ``_graph``
    rows or of every row dropped, the batch size for continuous rows replaced, no rotation, every rep's outputs
    kept."""
    log = []

    def method(name):
        def run(rows, max_new, *extra):
            log.append((name, len(rows), extra))
            return [[7] * max_new for _ in rows], DecodeStats(new_tokens=max_new * len(rows), target_forwards=1)
        return run

    names = ["ours_ar", "ours_chain_k2_graph", "ours_ar_continuous"]
    prompts = [torch.tensor([[i]]) for i in range(5)]
    times, new, stats = bench_batch._time_size({n: method(n) for n in names}, prompts, 2, 3, 2)
    warm = [("ours_ar", 2, ()), ("ours_chain_k2_graph", 2, ()), ("ours_chain_k2_graph", 2, ()),
            ("ours_chain_k2_graph", 1, ()), ("ours_ar_continuous", 2, (2,))]
    assert log[:5] == warm
    assert ("ours_ar_continuous", 5, (2,)) in log[5:]
    order = [name for name, _, _ in log[5:]]
    assert order == ["ours_ar"] * 3 + ["ours_chain_k2_graph"] * 3 + ["ours_ar_continuous"] + \
        ["ours_chain_k2_graph"] * 3 + ["ours_ar_continuous"] + ["ours_ar"] * 3
    assert new == {n: [[7] * 3] * 5 for n in names}
    assert [len(stats[n]) for n in names] == [3, 3, 1]
    assert [len(g) for g in times["ours_ar"]] == [2, 2, 2] and [len(g) for g in times["ours_ar_continuous"]] == [2]


def _stand_in_sizes(monkeypatch, seconds: dict, outputs: dict, stats: dict):
    """``run_batch_sizes`` over stand-in methods whose per-group, per-rep seconds, outputs and stats are given."""
    monkeypatch.setattr(bench_batch, "methods", lambda *args, **kwargs: dict.fromkeys(seconds))
    monkeypatch.setattr(bench_batch, "_time_size", lambda table, prompts, size, max_new, reps: (
        {n: seconds[n] for n in table}, {n: outputs[n] for n in table}, {n: stats[n] for n in table}))
    target = SimpleNamespace(generate=lambda ids, **kwargs: torch.cat([ids, torch.tensor([[7, 7]])], 1),
                             generation_config=SimpleNamespace(pad_token_id=0))
    prompts = [torch.tensor([[1, 2]]), torch.tensor([[3]])]
    return bench_batch.run_batch_sizes(target, None, prompts, [1], 2, 3, [2], 2, 2)


def test_the_batched_rows_figures_mean_their_names(monkeypatch):
    """Two groups, three reps: a method's seconds are the sum over groups of the median rep, its tokens/s all new
    tokens over them; ``vs_hf_batched`` is its tokens/s over HF's; ``vs_ours_ar_reps`` is per rep our AR loop's
    summed seconds over the method's; tau pools the groups' stats; a row whose output differs says so; a
    continuous row is set against ``ours_ar_continuous``. Catches min for median, prompts counted for tokens,
    inverted ratios, rep 0 read for every rep, HF for our AR loop, the first group's tau, ``matches`` always
    true and the continuous reference replaced."""
    same = [[7, 7], [7, 7]]
    seconds = {"hf_plain": [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]], "ours_ar": [[1.0, 3.0, 2.0], [1.0, 1.0, 1.0]],
               "ours_chain_k2": [[0.5, 3.0, 1.0], [0.5, 0.5, 0.5]], "ours_ar_continuous": [[1.0, 1.0, 1.0]],
               "ours_chain_k2_continuous": [[0.25, 0.25, 0.25]]}
    outputs = {name: same for name in seconds} | {"ours_chain_k2": [[7, 7], [7, 8]]}
    stats = {name: [] for name in seconds} | {"ours_chain_k2": [DecodeStats(new_tokens=2, target_forwards=2),
                                                            DecodeStats(new_tokens=2, target_forwards=1)]}
    by = {r["method"]: r for r in _stand_in_sizes(monkeypatch, seconds, outputs, stats)}
    chain = by["ours_chain_k2"]
    assert by["ours_ar"]["tokens_per_s"] == pytest.approx(4 / 3.0) and chain["tokens_per_s"] == pytest.approx(4 / 1.5)
    assert chain["vs_hf_batched"] == pytest.approx((4 / 1.5) / (4 / 8.0))
    assert chain["vs_ours_ar"] == pytest.approx(2.0)
    assert chain["vs_ours_ar_reps"] == pytest.approx([2.0 / 1.0, 4.0 / 3.5, 3.0 / 1.5])
    assert chain["tau"] == pytest.approx(4 / 3) and by["hf_plain"]["tau"] is None
    assert not chain["matches_hf_greedy"] and by["ours_ar"]["matches_hf_greedy"]
    assert by["ours_chain_k2_continuous"]["vs_ours_ar_same_batching"] == pytest.approx(4.0)


def test_the_markdown_row_puts_each_figure_under_its_column():
    """One hand-made row: each figure under its own heading, the per-rep spread as median (min-max), a row that
    differs from HF greedy as NO. Catches the two AR columns swapped, the mean for the median, and a None check
    read as a match."""
    row = {"batch_size": 4, "method": "ours_chain_k2", "tokens_per_s": 123.45, "vs_hf_batched": 1.5, "vs_ours_ar": 2.25,
           "vs_ours_ar_reps": [1.0, 1.1, 4.0], "vs_ours_ar_same_batching": 1.75, "tau": 2.5, "matches_hf_greedy": False}
    lines = bench_batch.markdown([row]).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert dict(zip(head, cells)) == {
        "batch size": "4", "method": "ours_chain_k2", "aggregate tokens/s": "123.5", "vs HF batched generate": "1.50x",
        "vs our batched AR": "2.25x", "vs our batched AR within a rep: median (min-max)": "1.10x (1.00-4.00)",
        "vs our AR batched the same way": "1.75x", "tau": "2.50", "every row = HF greedy": "NO"}
    assert lines[1] == "|" + "---|" * len(head)


def test_continuous_rows_batch_at_most_the_batch_size():
    """``ours_ar_continuous`` at batch size 1 decodes one row at a time (one step per token and row), at batch size
    2 both rows together; the same tokens either way. Catches the batch size not passed on as ``max_rows``."""
    target, draft, tok = pair("llama")
    from tests.tiny_models import prompts

    table = bench_batch.methods(target, draft, [2], 2, 2)
    rows = prompts(tok, 2, seed=3)
    one, one_stats = table["ours_ar_continuous"](rows, 3, 1)
    two, two_stats = table["ours_ar_continuous"](rows, 3, 2)
    assert one == two and one_stats.steps == 6 and two_stats.steps == 3


def test_the_eagle_rows_are_the_fast_forward_the_hf_forward_and_per_row(tmp_path):
    """``eagle_chains``: per k, the head's fast forward, its transformers forward (``_hf_forward``) and one drafter
    copy per row (``_per_row``). Catches ``fast_forward=False`` dropped (two identical rows under two names)."""
    from drafters.eagle import EagleRows
    from drafters.eagle_heads import EagleHead, save_head

    target = pair("llama")[0]
    head_dir = save_head(EagleHead.for_target(target, "eagle3", seed=0), tmp_path / "eagle3")
    table = bench_batch.eagle_chains((str(head_dir), "float32"), [2])
    assert sorted(table) == ["ours_eagle3_k2", "ours_eagle3_k2_hf_forward", "ours_eagle3_k2_per_row"]
    assert table["ours_eagle3_k2"].fast_forward and not table["ours_eagle3_k2_hf_forward"].fast_forward
    assert isinstance(table["ours_eagle3_k2_per_row"].batched(), EagleRows)


def test_an_interrupted_batched_run_says_how_many_batch_sizes_it_covers(monkeypatch, capsys, tmp_path):
    """Ctrl-C after batch size 2 of 2 and 4 (two methods' rows at size 2): the header says 1 of 2 batch sizes, the JSON
    ``batch_sizes_done`` is 1 and the exit status is 130. Catches rows counted for batch sizes (2 of 2: not
    interrupted) and the finished count replaced by the asked one."""
    import argparse

    rows = [{"batch_size": 2, "method": m, "tokens_per_s": 1.0, "vs_hf_batched": 1.0, "vs_ours_ar": 1.0,
             "vs_ours_ar_reps": [1.0], "vs_ours_ar_same_batching": 1.0, "tau": None, "matches_hf_greedy": True}
            for m in ("hf_plain", "ours_ar")]
    monkeypatch.setattr(bench_batch, "run_batch_sizes", lambda *args: rows)
    args = argparse.Namespace(batch_sizes=[2, 4], dataset=None, max_new_tokens=4, reps=1, ks=[2], ngram_tokens=2,
                              max_ngram=2, compile="none", confidence=(), eagle=None, draft_dtype="float32", hybrid=0,
                              dtype="float32", markdown=None, json=str(tmp_path / "out.json"))
    status = bench_batch.batched_main(None, None, [torch.tensor([[1, 2]])] * 4, args, ["--batch-sizes", "2,4"])
    assert status == 130
    assert "Interrupted (Ctrl-C) after 1 of 2 batch sizes" in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())["batch_sizes_done"] == 1


# --------------------------------------------------------------------------- experiments.bench_suite


def _method(name, times, tokens=12, matches=True):
    return Method(name, run=None, ours=True, times=dict(enumerate(times)),
                  new_tokens=dict.fromkeys(range(len(times)), tokens), matches=matches)


def test_the_suite_table_takes_median_times_shows_every_category_and_its_own_tokens_per_s():
    """Three reps per prompt (median, not the fastest); a Spec-Bench file's category outside the suite's order
    (``translation``) gets its own column after them; ``tokens_per_s`` is the method's own; an unchecked (sampled)
    run's rows say None for the HF comparison. Catches min for median, unknown categories dropped, the baseline's
    tokens/s reported, and ``matches_hf_plain`` kept unchecked."""
    base = _method("hf_plain", [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    mine = _method("ours_x", [[0.1, 0.5, 0.9], [0.25, 0.25, 0.25]], matches=False)
    rows, table = category_table([base, mine], ["translation", "coding"], "hf_plain")
    assert rows[1]["coding"]["speedup"] == pytest.approx(4.0) and rows[1]["translation"]["speedup"] == pytest.approx(2.0)
    assert rows[1]["translation"]["tokens_per_s"] == pytest.approx(24.0) and rows[0]["coding"]["tokens_per_s"] == 12.0
    assert table.splitlines()[0].startswith("| method | coding | translation | overall |")
    rows, _ = category_table([base, mine], ["translation", "coding"], "hf_plain", checked=False)
    assert [r["matches_hf_plain"] for r in rows] == [None, None]


def test_greedy_deficits_take_the_worst_output_and_the_tolerance_is_inclusive():
    """``method_deficits`` against the target itself: its own greedy outputs have deficit 0.0, which passes a
    tolerance of 0.0; one non-greedy token makes the method's figure that token's deficit. Catches ``<`` for
    ``<=`` and the best output for the worst."""
    from experiments.bench_suite import method_deficits

    target, _, tok = pair("llama")
    from tests.tiny_models import prompts

    ids = prompts(tok, 2, seed=5)
    greedy = {i: target.generate(p, do_sample=False, max_new_tokens=3, pad_token_id=0) for i, p in enumerate(ids)}
    with torch.no_grad():
        logits = target(ids[1]).logits[0, -1]  # [V]
    worst = logits.argmin()
    off = dict(greedy) | {1: torch.cat([ids[1], worst.view(1, 1)], 1)}
    methods = [Method("greedy", None, True, outputs=greedy), Method("off", None, True, outputs=off)]
    out = method_deficits(target, methods, ids, 0.0)
    assert out["greedy"] == (0.0, True)
    assert out["off"][0] == pytest.approx((logits.max() - logits[worst]).item(), abs=1e-4) and not out["off"][1]


ARGS = ["--k", "3", "--eagle", ",", "--layer-skip", "1"]


def test_sampled_suite_methods_sample_and_keep_their_baseline():
    """``--temperature 0.7``: our methods sample (the AR loop's output is not the greedy one) and ``--methods``
    keeps ``ours_ar``, the baseline of the sampled table; greedy ``--methods`` keeps ``hf_plain``. Catches the
    temperature not passed to ``decode_run`` and the baseline dropped from the picked methods."""
    from experiments.bench_suite import build_methods, parse_args
    from tests.tiny_models import noisy_copy, prompts

    target, _, tok = pair("llama")
    ids = prompts(tok, 1, seed=2)[0]
    sampled = build_methods(target, noisy_copy("llama"), None, parse_args([*ARGS, "--temperature", "0.7",
                                                                           "--max-new-tokens", "8"]))
    ar = next(m for m in sampled if m.name == "ours_ar")
    greedy = target.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert not torch.equal(ar.run(ids)[0], greedy)
    picked = build_methods(target, None, None, parse_args([*ARGS, "--temperature", "0.7", "--methods", "ours_ngram"]))
    assert [m.name for m in picked] == ["ours_ar", "ours_ngram"]
    picked = build_methods(target, None, None, parse_args([*ARGS, "--methods", "ours_ngram"]))
    assert [m.name for m in picked] == ["hf_plain", "ours_ngram"]


def test_merge_without_hybrid_is_refused_as_it_is_parsed(capsys):
    """``--merge`` alone would add no row: a usage error (exit 2) that says to add ``--hybrid N``. Catches the
    check loosened to a ``--hybrid`` that can never be given (``< 0``)."""
    from experiments.bench_suite import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--merge"])
    assert exit_.value.code == 2 and "--merge merges the --hybrid rows' trees: add --hybrid N" in capsys.readouterr().err
    assert parse_args(["--merge", "--hybrid", "2"]).merge


def test_a_picked_merged_row_times_its_drafters_forward():
    """``--methods ours_ngram+layer_skip1_k3_merged`` alone: the layer-skip drafter's cost is still measured.
    Catches ``_merged`` left on the name (no drafter found: the cost list silently empty)."""
    from experiments.bench_suite import build_methods, parse_args, picked_drafters

    target = pair("llama")[0]
    args = parse_args([*ARGS, "--hybrid", "2", "--merge", "--methods", "ours_ngram+layer_skip1_k3_merged"])
    picked = build_methods(target, None, None, args)
    assert [m.name for m in picked] == ["hf_plain", "ours_ngram+layer_skip1_k3_merged"]
    assert list(picked_drafters(target, None, None, args, picked)) == ["ours_layer_skip1_k3"]


def test_suite_drafters_get_their_documented_settings(tmp_path):
    """Dynamic Medusa rows are dynamic; an EAGLE-2 dynamic tree drafts 2 levels past ``--k``; the datastore lookup
    matches n-grams of at least 3 tokens whatever ``--max-ngram``. Catches ``dynamic=True`` dropped, ``k + 2`` for
    ``k``, and ``max(3, ...)`` dropped."""
    from drafters.eagle_heads import EagleHead, save_head
    from drafters.medusa_heads import MedusaHeads, save_heads
    from experiments.bench_suite import drafters_for, parse_args
    from experiments.chat_data import ChatRows, save_rows

    target = pair("llama")[0]
    save_heads(MedusaHeads.for_target(target, 2, init="random", seed=0), tmp_path / "medusa")
    eagle = save_head(EagleHead.for_target(target, "eagle3", seed=0), tmp_path / "eagle3")
    ids = torch.tensor([[10, 11, 12, 1, 2, 3, 0], [13, 12, 1, 2, 4, 4, 4]])  # [2, T]
    (tmp_path / "rows").mkdir()
    save_rows(ChatRows(ids, torch.tensor([6, 7]), torch.tensor([3, 3]), 0), tmp_path / "rows" / "rows.safetensors")
    args = parse_args(["--k", "3", "--eagle", str(eagle), "--eagle-budget", "8", "--layer-skip", "1",
                       "--medusa-dynamic", "6", "--max-ngram", "2", "--datastore", str(tmp_path / "rows")])
    found = drafters_for(target, None, str(tmp_path / "medusa"), args)
    assert found["ours_medusa_dyn6"].dynamic and not found["ours_medusa16"].dynamic
    assert found["ours_eagle3_dyn8"].k == 5 and found["ours_eagle3_dyn8"].budget == 8 and found["ours_eagle3_k3"].k == 3
    assert found["ours_ngram_ds"].max_ngram == 3 and found["ours_ngram"].max_ngram == 2
