"""torch.compile compiles a run once per shape regime, not per layer or image size; a training step reads the
device back a fixed number of times, however deep the decoder; torch's notes go to the run's log."""
import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from updetr.engine import Trainer, train_step
from updetr.engine_setup import compile_model, route_torch_logs

from tests.models.deformable.conftest import tiny_deformable_cfg

from .test_engine import tiny_cfg

SIZES = [(64, 80), (80, 64), (96, 96), (72, 88), (88, 72)]  # multi-scale training: a new size every step


def _batch(cfg, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    b, m, p = 2, cfg.pretext.num_patches, cfg.pretext.patch_size
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[1, :, w - 8:] = True  # the second image is narrower: padded on the right
    c = torch.rand(b, m, 2, generator=g) * 0.5 + 0.25
    wh = torch.rand(b, m, 2, generator=g) * 0.3 + 0.1
    return {"images": torch.randn(b, 3, h, w, generator=g), "mask": mask,
            "patches": torch.randn(b, m, 3, p, p, generator=g),
            "targets": [{"labels": torch.ones(m, dtype=torch.int64), "boxes": torch.cat([c[j], wh[j]], 1)}
                        for j in range(b)]}


CASES = {
    "updetr, frozen CNN": lambda: tiny_cfg("model.dropout=0.1"),
    "updetr, trained CNN": lambda: tiny_cfg("model.dropout=0.1", "model.freeze_backbone=false", "optim.lr_backbone=1e-5"),
    # two-stage Deformable DETR: levels, proposals and sampling all follow the image size
    "deformable detection": lambda: tiny_deformable_cfg("model.with_box_refine=true", "model.two_stage=true"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_multi_scale_run_compiles_twice_without_graph_breaks(case):
    """Every default speed-up on (the BN fold, channels-last, oneDNN linear, bool dropout masks and their
    prefetch): compile_model must leave no graph break in the forward and compile at most twice (the first
    size static, then dynamic sizes) over five image sizes, where the folded CNN alone used to recompile per
    layer shape until torch's recompile limit (and Deformable DETR broke the graph on its level sizes read
    from a tensor). Traced with the eager backend: guards, breaks and recompiles are dynamo's, whatever the
    backend."""
    cfg = CASES[case]()
    torch.manual_seed(0)
    trainer = Trainer(cfg, torch.device("cpu"))
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    model = compile_model(trainer.model, backend=counting_backend)
    # Deformable DETR's stride-64 level is 1 pixel wide below 65 px, and dynamo treats sizes 0 and 1 apart from
    # the rest (a third compilation); real images (400 px and more) never get there, so its sizes are doubled.
    sizes = [(2 * h, 2 * w) for h, w in SIZES] if cfg.task == "detect" else SIZES
    for i, (h, w) in enumerate(sizes * 2):
        batch = _batch(cfg, h, w, i)
        if cfg.task == "detect":  # detection takes no query patches
            batch.pop("patches")
        metrics = train_step(model, trainer.criterion, batch, trainer.optimizer, device=torch.device("cpu"))
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert dict(counters["graph_break"]) == {}
    assert len(graphs) <= 2, f"{len(graphs)} compilations for {len(sizes)} image sizes"
    assert counters["frames"]["total"] == counters["frames"]["ok"]
    torch._dynamo.reset()


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (`.item()`, `float()`, `bool()`); with a CUDA
    tensor each waits for the device."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _host_reads_per_step(dec_layers: int, monkeypatch) -> int:
    cfg = tiny_cfg(f"model.dec_layers={dec_layers}")
    torch.manual_seed(0)
    trainer = Trainer(cfg, torch.device("cpu"))
    copies = []
    # whole-tensor copies to the host (on a CPU tensor `.cpu()` is a no-op the dispatcher never sees)
    original_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(1) or original_cpu(t, *a, **k))
    reads = _HostReads()
    with reads:
        train_step(trainer.model, trainer.criterion, _batch(cfg, 64, 80, 0), trainer.optimizer,
                   device=torch.device("cpu"))
    monkeypatch.undo()
    return reads.n + len(copies)


def test_a_step_reads_the_device_a_fixed_number_of_times(monkeypatch):
    """One finiteness check of the predictions, one matching of every decoder layer (its two box checks and
    its cost copy) and one copy of all logged values, plus, on CPU only, the oneDNN-fused CNN's finite-input
    check of the images and of the patches: the same count for 2 and 6 decoder layers (it used to grow by 5
    per layer, and each logged term was read apart)."""
    two, six = _host_reads_per_step(2, monkeypatch), _host_reads_per_step(6, monkeypatch)
    assert two == six
    assert six <= 7


def test_torch_notes_go_to_the_run_log(tmp_path, capfd):
    """Dynamo's and inductor's notes reach the run folder's torch.log, not the terminal; the next stage's
    file takes over from the last one's."""
    loggers = [logging.getLogger(n) for n in ["torch"] + [n for n in logging.root.manager.loggerDict
                                                           if n.startswith("torch.")]]
    saved = [(lg, list(lg.handlers), lg.propagate) for lg in loggers]
    try:
        for stage in ("pretrain", "finetune"):
            route_torch_logs(tmp_path / stage / "torch.log")
            logging.getLogger("torch._dynamo").warning(f"{stage}: hit config.recompile_limit (8)")
            logging.getLogger("torch.utils.cpp_extension").warning(f"{stage}: No CUDA runtime is found")
        for h in logging.getLogger("torch").handlers:
            h.flush()
        first, second = ((tmp_path / s / "torch.log").read_text() for s in ("pretrain", "finetune"))
        assert "pretrain: hit config.recompile_limit" in first and "pretrain: No CUDA runtime" in first
        assert "finetune: hit config.recompile_limit" in second and "finetune" not in first
        assert "recompile_limit" not in capfd.readouterr().err
    finally:
        for lg, handlers, propagate in saved:
            for h in lg.handlers:
                if h not in handlers:
                    h.close()
            lg.handlers[:] = handlers
            lg.propagate = propagate
