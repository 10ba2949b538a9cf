"""Derive a Medusa tree preset from trained heads' held-out accuracy and write it to ``conf/tree``.

    python -m experiments.medusa_tree <heads dir> --nodes 32
    python -m experiments.medusa_tree ~/.cache/specdec/medusa/zoo-default --nodes 16 --name medusa16 --measure

The rank accuracies (``rank_accuracy[d][r]``: how often head ``d``'s rank-``r`` token is the
target's greedy token at depth ``d + 1``) come from the heads' ``eval.json`` (``--source``: on
held-out prompts continued greedily by the target, the greedy decode regime, or on held-out
text), or are measured on held-out text with ``--measure`` (or when there is no report), which
loads the target the heads were trained for (``--target`` to point elsewhere). The tree keeps the ``--nodes`` paths with
the largest product of accuracies along the path, as Medusa builds its sparse trees
(:func:`drafters.medusa.medusa_tree`). Use it with ``tree=<name>`` (``drafter=medusa``).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from drafters.medusa import medusa_expected_tokens, medusa_tree, report_rank_accuracy
from drafters.medusa_heads import load_heads, read_eval, read_heads_config
from experiments import cli
from specdec.errors import SpecDecError
from specdec.tree import PRESET_DIR, chain_paths, load_preset

MARKER = "# Medusa tree derived by experiments.medusa_tree"
MEASURE_CONTEXT = 256  # --measure scores the heads on chunks of this many held-out tokens


def measure_rank_accuracy(heads_dir: Path, target_dir: str | None, tokenizer_dir: str | None, eval_tokens: int,
                          context: int) -> list[list[float]]:
    """Held-out per-head, per-rank accuracy of the heads in ``heads_dir`` on their target."""
    from drafters.medusa_heads import check_target
    from experiments.head_data import token_chunks
    from experiments.medusa_training import evaluate
    from specdec.models import load_causal_lm, load_tokenizer

    config = read_heads_config(heads_dir)
    target_dir = target_dir or config.get("training", {}).get("target")
    if not target_dir:
        raise SpecDecError(f"{heads_dir} does not record its target: pass --target <dir>")
    target = load_causal_lm(target_dir, role="target")
    heads = load_heads(heads_dir)
    check_target(heads, target)
    tokenizer = load_tokenizer(tokenizer_dir or config.get("training", {}).get("tokenizer") or target_dir)
    chunks = token_chunks(tokenizer, "heldout", eval_tokens * 8, context)[: max(1, eval_tokens // context)]
    return evaluate(heads, target, chunks)["rank_accuracy"]


SOURCES = {"generated": "held-out prompts continued greedily by the target", "corpus": "held-out text"}


def preset_yaml(paths: list[list[int]], rank_acc: list[list[float]], heads_dir: Path, tau: float,
                comparisons: dict[str, float], source: str = "corpus") -> str:
    """The YAML text of the preset, with a header saying how it was derived."""
    rows = "\n".join(f"#   head {d + 1}: " + ", ".join(f"{a:.3f}" for a in row[:6]) for d, row in enumerate(rank_acc))
    others = ", ".join(f"{name}: {value:.2f}" for name, value in comparisons.items())
    lines = [
        MARKER,
        f"# from the heads at {heads_dir}: the {len(paths)} paths with the largest product of held-out rank",
        "# accuracies (rank_accuracy[d][r]: head d's rank-r token is the target's greedy token), best first.",
        f"# Rank accuracies (ranks 0-5) on {SOURCES.get(source, source)}:",
        rows,
        f"# Expected tokens per step (tau) under that model: {tau:.2f} ({others}).",
        "# Use it with drafter=medusa tree=<this file's name>.",
        "paths: [",
    ]
    for start in range(0, len(paths), 8):
        lines.append("  " + ", ".join(str(list(p)) for p in paths[start : start + 8]) + ",")
    lines.append("]")
    return "\n".join(lines) + "\n"


def check_overwrite(out: Path, heads_dir: Path) -> None:
    """Refuse (without ``--force``) to overwrite a preset this tool did not write, or one it derived from other
    heads (``zoo-default``'s ``medusa32`` from ``zoo-micro``'s heads would change what ``tree=medusa32`` means for
    everyone): the same directory, or an embedded pair's of the same name (``zoo-<size>``: retrained, or in another
    home's cache), may replace it."""
    text = out.read_text(encoding="utf-8")
    if not text.startswith(MARKER):
        raise SpecDecError(f"{out} exists and was not written by this tool: pick another --name or pass --force")
    earlier = re.search(r"^# from the heads at (.+?): the \d+ paths", text, re.MULTILINE)
    if earlier is None:
        return
    before, now = Path(earlier.group(1)).expanduser().resolve(), Path(heads_dir).expanduser().resolve()
    if before != now and not (before.name == now.name and now.name.startswith("zoo-")):
        raise SpecDecError(f"{out} was derived from the heads at {earlier.group(1)}, not {heads_dir}: pick another "
                           "--name (e.g. --name medusa32_mine) or pass --force to replace it")


def derive(heads_dir: Path, nodes: int, name: str, out_dir: Path = PRESET_DIR, max_depth: int | None = None,
           measure: bool = False, target: str | None = None, tokenizer: str | None = None, eval_tokens: int = 32768,
           context: int = MEASURE_CONTEXT, force: bool = False, source: str = "auto") -> tuple[Path, float]:
    """Write ``<out_dir>/<name>.yaml``; returns its path and the expected tau. The preset names the heads by their
    absolute path (a relative one would mean other heads from another directory)."""
    heads_dir = Path(heads_dir).expanduser().resolve()
    if nodes < 1:
        raise SpecDecError(f"--nodes {nodes}: give at least one node")
    if not name or Path(name).name != name or name in (".", ".."):
        raise SpecDecError(f"--name {name!r}: give a preset name, not a path (--out-dir says where it goes)")
    report = None if measure else read_eval(heads_dir)
    acc = report_rank_accuracy(report, source)
    if source == "auto" and acc:
        source = "generated" if (report.get("generated") or {}).get("rank_accuracy") else "corpus"
    if not acc:
        acc, source = measure_rank_accuracy(heads_dir, target, tokenizer, eval_tokens, context), "corpus"
    paths = medusa_tree(acc, nodes, max_depth)
    tau = medusa_expected_tokens(paths, acc)
    comparisons = {f"chain{len(acc)}": medusa_expected_tokens(chain_paths(len(acc)), acc)}
    for other in ("binary", "sparse60"):
        try:
            comparisons[other] = medusa_expected_tokens(load_preset(other), acc)
        except SpecDecError:
            pass
    out = Path(out_dir) / f"{name}.yaml"
    if out.exists() and not force:
        check_overwrite(out, heads_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    draft = out.resolve().with_name(f".{out.name}.tmp")  # never replaces the preset there unless it reads back
    try:
        draft.write_text(preset_yaml(paths, acc, heads_dir, tau, comparisons, source), encoding="utf-8")
        load_preset(draft)  # check it reads back as a tree (a path of more than one part: read as a file)
        draft.replace(out)
    finally:
        draft.unlink(missing_ok=True)
    return out, tau


def parse_args(argv: list[str] | None = None):
    """The command line (argparse; an error exits with status 2)."""
    parser = cli.ArgumentParser(prog="python -m experiments.medusa_tree", description=__doc__.split("\n")[0])
    parser.add_argument("heads_dir", type=Path, help="a trained heads directory (experiments.train_medusa writes one)")
    parser.add_argument("--nodes", type=cli.int_at_least(1), default=32, help="tree size (default 32)")
    parser.add_argument("--name", default=None, help="preset name (default medusa<nodes>)")
    parser.add_argument("--out-dir", type=Path, default=PRESET_DIR, help=f"where to write it (default {PRESET_DIR})")
    parser.add_argument("--max-depth", type=cli.int_at_least(1), default=None,
                        help="deepest level (default: number of heads)")
    parser.add_argument("--source", choices=("auto", "generated", "corpus"), default="auto",
                        help="which eval.json accuracies: generated (held-out prompts continued greedily by the "
                             "target: the greedy decode regime), corpus (held-out text), auto (generated if there)")
    parser.add_argument("--measure", action="store_true", help="measure accuracy on held-out text afresh")
    parser.add_argument("--target", default=None, help="target directory for --measure (default: the recorded one)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for --measure")
    parser.add_argument("--eval-tokens", type=cli.int_at_least(MEASURE_CONTEXT), default=32768,
                        help=f"held-out tokens for --measure (whole {MEASURE_CONTEXT}-token chunks; at least one)")
    parser.add_argument("--force", action="store_true", help="overwrite a preset not written by this tool")
    return parser.parse_args(argv)


@cli.guard()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path, tau = derive(args.heads_dir.expanduser(), args.nodes, args.name or f"medusa{args.nodes}", args.out_dir,
                       args.max_depth, args.measure, args.target, args.tokenizer, args.eval_tokens, force=args.force,
                       source=args.source)
    if path.parent.resolve() == Path(PRESET_DIR).resolve():
        print(f"wrote {path} (expected tau {tau:.2f}); use it with drafter=medusa tree={path.stem}")
    else:  # Hydra finds tree presets in conf/tree only
        print(f"wrote {path} (expected tau {tau:.2f}); to use it as drafter=medusa tree={path.stem}, copy it to "
              f"{PRESET_DIR}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
