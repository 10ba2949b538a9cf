"""Two drafters behind one: each step takes the first drafter's proposal when it has one, else the second's.

The classic pairing is prompt lookup first (free to run, long and right when the text repeats itself)
and a trained drafter second (EAGLE, a draft model: right more often, but every draft costs a forward):
a step where the context's suffix recurs costs no drafting at all, the others draft as usual. Both
drafters see every committed token, so the one that sat a step out catches up at its next proposal
(a draft model or EAGLE head feeds the tokens it missed in one causal forward).

Lossless at any temperature: which drafter proposes is a function of the committed tokens only, and
each proposal carries its own draft distribution (none for the deterministic n-gram chain), which the
acceptance rule uses as it would for that drafter alone.

``merge=True`` runs the second drafter on every step and, where the lookup proposes, grafts its chain onto the
second's tree (:func:`graft_chain`: shared prefixes once, the rest as a new branch from where they part). The
verify then takes whichever path the target agrees with further, at the price of a wider verify on those
steps. Lossless for deterministic proposals (n-gram, Medusa, greedy or top-k trees): siblings are distinct
tokens and the rule for deterministic trees (each rejected sibling's token zeroed in the residual) holds for
any such tree. A sampled proposal carries draft probabilities for its own nodes only, so it cannot be merged:
that is a clear error.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import re

import torch

from specdec.batch_drafting import BatchDrafter
from specdec.drafting import DraftContext, Drafter, StepShape, release
from specdec.errors import ConfigError, SpecDecError, positive_int
from specdec.types import AcceptResult, DraftTree, VerifyOutput


class HybridDrafter(Drafter):
    """``first``'s draft tree when it proposes at least ``min_drafts`` nodes this step, else ``second``'s.

    Args:
        first: tried first every step; a drafter that runs no model (its ``step_shape`` is the protocol's
            default), e.g. :class:`~drafters.NGramDrafter`, whose ``min_ngram`` sets how long a recurring suffix
            must be before its continuation is trusted. Its proposals may be dropped (``min_drafts``) or
            committed with another drafter's result, which only a drafter without model state can take.
        second: drafts the steps ``first`` leaves empty (e.g. :class:`~drafters.EagleDrafter`).
        min_drafts: the fewest nodes of ``first``'s proposal that are used (>= 1).
        merge: on steps where ``first`` proposes, also ask ``second`` and verify both proposals as one tree
            (:func:`graft_chain`); both must then be deterministic (n-gram + Medusa, or trees at greedy).

    Each proposed tree is labelled with its part's name (``tree.source``, e.g. ``ngram`` / ``eagle``; ``first`` /
    ``second`` when both parts have one name; ``<first>+<second>`` for merged trees), so every run's
    ``DecodeStats.steps_by_source`` counts the steps each part drafted, per row in batches, and records and
    summaries carry it.
    """

    name = "hybrid"

    def __init__(self, first: Drafter, second: Drafter, min_drafts: int = 1, merge: bool = False):
        super().__init__()
        for label, drafter in (("first", first), ("second", second)):
            if not isinstance(drafter, Drafter):
                raise ConfigError(f"hybrid drafter: {label}= must be a drafter (got {type(drafter).__name__}); "
                                  "e.g. drafter=hybrid with drafter.first an n-gram and drafter.second an EAGLE head")
        if first is second:
            raise ConfigError("hybrid drafter: first and second must be two drafter objects")
        if type(first).step_shape is not Drafter.step_shape:  # it runs a model: its proposals carry state
            raise ConfigError(f"hybrid drafter: first= must be a drafter that runs no model, e.g. an n-gram lookup "
                              f"(got {type(first).__name__}); put a drafter with a model or heads second")
        min_drafts = positive_int(min_drafts, "min_drafts")  # as decode's early check (a float was truncated)
        self.first, self.second, self.min_drafts, self.merge = first, second, min_drafts, bool(merge)
        self.labels = (first.name, second.name) if first.name != second.name else ("first", "second")
        self.merged_label = f"{self.labels[0]}+{self.labels[1]}"

    @property
    def max_nodes(self) -> int:
        if self.merge:
            return self.first.max_nodes + self.second.max_nodes
        return max(self.first.max_nodes, self.second.max_nodes)

    def step_shape(self, target) -> StepShape:
        """The second drafter's step (the one that costs forwards) with the hybrid's node budget; ``draft_source``:
        the steps it drafted, alone or (``merge``) under the lookup's grafted chain."""
        sources = (self.labels[1], self.merged_label) if self.merge else self.labels[1]
        with part_errors("second"):
            shape = self.second.step_shape(target)
        return dataclasses.replace(shape, max_nodes=self.max_nodes, draft_source=sources)

    def context_length(self) -> int | None:
        """The shorter of the parts' contexts (None: neither part has one of its own)."""
        limits = [limit for limit in (self.first.context_length(), self.second.context_length()) if limit is not None]
        return min(limits, default=None)

    def check_sampling(self, sampling) -> None:
        """Each part's own check; with ``merge``, a part known to sample its proposals under ``sampling`` is an
        error now (:func:`graft_chain` would refuse its first proposal, with prompts already decoded)."""
        each_part(self, lambda part: part.check_sampling(sampling))
        for label, part in (("first", self.first), ("second", self.second)) if self.merge else ():
            if samples_drafts(part, sampling):
                raise ConfigError(
                    f"hybrid drafter: merge=true verifies both parts' proposals as one tree, which only deterministic "
                    f"proposals allow; the {label} part ({type(part).__name__}) samples its drafts at temperature "
                    f"{sampling.temperature}: set drafter.merge=false or sampling.temperature=0, or give that part "
                    f"a deterministic tree (drafter.{label}.tree=<preset>, its tree_sampling left deterministic, or a "
                    f"dynamic one: drafter.{label}.budget=<nodes>)")

    def batched(self):
        """For a batch of rows: each part batched its own way (an n-gram per row, an EAGLE or draft-model chain
        with one forward per draft position for all rows); each row takes its first part's tree when it has
        one (:class:`BatchHybrid`)."""
        return BatchHybrid(self)

    def start(self, ctx: DraftContext) -> None:
        super().start(ctx)
        each_part(self, lambda part: part.start(ctx))

    def prefill(self, input_ids, target_hidden) -> None:
        super().prefill(input_ids, target_hidden)
        each_part(self, lambda part: part.prefill(input_ids, target_hidden))

    def propose(self, max_depth: int) -> DraftTree:
        tree = self.first.propose(max_depth)
        if tree.num_nodes < self.min_drafts:
            return self.labelled(self.second.propose(max_depth), 1)
        if self.merge:
            return self.combined(tree, self.second.propose(max_depth))
        return self.labelled(tree, 0)

    def combined(self, first: DraftTree, second: DraftTree) -> DraftTree:
        """``merge``: ``first``'s chain grafted onto ``second``'s tree, labelled ``<first>+<second>`` (``first``'s
        alone, labelled as its own, when ``second`` proposed nothing)."""
        if not second.num_nodes:
            return self.labelled(first, 0)
        merged = graft_chain(second, first)
        merged.source, merged.source_depth = self.merged_label, int(second.depth.max())  # the chain costs no forward
        return merged

    def labelled(self, tree: DraftTree, part: int) -> DraftTree:
        """``tree`` with its ``source``: part ``part``'s label (0 first, 1 second); an empty tree stays unlabelled."""
        if tree.num_nodes:
            tree.source = self.labels[part]
        return tree

    def commit(self, result: AcceptResult, verify: VerifyOutput) -> None:
        """Both drafters learn the step's outcome (the one that did not propose only its tokens and the
        target's states of the accepted path)."""
        self.first.commit(result, verify)
        self.second.commit(result, verify)
        super().commit(result, verify)

    def close(self) -> None:
        """Release both drafters (EAGLE-3's feature hooks on the target)."""
        release(self.first)
        release(self.second)


class BatchHybrid(BatchDrafter):
    """:class:`HybridDrafter` over a batch: per row, the first part's tree when it has at least ``min_drafts``
    nodes, else the second part's. The second part is asked for nothing (depth 0) on the rows the first covers,
    so it draws no draft there, exactly as the batch-1 hybrid does not call it; both parts learn every row's
    outcome. Each row's tree carries its part's label, as at batch 1."""

    def __init__(self, hybrid: HybridDrafter):
        self.hybrid = hybrid
        with part_errors("first"):
            self.first = hybrid.first.batched()
        with part_errors("second"):
            self.second = hybrid.second.batched()

    def start(self, ctx: DraftContext) -> None:
        each_part(self, lambda part: part.start(ctx))

    def extend(self, prompts: list[list[int]], target_hidden) -> None:
        each_part(self, lambda part: part.extend(prompts, target_hidden))

    def propose(self, max_depths: list[int]) -> list[DraftTree]:
        firsts = self.first.propose(max_depths)
        covered = [t.num_nodes >= self.hybrid.min_drafts for t in firsts]
        merge = self.hybrid.merge
        seconds = self.second.propose([d if merge or not c else 0 for c, d in zip(covered, max_depths)])
        return [(self.hybrid.combined(f, s) if merge else self.hybrid.labelled(f, 0)) if c
                else self.hybrid.labelled(s, 1) for f, s, c in zip(firsts, seconds, covered)]

    def commit(self, results: list[AcceptResult], verify: VerifyOutput) -> None:
        self.first.commit(results, verify)
        self.second.commit(results, verify)

    def select_rows(self, rows: list[int]) -> None:
        self.first.select_rows(rows)
        self.second.select_rows(rows)


#: ``drafter.<key>`` as a drafter's error names its setting; not inside a path or a name (``/ckpt/drafter.pt``), not a
#: part's key already (``drafter.second.heads``), not a key whose message gives the hybrid's place beside it
#: (``drafter.heads (drafter.second.heads under drafter=hybrid)``).
_OWN_KEY = re.compile(r"(?<![\w./\\-])drafter\.(?!first\.|second\.)(?!\w+ \(drafter\.)(?=\w)")


@contextlib.contextmanager
def part_errors(name: str):
    """Re-raise a part's :class:`~specdec.errors.SpecDecError` with the settings it names (``drafter.<key>``, as
    every drafter names its own) at the part's place in the config (``drafter.<name>.<key>``), so the fix it
    suggests is one the command line takes. (A hybrid inside a hybrid's part is not renamed twice.)"""
    try:
        yield
    except SpecDecError as error:
        if error.args and isinstance(error.args[0], str):
            error.args = (_OWN_KEY.sub(f"drafter.{name}.", error.args[0]), *error.args[1:])
        raise


def samples_drafts(drafter: Drafter, sampling) -> bool:
    """Whether ``drafter`` is known to sample its proposals under ``sampling`` (its ``samples_drafts``, a
    :class:`~drafters.tree_drafter.TreeDrafter`'s; a drafter without one is taken at its word step by step:
    :func:`graft_chain` refuses a sampled proposal), so that ``merge`` cannot take it."""
    known = getattr(drafter, "samples_drafts", None)
    return bool(known is not None and known(sampling))


def each_part(hybrid, call) -> None:
    """``call(part)`` for ``hybrid.first`` then ``hybrid.second``, each part's errors naming its own settings."""
    for name in ("first", "second"):
        with part_errors(name):
            call(getattr(hybrid, name))


def graft_chain(tree: DraftTree, chain: DraftTree) -> DraftTree:
    """``tree`` with ``chain``'s tokens as a path from the root: the part of the chain the tree already holds
    (matching tokens child by child) is shared, the rest hangs from where they part as new nodes, numbered after
    ``tree``'s (whose nodes keep their indices, so a drafter reading its own tree's nodes in ``commit`` still
    can). Both must be deterministic: no ``draft_probs``, or each node's a point mass on its token (greedy
    drafting); ConfigError otherwise. The result is deterministic."""
    tree_fixed = point_masses(tree)
    if not (tree_fixed and point_masses(chain)):
        raise ConfigError("hybrid drafter: merge=true verifies both parts' proposals as one tree, which only "
                          "deterministic proposals allow (n-gram, Medusa, greedy or top-k trees); this step's "
                          f"{'chain' if tree_fixed else 'tree'} was sampled (temperature > 0): "
                          "set merge=false, or use a deterministic second drafter")
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    child = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens))}  # (parent, token) -> node
    node = -1
    for tok in chain.tokens.tolist():
        if (node, tok) in child:
            node = child[(node, tok)]
            continue
        tokens.append(tok)
        parents.append(node)
        node = len(tokens) - 1
    return DraftTree(tokens=torch.tensor(tokens, dtype=torch.long), parents=torch.tensor(parents, dtype=torch.long))


def point_masses(tree: DraftTree) -> bool:
    """True when ``tree`` proposes deterministically: no draft distributions, or each node's is 1 at its token."""
    if tree.draft_probs is None:
        return True
    return bool((tree.draft_probs.gather(-1, tree.tokens[:, None].to(tree.draft_probs.device)) == 1).all())


def behind_lookup(drafter: Drafter, ngram_tokens: int = 8, min_suffix: int = 2, merge: bool = False,
                  datastore=None) -> HybridDrafter:
    """``drafter`` behind prompt lookup: a :class:`HybridDrafter` whose first part is an n-gram of ``ngram_tokens``
    drafts that proposes only where a suffix of at least ``min_suffix`` tokens recurred (as ``drafter=hybrid``'s
    defaults), or, with a ``datastore`` (:class:`~drafters.datastore.Datastore`), where the datastore continues the
    suffix. The second part is a shallow copy of ``drafter`` (sharing its model or heads), so the original can
    still run on its own, e.g. side by side in a benchmark. ``merge``: :class:`HybridDrafter`'s."""
    from drafters.ngram import NGramDrafter

    lookup = NGramDrafter(ngram_tokens, max_ngram=max(3, min_suffix), min_ngram=min_suffix, datastore=datastore)
    return HybridDrafter(lookup, copy.copy(drafter), merge=merge)
