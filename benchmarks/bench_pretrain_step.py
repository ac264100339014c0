"""Benchmark: one UP-DETR pre-training step (forward + loss + backward + clip + AdamW) against the reference path.

Paper shapes: ResNet-50 (frozen), N=100 queries, M=10 patches of 128x128, a batch of 2 images of 400x533 and
448x597 (padded to 448x597), fp32. Variants, each in its own fresh process, run interleaved `--repeats` times
(the machine may be shared: the figure per variant is the median over repeats of each process's median step):

  reference  - every speed-up off (runtime.fold_frozen_bn=false channels_last=false fused_adamw=false
               onednn_linear=false bool_dropout_masks=false compile=false, fp32): the official arithmetic op for op
  default    - updetr's defaults for the device (on CPU: FrozenBatchNorm folded into the convs with ReLU / sum as
               oneDNN post-ops, channels-last, fused AdamW, linear layers on oneDNN, bool dropout masks)
  --extra adds: fold (fold only), channels_last (channels-last only), compile (defaults + torch.compile,
               first-step compile time reported)

Prints time per step (wall, and process CPU time), peak RSS of the process, and ratios against the reference.
A parity check in its own process runs one step of both paths from the same weights and the same seed and
prints the largest relative difference (tensor norm) of outputs, losses and gradients.
With a CUDA device it also times gpu-reference (fp32, speed-ups off), gpu-default (channels-last, fused AdamW,
torch.compile) and gpu-bf16 (defaults + bf16 autocast) and prints their ratios against gpu-reference;
without one it says so and skips.

    python benchmarks/bench_pretrain_step.py [--steps 5] [--warmup 2] [--threads 2] [--repeats 3] [--extra]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

REFERENCE = ["runtime.fold_frozen_bn=false", "runtime.channels_last=false", "runtime.fused_adamw=false",
             "runtime.onednn_linear=false", "runtime.bool_dropout_masks=false",
             "runtime.prefetch_dropout_masks=false", "runtime.compile=false",
             "runtime.precision=fp32"]
VARIANTS = {
    "reference": REFERENCE,
    "default": [],
    "fold": REFERENCE + ["runtime.fold_frozen_bn=true"],
    "channels_last": REFERENCE + ["runtime.channels_last=true"],
    "compile": ["runtime.compile=true"],
    "gpu-reference": REFERENCE,
    "gpu-default": [],
    "gpu-bf16": ["runtime.precision=bf16"],
}
# The CPU speed-ups, each a `runtime` field. `--switches` times each one alone (the reference path + it) and
# all but it (the default path - it), interleaved with the reference and the default in the same run. The mask
# prefetch needs the oneDNN linear layers, bool masks and the folded CNN, so "alone" it is measured with those
# on and set against them (`SWITCH_ALONE_BASE`).
SWITCHES = ["fold_frozen_bn", "channels_last", "fused_adamw", "onednn_linear", "bool_dropout_masks",
            "prefetch_dropout_masks"]
SWITCH_ALONE_BASE = {"prefetch_dropout_masks": ["fold_frozen_bn", "onednn_linear", "bool_dropout_masks"]}


def _switch_variants() -> dict[str, list[str]]:
    out = {}
    for sw in SWITCHES:
        base = [f"runtime.{b}=true" for b in SWITCH_ALONE_BASE.get(sw, [])]
        out[f"only:{sw}"] = REFERENCE + base + [f"runtime.{sw}=true"]
        if base:
            out[f"base:{sw}"] = REFERENCE + base
        out[f"but:{sw}"] = [f"runtime.{sw}=false"]
    return out


VARIANTS.update(_switch_variants())
SHAPE = ["model.backbone=resnet50", "model.num_queries=100", "pretext.num_patches=10",
         "model.freeze_backbone=true", "tracking.enabled=false"]


def make_batch(device_type: str = "cpu") -> dict:
    """Two images (400x533, 448x597) padded to 448x597, 10 patches each, 10 targets each (seeded)."""
    import torch

    g = torch.Generator().manual_seed(1)
    sizes = [(400, 533), (448, 597)]
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(2, 3, hmax, wmax)
    mask = torch.ones(2, hmax, wmax, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    patches = torch.randn(2, 10, 3, 128, 128, generator=g)
    targets = []
    for _ in sizes:
        c = torch.rand(10, 2, generator=g) * 0.5 + 0.25
        wh = torch.rand(10, 2, generator=g) * 0.3 + 0.1
        targets.append({"labels": torch.ones(10, dtype=torch.int64), "boxes": torch.cat([c, wh], 1)})
    return {"images": images, "mask": mask, "patches": patches, "targets": targets}


def _trainer(overrides: list[str], device: str):
    from updetr.config import load_config
    from updetr.engine import Trainer

    import torch

    cfg = load_config(None, SHAPE + [f"runtime.device={device}"] + overrides)
    return Trainer(cfg, torch.device(device)), cfg


def child(variant: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    from updetr.engine import train_step

    torch.set_num_threads(threads)
    device = "cuda" if variant.startswith("gpu-") else "cpu"
    torch.manual_seed(0)
    trainer, cfg = _trainer(VARIANTS[variant], device)
    batch = make_batch()
    dev = torch.device(device)

    def step():
        out = train_step(trainer.train_model, trainer.criterion, batch, trainer.optimizer, device=dev,
                         clip_max_norm=0.1, precision=cfg.runtime.precision)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    t = time.perf_counter()
    step()
    first_s = time.perf_counter() - t  # includes torch.compile's compilation where on
    for _ in range(max(warmup - 1, 0)):
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    out = {"variant": variant, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu_times),
           "first_step_s": first_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "threads": torch.get_num_threads()}
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _replay_matcher(matcher, recorded=None):
    """`_ReplayMatcher` as an nn.Module (the criterion holds its matcher as a child module)."""
    import torch

    class Replay(_ReplayMatcher, torch.nn.Module):
        def __init__(self):
            torch.nn.Module.__init__(self)
            _ReplayMatcher.__init__(self, matcher, recorded)

        def forward(self, outputs, targets):
            return _ReplayMatcher.__call__(self, outputs, targets)

    return Replay()


class _ReplayMatcher:
    """Wraps a Hungarian matcher: records its assignments (`record`), or hands back recorded ones in call order
    and counts those its own would have changed (`replay`). At random init many queries predict nearly the
    same box, so the matching costs are near ties and a rounding-level change can swap which query gets which
    target: the loss barely moves, but other queries receive the gradient. Comparing gradients under one
    assignment isolates the arithmetic (the thing the fast path changes) from that discrete choice."""

    def __init__(self, matcher, recorded=None):
        self.matcher, self.recorded, self.calls, self.changed, self.total = matcher, recorded, [], 0, 0

    def __call__(self, outputs, targets):
        own = self.matcher(outputs, targets)
        if self.recorded is None:
            self.calls.append(own)
            return own
        ref = self.recorded[len(self.calls)]
        self.calls.append(ref)
        for (i0, j0), (i1, j1) in zip(own, ref):
            self.total += 1
            self.changed += int(not (torch_equal(i0, i1) and torch_equal(j0, j1)))
        return ref


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))


def parity(threads: int) -> dict:
    """One step's outputs, losses and gradients: default path vs reference path, same weights, same seed,
    the reference's Hungarian assignment (`_ReplayMatcher`)."""
    import torch

    from updetr.util.nested_tensor import NestedTensor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fast, _ = _trainer(VARIANTS["default"], "cpu")
    ref, _ = _trainer(VARIANTS["reference"], "cpu")
    ref.model.load_state_dict(fast.model.state_dict(), strict=True)
    batch = make_batch()
    results, replays = [], []
    # The third run is the reference path again at another thread count (1, or 2 when timing at 1): other
    # reduction orders in the GEMMs (and, at one thread, PyTorch's native kernel instead of oneDNN for the
    # small-batch 1x1 convs) give the rounding noise floor of the reference itself, against which the fast
    # path's difference is judged.
    recorded = None
    for t, n_threads in ((ref, threads), (fast, threads), (ref, 1 if threads > 1 else 2)):
        torch.set_num_threads(n_threads)
        matcher = t.criterion.matcher
        t.criterion.matcher = replay = _replay_matcher(matcher, recorded)
        t.model.train()
        t.model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = t.model(NestedTensor(batch["images"], batch["mask"]), batch["patches"])
        losses = t.criterion(out, batch["targets"])
        total = sum(losses[k] * t.criterion.weight_dict[k] for k in losses if k in t.criterion.weight_dict)
        total.backward()
        t.criterion.matcher = matcher
        recorded = replay.calls if recorded is None else recorded
        replays.append(replay)
        flat = {k: v.detach() for k, v in out.items() if torch.is_tensor(v)}
        flat.update({f"loss/{k}": v.detach() for k, v in losses.items()})
        flat.update({f"grad/{n}": p.grad for n, p in t.model.named_parameters() if p.grad is not None})
        results.append(flat)

    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    def outlier_rows(a, b):
        """Rows (output units) of a 2-D gradient that differ by more than 1 % of their own norm, and the
        relative difference of the rest: a unit whose ReLU input lies within rounding of 0 may switch on one
        path and off on the other, which changes its whole row (a kink, not arithmetic drift)."""
        if a.dim() != 2:
            return 0, rel(a, b)
        d = (a - b).double().norm(dim=1) > 1e-2 * b.double().norm(dim=1).clamp_min(1e-30)
        return int(d.sum()), rel(a[~d], b[~d])

    report: dict[str, dict] = {}
    for k, v in results[0].items():
        kind = k.split("/")[0] if "/" in k else "output"
        r, floor = rel(results[1][k], v), rel(results[2][k], v)
        entry = report.setdefault(kind, {"max_rel": -1.0, "at": "", "floor": 0.0})
        if r > entry["max_rel"]:
            entry.update(max_rel=r, at=k)
            if kind == "grad":
                rows, rest = outlier_rows(results[1][k], v)
                entry.update(rows=rows, of_rows=v.shape[0], rest=rest)
        entry["floor"] = max(entry["floor"], floor)
    report["matching"] = {"changed": replays[1].changed, "floor_changed": replays[2].changed,
                          "total": replays[1].total}
    return report


def machine_info() -> dict:
    """What decides which CPU speed-up pays: the processor and its vector extensions, the math libraries
    torch was built with, its threading."""
    import platform
    import re

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        cpu = open("/proc/cpuinfo").read()
        first = cpu.split("\n\n")[0]
        info["cpu"] = re.search(r"model name\s*:\s*(.*)", first).group(1).strip()
        flags = re.search(r"flags\s*:\s*(.*)", first).group(1).split()
        info["flags"] = " ".join(f for f in flags if re.match(r"(avx|amx|fma|f16c|sse4|vnni)", f))
        info["hypervisor"] = "hypervisor" in flags
    except (OSError, AttributeError):
        info["cpu"] = platform.processor() or "unknown"
    cfg = torch.__config__.show()
    for key, pat in (("mkl", r"Intel\(R\) (?:oneAPI )?Math Kernel Library Version ([^\n]*)"),
                     ("onednn", r"Intel\(R\) MKL-DNN v?([^\s(]*)|oneDNN v?([^\s(]*)"),
                     ("cpu_capability", r"CPU capability usage: ([^\n]*)")):
        m = re.search(pat, cfg)
        info[key] = next((g for g in m.groups() if g), "").strip() if m else "not found"
    info["mkldnn_version"] = getattr(torch.backends.mkldnn, "version", lambda: None)() if hasattr(
        torch.backends, "mkldnn") else None
    info["parallel_info"] = torch.__config__.parallel_info().strip()
    return info


def print_machine(info: dict) -> None:
    print(f"machine: {info.get('cpu')}{' (virtual machine)' if info.get('hypervisor') else ''}; "
          f"torch {info['torch']}, MKL {info.get('mkl')}, oneDNN {info.get('onednn')}, "
          f"CPU capability {info.get('cpu_capability')}")
    print(f"  vector flags: {info.get('flags', '?')}")
    print("  " + "\n  ".join(info["parallel_info"].splitlines()))


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__] + args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _report(names: list[str], runs: dict[str, list[dict]], base: str) -> None:
    med = {n: {k: statistics.median(r[k] for r in runs[n]) for k in ("step_s", "cpu_s", "peak_rss_mb")}
           for n in names}
    for n in names:
        m = med[n]
        per = ", ".join(f"{r['step_s']:.3f}" for r in runs[n])
        line = (f"{n:14s} {m['step_s']:.3f} s/step (per process: {per}), CPU {m['cpu_s']:.3f} s/step, "
                f"peak RSS {m['peak_rss_mb']:.0f} MB, first step {runs[n][0]['first_step_s']:.1f} s")
        if "peak_gpu_mb" in runs[n][0]:
            line += f", peak GPU {runs[n][0]['peak_gpu_mb']:.0f} MB on {runs[n][0]['gpu']}"
        print(line)
    b = med[base]
    for n in names:
        if n != base:
            m = med[n]
            print(f"{n}/{base}: time x{m['step_s'] / b['step_s']:.2f}, CPU time x{m['cpu_s'] / b['cpu_s']:.2f}, "
                  f"peak RSS x{m['peak_rss_mb'] / b['peak_rss_mb']:.3f} ({m['peak_rss_mb'] - b['peak_rss_mb']:+.0f} MB)")


def _report_switches(runs: dict[str, list[dict]]) -> None:
    """Per switch: its own gain alone (against the reference path, or against its prerequisites) and what
    the default path loses without it. A gain < 1 is a speed-up; > 1 means the switch costs time here."""
    def med(n: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[n])

    print("per switch (x < 1: faster with it; wall time, CPU time in brackets):")
    print(f"  {'switch':24s} {'alone vs reference':>26s} {'default vs default without it':>32s}")
    for sw in SWITCHES:
        base = f"base:{sw}" if f"base:{sw}" in runs else "reference"
        alone = med(f"only:{sw}", "step_s") / med(base, "step_s")
        alone_c = med(f"only:{sw}", "cpu_s") / med(base, "cpu_s")
        drop = med("default", "step_s") / med(f"but:{sw}", "step_s")
        drop_c = med("default", "cpu_s") / med(f"but:{sw}", "cpu_s")
        against = "" if base == "reference" else " (vs its prerequisites)"
        print(f"  {sw:24s} {f'x{alone:.2f} (x{alone_c:.2f}){against}':>26s} {f'x{drop:.2f} (x{drop_c:.2f})':>32s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved fresh processes per variant")
    ap.add_argument("--extra", action="store_true", help="also time fold-only, channels-last-only, compile")
    ap.add_argument("--switches", action="store_true",
                    help="each CPU speed-up's own share: alone (reference + it) and all but it (default - it)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated variants to time instead (e.g. reference,default,only:onednn_linear)")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--child", choices=sorted(VARIANTS) + ["parity", "machine"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "parity":
        print(json.dumps(parity(a.threads)))
        return
    if a.child == "machine":
        print(json.dumps(machine_info()))
        return
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.warmup, a.threads)))
        return
    common = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
    names = ["reference", "default"] + (["fold", "channels_last", "compile"] if a.extra else [])
    if a.switches:
        names += [n for n in VARIANTS if n.split(":")[0] in ("only", "base", "but")]
    if a.variants:
        names = [n for n in a.variants.split(",") if n]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown or "reference" not in names:
            raise SystemExit(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)}); include reference")
    print_machine(_run_child(["--child", "machine"]))
    print(f"CPU, {a.threads} threads, {a.steps} timed steps after {a.warmup} warm-up, {a.repeats} interleaved "
          f"processes per variant")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(a.repeats):
        for n in names:
            runs[n].append(_run_child(["--child", n] + common))
            print(f"  ({n}: {runs[n][-1]['step_s']:.3f} s/step, CPU {runs[n][-1]['cpu_s']:.3f} s)", flush=True)
    _report(names, runs, "reference")
    if a.switches and not a.variants:
        _report_switches(runs)
    if not a.no_parity:
        p = _run_child(["--child", "parity", "--threads", str(a.threads)])
        print("parity, default vs reference path, largest relative difference (tensor norm) "
              f"[reference at {1 if a.threads > 1 else 2} thread(s) vs itself, the rounding floor]:")
        m = p.pop("matching")
        for k, v in p.items():
            extra = ""
            if v.get("rows"):
                extra = (f"; all but {v['rest']:.1e} of it in {v['rows']} of its {v['of_rows']} rows, units whose ReLU "
                         "input is within rounding of 0")
            print(f"  {k:7s} {v['max_rel']:.1e} ({v['at']}{extra}) [floor {v['floor']:.1e}]")
        print(f"  (compared under the reference's Hungarian assignment; the default path's own would differ in "
              f"{m['changed']} of {m['total']} image-layer matchings, the floor run's in {m['floor_changed']})")
    import torch

    if not torch.cuda.is_available():
        print("GPU: no CUDA device, skipped (gpu-reference / gpu-default / gpu-bf16 need one)")
        return
    gpu = ["gpu-reference", "gpu-default", "gpu-bf16"]
    gruns: dict[str, list[dict]] = {n: [] for n in gpu}
    for _ in range(a.repeats):
        for n in gpu:
            gruns[n].append(_run_child(["--child", n] + common))
    _report(gpu, gruns, "gpu-reference")


if __name__ == "__main__":
    main()
