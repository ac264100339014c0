"""The fast JPEG path (`decode_jpeg_rgb`, torchvision's decoder) gives PIL's pixels exactly, or steps aside."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from updetr.data.image_io import decode_jpeg_rgb, open_image

PHOTOS = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "photos").glob("*.jpg"))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _pil_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _photo_crops():
    """Real photographs re-encoded at odd sizes, every chroma subsampling, baseline and progressive."""
    for i, path in enumerate(PHOTOS):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        crop = img.crop((i, 2 * i, w - 3 * i - 1, h - i - 1))  # odd sizes: partial MCUs at the edges
        for sub in (0, 1, 2):  # 4:4:4, 4:2:2, 4:2:0
            yield f"{path.stem}-sub{sub}", _jpeg(crop, quality=87, subsampling=sub)
        yield f"{path.stem}-progressive", _jpeg(crop, quality=75, progressive=True)
        yield f"{path.stem}-as-shipped", path.read_bytes()


@pytest.mark.parametrize("name,data", list(_photo_crops()), ids=lambda v: v if isinstance(v, str) else "")
def test_fast_jpeg_decode_equals_pil(name, data):
    arr = decode_jpeg_rgb(data, open_image(data))
    assert arr is not None, name
    assert arr.dtype == np.uint8 and arr.flags.c_contiguous
    assert np.array_equal(arr, _pil_pixels(data)), name


def test_fast_jpeg_decode_steps_aside_for_other_inputs():
    """Grey and CMYK JPEGs, PNGs and truncated JPEGs go to PIL (which converts, counts or rejects them)."""
    rgb = Image.open(PHOTOS[0]).convert("RGB").resize((96, 64))
    cases = {"grey jpeg": _jpeg(rgb.convert("L")), "cmyk jpeg": _jpeg(rgb.convert("CMYK"))}
    png = io.BytesIO()
    rgb.save(png, "PNG")
    cases["png"] = png.getvalue()
    cases["truncated jpeg"] = _jpeg(rgb)[:-300]
    for name, data in cases.items():
        assert decode_jpeg_rgb(data, open_image(data)) is None, name
