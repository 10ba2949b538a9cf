"""Side-by-side benchmark of drafters on the same pair, prompts and machine: EAGLE vs draft model, Medusa, n-gram.

    python -m experiments.bench_drafters --prompts 10 --max-new-tokens 96 --ks 4,6 --reps 2 --threads 2

One process, batch 1, warm-ups first, ``--reps`` repetitions per prompt in rotating order (see
:func:`experiments.bench.run_all`). For each temperature in ``--temperatures``:

- greedy (0): Hugging Face plain ``generate``, prompt lookup and assisted generation with the draft
  model at each k of ``--hf-ks`` (the "best HF method" is the fastest of these), then ours:
  autoregressive, n-gram, the draft model (chain per k, dynamic tree), Medusa (its derived tree),
  EAGLE eagle2 / eagle3 (chain per k, dynamic tree). Every output is checked against HF plain greedy.
- sampled (T > 0, ``rejection``): ours only: n-gram, the chains (they sample their drafts) and Medusa
  (deterministic children); dynamic trees are left out (their deterministic children are accepted with
  probability p(x) only, far below a sampled chain's min(1, p/q)); outputs are samples, not compared.

Per method: tokens/s (median over prompts), speedup over our autoregressive loop and, greedy, over HF
plain and over the best HF method (median and min-max over prompts), over the best HF method with all
prompts pooled (total new tokens over total time: :func:`experiments.bench.pooled_tokens_per_s`), tau
(the mean over prompts, and pooled: all prompts' new tokens over all their target forwards) and depth-1
acceptance.
Heads come from ``--medusa`` / ``--eagle2`` / ``--eagle3`` (default: where the training entry points
put them for ``--size``); a drafter whose heads are missing is skipped with a note.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from drafters import (
    DraftModelDrafter,
    EagleDrafter,
    MedusaDrafter,
    NoDrafter,
)
from drafters.ngram import prompt_lookup_like_hf
from experiments import cli
from experiments.bench_batch import is_chain
from experiments.bench_inputs import drafter_class, load_pair, load_prompt_ids, own_drafters
from experiments.bench_methods import (
    Method,
    decode_run,
    final_status,
    interrupted_note,
    pick_methods,
    pooled_tau,
    pooled_tokens_per_s,
    run_all,
    tau_cell,
    tokens_per_s,
)
from experiments.bench_output import machine_line, publish
from experiments.hf_generate import hf, hf_assisted
from specdec.errors import SpecDecError
from specdec.stats import DecodeStats
from verifier.verifier import SDPA_KERNELS

DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # --head-dtypes: method name suffixes


def head_drafters(args, notes: list[str]) -> dict:
    """``{name: factory(**shape) -> drafter}`` for the heads that exist (missing ones noted, skipped; a
    default directory without a head config counts as missing, a directory given on the command line must exist
    and is loaded, so a bad one is an error)."""
    from drafters.eagle_heads import FILES as EAGLE_FILES
    from drafters.eagle_heads import default_heads_dir as eagle_dir
    from drafters.medusa_heads import FILES as MEDUSA_FILES
    from drafters.medusa_heads import default_heads_dir as medusa_dir

    found = {}
    for name, given in (("medusa", args.medusa), ("eagle2", args.eagle2), ("eagle3", args.eagle3)):
        medusa = name == "medusa"
        default = medusa_dir(args.size, args.cache_dir) if medusa else eagle_dir(name, args.size, args.cache_dir)
        directory = given or default
        config = (MEDUSA_FILES if medusa else EAGLE_FILES).config_file
        given_dir = Path(given).expanduser() if given else None
        if given_dir is not None and not (given_dir / config).is_file():
            problem = "holds no " + config if given_dir.is_dir() else "no such directory"
            raise SpecDecError(f"--{name} {given}: {problem}; give a heads directory written by "
                               f"experiments.train_{'medusa' if medusa else 'eagle'}, or leave --{name} out")
        if not Path(directory).is_dir() or not (given or (Path(directory) / config).is_file()):
            notes.append(f"{name}: no heads at {directory}, skipped")
        elif medusa:
            found[name] = lambda d=directory, **kw: MedusaDrafter(d)
        else:
            check_head_version(name, directory, given)
            for dtype in args.head_dtypes or [args.draft_dtype]:  # one head per dtype, labelled when several
                for forward in args.head_forwards:  # and per forward path (--head-forwards), labelled when several
                    label = (name + (f"_{DTYPE_LABELS[dtype]}" if len(args.head_dtypes or []) > 1 else "")
                             + (f"_{forward}" if len(args.head_forwards) > 1 else ""))
                    found[label] = lambda d=directory, v=name, t=dtype, f=forward == "fast", **kw: EagleDrafter(
                        d, version=v, dtype=t, fast_forward=f, **kw)
    return found


def check_head_version(version: str, directory: str, given: str | None) -> None:
    """A head of the other EAGLE version under ``--<version>`` is an error naming the flag to use (before loading)."""
    from drafters.eagle_heads import read_config_of

    trained = read_config_of(directory).get("version")
    if trained != version:
        where = f"--{version} {given}" if given else f"{directory} (--{version}'s default)"
        raise SpecDecError(f"{where}: the head there is an {trained} head; pass it as --{trained} <dir>, or give "
                           f"--{version} an {version} head's directory")


def build_methods(target, draft, args, temperature: float, heads: dict) -> list[Method]:
    """The methods run at ``temperature`` (HF's only when greedy), HF plain first when greedy."""
    m, greedy = args.max_new_tokens, temperature == 0
    dyn = {"budget": args.budget, "num_speculative_tokens": args.dynamic_depth, "top_k_children": args.top_k_children}
    lookups = args.hf_lookup_tokens or [args.ngram_tokens]
    hf_methods = [Method("hf_plain", hf(target, m), False)]
    hf_methods += [Method("hf_prompt_lookup" + (f"_{n}" if len(lookups) > 1 else ""),
                          hf(target, m, prompt_lookup_num_tokens=n, max_matching_ngram_size=2), False, n)
                   for n in lookups]
    hf_methods += [Method(f"hf_assisted_k{k}", hf_assisted(target, draft, m, k), False, k) for k in args.hf_ks]
    methods = hf_methods if greedy else []
    ours = [("ours_ar", NoDrafter(), None), ("ours_ngram", prompt_lookup_like_hf(args.ngram_tokens, 2), args.ngram_tokens)]
    ours += [(f"ours_draft_k{k}", DraftModelDrafter(draft, k), k) for k in args.ks]
    ours += [(f"ours_draft_{preset}", DraftModelDrafter(draft, tree=preset), None) for preset in args.trees]
    if greedy:  # deterministic children: accepted with probability p(x) only at T > 0 (see BENCHMARKS)
        ours.append((f"ours_draft_dyn{args.budget}", DraftModelDrafter(draft, **dyn), args.dynamic_depth))
    if "medusa" in heads:
        ours.append(("ours_medusa", heads["medusa"](), None))
    for label, factory in heads.items():
        if label.startswith("eagle"):
            ours += [(f"ours_{label}_k{k}", factory(num_speculative_tokens=k), k) for k in args.ks]
            ours += [(f"ours_{label}_{preset}", factory(tree=preset), None) for preset in args.trees]
            if greedy:
                ours.append((f"ours_{label}_dyn{args.budget}", factory(**dyn), args.dynamic_depth))
    for cls in args.drafter:
        ours += own_drafters(cls, args.ks, {name for name, _, _ in ours})
    ours += hybrids(ours, args)
    methods += [Method(name, decode_run(target, d, m, temperature), True, k) for name, d, k in ours]
    if args.verify_widths:  # the chains again, each verify block padded to the next cheap width
        methods += [Method(f"{name}_padded", decode_run(target, d, m, temperature, verify_widths=args.verify_widths), True, k)
                    for name, d, k in ours if is_chain(name)]
    dynamic = [f"ours_{label}_dyn{args.budget}" for label in ("draft", *heads) if label != "medusa"]
    greedy_only = (*(h.name for h in hf_methods), *dynamic)  # named in --methods, absent at T > 0
    return pick_methods(methods, args.methods, ("hf_plain", "ours_ar"), greedy_only)


def hybrids(ours: list[tuple], args) -> list[tuple]:
    """``--hybrid N``: each chain (and ``--trees`` preset) of ``ours`` again behind prompt lookup
    (:func:`drafters.hybrid.behind_lookup`: an n-gram of ``--ngram-tokens`` drafts whenever a suffix of at least N
    tokens recurred, the chain otherwise), named ``ours_ngram+<chain>``."""
    if not args.hybrid:
        return []
    from drafters.hybrid import behind_lookup

    return [(f"ours_ngram+{name.removeprefix('ours_')}", behind_lookup(drafter, args.ngram_tokens, args.hybrid), k)
            for name, drafter, k in ours if is_chain(name) or name.endswith(tuple(f"_{t}" for t in args.trees))]


def listed_widths(option: str) -> tuple[int, ...]:
    """``--verify-widths``' comma list as widths; SpecDecError unless each is an integer >= 1."""
    try:
        widths = tuple(int(w) for w in option.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise SpecDecError(f"--verify-widths {option!r}: give auto or comma-separated widths >= 1, e.g. 4,5,8")
    return widths


def verify_widths(option: str | None, target, prompts: list, max_new: int, notes: list[str]) -> tuple[int, ...]:
    """``--verify-widths``: None, a comma list, or ``auto``: :func:`experiments.costs.cheap_widths` of the
    target's cost curve at this run's context (measured once per machine and cached)."""
    if not option:
        return ()
    if option != "auto":
        return listed_widths(option)
    from experiments.cost_measure import cost_curve, implausible, run_context
    from experiments.costs import cheap_widths

    curve, _ = cost_curve(target, run_context([p.shape[1] for p in prompts], max_new))
    widths = cheap_widths(curve)
    notes.append("verify widths (cheap widths of the target's measured cost curve, ms: "
                 + ", ".join(f"{w}: {s * 1e3:.1f}" for w, s in sorted(curve.items())) + f"): {list(widths)}")
    if why := implausible(curve):
        notes.append(f"the target's cost curve is implausible even measured twice ({why}): a busy machine; the "
                     "verify widths read off it may not be the cheap ones")
    return widths


def summarize(methods: list[Method], stats: dict, greedy: bool) -> tuple[list[dict], str]:
    """Rows (median (min-max) over prompts) and the Markdown table of one temperature."""
    tps = {m.name: tokens_per_s(m) for m in methods}
    pooled = {m.name: pooled_tokens_per_s(m) for m in methods}
    hf_names = [m.name for m in methods if not m.ours]
    best_pooled = max(hf_names, key=lambda n: pooled[n]) if greedy else None  # the best HF method by this measure
    best_hf = max(hf_names, key=lambda n: statistics.median(tps[n].values())) if greedy else None

    def spread(mine, base):
        values = [mine[i] / base[i] for i in mine]
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    rows = []
    for m in methods:
        mine = tps[m.name]
        alpha1 = DecodeStats.merge(stats[m.name]).acceptance_rate_by_depth[:1] if stats.get(m.name) else []
        rows.append({"method": m.name, "tokens_per_s": statistics.median(mine.values()), "tokens_per_s_by_prompt": mine,
                     "vs_ours_ar": spread(mine, tps["ours_ar"]),
                     "vs_hf_plain": spread(mine, tps["hf_plain"]) if greedy else None,
                     "vs_best_hf": spread(mine, tps[best_hf]) if greedy else None,
                     "vs_best_hf_pooled": pooled[m.name] / pooled[best_pooled] if greedy else None,
                     "tau": statistics.mean(m.tau.values()) if m.tau else None,
                     "tau_pooled": pooled_tau(m),
                     "alpha_depth1": alpha1[0] if alpha1 else None,
                     "matches_hf_plain": m.matches if greedy else None})
    head = (f"| method | tokens/s (median) | speedup vs ours AR | speedup vs HF plain | speedup vs best HF "
            f"({best_hf or 'n/a'}) | all prompts pooled vs best HF ({best_pooled or 'n/a'}) | tau: mean over prompts / pooled | depth-1 acceptance (pooled) "
            f"| output = HF plain greedy |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        same = {None: "", True: "yes", False: "NO"}[r["matches_hf_plain"]]
        cells = [r["method"], f"{r['tokens_per_s']:.1f}", r["vs_ours_ar"], r["vs_hf_plain"] or "", r["vs_best_hf"] or "",
                 _num(r["vs_best_hf_pooled"]), tau_cell(r), _num(r["alpha_depth1"]), same]
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _record_stats(methods: list[Method]) -> dict:
    """Wrap each of our methods' run to keep the DecodeStats of its timed calls (depth-1 acceptance, pooled over
    them): the first call, :func:`run_all`'s warm-up on prompt 0, is not kept (prompt 0 would count once more)."""
    kept: dict[str, list] = {}
    warmed: set[str] = set()
    for meth in methods:
        if meth.ours:
            inner = meth.run

            def run(ids, inner=inner, name=meth.name):
                out, stats = inner(ids)
                if name in warmed:
                    kept.setdefault(name, []).append(stats)
                warmed.add(name)
                return out, stats
            meth.run = run
    return kept


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m experiments.bench_drafters",
                           description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="default", help="embedded zoo pair size (default, micro)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--dataset", help="prompt file (default: held-out stdlib prompts)")
    p.add_argument("--prompts", type=cli.int_at_least(1), default=10)
    p.add_argument("--max-new-tokens", type=cli.int_at_least(1), default=96)
    p.add_argument("--max-prompt-tokens", type=cli.int_at_least(1), default=384)
    p.add_argument("--temperatures", type=cli.temperatures, default=[0.0, 0.8])
    p.add_argument("--ks", type=cli.ints_at_least(1), default=[4],
                   help="chain lengths of our draft model and EAGLE chains")
    p.add_argument("--hf-ks", type=cli.ints_at_least(1), default=[3, 4, 5],
                   help="HF assisted generation's constant k (the best one is the reference)")
    p.add_argument("--trees", type=lambda s: list(dict.fromkeys(s.split(","))), default=[],
                   help="the draft model and EAGLE heads also drafting these static tree presets (conf/tree/<name>.yaml, "
                        "e.g. chain4_alts), one method each: ours_draft_<preset>, ours_<head>_<preset>")
    p.add_argument("--budget", type=cli.int_at_least(1), default=10, help="dynamic trees: nodes")
    p.add_argument("--dynamic-depth", type=cli.int_at_least(1), default=6, help="dynamic trees: depth limit")
    p.add_argument("--top-k-children", type=cli.int_at_least(1), default=4, help="dynamic trees: children per expanded node")
    p.add_argument("--ngram-tokens", type=cli.int_at_least(1), default=4)
    p.add_argument("--hf-lookup-tokens", type=cli.ints_at_least(1), default=None,
                   help="HF prompt lookup's prompt_lookup_num_tokens, one method each (hf_prompt_lookup_<n>; the best "
                        "one is the reference; default: --ngram-tokens)")
    p.add_argument("--medusa", help="Medusa heads directory (default: train_medusa's for --size)")
    p.add_argument("--eagle2", help="eagle2 head directory (default: train_eagle's for --size)")
    p.add_argument("--eagle3", help="eagle3 head directory (default: train_eagle version=eagle3's for --size)")
    p.add_argument("--draft-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the draft model's dtype (ours and HF assisted) and the EAGLE heads'")
    p.add_argument("--head-dtypes", type=lambda s: list(dict.fromkeys(s.split(","))), default=None,
                   help="EAGLE heads in each of these dtypes side by side, e.g. float32,bfloat16 (default: --draft-dtype)")
    p.add_argument("--head-forwards", type=lambda s: list(dict.fromkeys(s.split(","))), default=["fast"],
                   help="EAGLE heads through each of these forwards side by side: fast (drafters/fast_decoder.py), "
                        "hf (the one-layer model's own), e.g. fast,hf (default: fast)")
    p.add_argument("--verify-widths", default=None,
                   help="add each chain padded to these verify widths (`_padded`): a comma list, or auto (the "
                        "widths no wider one undercuts on the target's measured cost curve)")
    p.add_argument("--hybrid", type=cli.int_at_least(0), default=0, metavar="N",
                   help="add each chain behind prompt lookup (drafters.HybridDrafter; n-gram drafts when a suffix of "
                        ">= N tokens recurred), named ours_ngram+<chain>; 0: none")
    p.add_argument("--drafter", action="append", default=[], type=drafter_class, metavar="MODULE.CLASS",
                   help="a drafter class of your own (e.g. my_drafters.echo.EchoDrafter; repeatable): ours_<name>_k<k> "
                        "at each --ks if it takes num_speculative_tokens, else ours_<name>; its other arguments keep "
                        "their defaults")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of method names (hf_plain and ours_ar always run: the ratios need them)")
    p.add_argument("--reps", type=cli.int_at_least(1), default=2)
    p.add_argument("--threads", type=cli.int_at_least(1), default=2)
    p.add_argument("--json", type=cli.output_file, help="write raw results here")
    p.add_argument("--markdown", type=cli.output_file, help="write the Markdown tables here")
    args = p.parse_args(argv)
    if bad := [d for d in args.head_dtypes or [] if d not in DTYPE_LABELS]:
        p.error(f"--head-dtypes: {bad[0]!r} is unknown; choose from {', '.join(DTYPE_LABELS)}")
    if bad := [f for f in args.head_forwards if f not in ("fast", "hf")]:
        p.error(f"--head-forwards: {bad[0]!r} is unknown; choose from fast, hf")
    if args.verify_widths not in (None, "auto"):  # a bad list fails before the pair loads
        try:
            listed_widths(args.verify_widths)
        except SpecDecError as err:
            p.error(str(err))
    from specdec.tree import load_preset

    for preset in args.trees:
        try:
            load_preset(preset)
        except SpecDecError as err:
            p.error(f"--trees: {err}")
    defaults = {"synthetic": None, "target": None, "draft": None, "device": "cpu", "dtype": "float32"}
    for key, value in defaults.items():  # what experiments.bench's loaders read
        setattr(args, key, value)
    return args


@cli.guard()
def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    notes: list[str] = []
    tables, results = [], {}
    with torch.nn.attention.sdpa_kernel(SDPA_KERNELS):
        target, draft, tok = load_pair(args)
        prompts = load_prompt_ids(tok, target, args)
        heads = head_drafters(args, notes)
        args.verify_widths = verify_widths(args.verify_widths, target, prompts, args.max_new_tokens, notes)
        asked = done = len(prompts)
        for temperature in args.temperatures:
            methods = build_methods(target, draft, args, temperature, heads)
            stats = _record_stats(methods)
            try:
                done = run_all(methods, prompts, args.reps)
            except KeyboardInterrupt:  # in this temperature's first prompt: the earlier temperatures' tables stand
                if not tables:
                    raise
                notes.append(f"interrupted (Ctrl-C) in the first prompt at temperature {temperature}: no table for "
                             "it or the temperatures after it")
                print(notes[-1], file=sys.stderr, flush=True)
                done = 0
                break
            stats = {name: kept[:done * args.reps] for name, kept in stats.items()}  # the cut prompt's calls out
            rows, table = summarize(methods, stats, temperature == 0)
            title = "greedy" if temperature == 0 else f"T = {temperature}, rejection"
            tables.append(f"### {title}" + (f" ({interrupted_note(done, asked).strip()})" if done < asked else "")
                          + f"\n\n{table}")
            results[str(temperature)] = rows
            if done < asked:
                break  # Ctrl-C: no further temperature
    header = (f"Command: `python -m experiments.bench_drafters {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
              f"Machine: {machine_line()}. Zoo pair {args.size}, target float32, draft {args.draft_dtype}, "
              f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, batch 1, {args.reps} reps; dynamic trees: "
              f"{args.budget} nodes, depth <= {args.dynamic_depth}, {args.top_k_children} children per node."
              + ("".join(f"\nNote: {n}." for n in notes)))
    publish(header + "\n\n" + "\n\n".join(tables),
            {"results": results, "prompts_done": done, "prompts_asked": asked, "notes": notes}, args)
    return final_status(0 if all(r["matches_hf_plain"] is not False for rows in results.values() for r in rows)
                        else 1, done, asked)


if __name__ == "__main__":
    sys.exit(main())
