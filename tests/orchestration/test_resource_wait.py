"""A run whose training workers cannot be placed says what it waits for and gives up after
`ray.resource_wait_s`, on a real local Ray: a STRICT_SPREAD group of 2 workers on a 1-node Ray never fits."""
from __future__ import annotations

import io
import time

import pytest

from updetr.orchestration.resource_wait import ResourceWait

pytestmark = [pytest.mark.ray]


@pytest.mark.timeout(300)
def test_a_group_that_cannot_be_placed_is_reported_then_given_up(ray_tmp):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=ray_tmp, configure_logging=False)
    try:
        per_worker = {"CPU": 0.5}
        pg = placement_group([per_worker] * 2, strategy="STRICT_SPREAD")  # what Train asks for: 2 nodes
        aborted = []
        out = io.StringIO()
        wait = ResourceWait("smoke", 2, per_worker, "STRICT_SPREAD", out, limit_s=8, abort=lambda: aborted.append(1),
                            interval_s=3, poll_s=0.5)
        wait.start()
        wait.join(timeout=120)
        lines = out.getvalue().splitlines()
        assert aborted == [1] and wait.gave_up, lines
        assert lines and all(ln.startswith("[smoke] waiting ") for ln in lines), lines
        assert "2 worker(s) x 0.5 CPU (STRICT_SPREAD)" in lines[0] and "1 node(s), 1 of 1 CPU free" in lines[0]
        assert "gives up after ray.resource_wait_s=8 s" in lines[0]
        assert wait.gave_up.startswith("waited ") and "(ray.resource_wait_s=8)" in wait.gave_up
        remove_placement_group(pg)

        # a group that fits is not a wait: no line, no abort
        pg = placement_group([per_worker] * 2, strategy="PACK")
        ray.get(pg.ready(), timeout=60)
        out = io.StringIO()
        wait = ResourceWait("smoke", 2, per_worker, "PACK", out, limit_s=2, abort=lambda: aborted.append(2),
                            interval_s=1, poll_s=0.5)
        wait.start()
        time.sleep(5)
        wait.stop()
        assert out.getvalue() == "" and aborted == [1] and wait.gave_up is None
    finally:
        ray.shutdown()
