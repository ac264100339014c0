"""Every shipped experiment and every cell of every shipped sweep runs in fp32, as the official code does,
unless its file name says bf16: a faster, numerically different precision is never inherited silently."""
from pathlib import Path

from updetr.config import load_experiment
from updetr.sweep.spec import load_sweep

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _expected(path: Path) -> str:
    return "bf16" if "bf16" in path.name else "fp32"


def test_every_shipped_experiment_stage_is_fp32_unless_named_bf16():
    files = sorted(EXPERIMENTS.rglob("*.yaml"))
    files = [f for f in files if "sweeps" not in f.parts]
    assert len(files) >= 15
    for f in files:
        for stage in load_experiment(f).stages:
            assert stage.cfg.runtime.precision == _expected(f), \
                f"{f.name} stage {stage.name}: precision {stage.cfg.runtime.precision}"


def test_every_sweep_cell_is_fp32_unless_named_bf16():
    files = sorted((EXPERIMENTS / "sweeps").glob("*.yaml"))
    assert files
    for f in files:
        sweep = load_sweep(f)
        for cell in sweep.cells:
            for stage in sweep.trial(cell).stages:
                assert stage.cfg.runtime.precision == _expected(f), \
                    f"{f.name} cell {cell} stage {stage.name}: precision {stage.cfg.runtime.precision}"
