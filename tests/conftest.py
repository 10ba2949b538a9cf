"""Shared test settings: one CPU thread per test process (tiny models gain nothing from more)."""
import torch

torch.set_num_threads(1)
