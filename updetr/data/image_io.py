"""Robust image decoding: bytes -> RGB PIL image, with bad files and odd modes counted by reason."""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from updetr.data import skips
from updetr.data.skips import SkipCounter

# What the folder walkers and Ray's read_binary_files pick up (lower-case, no dot).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm", "pbm")


class BadImage(Exception):
    """An item that must be dropped; `reason` is a `skips` reason string."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def open_image(data: bytes) -> Image.Image:
    """Parse the header only (size and mode known, pixels not decoded yet). Raises BadImage."""
    if not data:
        raise BadImage(skips.EMPTY_FILE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Truncated File Read" on bad EXIF: the decode decides
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise BadImage(skips.UNREADABLE, str(e)) from None
    except Image.DecompressionBombError as e:
        raise BadImage(skips.DECODE_ERROR, str(e)) from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad item, never fatal
        raise BadImage(skips.UNREADABLE, f"{type(e).__name__}: {e}") from None


def decode_jpeg_rgb(data: bytes, img: Image.Image) -> Optional[np.ndarray]:
    """The pixels of a colour (YCbCr) JPEG as uint8 `[H, W, 3]` through torchvision's libjpeg-turbo decoder,
    or None where it does not apply (not a JPEG, another colour space) or fails (then PIL decodes the item
    and reports why it is bad). `img`: the same bytes opened by `open_image` (header only).

    Why: the same libjpeg-turbo decode with the same defaults (integer IDCT, fancy upsampling), so the
    same bytes as PIL's `load()` + `np.asarray` (tests/data/test_image_io.py, on photographs and on every
    chroma subsampling and progressive coding), in about half the CPU time: PIL decodes into its 4-byte
    pixel layout and then packs it to 3 bytes; torchvision writes the 3-byte array directly."""
    if img.format != "JPEG" or img.mode != "RGB":
        return None
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer warning: torchvision only reads it
            raw = torch.frombuffer(data, dtype=torch.uint8)
        chw = decode_jpeg(raw, mode=ImageReadMode.RGB)
    except Exception:  # noqa: BLE001 - PIL's decode then classifies the failure (truncated, corrupt, ...)
        return None
    hwc = chw.permute(1, 2, 0)
    if tuple(hwc.shape) != (img.size[1], img.size[0], 3) or not hwc.is_contiguous():
        return None
    return hwc.numpy()


def draft_reduced(img: Image.Image, min_w: int, min_h: int) -> tuple[float, float]:
    """Ask a JPEG decoder for a DCT-domain 1/2, 1/4 or 1/8 scale decode that stays >= (min_w, min_h).

    Returns the factor (orig_w / decoded_w_in_orig_units, ...) as floats: 1.0 when nothing was reduced
    (not a JPEG, already decoded, or the image is not at least 2x the requested size).
    """
    if img.format != "JPEG" or min_w <= 0 or min_h <= 0:
        return 1.0, 1.0
    w, h = img.size
    res = img.draft(img.mode if img.mode in ("L", "YCbCr") else None, (min_w, min_h))
    if res is None:
        return 1.0, 1.0
    _, box = res
    return w / box[2], h / box[3]


def load_pixels(img: Image.Image) -> None:
    """Decode the pixel data. Raises BadImage(truncated | decode_error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except OSError as e:
        msg = str(e).lower()
        reason = skips.TRUNCATED if ("truncated" in msg or "broken data" in msg or "premature" in msg) \
            else skips.DECODE_ERROR
        raise BadImage(reason, str(e)) from None
    except Exception as e:  # noqa: BLE001
        raise BadImage(skips.DECODE_ERROR, f"{type(e).__name__}: {e}") from None


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        out = np.clip(np.nan_to_num(arr) * scale, 0, 255)
    else:
        arr = arr.astype(np.int64)
        # 16-bit data spans 0..65535; 'I' images that only hold 8-bit values are kept as they are.
        out = arr * 255 / 65535 if arr.max(initial=0) > 255 else arr
        out = np.clip(out, 0, 255)
    return Image.fromarray(np.rint(out).astype(np.uint8), "L")


def to_rgb(img: Image.Image, counter: Optional[SkipCounter] = None) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; each conversion counted as `converted_<kind>` (the item is kept).

    Alpha is dropped (the colour under it kept, as `convert("RGB")` in the reference does);
    16-bit / 32-bit integer and float greyscale are rescaled to 0..255 rather than clipped.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        kind, out = "16bit", _sixteen_bit_to_l(img).convert("RGB")
    else:
        if mode == "CMYK":
            kind = "cmyk"
        elif mode in ("L", "1"):
            kind = "gray"
        elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
            kind = "alpha"
        elif mode == "P":
            kind = "palette"
        else:
            kind = "other"
        if mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # PIL warns when converting a transparent palette straight to RGB
        out = img.convert("RGB")
    if counter is not None:
        counter.add(skips.CONVERTED_PREFIX + kind)
    return out


def decode_rgb(data: bytes, counter: Optional[SkipCounter] = None) -> Image.Image:
    """Full decode of encoded bytes to an RGB image. Raises BadImage."""
    img = open_image(data)
    load_pixels(img)
    return to_rgb(img, counter)


def read_rgb(path: Path, counter: Optional[SkipCounter] = None) -> Image.Image:
    """Read and fully decode an image file to RGB. Raises BadImage (missing file, unreadable, undecodable)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImage(skips.MISSING_FILE, str(path)) from None
    except OSError as e:
        raise BadImage(skips.UNREADABLE, f"{path}: {e}") from None
    return decode_rgb(data, counter)
