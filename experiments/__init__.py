"""Hydra entry points and experiment helpers (decode runs, sweeps, the embedded model zoo)."""
