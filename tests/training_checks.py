"""What every head training entry point must do, checked the same way for each (Medusa, EAGLE)."""
from __future__ import annotations

import pytest
import torch


def assert_resume_is_exact(train, compose, overrides: list[str], tmp_path, capfd, load) -> None:
    """A run interrupted after step 3 (checkpoint at step 2, ``checkpoint_every=2``, ``steps=6``) and
    resumed ends with the same head, tensor for tensor, as an uninterrupted run; ``load(dir)`` loads a head."""

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    train(compose(*overrides, f"out_dir={tmp_path / 'a'}"), tmp_path / "run_a")
    with pytest.raises(KeyboardInterrupt):
        train(compose(*overrides, f"out_dir={tmp_path / 'b'}"), tmp_path / "run_b", on_step=interrupt)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True, map_location="cpu")["step"] == 2
    capfd.readouterr()
    train(compose(*overrides, f"out_dir={tmp_path / 'b'}"), tmp_path / "run_b2")
    assert "at step 2/6" in capfd.readouterr().err
    a, b = load(tmp_path / "a").state_dict(), load(tmp_path / "b").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
