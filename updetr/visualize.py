"""`updetr visualize`: the paper's Fig. 5, unsupervised localisation of query patches by a pre-trained model.

Given an image and M query patches (boxes on the image, or M drawn by the pre-training sampler), the
pre-trained UP-DETR gets the image and the M crops exactly as in pre-training at eval time (image resized
to the largest pre-training scale, crops resized to `pretext.patch_size`, ImageNet-normalised, no random
augmentation), with its N queries split into M groups of N/M. For each patch the best box of its own group
(highest patch probability, as the official `visualization.ipynb` does) is drawn on the image in the
patch's colour, with the crops in a strip below; `compare` adds the patch boxes themselves (dashed) and
the IoU of prediction and patch.

Coordinates: a patch is `x,y,w,h` in pixels of the original image (xyxy = x, y, x+w, y+h); predictions
are reported in the same pixels.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from updetr.checkpoint import load_checkpoint, strip_prefixes
from updetr.config import ExperimentConfig, PretextConfig, config_from_dict, load_config

# Offsets the random-patch stream away from the per-sample streams of pre-training (same seed, other draws).
_RANDOM_PATCH_TAG = 0xF165


class VisualizeError(ValueError):
    """Bad input to `updetr visualize`; the message names the patch / file and the reason."""


@dataclass(frozen=True)
class PatchResult:
    """One query patch and the best prediction of its query group (pixels of the original image)."""

    index: int
    patch: tuple[int, int, int, int]   # xyxy, ints
    pred: tuple[float, float, float, float]  # xyxy
    score: float                       # patch probability of the chosen query
    iou: float                         # IoU(pred, patch)
    query: int                         # query slot of the chosen prediction


# ---------------------------------------------------------------------------------------------- model

# Official `args` names -> (section, field) of our config, for checkpoints converted from the official code.
_OFFICIAL_ARGS = {
    "backbone": ("model", "backbone"), "hidden_dim": ("model", "hidden_dim"), "nheads": ("model", "nheads"),
    "enc_layers": ("model", "enc_layers"), "dec_layers": ("model", "dec_layers"),
    "dim_feedforward": ("model", "dim_feedforward"), "pre_norm": ("model", "pre_norm"),
    "num_queries": ("model", "num_queries"), "dilation": ("model", "dilation"),
    "position_embedding": ("model", "position_embedding"), "num_patches": ("pretext", "num_patches"),
}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a folder: a `updetr debug` run (`checkpoints/last.pt`), its checkpoints folder
    (`last.pt`), or a Ray Train checkpoint directory (`checkpoint.pt`, see orchestration.run_plan)."""
    path = Path(path)
    if path.is_dir():
        for cand in (path / "checkpoints" / "last.pt", path / "last.pt", path / "checkpoint.pt"):
            if cand.is_file():
                return cand
        raise VisualizeError(f"{path}: folder holds no checkpoints/last.pt, last.pt or checkpoint.pt")
    if not path.is_file():
        raise VisualizeError(f"{path}: no such checkpoint file or run folder")
    return path


def _official_config(args: dict) -> dict:
    tree: dict = {"task": "pretrain", "model": {}, "pretext": {}}
    for name, (section, field) in _OFFICIAL_ARGS.items():
        if args.get(name) is not None:
            tree[section][field] = args[name]
    return tree


def pretrain_config(ckpt: dict, path: Path, config_path: Optional[str | Path] = None) -> ExperimentConfig:
    """Model settings of a pre-training checkpoint: its stored config, else the official args of a converted
    file, else `config_path`. The checkpoint's weights decide feature_recon and num_classes."""
    state = strip_prefixes(ckpt["model"])
    if not any(k.startswith("patch2query.") for k in state):
        stored = (ckpt.get("config") or {}).get("task")
        kind = f"a {stored} checkpoint" if stored else "not a pre-training checkpoint"
        raise VisualizeError(f"{path}: {kind} without patch2query weights; visualize needs an UP-DETR "
                             "pre-training checkpoint (task pretrain, or a converted official pre-training file)")
    if ckpt.get("config"):
        tree, origin = dict(ckpt["config"]), "its stored config"
    elif ckpt.get("official_args"):
        tree, origin = _official_config(ckpt["official_args"]), "its official args"
    elif config_path is not None:
        return _with_weights(load_config(config_path), state)  # ConfigError names the YAML and field
    else:
        raise VisualizeError(f"{path}: the checkpoint stores no config; pass the pre-training experiment "
                             "with --config EXP.yaml")
    try:
        cfg = config_from_dict(tree)
    except ValueError as e:
        raise VisualizeError(f"{path}: {origin} is not usable ({str(e).splitlines()[0]})") from None
    return _with_weights(cfg, state)


def _with_weights(cfg: ExperimentConfig, state: dict) -> ExperimentConfig:
    """Config for the eval model: pre-training task, heads as in the weights, no backbone file to read (the
    checkpoint holds the backbone)."""
    from updetr.tasks import task_class

    if not task_class(cfg.task).visualize:
        raise VisualizeError(f"the config is for task '{cfg.task}'; visualize needs a pre-training config")
    num_classes = int(state["class_embed.weight"].shape[0]) - 1 if "class_embed.weight" in state else None
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"backbone_weights": None, "num_classes": num_classes}),
        "pretext": cfg.pretext.model_copy(update={
            "feature_recon": any(k.startswith("feature_align.") for k in state)}),
    })


def load_pretrain_model(checkpoint: str | Path, config_path: Optional[str | Path] = None):
    """-> (UPDETR in eval mode on CPU, its ExperimentConfig, checkpoint path). Weights load strictly."""
    from updetr.models import build_updetr

    path = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(path)  # weights_only=True; CheckpointError names the file
    cfg = pretrain_config(ckpt, path, config_path)
    if cfg.model.detector != "detr":
        raise VisualizeError(f"{path}: updetr visualize draws DETR pre-training checkpoints; this one is "
                             f"model.detector {cfg.model.detector}")
    model = build_updetr(cfg, cfg.num_classes)[0]
    try:
        model.load_state_dict(strip_prefixes(ckpt["model"]), strict=True)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise VisualizeError(f"{path}: weights do not fit the model of its config ({first[:300]})") from None
    return model.eval(), cfg, path


# -------------------------------------------------------------------------------------------- inputs

def read_image(path: str | Path) -> Image.Image:
    """Decode an image file to RGB; VisualizeError names the file and the reason."""
    from updetr.data.image_io import BadImage, load_pixels, open_image, to_rgb

    path = Path(path)
    if not path.is_file():
        raise VisualizeError(f"{path}: no such image file")
    try:
        img = open_image(path.read_bytes())
        load_pixels(img)
        return to_rgb(img)
    except BadImage as e:
        raise VisualizeError(f"{path}: cannot read the image ({e})") from None


def parse_patch(text: str, index: int) -> tuple[int, int, int, int]:
    """'x,y,w,h' (pixels) -> xyxy ints."""
    parts = text.split(",")
    try:
        x, y, w, h = (int(float(p)) for p in parts)
        if len(parts) != 4:
            raise ValueError
    except ValueError:
        raise VisualizeError(f"patch {index} ({text}): expected x,y,w,h in pixels") from None
    return x, y, x + w, y + h


def check_patches(boxes: Sequence[Sequence[int]], width: int, height: int, min_px: int, max_patches: int) -> None:
    """Each xyxy patch inside the (width, height) image and at least `min_px` on a side; at most
    `max_patches` of them (the model's query groups)."""
    if not boxes:
        raise VisualizeError("no query patches given")
    if len(boxes) > max_patches:
        raise VisualizeError(f"{len(boxes)} query patches given; this model has {max_patches} query groups "
                             "(pretext.num_patches), so at most that many")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        name = f"patch {i} ({x0},{y0},{x1 - x0},{y1 - y0})"
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise VisualizeError(f"{name}: outside the {width}x{height} image")
        if x1 - x0 < min_px or y1 - y0 < min_px:
            raise VisualizeError(f"{name}: smaller than the minimum patch size {min_px} px "
                                 "(pretext.min_patch_px)")


def random_patches(width: int, height: int, m: int, pcfg: PretextConfig, seed: int) -> np.ndarray:
    """M patches from the pre-training sampler (official size distribution) -> int64 `[M, 4]` xyxy."""
    from updetr.data.pretext import sample_patch_boxes
    from updetr.data.seeding import numpy_rng

    if m <= 0:
        raise VisualizeError(f"--random {m}: need at least one patch")
    try:
        return sample_patch_boxes(width, height, m, numpy_rng((seed, _RANDOM_PATCH_TAG)), pcfg.min_patch_px)
    except ValueError as e:
        raise VisualizeError(f"--random: {e}") from None


def model_inputs(img: Image.Image, boxes: np.ndarray, pcfg: PretextConfig, size: int) -> dict:
    """The pre-training transform at eval time, for one image and its patches.

    Returns dict(image float32 `[3, H, W]`, patches float32 `[M, 3, P, P]` (both ImageNet-normalised),
    patches_u8 uint8 `[M, P, P, 3]` (what the model sees, for the strip)). Reuses the pre-training
    renderer with augmentation off, so crops and resizes are those of training.
    """
    from updetr.data.pretext import SampleDraws, draw_patch_aug, render_record, resized_size
    from updetr.data.seeding import numpy_rng
    from updetr.data.tensors import normalize_image, normalize_patches

    w, h = img.size
    ow, oh = resized_size(w, h, size, pcfg.max_size)
    # render_record wants augmentation parameters; with augment=False they are never applied.
    aug = draw_patch_aug(numpy_rng((0,)), len(boxes))
    rec = render_record(img, w, h, SampleDraws(ow, oh, np.asarray(boxes, dtype=np.int64), aug),
                        pcfg.model_copy(update={"augment": False}), image_id=0)
    return {"image": normalize_image(rec["image"]), "patches": normalize_patches(rec["patches"]),
            "patches_u8": rec["patches"]}


# ------------------------------------------------------------------------------------------ predict

def best_per_group(outputs: dict, num_groups: int, orig_hw: tuple[int, int]):
    """Best prediction of each query group.

    Args:
        outputs: `pred_logits [1, G*Q, K+1]`, `pred_boxes [1, G*Q, 4]` (normalised cxcywh) for G groups.
        orig_hw: (h, w) to scale boxes to.
    Returns:
        scores float `[G]` (max non-background probability), boxes float `[G, 4]` xyxy pixels,
        queries int64 `[G]` (slot of the chosen query in the whole output).
    """
    from updetr.models.postprocess import PostProcess

    res = PostProcess()(outputs, torch.tensor([list(orig_hw)]))[0]
    n = res["scores"].shape[0]
    if n % num_groups:
        raise ValueError(f"{n} predictions do not split into {num_groups} query groups")
    per = n // num_groups
    best = res["scores"].view(num_groups, per).argmax(1)
    queries = best + torch.arange(num_groups) * per
    return res["scores"][queries], res["boxes"][queries], queries


@torch.no_grad()
def predict(model, inputs: dict, orig_hw: tuple[int, int]):
    """Run the model (eval mode) on one image and its M patches -> `best_per_group` of the M groups."""
    out = model(inputs["image"][None], inputs["patches"][None])
    return best_per_group(out, inputs["patches"].shape[0], orig_hw)


# ------------------------------------------------------------------------------------------- render

@dataclass(frozen=True)
class Layout:
    """Pixel layout of the PNG: the image on top (longer side scaled to `width`, centred), a strip of M
    patch tiles below."""

    width: int          # PNG width
    height: int         # PNG height
    scale: float        # PNG pixels per original image pixel
    image_x: int        # left edge of the image panel
    image_w: int        # size of the image panel (top of the PNG)
    image_h: int
    tile: int           # side of a patch tile
    gap: int
    label_h: int        # text row above the tiles

    def tile_left(self, i: int, m: int) -> int:
        """x (PNG pixels) of tile i's left edge; the row of M tiles is centred."""
        row = m * self.tile + (m - 1) * self.gap
        return (self.width - row) // 2 + i * (self.tile + self.gap)

    def to_png(self, x: float, y: float) -> tuple[float, float]:
        """Original-image pixel (x, y) -> PNG pixel (column, row)."""
        return self.image_x + x * self.scale, y * self.scale


def make_layout(img_w: int, img_h: int, m: int, width: int = 800, max_tile: int = 128) -> Layout:
    """PNG layout for an (img_w, img_h) image and M patches; the PNG is `width` wide."""
    gap, label_h = 8, 18
    scale = width / max(img_w, img_h)  # a portrait image would otherwise make a very tall PNG
    image_w, image_h = int(round(img_w * scale)), int(round(img_h * scale))
    tile = max(8, min(max_tile, (width - (m + 1) * gap) // m))
    return Layout(width, image_h + gap + label_h + tile + gap, scale, (width - image_w) // 2, image_w, image_h,
                  tile, gap, label_h)


def patch_colors(m: int) -> list[tuple[float, float, float]]:
    """One distinct RGB colour (0..1) per patch: tab10, then tab20 for more."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if m <= 10 else "tab20"]
    return [tuple(cmap(i % cmap.N)[:3]) for i in range(m)]


def render(image: np.ndarray, patches_u8: np.ndarray, results: Sequence[PatchResult], out: str | Path,
           compare: bool = False, width: int = 800) -> Layout:
    """Draw the figure into a PNG at `out`.

    Args:
        image: uint8 `[H, W, 3]` original image.
        patches_u8: uint8 `[M, P, P, 3]` patch crops as the model saw them.
        results: M PatchResults (boxes in original pixels).
        compare: also draw the patch boxes (dashed) and the IoU.
    Returns:
        the Layout (PNG size and coordinate mapping).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    m = len(results)
    lay = make_layout(w, h, m, width)
    dpi = 100
    fig = Figure(figsize=(lay.width / dpi, lay.height / dpi), dpi=dpi, facecolor="white")
    colors = patch_colors(m)

    ax = fig.add_axes((lay.image_x / lay.width, 1 - lay.image_h / lay.height, lay.image_w / lay.width,
                       lay.image_h / lay.height))
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest", aspect="auto")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    placed: list[tuple[float, float]] = []  # PNG positions of the score labels drawn so far
    for r, c in zip(results, colors):
        if compare:
            x0, y0, x1, y1 = r.patch
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=1.5,
                                   linestyle=(0, (4, 3)), antialiased=False))
        x0, y0, x1, y1 = r.pred
        # Not antialiased: axis-aligned edges stay the patch's exact colour (what a reader matches by eye).
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=2.5,
                               antialiased=False))
        # Labels that would cover an earlier one stack downwards, so coinciding boxes stay readable.
        lx, ly = lay.to_png(x0, y0)
        while any(abs(lx - px) < 44 and abs(ly - py) < 13 for px, py in placed):
            ly += 13
        placed.append((lx, ly))
        ax.text(x0, (ly - lay.to_png(0, 0)[1]) / lay.scale, f"#{r.index} {r.score:.2f}", color="white",
                fontsize=8, ha="left", va="top", clip_on=True, bbox=dict(facecolor=c, edgecolor="none", pad=1.0))

    for i, (r, c) in enumerate(zip(results, colors)):
        left = lay.tile_left(i, m)
        tax = fig.add_axes((left / lay.width, lay.gap / lay.height, lay.tile / lay.width, lay.tile / lay.height))
        tax.imshow(patches_u8[i], interpolation="bilinear", aspect="auto")
        tax.set_xticks([])
        tax.set_yticks([])
        for spine in tax.spines.values():
            spine.set_edgecolor(c)
            spine.set_linewidth(3)
        label = f"#{i} {r.score:.2f}" + (f" IoU {r.iou:.2f}" if compare else "")
        fig.text((left + lay.tile / 2) / lay.width, (lay.gap + lay.tile + 3) / lay.height, label, color=c,
                 fontsize=8 if lay.tile >= 64 else 6, ha="center", va="bottom", fontweight="bold")

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    return lay


# --------------------------------------------------------------------------------------------- main

def visualize(checkpoint: str | Path, image: str | Path, *, patches: Optional[Sequence[str]] = None,
              random: Optional[int] = None, out: str | Path = "patch_queries.png", compare: bool = False,
              config: Optional[str | Path] = None, seed: int = 0, size: Optional[int] = None,
              width: int = 800) -> list[PatchResult]:
    """The whole command: load, crop, predict, draw. Returns one PatchResult per patch.

    `size` is the shorter side the image is resized to for the model (default: the largest of
    `pretext.scales`, as DETR evaluates at its largest training scale); `pretext.max_size` caps the longer.
    Without `patches` and `random`, draws `pretext.num_patches` random patches.
    """
    if patches and random is not None:
        raise VisualizeError("give either --patches or --random, not both")
    model, cfg, _ = load_pretrain_model(checkpoint, config)
    pcfg = cfg.pretext
    img = read_image(image)
    w, h = img.size
    if patches:
        boxes = np.array([parse_patch(p, i) for i, p in enumerate(patches)], dtype=np.int64)
    else:
        m = pcfg.num_patches if random is None else random
        if m > pcfg.num_patches:
            raise VisualizeError(f"--random {m}: this model has {pcfg.num_patches} query groups "
                                 "(pretext.num_patches), so at most that many")
        boxes = random_patches(w, h, m, pcfg, seed)
    check_patches(boxes.tolist(), w, h, pcfg.min_patch_px, pcfg.num_patches)
    if size is not None and size <= 0:
        raise VisualizeError(f"--size {size}: must be positive")

    inputs = model_inputs(img, boxes, pcfg, size or max(pcfg.scales))
    scores, pred, queries = predict(model, inputs, (h, w))
    from updetr.util.box_ops import box_iou

    ious = box_iou(pred, torch.as_tensor(boxes, dtype=torch.float32))[0].diagonal()
    results = [PatchResult(i, tuple(int(v) for v in boxes[i]), tuple(float(v) for v in pred[i]),
                           float(scores[i]), float(ious[i]), int(queries[i])) for i in range(len(boxes))]
    render(np.asarray(img), inputs["patches_u8"], results, out, compare=compare, width=width)
    return results


def format_result(r: PatchResult) -> str:
    """One line per patch: boxes as x,y,w,h in original pixels."""
    px0, py0, px1, py1 = r.patch
    x0, y0, x1, y1 = r.pred
    return (f"patch {r.index}: box {px0},{py0},{px1 - px0},{py1 - py0} -> predicted "
            f"{x0:.1f},{y0:.1f},{x1 - x0:.1f},{y1 - y0:.1f}  score {r.score:.3f}  IoU {r.iou:.3f}  "
            f"(query {r.query})")
