"""`updetr run` on one Ray Train worker trains what `updetr debug` trains: the same losses, step for step.

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


@pytest.mark.timeout(400)
def test_run_on_one_ray_worker_gives_the_losses_of_debug(tmp_path):
    r = updetr("debug", SMOKE, *COMMON, f"runtime.output_dir={tmp_path}/debug", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    local = losses(r.stdout)
    ray_tmp = short_tmpdir("urp")
    try:
        r = updetr("run", SMOKE, *COMMON, "ray.num_workers=1", f"ray.storage_path={tmp_path}/ckpt",
                   f"runtime.output_dir={tmp_path}/ray", cwd=tmp_path, env=cli_env(ray_tmp), timeout=360)
    finally:
        reap(ray_tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    on_ray = losses(r.stdout)
    assert sorted(local) == sorted(on_ray) == list(range(1, STEPS + 1)), (local, on_ray)
    # Step 1: the same images, patches and initial weights give the same last-layer terms (printed to 3
    # decimals). The two processes' kernels still differ in the last float bits, and the Hungarian matching
    # can turn that into another assignment in an auxiliary decoder layer: measured, 0.08 % of the total
    # at step 1 and under 0.5 % by step 6. Other batches or weights differ by 3-20 % from step 1 on.
    terms = [[float(x) for x in re.findall(r"\d+\.\d+", run[1][1])] for run in (local, on_ray)]
    assert terms[0] == pytest.approx(terms[1], abs=2e-3), (local[1], on_ray[1])
    for step in local:
        assert on_ray[step][0] == pytest.approx(local[step][0], rel=0.01), (local, on_ray)
