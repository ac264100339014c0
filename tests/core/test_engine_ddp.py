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
