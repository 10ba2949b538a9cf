"""The tree-attention kernel's host side: the packed tree mask, plans (one per verify step, shared by the layers),
and what the fixed-shape step's operator (``specdec::tree_attention_rows``) keys its kept launches on.

Runs on the GPU when CUDA is available, otherwise on the CPU under the Triton interpreter (set here, before the
kernels are imported; where triton was imported first, the file reruns in a fresh process).
"""
import importlib
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit runs, i.e. at triton's import

import pytest

ta = importlib.import_module("specdec_kernels.tree_attention")  # the module, not the re-exported function
from specdec_kernels import pack_tree_mask, tree_attention_ref
from tests.test_kernel_tree_attention import make_inputs, random_parents, tree_mask_from_parents
from tests.triton_env import DEVICE, fresh_process_test, interpreter_guard

_needs_interpreter = interpreter_guard()
test_file_in_fresh_process = fresh_process_test(__file__)


def test_the_rows_operator_applies_each_calls_own_softmax_scale(monkeypatch):
    """The operator keeps one launch per input layout; two models (or attention layers) of one layout with
    different softmax scales must each get their own scale, not the first caller's kept one."""
    from specdec_kernels import rows

    monkeypatch.setattr(rows, "_LAUNCHES", {})
    mask = tree_mask_from_parents([-1, 0, 0, 1])  # [4, 4]
    q, k, v = make_inputs(3, 2, 4, 2, 4, [20, 9], 32, 32, torch.float32)  # q [2, 4, 4, 32], k/v [2, 2, 32, 32]
    prefix = torch.tensor([20, 9], device=DEVICE)  # [2]
    bits = pack_tree_mask(mask)  # [4]
    for scale in (0.2, 0.05, 0.2):  # the same layout each time
        out = rows.tree_attention_rows(q, k, v, prefix, bits, scale)  # [2, 4, 4, 32]
        torch.testing.assert_close(out, tree_attention_ref(q, k, v, prefix, mask, scale), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad", ["short", "long"])
def test_rows_launch_refuses_a_packed_tree_of_the_wrong_size(bad):
    """``rows_launch`` takes the tree packed (``[N]`` int64); a packed mask of another tree size would make the
    kernel read past it or leave tree tokens unmasked, so it is refused up front with the sizes named."""
    from specdec_kernels.tree_attention import rows_launch

    q, k, v = make_inputs(1, 1, 4, 2, 4, [10], 32, 32, torch.float32)  # q [1, 4, 4, 32]
    size = 3 if bad == "short" else 5
    bits = pack_tree_mask(tree_mask_from_parents(list(range(-1, size - 1))))  # [size]
    with pytest.raises(ValueError, match=r"packed mask of shape \[4\]"):
        rows_launch(q, k, v, torch.tensor([10], device=DEVICE), bits, 0.2)


def test_a_plan_applies_each_calls_own_softmax_scale():
    """A :class:`TreeAttentionPlan` keeps one launch per input layout; a call of the same layout with another
    ``sm_scale`` (a second model sharing the step's tree) must use that scale."""
    from specdec_kernels import TreeAttentionPlan

    mask = tree_mask_from_parents([-1, 0, 1, 1])  # [4, 4]
    q, k, v = make_inputs(5, 1, 4, 2, 4, [12], 24, 32, torch.float32)  # q [1, 4, 4, 32], k/v [1, 2, 24, 32]
    plan = TreeAttentionPlan(12, mask)
    for scale in (None, 0.05, 0.3):  # None: 1 / sqrt(D)
        torch.testing.assert_close(plan(q, k, v, scale), tree_attention_ref(q, k, v, 12, mask, scale),
                                   atol=2e-5, rtol=2e-5)


def test_a_misspelt_launch_choice_is_refused_not_ignored():
    """``config=`` overrides launch choices by name; a key that is not one of them (a typo) must fail, naming the
    known keys, rather than silently running the defaults the caller meant to change."""
    from specdec_kernels import TreeAttentionPlan

    q, k, v = make_inputs(0, 1, 4, 2, 4, [8], 16, 32, torch.float32)  # q [1, 4, 4, 32]
    plan = TreeAttentionPlan(8, tree_mask_from_parents([-1, 0, 1, 2]), config={"blockm": 32})
    with pytest.raises(ValueError, match=r"unknown config keys \['blockm'\].*block_m"):
        plan(q, k, v)


@pytest.mark.parametrize("prefix", [True, 3.0])
def test_a_prefix_length_must_be_an_integer(prefix):
    """``prefix_len`` is a slot count: a bool (an int subclass, easily passed by mistake) or a float is refused by
    the kernel and the reference alike instead of being read as 1 or truncated."""
    from specdec_kernels import tree_attention

    q, k, v = make_inputs(0, 1, 4, 2, 4, [8], 16, 32, torch.float32)  # q [1, 4, 4, 32]
    mask = tree_mask_from_parents([-1, 0, 1, 2])
    for fn in (tree_attention, tree_attention_ref):
        with pytest.raises(ValueError, match="prefix_len must be an int"):
            fn(q, k, v, prefix, mask)


def test_a_zero_dim_tensor_prefix_is_one_prefix_for_every_row():
    """A 0-dim int tensor prefix (``cache.get_seq_length()`` as a tensor) means the same prefix for every row, as
    the python int does; it is not a malformed per-row ``[B]`` prefix."""
    from specdec_kernels import tree_attention

    q, k, v = make_inputs(2, 2, 4, 2, 4, [8, 8], 16, 32, torch.float32)  # q [2, 4, 4, 32], k/v [2, 2, 16, 32]
    mask = tree_mask_from_parents([-1, 0, 0, 2])
    for fn in (tree_attention, tree_attention_ref):
        torch.testing.assert_close(fn(q, k, v, torch.tensor(8, device=DEVICE), mask),
                                   tree_attention_ref(q, k, v, 8, mask), atol=2e-5, rtol=2e-5)


def test_the_tune_sweep_takes_positive_axes_and_heads_that_group():
    """``specdec_kernels.tune``: a grid axis of counts takes positive integers only (0 stages or warps is no
    launch), every ``--hkv`` must divide ``--hq`` (not only one of them), and the configurations it times carry
    the grid's values (not the defaults'), with the one-M-block variants capped at the kernel's 256 rows."""
    from specdec_kernels.tune import configs, parse_args, parse_grid

    with pytest.raises(ValueError, match="positive integers"):
        parse_grid(["num_stages=0"])
    with pytest.raises(SystemExit):
        parse_args(["--hkv", "8", "5"])  # 32 query heads: 8 groups, but not 5
    args = parse_args(["--grid", "num_stages=4", "programs_per_sm=3", "--hkv", "1", "--ns", "64"])
    grid = configs(args, hkv=1, n=64)  # 32 * 64 tree rows: more than one default M-block
    assert grid and all(c["num_stages"] == 4 and c["programs_per_sm"] == 3 for c in grid)
    assert max(c["block_m"] for c in grid) == 256


# ------------------------------------------------------------------ plans: one per verify step


def test_packed_mask_bits():
    """Bit j of row i is mask[i, j], bit 63 included (it lands on the sign bit)."""
    rng = random.Random(5)
    mask = tree_mask_from_parents(random_parents(rng, 64))
    bits = ta.pack_tree_mask(mask).cpu().tolist()  # [64]
    for i, row in enumerate(mask.cpu().tolist()):
        assert [(bits[i] >> j) & 1 for j in range(64)] == [int(x) for x in row]


def test_plan_is_shared_by_layers_and_validates_once(monkeypatch):
    """A plan validates each input layout once; further calls (the other layers) only launch."""
    rng = random.Random(8)
    N, P = 6, 90
    mask = tree_mask_from_parents(random_parents(rng, N))
    plan = ta.TreeAttentionPlan(P, mask)
    layers = [make_inputs(seed, 1, 4, 2, N, [P], P + N + 4, 64, torch.float32) for seed in range(3)]
    refs = [tree_attention_ref(q, k, v, P, mask) for q, k, v in layers]  # [1, 4, N, 64] each
    torch.testing.assert_close(plan(*layers[0]), refs[0], atol=2e-5, rtol=2e-5)

    def no_more_checks(*args):
        raise AssertionError("validated again for a layout already seen")

    monkeypatch.setattr(ta, "_check_inputs", no_more_checks)
    bits = plan.bits
    for (q, k, v), ref in zip(layers[1:], refs[1:]):  # same layout, other values: no validation, same mask
        torch.testing.assert_close(plan(q, k, v), ref, atol=2e-5, rtol=2e-5)
    assert plan.bits is bits and len(plan._launches) == 1


def test_a_plan_that_reuses_its_output_writes_one_tensor_per_layout():
    """``reuse_output`` (the verifier's plans: a layer consumes its output before the next layer's call): every
    call of a layout returns the same tensor, rewritten with that call's values; a new layout gets its own, and a
    plan without it allocates per call."""
    rng = random.Random(9)
    N, P = 5, 70
    mask = tree_mask_from_parents(random_parents(rng, N))
    plan = ta.TreeAttentionPlan(P, mask, reuse_output=True)
    outs = []
    for seed in range(3):
        q, k, v = make_inputs(seed, 1, 4, 2, N, [P], P + N + 4, 64, torch.float32)
        out = plan(q, k, v)
        torch.testing.assert_close(out, tree_attention_ref(q, k, v, P, mask), atol=2e-5, rtol=2e-5)
        outs.append(out)
    assert outs[0] is outs[1] is outs[2]
    other = plan(*make_inputs(3, 2, 4, 2, N, [P, P], P + N + 4, 64, torch.float32))  # batch 2: another layout
    assert other.data_ptr() != outs[0].data_ptr()
    fresh = ta.TreeAttentionPlan(P, mask)
    q, k, v = make_inputs(0, 1, 4, 2, N, [P], P + N + 4, 64, torch.float32)
    assert fresh(q, k, v) is not fresh(q, k, v)
