"""Side-by-side benchmark: ours vs Hugging Face ``generate`` on the same pair, prompts and machine.

    python -m experiments.bench --size default --prompts 10 --max-new-tokens 128 --ks 2,4,6 --reps 3
    python -m experiments.bench --device cuda --synthetic llama-8b --prompts 2 --max-new-tokens 32 --ks 4
    python -m experiments.bench --model smollm2 --dataset suite      # a real target, per category (experiments.bench_suite)

Greedy, batch 1, one process: Hugging Face plain ``generate``, assisted generation with the
draft model (constant k, and its default schedule), prompt lookup; ours: autoregressive, the
draft-model chain for each k, n-gram. Warm-ups first, then ``--reps`` repetitions per prompt in
rotating order, CPU threads pinned. Every output is checked against HF plain greedy. Prints a
Markdown table (also written to ``--markdown``) and writes raw results to ``--json``.

Besides tokens/s, tau and draft acceptance, a chain's row gives its zero-overhead ceiling against HF with the
same drafter and k: HF's time divided by our prefill plus our verify forwards each costed at
``k T_d(1) + T_t(k + 1)``, i.e. what the ratio would be if our loop cost nothing beyond the forwards; and its
efficiency: its measured speedup over our autoregressive loop divided by the speedup predicted the same way (both
loops' prefills and forward counts, forwards at their measured costs). Both per prompt, median (min-max) over
prompts. ``T_d(1)`` is the draft forward as our chains run it (the lean forward where the draft supports it; the
header gives transformers' time beside it). Forward costs are timed after every prompt's rounds (5 repetitions
each) and the median over prompts is kept, so a machine whose
speed drifts during the run skews the costs and the runs alike. A second table splits our loops' steps into
drafting, verifying, accepting and the rest, measured inside the timed calls, beside those isolated costs
(:func:`experiments.bench_methods.loop_table`).

On a GPU (``--device cuda``) every method runs with the same SDPA kernels (cuDNN attention off:
it builds a plan per new sequence length, which would time plan building, not decoding), the
device is synchronised around every timed call (a ``--compile`` row's time leaves out compiling or
capturing its step, ``time_compile``: the warm-up call's, or a later call's at a new capacity bucket),
and ``--verify-curve`` adds the verify forward's cost by width, T(w) / T(1), for the ``sdpa`` and ``triton`` backends at ``--context`` tokens.
With ``--compile`` the fixed-shape step's own forward costs are timed too (captured on a GPU:
:mod:`experiments.captured_costs`): its chains' efficiency is taken over ``ours_ar_<compile>`` against
them, and a last column gives each method's time per token (prefill included) over the target's
read floor (its weights and KV read once at the measured copy bandwidth).
``--synthetic llama-8b`` (or ``llama-1b``) decodes random prompts with a random-weight target of that
shape and its layer-truncated self-draft (:mod:`experiments.synthetic`): timings only, its
acceptance is meaningless. Importable without hydra or wandb.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch

from drafters import DraftModelDrafter, NoDrafter
from drafters.fast_decoder import lean_probe
from drafters.ngram import prompt_lookup_like_hf
from experiments import cli
from experiments.bench_inputs import MAX_PROMPT_TOKENS, SIZE, check_flags, fill_defaults, load_pair, load_prompt_ids
from experiments.bench_methods import (
    Method,
    decode_run,
    decode_seconds_per_token,
    final_status,
    interrupted_note,
    isolated_round,
    loop_table,
    median_costs,
    pooled_tau,
    pooled_tokens_per_s,
    run_all,
    spread,
    spread_cell,
    tau_cell,
    tokens_per_s,
)
from experiments.bench_output import command_line, exit_status, machine_line, match_note, publish
from experiments.captured_costs import floor_line, static_costs
from experiments.cost_measure import draft_cost_note, implausible, measure_costs, measure_interleaved
from experiments.hf_generate import hf, hf_assisted, hf_static_compiled
from experiments.synthetic import DRAFT_LAYERS, PROMPT_LEN
from specdec.models import DTYPES
from specdec.static_shape import COMPILE_MODES
from verifier.fused_projections import fused_copy
from verifier.narrow_linear import narrow_models
from verifier.verifier import SDPA_KERNELS


def build_methods(target, draft, args, fixed_target=None) -> list[Method]:
    """HF plain / assisted / prompt lookup and ours, in that order; ``fixed_target``: the target of the
    ``--compile`` rows (a fused copy with ``--fuse-projections``; default ``target``)."""
    m, ks, ng = args.max_new_tokens, args.ks, args.ngram_tokens
    methods = [Method("hf_plain", hf(target, m), False),
               Method("hf_prompt_lookup", hf(target, m, prompt_lookup_num_tokens=ng,
                                             max_matching_ngram_size=args.max_ngram), False, ng),
               Method("ours_ar", decode_run(target, NoDrafter(), m), True),
               Method("ours_ngram", decode_run(target, prompt_lookup_like_hf(ng, args.max_ngram), m),
                      True, ng, peer="hf_prompt_lookup")]
    if args.hf_compile:
        methods.insert(1, Method("hf_static_compiled", hf_static_compiled(target, m), False))
    if args.hf_dynamic:
        methods.append(Method("hf_assisted_default", hf_assisted(target, draft, m, None), False))
    for k in ks:
        methods.append(Method(f"hf_assisted_k{k}", hf_assisted(target, draft, m, k), False, k))
        methods.append(Method(f"ours_chain_k{k}", decode_run(target, DraftModelDrafter(draft, k), m), True, k,
                              peer=f"hf_assisted_k{k}"))
        for c in args.confidence:  # a dynamic draft length, ours and HF's at the same threshold
            methods.append(Method(f"hf_assisted_k{k}_conf{c}", hf_assisted(target, draft, m, k, c), False, k))
            methods.append(Method(f"ours_chain_k{k}_conf{c}",
                                  decode_run(target, DraftModelDrafter(draft, k, confidence_threshold=c), m), True, k,
                                  peer=f"hf_assisted_k{k}_conf{c}", dynamic=True))
    for tree in args.trees:
        methods.append(Method(f"ours_tree_{tree}", decode_run(target, DraftModelDrafter(draft, tree=tree), m), True))
    if args.compile != "none":  # the fixed-shape step (captured on a GPU with --compile graph)
        c, t = args.compile, fixed_target if fixed_target is not None else target
        opts = {"compile": c, "attn_backend": args.attn_backend}
        methods.append(Method(f"ours_ar_{c}", decode_run(t, NoDrafter(), m, **opts), True))
        for k in ks:
            methods.append(Method(f"ours_chain_k{k}_{c}", decode_run(t, DraftModelDrafter(draft, k), m, **opts), True,
                                  k, peer=f"hf_assisted_k{k}"))
        for tree in args.trees:
            methods.append(Method(f"ours_tree_{tree}_{c}", decode_run(t, DraftModelDrafter(draft, tree=tree), m, **opts),
                                  True))
    return methods


def zero_overhead_seconds(meth: Method, costs: dict) -> dict[int, float]:
    """Per prompt, what ``meth`` (one of ours) would take if its loop cost nothing beyond the forwards: its measured
    prefill plus its verify forwards, each costed at ``k T_d(1) + T_t(k + 1)`` (``T_t(1)`` without drafts)."""
    round_s = sum(isolated_round(meth.k, costs))
    return {i: statistics.median(meth.prefill_s[i]) + meth.forwards[i] * round_s for i in meth.times}


def zero_overhead_ceiling(meth: Method, peer: Method, costs: dict) -> dict[int, float]:
    """Per prompt, the most a chain could gain over ``peer``: the peer's time over ours without loop overhead
    (:func:`zero_overhead_seconds`)."""
    return {i: statistics.median(peer.times[i]) / seconds for i, seconds in zero_overhead_seconds(meth, costs).items()}


def _chain_figures(m: Method, mine: dict, ar: Method, ar_tps: dict, costs: dict, peer: Method) -> tuple[dict, dict]:
    """A chain's efficiency and its zero-overhead ceiling against ``peer``, median (min-max) over prompts.

    Efficiency, per prompt: the chain's measured speedup over our AR loop ``ar`` (tokens/s ``ar_tps``, through the
    same step) divided by the speedup ``costs`` predict for that prompt, both loops costed without overhead
    (:func:`zero_overhead_seconds`: each one's own prefill and count of forwards, so the prompt's tau and its
    prefill are in the prediction, as in the measurement)."""
    ours, base = zero_overhead_seconds(m, costs), zero_overhead_seconds(ar, costs)
    predicted = {i: (m.new_tokens[i] / ours[i]) / (ar.new_tokens[i] / base[i]) for i in mine}  # tokens/s, as measured
    efficiency = [(mine[i] / ar_tps[i]) / predicted[i] for i in mine]
    return spread(efficiency), spread(list(zero_overhead_ceiling(m, peer, costs).values()))


def summarize(methods: list[Method], costs: dict, static: dict | None = None,
              compile: str = "none") -> tuple[list[dict], str]:
    """Rows of per-method figures (median (min-max) over prompts) and the Markdown table.

    With ``static`` (:func:`experiments.captured_costs.static_costs`), a ``_<compile>`` chain's efficiency is
    taken over ``ours_ar_<compile>`` against the fixed-shape step's own forward costs, and a last column gives
    every method's time per token over the target's read floor."""
    by_name = {m.name: m for m in methods}
    tps = {m.name: tokens_per_s(m) for m in methods}
    base = tps["hf_plain"]
    rows = []
    for m in methods:
        mine = tps[m.name]
        floor = 1 / pooled_tokens_per_s(m) / static["floor_s"] if static is not None else None
        decode = decode_seconds_per_token(m) if static is not None else None
        row = {"method": m.name, "tokens_per_s": statistics.median(mine.values()),
               "speedup_vs_hf_plain": spread([mine[i] / base[i] for i in mine]),
               "matches_hf_plain": m.matches, "tau": statistics.mean(m.tau.values()) if m.tau else None,
               "tau_pooled": pooled_tau(m),
               "draft_acceptance": statistics.mean(m.acceptance.values()) if m.acceptance and m.k else None,
               "vs_hf_same_drafter": None, "efficiency": None, "ceiling_vs_hf": None,
               "per_token_vs_read_floor": floor,
               "decode_per_token_vs_read_floor": decode / static["floor_s"] if decode is not None else None}
        if m.peer:
            row["vs_hf_same_drafter"] = spread([mine[i] / tps[m.peer][i] for i in mine])
        if m.name.startswith("ours_chain") and not m.dynamic:
            fixed = static is not None and m.name.endswith(f"_{compile}")
            ar = f"ours_ar_{compile}" if fixed else "ours_ar"
            row["efficiency"], row["ceiling_vs_hf"] = _chain_figures(
                m, mine, by_name[ar], tps[ar], static if fixed else costs, by_name[m.peer])
        rows.append(row)
    return rows, _markdown(rows, static is not None)


def _markdown(rows: list[dict], floor: bool) -> str:
    columns = ["method", "tokens/s (median)", "speedup vs HF plain, median (min-max)", "ours / HF same drafter & k",
               "tau: mean over prompts / pooled", "draft acceptance (mean over prompts)", "efficiency (measured / predicted speedup over our AR)",
               "zero-overhead ceiling vs HF same drafter & k", "output = HF plain greedy"] + \
        (["time per token / target's read floor", "after prefill"] if floor else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        acc = f"{r['draft_acceptance']:.2f}" if r["draft_acceptance"] is not None else ""
        cells = [r["method"], f"{r['tokens_per_s']:.1f}", spread_cell(r["speedup_vs_hf_plain"]),
                 spread_cell(r["vs_hf_same_drafter"]), tau_cell(r), acc, spread_cell(r["efficiency"]),
                 spread_cell(r["ceiling_vs_hf"]),
                 "yes" if r["matches_hf_plain"] else "NO"]
        if floor:
            after = r["decode_per_token_vs_read_floor"]
            cells += [f"{r['per_token_vs_read_floor']:.2f}", f"{after:.2f}" if after is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verify_curve(target, context: int, widths: tuple[int, ...], backends: list[str], reps: int) -> tuple[dict, str]:
    """Median seconds of one verify forward (a chain's tree mask) by width after ``context`` tokens, per
    attention backend, and a Markdown table of T(w) / T(1). A target with narrow linears
    (:mod:`verifier.narrow_linear`) is also timed as copies with plain ``nn.Linear`` s and with the other narrow
    product, interleaved with it (first backend only)."""
    from verifier.availability import usable_backends

    backends = usable_backends(backends, next(target.parameters()).device)  # one error line before any timing
    variants = _linear_variants(target)
    curves = {}
    for i, b in enumerate(backends):
        others = list(variants.items()) if i == 0 else []
        timed = measure_interleaved([(target, context, widths)] + [(m, context, widths) for _, m in others],
                                    reps=reps, backend=b)
        curves[b] = timed[0]
        for (label, _), curve in zip(others, timed[1:]):
            curves[f"{b}, {label} linears"] = curve
    lines = ["| backend | " + " | ".join(f"w={w}" for w in widths) + " |", "|" + "---|" * (len(widths) + 1)]
    for b, curve in curves.items():
        lines.append(f"| {b} T(w) ms | " + " | ".join(f"{curve[w] * 1e3:.2f}" for w in widths) + " |")
        lines.append(f"| {b} T(w)/T(1) | " + " | ".join(f"{curve[w] / curve[widths[0]]:.2f}" for w in widths) + " |")
    return curves, "\n".join(lines)


def _linear_variants(target) -> dict:
    """Copies of a ``target`` with narrow linears to time beside it: ``plain`` (``nn.Linear``) and the other narrow
    product where it runs (e.g. ``transposed`` beside ``packed``); none for a plain target."""
    from verifier.narrow_linear import (
        best_product,
        narrow_product_of,
        plain_linears,
        use_narrow_linears,
    )

    product = narrow_product_of(target)
    if product is None:
        return {}
    plain = copy.deepcopy(target)
    plain_linears(plain)
    variants = {"plain": plain}
    other = "transposed" if product == "packed" else best_product(plain)
    if other != product:
        variants[other] = copy.deepcopy(plain)
        use_narrow_linears(variants[other], product=other)
    return variants


CURVE_WIDTHS = (1, 2, 4, 8, 16, 32, 64)  # --verify-curve's default widths


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m experiments.bench",
                           description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=None, help=f"embedded zoo pair size: default or micro (default {SIZE})")
    p.add_argument("--model", help="a real target on the prompt suite, per category (experiments.bench_suite); "
                   "python -m experiments.bench --model smollm2 --help lists its options")
    p.add_argument("--target", help="target checkpoint directory (instead of the zoo)")
    p.add_argument("--draft", help="draft checkpoint directory")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--dataset", help="Spec-Bench question.jsonl (default: held-out stdlib prompts)")
    p.add_argument("--prompts", type=cli.int_at_least(1), default=10)
    p.add_argument("--max-new-tokens", type=cli.int_at_least(1), default=128)
    p.add_argument("--max-prompt-tokens", type=cli.int_at_least(1), default=None,
                   help=f"keep each prompt's last n tokens (default {MAX_PROMPT_TOKENS})")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where every model runs")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="precision of the target")
    p.add_argument("--draft-dtype", default="float32", choices=sorted(DTYPES),
                   help="precision of the draft model, for HF assisted generation and ours alike, and of EAGLE heads")
    p.add_argument("--synthetic", default=None,
                   help="a random-weight target of a real shape (llama-8b, llama-1b, llama-micro) with a layer-truncated "
                        "self-draft, random prompts: timings only (see experiments.synthetic)")
    p.add_argument("--draft-layers", type=cli.int_at_least(1), default=None,
                   help=f"--synthetic: layers of the self-draft (default {DRAFT_LAYERS})")
    p.add_argument("--prompt-len", type=cli.int_at_least(1), default=None,
                   help=f"--synthetic: prompt length (default {PROMPT_LEN})")
    p.add_argument("--batch-sizes", type=cli.ints_at_least(1), default=None,
                   help="instead of the batch-1 table: aggregate tokens/s of batched decoding at these batch sizes "
                        "(HF batched generate vs our batched AR, a chain at each --ks, n-gram)")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="also run our AR loop and chains through the fixed-shape step (graph: captured on a GPU; "
                        "inductor: torch.compile, CPU or GPU; with --batch-sizes too)")
    p.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "triton"],
                   help="--compile rows' verify attention: SDPA over a key mask, or the tree kernel on the device-side "
                        "lengths (the eager rows keep sdpa)")
    p.add_argument("--fuse-projections", action="store_true",
                   help="--compile rows: a copy of the target (a second set of weights) with its q/k/v and gate/up "
                        "projections fused (verifier.fused_projections); HF and the eager rows keep the target as loaded")
    p.add_argument("--verify-curve", action="store_true",
                   help="also time the verify forward by width for each --backends at --context tokens")
    p.add_argument("--backends", type=lambda s: s.split(","), default=None,
                   help="--verify-curve backends (default: sdpa, and triton where its kernel runs here)")
    p.add_argument("--context", type=cli.int_at_least(1), default=None, help="--verify-curve context (default: the run's)")
    p.add_argument("--verify-widths", type=lambda s: tuple(cli.ints_at_least(1)(s)), default=None,
                   help=f"--verify-curve widths (default: {','.join(map(str, CURVE_WIDTHS))})")
    p.add_argument("--ks", type=cli.ints_at_least(1), default=[2, 4, 6])
    p.add_argument("--confidence", type=cli.thresholds, default=[],
                   help="also chains at each --ks that stop after a draft less likely than each of these thresholds "
                        "(ours: drafter confidence_threshold; HF: assistant_confidence_threshold; with --batch-sizes too)")
    p.add_argument("--trees", type=lambda s: [t for t in s.split(",") if t], default=[],
                   help="draft-model tree presets to add (e.g. binary,sparse60; eager, and with --compile captured)")
    p.add_argument("--eagle", help="--batch-sizes: also EAGLE chains at each --ks with this head directory (in --draft-dtype)")
    p.add_argument("--hybrid", type=cli.int_at_least(0), default=0, metavar="N", help="--batch-sizes: also each chain behind prompt "
                   "lookup (--ngram-tokens drafts where a suffix of >= N tokens recurred), ours_ngram+<chain>")
    p.add_argument("--ngram-tokens", type=cli.int_at_least(1), default=4)
    p.add_argument("--max-ngram", type=cli.int_at_least(1), default=2, help="HF's max_matching_ngram_size (its default is 2)")
    p.add_argument("--hf-dynamic", action=argparse.BooleanOptionalAction, default=True,
                   help="also run HF assisted generation with its default schedule")
    p.add_argument("--hf-compile", action="store_true",
                   help="also HF plain generate through its static cache and torch.compile (hf_static_compiled; "
                        "the first call per shape compiles: with --reps 3 or more the median leaves it out)")
    cli.add_narrow_linears(p)
    p.add_argument("--reps", type=cli.int_at_least(1), default=3)
    p.add_argument("--threads", type=cli.int_at_least(1), default=2)
    p.add_argument("--json", type=cli.output_file, help="write raw results here")
    p.add_argument("--markdown", type=cli.output_file, help="write the Markdown table here")
    return p.parse_args(argv)


@cli.guard()
def main(argv=None) -> int:
    if any(a == "--model" or a.startswith("--model=") for a in (sys.argv[1:] if argv is None else argv)):  # the suite
        from experiments import bench_suite

        return bench_suite.main(argv)
    args = parse_args(argv)
    check_flags(args)
    fill_defaults(args)
    if args.verify_curve:  # a backend that cannot run here is one error line before the run, not after it
        from verifier.availability import usable_backends

        args.backends = usable_backends(args.backends, args.device)
    if args.attn_backend != "sdpa":
        from verifier.availability import check_attn_backend

        check_attn_backend(args.attn_backend, args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.nn.attention.sdpa_kernel(SDPA_KERNELS):  # the same attention kernels for HF and ours
        target, draft, tok = load_pair(args)
        narrow = narrow_models([target, draft], args.narrow_linears, "--narrow-linears")
        prompts = load_prompt_ids(tok, target, args)
        if args.batch_sizes:
            from experiments.bench_batch import batched_main

            return batched_main(target, draft, prompts, args, argv)
        fixed = fused_copy(target) if args.fuse_projections and args.compile != "none" else target
        methods = build_methods(target, draft, args, fixed)
        context = int(statistics.median(p.shape[1] for p in prompts)) + args.max_new_tokens // 2
        samples: list[dict] = []  # forward costs timed between prompts, so machine drift hits them and the runs alike
        probe = lean_probe(draft, True, context)  # the draft as our chains run it
        asked = len(prompts)
        def sample() -> None:
            samples.append(measure_costs(target, draft, context, args.ks, reps=5, draft_probe=probe))
        done = run_all(methods, prompts, args.reps, between=sample)
        cut = len(samples) < done  # a Ctrl-C in a cost sample (after the last prompt: every prompt done, yet cut)
        prompts = prompts[:done]
        if not samples:  # a Ctrl-C cut the first prompt's sample: one more (Ctrl-C again stops at once)
            sample()
        costs = median_costs(samples)
        busy = implausible(costs["target"])
        if busy:  # the efficiency and ceiling columns rest on these costs
            print(f"warning: the target's forward costs are implausible ({busy}): the machine was busy while they "
                  "were timed; the efficiency and ceiling columns are unreliable (rerun on a quiet machine)",
                  file=sys.stderr)
        static = (static_costs(fixed, draft, context, args.ks, compile=args.compile, backend=args.attn_backend)
                  if args.compile != "none" else None)
        rows, table = summarize(methods, costs, static, args.compile)
        loops, loop_md = loop_table(methods, lambda m: static if m.name.endswith(f"_{args.compile}") else costs)
        curves, curve_table = (verify_curve(target, args.context or context, args.verify_widths or CURVE_WIDTHS, args.backends, 10)
                               if args.verify_curve else (None, ""))
    source = f"synthetic {args.synthetic} (random weights, {args.draft_layers}-layer self-draft)" if args.synthetic else \
        (args.target or f"zoo {args.size}")
    header = (f"{command_line(argv)}{interrupted_note(len(prompts), asked, cut=cut)}Machine: {machine_line()}. Target {source} in {args.dtype} on {args.device} "
              f"(narrow linears {narrow}{fused_note(args)}), draft in {args.draft_dtype}. {len(prompts)} prompts, {args.max_new_tokens} new "
              f"tokens, greedy, batch 1, "
              f"{args.reps} reps. Forward costs at context {context}: target "
              + ", ".join(f"w{w} {t * 1e3:.1f} ms" for w, t in costs["target"].items())
              + f"; draft w1 {draft_cost_note(costs)}."
              + (" " + floor_line(static, context) if static else "")
              + (f" Warning: implausible target costs ({busy}): efficiency and ceiling unreliable." if busy else "")
              + "\n")
    text = (header + "\n" + table + "\n\nWhere our steps go (ms per verify step in the loop; isolated costs in brackets):"
            "\n\n" + loop_md + (f"\n\nVerify forward by width at context {args.context or context}:\n\n"
                                + curve_table if curve_table else "") + match_note(args.dtype))
    publish(text, {"rows": rows, "loops": loops, "costs": costs, "static_costs": static, "verify_curves": curves,
                   "prompts_done": len(prompts), "prompts_asked": asked}, args)
    return final_status(exit_status(rows, args.dtype), len(prompts), asked, cut=cut)


def fused_note(args) -> str:
    """The header's word on ``--fuse-projections`` (only the ``--compile`` rows' copy is fused)."""
    return f"; the {args.compile} rows' copy with fused projections" if args.fuse_projections and args.compile != "none" \
        else ""


if __name__ == "__main__":
    sys.exit(main())
