"""Bad inputs are converted, clipped or skipped, counted by reason, and never fatal (local path)."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

from updetr.config import load_config
from updetr.data import local_pretrain_batches, skips
from updetr.data.image_io import BadImage, decode_rgb, to_rgb
from updetr.data.pretext import draw_sample
from updetr.data.skips import SkipCounter
from updetr.data.synthetic import write_bad_files, write_image_folder

EXPECTED = {"empty": skips.EMPTY_FILE, "not_an_image": skips.UNREADABLE, "truncated": skips.TRUNCATED,
            "too_small": skips.TOO_SMALL}
CONVERTED = {"cmyk": "converted_cmyk", "gray": "converted_gray", "rgba": "converted_alpha",
             "sixteen_bit": "converted_16bit", "palette": "converted_palette"}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_dropped_cases(tmp_path, case):
    pcfg = load_config(None, ["tracking.enabled=false"]).pretext
    files = write_bad_files(tmp_path, min_image_px=pcfg.min_image_px)
    counter = SkipCounter()
    data = (tmp_path / files[case]).read_bytes()
    with pytest.raises(BadImage) as e:
        img = decode_rgb(data, counter)
        draw_sample(img.width, img.height, pcfg, (0, 0))  # the product's size check (too_small)
    assert e.value.reason == EXPECTED[case]


@pytest.mark.parametrize("case", sorted(CONVERTED))
def test_converted_cases(tmp_path, case):
    files = write_bad_files(tmp_path)
    counter = SkipCounter()
    img = decode_rgb((tmp_path / files[case]).read_bytes(), counter)
    assert img.mode == "RGB" and counter.total == {CONVERTED[case]: 1}
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and 20 < arr.mean() < 235  # rescaled, not clipped to black/white


def test_sixteen_bit_is_rescaled_not_clipped():
    arr = np.array([[0, 32896, 65535]] * 20, dtype=np.uint16).repeat(20, axis=1)
    out = np.asarray(to_rgb(Image.fromarray(arr)))
    assert out[0, 0, 0] == 0 and out[0, 30, 0] == 128 and out[0, -1, 0] == 255


def test_folder_with_every_bad_case(tmp_path, cfg_factory, caplog):
    root = tmp_path / "imgs"
    write_image_folder(root, 5, seed=2, size_range=(40, 60))
    bad = write_bad_files(root / "bad")
    os.symlink(root / "does_not_exist.jpg", root / "bad" / "dangling.jpg")  # listed, then missing
    cfg = cfg_factory("data.source=folder", f"data.path={root}", "data.batch_size=3", "data.num_workers=2")
    with caplog.at_level(logging.INFO, logger="updetr.data"):
        batches = list(local_pretrain_batches(cfg, 0))
    seen: dict[str, int] = {}
    for b in batches:
        assert b["images"].shape[0] == len(b["targets"]) <= 3
        for k, v in b["skipped"].items():
            seen[k] = seen.get(k, 0) + v
    n_good = sum(len(b["targets"]) for b in batches)
    assert n_good == 5 + len(CONVERTED)
    expected = {r: 1 for r in EXPECTED.values()} | {r: 1 for r in CONVERTED.values()} | {skips.MISSING_FILE: 1}
    assert seen == expected
    assert len(bad) == len(EXPECTED) + len(CONVERTED)
    assert any("bad-data events by reason" in r.message and "missing_file=1" in r.message for r in caplog.records)


def test_counter_take_and_total():
    c = SkipCounter()
    c.add("a"); c.add("a"); c.add("b", 3)
    assert c.take() == {"a": 2, "b": 3} and c.take() == {}
    c.add("a")
    assert c.total == {"a": 3, "b": 3} and c.take() == {"a": 1}
    assert "a=3" in c.summary()
