"""`updetr compare` against a real MLflow server populated with synthetic sweep runs (MlflowClient)."""
import uuid

import pytest

from updetr.cli import main
from updetr.compare import CompareError, compare
from updetr.tracking_query import TAG_PARENT, TAG_SWEEP, QueryError, history, resolve

pytestmark = pytest.mark.slow

# trial name -> (freeze_backbone, feature_recon, AP, AP50, AP75, pre-trained?)
TRIALS = {
    "freeze_backbone-false_feature_recon-false": ("false", "false", 0.430, 0.620, 0.450, True),
    "freeze_backbone-true_feature_recon-true": ("true", "true", 0.549, 0.787, 0.591, True),
    "detr-scratch": (None, None, 0.499, 0.745, 0.531, False),
}


def _run(client, exp_id, name, parent=None, tags=None, params=None):
    t = {**(tags or {})}
    if parent:
        t[TAG_PARENT] = parent
    run = client.create_run(exp_id, run_name=name, tags=t)
    for k, v in (params or {}).items():
        client.log_param(run.info.run_id, k, v)
    return run.info.run_id


@pytest.fixture(scope="module")
def sweep(mlflow_server):
    return populate(mlflow_server.client())


def populate(client):
    """A sweep parent, three trials (params + final eval metrics), each with its stage runs and curves."""
    sweep_name = f"tab5-{uuid.uuid4().hex[:6]}"
    exp_id = client.create_experiment(sweep_name + "-exp")
    parent = _run(client, exp_id, sweep_name, tags={TAG_SWEEP: sweep_name})
    for i, (trial, (fb, fr, ap, ap50, ap75, pretrained)) in enumerate(TRIALS.items()):
        params = {"seed": "42", "experiment": "chain_detr.yaml" if not pretrained else "chain_updetr.yaml"}
        if fb is not None:
            params.update({"stages.pretrain.model.freeze_backbone": fb, "stages.pretrain.pretext.feature_recon": fr})
        tid = _run(client, exp_id, trial, parent=parent, params=params)
        for key, value in (("eval/AP", ap), ("eval/AP50", ap50), ("eval/AP75", ap75)):
            client.log_metric(tid, key, value, step=0)
        if pretrained:
            pre = _run(client, exp_id, f"{trial}-pretrain", parent=tid, params={"task": "pretrain"})
            for step in range(20):
                client.log_metric(pre, "loss", 3.0 - 0.1 * step - 0.3 * i, step=step)
        fine = _run(client, exp_id, f"{trial}-finetune", parent=tid, params={"task": "detect"})
        for epoch in range(1, 6):
            client.log_metric(fine, "eval/AP", ap * epoch / 5, step=epoch)
            client.log_metric(fine, "loss", 9.0, step=epoch)        # not the pre-training loss
        client.set_terminated(tid)
    client.set_terminated(parent)
    return client, sweep_name, parent


def test_table_rows_varying_columns_and_deltas(sweep):
    client, name, _ = sweep
    text, files, sel = compare(client, [name], [], ["eval/AP", "eval/AP50", "eval/AP75"], "run=detr-scratch",
                               "table", None, plots=False)
    lines = text.splitlines()
    header = lines[0].split()
    assert header == ["run", "experiment", "freeze_backbone", "feature_recon", "eval/AP", "eval/AP50", "eval/AP75"]
    assert "seed" not in text                      # same on every run: not a column
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == set(TRIALS)
    assert "54.9 (+5.0)" in rows["freeze_backbone-true_feature_recon-true"]
    assert "78.7 (+4.2)" in rows["freeze_backbone-true_feature_recon-true"]
    assert "43.0 (-6.9)" in rows["freeze_backbone-false_feature_recon-false"]
    assert "detr-scratch *" in text and "49.9 " in rows["detr-scratch"] and "(+" not in rows["detr-scratch"]
    assert files == [] and sel.parent is not None

    md, _, _ = compare(client, [name], [], ["eval/AP"], "freeze_backbone=true", "markdown", None, plots=False)
    assert md.splitlines()[0] == "| run | experiment | freeze_backbone | feature_recon | eval/AP |"
    assert "| 49.9 (-5.0) |" in md
    csv_text, _, _ = compare(client, [name], [], ["eval/AP"], "run=detr-scratch", "csv", None, plots=False)
    head, *records = csv_text.splitlines()
    assert head.startswith("run,run_id,experiment,freeze_backbone,feature_recon,eval/AP")
    assert len(records) == 3


def test_pretraining_curve_comes_from_the_pretraining_stage(sweep):
    client, name, _ = sweep
    sel = resolve(client, name)
    v = next(v for v in sel.variants if v.name.startswith("freeze_backbone-true"))
    loss = history(client, v, "loss", prefer_task="pretrain")
    assert len(loss) == 20 and loss[0][1] == pytest.approx(2.7)
    ap = history(client, v, "eval/AP", prefer_task="detect")
    assert [s for s, _ in ap] == [1, 2, 3, 4, 5]
    # DETR from scratch has no pre-training stage: no pre-training curve (not its fine-tuning loss)
    scratch = next(v for v in sel.variants if v.name == "detr-scratch")
    assert history(client, scratch, "loss", prefer_task="pretrain") == []
    assert len(history(client, scratch, "eval/AP", prefer_task="detect")) == 5


def test_cli_writes_pngs_and_logs_them_to_the_sweep(sweep, mlflow_server, tmp_path, capsys):
    from PIL import Image

    client, name, parent = sweep
    out = tmp_path / "plots"
    assert main(["compare", name, "--tracking-uri", mlflow_server.uri, "--baseline", "run=detr-scratch",
                 "--metric", "eval/AP", "--metric", "eval/AP50", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "54.9 (+5.0)" in stdout and str(out / "pretrain_loss.png") in stdout
    for png in ("pretrain_loss.png", "eval_ap_vs_epoch.png"):
        path = out / png
        assert path.stat().st_size > 10_000
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] >= 500 and img.size[1] >= 300
            assert len(img.convert("RGB").getcolors(1 << 20)) > 20    # lines and text, not a blank canvas
    assert (out / "table.txt").read_text().startswith("run ")
    logged = {a.path for a in client.list_artifacts(parent, "compare")}
    assert {"compare/pretrain_loss.png", "compare/eval_ap_vs_epoch.png", "compare/table.txt"} <= logged


def test_clear_messages_for_no_runs_and_missing_metric(sweep, mlflow_server, capsys):
    client, name, _ = sweep
    with pytest.raises(QueryError, match="no MLflow run, sweep, run name or experiment called 'nope-x'"):
        compare(client, ["nope-x"], [], ["eval/AP"], None, "table", None, plots=False)
    with pytest.raises(CompareError, match=r"none of its 3 runs has metric eval/mAP .*eval/AP50"):
        compare(client, [name], [], ["eval/mAP"], None, "table", None, plots=False)
    with pytest.raises(CompareError, match="matches 0 of the runs"):
        compare(client, [name], [], ["eval/AP"], "run=nobody", "table", None, plots=False)
    assert main(["compare", "nope-x", "--tracking-uri", mlflow_server.uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope-x" in err


def test_runs_by_id_and_by_tag(sweep):
    client, name, parent = sweep
    _, _, sel = compare(client, [parent], [], ["eval/AP"], None, "table", None, plots=False)
    assert len(sel.variants) == 3
    trial = sel.variants[0].run_id
    _, _, sel = compare(client, [trial], [], ["eval/AP"], None, "table", None, plots=False)
    assert [v.run_id for v in sel.variants] == [trial]        # a trial (a chain) is one variant, not its stages
    _, _, sel = compare(client, [trial], [f"{TAG_SWEEP}={name}"], ["eval/AP"], None, "table", None, plots=False)
    assert len(sel.variants) == 3      # the trial by id and the sweep by tag: the same trial once
    _, _, sel = compare(client, [name + "-exp"], [], ["eval/AP"], None, "table", None, plots=False)
    assert sel.parent is not None and len(sel.variants) == 3      # by experiment name: its one sweep


def test_chains_compare_by_their_stage_params(mlflow_server):
    """Two `updetr run` chains (parent without params, stage runs with the flattened config): the column is
    the stage setting that differs; a stage run sharing the chain's name does not shadow the chain."""
    client = mlflow_server.client()
    tag = uuid.uuid4().hex[:6]
    names = []
    for recon, ap in (("True", 0.30), ("False", 0.20)):
        name = f"chain{tag}-{recon.lower()}"
        exp_id = client.create_experiment(name)
        parent = _run(client, exp_id, name)
        client.log_metric(parent, "eval/AP", ap, step=0)
        _run(client, exp_id, f"{name}-pretrain", parent=parent,
             params={"task": "pretrain", "name": f"{name}-pretrain", "pretext.feature_recon": recon, "seed": "1"})
        _run(client, exp_id, name, parent=parent, params={"task": "detect", "name": name})   # same name
        names.append(name)
    text, _, sel = compare(client, names, [], ["eval/AP"], f"run={names[1]}", "table", None, plots=False)
    assert text.splitlines()[0].split() == ["run", "feature_recon", "eval/AP"]
    assert "30.0 (+10.0)" in text
