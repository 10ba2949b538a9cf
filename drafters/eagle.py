"""The EAGLE drafter: an autoregressive head on the target's features (EAGLE-1/2, EAGLE-3).

The head (:mod:`drafters.eagle_heads`) keeps its own KV cache: slot ``s`` holds the pair (target
feature ``f_s``, token ``t_{s+1}``), so the committed slots run up to the root (the newest token,
whose own feature the target has not computed yet). Drafting feeds the head's predicted feature of
a node together with each child token: a chain one draft at a time, a tree one level per forward
through :class:`HeadFeed` (static presets, or the EAGLE-2 dynamic tree).

Features arrive with the verifier's forwards: the prompt's with the prefill
(``target_hidden [T - 1, H]``: the pairs up to the root), then with each verify, the rows of the
root and the accepted nodes. eagle3 reads three decoder layers' outputs with forward hooks that the
drafter registers on the target in :meth:`EagleDrafter.start` (removed by :meth:`EagleDrafter.close`
or when a later ``start`` binds another target).

On commit the head's cache drops every tree slot and the next ``propose`` feeds the accepted
tokens again, now with the target's true features (as EAGLE does): the tree's KV came from
predicted features, so compacting it would keep a worse state than the target's features give.
That catch-up is the first draft forward of the step, so a depth-d step still costs d head forwards.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from drafters.eagle_heads import (
    FILES,
    EagleHead,
    EagleHeadError,
    FeatureTap,
    check_version,
    default_heads_dir,
    how_to_train,
    load_head,
)
from drafters.fast_decoder import PROBE_CONTEXT, forward_lm, forward_probe
from drafters.head_files import HeadsPlace, heads_place
from drafters.tree_drafter import TreeDrafter, flag_of
from drafters.tree_expansion import TreeFeed
from specdec.batch_drafting import PerRowDrafters
from specdec.cache import SpecDecCache
from specdec.drafting import DraftContext, StepShape
from specdec.errors import ConfigError
from specdec.models import check_dtype_choice, head_dtype
from specdec.types import AcceptResult, DraftTree, VerifyOutput


class HeadFeed(TreeFeed):
    """Feeds tree levels to an EAGLE head: each node goes in with its parent's output feature."""

    label = "EAGLE head"

    def __init__(self, head: EagleHead, cache: SpecDecCache, device: torch.device, root_feature: torch.Tensor,
                 fast: bool = True):
        super().__init__(head.model, cache, device, fast)
        self.head = head
        self.outputs = [root_feature]  # [H] each: the root's output, then every fed node's in fed order

    def run(self, ids, parents, key_mask, position_ids):
        feats = torch.stack([self.outputs[p + 1] for p in parents])[None]  # [1, n, H]
        logits, hidden = run_head(self.head, ids, feats, self.cache, position_ids, key_mask,
                                  fast=self.fast)  # [1, n, V], [1, n, H]
        self.outputs.extend(hidden[0])
        return logits[0]


def run_head(head: EagleHead, input_ids: torch.Tensor, features: torch.Tensor, cache, position_ids: torch.Tensor,
             key_mask: torch.Tensor | None = None, logits_to_keep: int = 0, fast: bool = True,
             backend: str = "sdpa") -> tuple[torch.Tensor, torch.Tensor]:
    """One head forward of the pairs ``(features [B, n, H], input_ids [B, n])`` written to ``cache`` at
    ``position_ids [B, n]``, seeing ``key_mask [B, 1, n, S]`` (None: causal): ``(logits [B, n', V] float32,
    output features [B, n, H])``, through :func:`drafters.fast_decoder.forward_lm` (``fast``, ``backend``)."""
    with head.inputs(features) as model:
        return forward_lm(model, input_ids, cache, position_ids, key_mask, logits_to_keep, fast, backend)


class EagleDrafter(TreeDrafter):
    """Drafts chains, preset trees or EAGLE-2 dynamic trees with an EAGLE head.

    Args:
        heads: a trained head directory (``experiments.train_eagle`` writes one), a loaded
            :class:`~drafters.eagle_heads.EagleHead`, or None for the default directory of the embedded
            pair's target (``<cache>/eagle/<version>-zoo-<zoo_size>``); a directory that does not exist
            is reported, with how to train a head, when the drafter is first used.
        version: ``eagle2`` or ``eagle3``: the head must be of this version; None accepts either
            (and means eagle2 for the default directory).
        num_speculative_tokens, tree, tree_sampling, budget, top_k_children: the draft's shape, as for
            :class:`drafters.DraftModelDrafter` (chain, preset tree, or dynamic tree). Sampled children
            and chains record the head's warped distribution, so ``rejection`` stays lossless.
        zoo_size: which embedded pair's head ``heads=None`` means.
        cache_dir: the cache holding that pair's heads (None: ``$SPECDEC_CACHE`` or ``~/.cache/specdec``).
        attn_backend: attention backend of the head's causal forwards through transformers (tree levels use
            SDPA); unused by the fast forward.
        confidence_threshold: a chain ends after the first draft whose head probability is below this
            (0: always ``num_speculative_tokens``); chains only.
        dtype: the head's dtype: None for the target's, ``auto`` for bfloat16 on a GPU with bf16 or on a CPU
            where the head's matrix products measure faster in it (else the target's;
            :func:`specdec.models.auto_dtype`), or a name (``bfloat16``, ``float32``, ...). Like a draft
            model's dtype it changes what drafting costs and how often drafts are accepted, never what
            is emitted. A loaded :class:`EagleHead` given as ``heads`` is converted in place.
        fast_forward: run the head through :class:`drafters.fast_decoder.FastDecoder` (Llama and Qwen2
            layers; others always take transformers' forward): the same arithmetic, about a quarter less
            drafting time per step on the CPU (BENCHMARKS.md). False: the one-layer model's own forward (``attn_backend``).
    """

    name = "eagle"
    forward_label = "EAGLE head forward"

    def __init__(self, heads: str | os.PathLike | EagleHead | None = None, version: str | None = None,
                 num_speculative_tokens: int = 4, tree=None, tree_sampling: str = "deterministic",
                 budget: int | None = None, top_k_children: int = 4, zoo_size: str = "default",
                 attn_backend: str = "sdpa", confidence_threshold: float = 0.0, dtype: str | None = None,
                 fast_forward: bool = True, cache_dir: str | os.PathLike | None = None):
        super().__init__(num_speculative_tokens, tree, tree_sampling, budget, top_k_children, confidence_threshold)
        self.version = check_version(version, "drafter.version") if version is not None else None
        check_dtype_choice(dtype, "drafter.dtype")
        self.dtype = dtype
        self.attn_backend = attn_backend
        self.fast_forward = flag_of(fast_forward, "drafter.fast_forward")
        self._head: EagleHead | None = None
        self.heads_dir: Path | None = None
        self._place: HeadsPlace | None = None
        if isinstance(heads, EagleHead):
            if self.version is not None and heads.version != self.version:
                raise EagleHeadError(f"drafter.version={self.version} but the head given is an {heads.version} head")
            self._head = heads
        elif heads is None or isinstance(heads, (str, os.PathLike)):
            self._place = place_of(heads, self.version, zoo_size, cache_dir)
            self.heads_dir = self._place.directory
            if self.heads_dir.exists():
                self._head = load_head(self.heads_dir, self.version)
        else:
            raise ConfigError(f"heads={type(heads).__name__}: give a head directory or an EagleHead module")
        self._target = None
        self._tap: FeatureTap | None = None
        self._handed: torch.Tensor | None = None  # this row's slice of a batch's tapped features (EagleRows)
        self.cache: SpecDecCache | None = None
        self._reset()

    def _reset(self) -> None:
        self._pending: list[tuple[torch.Tensor, list[int]]] = []  # (features [m, H], tokens) not fed yet
        self._root: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits [V], output feature [H]) at the root
        self._committed = 0  # head cache slots holding committed pairs
        self._drafted = False  # the cache holds draft slots past the committed ones

    # ----------------------------------------------------------------- the head

    @classmethod
    def check_files(cls, config) -> None:
        """The head directory ``config`` names (``heads``; null: the ``zoo_size`` pair's default of ``version``)
        holds an EAGLE head: the missing-head error, with the command that trains it, otherwise."""
        heads, version = config.get("heads"), config.get("version")
        if heads is None or isinstance(heads, (str, os.PathLike)):
            place = place_of(heads, version, config.get("zoo_size", "default"), config.get("cache_dir"))
            place.check(FILES, how_to_train(version or "eagle2"))

    @property
    def head(self) -> EagleHead:
        """The loaded head (loads a directory that appeared since construction; else raises)."""
        if self._head is None:
            if self._place.zoo is not None:
                self._place.check(FILES, how_to_train(self.version or "eagle2"))
            self._head = load_head(self.heads_dir, self.version)
        return self._head

    def _bind(self, target) -> EagleHead:
        """The head, checked against ``target`` (once) and bound to it (embedding, LM head, device, dtype)."""
        head = self.head
        weight = target.get_output_embeddings().weight
        if self._target is not target:
            head.check_target(target)
            head.bind(target)  # in the target's dtype first: auto times the bound head (eagle2's LM-head rows too)
            if self._tap is not None:
                self._tap.remove()
            self._tap = head.tap(target)
            self._target = target
        dtype = head_dtype(self.dtype, weight.dtype, weight.device, head=head)
        if next(head.parameters()).dtype != dtype:  # its dtype, or a shared head another drafter runs in another
            head.bind(target, dtype)
        return head

    def close(self) -> None:
        """Remove the feature hooks from the target (eagle3); a later ``start`` adds them again."""
        if self._tap is not None:
            self._tap.remove()
        self._tap, self._target = None, None

    def step_shape(self, target) -> StepShape:
        """One head forward per tree level (the first is the catch-up), then a verify of ``1 + max_nodes``."""
        head = self._bind(target)
        return StepShape(kind=self.step_kind, max_nodes=self.max_nodes, draft_forwards="per_level",
                         draft_probe=_probe(head, self.fast_forward), k=None if self.mode == "static" else self.k,
                         draft_dtype=next(head.parameters()).dtype)

    # ----------------------------------------------------------------- the protocol

    def batched(self):
        """For a batch of rows: chains batch their head forwards (:mod:`drafters.eagle_batch`); trees run
        one copy of this drafter per row (:class:`EagleRows`)."""
        if self.mode == "chain":
            from drafters.eagle_batch import BatchEagleChain

            return BatchEagleChain(self)
        return EagleRows(self)

    def start(self, ctx: DraftContext) -> None:
        super().start(ctx)
        head = self._bind(ctx.target)
        extra = max(0, self.max_fed() - self.max_nodes)  # a dynamic tree feeds more nodes than it keeps
        self.cache = SpecDecCache.for_model(head.model, ctx.capacity + extra)
        self._reset()

    def prefill(self, input_ids: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        super().prefill(input_ids, target_hidden)
        if target_hidden is None or target_hidden.shape[0] == 0:  # a one-token prompt: no feature yet
            return
        self._pending.append((self._features(target_hidden, None), self.tokens[1:]))  # pairs (f_s, t_{s+1})

    def _features(self, hidden: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
        """The head's features ``[m, H]`` of the last target forward's positions ``rows`` (all if None)."""
        if self._handed is not None:  # a batch read the tap once and handed each row its slice
            raw, self._handed = self._handed, None  # [n, 3H]
        else:
            raw = hidden if self._tap is None else self._tap.take()[0]  # [n, H] or [n, 3H]
        raw = raw[: hidden.shape[0]]  # a padded verify block (verify_widths) ran padding after the nodes
        if raw.shape[0] != hidden.shape[0]:
            raise RuntimeError(f"EAGLE feature hooks saw {raw.shape[0]} positions, the target forward had "
                               f"{hidden.shape[0]}")
        if rows is not None:
            raw = raw[torch.tensor(rows, device=raw.device)]
        with torch.no_grad():
            return self.head.target_features(raw)  # [m, H]

    def _catch_up(self) -> None:
        """Feed the pending pairs (one causal forward); the last one's output is the new root's."""
        if self._drafted:  # the last draft was never committed: forget its slots
            self.cache.truncate(self._committed)
            self._drafted = False
        if not self._pending:
            return
        feats = torch.cat([f for f, _ in self._pending])  # [m, H]
        tokens = [t for _, toks in self._pending for t in toks]
        self._pending = []
        self._root = self._forward(feats, tokens)
        self._committed = self.cache.length

    def _forward(self, feats: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Append pairs causally; the last one's ``(logits [V], output feature [H])``."""
        ids = torch.tensor([tokens], dtype=torch.long, device=feats.device)  # [1, m]
        positions = self.cache.length + torch.arange(len(tokens), device=feats.device)[None]  # [1, m]
        logits, hidden = run_head(self.head, ids, feats[None], self.cache, positions, None, 1, self.fast_forward,
                                  self.attn_backend)  # [1, 1, V], [1, m, H]
        return logits[0, -1], hidden[0, -1]

    def propose(self, max_depth: int) -> DraftTree:
        depth_limit = self.depth_limit(max_depth)
        if depth_limit <= 0:
            return DraftTree.empty()
        self._catch_up()
        if self._root is None:  # no feature yet (a one-token prompt's first step)
            return DraftTree.empty()
        logits, feature = self._root
        self._drafted = True
        if self.mode != "chain":
            feed = HeadFeed(self.head, self.cache, feature.device, feature, self.fast_forward)
            return self.grow_tree(feed, logits, depth_limit)[0]
        state = {"feature": feature}

        def forward_one(tok: int, i: int) -> torch.Tensor:
            out, state["feature"] = self._forward(state["feature"][None], [tok])
            return out

        return self.grow_chain(logits, depth_limit, forward_one)

    def commit(self, result: AcceptResult, verify: VerifyOutput) -> None:
        """Queue the accepted tokens with the target's features of the root and accepted nodes."""
        rows = [0] + [1 + i for i in result.accepted_nodes]
        self._pending.append((self._features(verify.hidden, rows), list(result.tokens)))
        super().commit(result, verify)


class EagleRows(PerRowDrafters):
    """EAGLE over a batch: one copy of the drafter per row, all sharing the template's feature tap
    (eagle3). The tap holds the batch's features ``[B, n, 3H]`` after each target forward; it is read
    once, and each row's copy gets its own rows of it before it sees that forward's outputs."""

    def start(self, ctx: DraftContext) -> None:
        super().start(ctx)
        self.template._bind(ctx.target)  # the copies made from it share its one tap
        self._batch: torch.Tensor | None = None

    def _take(self) -> torch.Tensor | None:
        tap = self.template._tap
        return tap.take() if tap is not None else None  # [B, n, 3H]

    def extend(self, prompts: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        self._batch = self._take() if target_hidden is not None else None  # no forward for one-token prompts
        super().extend(prompts, target_hidden)

    def commit(self, results: list[AcceptResult], verify: VerifyOutput) -> None:
        self._batch = self._take()
        super().commit(results, verify)

    def before_row(self, row: int, drafter: EagleDrafter, positions: int) -> None:
        if self._batch is not None:
            drafter._handed = self._batch[row, :positions]  # [positions, 3H]


def place_of(heads, version: str | None, zoo_size: str = "default", cache_dir=None) -> HeadsPlace:
    """Where an EAGLE drafter of ``version`` (None: eagle2) reads its head: ``heads``, or for null the embedded
    ``zoo_size`` pair's default directory of that version."""
    version = version or "eagle2"
    return heads_place(heads, lambda size, cache: default_heads_dir(version, size, cache), zoo_size, cache_dir,
                       extra=f"version={version}")


def _probe(head: EagleHead, fast: bool):
    """A zero-argument callable running one head forward of one token after ``PROBE_CONTEXT`` slots, the way
    drafting runs it."""
    weight = next(head.parameters())
    feats = torch.zeros(1, PROBE_CONTEXT, head.hidden_size, device=weight.device, dtype=weight.dtype)  # [1, C, H]
    return forward_probe(head.model, fast, PROBE_CONTEXT, lambda n: head.inputs(feats[:, :n]))
