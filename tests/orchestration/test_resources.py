"""Resource planning (no Ray): every stage of the default recipes fits on 2 cores; impossible requests
are refused in one line naming the setting to change; a big node gives spare CPUs to preprocessing."""
from __future__ import annotations

import pytest

from updetr.config import load_config
from updetr.resources import READ_CPUS, ResourceError, plan_resources

from .conftest import SMOKE

TWO_CORES = {"CPU": 2.0, "GPU": 0.0, "node_cpus": [2.0]}


def fits(plan, cluster) -> bool:
    return plan.reserved_cpus <= cluster["CPU"] + 1e-9


@pytest.mark.parametrize("source", ["synthetic", "folder", "shards"])
@pytest.mark.parametrize("recipe", [SMOKE, None])
def test_defaults_fit_two_cores_with_room_for_reads(recipe, source):
    cfg = load_config(recipe, [f"data.source={source}"] + ([] if source == "synthetic" else ["data.path=/x"]))
    plan = plan_resources(cfg, TWO_CORES)
    assert fits(plan, TWO_CORES), plan
    assert plan.actors >= 1 and plan.cpus_per_actor > 0 and plan.num_workers == cfg.ray.num_workers
    if source != "synthetic":
        # the hang: workers + actors took both cores and no read task could start
        assert plan.read_cpus == READ_CPUS
        assert plan.train_cpus + plan.actors * plan.cpus_per_actor <= 2.0 - READ_CPUS + 1e-9


def test_smoke_on_two_cores_lowers_the_actor_not_the_workers():
    cfg = load_config(SMOKE, ["data.source=folder", "data.path=/x"])
    plan = plan_resources(cfg, TWO_CORES)
    assert (plan.num_workers, plan.cpus_per_worker) == (2, 0.5)
    assert plan.cpus_per_actor == pytest.approx(0.75)
    assert any("data.preprocess_cpus 1 -> 0.75" in n for n in plan.notes)


def test_big_node_gives_spare_cpus_to_preprocessing():
    cfg = load_config(SMOKE, ["data.source=folder", "data.path=/x"])
    big = {"CPU": 64.0, "GPU": 0.0, "node_cpus": [64.0]}
    plan = plan_resources(cfg, big)
    assert plan.cpus_per_worker == 0.5 and plan.cpus_per_actor == 1.0 and not plan.notes
    assert plan.max_actors == int(64 - 1.0 - READ_CPUS) and fits(plan, big)


@pytest.mark.parametrize("overrides,needles", [
    (["ray.num_workers=32"], ["32 training worker(s)", "ray.num_workers"]),
    (["data.num_workers=16", "ray.cpus_per_worker=0.1"], ["preprocessing actor(s)", "data.num_workers"]),
    (["ray.use_gpu=true"], ["GPU", "ray.use_gpu=false"]),
])
def test_impossible_requests_refused_in_one_line(overrides, needles):
    cfg = load_config(SMOKE, ["data.source=folder", "data.path=/x", *overrides])
    with pytest.raises(ResourceError) as e:
        plan_resources(cfg, TWO_CORES)
    text = str(e.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text


def test_joined_cluster_is_not_resized_and_worker_must_fit_one_node():
    cfg = load_config(SMOKE, ["data.source=shards", "data.path=/x", "ray.cpus_per_worker=1"])
    with pytest.raises(ResourceError, match="ray.cpus_per_worker"):
        plan_resources(cfg, TWO_CORES, flexible_train=False)
    cfg = load_config(SMOKE, ["ray.cpus_per_worker=3", "ray.num_workers=1"])
    with pytest.raises(ResourceError, match="no node has that many CPUs"):
        plan_resources(cfg, {"CPU": 8.0, "GPU": 0.0, "node_cpus": [2.0, 2.0, 2.0, 2.0]}, flexible_train=False)
