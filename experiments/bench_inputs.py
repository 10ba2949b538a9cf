"""What the benchmarks load: the model pair (``--synthetic``, ``--target`` / ``--draft`` directories or the embedded
pair) and the prompts, as token ids on the target's device; and the check that ``experiments.bench``'s options all
reach the table it runs (:func:`check_flags`)."""
from __future__ import annotations

import sys

import torch

from specdec.errors import SpecDecError
from specdec.models import DTYPES, check_device, load_causal_lm, load_tokenizer


def pair_from_dirs(target_dir: str, draft_dir: str, opts: dict, draft_opts: dict):
    """``(target, draft, tokenizer)`` from two directories; a draft whose LM head is padded differently over the
    target's tokenizer (saved beside it) is padded to the target's (:mod:`drafters.vocab_padding`)."""
    from drafters.vocab_padding import matched_draft

    target, tokenizer = load_causal_lm(target_dir, **opts, role="target"), load_tokenizer(target_dir)
    draft, note = matched_draft(target, load_causal_lm(draft_dir, **draft_opts, role="draft"), tokenizer, draft_dir)
    if note:
        print(note, file=sys.stderr)
    return target, draft, tokenizer


def load_pair(args):
    """(target, draft, tokenizer or None) from ``--synthetic``, ``--target/--draft`` paths or the zoo ``--size``."""
    check_device(args.device, "--device")
    if args.synthetic:
        from experiments.synthetic import synthetic_pair

        return (*synthetic_pair(args.synthetic, args.device, DTYPES[args.dtype], args.draft_layers), None)
    opts = {"dtype": args.dtype, "device": args.device}
    draft_opts = {**opts, "dtype": args.draft_dtype}
    if args.target:
        return pair_from_dirs(args.target, args.draft or args.target, opts, draft_opts)
    from experiments.zoo import ensure_pair

    pair = ensure_pair(args.size, cache_dir=args.cache_dir)
    return (load_causal_lm(pair.target_dir, **opts, role="target"),
            load_causal_lm(pair.draft_dir, **draft_opts, role="draft"), load_tokenizer(pair.tokenizer_dir))


def load_prompt_ids(tokenizer, target, args) -> list[torch.Tensor]:
    """Prompts ``[1, T]`` on the target's device: random ids for a synthetic target, else the data set's."""
    if tokenizer is None:
        from experiments.synthetic import random_prompts

        ids = random_prompts(target.config.vocab_size, args.prompts, args.prompt_len)
    else:
        from experiments.data import heldout_prompts_path, load_prompts

        path = args.dataset or heldout_prompts_path(cache_dir=args.cache_dir, num_prompts=args.prompts)
        ids = [tokenizer(p.text, return_tensors="pt").input_ids[:, -args.max_prompt_tokens:]
               for p in load_prompts(path, limit=args.prompts)]
    return [x.to(args.device) for x in ids]


#: Options only the batch-1 table reads (given with ``--batch-sizes`` they would change nothing), as
#: (flag, whether ``args`` sets it); those only ``--batch-sizes`` tables read; those only ``--compile`` rows read;
#: those only ``--synthetic`` reads and those it ignores (its prompts are random); those only the ``--verify-curve``
#: timing reads.
BATCH_1_ONLY = (("--attn-backend", lambda a: a.attn_backend != "sdpa"), ("--fuse-projections", lambda a: a.fuse_projections),
                ("--trees", lambda a: a.trees), ("--verify-curve", lambda a: a.verify_curve),
                ("--hf-compile", lambda a: a.hf_compile), ("--no-hf-dynamic", lambda a: not a.hf_dynamic))
BATCHED_ONLY = (("--eagle", lambda a: a.eagle), ("--hybrid", lambda a: a.hybrid))
COMPILED_ONLY = (("--attn-backend", lambda a: a.attn_backend != "sdpa"), ("--fuse-projections", lambda a: a.fuse_projections))
SYNTHETIC_ONLY = (("--draft-layers", lambda a: a.draft_layers is not None), ("--prompt-len", lambda a: a.prompt_len is not None))
DATA_ONLY = (("--dataset", lambda a: a.dataset), ("--max-prompt-tokens", lambda a: a.max_prompt_tokens is not None),
             ("--size", lambda a: a.size is not None))
ZOO_ONLY = (("--size", lambda a: a.size is not None),)
MAX_PROMPT_TOKENS, SIZE = 384, "default"  # a real prompt's last tokens kept, the embedded pair, unless given
CURVE_ONLY = (("--backends", lambda a: a.backends), ("--context", lambda a: a.context),
              ("--verify-widths", lambda a: a.verify_widths is not None))


def _given(options, args) -> tuple[str, str]:
    """The flags of ``options`` that ``args`` sets, as ('X applies', 'it') / ('X, Y apply', 'them'); ('', '')
    for none."""
    flags = [flag for flag, is_set in options if is_set(args)]
    if not flags:
        return "", ""
    return (f"{flags[0]} applies", "it") if len(flags) == 1 else (f"{', '.join(flags)} apply", "them")


def check_flags(args) -> None:
    """One error for options the chosen table would ignore (a user would read a table without the rows they asked
    for, or the embedded pair's draft measured as theirs): ``--draft`` without ``--target``, ``--target``/``--draft``
    with ``--synthetic``, batch-1 options with ``--batch-sizes`` and batched ones without it, the ``--compile``
    rows' options without ``--compile``, ``--synthetic``'s without it and ``--dataset`` with it, the verify curve's
    without ``--verify-curve``; ``--size`` with ``--target`` (the zoo pair is not loaded)."""
    if args.synthetic and (args.target or args.draft):
        raise SpecDecError("--synthetic builds its own random target and layer-truncated self-draft: drop --target "
                           "and --draft, or drop --synthetic")
    if args.synthetic:  # an unknown shape or a self-draft as deep as its target fails before an 8B target is built
        from experiments.synthetic import DRAFT_LAYERS, check_draft_layers

        try:
            check_draft_layers(args.synthetic, DRAFT_LAYERS if args.draft_layers is None else args.draft_layers)
        except ValueError as err:
            raise SpecDecError(str(err)) from None
    if args.draft and not args.target:
        raise SpecDecError(f"--draft {args.draft} needs --target: without it the embedded pair (--size "
                           f"{args.size or SIZE}) runs with its own draft; give the target directory the draft belongs to")
    checks = ((args.batch_sizes, BATCH_1_ONLY, "the batch-1 table", "run without --batch-sizes"),
              (not args.batch_sizes, BATCHED_ONLY, "the --batch-sizes tables", "add --batch-sizes"),
              (args.compile == "none", COMPILED_ONLY, "the --compile rows (the eager rows keep sdpa, the target as loaded)",
               "add --compile static|inductor|graph"),
              (not args.synthetic, SYNTHETIC_ONLY, "--synthetic's random target and prompts", "add --synthetic NAME"),
              (args.synthetic, DATA_ONLY, "a real model pair and its prompts (--synthetic builds random ones)", "drop --synthetic"),
              (not args.verify_curve, CURVE_ONLY, "the --verify-curve timing", "add --verify-curve"),
              (args.target, ZOO_ONLY, "the embedded pair (--target loads yours)", "drop --target"))
    for applies, options, where, fix in checks:
        given, pronoun = _given(options, args) if applies else ("", "")
        if given:
            raise SpecDecError(f"{given} to {where}: {fix}, or leave {pronoun} out")
    check_batch_sizes(args.batch_sizes or [], args.prompts, f"(--prompts {args.prompts})")


def check_batch_sizes(sizes: list[int], prompts: int, source: str, give_more: str = "--prompts") -> None:
    """SpecDecError for ``--batch-sizes`` above the ``prompts`` there are (``source``: where that number comes
    from): such a batch would hold ``prompts`` rows under a larger label. ``give_more``: the option that gives more
    prompts, or "" when none can (a data set holds no more)."""
    if wide := sorted({b for b in sizes if b > prompts}):
        fix = f"give {give_more} {max(wide)} or more, or smaller batch sizes" if give_more else \
            "give more prompts or smaller batch sizes"
        raise SpecDecError(f"--batch-sizes {','.join(map(str, wide))}: more than the {prompts} prompts {source}, so "
                           f"such a batch would hold {prompts} rows under a larger label: {fix}")


def fill_defaults(args) -> None:
    """Give the options that :func:`check_flags` checks as "given or not" their defaults, once they are checked."""
    from experiments.synthetic import DRAFT_LAYERS, PROMPT_LEN

    for name, default in (("draft_layers", DRAFT_LAYERS), ("prompt_len", PROMPT_LEN),
                          ("max_prompt_tokens", MAX_PROMPT_TOKENS), ("size", SIZE)):
        if getattr(args, name) is None:
            setattr(args, name, default)


def drafter_class(path: str) -> type:
    """``--drafter``'s class (``module.Class``): a :class:`~specdec.drafting.Drafter` subclass, else an argparse
    error line (an import's failure as a run's ``_target_``'s is reported)."""
    import argparse

    from experiments.instantiate import target_of
    from specdec.drafting import Drafter
    from specdec.errors import ConfigError

    try:
        cls = target_of({"_target_": path}, "drafter class")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not (isinstance(cls, type) and issubclass(cls, Drafter)):
        raise argparse.ArgumentTypeError(f"{path} is not a subclass of specdec.drafting.Drafter; name a drafter class")
    return cls


def own_drafters(cls: type, ks: list[int], taken: set[str]) -> list[tuple]:
    """``(name, drafter, k)`` rows of ``--drafter cls``: one per k of ``ks`` (``ours_<name>_k<k>``, a chain) if its
    constructor takes ``num_speculative_tokens``, else one (``ours_<name>``); ``<name>`` is its ``name`` attribute
    (its class name, lowered, where it kept the base class's). ConfigError if it needs other arguments or a name is
    in ``taken`` (the methods so far)."""
    import inspect

    from specdec.errors import ConfigError

    name = cls.name if isinstance(cls.name, str) and cls.name != "drafter" else cls.__name__.lower()
    signature, what = inspect.signature(cls), f"--drafter {cls.__module__}.{cls.__qualname__}"
    chains = "num_speculative_tokens" in signature.parameters
    settings = [({"num_speculative_tokens": k}, f"ours_{name}_k{k}", k) for k in ks] if chains else [({}, f"ours_{name}", None)]
    try:
        signature.bind(**settings[0][0])
    except TypeError as exc:
        raise ConfigError(f"{what}: {exc}; --drafter builds a drafter whose other arguments have defaults") from exc
    if clash := [label for _, label, _ in settings if label in taken]:
        raise ConfigError(f"{what}: its method {clash[0]} is already in the table; give the class another name "
                          "attribute (or pass it once)")
    return [(label, cls(**kwargs), k) for kwargs, label, k in settings]
