"""Ablation sweeps: a sweep YAML (grid / zip / variants over an experiment) expanded into validated cells."""
from updetr.sweep.spec import Cell, Sweep, SweepError, load_sweep

__all__ = ["Cell", "Sweep", "SweepError", "load_sweep"]
