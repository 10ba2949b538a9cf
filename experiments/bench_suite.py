"""The headline benchmark: a real target on the prompt suite, per category, in Spec-Bench's table layout.

    python -m experiments.bench --model smollm2 --dataset suite --per-category 4 --max-new-tokens 64 --reps 1
    python -m experiments.bench --model smollm2 --dataset suite --temperature 0.7

Greedy (default): Hugging Face plain ``generate``, assisted generation with the distilled draft
(k = ``--k``), prompt lookup; ours: autoregressive, n-gram, layer-skip (``--layer-skip`` layers),
the distilled draft chain, Medusa and EAGLE heads (each when built), and with ``--hybrid N`` each of
those again behind prompt lookup. Every output is checked against HF plain greedy. ``--temperature 0.7``:
ours only, with ``rejection`` (lossless); HF sampling draws other random numbers, so no token check is
possible: tau and speedup are against our own autoregressive loop at the same temperature. Timing follows
:func:`experiments.bench.run_all` (warm-up, ``--reps`` rounds per prompt in rotating order, threads pinned).

``--dtype bfloat16`` runs the target (and HF's methods, the same model) in bf16. Greedy outputs then part
from HF plain greedy where two logits nearly tie, HF's own prompt lookup's too; each row also says whether
its outputs are greedy up to rounding (:mod:`experiments.greedy_check`), which sets the exit status.

Also reports each drafter's cost per draft forward (one token; Medusa: one call of all its heads) relative to one
target forward (width 1, at the run's context), the figure that decides what a drafter can gain: on a 49152-token
vocabulary the LM head is a large share of any draft. Importable without hydra or wandb.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from experiments import cli
from experiments.bench import verify_curve
from experiments.bench_methods import (
    Method,
    decode_run,
    final_status,
    interrupted_note,
    pick_methods,
    pooled_tau,
    run_all,
)
from experiments.bench_output import machine_line, publish
from experiments.bench_suite_inputs import eagle_dirs, load_inputs
from experiments.greedy_check import TOLERANCE
from experiments.hf_generate import hf, hf_assisted
from specdec.errors import SpecDecError
from verifier.narrow_linear import narrow_models

MEDUSA_NODES = 16  # the Medusa tree's nodes unless --medusa-nodes says otherwise
CATEGORY_ORDER = ("coding", "summarization", "rag", "qa", "math_reasoning", "multi_turn")


def _pretrained_name(name: str) -> str:
    """An argparse ``type``: a model of :mod:`experiments.pretrained` (checked as it is parsed, so an unknown one is
    named before any other flag is found wrong)."""
    from experiments.pretrained import PretrainedError, get_spec

    try:
        get_spec(name)
    except PretrainedError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return name


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m experiments.bench --model smollm2", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", type=_pretrained_name, help="a model of experiments.pretrained")
    p.add_argument("--dataset", default="suite", help="suite, or a Spec-Bench question.jsonl")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--per-category", type=cli.int_at_least(1), default=4, help="prompts per category (the first ones)")
    p.add_argument("--max-new-tokens", type=cli.int_at_least(1), default=64)
    p.add_argument("--temperature", type=cli.temperature, default=0.0, help="0: greedy, checked against HF; > 0: rejection")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the target (HF's methods run the same model); bfloat16 on a CPU with native "
                        "bf16 makes wide verifies nearly as cheap as one token")
    p.add_argument("--draft-dtype", default=None, choices=["float32", "bfloat16"],
                   help="precision of the draft model and EAGLE heads (default: the target's)")
    p.add_argument("--tie-tolerance", type=float, default=TOLERANCE,
                   help="--dtype bfloat16, greedy: the largest deficit (max logit - the emitted token's logit, the "
                        "weights computed in float32) an output may show and still count as greedy up to rounding")
    p.add_argument("--k", type=cli.int_at_least(1), default=4, help="chain length of the draft-model and layer-skip drafters")
    p.add_argument("--layer-skip", type=cli.int_at_least(1), default=6, help="layers of the layer-skip self-draft")
    p.add_argument("--ngram-tokens", type=cli.int_at_least(1), default=4)
    p.add_argument("--max-ngram", type=cli.int_at_least(1), default=2)
    p.add_argument("--medusa", default=None, help="Medusa heads directory (default: the cached heads for the model)")
    p.add_argument("--medusa-nodes", type=cli.ints_at_least(1), default=None,
                   help=f"nodes of the Medusa tree (from the heads' eval.json); comma-separated: a row for each "
                        f"(default {MEDUSA_NODES})")
    p.add_argument("--medusa-dynamic", type=cli.ints_at_least(1), default=[],
                   help="also Medusa trees of these node budgets chosen at every step by the heads' probabilities "
                        "(ours_medusa_dyn<N>; MedusaDrafter(dynamic=True))")
    p.add_argument("--eagle", default=None, help="EAGLE head directories, comma-separated (default: the cached heads "
                   "for the model); each gives a chain of --k and, with --eagle-budget, a dynamic tree")
    p.add_argument("--draft-vocab-from", default=None, help="heads directory whose draft vocabulary a second "
                   "draft-model row uses (ours_draft_k<k>_vocab<N>)")
    p.add_argument("--confidence", type=cli.thresholds, default=[],
                   help="also each draft-model and EAGLE chain with these confidence thresholds (a dynamic draft "
                        "length: <name>_conf<c>; HF assisted generation too, hf_assisted_k<k>_conf<c>)")
    p.add_argument("--eagle-budget", type=cli.int_at_least(0), default=0, help="nodes of an EAGLE-2 dynamic tree row (0: none)")
    p.add_argument("--hybrid", type=cli.int_at_least(0), default=0, metavar="N",
                   help="also each of our drafters that runs a model behind prompt lookup (drafters.HybridDrafter: an "
                        "n-gram of --ngram-tokens drafts where a suffix of >= N tokens recurred), ours_ngram+<name>")
    p.add_argument("--merge", action="store_true",
                   help="--hybrid: also each with merged trees (ours_ngram+<name>_merged: where the lookup proposes, "
                        "its chain grafted onto the drafter's tree, one verify; deterministic drafters, or greedy)")
    p.add_argument("--datastore", default=None, metavar="ROWS",
                   help="the target's answers to training chats (a chat-rows file or directory, experiments.chat_data): "
                        "also prompt lookup that falls back on their n-gram statistics (ours_ngram_ds, REST-style) and, "
                        "with --hybrid, each drafter behind it (ours_ngram_ds+<name>)")
    p.add_argument("--verify-widths", type=lambda s: tuple(cli.ints_at_least(1)(s)), default=(),
                   help="also time one verify forward of the target at these widths (e.g. 1,5,9,17,33) at the run's "
                        "context, in its dtype: what a wider tree costs on this machine")
    p.add_argument("--methods", default=None, help="comma-separated subset of method names")
    cli.add_narrow_linears(p)
    p.add_argument("--reps", type=cli.int_at_least(1), default=1)
    p.add_argument("--threads", type=cli.int_at_least(1), default=2)
    p.add_argument("--json", type=cli.output_file, help="write raw results here")
    p.add_argument("--markdown", type=cli.output_file, help="write the Markdown tables here")
    args = p.parse_args(argv)
    if args.merge and not args.hybrid:  # it would add no row
        p.error("--merge merges the --hybrid rows' trees: add --hybrid N, or drop --merge")
    if args.datastore:  # a missing rows file fails before the target loads
        from drafters.datastore import rows_file

        try:
            rows_file(args.datastore, "--datastore")
        except SpecDecError as err:
            p.error(str(err))
    return args


# --------------------------------------------------------------------------- methods


def drafters_for(target, draft, medusa: str | None, args) -> dict:
    """Our drafters by method name (those whose models exist)."""
    from drafters import DraftModelDrafter, LayerSkipDrafter, NGramDrafter, NoDrafter
    from drafters.ngram import prompt_lookup_like_hf

    found = {"ours_ar": NoDrafter(),
             "ours_ngram": prompt_lookup_like_hf(args.ngram_tokens, args.max_ngram),
             **({"ours_ngram_ds": NGramDrafter(args.ngram_tokens, max_ngram=max(3, args.max_ngram), min_ngram=2,
                                               datastore=datastore_of(args))} if args.datastore else {}),
             f"ours_layer_skip{args.layer_skip}_k{args.k}": LayerSkipDrafter(args.layer_skip, args.k, target=target)}
    if draft is not None:
        ids = None
        if args.draft_vocab_from:
            from drafters.draft_vocab import vocab_of

            ids = vocab_of(args.draft_vocab_from)
        for c in [0.0, *args.confidence]:
            conf = f"_conf{c}" if c else ""
            found[f"ours_draft_k{args.k}{conf}"] = DraftModelDrafter(draft, args.k, confidence_threshold=c)
            if ids is not None:
                found[f"ours_draft_k{args.k}_vocab{len(ids)}{conf}"] = DraftModelDrafter(
                    draft, args.k, draft_vocab=ids, confidence_threshold=c)
    if medusa is not None:
        from drafters import MedusaDrafter

        for nodes in args.medusa_nodes or [MEDUSA_NODES]:
            found[f"ours_medusa{nodes}"] = MedusaDrafter(heads=medusa, tree_nodes=nodes)
        for nodes in args.medusa_dynamic:
            found[f"ours_medusa_dyn{nodes}"] = MedusaDrafter(heads=medusa, tree_nodes=nodes, dynamic=True)
    for path in eagle_dirs(args, target):
        from drafters import EagleDrafter
        from drafters.eagle_heads import read_config_of

        version = read_config_of(path)["version"]
        for c in [0.0, *args.confidence]:
            found[f"ours_{version}_k{args.k}{f'_conf{c}' if c else ''}"] = EagleDrafter(
                path, num_speculative_tokens=args.k, confidence_threshold=c, dtype=args.draft_dtype)
        if args.eagle_budget:
            found[f"ours_{version}_dyn{args.eagle_budget}"] = EagleDrafter(
                path, num_speculative_tokens=args.k + 2, budget=args.eagle_budget, dtype=args.draft_dtype)
    return found


def behind_lookup_all(ours: dict, args) -> dict:
    """``--hybrid N``: each drafter of ``ours`` that runs a model again behind prompt lookup, ``ours_ngram+<name>``
    (:func:`drafters.hybrid.behind_lookup`)."""
    if not args.hybrid:
        return {}
    from drafters.hybrid import behind_lookup, samples_drafts
    from specdec import SamplingParams
    from specdec.drafting import Drafter

    sampling = SamplingParams(temperature=args.temperature)
    stores = {"ngram": None} | ({"ngram_ds": datastore_of(args)} if args.datastore else {})
    models = {name: d for name, d in ours.items() if type(d).step_shape is not Drafter.step_shape}
    sampled = [name for name, d in models.items() if samples_drafts(d, sampling)]
    if args.merge and sampled:  # a sampled chain cannot be merged with the lookup's (drafters.hybrid.graft_chain)
        print(f"note: --merge at temperature {args.temperature}: no merged row for {', '.join(sampled)} (their "
              "drafts are sampled; merged trees need deterministic ones)", file=sys.stderr)
    return {f"ours_{lookup}+{name.removeprefix('ours_')}{'_merged' if merge else ''}":
            behind_lookup(d, args.ngram_tokens, args.hybrid, merge, store)
            for lookup, store in stores.items() for name, d in models.items()
            for merge in ((False, True) if args.merge and name not in sampled else (False,))}


def datastore_of(args):
    """``--datastore``'s :class:`~drafters.datastore.Datastore` (built once)."""
    from drafters.datastore import load_datastore

    return load_datastore(args.datastore, key="--datastore")


def build_methods(target, draft, medusa, args) -> list[Method]:
    """HF plain / prompt lookup / assisted (greedy only), then ours; ``--methods`` picks a subset."""
    m = args.max_new_tokens
    ours = drafters_for(target, draft, medusa, args)
    ours |= behind_lookup_all(ours, args)
    if args.temperature > 0:
        methods = [Method(name, decode_run(target, d, m, args.temperature), True) for name, d in ours.items()]
    else:
        methods = [Method("hf_plain", hf(target, m), False),
                   Method("hf_prompt_lookup", hf(target, m, prompt_lookup_num_tokens=args.ngram_tokens,
                                                 max_matching_ngram_size=args.max_ngram), False)]
        if draft is not None:
            for c in [0.0, *args.confidence]:
                methods.append(Method(f"hf_assisted_k{args.k}{f'_conf{c}' if c else ''}",
                                      hf_assisted(target, draft, m, args.k, c), False, args.k))
        methods += [Method(name, decode_run(target, d, m), True) for name, d in ours.items()]
    return pick_methods(methods, args.methods, (methods[0].name,))


# --------------------------------------------------------------------------- costs and tables


def picked_drafters(target, draft, medusa, args, methods: list[Method]) -> dict:
    """:func:`drafters_for`'s drafters whose methods are among ``methods``, or behind prompt lookup in one of them
    (``ours_ngram+<name>``, :func:`behind_lookup_all`); ``--methods`` picks: the others' forwards are not timed."""
    picked = {m.name for m in methods}
    behind = {name.removesuffix("_merged").split("+", 1)[1] for name in picked if "+" in name}
    return {name: d for name, d in drafters_for(target, draft, medusa, args).items()
            if name in picked or name.removeprefix("ours_") in behind}


def drafter_costs(target, methods: dict, context: int) -> dict[str, float]:
    """Per drafter: seconds of one draft forward (one token; Medusa: one call of all heads) / one target forward.

    Width 1 only, the target's and a draft model's forwards timed together (round robin, cached as every cost
    curve): the target's whole width curve, which this ratio does not read, took most of a run's time where a
    busy machine made it look implausible (measured twice, never cached, again for every drafter)."""
    from experiments.cost_measure import cost_curves, time_probe

    out = {}
    for name, drafter in methods.items():
        shape = drafter.step_shape(target)
        requests = [(target, context, (1,))]
        if shape.draft_probe is None and shape.draft_model is not None:  # a probe times the draft as it runs
            requests.append((shape.draft_model, context, (1,)))
        elif shape.draft_probe is None:
            continue
        curves = [curve for curve, _ in cost_curves(requests)]
        draft = time_probe(shape.draft_probe) if shape.draft_probe is not None else curves[1][1]
        out[name] = draft / curves[0][1]
    return out


def category_table(methods: list[Method], categories: list[str], baseline: str,
                   checked: bool = True, deficits: dict | None = None) -> tuple[list[dict], str]:
    """Spec-Bench's layout: per method, speedup and tau per category and overall (speedup: tokens/s over
    ``baseline``'s, summed over the category's prompts; tau: their tokens over their target forwards, pooled).
    ``checked``: outputs were compared with HF greedy.
    ``deficits`` (reduced precision): per method, ``(largest greedy deficit, passed)``, shown in place of
    the comparison with HF greedy (:mod:`experiments.greedy_check`)."""
    cats = [c for c in CATEGORY_ORDER if c in categories] + sorted(set(categories) - set(CATEGORY_ORDER))
    base = next(m for m in methods if m.name == baseline)

    def rate(meth: Method, idx: list[int]) -> float:
        return sum(meth.new_tokens[i] for i in idx) / sum(statistics.median(meth.times[i]) for i in idx)

    rows = []
    groups = {c: [i for i, cat in enumerate(categories) if cat == c] for c in cats} | {"overall": list(range(len(categories)))}
    for meth in methods:
        row = {"method": meth.name, "matches_hf_plain": meth.matches if checked else None}
        if deficits is not None:
            row["greedy_deficit"], row["greedy_up_to_rounding"] = deficits[meth.name]
        for c, idx in groups.items():
            row[c] = {"speedup": rate(meth, idx) / rate(base, idx), "tau": pooled_tau(meth, idx),  # as Spec-Bench's
                      "tokens_per_s": rate(meth, idx)}
        rows.append(row)
    check_head = " | output = HF plain greedy |" if checked else " |"
    if deficits is not None:
        check_head = " | output = HF plain greedy | greedy up to rounding (largest deficit) |"
    head = "| method | " + " | ".join(groups) + check_head
    lines = [head, "|" + "---|" * (len(groups) + check_head.count("|"))]
    for r in rows:
        cells = [f"{r[c]['speedup']:.2f}x" + (f" (tau {r[c]['tau']:.2f})" if r[c]["tau"] is not None else "")
                 for c in groups]
        check = (" | yes" if r["matches_hf_plain"] else " | NO") if checked else ""
        if deficits is not None:
            check += f" | {'yes' if r['greedy_up_to_rounding'] else 'NO'} ({r['greedy_deficit']:.3f})"
        lines.append(f"| {r['method']} | " + " | ".join(cells) + check + " |")
    return rows, "\n".join(lines)


def method_deficits(target, methods: list[Method], prompts: list[torch.Tensor], tolerance: float) -> dict:
    """Per method: ``(largest greedy deficit over its outputs, within tolerance)`` against ``target``'s
    weights computed in float32 (:mod:`experiments.greedy_check`)."""
    from experiments.greedy_check import deficits, float32_reference

    reference = float32_reference(target)
    out = {}
    for meth in methods:
        worst = max(deficits(reference, meth.outputs, prompts).values(), default=0.0)
        out[meth.name] = (worst, worst <= tolerance)
    return out


def main(argv=None) -> int:
    """Run the suite benchmark; exit status 1 if a greedy output differs from HF plain greedy (in bf16: if
    one is not greedy up to rounding)."""
    from verifier.verifier import SDPA_KERNELS

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.nn.attention.sdpa_kernel(SDPA_KERNELS):
        target, _tok, draft, medusa, prompts = load_inputs(args)
        narrow = narrow_models([target, draft], args.narrow_linears, "--narrow-linears")
        methods = build_methods(target, draft, medusa, args)
        asked = len(prompts)
        prompts = prompts[:run_all(methods, [p for _, p in prompts], args.reps)]
        ids = [p for _, p in prompts]
        context = int(statistics.median(p.shape[1] for p in ids)) + args.max_new_tokens // 2
        costs = drafter_costs(target, picked_drafters(target, draft, medusa, args, methods), context)
        curve = verify_curve(target, context, args.verify_widths, ["sdpa"], 10) if args.verify_widths else ({}, "")
        greedy = args.temperature == 0
        rounded = method_deficits(target, methods, ids, args.tie_tolerance) if greedy and args.dtype != "float32" else None
    baseline = "hf_plain" if greedy else "ours_ar"
    rows, table = category_table(methods, [c for c, _ in prompts], baseline, checked=greedy, deficits=rounded)
    cost_lines = "\n".join(f"- {name}: {ratio:.3f} of a target forward per draft forward" for name, ratio in costs.items())
    command = f"python -m experiments.bench {' '.join(sys.argv[1:] if argv is None else argv)}"
    text = (f"Command: `{command}`\n\n{interrupted_note(len(prompts), asked)}Machine: {machine_line()}. Target {args.model} in {args.dtype} (narrow linears "
            f"{narrow}), {len(prompts)} prompts "
            f"({args.per_category} per category), {args.max_new_tokens} new tokens, "
            f"{'greedy' if greedy else f'T = {args.temperature}, rejection'}, batch 1, {args.reps} reps; speedup "
            f"over {baseline}.\n\n{table}\n\nDraft cost per forward, relative to the target (context {context}):\n\n"
            f"{cost_lines}\n" + (f"\nOne verify forward of the target by width (context {context}):\n\n{curve[1]}\n"
                                  if args.verify_widths else ""))
    publish(text, {"rows": rows, "costs": costs, "verify_curve": curve[0], "prompts_done": len(prompts),
                   "prompts_asked": asked, "narrow_linears": narrow}, args)
    if rounded is not None:  # reduced precision: greedy up to rounding, not token for token (experiments.greedy_check)
        return final_status(0 if all(ok for _, ok in rounded.values()) else 1, len(prompts), asked)
    return final_status(0 if not greedy or all(r["matches_hf_plain"] for r in rows) else 1, len(prompts), asked)


if __name__ == "__main__":
    sys.exit(cli.guard()(main)())
