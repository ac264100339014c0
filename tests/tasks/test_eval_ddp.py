"""Evaluation under DDP (2 gloo processes, unequal parts of an odd-sized split) scores exactly what one
process scores: each rank evaluates its part, rank 0 gathers and scores once, every rank gets the numbers."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from updetr.runner import evaluate_weights
from updetr.tasks import get_task

from .conftest import detect_cfg


def _model(root):
    task = get_task(detect_cfg(root))
    torch.manual_seed(0)
    model, _, post = task.build()
    return task, model, post


def _worker(rank, world, init_file, root, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        task, model, post = _model(root)
        m = evaluate_weights(task, model, post, torch.device("cpu"), rank=rank, world_size=world)
        torch.save(m, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_evaluation_equals_single_process(tmp_path, coco_root):
    task, model, post = _model(coco_root)
    single = evaluate_weights(task, model, post, torch.device("cpu"))
    assert single["images"] == 7
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(coco_root), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "images"):
        assert r0[k] == r1[k] == single[k], k
