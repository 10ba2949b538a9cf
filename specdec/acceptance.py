"""Acceptance rules: given the draft tree and the target's logits, which nodes are accepted.

Terms (as in vLLM's rejection sampler and Leviathan et al. 2023, arXiv 2211.17192):

- *accepted* tokens: draft nodes along one root-to-node path that the rule keeps;
- *recovered* (correction) token: sampled after the first rejection, from the residual
  distribution, so that the emitted token is distributed exactly as the target's;
- *bonus* token: sampled from the target at the last accepted node when it has no children.

Every step emits the accepted tokens plus exactly one recovered-or-bonus token. ``p`` is the
target distribution and ``q`` the draft distribution, both warped by the same
:class:`~specdec.sampling.SamplingParams`.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod

import torch

from specdec.errors import ConfigError, SpecDecError
from specdec.rng import ACCEPT, EXTRA, KeyedRandom
from specdec.sampling import SamplingParams, warp_probs
from specdec.tree import children_lists
from specdec.types import AcceptResult, DraftTree


class AcceptanceRule(ABC):
    """One signature for every rule; ``lossless`` says whether the output follows the target exactly.

    A new rule implements :meth:`__call__` (and :meth:`check` if it cannot run with some sampling settings).
    ``name`` (what the run summary records) defaults to the class's name, and ``lossless`` to False: a rule
    is recorded as lossless only where its own class says so (a subclass of a lossless rule that changes
    its arithmetic does not inherit the claim). Draw every random number through :meth:`draw_uniform` and
    :meth:`draw_token` so that a run is reproducible from its seed.
    """

    name: str = ""
    lossless: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in vars(cls):
            cls.name = cls.__name__
        if "lossless" not in vars(cls):
            cls.lossless = False

    def check(self, sampling: SamplingParams) -> None:
        """Raise :class:`ConfigError` if the rule cannot run with ``sampling``."""

    def draw_uniform(self, rng: KeyedRandom, node: int) -> float:
        """The draw ``u ~ U(0, 1)`` that decides draft ``node``; every random decision of a rule goes
        through here, :meth:`draw_token` or ``rng`` itself (keyed by node and step: :mod:`specdec.rng`)."""
        return float(rng.uniform(ACCEPT, node)[0])

    def draw_token(self, probs: torch.Tensor, rng: KeyedRandom) -> int:
        """The step's one token drawn from ``probs [V]`` (the recovered or bonus token; keyed by the step only, so
        a second call in one step draws with the same number: other draws go through ``rng.categorical``)."""
        return int(rng.categorical(probs[None], EXTRA)[0])

    @abstractmethod
    def __call__(self, tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams, rng: KeyedRandom) -> AcceptResult:
        """Decide on ``tree`` given target ``logits [1 + N, V]`` (row 0: the root, row 1 + i: node i); the
        random draws come from ``rng`` (batch 1)."""


def _walk(tree: DraftTree, choose_child, extra_token) -> AcceptResult:
    """Walk from the root: ``choose_child(node, children) -> child or None``; then ``extra_token(node)``."""
    kids = children_lists(tree.parents)
    node, accepted = -1, []
    while kids[node + 1]:
        child = choose_child(node, kids[node + 1])
        if child is None:
            break
        accepted.append(child)
        node = child
    tokens = tree.tokens[accepted].tolist() if accepted else []
    return AcceptResult(accepted_nodes=accepted, tokens=tokens + [extra_token(node)])


class GreedyAcceptance(AcceptanceRule):
    """Temperature 0: the deepest path whose every token is the target's argmax at its parent."""

    name = "greedy"
    lossless = True

    def check(self, sampling: SamplingParams) -> None:
        if not sampling.greedy:
            raise ConfigError(
                f"acceptance=greedy needs sampling.temperature=0 (got {sampling.temperature}); "
                "use acceptance=rejection for lossless sampling"
            )

    def __call__(self, tree, logits, sampling, rng):
        best = logits.argmax(-1).tolist()  # [1 + N]
        toks = tree.tokens.tolist()

        def choose(node, children):
            return next((c for c in children if toks[c] == best[node + 1]), None)

        return _walk(tree, choose, lambda node: best[node + 1])


class RejectionAcceptance(AcceptanceRule):
    """Speculative sampling, lossless for any temperature / top-k / top-p.

    On a chain it is the rule of Leviathan et al. / Chen et al. (arXiv 2302.01318). On a tree it
    tries the children of a node in order (SpecInfer arXiv 2305.09781, Sequoia arXiv 2402.12374),
    keeping a running target ``p'`` (the node's p at first):

    - sampled children (``tree.draft_probs`` given): accept ``c`` w.p. ``min(1, p'(c) / q'(c))``;
      on rejection ``p' <- norm(max(0, p' - q'))``, and for children drawn without replacement
      also ``q'(c) <- 0`` renormalised; with replacement each child's ``q'`` is its own ``draft_probs`` row;
    - deterministic children (``draft_probs`` None): q is a point mass, accept w.p. ``p'(c)``,
      on rejection ``p'(c) <- 0`` renormalised;
    - no child accepted: sample the recovered token from ``p'``; leaf reached: the bonus from p.

    Each formula is one small method (:meth:`accepts`, :meth:`residual`,
    :meth:`after_deterministic_rejection`, :meth:`q_without_replacement`), so the distribution
    tests can plant a bug by overriding exactly one of them.
    """

    name = "rejection"
    lossless = True

    def __call__(self, tree, logits, sampling, rng):
        p_all = warp_probs(logits, sampling)  # [1 + N, V]
        toks = tree.tokens.tolist()
        left = {}  # node -> p' once every child of it was rejected

        def choose(node, children):
            p = p_all[node + 1]  # [V]
            q = None if tree.draft_probs is None else _draft_row(tree, children[0], p)  # [V]
            for c in children:
                x = toks[c]
                u = self.draw_uniform(rng, c)
                if q is None:  # deterministic child: q is a point mass on x
                    if self.accepts(u, float(p[x]), 1.0):
                        return c
                    p = self.after_deterministic_rejection(p, x)
                    continue
                if tree.sampling in ("chain", "with_replacement"):
                    q = _draft_row(tree, c, p)  # [V] the q c was drawn from
                if self.accepts(u, float(p[x]), float(q[x])):
                    return c
                p = self.residual(p, q)
                if tree.sampling == "without_replacement":
                    q = self.q_without_replacement(q, x)
            left[node] = p
            return None

        return _walk(tree, choose, lambda node: self.draw_token(left.get(node, p_all[node + 1]), rng))

    def accepts(self, u: float, px: float, qx: float) -> bool:
        """Accept a draft x with probability ``min(1, p'(x) / q'(x))``, given ``u ~ U(0, 1)``: always where
        ``q'(x) = 0 < p'(x)``, never where ``p'(x) = 0`` (a token the target cannot emit is never emitted, even
        from a draft whose recorded q could not have drawn it)."""
        return u * qx < px

    def residual(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``p'`` after a sampled child was rejected: ``norm(max(0, p' - q'))`` ``[V]``."""
        return _renorm((p - q).clamp_min(0.0), p)

    def after_deterministic_rejection(self, p: torch.Tensor, x: int) -> torch.Tensor:
        """``p'`` after a deterministic child ``x`` was rejected: ``p'(x) <- 0``, renormalised ``[V]``."""
        return _renorm(_zeroed(p, x), p)

    def q_without_replacement(self, q: torch.Tensor, x: int) -> torch.Tensor:
        """``q'`` for the next sibling drawn without replacement after ``x``: ``q'(x) <- 0``, renormalised."""
        return _renorm(_zeroed(q, x), q)


def _draft_row(tree: DraftTree, node: int, like: torch.Tensor) -> torch.Tensor:
    """The draft distribution ``node`` was sampled from, float32 on ``like``'s device ``[V]``."""
    return tree.draft_probs[node].to(like.device).float()


def _zeroed(dist: torch.Tensor, x: int) -> torch.Tensor:
    """A copy of ``dist [V]`` with entry ``x`` set to 0."""
    return dist.clone().index_fill_(0, torch.tensor([x], device=dist.device), 0.0)


def _renorm(dist: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``dist / dist.sum()``, or ``fallback`` when nothing is left (p == q up to rounding)."""
    total = float(dist.sum())
    return dist / total if total > 1e-12 else fallback


class TypicalAcceptance(AcceptanceRule):
    """Medusa's typical acceptance (arXiv 2401.10774): lossy by design, for comparison.

    Accept child x if ``p(x) > min(epsilon, delta * exp(-H(p)))``; the first accepted sibling wins.
    The extra token is sampled from p at the last accepted node (argmax at temperature 0).
    """

    name = "typical"
    lossless = False

    def __init__(self, epsilon: float = 0.09, delta: float = 0.3):
        for key, value in (("epsilon", epsilon), ("delta", delta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"acceptance.{key}={value!r}: give a number (typical acceptance needs "
                                  "0 < epsilon <= 1 and delta > 0)")
        if not 0 < epsilon <= 1:
            raise ConfigError(f"acceptance.epsilon={epsilon}: typical acceptance needs 0 < epsilon <= 1 (the "
                              "probability floor a drafted token must pass; Medusa uses 0.09)")
        if not delta > 0:
            raise ConfigError(f"acceptance.delta={delta}: typical acceptance needs delta > 0 (the weight of the "
                              "entropy-scaled floor; Medusa uses 0.3)")
        self.epsilon, self.delta = epsilon, delta

    def __call__(self, tree, logits, sampling, rng):
        p_all = warp_probs(logits, sampling)  # [1 + N, V]
        entropy = -(p_all * p_all.clamp_min(1e-30).log()).sum(-1)  # [1 + N]
        thresh = torch.minimum(torch.full_like(entropy, self.epsilon), self.delta * torch.exp(-entropy)).tolist()
        toks = tree.tokens.tolist()

        def choose(node, children):
            row = p_all[node + 1]
            return next((c for c in children if float(row[toks[c]]) > thresh[node + 1]), None)

        return _walk(tree, choose, lambda node: self.draw_token(p_all[node + 1], rng))


def check_signature(rule: AcceptanceRule) -> None:
    """ConfigError, naming the class, if ``rule`` cannot be called as ``rule(tree, logits, sampling, rng)``."""
    try:
        inspect.signature(rule.__call__).bind(None, None, None, None)
    except TypeError as err:
        raise ConfigError(f"acceptance rule {type(rule).__module__}.{type(rule).__qualname__}: __call__ must take "
                          f"(tree, logits, sampling, rng) and return an AcceptResult ({err})") from None
    except ValueError:  # no signature to read (a C callable): it is called as is
        pass


def checked_result(rule: AcceptanceRule, result, tree: DraftTree, vocab_size: int) -> AcceptResult:
    """``result``, what ``rule(tree, ...)`` returned, if the decode loop can commit it: an :class:`AcceptResult`
    whose ``accepted_nodes`` (a list of ints) are a path of ``tree`` from the root's child down, and whose
    ``tokens`` (a list of ints) are those nodes' tokens and one more id of the target's vocabulary. Else
    :class:`SpecDecError` naming the rule: a path that is not one compacted the cache to nodes that do not follow
    each other, tensors in the lists fed the drafter 0-d tensors, a missing extra token ran the cache past its end."""
    def fail(what: str) -> None:
        raise SpecDecError(f"acceptance rule {type(rule).__module__}.{type(rule).__qualname__} returned {what}; "
                           "return AcceptResult(accepted_nodes=[...], tokens=[...]): a path of the tree from the "
                           "root's child (lists of Python ints) and its tokens followed by one extra token")

    if not isinstance(result, AcceptResult):
        fail(f"a {type(result).__name__}")
    nodes, tokens = result.accepted_nodes, result.tokens
    if not isinstance(nodes, list) or not isinstance(tokens, list):
        fail(f"accepted_nodes of type {type(nodes).__name__} and tokens of type {type(tokens).__name__}")
    if len(tokens) != len(nodes) + 1:
        fail(f"{len(nodes)} accepted nodes and {len(tokens)} tokens (one more than the nodes: the extra token)")
    parents, ids, parent = tree.parents.tolist(), tree.tokens.tolist(), -1
    for i, node in enumerate(nodes):
        if type(node) is not int or not 0 <= node < len(ids) or parents[node] != parent:
            fail(f"accepted_nodes {nodes}, not a path of the tree (node {node!r} at position {i})")
        if type(tokens[i]) is not int or tokens[i] != ids[node]:
            fail(f"tokens {tokens} whose entry {i} ({tokens[i]!r}) is not node {node}'s token {ids[node]}")
        parent = node
    if type(tokens[-1]) is not int or not 0 <= tokens[-1] < vocab_size:
        fail(f"an extra token {tokens[-1]!r}, not an id of the target's vocabulary of {vocab_size}")
    return result


RULES = {"greedy": GreedyAcceptance, "rejection": RejectionAcceptance, "typical": TypicalAcceptance}


def get_rule(rule: str | AcceptanceRule, **kwargs) -> AcceptanceRule:
    """An :class:`AcceptanceRule` from its name (``greedy``, ``rejection``, ``typical``) or as given."""
    if isinstance(rule, AcceptanceRule):
        check_signature(rule)
        return rule
    if rule not in RULES:
        raise ConfigError(f"acceptance={rule!r} is unknown; choose one of {sorted(RULES)} or pass an AcceptanceRule")
    return RULES[rule](**kwargs)


__all__ = ["RULES", "AcceptanceRule", "GreedyAcceptance", "RejectionAcceptance", "TypicalAcceptance", "check_signature",
           "checked_result", "get_rule"]
