"""Checkpoint schema: atomic save, safe load, official conversion, pre-train -> fine-tune keys."""
import argparse
import os

import pytest
import torch

from updetr.checkpoint import (CheckpointError, convert_official, load_checkpoint, make_checkpoint,
                               pretrain_to_finetune, save_checkpoint, strip_prefixes)


def test_save_load_round_trip(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    path = save_checkpoint(make_checkpoint(sd, step=7, epoch=1, step_in_epoch=3, config={"name": "x"}), tmp_path / "c.pt")
    ck = load_checkpoint(path)
    assert ck["step"] == 7 and ck["epoch"] == 1 and ck["step_in_epoch"] == 3 and ck["config"] == {"name": "x"}
    assert torch.equal(ck["model"]["a.weight"], sd["a.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    path = save_checkpoint(make_checkpoint({"w": torch.ones(2)}, step=1), tmp_path / "c.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"bad": Unpicklable()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


def test_official_file_is_refused_by_safe_load_and_converted(tmp_path):
    args = argparse.Namespace(lr=1e-4, num_patches=10, pre_norm=True, device=torch.device("cpu"))
    official = {"model": {"module.class_embed.weight": torch.randn(3, 8), "patch2query.weight": torch.randn(8, 16),
                          "transformer.encoder.norm.weight": torch.ones(8)},
                "optimizer": {}, "epoch": 59, "args": args}
    src = tmp_path / "official.pth"
    torch.save(official, src)
    with pytest.raises(CheckpointError, match="updetr checkpoint convert"):
        load_checkpoint(src)
    report = convert_official(src, tmp_path / "ours.pt")
    assert report["keys"] == 3 and report["pretrain_heads"] and report["pre_norm"]
    ck = load_checkpoint(tmp_path / "ours.pt")
    assert ck["source"] == "official" and "class_embed.weight" in ck["model"]
    assert ck["official_args"]["num_patches"] == 10 and ck["official_args"]["device"] == "cpu"


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(junk)):
        load_checkpoint(junk)
    torch.save({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an updetr checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


def test_pretrain_to_finetune_drops_only_pretext_heads():
    sd = {k: torch.zeros(1) for k in [
        "module.backbone.0.body.conv1.weight", "transformer.decoder.norm.weight", "query_embed.weight",
        "bbox_embed.layers.0.weight", "input_proj.weight", "class_embed.weight", "class_embed.bias",
        "patch2query.weight", "patch2query.bias", "feature_align.layers.0.weight", "feature_align.layers.1.bias"]}
    out = pretrain_to_finetune(sd)
    assert sorted(out) == ["backbone.0.body.conv1.weight", "bbox_embed.layers.0.weight", "input_proj.weight",
                           "query_embed.weight", "transformer.decoder.norm.weight"]
    assert list(strip_prefixes({"module._orig_mod.x": 1})) == ["x"]


def test_checkpoint_sha_has_the_submit_fallback_and_git_runs_once(monkeypatch, tmp_path):
    """A submitted job's copy has no .git (here: no git at all): checkpoints still record the SHA that
    `updetr submit` passes on, the same one MLflow gets; and writing checkpoints does not shell out."""
    import subprocess

    from tests.core.test_engine import tiny_cfg
    from updetr import provenance, tracking
    from updetr.engine import Trainer

    calls = []
    real_run = subprocess.run

    def counting_run(argv, *a, **kw):
        calls.append(argv)
        return real_run(argv, *a, **kw)

    monkeypatch.setattr(subprocess, "run", counting_run)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    monkeypatch.setenv("UPDETR_GIT_SHA", "0123abc")
    provenance._ask_git.cache_clear()
    trainer = Trainer(tiny_cfg(), torch.device("cpu"))
    ckpts = [trainer.checkpoint() for _ in range(3)]
    assert [c["git_sha"] for c in ckpts] == ["0123abc"] * 3
    assert tracking.git_info()["sha"] == "0123abc"
    assert len([c for c in calls if "git" in c[0]]) <= 1  # asked once per process, not per checkpoint
    provenance._ask_git.cache_clear()
