"""What the side-by-side benchmarks print and write besides their tables: the command and machine lines,
the Markdown and JSON outputs, the note on non-fp32 equality, where our loops' steps go, and the exit status."""
from __future__ import annotations

import json
import platform
import sys

import torch


def command_line(argv) -> str:
    """The header's first line: the ``experiments.bench`` command that made the table."""
    return f"Command: `python -m experiments.bench {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"


def publish(text: str, data: dict, args) -> None:
    """Print ``text``; write it to ``--markdown`` and ``data`` (with the machine and arguments) to ``--json``."""
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**data, "machine": machine_line(), "args": vars(args)}, f, indent=1, default=str)


def machine_line() -> str:
    """Where the benchmark ran: the GPU (with versions) or the CPU and its threads."""
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}"
    if torch.cuda.is_available():
        import triton

        return f"{torch.cuda.get_device_name()}, {versions}, triton {triton.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {versions}"


def match_note(dtype: str) -> str:
    """Below the table where equality with HF is not a check: outside fp32 it depends on rounding."""
    if dtype == "float32":
        return ""
    return (f"\n\nIn {dtype}, 'output = HF plain greedy' is shown but not checked: a different kernel shape (width, "
            "cache layout) rounds differently, and near-ties then flip an argmax, in HF's assisted generation as in "
            "ours. Losslessness is checked in float32.")


def exit_status(rows: list[dict], dtype: str, key: str = "matches_hf_plain") -> int:
    """1 where a float32 run's greedy output differs from HF plain generate's (``row[key]``), else 0."""
    return 1 if dtype == "float32" and not all(r[key] for r in rows) else 0



def loop_table(methods, costs_for) -> tuple[dict, str]:
    """Where our loops' steps go: per autoregressive loop and draft-model chain of ours, milliseconds per verify step drafting, verifying, accepting
    and elsewhere in the loop, measured inside the timed calls, beside what the isolated forward costs
    (``costs_for(method)``: the costs its prediction uses, or None) give for the same phases (``k T_d(1)``,
    ``T_t(k + 1)``). A phase slower in the loop than alone is what the efficiency column misses."""
    from experiments.bench_methods import loop_ms_per_step
    from experiments.costs import cost_at

    head = "| method | ms per step | drafting (isolated k T_d(1)) | verify (isolated T_t(k + 1)) | accept | rest of the loop |"
    rows, lines = {}, [head, "|---|---|---|---|---|---|"]
    for meth in methods:
        ms, costs = loop_ms_per_step(meth), costs_for(meth)
        if ms is None or costs is None or meth.dynamic or not meth.name.startswith(("ours_ar", "ours_chain")):
            continue  # trees and lookups: no isolated cost to set beside them
        k = meth.k or 0
        ms["draft_isolated"] = k * (costs["draft"] or 0.0) * 1e3
        ms["verify_isolated"] = cost_at(costs["target"], k + 1) * 1e3
        rows[meth.name] = ms
        lines.append(f"| {meth.name} | {ms['step']:.2f} | {ms['draft']:.2f} ({ms['draft_isolated']:.2f}) | "
                     f"{ms['verify']:.2f} ({ms['verify_isolated']:.2f}) | {ms['accept']:.2f} | {ms['rest']:.2f} |")
    return rows, "\n".join(lines)
