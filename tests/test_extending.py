"""What a researcher meets when adding a drafter or an acceptance rule of their own (README, "Adding a drafter").

Their mistakes are their input: each is one error naming their class (at the command line one ``error:`` line,
exit 2, before any model loads where the config alone shows it), never a traceback blamed on the framework,
and never a silent wrong result (a subclass of a built-in rule run as the built-in in batches).
"""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from drafters import NoDrafter
from specdec import SamplingParams, SpecDecError, SpeculativeDecoder
from specdec.acceptance import AcceptanceRule, GreedyAcceptance, RejectionAcceptance
from specdec.batch_drafting import BatchDrafter, PerRowDrafters
from specdec.drafting import Drafter
from specdec.errors import ConfigError
from specdec.types import AcceptResult, DraftTree
from tests.tiny_models import pair

PROMPTS = [torch.tensor([[3, 4, 5, 3, 4]]), torch.tensor([[7, 8, 9]])]


class Repeat(Drafter):
    """Proposes the last ``num_speculative_tokens`` committed tokens again (deterministic)."""

    def __init__(self, num_speculative_tokens: int = 3):
        super().__init__()
        self.k = num_speculative_tokens

    @property
    def max_nodes(self) -> int:
        return self.k

    def propose(self, max_depth: int) -> DraftTree:
        return DraftTree.chain(self.last(max_depth))  # a list: chain() takes it

    def last(self, max_depth: int) -> list[int]:
        return self.tokens[len(self.tokens) - min(self.k, max_depth, len(self.tokens)):]


class ReturnsList(Repeat):
    def propose(self, max_depth):
        return self.tokens[-2:]


class OtherDepthName(Repeat):
    def propose(self, depth):  # the decode loop calls propose(max_depth=...)
        return DraftTree.empty()


class PastTheVocabulary(Repeat):
    def propose(self, max_depth):
        return DraftTree.chain([5, 257])  # the tiny target has ids 0..256


class WantsMore(Repeat):
    def propose(self, max_depth, temperature):  # takes max_depth, but wants an argument the loop does not pass
        return DraftTree.empty()


def test_a_propose_that_wants_another_argument_is_not_told_to_rename_max_depth():
    decoder = SpeculativeDecoder(pair("llama")[0], WantsMore())
    with pytest.raises(TypeError, match="temperature"):
        decoder.generate(PROMPTS[0], max_new_tokens=4)


class IgnoresDepth(Repeat):
    def propose(self, max_depth):
        return DraftTree.chain((self.tokens * 8)[-self.k:])  # k deep whatever the tokens left


class ClaimsTooFew(Repeat):
    @property
    def max_nodes(self) -> int:
        return 1


class NodesAsMethod(Repeat):
    def max_nodes(self):  # no @property
        return self.k


class FloatTokens(Repeat):
    def propose(self, max_depth):
        return DraftTree(tokens=torch.tensor([3.7]), parents=torch.tensor([-1]))


class ProbsOverSeven(Repeat):
    def propose(self, max_depth):
        tokens = self.last(max_depth)
        return DraftTree.chain(tokens, torch.full((len(tokens), 7), 1 / 7))


class ProbsOff(Repeat):
    """``draft_probs`` of the right shape that are not what the tokens were drawn from (``how``)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def propose(self, max_depth):
        tokens = self.last(max_depth)
        q = torch.full((len(tokens), 257), 1 / 257)  # [N, V]
        if self.how == "zero_at_drawn":  # every draft would be accepted: u * 0 < p
            q[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)] = 0
            q /= q.sum(-1, keepdim=True)
        elif self.how == "scaled":
            q *= 5
        elif self.how == "nan":
            q[:, 3] = float("nan")
        else:  # a negative entry, the row still summing to 1
            q[:, 3], q[:, 4] = -0.5, q[:, 4] + 0.5
        return DraftTree.chain(tokens, q)


BAD_PROBS = [
    (ProbsOff("zero_at_drawn"), r"proposed token \d+ at node 0 with draft probability 0; a sampled node's token must"),
    (ProbsOff("scaled"), r"returned draft_probs whose row 0 sums to 5; each row must be the distribution"),
    (ProbsOff("nan"), r"returned draft_probs whose row 0 sums to nan"),
    (ProbsOff("negative"), r"returned draft_probs whose row 0 has a negative entry \(-0.5\)"),
]


class NoPropose(Drafter):
    def __init__(self, num_speculative_tokens: int = 3):
        super().__init__()


class AcceptAlways(RejectionAcceptance):
    """A lossy change of a lossless rule: every draft is accepted."""

    def accepts(self, u, px, qx):
        return True


class TopM(AcceptanceRule):
    def __init__(self, m: int = 2, strict: bool = False):
        self.m, self.strict = m, strict

    def __call__(self, tree, logits, sampling, rng):
        return AcceptResult(accepted_nodes=[], tokens=[int(logits[0].argmax())])


class Garbled(GreedyAcceptance):
    """The greedy rule's result made into what a rule's author might return by mistake (``how``)."""

    def __init__(self, how: str):
        self.how = how

    def __call__(self, tree, logits, sampling, rng):
        nodes, tokens = (r := super().__call__(tree, logits, sampling, rng)).accepted_nodes, r.tokens
        first, extra = int(tree.tokens[0]), tokens[-1]
        return {"tuple": lambda: (nodes, tokens),
                "tensors": lambda: AcceptResult(torch.tensor(nodes), torch.tensor(tokens)),
                "no_extra": lambda: AcceptResult(nodes, tokens[:-1]),
                "not_a_path": lambda: AcceptResult([1], [int(tree.tokens[1]), extra]),  # node 1 hangs off node 0
                "wrong_token": lambda: AcceptResult([0], [(first + 1) % 257, extra]),
                "extra_outside": lambda: AcceptResult([], [257])}[self.how]()


class TwoArguments(AcceptanceRule):
    def __call__(self, tree, logits):
        raise AssertionError("never called")


def test_a_rule_of_ones_own_is_named_by_its_class_and_lossless_only_where_it_says_so():
    assert (TopM.name, TopM.lossless) == ("TopM", False)
    assert (AcceptAlways.name, AcceptAlways.lossless) == ("AcceptAlways", False)  # not inherited from rejection
    assert (RejectionAcceptance.name, RejectionAcceptance.lossless) == ("rejection", True)
    assert (GreedyAcceptance.name, GreedyAcceptance.lossless) == ("greedy", True)

    class Declared(RejectionAcceptance):
        name, lossless = "rejection_v2", True

    assert (Declared.name, Declared.lossless) == ("rejection_v2", True)


def test_a_subclass_of_a_built_in_rule_is_not_batched_as_the_built_in():
    """Batches chose the tensorized rule by name: a subclass ran as its base there, its override ignored."""
    target = pair("llama")[0]
    sampling = SamplingParams(temperature=1.0)
    plain = SpeculativeDecoder(target, Repeat(), acceptance=RejectionAcceptance(), sampling=sampling)
    assert len(plain.generate_batch(PROMPTS, max_new_tokens=6).sequences) == 2  # the built-in has a batched form
    changed = SpeculativeDecoder(target, Repeat(), acceptance=AcceptAlways(), sampling=sampling)
    with pytest.raises(SpecDecError, match=r"AcceptAlways \('AcceptAlways'\) has no batched form.*batch_size=1"):
        changed.generate_batch(PROMPTS, max_new_tokens=6)
    assert changed.generate(PROMPTS[0], max_new_tokens=6, seed=0).stats.target_forwards >= 1  # batch 1 runs it
    from drafters import NoDrafter

    with pytest.raises(SpecDecError, match="has no batched form.*batch_size=1 and compile=none"):  # when built
        SpeculativeDecoder(target, NoDrafter(), acceptance=AcceptAlways(), sampling=sampling, compile="static")


@pytest.mark.parametrize(("how", "fragment"), [
    ("tuple", r"returned a tuple; return AcceptResult\(accepted_nodes=\[...\], tokens=\[...\]\)"),
    ("tensors", r"returned accepted_nodes of type Tensor and tokens of type Tensor"),
    ("no_extra", r"returned (\d+) accepted nodes and \1 tokens \(one more than the nodes: the extra token\)"),
    ("not_a_path", r"returned accepted_nodes \[1\], not a path of the tree \(node 1 at position 0\)"),
    ("wrong_token", r"returned tokens \[\d+, \d+\] whose entry 0 \(\d+\) is not node 0's token"),
    ("extra_outside", r"returned an extra token 257, not an id of the target's vocabulary of 257"),
])
def test_what_a_rule_returns_is_checked_and_named(how, fragment):
    """A rule's result the loop cannot commit is its author's error, named, not a wrong cache (a path that is not
    one), a drafter fed 0-d tensors, a cache overflow blaming max_new_tokens, or an AttributeError of ours."""
    decoder = SpeculativeDecoder(pair("llama")[0], Repeat(), acceptance=Garbled(how))
    with pytest.raises(SpecDecError, match=r"acceptance rule tests.test_extending.Garbled " + fragment):
        decoder.generate(PROMPTS[0], max_new_tokens=6, seed=0)


def test_a_rule_that_cannot_be_called_as_rules_are_is_refused_when_built():
    with pytest.raises(ConfigError, match=r"TwoArguments: __call__ must take \(tree, logits, sampling, rng\)"):
        SpeculativeDecoder(pair("llama")[0], NoDrafter(), acceptance=TwoArguments())


@pytest.mark.parametrize("batch", [False, True], ids=["batch1", "batch2"])
@pytest.mark.parametrize(("drafter", "fragment"), [
    (ReturnsList(), r"ReturnsList: propose\(\) returned a list; return a specdec.types.DraftTree"),
    (ClaimsTooFew(), r"ClaimsTooFew: propose\(\) returned 3 nodes but its max_nodes is 1"),
    (NodesAsMethod(), r"NodesAsMethod: max_nodes is a method; it must be an int >= 0, .*\(define it with @property"),
    (FloatTokens(), r"FloatTokens: propose\(\) returned tokens of dtype torch.float32; token ids must be integers"),
    (ProbsOverSeven(), r"ProbsOverSeven: propose\(\) returned draft_probs of shape \(3, 7\); expected \[3, 257\]"),
    (OtherDepthName(), r"OtherDepthName: propose\(\) takes no keyword max_depth"),
    (IgnoresDepth(8), r"IgnoresDepth: propose\(max_depth=5\) returned a tree 8 levels deep; propose at most max_depth"),
    (PastTheVocabulary(), (r"PastTheVocabulary: propose\(\) returned token id 257, outside the target's vocabulary "
                           r"of 257 ids \(0 to 256\)")),
    *[(drafter, r"ProbsOff: propose\(\) " + fragment) for drafter, fragment in BAD_PROBS],
], ids=["not_a_tree", "too_many_nodes", "nodes_method", "float_tokens", "wrong_vocabulary", "depth_name", "too_deep",
        "token_ids", "zero_at_drawn", "scaled_probs", "nan_probs", "negative_probs"])
def test_what_a_drafter_proposes_is_checked_and_named(drafter, fragment, batch):
    decoder = SpeculativeDecoder(pair("llama")[0], drafter, acceptance="rejection",
                                 sampling=SamplingParams(temperature=1.0))
    with pytest.raises(SpecDecError, match=fragment):
        if batch:
            decoder.generate_batch(PROMPTS, max_new_tokens=6)
        else:
            decoder.generate(PROMPTS[0], max_new_tokens=6, seed=0)


class NativeBatch(BatchDrafter):
    """A drafter's own batching (README, "Adding a drafter", step 5), here the rows' copies called directly: what
    they propose is not checked on the way, as a batch drafter's own forwards would not check it."""

    def __init__(self, drafter: Drafter, rows_wrong: int = 0):
        self.rows, self.rows_wrong = PerRowDrafters(drafter), rows_wrong

    def start(self, ctx):
        self.rows.start(ctx)

    def extend(self, prompts, target_hidden):
        self.rows.extend(prompts, target_hidden)

    def propose(self, max_depths):
        trees = [d.propose(max_depth=m) for d, m in zip(self.rows.rows, max_depths)]
        return trees[: len(trees) - self.rows_wrong]

    def commit(self, results, verify):
        self.rows.commit(results, verify)

    def select_rows(self, rows):
        self.rows.select_rows(rows)


@pytest.mark.parametrize(("drafter", "rows_wrong", "fragment"), [
    (IgnoresDepth(8), 0, r"NativeBatch: propose\(max_depths\)\[row 0\] \(max_depth 5\) returned a tree 8 levels deep"),
    (ClaimsTooFew(), 0, r"NativeBatch: propose\(max_depths\)\[row 0\] returned 3 nodes but its max_nodes is 1"),
    (PastTheVocabulary(), 0, r"NativeBatch: propose\(max_depths\)\[row 0\] returned token id 257, outside the target"),
    (ProbsOverSeven(), 0, r"NativeBatch: propose\(max_depths\)\[row 0\] returned draft_probs of shape \(3, 7\)"),
    (Repeat(), 1, r"NativeBatch: propose\(max_depths\) returned 1 trees for 2 active rows; return a list of one"),
    *[(drafter, 0, r"NativeBatch: propose\(max_depths\)\[row 0\] " + fragment) for drafter, fragment in BAD_PROBS],
], ids=["too_deep", "too_many_nodes", "token_ids", "wrong_vocabulary", "rows", "zero_at_drawn", "scaled_probs",
        "nan_probs", "negative_probs"])
def test_what_a_batch_drafter_of_ones_own_proposes_is_checked_and_named(drafter, rows_wrong, fragment, monkeypatch):
    monkeypatch.setattr(type(drafter), "batched", lambda self: NativeBatch(self, rows_wrong))
    decoder = SpeculativeDecoder(pair("llama")[0], drafter)
    with pytest.raises(SpecDecError, match=fragment):
        decoder.generate_batch(PROMPTS, max_new_tokens=6)


def test_the_rows_token_ids_are_checked_at_once_and_the_bad_row_named():
    from specdec.drafting import checked_row_proposals

    good = [DraftTree.chain([1, 2]), DraftTree.empty(), DraftTree.chain([256])]
    assert checked_row_proposals(Repeat(), good, [3, 0, 1], 3, 257) == good
    with pytest.raises(SpecDecError, match=r"Repeat: propose\(max_depths\)\[row 2\] returned token id 300"):
        checked_row_proposals(Repeat(), [*good[:2], DraftTree.chain([3, 300])], [3, 0, 3], 3, 257)


def test_a_batch_drafter_of_ones_own_that_proposes_well_decodes_as_batch_1(monkeypatch):
    monkeypatch.setattr(Repeat, "batched", lambda self: NativeBatch(self))
    decoder = SpeculativeDecoder(pair("llama")[0], Repeat())
    batched = decoder.generate_batch(PROMPTS, max_new_tokens=8).sequences
    assert all(torch.equal(b, decoder.generate(p, max_new_tokens=8).sequences) for b, p in zip(batched, PROMPTS))


def test_a_chain_of_a_list_equals_the_chain_of_its_tensor():
    drafted = SpeculativeDecoder(pair("llama")[0], Repeat()).generate(PROMPTS[0], max_new_tokens=8)
    plain = SpeculativeDecoder(pair("llama")[0], NoDrafter()).generate(PROMPTS[0], max_new_tokens=8)
    assert torch.equal(drafted.sequences, plain.sequences)
    assert torch.equal(DraftTree.chain([5, 6]).tokens, DraftTree.chain(torch.tensor([5, 6])).tokens)
    assert DraftTree.chain([]).num_nodes == 0
    with pytest.raises(SpecDecError, match=r"DraftTree.chain: tokens of dtype torch.float32; token ids must be int"):
        DraftTree.chain([3.7, 4.0])  # not truncated to 3


HERE = "tests.test_extending"


@pytest.mark.parametrize(("files", "overrides", "fragment"), [
    ({"drafter/mine.yaml": f"_target_: {HERE}.Repeat\nnum_speculative_token: 2\n"}, ["drafter=mine"],
     (f"drafter.num_speculative_token: {HERE}.Repeat takes no argument 'num_speculative_token'; "
     "did you mean drafter.num_speculative_tokens?")),
    ({"drafter/mine.yaml": f"_target_: {HERE}.Repaet\n"}, ["drafter=mine"],
     f"cannot import _target_ '{HERE}.Repaet'; did you mean '{HERE}.Repeat'?"),
    ({"drafter/mine.yaml": f"_target_: {HERE}.NoPropose\n"}, ["drafter=mine"],
     f"drafter: {HERE}.NoPropose does not implement propose"),
    ({"acceptance/mine.yaml": f"_target_: {HERE}.TopM\nmm: 2\n"}, ["acceptance=mine"],
     f"acceptance.mm: {HERE}.TopM takes no argument 'mm'; did you mean acceptance.m?"),
    ({"acceptance/mine.yaml": f"_target_: {HERE}.TwoArguments\n"}, ["acceptance=mine"],
     "TwoArguments: __call__ must take (tree, logits, sampling, rng)"),
    ({"acceptance/mine.yaml": f"_target_: {HERE}.TopM\n"}, ["acceptance=mine", "batch_size=2"],
     "TopM ('TopM') has no batched form"),
    ({"acceptance/mine.yaml": f"_target_: {HERE}.TopM\n"}, ["acceptance=mine", "compile=static"],
     ("TopM ('TopM') has no batched form, which batches and the fixed-shape step need (only the built-in greedy, "
      "rejection and typical have one); decode with batch_size=1 and compile=none")),
    ({"logger/mine.yaml": "_target_: experiments.loggers.WandbLogger\nprojct: x\n"}, ["logger=mine"],
     "logger.projct: experiments.loggers.WandbLogger takes no argument 'projct'; did you mean logger.project?"),
    ({"drafter/mine.yaml": f"_target_: {HERE}.Repeat\nnum_speculative_tokens: two\n"}, ["drafter=mine"],
     "drafter.num_speculative_tokens='two': give an integer (Repeat's num_speculative_tokens is annotated int)"),
    ({"acceptance/mine.yaml": f"_target_: {HERE}.TopM\nm: 2\nstrict: nope\n"}, ["acceptance=mine"],
     "acceptance.strict='nope': give true or false (TopM's strict is annotated bool)"),
], ids=["argument_typo", "target_typo", "abstract", "rule_argument_typo", "rule_signature", "rule_in_a_batch",
        "rule_compiled", "logger_argument_typo", "argument_type", "rule_argument_type"])
def test_a_config_file_of_ones_own_fails_before_any_model_loads(files, overrides, fragment, tmp_path, monkeypatch,
                                                                 capsys):
    """The mistakes a config file alone shows are one line before the models load (on a fresh machine, before the
    default pair's ~20-minute build), and Hydra's own log of a failed import is not printed beside it."""
    import experiments.decode
    from tests.test_cli_contract import error_line, main_in_process

    for name, text in files.items():
        (tmp_path / "conf" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "conf" / name).write_text(text)

    def no_loading(*args, **kwargs):
        raise AssertionError("models were loaded before the config was checked")

    monkeypatch.setattr(experiments.decode, "load_models", no_loading)
    out: list[str] = []
    code, err = main_in_process(monkeypatch, capsys, "experiment=smoke", *overrides, "num_prompts=1", "warmup=0",
                                "costs=false", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                                f"hydra.run.dir={tmp_path / 'run'}", stdout=out)
    error_line(err, 2, code, fragment)
    assert "ERROR" not in out[0] + err, out[0][-2000:]


def test_a_hybrid_parts_arguments_are_checked_too():
    from omegaconf import OmegaConf

    from experiments.instantiate import check_arguments

    node = OmegaConf.create({"_target_": "drafters.HybridDrafter", "min_drafts": 1,
                             "first": {"_target_": "drafters.NGramDrafter", "max_ngramm": 3},
                             "second": {"_target_": "drafters.NGramDrafter"}})
    with pytest.raises(ConfigError, match=r"drafter.first.max_ngramm: .*did you mean drafter.first.max_ngram\?"):
        check_arguments(node, "drafter")
    check_arguments(OmegaConf.create({"_target_": f"{HERE}.Anything", "whatever": 1}), "drafter")  # **kwargs


class Anything(Repeat):
    def __init__(self, **kwargs):
        super().__init__()


def test_a_process_that_finds_the_pair_being_built_says_so_and_waits(tmp_path, capsys):
    """A second command used to wait for the first one's 20-minute build of the embedded pair in silence."""
    from experiments.zoo import cache

    entered = threading.Event()

    def second():
        with cache.entry_lock(tmp_path, "default"):
            entered.set()

    with cache.entry_lock(tmp_path, "default"):  # this process is building it
        waiter = threading.Thread(target=second)
        waiter.start()
        deadline, said = time.monotonic() + 30, ""
        while "waiting for" not in said and time.monotonic() < deadline:
            time.sleep(0.05)
            said += capsys.readouterr().err
        assert not entered.is_set()
    waiter.join(timeout=30)
    assert entered.is_set()
    assert f"waiting for {tmp_path / 'default'}: another process (pid {os.getpid()}) is building it" in said
