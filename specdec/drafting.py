"""The drafter protocol: what the decode loop asks of every drafter.

A new drafter is one module in ``drafters/`` implementing :class:`Drafter` plus one config file;
nothing here changes.
"""
from __future__ import annotations

import inspect
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from specdec.errors import SpecDecError
from specdec.rng import KeyedRandom
from specdec.sampling import SamplingParams
from specdec.types import AcceptResult, DraftTree, VerifyOutput, integer_ids


@dataclass
class DraftContext:
    """What the decode loop hands a drafter when a ``generate`` call starts."""

    target: torch.nn.Module
    sampling: SamplingParams
    rng: KeyedRandom  # the run's keyed random numbers (draw with purpose DRAFT or CHILD)
    capacity: int  # the most tokens (prompt + generated + one step's nodes) the run can hold


#: How often a step runs the drafting module: never, once per tree level, once per step, or ``k`` times every step
#: whatever it proposes (a cross-tokenizer draft, whose own tokens are not the proposed ones).
DRAFT_FORWARDS = ("none", "per_level", "per_step", "fixed")


@dataclass(frozen=True)
class StepShape:
    """What one step of a drafter runs, as the cost model sees it (``experiments.costs``).

    Attributes:
        kind: ``none`` (no drafts), ``chain``, ``tree`` (a fixed preset) or ``dynamic``.
        max_nodes: the most draft nodes a step proposes (the target verifies ``1 + nodes``).
        draft_forwards: one of :data:`DRAFT_FORWARDS`: a draft model runs one forward per tree
            level (``per_level``: k for a k-chain), Medusa's heads one per step (``per_step``),
            n-gram lookup none, a cross-tokenizer draft ``k`` of its own every step (``fixed``).
        draft_model: a causal LM whose forwards are timed one token at a time after the run's
            context, like the target's; or None.
        draft_probe: a zero-argument callable running one draft forward as decoding does, for a
            drafting module that is not a causal LM (Medusa's, EAGLE's heads) or a draft model that runs
            through :class:`drafters.fast_decoder.FastDecoder` (then ``draft_model`` only times its
            prefill); or None.
        k: the chain length (chains and dynamic trees' depth limit; with ``fixed``, the draft forwards per step), else
            None.
        draft_dtype: the dtype the drafting module runs in when it is not ``draft_model`` (EAGLE's or
            Medusa's heads), else None (``draft_model``'s own is reported).
        draft_source: only the steps of this ``DraftTree.source`` (or of these sources) run draft forwards (a
            hybrid's model-running part, alone or under a merged lookup chain; its other part looks tokens up);
            None: every step's drafts cost forwards per ``draft_forwards``.
    """

    kind: str = "none"
    max_nodes: int = 0
    draft_forwards: str = "none"
    draft_model: torch.nn.Module | None = None
    draft_probe: Callable[[], object] | None = None
    k: int | None = None
    draft_dtype: torch.dtype | None = None
    draft_source: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.draft_forwards not in DRAFT_FORWARDS:
            raise ValueError(f"StepShape.draft_forwards={self.draft_forwards!r}; expected one of {DRAFT_FORWARDS}")

    def describe(self, name: str) -> dict:
        """The JSON-ready part, for the run summary."""
        runs = "model" if self.draft_model is not None else "probe" if self.draft_probe is not None else None
        dtype = self.draft_dtype or (next(self.draft_model.parameters()).dtype if runs == "model" else None)
        return {"name": name, "kind": self.kind, "max_nodes": self.max_nodes, "k": self.k,
                "draft_forwards": self.draft_forwards, "draft_module": runs,
                "draft_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
                "draft_source": self.draft_source}


class Drafter(ABC):
    """Proposes a :class:`DraftTree` each step and keeps its own state in sync with what was accepted.

    Call order per ``generate``: ``start`` once, ``prefill`` once, then per step ``propose`` ->
    (verify, accept) -> ``commit``. ``tokens`` lists every committed token; its last one is the
    root, which the target has not seen yet.
    """

    name: str = "drafter"

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ctx: DraftContext | None = None

    @property
    def max_nodes(self) -> int:
        """The most draft nodes one step may propose (sizes the KV caches)."""
        return 0

    @classmethod
    def check_files(cls, config: Mapping[str, Any]) -> None:
        """Raise now if files a drafter built from ``config`` (its constructor's arguments, as a run's ``drafter``
        node gives them) would read are missing: ``experiments.decode`` calls it before any model loads, so a
        missing heads directory is not found after minutes of loading. The default checks nothing."""

    def check_sampling(self, sampling: SamplingParams) -> None:
        """Raise now (a :class:`~specdec.errors.ConfigError` naming the setting and the fix) if this drafter cannot
        draft under ``sampling``: the decoder calls it when it is built, before any prompt is decoded. The default
        accepts any sampling."""

    def step_shape(self, target: torch.nn.Module) -> StepShape:
        """What a step runs against ``target`` (for the cost model). Drafters that run a model or
        heads override this; the default is a drafter that costs nothing to run (n-gram-like)."""
        return StepShape(kind="chain" if self.max_nodes else "none", max_nodes=self.max_nodes)

    def context_length(self) -> int | None:
        """The most positions (prompt and generated tokens) the drafter's own model can see, or None when it has no
        limit of its own (no model, the target's positions, or a window it keeps itself). The decoder refuses a
        prompt and ``max_new_tokens`` beyond it, as beyond the target's context."""
        return None

    def batched(self) -> BatchDrafter:  # noqa: F821
        """This drafter for a batch of rows (``SpeculativeDecoder.generate_batch``). The default runs one
        copy per row (:class:`specdec.batch_drafting.PerRowDrafters`); drafters that batch their model
        forwards return their own :class:`~specdec.batch_drafting.BatchDrafter`."""
        from specdec.batch_drafting import PerRowDrafters

        return PerRowDrafters(self)

    def start(self, ctx: DraftContext) -> None:
        """Bind to a run: check compatibility with the target (vocabulary, device), reset state."""
        self.ctx = ctx
        self.tokens = []

    def prefill(self, input_ids: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        """See the prompt ``input_ids [1, T]``; ``target_hidden [T - 1, H]`` are the target's states."""
        self.tokens = input_ids[0].tolist()

    @abstractmethod
    def propose(self, max_depth: int) -> DraftTree:
        """Draft nodes after the root (``self.tokens[-1]``), at most ``max_depth`` deep."""

    def commit(self, result: AcceptResult, verify: VerifyOutput) -> None:
        """Learn what was accepted: ``result.tokens`` are appended to the sequence."""
        self.tokens.extend(result.tokens)


def proposal(drafter: Drafter, max_depth: int, vocab_size: int) -> DraftTree:
    """``drafter.propose(max_depth=max_depth)``, checked (:func:`checked_proposal`). A ``propose`` whose parameter is
    not named ``max_depth`` is the drafter's mistake: :class:`SpecDecError` naming it, not a TypeError from here."""
    try:
        tree = drafter.propose(max_depth=max_depth)
    except TypeError as exc:
        if not _takes_max_depth(drafter.propose):
            raise SpecDecError(f"{_named(drafter)}: propose() takes no keyword max_depth; the decode loop calls "
                               "propose(max_depth=...): name its parameter so") from exc
        raise
    return checked_proposal(drafter, tree, vocab_size, max_depth)


def _takes_max_depth(propose: Callable) -> bool:
    """Whether ``propose`` has a parameter ``max_depth`` (True where the signature cannot be read: the error is not
    ours). A partial bind: a propose that also wants another argument keeps its own TypeError."""
    try:
        inspect.signature(propose).bind_partial(max_depth=0)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def checked_proposal(drafter: Drafter, tree, vocab_size: int, max_depth: int | None = None, *,
                     max_nodes: int | None = None, call: str = "propose()", check_ids: bool = True) -> DraftTree:
    """``tree``, what ``drafter.propose`` returned, if the decode loop can verify it: a :class:`DraftTree` of at most
    ``max_nodes`` (default ``drafter.max_nodes``) nodes (the caches are sized by it) and at most ``max_depth`` levels
    (None: unchecked; the tokens the run may still emit, less the one the target adds) whose ``draft_probs``, if any,
    are ``[N, V]`` over the target's ``vocab_size``, with token ids in that vocabulary and each ``draft_probs`` row
    the distribution its node was drawn from (``check_ids``: the checks that read values; a batch does them for all
    its rows at once). Else :class:`SpecDecError` naming the drafter and ``call``: a new drafter's mistake is
    reported as its author's, not as the framework's."""
    if not isinstance(tree, DraftTree):
        raise SpecDecError(f"{_named(drafter)}: {call} returned a {type(tree).__name__}; return a "
                           "specdec.types.DraftTree (DraftTree.chain(tokens) for a chain, DraftTree.empty() for none)")
    if tree.tokens.dim() != 1 or tree.parents.shape != tree.tokens.shape:
        raise SpecDecError(f"{_named(drafter)}: {call} returned a DraftTree with tokens {tuple(tree.tokens.shape)} "
                           f"and parents {tuple(tree.parents.shape)}; both must be [N]")
    if not integer_ids(tree.tokens):
        raise SpecDecError(f"{_named(drafter)}: {call} returned tokens of dtype {tree.tokens.dtype}; token ids must "
                           "be integers (torch.long)")
    max_nodes = drafter.max_nodes if max_nodes is None else max_nodes
    if tree.num_nodes > max_nodes:
        raise SpecDecError(f"{_named(drafter)}: {call} returned {tree.num_nodes} nodes but its max_nodes is "
                           f"{max_nodes} (the caches are sized by it); raise max_nodes or propose fewer")
    if max_depth is not None and tree.num_nodes > max_depth and int(tree.depth.max()) > max_depth:  # depth <= nodes
        depth_call = f"propose(max_depth={max_depth})" if call == "propose()" else f"{call} (max_depth {max_depth})"
        raise SpecDecError(f"{_named(drafter)}: {depth_call} returned a tree {int(tree.depth.max())} levels deep; "
                           "propose at most max_depth levels (the tokens the run may still emit, less the one the "
                           "target adds)")
    if check_ids and tree.num_nodes:
        check_token_ids(drafter, tree.tokens, vocab_size, call)
    probs = tree.draft_probs
    if probs is not None and tuple(probs.shape) != (tree.num_nodes, vocab_size):
        raise SpecDecError(f"{_named(drafter)}: {call} returned draft_probs of shape {tuple(probs.shape)}; expected "
                           f"[{tree.num_nodes}, {vocab_size}] (one row per node over the target's vocabulary)")
    if check_ids and probs is not None and tree.num_nodes and bool(_bad_probs(probs, tree.tokens)):
        _raise_bad_probs(drafter, tree, call)
    return tree


def _bad_probs(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Whether draft distributions ``probs [N, V]`` (not empty) of nodes ``tokens [N]`` are not what rejection
    sampling reads (a bool on their device, no host read): each row a distribution (finite, >= 0, summing to 1)
    giving its own node's token a positive probability (it was drawn from that row). A row of zeros at the drawn
    token makes every draft accepted, a scaled row shifts every acceptance: the run would still call itself
    lossless."""
    sums = probs.sum(-1, dtype=torch.float32)  # [N]; inf or NaN anywhere makes its row's sum fail the test below
    drawn = probs.gather(1, tokens.to(probs.device)[:, None])  # [N, 1]
    return ~((sums - 1).abs() <= _sum_tolerance(probs)).all() | (probs.amin() < 0) | ~(drawn > 0).all()


def _sum_tolerance(probs: torch.Tensor) -> float:
    """How far a row of ``probs`` may sum from 1 (rounding: float32 or wider, or half precision)."""
    return 1e-3 if probs.dtype in (torch.float32, torch.float64) else 3e-2


def _raise_bad_probs(drafter, tree: DraftTree, call: str) -> None:
    """:class:`SpecDecError` naming the first node whose ``draft_probs`` row fails :func:`_bad_probs`."""
    probs = tree.draft_probs.float()
    for node in range(tree.num_nodes):
        row, token = probs[node], int(tree.tokens[node])
        total, low = float(row.sum()), float(row.min())
        if not (abs(total - 1) <= _sum_tolerance(tree.draft_probs) and low >= 0):
            what = f"has a negative entry ({low:.3g})" if low < 0 else f"sums to {total:.6g}"
            raise SpecDecError(f"{_named(drafter)}: {call} returned draft_probs whose row {node} {what}; each row "
                               "must be the distribution its node was drawn from (finite, >= 0, summing to 1), or "
                               "pass draft_probs=None for deterministic proposals")
        if not float(row[token]) > 0:
            raise SpecDecError(f"{_named(drafter)}: {call} proposed token {token} at node {node} with draft "
                               f"probability {float(row[token]):.3g}; a sampled node's token must have q > 0 in its "
                               "row (it was drawn from it): rejection sampling would accept it every time")
    raise SpecDecError(f"{_named(drafter)}: {call} returned draft_probs whose rows are not distributions (finite, "
                       ">= 0, summing to 1, q > 0 at each node's token) within rounding")


def check_token_ids(drafter, tokens: torch.Tensor, vocab_size: int, call: str = "propose()") -> None:
    """:class:`SpecDecError` naming ``drafter`` if a proposed token id (``tokens``, any shape, not empty) is outside
    the target's vocabulary."""
    bad = _outside_vocab(tokens, vocab_size)
    if bad is not None:
        raise SpecDecError(f"{_named(drafter)}: {call} returned token id {bad}, outside "
                           f"the target's vocabulary of {vocab_size} ids (0 to {vocab_size - 1})")


def _outside_vocab(tokens: torch.Tensor, vocab_size: int) -> int | None:
    """A token id of ``tokens`` (not empty) outside ``0 .. vocab_size - 1``, or None (one host read)."""
    low, high = (int(v) for v in tokens.aminmax())
    return low if low < 0 else high if high >= vocab_size else None


def checked_row_proposals(drafter, trees, max_depths: list[int], max_nodes: int, vocab_size: int) -> list[DraftTree]:
    """``trees``, what a batch drafter's ``propose(max_depths)`` returned (``drafter``: a
    :class:`~specdec.batch_drafting.BatchDrafter` that batches its own forwards), if the batched loop can verify
    them: a list of one tree per active row (``len(max_depths)``), each as :func:`checked_proposal` checks one,
    against the batch-1 drafter's ``max_nodes`` (the batch cache is sized by it) and the row's own depth limit.
    The token ids of all rows are checked at once (one host read); a row found outside is named."""
    if not isinstance(trees, (list, tuple)) or len(trees) != len(max_depths):
        got = f"{len(trees)} trees" if isinstance(trees, (list, tuple)) else f"a {type(trees).__name__}"
        raise SpecDecError(f"{_named(drafter)}: propose(max_depths) returned {got} for {len(max_depths)} active "
                           "rows; return a list of one DraftTree per row (DraftTree.empty() for a row without drafts)")
    checked = [checked_proposal(drafter, tree, vocab_size, depth, max_nodes=max_nodes, check_ids=False,
                                call=f"propose(max_depths)[row {row}]")
               for row, (tree, depth) in enumerate(zip(trees, max_depths))]
    drafted = [tree.tokens for tree in checked if tree.num_nodes]
    if drafted and _outside_vocab(torch.cat(drafted), vocab_size) is not None:  # name the row
        for row, tree in enumerate(checked):
            if tree.num_nodes:
                check_token_ids(drafter, tree.tokens, vocab_size, f"propose(max_depths)[row {row}]")
    sampled = [(row, tree) for row, tree in enumerate(checked) if tree.num_nodes and tree.draft_probs is not None]
    if sampled and bool(torch.stack([_bad_probs(t.draft_probs, t.tokens) for _, t in sampled]).any()):  # one read
        for row, tree in sampled:
            if bool(_bad_probs(tree.draft_probs, tree.tokens)):
                _raise_bad_probs(drafter, tree, f"propose(max_depths)[row {row}]")
    return checked


def checked_max_nodes(drafter: Drafter) -> int:
    """``drafter.max_nodes`` if it is an int >= 0 (a property: the caches are sized by it), else
    :class:`SpecDecError` naming the drafter (a plain method there failed later, inside the decoder)."""
    nodes = drafter.max_nodes
    try:
        count = None if isinstance(nodes, bool) else operator.index(nodes)  # an int, or numpy's
    except TypeError:
        count = None
    if count is None or count < 0:
        what = "a method" if callable(nodes) else repr(nodes)
        raise SpecDecError(f"{_named(drafter)}: max_nodes is {what}; it must be an int >= 0, the most draft nodes "
                           "one step proposes (define it with @property, as specdec.drafting.Drafter does)")
    return count


def _named(drafter: Drafter) -> str:
    """``drafter <module>.<class>``, for an error message (built only when one is raised: the check runs every step)."""
    return f"drafter {type(drafter).__module__}.{type(drafter).__qualname__}"


def release(drafter) -> None:
    """Undo what ``drafter`` put on its target (EAGLE-3's feature hooks): its ``close()``, where it has one.
    A later ``start`` sets things up again; benchmarks call this after each method's run so that no other
    method runs with a drafter's hooks on the shared target."""
    close = getattr(drafter, "close", None)
    if callable(close):
        close()
