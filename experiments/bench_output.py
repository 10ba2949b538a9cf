"""What the side-by-side benchmarks print and write besides their tables: the command and machine lines,
the Markdown and JSON outputs, the note on non-fp32 equality and the exit status."""
from __future__ import annotations

import platform
import sys

import torch


def command_line(argv) -> str:
    """The header's first line: the ``experiments.bench`` command that made the table."""
    return f"Command: `python -m experiments.bench {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"


def publish(text: str, data: dict, args) -> None:
    """Print ``text``; write it to ``--markdown`` and ``data`` (with the machine and arguments) to ``--json`` (each
    atomically: an interrupted write leaves the earlier file)."""
    from specdec.files import atomic_write_json, atomic_write_text

    print(text)
    if args.markdown:
        atomic_write_text(args.markdown, text + "\n")
    if args.json:
        atomic_write_json(args.json, {**data, "machine": machine_line(), "args": vars(args)}, indent=1, default=str)


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
