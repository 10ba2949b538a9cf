"""The decode loop: propose -> verify -> accept -> commit, one small function per phase."""
from __future__ import annotations

import functools
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from specdec.acceptance import AcceptanceRule, checked_result, get_rule
from specdec.cache import SpecDecCache
from specdec.drafting import DraftContext, Drafter, checked_max_nodes, proposal
from specdec.errors import SpecDecError
from specdec.models import context_length, synchronize, vocab_size
from specdec.rng import KeyedRandom
from specdec.sampling import SamplingParams
from specdec.stats import DecodeStats
from specdec.types import AcceptResult, DraftTree


@dataclass
class DecodeOutput:
    """``sequences [1, T + new]`` (prompt included) and the run's :class:`DecodeStats`."""

    sequences: torch.Tensor
    stats: DecodeStats


def eos_token_ids(model) -> set[int]:
    """The EOS ids ``model.generate`` stops on (generation config first, then model config)."""
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


def _without_autograd(method):
    """Run a decoding method in ``torch.inference_mode`` (no version counters or view tracking: on the
    2-core CPU of BENCHMARKS.md a batch-1 decode of the embedded target ran 5-7% faster than under
    ``no_grad``), or under ``no_grad`` for the fixed-shape step, whose tensors a compiled step updates in
    place. The returned sequences are ordinary tensors (usable in place and in autograd afterwards)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.no_grad() if self.compile != "none" else torch.inference_mode():
            out = method(self, *args, **kwargs)
        if isinstance(out.sequences, torch.Tensor):
            out.sequences = out.sequences.clone()
        else:
            out.sequences = [seq.clone() for seq in out.sequences]
        return out

    return run


class SpeculativeDecoder:
    """Speculative decoding with any drafter and acceptance rule; batch 1.

    Args:
        target: the target Hugging Face causal LM.
        drafter: a :class:`~specdec.drafting.Drafter` (``drafters.NoDrafter()`` is plain decoding).
        acceptance: a rule name (``greedy``, ``rejection``, ``typical``) or an ``AcceptanceRule``.
        sampling: temperature / top-k / top-p shared by drafter and rule; temperature 0 is greedy.
        attn_backend: ``sdpa`` or ``triton`` tree attention in the verifier.
        compile: ``none`` (the readable step; ragged batches), or the fixed-shape step of
            :mod:`specdec.static_step` for no drafter and draft-model chains and tree presets: ``static`` (eager),
            ``graph`` (captured in a CUDA graph, replayed every step) or ``inductor`` (``torch.compile``);
            every form emits the same tokens.
        verify_widths: the batch-1 eager loop pads each verify block to the smallest of these widths that
            holds it (None: no padding). On a CPU a wider forward can cost less (BLAS kernels for 2 or 3
            rows); ``experiments.costs.cheap_widths`` reads such widths off a measured cost curve.
    """

    def __init__(
        self,
        target,
        drafter: Drafter,
        acceptance: str | AcceptanceRule = "greedy",
        sampling: SamplingParams | None = None,
        attn_backend: str = "sdpa",
        compile: str = "none",
        verify_widths=None,
    ):
        # the loop drives the verifier; imported here to keep specdec at the bottom
        from verifier import Verifier

        if not isinstance(drafter, Drafter):
            raise SpecDecError(f"drafter must be a specdec Drafter (e.g. drafters.NoDrafter()), got {type(drafter).__name__}")
        self.target = target.eval()
        self.drafter = drafter
        self.sampling = sampling or SamplingParams()
        self.rule = get_rule(acceptance)
        self.rule.check(self.sampling)
        drafter.check_sampling(self.sampling)
        self.verifier = Verifier(self.target, attn_backend, verify_widths)
        self.device = self.verifier.device
        self.eos = eos_token_ids(self.target)
        self.vocab_size = vocab_size(self.target)
        self.compile = compile
        self.static_steps: dict = {}  # compile=graph|inductor: captured / compiled steps kept for later batches
        if compile != "none":
            from specdec.batch_decoder import batch_rule
            from specdec.static_shape import check_compile, static_drafter

            check_compile(compile)
            static_drafter(drafter, self.sampling)  # fails now, naming the drafter, if the static step cannot run it
            batch_rule(self.rule)  # and the rule, if it has no tensorized form (a custom rule)

    @_without_autograd
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, seed: int | None = None) -> DecodeOutput:
        """Decode up to ``max_new_tokens`` after ``input_ids [1, T]``; stops after an EOS token."""
        seed = seed if seed is not None else random.randrange(2**62)
        if self.compile != "none":  # the fixed-shape step, a batch of one
            out = self.generate_batch([input_ids], max_new_tokens, seed=seed)
            return DecodeOutput(sequences=out.sequences[0], stats=out.stats)
        self.check_inputs(input_ids, max_new_tokens)
        stats = DecodeStats()
        rng = KeyedRandom.for_seed(seed, self.device)
        prompt = input_ids.to(self.device)  # [1, T]
        capacity = prompt.shape[1] + max_new_tokens + self.verifier.width(self.drafter.max_nodes + 1)
        cache = SpecDecCache.for_model(self.target, capacity)
        start = time.perf_counter()
        with self._timer(stats, "time_prefill"):
            self.drafter.start(DraftContext(self.target, self.sampling, rng, capacity))
            hidden = self.verifier.prefill(cache, prompt[:, :-1])
            self.drafter.prefill(prompt, hidden)
        out = prompt[0].tolist()
        new: list[int] = []
        while len(new) < max_new_tokens:
            rng.set_step(stats.target_forwards)
            emitted, done = self._step(cache, out[-1], max_new_tokens - len(new), rng, stats)
            new.extend(emitted)
            out.extend(emitted)
            if done:
                break
        synchronize(self.device)
        stats.time_total = time.perf_counter() - start
        stats.new_tokens = len(new)
        return DecodeOutput(sequences=torch.tensor([out], dtype=torch.long, device=input_ids.device), stats=stats)

    @_without_autograd
    def generate_batch(self, prompts: list[torch.Tensor], max_new_tokens: int | list[int] = 64, seed: int = 0,
                       seeds: list[int] | None = None, max_rows: int | None = None, on_row=None):
        """Decode a batch of prompts (``[1, T_i]`` each, any lengths) together, with ragged acceptance.

        Row i samples with seed ``seeds[i]`` (default ``seed + i``) and equals ``generate(prompts[i],
        seed=seed + i)`` token for token; ``max_new_tokens`` may be one value or one per row.
        ``max_rows``: decode at most this many rows at once, and when a row finishes let the next
        waiting prompt take its place (continuous batching; ``compile="none"`` only); None: all rows in
        one batch. ``on_row(i, sequence, row_stats, so_far)``: called when row i finishes (with the
        fixed-shape step: for every row at the end), inside ``torch.inference_mode`` (``no_grad`` for that step). Returns a
        :class:`specdec.batch_decoder.BatchOutput` (``sequences``, aggregate ``stats``, ``row_stats``).
        """
        if self.compile != "none":
            if max_rows is not None and max_rows < len(prompts):
                raise SpecDecError(f"max_rows={max_rows} (continuous batching) needs compile='none', not "
                                   f"{self.compile!r}: the fixed-shape step keeps one set of rows")
            from specdec.static_step import generate_static

            out = generate_static(self, prompts, max_new_tokens, seed, seeds, self.compile)
            for i, (seq, stats) in enumerate(zip(out.sequences, out.row_stats)):
                if on_row is not None:
                    on_row(i, seq, stats, out.stats)
            return out
        from specdec.batch_decoder import generate_batch

        return generate_batch(self, prompts, max_new_tokens, seed, seeds, max_rows, on_row)

    def _step(self, cache, root, remaining, rng, stats) -> tuple[list[int], bool]:
        """One speculative step; returns the emitted tokens and whether generation is over."""
        step = stats.target_forwards
        with self._timer(stats, "time_draft"):
            tree = proposal(self.drafter, remaining - 1, self.vocab_size)
        prefix_len = cache.length
        with self._timer(stats, "time_verify"):
            verify = self.verifier.verify(cache, root, tree, step)
        with self._timer(stats, "time_accept"):
            result = checked_result(self.rule, self.rule(tree, verify.logits, self.sampling, rng), tree, self.vocab_size)
            emitted, done = self._cut(result.tokens, remaining)
            if not done:
                self._commit(cache, prefix_len, result)
                self.drafter.commit(result, verify)
        depth = int(tree.depth.max()) if tree.num_nodes else 0
        stats.record_step(tree.num_nodes, depth, result.num_accepted_drafts, tree.source, len(emitted), tree.source_depth)
        return emitted, done

    def _cut(self, tokens: list[int], remaining: int) -> tuple[list[int], bool]:
        """Stop exactly where plain decoding would: after an EOS, or at ``max_new_tokens``."""
        for i, tok in enumerate(tokens[:remaining]):
            if tok in self.eos:
                return tokens[: i + 1], True
        return tokens[:remaining], len(tokens) >= remaining

    @staticmethod
    def _commit(cache: SpecDecCache, prefix_len: int, result: AcceptResult) -> None:
        """Keep the root and the accepted path in the target cache, contiguous after the prefix."""
        cache.compact([0] + [1 + i for i in result.accepted_nodes], offset=prefix_len)

    def check_inputs(self, input_ids, max_new_tokens) -> None:
        """Raise :class:`SpecDecError` if ``generate(input_ids, max_new_tokens)`` cannot run: a prompt that is not
        ``LongTensor [1, T]``, is empty, holds ids outside the vocabulary, or with ``max_new_tokens`` does not fit the
        target's context or the drafter's own (:meth:`~specdec.drafting.Drafter.context_length`); or a drafter whose
        ``max_nodes`` is not an int >= 0."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise SpecDecError("input_ids must be a LongTensor of shape [1, T] (e.g. tokenizer(text, return_tensors='pt').input_ids)")
        if input_ids.shape[0] != 1:
            raise SpecDecError(f"input_ids has batch size {input_ids.shape[0]}: give one prompt, [1, T] (several: "
                               "generate_batch([prompt, ...]) with a [1, T_i] tensor each)")
        if input_ids.shape[1] == 0:
            raise SpecDecError("empty prompt: input_ids has no tokens; give at least one token (e.g. the BOS token)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise SpecDecError(f"max_new_tokens={max_new_tokens!r}: it must be a positive integer")
        _check_ids(input_ids, self.target)
        checked_max_nodes(self.drafter)
        t = input_ids.shape[1]
        _check_context(t, max_new_tokens, context_length(self.target), "the model's context")
        _check_context(t, max_new_tokens, self.drafter.context_length(), "the draft model's context",
                       ", or use a draft model with a longer context")

    @contextmanager
    def _timer(self, stats: DecodeStats, name: str):
        synchronize(self.device)
        t0 = time.perf_counter()
        yield
        synchronize(self.device)
        setattr(stats, name, getattr(stats, name) + time.perf_counter() - t0)


def _check_ids(input_ids: torch.Tensor, target) -> None:
    """Raise if ``input_ids [1, T]`` holds an id outside the target's vocabulary (its embedding table's rows; a
    negative id only, where the embedding is a wrapper that may map ids past its table): torch's lookup would fail
    with a bare IndexError."""
    embedding = target.get_input_embeddings()
    rows = embedding.num_embeddings if isinstance(embedding, torch.nn.Embedding) else None
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one pass, one host sync
    if low < 0 or (rows is not None and high >= rows):
        bad, vocabulary = (low, "") if low < 0 else (high, f" of {rows} ids (0 .. {rows - 1})")
        raise SpecDecError(f"input_ids holds the id {bad}, outside the target's vocabulary{vocabulary}: encode the "
                           "prompt with the target's own tokenizer (if it was, that tokenizer holds more ids than "
                           "the model's embedding: resize the embedding to the tokenizer)")


def _check_context(t: int, max_new_tokens: int, limit: int | None, whose: str, other_fix: str = "") -> None:
    """Raise if a prompt of ``t`` tokens, or it and ``max_new_tokens`` more, do not fit ``limit`` positions (None: no
    limit); the message names ``whose`` context, the bound that fits, and ``other_fix`` after it."""
    if limit is not None and t >= limit:  # a prompt that fills the context leaves no room for a new token
        relation = "longer than" if t > limit else "as long as"
        raise SpecDecError(f"prompt has {t} tokens, {relation} {whose} of {limit}: shorten it "
                           f"to at most {limit - 1} tokens (in a run, e.g. dataset.max_prompt_tokens={limit // 2})"
                           f"{other_fix}")
    if limit is not None and t + max_new_tokens > limit:
        raise SpecDecError(f"prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) exceeds {whose} of {limit}: "
                           f"lower max_new_tokens to at most {limit - t} or shorten the prompt{other_fix}")


__all__ = ["DecodeOutput", "DraftTree", "SpeculativeDecoder", "context_length", "eos_token_ids"]
