"""The engine under DDP (2 gloo processes): weights stay in sync and an all-bad batch on one rank
makes every rank skip that step together instead of hanging the gradient all-reduce."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.core.test_engine import make_batches, tiny_cfg
from updetr.engine import Trainer


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        cfg = tiny_cfg("schedule.epochs=1")
        torch.manual_seed(0)
        trainer = Trainer(cfg, torch.device("cpu"))
        base = make_batches(cfg, 3)

        def epoch_batches(epoch, skip):
            for i, b in enumerate(base(epoch + rank * 10, skip)):  # each rank sees different data
                if rank == 1 and i == 1:  # every item of this batch was bad
                    b = {"images": b["images"][:0], "mask": b["mask"][:0], "patches": b["patches"][:0],
                         "targets": [], "skipped": {"unreadable": 2}}
                yield b
        state = trainer.fit(epoch_batches)
        torch.save({"state": (state.step, state.epoch, state.step_in_epoch),
                    "weights": trainer.model.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_skip_empty_batches_together_and_stay_in_sync(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["state"] == r1["state"] == (2, 1, 0)  # 3 batches, the all-bad one skipped on both ranks
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k


def _zero_weight_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        out = {}
        for name, override in (("feature", "loss.feature=0"), ("ce", "loss.ce=0"),
                               ("boxes", "loss.bbox=0 loss.giou=0")):
            cfg = tiny_cfg("schedule.max_steps=3", "pretext.feature_recon=true", *override.split())
            trainer = Trainer(cfg, torch.device("cpu"))
            base = make_batches(cfg, 3)
            state = trainer.fit(lambda epoch, skip: base(epoch + rank * 10, skip))  # DDP: 3 steps, no crash
            out[name] = {"step": state.step, "frozen": trainer.frozen_heads,
                         "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()}}
        torch.save(out, f"{out_dir}/zero{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_trains_with_any_loss_weight_zero(tmp_path):
    """loss.feature=0 with feature_recon on used to crash DDP on step 2 (feature_align had no gradient)."""
    mp.spawn(_zero_weight_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"zero{r}.pt", weights_only=True) for r in (0, 1))
    fresh = Trainer(tiny_cfg(), torch.device("cpu")).model.state_dict()  # same seed: the initial weights
    for name, head in (("feature", "feature_align"), ("ce", "class_embed"), ("boxes", "bbox_embed")):
        assert r0[name]["step"] == r1[name]["step"] == 3, name
        assert r0[name]["frozen"] == [head], name
        w = r0[name]["weights"]
        assert set(w) == set(fresh)  # the official keys stay, so official files still load strictly
        for k, v in w.items():
            assert torch.equal(v, r1[name]["weights"][k]), k  # ranks in sync
            if k.startswith(head + "."):
                assert torch.equal(v, fresh[k]), k  # a head whose loss is off is not trained


def _rng_worker(rank, world, init_file, out_dir, ckpt_path):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        cfg = tiny_cfg("schedule.max_steps=2")
        torch.manual_seed(cfg.seed)  # what the drivers used to do on every rank
        trainer = Trainer(cfg, torch.device("cpu"))
        first_draw = torch.rand(4)  # what dropout / patch dropout would draw on this rank
        ckpt = trainer.checkpoint()  # a collective: gathers every rank's RNG state
        after_ckpt = torch.rand(4)
        if rank == 0:
            torch.save(ckpt, ckpt_path)
        dist.barrier()
        resumed = Trainer(cfg, torch.device("cpu"))
        resumed.load_checkpoint(torch.load(ckpt_path, weights_only=True))
        torch.save({"first": first_draw, "after": after_ckpt, "resumed": torch.rand(4)}, f"{out_dir}/rng{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_seed_seed_plus_rank_and_resume_their_own_rng(tmp_path):
    ckpt_path = str(tmp_path / "ckpt.pt")
    mp.spawn(_rng_worker, args=(2, str(tmp_path / "init"), str(tmp_path), ckpt_path), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rng{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["first"], r1["first"])  # dropout draws differ between ranks (reference: seed + rank)
    assert torch.equal(r0["resumed"], r0["after"]) and torch.equal(r1["resumed"], r1["after"])  # each its own
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert len(ckpt["rng"]["per_rank"]) == 2
