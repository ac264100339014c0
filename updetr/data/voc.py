"""Pascal VOC (2007 / 2012 XML) -> an in-memory COCO dict usable by pycocotools `COCO()`.

Splits follow the usual detection protocol: train = trainval of VOC2007 + VOC2012 (those present),
eval = VOC2007 test. Category ids are 1..20 in `VOC_CLASSES` order (num_classes = 21 by DETR's rule).
`difficult` objects are kept in the dict with `iscrowd = 1`: COCOeval then treats them as ignore regions
(matches on them neither count as true nor false positives; note crowd matching uses
intersection / detection area), and the training targets drop them, as DETR drops crowd boxes.
VOC boxes are 1-based inclusive pixel indices: COCO x = xmin - 1, w = xmax - xmin + 1.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

from updetr.config.oneshot import VOC_CLASSES  # the one list; the one-shot section checks names against it
from updetr.data import skips
from updetr.data.skips import SkipCounter

TRAIN_SETS = (("2007", "trainval"), ("2012", "trainval"))
TEST_SETS = (("2007", "test"),)


def voc_image_id(year: str, stem: str) -> int:
    """Stable int id: '2007'/'000005' -> 2007000005, '2012'/'2008_000123' -> 2008000123."""
    if "_" in stem:
        y, n = stem.split("_", 1)
        return int(y) * 1_000_000 + int(n)
    return int(year) * 1_000_000 + int(stem)


def parse_voc_xml(path: str | os.PathLike) -> dict:
    """One annotation file -> {filename, width, height, objects: [(name, xmin, ymin, xmax, ymax, difficult)]}."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    out = {"filename": (root.findtext("filename") or "").strip(),
           "width": int(float(size.findtext("width"))) if size is not None else 0,
           "height": int(float(size.findtext("height"))) if size is not None else 0, "objects": []}
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        out["objects"].append((obj.findtext("name", "").strip(), float(bb.findtext("xmin")),
                               float(bb.findtext("ymin")), float(bb.findtext("xmax")),
                               float(bb.findtext("ymax")), int(float(obj.findtext("difficult", "0") or 0))))
    return out


def available_sets(devkit: str | os.PathLike, sets: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(y, s) for y, s in sets if (Path(devkit) / f"VOC{y}" / "ImageSets" / "Main" / f"{s}.txt").is_file()]


def voc_to_coco(devkit: str | os.PathLike, sets: Sequence[tuple[str, str]],
                counter: Optional[SkipCounter] = None) -> dict:
    """COCO dict for the listed (year, split) sets under a VOCdevkit root; `file_name` is relative to it.

    Unknown class names and boxes empty after clipping to the image are dropped (`box_degenerate`),
    boxes crossing the border are clipped (`box_clipped`), ids without an XML file are skipped
    (`missing_file`); a missing JPEG is reported when the dataset reads it.
    """
    devkit = Path(devkit)
    counter = counter if counter is not None else SkipCounter()
    cat_id = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
    images, anns = [], []
    for year, split in sets:
        base = devkit / f"VOC{year}"
        ids = (base / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        for stem in ids:
            xml = base / "Annotations" / f"{stem}.xml"
            if not xml.is_file():
                counter.add(skips.MISSING_FILE)
                continue
            info = parse_voc_xml(xml)
            w, h = info["width"], info["height"]
            image_id = voc_image_id(year, stem)
            images.append({"id": image_id, "file_name": f"VOC{year}/JPEGImages/{stem}.jpg", "width": w, "height": h})
            for name, xmin, ymin, xmax, ymax, difficult in info["objects"]:
                x0, y0, x1, y1 = xmin - 1, ymin - 1, xmax, ymax
                c = (max(x0, 0.0), max(y0, 0.0), min(x1, float(w)) if w else x1, min(y1, float(h)) if h else y1)
                if name not in cat_id or not (c[2] > c[0] and c[3] > c[1]):
                    counter.add(skips.BOX_DEGENERATE)
                    continue
                if c != (x0, y0, x1, y1):
                    counter.add(skips.BOX_CLIPPED)
                bw, bh = c[2] - c[0], c[3] - c[1]
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_id[name],
                             "bbox": [c[0], c[1], bw, bh], "area": bw * bh, "iscrowd": int(difficult),
                             "difficult": int(difficult)})
    return {"info": {"description": f"Pascal VOC {sets}"}, "licenses": [], "images": images,
            "annotations": anns, "categories": [{"id": i + 1, "name": n, "supercategory": "voc"}
                                                for i, n in enumerate(VOC_CLASSES)]}
