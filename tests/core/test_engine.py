"""The pure engine: train step, resume (step count, LR schedule, weights), frozen backbone, bad loss."""
import pytest
import torch

from updetr.config import load_config
from updetr.engine import Trainer, TrainState, build_optimizer, total_steps

TINY = ["model.backbone=resnet18", "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1",
        "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=6", "model.dropout=0.0",
        "pretext.num_patches=2", "pretext.patch_size=32", "runtime.device=cpu"]


def tiny_cfg(*extra):
    return load_config(None, TINY + list(extra))


def make_batches(cfg, n_batches):
    """epoch_batches(epoch, skip) over fixed random tensors, the batch dict of updetr/CONTRACTS.md."""
    def epoch_batches(epoch, skip):
        for i in range(skip, n_batches):
            g = torch.Generator().manual_seed(1000 * epoch + i)
            b, m, p = 2, cfg.pretext.num_patches, cfg.pretext.patch_size
            images = torch.randn(b, 3, 64, 80, generator=g)
            mask = torch.zeros(b, 64, 80, dtype=torch.bool)
            mask[1, :, 70:] = True
            c = torch.rand(b, m, 2, generator=g) * 0.5 + 0.25
            wh = torch.rand(b, m, 2, generator=g) * 0.3 + 0.1
            targets = [{"labels": torch.ones(m, dtype=torch.int64), "boxes": torch.cat([c[j], wh[j]], 1)}
                       for j in range(b)]
            yield {"images": images, "mask": mask, "patches": torch.randn(b, m, 3, p, p, generator=g),
                   "targets": targets, "skipped": {"corrupt": 1} if i == 0 else {}}
    return epoch_batches


class Recorder:
    def __init__(self):
        self.steps, self.ckpts, self.epochs = [], [], []

    def on_step(self, state, metrics):
        self.steps.append((state.step, dict(metrics)))

    def on_checkpoint(self, state, ckpt):
        self.ckpts.append(ckpt)

    def on_epoch_end(self, state, metrics):
        self.epochs.append((state.epoch, dict(metrics)))


def test_fit_runs_epochs_steps_lr_drop_and_checkpoints():
    cfg = tiny_cfg("schedule.epochs=3", "schedule.lr_drop=2", "schedule.checkpoint_every=2", "schedule.log_every=1",
                   "optim.lr=1e-3")
    torch.manual_seed(0)
    trainer = Trainer(cfg, torch.device("cpu"))
    rec = Recorder()
    state = trainer.fit(make_batches(cfg, 3), rec)
    assert (state.step, state.epoch, state.step_in_epoch) == (9, 3, 0)
    assert [s for s, _ in rec.steps] == list(range(1, 10))
    assert [c["step"] for c in rec.ckpts] == [2, 4, 6, 8, 9]  # every 2 steps + the end
    lrs = [m["lr"] for _, m in rec.steps]
    assert lrs[:6] == pytest.approx([1e-3] * 6) and lrs[6:] == pytest.approx([1e-4] * 3)  # drop after epoch 2
    assert rec.epochs[0][1]["epoch/skipped_corrupt"] == 1 and rec.steps[0][1]["data/skipped_corrupt"] == 1
    for _, m in rec.steps:
        assert {"loss", "loss_ce", "loss_bbox", "loss_giou", "loss_feature", "steps_per_s", "images_per_s"} <= set(m)


def test_resume_continues_step_count_schedule_and_weights():
    """Interrupted at step 4 (mid-epoch 1), resumed in a new Trainer: same end state as straight through."""
    args = ["schedule.epochs=3", "schedule.lr_drop=1", "schedule.checkpoint_every=100", "optim.lr=1e-3"]
    cfg = tiny_cfg(*args)
    torch.manual_seed(0)
    straight = Trainer(cfg, torch.device("cpu"))
    straight.fit(make_batches(cfg, 3))

    torch.manual_seed(0)
    first = Trainer(tiny_cfg(*args, "schedule.max_steps=4"), torch.device("cpu"))
    rec = Recorder()
    first.fit(make_batches(cfg, 3), rec)
    ckpt = rec.ckpts[-1]
    assert (ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (4, 1, 1)

    torch.manual_seed(123)  # the checkpoint's RNG state must win over whatever the new process has
    resumed = Trainer(cfg, torch.device("cpu"))
    resumed.load_checkpoint(ckpt)
    assert resumed.lr() == pytest.approx(1e-4)  # the drop at epoch 1 survived the restart
    seen = []
    resumed.fit(lambda e, s: (seen.append((e, s)), make_batches(cfg, 3)(e, s))[1])
    assert seen[0] == (1, 1)  # resumed inside epoch 1, skipping the batch already trained on
    assert resumed.state == straight.state == TrainState(9, 3, 0)
    assert resumed.lr() == pytest.approx(straight.lr())
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_frozen_backbone_has_no_grads_and_no_optimizer_state():
    cfg = tiny_cfg("schedule.max_steps=1")
    trainer = Trainer(cfg, torch.device("cpu"))
    trainer.fit(make_batches(cfg, 1))
    backbone = list(trainer.model.backbone.parameters())
    assert backbone and all(p.grad is None and not p.requires_grad for p in backbone)
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in backbone}
    assert any(p.grad is not None for p in trainer.model.transformer.parameters())


def test_unfrozen_backbone_gets_its_own_lr_group():
    cfg = tiny_cfg("model.freeze_backbone=false", "optim.lr_backbone=1e-5")
    model = Trainer(cfg, torch.device("cpu")).model
    opt = build_optimizer(model, cfg.optim)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-5]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("backbone" in names[id(p)] for p in opt.param_groups[1]["params"])
    trained = {names[id(p)].split(".")[3] for p in opt.param_groups[1]["params"]}  # backbone.0.body.<part>
    assert trained == {"layer2", "layer3", "layer4"}  # stem and layer1 stay frozen, as in DETR


def test_non_finite_loss_stops_before_the_step():
    cfg = tiny_cfg("schedule.max_steps=1")
    trainer = Trainer(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def nan_batches(epoch, skip):
        for b in make_batches(cfg, 1)(epoch, skip):
            b["images"] = torch.full_like(b["images"], float("nan"))
            yield b
    with pytest.raises(FloatingPointError, match="not finite"):
        trainer.fit(nan_batches)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing was stepped


def test_empty_source_is_an_error_and_total_steps():
    cfg = tiny_cfg("schedule.epochs=2")
    with pytest.raises(RuntimeError, match="yielded no batches"):
        Trainer(cfg, torch.device("cpu")).fit(lambda e, s: iter(()))
    assert total_steps(tiny_cfg("schedule.epochs=4"), 5) == 20
    assert total_steps(tiny_cfg("schedule.epochs=4", "schedule.max_steps=7"), None) == 7
    assert total_steps(tiny_cfg("schedule.epochs=4", "schedule.steps_per_epoch=3"), 99) == 12


def test_epoch_summary_after_a_mid_epoch_resume_covers_the_whole_epoch():
    """Resumed one batch into epoch 1: its summary has 3 steps and the straight run's mean loss and
    skip count (not just the part after the restart)."""
    args = ["schedule.epochs=2", "schedule.checkpoint_every=100", "optim.lr=1e-3"]
    cfg = tiny_cfg(*args)
    straight_rec = Recorder()
    Trainer(cfg, torch.device("cpu")).fit(make_batches(cfg, 3), straight_rec)
    first_rec = Recorder()
    Trainer(tiny_cfg(*args, "schedule.max_steps=4"), torch.device("cpu")).fit(make_batches(cfg, 3), first_rec)
    resumed = Trainer(cfg, torch.device("cpu"))
    resumed.load_checkpoint(first_rec.ckpts[-1])
    rec = Recorder()
    resumed.fit(make_batches(cfg, 3), rec)
    (_, got), (_, want) = rec.epochs[0], straight_rec.epochs[1]
    assert got["epoch/steps"] == want["epoch/steps"] == 3
    assert got["epoch/skipped_corrupt"] == want["epoch/skipped_corrupt"] == 1  # its batch 0 ran before the restart
    assert got["epoch/loss"] == pytest.approx(want["epoch/loss"], rel=1e-5)


def test_run_ending_on_max_steps_at_an_epoch_end_closes_that_epoch_once():
    """max_steps = 2 epochs of 3 batches: both epochs are summarised, the run ends at a new epoch (so a
    longer max_steps starts epoch 2 rather than summarising epoch 1 again)."""
    cfg = tiny_cfg("schedule.epochs=5", "schedule.max_steps=6", "schedule.checkpoint_every=100")
    rec = Recorder()
    state = Trainer(cfg, torch.device("cpu")).fit(make_batches(cfg, 3), rec)
    assert (state.step, state.epoch, state.step_in_epoch) == (6, 2, 0)
    assert [(e, m["epoch/steps"]) for e, m in rec.epochs] == [(1, 3.0), (2, 3.0)]
    assert rec.ckpts[-1]["step"] == 6 and len(rec.ckpts) == 1


def test_run_stopped_mid_epoch_summarises_its_partial_last_epoch_once_across_a_resume():
    """max_steps=5 with 3 batches per epoch: epoch 1 ends after 2 of its batches and is summarised as such.
    Interrupted at step 4 (inside that epoch) and resumed, the run gives the same single summary."""
    from updetr.engine import summary_epoch

    args = ["schedule.epochs=5", "schedule.max_steps=5", "schedule.checkpoint_every=100", "optim.lr=1e-3"]
    cfg = tiny_cfg(*args)
    straight = Recorder()
    state = Trainer(cfg, torch.device("cpu")).fit(make_batches(cfg, 3), straight)
    assert (state.step, state.epoch, state.step_in_epoch) == (5, 1, 2)
    assert [(e, m["epoch/steps"]) for e, m in straight.epochs] == [(1, 3.0), (1, 2.0)]
    assert [summary_epoch(TrainState(5, e, 0 if i == 0 else 2)) for i, (e, _) in enumerate(straight.epochs)] == [0, 1]
    first = Recorder()
    Trainer(tiny_cfg(*args[:1], "schedule.max_steps=4", *args[2:]), torch.device("cpu")).fit(
        make_batches(cfg, 3), first)
    # the interrupted part's own summaries (a max_steps=4 stop) are not what is compared: the resumed run
    # continues from its checkpoint and summarises epoch 1 once, covering all of it
    resumed = Trainer(cfg, torch.device("cpu"))
    resumed.load_checkpoint(first.ckpts[-1])
    rec = Recorder()
    resumed.fit(make_batches(cfg, 3), rec)
    assert len(rec.epochs) == 1
    (_, got), (_, want) = rec.epochs[0], straight.epochs[1]
    assert got["epoch/steps"] == want["epoch/steps"] == 2
    assert got["epoch/loss"] == pytest.approx(want["epoch/loss"], rel=1e-5)
