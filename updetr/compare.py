"""`updetr compare`: the paper-style table of variants read back from MLflow, and their curves as PNGs.

Table: one row per variant, only the parameters that differ between variants, the chosen metrics, and the
gap to a baseline row in brackets as in the paper's Tables 1, 5 and 6 (`54.9 (+5.0)`). `eval/*` COCO metrics
are shown in % like the paper. Plots: the pre-training loss of every variant against the step (Fig. 6) and
eval AP against the fine-tuning epoch (Figs. 1, 3 and 4).
"""
from __future__ import annotations

import argparse
import csv
import io
import re
from pathlib import Path
from typing import Optional

from updetr.sweep.spec import short_keys
from updetr.tracking_query import QueryError, Selection, Variant, by_tag, history, resolve

DEFAULT_METRICS = ("eval/AP", "eval/AP50", "eval/AP75")


class CompareError(ValueError):
    """Nothing sensible to show; one line."""


def _pct(key: str) -> bool:
    return key.startswith("eval/") and "loss" not in key


def _fmt(key: str, value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if _pct(key) else f"{value:.4g}"


def _fmt_delta(key: str, delta: float) -> str:
    return f"({100 * delta:+.1f})" if _pct(key) else f"({delta:+.3g})"


def varying_params(variants: list[Variant]) -> list[str]:
    """Param keys with two or more values among the variants that have them (a from-scratch row without
    pre-training params shows `-` under them; a key only some runs log, with one value, is no column)."""
    params = [v.params for v in variants]
    keys = sorted({k for p in params for k in p})
    return [k for k in keys if len({p[k] for p in params if k in p}) > 1]


def find_baseline(variants: list[Variant], spec: str, labels: dict[str, str]) -> int:
    """`k=v` -> index of the one variant whose param k (full or short key) is v; `run=NAME` matches the
    run name (a sweep trial's name)."""
    key, sep, value = spec.partition("=")
    if not sep:
        raise CompareError(f"--baseline {spec}: expected key=value, e.g. run=detr-scratch")
    full = {s: f for f, s in labels.items()}.get(key, key)
    hits = [i for i, v in enumerate(variants)
            if (key in ("run", "trial") and v.name.endswith(value))
            or str(v.params.get(full, "")).lower() == value.lower()]
    if len(hits) != 1:
        names = ", ".join(v.name for v in variants)
        raise CompareError(f"--baseline {spec}: matches {len(hits)} of the runs ({names}); it must match one")
    return hits[0]


def build_rows(sel: Selection, metrics: list[str], baseline: Optional[str]) -> tuple[list[str], list[list[str]],
                                                                                      list[dict]]:
    """(header, text rows, raw records) for the table; raises CompareError when no run has a metric."""
    variants = sel.variants
    missing = [m for m in metrics if all(v.metric(m) is None for v in variants)]
    if missing:
        have = sorted({k for v in variants for k in v.metric_keys() if not k.startswith(("data/", "epoch/skip"))})
        raise CompareError(f"'{sel.title}': none of its {len(variants)} runs has metric {', '.join(missing)} "
                           f"(their metrics: {', '.join(have[:15]) or 'none'})")
    keys = varying_params(variants)
    labels = short_keys(keys)
    base = find_baseline(variants, baseline, labels) if baseline else None
    header = ["run", *(labels[k] for k in keys), *metrics]
    rows, records = [], []
    for i, v in enumerate(variants):
        cells = [v.name + (" *" if i == base else ""), *(v.params.get(k, "-") for k in keys)]
        record = {"run": v.name, "run_id": v.run_id, **{labels[k]: v.params.get(k) for k in keys}}
        for m in metrics:
            value = v.metric(m)
            text = _fmt(m, value)
            record[m] = value
            if base is not None and i != base and value is not None:
                ref = variants[base].metric(m)
                if ref is not None:
                    text += " " + _fmt_delta(m, value - ref)
                    record[f"{m} delta"] = value - ref
            cells.append(text)
        rows.append(cells)
        records.append(record)
    return header, rows, records


def render(header: list[str], rows: list[list[str]], records: list[dict], fmt: str) -> str:
    if fmt == "csv":
        keys = list(dict.fromkeys(k for r in records for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, keys, lineterminator="\n")
        w.writeheader()
        w.writerows(records)
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "compare"


def plot_curves(client, sel: Selection, out: Path, loss_metric: str, ap_metric: str) -> list[Path]:
    """Write the loss and AP curve PNGs (only those with data); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")        # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, task, xlabel, fname in ((loss_metric, "pretrain", "step", "pretrain_loss.png"),
                                     (ap_metric, "detect", "fine-tuning epoch", "eval_ap_vs_epoch.png")):
        curves = [(v.name, history(client, v, key, prefer_task=task)) for v in sel.variants]
        curves = [(n, pts) for n, pts in curves if len(pts) > 1]       # a single point is no curve
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        scale = 100 if _pct(key) else 1
        for name, pts in curves:
            ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], marker="." if len(pts) < 50 else None,
                    label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key + (" (%)" if scale == 100 else ""))
        ax.set_title(f"{sel.title}: {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def compare(client, refs: list[str], tags: list[str], metrics: list[str], baseline: Optional[str], fmt: str,
            out: Optional[Path], loss_metric: str = "loss", plots: bool = True) -> tuple[str, list[Path], Selection]:
    """The table text, the PNGs written and the selection (see module doc)."""
    selections = []
    for ref in refs:
        selections.append(resolve(client, ref))
    for item in tags:
        key, sep, value = item.partition("=")
        if not sep:
            raise CompareError(f"--tag {item}: expected key=value")
        selections.append(by_tag(client, key, value))
    if not selections:
        raise CompareError("name a sweep, run, run id or experiment (or --tag k=v)")
    if len(selections) == 1:
        sel = selections[0]
    else:
        seen, variants = set(), []
        for s in selections:
            for v in s.variants:
                if v.run_id not in seen:
                    seen.add(v.run_id)
                    variants.append(v)
        sel = Selection("+".join(s.title for s in selections), variants)
    header, rows, records = build_rows(sel, metrics, baseline)
    text = render(header, rows, records, fmt)
    files: list[Path] = []
    if plots:
        folder = out or Path("compare") / _safe(sel.title)
        ap = next((m for m in metrics if m.startswith("eval/")), "eval/AP")
        files = plot_curves(client, sel, folder, loss_metric, ap)
        table_path = folder / ("table.csv" if fmt == "csv" else "table.md" if fmt == "markdown" else "table.txt")
        table_path.parent.mkdir(parents=True, exist_ok=True)
        table_path.write_text(text + "\n")
        files.append(table_path)
    return text, files, sel


def cmd_compare(args) -> int:
    from mlflow.tracking import MlflowClient

    from updetr.command_line import fail
    from updetr.tracking import TrackingError, check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        check_tracking_uri(uri)
        client = MlflowClient(tracking_uri=uri)
        text, files, sel = compare(client, args.refs, args.tag or [], args.metric or list(DEFAULT_METRICS),
                                   args.baseline, args.format, Path(args.out) if args.out else None,
                                   loss_metric=args.loss_metric, plots=not args.no_plots)
    except (QueryError, CompareError, TrackingError) as e:
        return fail(str(e))
    print(text)
    if files:
        print("wrote: " + ", ".join(str(f) for f in files))
    note = log_to_sweep(client, sel, files)
    if note:
        print(note)
    return 0


def log_to_sweep(client, sel: Selection, files: list[Path]) -> Optional[str]:
    """Log the table and PNGs to the sweep's parent run (artifacts/compare); returns the line to print, or None
    when the selection is not a sweep. A failure is a warning: the table is printed and the files are local."""
    if sel.parent is None or not files:
        return None
    try:
        for f in files:
            client.log_artifact(sel.parent.info.run_id, str(f), artifact_path="compare")
        return f"logged to MLflow run {sel.parent.info.run_id} (artifacts/compare)"
    except Exception as e:
        return (f"updetr: warning: could not log the files to run {sel.parent.info.run_id}: "
                f"{str(e).splitlines()[0][:200]}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="paper-style table and curves of runs read back from MLflow")
    p.add_argument("refs", nargs="*", metavar="NAME|RUN_ID",
                   help="sweep name, run id, run name or MLflow experiment name (a run with children stands "
                        "for its children)")
    p.add_argument("--tag", action="append", metavar="k=v", help="also runs with this MLflow tag")
    p.add_argument("--metric", action="append", metavar="KEY",
                   help=f"metric column (repeatable); default {' '.join(DEFAULT_METRICS)}")
    p.add_argument("--baseline", metavar="k=v", help="row the deltas are against: a param value or run=NAME")
    p.add_argument("--format", choices=("table", "markdown", "csv"), default="table")
    p.add_argument("--out", help="folder for the PNGs and the table (default compare/<name>)")
    p.add_argument("--loss-metric", default="loss", help="pre-training loss curve metric (default: loss)")
    p.add_argument("--no-plots", action="store_true", help="print the table only")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.set_defaults(func=cmd_compare)
