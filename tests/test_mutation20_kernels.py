"""Mutation pass 20: the tree-attention kernel's host side (``specdec_kernels.choices``' split count and default
launch choices, ``launch.FixedLaunch``'s alignment key, the layouts that ``rows`` and a plan keep launches for, the
split-K workspace and grid, the tune's sweep grid) and ``verifier.fused_projections``' refusals. None of these
tests launches a kernel (stand-ins record the launches). Each test names the planted bug it catches."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from specdec_kernels.choices import _config, _pick_num_splits, default_config
from specdec_kernels.launch import FixedLaunch
from tests.test_kernel_launch import _Jit

ta = importlib.import_module("specdec_kernels.tree_attention")  # the module, not the re-exported function

# --------------------------------------------------------------------------- choices: split count and defaults


def test_as_many_programs_as_sms_are_not_split():
    """A grid that already has one program per SM runs unsplit (planted bug: ``n_programs > num_sms`` splits a grid
    of exactly ``num_sms`` programs into ``programs_per_sm`` splits)."""
    assert _pick_num_splits(4, 1 << 20, 4, 2, 64, 4, 2, "up") == 1
    assert _pick_num_splits(132, 1 << 20, 4, 2, 64, 132, 4, "down") == 1


def test_the_split_workspace_traffic_bounds_the_split_count():
    """256 rows over a 1024-slot prefix in bf16: the fp32 partials of more than 2 splits would outweigh K/V (planted
    bug: the workspace bound dropped, 32 splits of two 16-slot tiles)."""
    assert _pick_num_splits(1, 1024, 256, 2, 16, 132, 1, "up") == 2


def test_the_split_count_is_capped_at_128():
    """One program on 132 SMs aiming at 4 programs each over a long prefix: at most 128 splits (planted bug: the cap
    raised to 256, past the merge kernel's width)."""
    assert _pick_num_splits(1, 1 << 24, 1, 2, 16, 132, 4, "up") == 128


@pytest.mark.parametrize("dtype, head_dim, rows, expected", [
    (torch.float32, 128, 16, (16, 32, 4, 2, 1)),
    (torch.float32, 256, 8, (16, 16, 4, 2, 1)),
    (torch.bfloat16, 128, 128, (128, 64, 8, 3, 1)),
    (torch.bfloat16, 128, 256, (128, 64, 8, 3, 2)),
    (torch.float16, 256, 64, (64, 32, 8, 3, 1)),
    (torch.bfloat16, 64, 32, (32, 64, 4, 3, 1)),
])
def test_default_launch_choices_at_their_boundaries(dtype, head_dim, rows, expected):
    """Every launch choice of :func:`default_config` where a comparison decides it (planted bugs: fp32's 32-slot
    tiles only below head dim 128; 8 warps only past 128 x 128 elements; two programs per SM for rows that exactly
    fill one M-block; fp32 with 3 stages and bf16 with 2)."""
    config = default_config(dtype, head_dim, rows)
    keys = ("block_m", "block_n", "num_warps", "num_stages", "programs_per_sm")
    assert tuple(config[key] for key in keys) == expected
    assert (config["merge"], config["split_rounding"]) == ("kernel", "up")


def test_overrides_win_over_the_defaults():
    """``config=`` replaces the defaults it names and keeps the others (planted bug: the merge order reversed, the
    defaults overwrite the caller's choices)."""
    config = _config(torch.float32, 64, 8, {"block_m": 32, "merge": "fused", "num_stages": 4})
    assert (config["block_m"], config["merge"], config["num_stages"]) == (32, "fused", 4)
    assert config["block_n"] == default_config(torch.float32, 64, 8)["block_n"]


# --------------------------------------------------------------------------- launch: the alignment key


class _TwoTensors(_Jit):
    arg_names = ("x_ptr", "y_ptr", "n", "BLOCK")


def test_a_pointer_8_bytes_off_alignment_goes_through_the_jit_again():
    """Triton specialises on 16-byte alignment: a view 8 bytes in is another kernel (planted bug: ``ALIGN = 8`` keeps
    the aligned kernel's launcher for it)."""
    fn, x = _Jit(), torch.zeros(64)
    launch = FixedLaunch(fn, (1,), {"BLOCK": 32, "EVEN": True})
    launch(x, 64, 1.0)
    launch(x[2:], 62, 1.0)  # 8 bytes in
    assert len(fn.jit_calls) == 2 and not fn.direct_calls


def test_every_tensor_arguments_alignment_is_checked():
    """A second tensor argument off alignment also goes through the JIT again (planted bug: only the first tensor's
    alignment kept in the key)."""
    fn, x, y = _TwoTensors(), torch.zeros(64), torch.zeros(64)
    launch = FixedLaunch(fn, (1,), {"BLOCK": 32})
    launch(x, y, 64)
    launch(x, y, 64)
    launch(x, y[1:], 63)
    assert len(fn.jit_calls) == 2 and len(fn.direct_calls) == 1


# --------------------------------------------------------------------------- kept launches: what a layout is


def _counting(calls: list):
    def make(*args, **kw):
        calls.append(args)
        return lambda q, *rest: torch.zeros_like(q)
    return make


def _qkv(b=1, hq=4, hkv=2, n=3, s=16, d=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, hq, n, d, generator=g), torch.randn(b, hkv, s, d, generator=g),
            torch.randn(b, hkv, s, d, generator=g))


def _other_strides(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values and shape with the last two dimensions laid out the other way round."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("which", ["k", "v"])
def test_the_rows_operator_keeps_one_launch_per_k_and_v_layout(monkeypatch, which):
    """A launch bakes in K's and V's strides: another layout of either gets its own launch (planted bugs: the key
    without ``v.stride()`` or without ``k.stride()``, the first layout's strides read for the second's tensor)."""
    from specdec_kernels import rows

    calls: list = []
    monkeypatch.setattr(rows, "_LAUNCHES", {})
    monkeypatch.setattr(rows, "rows_launch", _counting(calls))
    q, k, v = _qkv()
    prefix, bits = torch.tensor([5]), torch.tensor([1, 3, 5])
    rows.tree_attention_rows(q, k, v, prefix, bits, 0.25)
    rows.tree_attention_rows(q, k, v, prefix, bits, 0.25)
    other = (q, _other_strides(k), v) if which == "k" else (q, k, _other_strides(v))
    rows.tree_attention_rows(*other, prefix, bits, 0.25)
    assert len(calls) == 2


def test_a_plan_keeps_one_launch_per_v_layout(monkeypatch):
    """A plan's launch bakes in V's strides (planted bug: the key without ``v.stride()``)."""
    calls: list = []
    monkeypatch.setattr(ta, "_is_interpreted", lambda: True)
    monkeypatch.setattr(ta, "interpreter_problem", lambda: None)
    monkeypatch.setattr(ta, "_make_launch", _counting(calls))
    q, k, v = _qkv()
    plan = ta.TreeAttentionPlan(5, torch.ones(3, 3, dtype=torch.bool).tril())
    plan(q, k, v)
    plan(q, k, v)
    plan(q, k, _other_strides(v))
    assert len(calls) == 2


def test_a_full_tree_of_64_tokens_is_packed_for_the_kernel():
    """64 tree tokens fit the kernel's int64 rows; 65 take the SDPA path (planted bug: ``>=`` sends 64 to SDPA)."""
    from specdec_kernels.rows import packed_for

    assert packed_for(torch.ones(64, 64, dtype=torch.bool).tril()).shape == (64,)
    assert packed_for(torch.ones(65, 65, dtype=torch.bool).tril()) is None


# --------------------------------------------------------------------------- split-K workspace, grid, bounds


def test_an_equal_workspace_request_reuses_the_buffer():
    """A request of the buffer's own size takes its front again (planted bug: ``<=`` replaces the buffer at every
    equal request, retiring one per plan)."""
    device = torch.device("cpu")
    ta._WORKSPACES.pop((device, torch.float64), None)
    retired = len(ta._RETIRED)
    first = ta._workspace(device, 24, torch.float64)
    again = ta._workspace(device, 24, torch.float64)
    assert again.data_ptr() == first.data_ptr() and len(ta._RETIRED) == retired
    ta._WORKSPACES.pop((device, torch.float64), None)


def _make(monkeypatch, num_splits, b=2, merge="kernel"):
    asked: list = []

    def workspace(device, numel, dtype=torch.float32):
        asked.append((numel, dtype))
        return torch.zeros(numel, dtype=dtype)

    monkeypatch.setattr(ta, "_workspace", workspace)
    q, k, v = _qkv(b=b, hq=4, hkv=2, n=4, s=64, d=32)  # G * N = 8 rows: one M-block of 16
    config = _config(torch.float32, 32, 8, {"merge": merge})
    bits = torch.tensor([1, 3, 7, 15])
    launch = ta._make_launch(q, k, v, b, 4, 2, 4, 32, 40, bits, 44, 0.2, num_splits, config)
    return launch, asked


def test_the_split_workspace_holds_every_batch_rows_partials(monkeypatch):
    """Partials for B * Hkv * splits * m_pad rows of BLOCK_D + 2 values (planted bug: the batch left out, rows of
    different batch entries overwrite each other's partials)."""
    _, asked = _make(monkeypatch, num_splits=3)
    assert asked == [(2 * 2 * 3 * 16 * (32 + 2), torch.float32)]
    _, asked = _make(monkeypatch, num_splits=3, merge="fused")
    assert asked[1] == (2 * 2 * 1, torch.int32)  # one arrival count per (batch, KV head, M-block)


def test_a_zero_split_count_launches_one_split(monkeypatch):
    """``num_splits=0`` runs unsplit, not an empty grid (planted bug: ``max(1, ...)`` dropped)."""
    launch, asked = _make(monkeypatch, num_splits=0)
    assert launch.kernels[0].grid == (1, 2 * 2, 1) and not asked


def test_a_negative_prefix_is_refused():
    """``prefix_len = -1`` would read the slot before the cache (planted bug: ``lo < -1``)."""
    q, k, v = _qkv()
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    for prefix in (-1, torch.tensor([-1])):
        with pytest.raises(ValueError, match="prefix_len must be >= 0, got -1"):
            ta.tree_attention_ref(q, k, v, prefix, mask)


# --------------------------------------------------------------------------- the tune's sweep


def test_parsing_a_grid_leaves_the_default_grid_alone():
    """``--grid`` replaces axes in a copy (planted bug: ``grid = GRID`` rewrites the module's default sweep)."""
    from specdec_kernels.tune import GRID, parse_grid

    before = dict(GRID)
    parse_grid(["num_stages=3", "merge=kernel,fused"])
    assert GRID == before


def test_the_sweep_adds_one_m_block_variants_only_where_the_rows_need_more():
    """16 tree rows fill one default M-block: no one-M-block variants; 2048 rows add a 256-row M-block with 8 and 16
    warps for each 8-warp configuration only (planted bugs: ``>=`` adds variants for 16 rows; every configuration
    doubled, 4-warp ones included)."""
    from specdec_kernels.tune import configs, parse_args

    args = parse_args(["--hkv", "32", "--ns", "16"])
    plain = configs(args, hkv=32, n=16)
    assert len(plain) == 2 * 3 * 2 * 4 and {c["block_m"] for c in plain} == {16}
    wide = [c for c in configs(parse_args(["--hkv", "1"]), hkv=1, n=64) if c["block_m"] == 256]
    assert len(wide) == 2 * 3 * 1 * 4 * 2 and {c["num_warps"] for c in wide} == {8, 16}


def test_the_percent_of_peak_bandwidth():
    """1 GB in 1 ms is 1000 GB/s: 50% of a 2000 GB/s peak (planted bug: ``/ 1e6`` for GB)."""
    from specdec_kernels.tune import _pct

    assert _pct(10**9, 1000.0, 2000.0) == pytest.approx(50.0)


# --------------------------------------------------------------------------- fused projections: what is not fused


def _attention(*linears) -> nn.Module:
    layer = nn.Module()
    layer.self_attn = nn.Module()
    for name, linear in zip(("q_proj", "k_proj", "v_proj"), linears):
        setattr(layer.self_attn, name, linear)
    return layer


def test_linears_of_different_input_widths_are_left_unfused():
    """q/k/v reading inputs of different widths are not one product (planted bug: the width check dropped, the
    concatenation fails)."""
    from verifier.fused_projections import fuse_projections

    layer = _attention(nn.Linear(6, 4), nn.Linear(5, 2), nn.Linear(6, 2))
    assert fuse_projections(layer) == 0
    assert all(type(getattr(layer.self_attn, n)) is nn.Linear for n in ("q_proj", "k_proj", "v_proj"))


def test_a_group_with_a_module_that_is_not_a_linear_is_left_unfused():
    """An MLP whose ``up_proj`` is another module (or missing) is left as it is (planted bug: ``any`` for ``all``,
    fusing reads a missing linear's weight)."""
    from verifier.fused_projections import fuse_projections

    layer = nn.Module()
    layer.mlp = nn.Module()
    layer.mlp.gate_proj, layer.mlp.up_proj = nn.Linear(6, 4), nn.Identity()
    assert fuse_projections(layer) == 0 and type(layer.mlp.gate_proj) is nn.Linear
    assert fuse_projections(_attention(nn.Linear(6, 4), nn.Linear(6, 2))) == 0  # no v_proj

