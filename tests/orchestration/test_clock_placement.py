"""The run's epoch clock (a named zero-CPU actor that every worker group reads) lives on the node of the
process that made it: on a two-node cluster Ray places such an actor on either node, and a clock lost with
the other node failed every later worker group of an elastic run."""
from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import SMOKE, cli_env
from .node_drill import two_node_cluster

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# Joins the cluster, makes eight runs' clocks, prints how many sit on this process' node and the node count.
PROBE = """
import sys
import ray
from ray._private import state
from updetr.config.loading import load_config
from updetr.data.ray_pipeline import epoch_clock
from updetr.orchestration.ray_start import keep_loopback_for

keep_loopback_for(sys.argv[1])
ray.init(address=sys.argv[1], log_to_driver=False)
here = ray.get_runtime_context().get_node_id()
clocks = [epoch_clock(load_config(sys.argv[2], [f"name=clock{i}"])) for i in range(8)]
ray.get([c.get.remote() for c in clocks])
on_here = sum(state.actors(c._actor_id.hex())["Address"]["NodeID"] == here for c in clocks)
print(on_here, sum(n["Alive"] for n in ray.nodes()))
"""


@pytest.mark.timeout(300)
def test_every_clock_sits_on_the_node_of_the_process_that_made_it(tmp_path):
    with two_node_cluster(tmp_path, "ucl", up_timeout=200) as (_, cluster):
        probe = subprocess.run([sys.executable, "-c", PROBE, cluster.address, SMOKE], cwd=tmp_path,
                               env=cli_env(RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert probe.stdout.split()[-2:] == ["8", "2"], probe.stdout + probe.stderr
