"""`updetr run` on one Ray Train worker trains what `updetr debug` trains: the same losses, step for step; on two
workers, each image gives the loss it gives in `debug`, and the logged loss is that of the whole global batch.

The two commands share the engine but not the input path (Ray Data's preprocessing actors vs the local
loader) nor the process (a Train worker vs this one). With `data.shuffle: false` both read the images in
file order, so from one seed every step's loss must agree to the printed precision: a drift means the Ray
path sees other images, patches or initial weights, and a run with `run` would not be the one debugged with
`debug`. (Shuffled, the two orders differ by design: docs/faithful.md, "epoch order".)
"""
from __future__ import annotations

import re

import pytest

from .conftest import SMOKE, cli_env, reap, short_tmpdir, updetr

pytestmark = [pytest.mark.slow, pytest.mark.ray]

STEPS = 6
COMMON = ["data.synthetic_images=16", f"schedule.max_steps={STEPS}", "schedule.log_every=1",
          "schedule.checkpoint_every=6", "tracking.enabled=false", "data.shuffle=false", "seed=7"]
LOSS = re.compile(r"step (\d+)/\d+ .*?\| loss (\d+\.\d+) \(([^)]*)\)")


def losses(out: str) -> dict[int, tuple[float, str]]:
    """{step: (loss, "ce .. bbox .. giou .. feature ..")} from the progress lines."""
    return {int(m.group(1)): (float(m.group(2)), m.group(3)) for m in LOSS.finditer(out)}


def debug_then_run(tmp_path, overrides: list[str], workers: int) -> tuple[str, str]:
    """The terminal output of `updetr debug` and of `updetr run` on `workers` Ray workers, same overrides."""
    r = updetr("debug", SMOKE, *overrides, f"runtime.output_dir={tmp_path}/debug", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    debug_out = r.stdout
    ray_tmp = short_tmpdir("urp")
    try:
        r = updetr("run", SMOKE, *overrides, f"ray.num_workers={workers}", f"ray.storage_path={tmp_path}/ckpt",
                   f"runtime.output_dir={tmp_path}/ray", cwd=tmp_path, env=cli_env(ray_tmp), timeout=360)
    finally:
        reap(ray_tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return debug_out, r.stdout


@pytest.mark.timeout(400)
def test_run_on_one_ray_worker_gives_the_losses_of_debug(tmp_path):
    local, on_ray = (losses(out) for out in debug_then_run(tmp_path, COMMON, workers=1))
    assert sorted(local) == sorted(on_ray) == list(range(1, STEPS + 1)), (local, on_ray)
    # Step 1: the same images, patches and initial weights give the same last-layer terms (printed to 3
    # decimals). The two processes' kernels still differ in the last float bits, and the Hungarian matching
    # can turn that into another assignment in an auxiliary decoder layer: measured, 0.08 % of the total
    # at step 1 and under 0.5 % by step 6. Other batches or weights differ by 3-20 % from step 1 on.
    terms = [[float(x) for x in re.findall(r"\d+\.\d+", run[1][1])] for run in (local, on_ray)]
    assert terms[0] == pytest.approx(terms[1], abs=2e-3), (local[1], on_ray[1])
    for step in local:
        assert on_ray[step][0] == pytest.approx(local[step][0], rel=0.01), (local, on_ray)


def term_means(out: str) -> list[float]:
    """Mean over the printed steps of the total loss and of each printed term."""
    rows = [[total, *(float(x) for x in re.findall(r"\d+\.\d+", terms))] for total, terms in losses(out).values()]
    return [sum(col) / len(rows) for col in zip(*rows)]


@pytest.mark.timeout(400)
def test_run_on_two_ray_workers_gives_the_epoch_losses_of_debug(tmp_path):
    # Which images each rank gets depends on Ray Data's block arrival, so single steps cannot be compared.
    # With the weights held still (an AdamW step moves a weight by about lr) each image's losses depend on the
    # image alone, and the epoch's mean over all 16 images must agree: `debug` in 8 steps of 2 images, the
    # run in 4 steps of 2 x 2 whose logged values are the mean over both ranks. All images are 128 x 128, so
    # no batch pads another way. Measured gap: 0.002 % in the total, 0.17 % in the class term (the initial
    # queries are near-tied, so last-bit differences of other batch shapes can swap a matched pair); with
    # rank 0 logging its own share alone, the total is 5 % off, the box and GIoU terms 6 % and 11 %.
    same = ["data.synthetic_images=16", "data.synthetic_size=[128,128]", "pretext.scales=[128]",
            "pretext.max_size=128", "optim.lr=1e-12", "schedule.epochs=1", "schedule.log_every=1",
            "schedule.checkpoint_every=8", "tracking.enabled=false", "data.shuffle=false", "seed=7"]
    debug_out, run_out = debug_then_run(tmp_path, same, workers=2)
    assert sorted(losses(run_out)) == [1, 2, 3, 4] and sorted(losses(debug_out)) == list(range(1, 9)), run_out
    assert term_means(run_out) == pytest.approx(term_means(debug_out), rel=5e-3), (debug_out, run_out)
