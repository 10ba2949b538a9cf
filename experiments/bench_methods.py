"""The benchmarks' methods: one way of decoding each (:class:`Method`), how they are timed side by side
(:func:`run_all`) and the per-method figures taken from their timings (tokens/s, tau). Shared by
:mod:`experiments.bench`, :mod:`experiments.bench_suite` and :mod:`experiments.bench_drafters`."""
from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from experiments.bench_batch import timed_call
from experiments.costs import cost_at
from specdec import SamplingParams, SpeculativeDecoder
from specdec.drafting import release
from specdec.errors import SpecDecError


@dataclass
class Method:
    """One way of decoding; ``run(ids) -> (output ids [1, T + new], stats or None)``."""

    name: str
    run: object
    ours: bool
    k: int | None = None
    peer: str | None = None  # the HF method with the same drafter and k
    dynamic: bool = False  # its draft length varies per step (k is the most): no cost-model prediction
    times: dict = field(default_factory=dict)  # prompt index -> list of seconds
    new_tokens: dict = field(default_factory=dict)
    tau: dict = field(default_factory=dict)
    acceptance: dict = field(default_factory=dict)  # prompt index -> accepted drafts / proposed drafts
    prefill_s: dict = field(default_factory=dict)  # prompt index -> seconds of prefill (ours)
    forwards: dict = field(default_factory=dict)  # prompt index -> verify forwards (ours)
    outputs: dict = field(default_factory=dict)  # prompt index -> output ids [1, T + new] (the last round's)
    matches: bool = True
    loop: dict = field(default_factory=dict)  # ours: seconds per phase summed over the timed calls, and their steps


def decode_run(target, drafter, max_new: int, temperature: float = 0.0, **options):
    """A :class:`Method`'s ``run`` through our decoder: greedy acceptance at ``temperature`` 0, rejection
    sampling above it, seed 0. ``options``: :class:`~specdec.SpeculativeDecoder`'s (``compile``,
    ``attn_backend``, ``verify_widths``). The drafter is released after every call
    (:func:`specdec.drafting.release`), so no other method runs with its hooks on the shared target."""
    decoder = SpeculativeDecoder(target=target, drafter=drafter, acceptance="greedy" if temperature == 0 else "rejection",
                                 sampling=SamplingParams(temperature=temperature), **options)

    def run(ids):
        try:
            out = decoder.generate(ids, max_new_tokens=max_new, seed=0)
        finally:
            release(drafter)
        return out.sequences, out.stats
    return run


def run_all(methods: list[Method], prompts: list[torch.Tensor], reps: int, between=None) -> int:
    """Warm up every method, then time ``reps`` rounds per prompt, rotating the order each round;
    ``between()`` runs after each prompt's rounds. Returns the prompts finished: all of them, or those before a
    Ctrl-C (the prompt it cut is dropped from every method: its tables cover the finished ones; a Ctrl-C during
    the first prompt goes on up, as there is nothing to show; one in ``between()`` keeps the prompt before it)."""
    for meth in methods:
        meth.run(prompts[0])
    for i, ids in enumerate(prompts):
        loops = [dict(meth.loop) for meth in methods]
        try:
            _time_prompt(methods, i, ids, reps)
        except KeyboardInterrupt:
            if i == 0:
                raise
            _drop_prompt(methods, i, loops)
            return _interrupted(i, len(prompts), f"during prompt {i + 1}/{len(prompts)}")
        try:
            if between is not None:
                between()
        except KeyboardInterrupt:  # prompt i's rounds finished: it stays (the cut sample is not kept)
            return _interrupted(i + 1, len(prompts), f"after prompt {i + 1}/{len(prompts)}")
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)
    return len(prompts)


def _interrupted(done: int, total: int, when: str) -> int:
    """Say where a Ctrl-C cut the run; returns ``done`` (the prompts the tables cover)."""
    print(f"interrupted (Ctrl-C) {when}: the tables cover the {done} finished prompts (Ctrl-C again stops at "
          "once)", file=sys.stderr, flush=True)
    return done


def _time_prompt(methods: list[Method], i: int, ids: torch.Tensor, reps: int) -> None:
    """``reps`` timed rounds of every method on prompt ``i``, each output checked against the first method's."""
    reference, _ = methods[0].run(ids)  # hf_plain
    for rep in range(reps):
        order = methods[rep % len(methods):] + methods[: rep % len(methods)]
        for meth in order:
            out, stats, seconds = timed_call(meth.run, ids.device, ids)
            meth.times.setdefault(i, []).append(seconds)
            meth.new_tokens[i] = out.shape[1] - ids.shape[1]
            meth.outputs[i] = out
            meth.matches &= out.tolist() == reference.tolist()
            if stats is not None:
                meth.tau[i] = stats.tau
                meth.acceptance[i] = stats.draft_acceptance_rate
                meth.prefill_s.setdefault(i, []).append(stats.time_prefill)
                meth.forwards[i] = stats.target_forwards
                add_loop(meth.loop, stats)


PER_PROMPT = ("times", "new_tokens", "tau", "acceptance", "prefill_s", "forwards", "outputs")


def _drop_prompt(methods: list[Method], i: int, loops: list[dict]) -> None:
    """Forget what prompt ``i``'s cut rounds left: its per-prompt entries and its share of each loop's sums. An
    output that differed from the reference in a finished round stays counted (``matches``): a wrong token is a
    finding whatever the timing covers."""
    for meth, loop in zip(methods, loops):
        for name in PER_PROMPT:
            getattr(meth, name).pop(i, None)
        meth.loop = loop


def interrupted_note(done: int, total: int, what: str = "prompts", cut: bool = False) -> str:
    """The tables' line for a run cut after ``done`` of ``total`` prompts (or batch sizes, ...; empty when none
    was cut); ``cut``: a Ctrl-C came after the last one (in bench's cost sample)."""
    if done < total:
        return f"Interrupted (Ctrl-C) after {done} of {total} {what}: the tables cover those. "
    return "Interrupted (Ctrl-C) after the last prompt's rounds: the tables cover every prompt. " if cut else ""


def final_status(status: int, done: int, total: int, cut: bool = False) -> int:
    """A benchmark's exit status: its own (1: an output differed) first, else 130 (Ctrl-C) for a run cut after
    ``done`` of ``total`` prompts (or after the last, ``cut``), else 0."""
    from experiments.cli import INTERRUPTED

    return status or (INTERRUPTED if done < total or cut else 0)


#: The decode loop's phases a step is split into (:func:`add_loop`), as :class:`~specdec.stats.DecodeStats` times them.
LOOP_PHASES = ("draft", "verify", "accept")


def add_loop(loop: dict, stats) -> None:
    """Add one call's decode loop to ``loop``: its steps (verify forwards), the seconds of each of ``LOOP_PHASES``
    and of the whole loop (``decode``: the call's time less its prefill). The fixed-shape step (``--compile``)
    times no phases: theirs stay 0."""
    if not hasattr(stats, "time_total"):  # stand-in stats without timings (the benches' tests)
        return
    loop["steps"] = loop.get("steps", 0) + stats.target_forwards
    loop["decode"] = loop.get("decode", 0.0) + stats.time_total - stats.time_prefill
    for phase in LOOP_PHASES:
        loop[phase] = loop.get(phase, 0.0) + getattr(stats, f"time_{phase}")


def isolated_round(k: int | None, costs: dict) -> tuple[float, float]:
    """Seconds of one verify step's forwards timed alone, ``(k T_d(1), T_t(k + 1))``: drafting and verifying a
    k-chain (``k`` None or 0: the autoregressive loop's one-token forward, no drafting)."""
    k = k or 0
    return k * (costs["draft"] or 0.0), cost_at(costs["target"], k + 1)


def loop_ms_per_step(meth: Method) -> dict[str, float] | None:
    """Ours: milliseconds per verify step of each phase, ``rest`` (the loop's time outside them) and ``step``
    (all of it), over every timed call; None without steps (HF's methods)."""
    steps = meth.loop.get("steps", 0)
    if not steps:
        return None
    ms = {phase: meth.loop[phase] * 1e3 / steps for phase in LOOP_PHASES}
    ms["step"] = meth.loop["decode"] * 1e3 / steps
    ms["rest"] = ms["step"] - sum(ms[phase] for phase in LOOP_PHASES)
    return ms


def loop_table(methods: list[Method], costs_for) -> tuple[dict, str]:
    """Where our steps go: per autoregressive loop and draft-model chain of ours, milliseconds per verify step
    drafting, verifying, accepting and elsewhere in the loop, measured inside the timed calls, beside what the
    isolated forward costs (``costs_for(method)``: those its prediction uses, or None) give for the same phases
    (``k T_d(1)``, ``T_t(k + 1)``, and their sum for the whole step). A phase slower in the loop than alone is what
    the efficiency column misses. Rows without phase times (the fixed-shape step) show the whole step only."""
    head = "| method | ms per step (isolated forwards) | drafting (k T_d(1)) | verify (T_t(k + 1)) | accept | rest of the loop |"
    rows, lines = {}, [head, "|---|---|---|---|---|---|"]
    for meth in methods:
        ms, costs = loop_ms_per_step(meth), costs_for(meth)
        if ms is None or costs is None or meth.dynamic or not meth.name.startswith(("ours_ar", "ours_chain")):
            continue  # trees and lookups: no isolated cost to set beside them
        ms["draft_isolated"], ms["verify_isolated"] = (seconds * 1e3 for seconds in isolated_round(meth.k, costs))
        if not any(ms[phase] for phase in LOOP_PHASES):
            ms.update(dict.fromkeys((*LOOP_PHASES, "rest")))  # not timed: unknown, not 0
        rows[meth.name] = ms
        lines.append(f"| {meth.name} | {ms['step']:.2f} ({ms['draft_isolated'] + ms['verify_isolated']:.2f}) | "
                     f"{_ms_cell(ms, 'draft', 'draft_isolated')} | {_ms_cell(ms, 'verify', 'verify_isolated')} | "
                     f"{_ms_cell(ms, 'accept')} | {_ms_cell(ms, 'rest')} |")
    return rows, "\n".join(lines)


def _ms_cell(ms: dict, phase: str, isolated: str | None = None) -> str:
    """``ms[phase]`` (``-`` where it was not timed), with ``ms[isolated]`` in brackets."""
    shown = f"{ms[phase]:.2f}" if ms[phase] is not None else "-"
    return f"{shown} ({ms[isolated]:.2f})" if isolated else shown


def pick_methods(methods: list[Method], option: str | None, always: tuple[str, ...] = (),
                 elsewhere: tuple[str, ...] = ()) -> list[Method]:
    """``--methods``: the methods named in the comma list ``option`` (None or empty: all of them), plus those named
    in ``always`` (the baselines a table's ratios are taken against), in run order. A name that is neither one of
    ``methods`` nor in ``elsewhere`` (methods the run has at another setting: HF's run greedy only) is a
    :class:`SpecDecError` listing the choices."""
    if not option:
        return methods
    names = [meth.name for meth in methods]
    keep = {name for name in option.split(",") if name}
    if unknown := sorted(keep - set(names) - set(elsewhere)):
        raise SpecDecError(f"--methods: {', '.join(unknown)} is not a method of this run (a drafter whose model or "
                           f"heads are missing adds none); choose from {', '.join(dict.fromkeys([*elsewhere, *names]))}")
    keep |= set(always)
    return [meth for meth in methods if meth.name in keep]


def tokens_per_s(meth: Method) -> dict[int, float]:
    return {i: meth.new_tokens[i] / statistics.median(t) for i, t in meth.times.items()}


def pooled_tokens_per_s(meth: Method) -> float:
    """All prompts' new tokens over the sum of their median times: the run's throughput, in which a prompt weighs
    by its time. The median of per-prompt tokens/s (or of per-prompt speedups) weighs every prompt alike, so a few
    prompts a method decodes very fast move the two apart."""
    return sum(meth.new_tokens[i] for i in meth.times) / sum(statistics.median(t) for t in meth.times.values())


def decode_seconds_per_token(meth: Method) -> float | None:
    """Ours: all prompts' median times less their median prefills, over their new tokens (the decode loop's time
    per token, which a short answer's prefill does not inflate); None for HF's methods (no prefill split)."""
    if not meth.prefill_s:
        return None
    decode = sum(statistics.median(meth.times[i]) - statistics.median(meth.prefill_s[i]) for i in meth.times)
    return decode / sum(meth.new_tokens[i] for i in meth.times)


def pooled_tau(meth: Method, prompts: Iterable[int] | None = None) -> float | None:
    """Tokens per target forward over all prompts (or ``prompts``) together (each prompt's new tokens over its
    forwards, summed): the run's tau. The mean of per-prompt taus weighs a prompt decoded in few forwards as
    much as one decoded in many. None for HF's methods (no forward counts) and where no forward was made (a
    prompt ended by the prefill's token)."""
    counted = [i for i in (meth.forwards if prompts is None else prompts) if i in meth.forwards]
    forwards = sum(meth.forwards[i] for i in counted)
    return sum(meth.new_tokens[i] for i in counted) / forwards if forwards else None


def tau_cell(row: dict) -> str:
    """A table cell ``mean over prompts / pooled`` (see :func:`pooled_tau`); empty for HF's methods."""
    if row["tau"] is None:
        return ""
    pooled = "-" if row["tau_pooled"] is None else f"{row['tau_pooled']:.2f}"  # no target forward at all
    return f"{row['tau']:.2f} / {pooled}"


def spread(values: list[float]) -> dict:
    """Per-prompt figures as ``{"median", "min", "max"}`` (numbers in ``--json``; :func:`spread_cell` prints them)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spread_cell(figures: dict | None) -> str:
    """A :func:`spread` as the table shows it, ``median (min-max)``; empty for None."""
    return f"{figures['median']:.2f} ({figures['min']:.2f}-{figures['max']:.2f})" if figures else ""


def median_costs(samples: list[dict]) -> dict:
    """Per width, the median over cost samples taken between prompts (see :func:`experiments.bench.main`)."""
    target = {w: statistics.median(c["target"][w] for c in samples) for w in samples[0]["target"]}
    drafts = {key: statistics.median(c[key] for c in samples) if samples[0].get(key) is not None else None
              for key in ("draft", "draft_transformers")}
    return {**samples[0], "target": target, **drafts}
