"""Edges of naming a broken safetensors file (specdec.checkpoints.safetensors_problem, find_broken_file): a file
cut by one byte inside its last tensor, a header that is JSON but not an object, a file of exactly the 8-byte length
and nothing after it, and a sharded checkpoint whose second shard is the broken one."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from specdec.checkpoints import find_broken_file, safetensors_problem


def _whole(path) -> int:
    """Write a safetensors file of two tensors at ``path``; its size in bytes."""
    save_file({"a.weight": torch.ones(4, 3), "b.weight": torch.arange(10.0)}, str(path))
    return path.stat().st_size


def test_a_file_cut_by_one_byte_inside_its_last_tensor_is_truncated(tmp_path):
    """One byte missing from the end of the data (inside the last tensor, well past where it starts) is named with
    the bytes the tensors need; the whole file passes."""
    path = tmp_path / "model.safetensors"
    size = _whole(path)
    assert safetensors_problem(path) is None
    path.write_bytes(path.read_bytes()[: size - 1])
    problem = safetensors_problem(path)
    assert problem is not None and problem.startswith("truncated: its tensors need 88 bytes of data, the file has 87")


def test_a_header_that_is_json_but_not_an_object_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((2).to_bytes(8, "little") + b"[]")
    assert safetensors_problem(path) == "its header is not a JSON object"


def test_a_file_of_only_the_header_length_is_truncated(tmp_path):
    """Exactly 8 bytes: the length is there, the header it announces is not."""
    path = tmp_path / "model.safetensors"
    path.write_bytes((100).to_bytes(8, "little"))
    assert safetensors_problem(path) == "truncated: its header needs 100 bytes, the file has 0 after the length"


def test_the_broken_shard_of_a_sharded_checkpoint_is_found_after_a_whole_one(tmp_path):
    """Shards are checked in name order until one is broken: a whole first shard does not hide a cut second one."""
    first, second = tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"
    _whole(first)
    size = _whole(second)
    assert find_broken_file(tmp_path) is None
    second.write_bytes(second.read_bytes()[: size // 2])
    broken = find_broken_file(tmp_path)
    assert broken is not None and broken[0] == second and broken[1].startswith("truncated")
