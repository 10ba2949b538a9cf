"""Batched decoding side by side: aggregate tokens/s by batch size (``experiments.bench --batch-sizes``).

For each batch size B the same prompts are decoded in consecutive groups of B by: Hugging Face's
batched ``generate`` (greedy, left-padded with an attention mask), our batched autoregressive loop,
our draft-model chain, our n-gram drafter and, given a head (``--eagle``), our EAGLE chain
(``generate_batch``: ragged acceptance, no padding in the cache). Each method's aggregate throughput is all new tokens over the summed wall time of its
groups (median over ``reps`` timings of each group). The ``*_continuous`` methods decode all prompts
in one call with at most B rows at once (``generate_batch(..., max_rows=B)``: a finished row's place
goes to the next waiting prompt), so a batch no longer waits for its slowest row; ``ours_ar_continuous`` is our
AR loop batched so, the reference of the continuous methods' "same batching" speedup. Every row of every
method is checked against Hugging Face's unbatched greedy output of that prompt. Importable without
hydra or wandb.
"""
from __future__ import annotations

import re
import statistics
import sys
import time

import torch

from drafters import DraftModelDrafter, NoDrafter
from drafters.ngram import prompt_lookup_like_hf
from specdec import SamplingParams, SpeculativeDecoder
from specdec.drafting import release
from specdec.models import synchronize
from specdec.stats import DecodeStats


def timed_call(fn, device: torch.device, *args):
    """``fn(*args) -> (output, stats or None)`` timed with the device synchronised around it: ``(output, stats,
    seconds)``. Seconds spent compiling or capturing the fixed-shape step (``stats.time_compile``: a call at a
    new batch size or capacity bucket) are left out, as peers report their captured loops: the steady state."""
    synchronize(device)
    t0 = time.perf_counter()
    out, stats = fn(*args)
    synchronize(device)
    return out, stats, time.perf_counter() - t0 - (getattr(stats, "time_compile", 0.0) if stats is not None else 0.0)


def hf_batched(target, rows: list[torch.Tensor], max_new: int, pad: int) -> tuple[list[list[int]], None]:
    """HF greedy ``generate`` on ``rows`` left-padded into one batch; the new tokens of each row (and no stats)."""
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=rows[0].device)  # [B, T]
    mask = torch.zeros_like(ids)  # [B, T]
    for b, r in enumerate(rows):
        ids[b, width - r.shape[1]:] = r[0]
        mask[b, width - r.shape[1]:] = 1
    with torch.inference_mode():
        out = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, pad_token_id=pad)
    eos = target.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    new = []
    for row in out[:, width:].tolist():  # cut each row after its first EOS, as unbatched generate stops there
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        new.append(row[:cut])
    return new, None


def ours_batched(decoder: SpeculativeDecoder, rows: list[torch.Tensor], max_new: int,
                 max_rows: int | None = None) -> tuple[list[list[int]], DecodeStats]:
    """``generate_batch`` on ``rows``: the new tokens of each row and the batch's aggregate stats."""
    try:
        out = decoder.generate_batch(rows, max_new_tokens=max_new, seed=0, max_rows=max_rows)
    finally:
        release(decoder.drafter)
    return [seq[0, r.shape[1]:].tolist() for seq, r in zip(out.sequences, rows)], out.stats


#: Methods whose ``run`` takes every prompt at once and the batch size (continuous batching).
CONTINUOUS = "_continuous"


def is_chain(name: str) -> bool:
    """A benchmark method name of a fixed-length chain (``..._k<k>``: a draft model's or an EAGLE head's)."""
    return re.fullmatch(r".+_k\d+", name) is not None  # not ours_knn, a drafter of one's own named knn


def eagle_chains(eagle: tuple[str, str] | None, ks: list[int]) -> dict:
    """``eagle = (head directory, dtype name)``: per draft length an EAGLE chain whose head forwards serve
    every row at once, ``ours_<version>_k<k>``, the same chain through the head's transformers forward instead
    of :mod:`drafters.fast_decoder` (``_hf_forward``), and run as one drafter copy per row (one head forward per
    row and position), ``ours_<version>_k<k>_per_row``."""
    if eagle is None:
        return {}
    from drafters import EagleDrafter
    from drafters.eagle import EagleRows
    from drafters.eagle_heads import load_head

    class PerRowEagle(EagleDrafter):
        def batched(self):
            return EagleRows(self)

    head = load_head(eagle[0])
    table = {}
    for k in ks:
        table[f"ours_{head.version}_k{k}"] = EagleDrafter(head, num_speculative_tokens=k, dtype=eagle[1])
        table[f"ours_{head.version}_k{k}_hf_forward"] = EagleDrafter(head, num_speculative_tokens=k, dtype=eagle[1],
                                                                     fast_forward=False)
        table[f"ours_{head.version}_k{k}_per_row"] = PerRowEagle(head, num_speculative_tokens=k, dtype=eagle[1])
    return table


def methods(target, draft, ks: list[int], ngram_tokens: int, max_ngram: int, compile: str = "none",
            confidence: tuple[float, ...] = (), eagle: tuple[str, str] | None = None, hybrid: int = 0) -> dict:
    """Name -> ``run(rows, max_new) -> (new tokens per row, stats or None)`` (``run(rows, max_new, max_rows)``
    for the continuous methods); one draft-model chain per draft length in ``ks`` (and per ``confidence``
    threshold: ``ours_chain_k<k>_conf<c>``, a dynamic draft length; with ``eagle``, an EAGLE chain per draft
    length, :func:`eagle_chains`); with ``hybrid`` N > 0, each chain also behind prompt lookup of ``ngram_tokens``
    drafts where a suffix of >= N tokens recurred (``ours_ngram+<chain>``); with ``compile`` (not ``none``) also our
    AR loop and the chains through the fixed-shape step (``ours_ar_<compile>``, ...)."""
    pad = target.generation_config.pad_token_id
    pad = pad if pad is not None else 0
    greedy = SamplingParams()
    ours = {"ours_ar": NoDrafter(), **{f"ours_chain_k{k}": DraftModelDrafter(draft, k) for k in ks},
            **{f"ours_chain_k{k}_conf{c}": DraftModelDrafter(draft, k, confidence_threshold=c) for k in ks
               for c in confidence},
            **eagle_chains(eagle, ks),
            "ours_ngram": prompt_lookup_like_hf(ngram_tokens, max_ngram)}
    if hybrid:
        from drafters.hybrid import behind_lookup

        ours |= {f"ours_ngram+{name.removeprefix('ours_')}": behind_lookup(d, ngram_tokens, hybrid)
                 for name, d in ours.items() if is_chain(name)}
    table = {"hf_plain": lambda rows, m: hf_batched(target, rows, m, pad)}
    for name, drafter in ours.items():
        decoder = SpeculativeDecoder(target, drafter, "greedy", greedy)
        table[name] = lambda rows, m, decoder=decoder: ours_batched(decoder, rows, m)
        table[name + CONTINUOUS] = lambda rows, m, b, decoder=decoder: ours_batched(decoder, rows, m, b)
    if compile != "none":
        fixed = {"ours_ar": NoDrafter(), **{f"ours_chain_k{k}": DraftModelDrafter(draft, k) for k in ks}}
        for name, drafter in fixed.items():
            decoder = SpeculativeDecoder(target, drafter, "greedy", greedy, compile=compile)
            table[f"{name}_{compile}"] = lambda rows, m, decoder=decoder: ours_batched(decoder, rows, m)
    return table


def _compiled(name: str) -> bool:
    """A method whose first call at a new shape compiles or captures (its warm-up runs every group)."""
    return name.endswith(("_inductor", "_graph"))


def same_batching(name: str, compile: str = "none") -> str:
    """The AR row batched (and compiled) as method ``name`` is: ``ours_ar_continuous`` for a continuous method,
    ``ours_ar_<compile>`` for a fixed-shape one, else ``ours_ar``."""
    if name.endswith(CONTINUOUS):
        return "ours_ar" + CONTINUOUS
    return f"ours_ar_{compile}" if compile != "none" and name.endswith(f"_{compile}") else "ours_ar"


def _groups(name: str, prompts: list, size: int) -> list[tuple[list, tuple]]:
    """A method's calls at batch size ``size``: (prompts, extra arguments) per call."""
    if name.endswith(CONTINUOUS):
        return [(prompts, (size,))]
    return [(prompts[i : i + size], ()) for i in range(0, len(prompts), size)]


def run_batch_sizes(target, draft, prompts: list[torch.Tensor], batch_sizes: list[int], max_new: int, reps: int,
                    ks: list[int], ngram_tokens: int, max_ngram: int, compile: str = "none",
                    confidence: tuple[float, ...] = (), eagle: tuple[str, str] | None = None,
                    hybrid: int = 0) -> list[dict]:
    """One row per (batch size, method): aggregate tokens/s, speedups, tau (ours), and whether every row
    equals HF greedy. ``vs_ours_ar``: over our AR loop in groups; ``vs_ours_ar_same_batching``: over our AR loop
    batched the same way (a continuous method over ``ours_ar_continuous``, whose own row shows what continuous
    batching alone gains; a fixed-shape ``*_<compile>`` one over ``ours_ar_<compile>``), so speculation's gain is not credited with the scheduling's. ``vs_ours_ar_reps``: the
    speedup over our AR loop in groups within each rep (the method's and the loop's summed seconds of that rep),
    so a machine whose speed drifts between reps shows as spread, not as a biased ratio. Ctrl-C after the first
    batch size keeps the rows of the sizes finished."""
    with torch.inference_mode():
        reference = [target.generate(p, do_sample=False, max_new_tokens=max_new,
                                     pad_token_id=target.generation_config.pad_token_id or 0)[0, p.shape[1]:].tolist()
                     for p in prompts]
    table = methods(target, draft, ks, ngram_tokens, max_ngram, compile, confidence, eagle, hybrid)
    rows = []
    for size in batch_sizes:
        try:
            times, new, stats = _time_size(table, prompts, size, max_new, reps)
        except KeyboardInterrupt:
            if not rows:
                raise
            print(f"interrupted (Ctrl-C) at batch size {size}: the table covers the batch sizes before it (Ctrl-C "
                  "again stops at once)", file=sys.stderr, flush=True)
            break
        seconds = {name: sum(statistics.median(t) for t in groups) for name, groups in times.items()}
        per_rep = {name: [sum(t[r] for t in groups) for r in range(reps)] for name, groups in times.items()}
        tps = {name: sum(len(n) for n in new[name]) / seconds[name] for name in table}
        for name in table:
            paired = [a / b for a, b in zip(per_rep["ours_ar"], per_rep[name])]  # same tokens: a time ratio
            same = same_batching(name, compile)
            rows.append({"batch_size": size, "method": name, "tokens_per_s": tps[name],
                         "vs_hf_batched": tps[name] / tps["hf_plain"], "vs_ours_ar": tps[name] / tps["ours_ar"],
                         "vs_ours_ar_same_batching": tps[name] / tps[same], "vs_ours_ar_reps": paired,
                         "tau": DecodeStats.merge(stats[name]).tau if stats[name] else None,
                         "matches_hf_greedy": new[name] == reference})
    return rows


def _time_size(table: dict, prompts: list, size: int, max_new: int, reps: int) -> tuple[dict, dict, dict]:
    """Every method at batch size ``size``, after a warm-up: per method the seconds of each of its calls
    (``[group][rep]``), its new tokens per prompt and its stats. Each rep runs every method once, in an
    order rotated by one per rep, so that a drifting machine speed hits every method alike."""
    device = prompts[0].device
    for name, fn in table.items():  # warm-up at this batch size (every group's shape where that compiles)
        groups = _groups(name, prompts, size)
        for group, extra in groups if _compiled(name) else groups[:1]:
            fn(group[:size], max_new, *extra)
    names = list(table)
    times = {name: [[] for _ in _groups(name, prompts, size)] for name in names}
    new, stats = {name: [] for name in names}, {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            for g, (group, extra) in enumerate(_groups(name, prompts, size)):
                out, run_stats, seconds = timed_call(table[name], device, group, max_new, *extra)
                times[name][g].append(seconds)
                if rep == 0:
                    new[name] += out
                    stats[name] += [run_stats] if run_stats is not None else []
    return times, new, stats


def markdown(rows: list[dict]) -> str:
    columns = ["batch size", "method", "aggregate tokens/s", "vs HF batched generate", "vs our batched AR",
               "vs our batched AR within a rep: median (min-max)", "vs our AR batched the same way", "tau",
               "every row = HF greedy"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        tau = "" if r["tau"] is None else f"{r['tau']:.2f}"
        paired = r["vs_ours_ar_reps"]
        spread = f"{statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f})"
        lines.append(f"| {r['batch_size']} | {r['method']} | {r['tokens_per_s']:.1f} | {r['vs_hf_batched']:.2f}x | "
                     f"{r['vs_ours_ar']:.2f}x | {spread} | {r['vs_ours_ar_same_batching']:.2f}x | {tau} | "
                     f"{'yes' if r['matches_hf_greedy'] else 'NO'} |")
    return "\n".join(lines)


def batched_main(target, draft, prompts, args, argv) -> int:
    """``experiments.bench --batch-sizes``: the batched table, printed and written."""
    from experiments.bench_inputs import check_batch_sizes
    from experiments.bench_methods import final_status, interrupted_note
    from experiments.bench_output import command_line, exit_status, machine_line, match_note, publish

    check_batch_sizes(args.batch_sizes, len(prompts), f"loaded ({args.dataset or 'the prompt set'} holds no more)",
                      give_more="")  # a --dataset that held fewer than --prompts
    rows = run_batch_sizes(target, draft, prompts, args.batch_sizes, args.max_new_tokens, args.reps, args.ks,
                           args.ngram_tokens, args.max_ngram, args.compile, args.confidence,
                           (args.eagle, args.draft_dtype) if args.eagle else None, args.hybrid)
    done, asked = len(dict.fromkeys(r["batch_size"] for r in rows)), len(set(args.batch_sizes))
    header = (f"{command_line(argv)}{interrupted_note(done, asked, 'batch sizes')}Machine: {machine_line()}. {len(prompts)} prompts in groups of each batch size "
              "(`*_continuous`: all prompts in one call, at most that many rows at once, a finished row's place "
              f"taken by the next prompt), {args.max_new_tokens} new tokens, greedy, draft in {args.draft_dtype}, "
              f"median of {args.reps} reps per group.\n")
    publish(header + "\n" + markdown(rows) + match_note(args.dtype), {"rows": rows, "batch_sizes_done": done}, args)
    return final_status(exit_status(rows, args.dtype, "matches_hf_greedy"), done, asked)


if __name__ == "__main__":  # a library module: say which command runs it instead of exiting 0 silently
    print("error: experiments.bench_batch is not a command: run it as python -m experiments.bench --batch-sizes 4,8",
          file=sys.stderr)
    sys.exit(2)
