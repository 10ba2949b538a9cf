"""What the suite benchmark (:mod:`experiments.bench_suite`) loads: the real target, its distilled draft and
cached Medusa / EAGLE heads where built, and the suite's prompts per category; and the check that every option
asking for a drafter's rows has that drafter (:func:`check_rows`). Importable without hydra or wandb."""
from __future__ import annotations

from collections import defaultdict

from specdec.errors import SpecDecError


def load_inputs(args):
    """``(target, tokenizer, draft or None, medusa heads dir or None, prompts)``; prompts: ``[(category, ids [1, T])]``."""
    from experiments.data import load_prompts, prompt_ids
    from experiments.draft_training import find_draft
    from experiments.pretrained import ensure_model
    from experiments.suite import suite_path
    from specdec.models import load_causal_lm, load_tokenizer

    target_dir = str(ensure_model(args.model, cache_dir=args.cache_dir))
    target, tok = load_causal_lm(target_dir, dtype=args.dtype, role="target"), load_tokenizer(target_dir)
    draft_path, why = find_draft(args.model, args.cache_dir)
    draft = load_causal_lm(draft_path, dtype=args.draft_dtype or args.dtype, role="draft") if draft_path else None
    path = suite_path(args.cache_dir) if args.dataset == "suite" else args.dataset
    taken: dict[str, int] = defaultdict(int)
    prompts = []
    for prompt in load_prompts(path):
        if taken[prompt.category] < args.per_category:
            taken[prompt.category] += 1
            prompts.append((prompt.category, prompt_ids(prompt, tok)))
    medusa = medusa_dir(args, target)
    check_rows(args, why, medusa, target)
    return target, tok, draft, medusa, prompts


def check_rows(args, draft_missing: str | None, medusa: str | None, target) -> None:
    """One error for an option that would add no row, before anything runs (a table without the rows asked for
    reads as if they had been measured): ``--draft-vocab-from`` without the distilled draft (``draft_missing``
    says why it is not there and how to build it), ``--medusa-nodes`` / ``--medusa-dynamic`` without Medusa heads,
    ``--eagle-budget`` without EAGLE heads, ``--confidence`` with neither the draft nor EAGLE heads."""
    where = f" cache_dir={args.cache_dir}" if args.cache_dir else ""  # where this benchmark looks for them

    def train(kind: str) -> str:
        return f"train them with `python -m experiments.train_{kind} target={args.model} generated_source=chats{where}`"

    if args.draft_vocab_from and draft_missing:
        raise SpecDecError(f"--draft-vocab-from adds a row of the distilled draft, but {draft_missing}; or leave "
                           "--draft-vocab-from out")
    flag = "--medusa-nodes" if args.medusa_nodes else "--medusa-dynamic" if args.medusa_dynamic else None
    if flag and medusa is None:
        raise SpecDecError(f"{flag} adds Medusa rows, but no Medusa heads are cached for {args.model}: "
                           f"{train('medusa')}, give --medusa DIR, or leave {flag} out")
    flag = "--eagle-budget" if args.eagle_budget else "--confidence" if args.confidence and draft_missing else None
    if flag and not eagle_dirs(args, target):
        rows = "EAGLE" if flag == "--eagle-budget" else "draft-model and EAGLE"
        raise SpecDecError(f"{flag} adds {rows} rows, but no EAGLE heads are cached for {args.model}"
                           + ("" if flag == "--eagle-budget" else " and the distilled draft is not built")
                           + f": {train('eagle')}, give --eagle DIR, or leave {flag} out")


def medusa_dir(args, target) -> str | None:
    """``--medusa``, else the heads ``train_medusa target=<model dir>`` writes by default, if present."""

    from drafters.medusa_heads import CONFIG_FILE, default_heads_dir

    if args.medusa:
        return args.medusa
    from experiments.pretrained import model_dir

    found = cached_heads(default_heads_dir("x", args.cache_dir).parent, model_dir(args.model, args.cache_dir).name,
                         CONFIG_FILE, target)
    return str(found) if found else None


def cached_heads(parent, name: str, config_file: str, target):
    """The heads directory ``<parent>/<name>-<fingerprint>`` trained for ``target``, or None.

    The fingerprint in the name is the float32 target's; a target loaded in another dtype (``--dtype
    bfloat16``) matches through the fingerprint each candidate's config records (dtype rounding aside).
    """
    import json
    from pathlib import Path

    from drafters.head_files import same_target, target_fingerprint

    actual = target_fingerprint(target)
    exact = Path(parent) / f"{name}-{actual['sha256'][:10]}"
    if (exact / config_file).is_file():
        return exact
    for path in sorted(Path(parent).glob(f"{name}-*")):
        try:
            recorded = json.loads((path / config_file).read_text()).get("target") or {}
        except (OSError, ValueError):
            continue
        if same_target(recorded, actual):
            return path
    return None


def eagle_dirs(args, target) -> list[str]:
    """``--eagle`` (comma-separated head directories), else the heads ``train_eagle target=<model>`` writes
    by default (eagle2 and eagle3), those present."""
    from pathlib import Path

    from drafters.eagle_heads import FILES, default_heads_dir

    if args.eagle:
        given = [p for p in args.eagle.split(",") if p]
        if missing := [p for p in given if not Path(p).expanduser().is_dir()]:
            raise SpecDecError(f"--eagle {missing[0]}: no such directory; train one with python -m "
                               f"experiments.train_eagle target={args.model}, or leave --eagle out")
        return given
    from experiments.pretrained import model_dir

    parent, name = default_heads_dir("eagle3", "x", args.cache_dir).parent, model_dir(args.model, args.cache_dir).name
    found = [cached_heads(parent, f"{v}-{name}", FILES.config_file, target) for v in ("eagle2", "eagle3")]
    return [str(p) for p in found if p]
