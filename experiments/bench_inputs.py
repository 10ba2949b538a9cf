"""What the benchmarks load: the model pair (``--synthetic``, ``--target`` / ``--draft`` directories or the embedded
pair) and the prompts, as token ids on the target's device."""
from __future__ import annotations

import sys

import torch

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
