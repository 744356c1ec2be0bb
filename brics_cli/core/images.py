"""Images: raw bytes -> fixed-size 8-bit RGB images (`brics shard`), and tensors <-> files.

The tensor convention of the whole package: float (..., 3, H, W) in [-1, 1]; `to_uint8` /
`from_uint8` convert (round half up, as PIL would store it), `png_bytes`, `load_image` and
`save_image_grid` read and write files. torch is imported inside those functions, so shard workers
that only decode and encode never pay for it.

decode_rgb -> (center|random)_crop_box -> crop_resize -> encode, plus decode_check for
`brics shard verify`. Every input that cannot become a training image raises `ImageSkip` with one
of `CATEGORIES`; the shard manifest counts them. Policies a user may need to know:

- Alpha (RGBA, LA, PA, P or L/RGB with a tRNS colour key) is composited over WHITE, the usual
  background of product photos and web graphics; black would darken every soft edge.
- 16-bit grayscale is scaled by its nominal range (value >> 8, so 65535 -> 255), never clipped and
  never stretched per image: a dark scan stays dark. Mode "I" (how PIL hands out some 16-bit
  PNG/TIFF data) is read as 16-bit: clipped to 0..65535, then >> 8. Float "F" is clipped to 0..255.
- EXIF orientation is applied, so portraits shot sideways come out upright.
- Only the first frame of a multi-frame file (GIF, APNG, animated WebP, TIFF pages) is used.
- The centre crop is the largest centred square, left = (w - s) // 2, as in LDM, StyleGAN2-ADA and
  clean-fid; the resize is PIL's antialiased `Image.resize` with `reducing_gap=None` (exact filter).
- Decompression bombs are refused from the header size, before any pixel is decoded; PIL's global
  `Image.MAX_IMAGE_PIXELS` is never touched.
"""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what brics reads as an image file
CATEGORIES = ("empty", "not_image", "corrupt", "truncated", "too_large", "too_small", "unreadable", "unsafe_path", "bad_name",
              "not_regular", "broken_link", "link_loop")
FILTERS = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "box": Image.BOX}
SMALL_POLICIES = ("skip", "upscale")
FORMAT_NAMES = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}  # extension -> PIL format

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112


class ImageSkip(Exception):
    """An input that cannot become a training image; `category` is counted in the shard manifest."""

    def __init__(self, category: str, detail: str):
        super().__init__(category, detail)  # both in args, so the exception pickles across workers
        self.category = category
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.category}: {self.detail}"


def _decode_error(exc: Exception) -> ImageSkip:
    """PIL reports a short file as 'image file is truncated' or 'Truncated File Read'."""
    message = f"{type(exc).__name__}: {exc}"
    return ImageSkip("truncated" if "truncated" in message.lower() else "corrupt", message)


def decode_rgb(data: bytes, *, max_pixels: int = 178_956_970) -> tuple[Image.Image, dict]:
    """Bytes -> 8-bit RGB image + info {"format", "mode", "size", "converted", "exif_transposed"}.

    `mode` and `size` are the file's own (before orientation and conversion); `converted` is e.g.
    "CMYK->RGB", "RGBA->RGB (alpha over white)" or None. The default `max_pixels` is the size at
    which PIL itself refuses a file as a decompression bomb (2 * its default MAX_IMAGE_PIXELS).
    """
    if not data:
        raise ImageSkip("empty", "0 bytes")
    with warnings.catch_warnings():
        # Our own max_pixels decides; PIL's warning (at half its error size) would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            info = {"format": img.format, "mode": img.mode, "size": list(img.size)}
            w, h = img.size
            if w * h > max_pixels:  # from the header, before decoding: the bomb never inflates
                raise ImageSkip("too_large", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
            img.load()  # decode every pixel now, so a truncated file is caught here
            img, info["exif_transposed"] = _apply_exif_orientation(img)
            img, info["converted"] = to_rgb(img)
        except ImageSkip:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageSkip("too_large", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise ImageSkip("not_image", "not an image format PIL can identify") from exc
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError...
            raise _decode_error(exc) from exc
    return img, info


def _apply_exif_orientation(img: Image.Image) -> tuple[Image.Image, bool]:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return img, False
    if orientation not in range(2, 9):
        return img, False
    return ImageOps.exif_transpose(img), True


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode -> 8-bit RGB, and a note of the conversion (None when already RGB, no alpha)."""
    mode = img.mode
    has_alpha = mode in _ALPHA_MODES or ("transparency" in img.info and mode in ("1", "L", "P", "RGB"))
    if has_alpha:
        return _alpha_over_white(img.convert("RGBA")), f"{mode}->RGB (alpha over white)"
    if mode == "RGB":
        return img, None
    if mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(img).astype(np.int64)  # (H, W); I;16B arrives big-endian, astype normalises it
        gray = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB"), f"{mode}->RGB"
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB"), f"{mode}->RGB"
    # CMYK (JPEG's Adobe-inverted CMYK is un-inverted by the decoder), L, 1, P, YCbCr, ...: PIL's
    # own matrix conversion, no colour management.
    return img.convert("RGB"), f"{mode}->RGB"


def _alpha_over_white(rgba: Image.Image) -> Image.Image:
    """out = (c * a + 255 * (255 - a)) / 255, rounded: a = 0 gives white, a = 255 keeps c."""
    x = np.asarray(rgba, dtype=np.uint32)  # (H, W, 4)
    a = x[..., 3:]
    rgb = (x[..., :3] * a + 255 * (255 - a) + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """Largest centred square (left, top, right, bottom), as LDM / StyleGAN2-ADA / clean-fid do: left = (w - s) // 2."""
    s = min(width, height)
    left, top = (width - s) // 2, (height - s) // 2
    return left, top, left + s, top + s


def random_crop_box(width: int, height: int, size: int, rng: random.Random) -> tuple[int, int, int, int]:
    """A size x size square at a uniformly random position (size <= min(w, h)), for WebVid frames and the demo set."""
    if not 1 <= size <= min(width, height):
        raise ValueError(f"crop size {size} must be in 1..{min(width, height)} for a {width}x{height} image")
    left = rng.randint(0, width - size)
    top = rng.randint(0, height - size)
    return left, top, left + size, top + size


def crop_resize(
    img: Image.Image, box: tuple[int, int, int, int], resolution: int, filter: str = "lanczos", small: str = "skip"
) -> Image.Image:
    """Crop `box` then resize to resolution x resolution with PIL's antialiased `Image.resize(..., reducing_gap=None)`.

    If the box side < resolution: small="skip" raises ImageSkip("too_small", ...); small="upscale" resizes up.
    """
    if filter not in FILTERS:
        raise ValueError(f"unknown resize filter '{filter}': choose one of {', '.join(FILTERS)}")
    if small not in SMALL_POLICIES:
        raise ValueError(f"unknown small-image policy '{small}': choose one of {', '.join(SMALL_POLICIES)}")
    side = min(box[2] - box[0], box[3] - box[1])
    if side < resolution and small == "skip":
        raise ImageSkip("too_small", f"crop side {side}px < resolution {resolution}px (use --small upscale to keep it)")
    # reducing_gap=None: one exact pass of the filter, no JPEG-draft or 2x box pre-shrink shortcuts.
    return img.crop(box).resize((resolution, resolution), FILTERS[filter], reducing_gap=None)


def encode(img: Image.Image, fmt: str = "png", quality: int = 95) -> bytes:
    """Deterministic bytes: PNG (compress_level=6, optimize=False, no metadata), JPEG (quality, subsampling 4:4:4
    when quality >= 90, no EXIF), WebP (lossless when quality == 100 else quality, method 4). Same image -> same
    bytes every call."""
    if fmt not in FORMAT_NAMES:
        raise ValueError(f"unknown image format '{fmt}': choose one of png, jpg, webp")
    clean = img.copy()
    clean.info.clear()  # PNG would otherwise copy an ICC profile, gamma or text over from img.info
    buf = io.BytesIO()
    if FORMAT_NAMES[fmt] == "PNG":
        clean.save(buf, "PNG", compress_level=6, optimize=False)
    elif FORMAT_NAMES[fmt] == "JPEG":
        subsampling = 0 if quality >= 90 else 2  # 0 = 4:4:4, 2 = 4:2:0
        clean.save(buf, "JPEG", quality=quality, subsampling=subsampling, optimize=False, progressive=False)
    elif quality == 100:
        clean.save(buf, "WEBP", lossless=True, quality=100, method=4)
    else:
        clean.save(buf, "WEBP", lossless=False, quality=quality, method=4)
    return buf.getvalue()


def decode_check(data: bytes, fmt: str) -> tuple[int, int]:
    """Decode an encoded sample fully (for `brics shard verify`); returns (w, h); raises ImageSkip('corrupt', ...) on failure."""
    expected = FORMAT_NAMES.get(fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception as exc:
            raise ImageSkip("corrupt", f"{fmt} sample does not decode ({type(exc).__name__}: {exc})") from exc
    if img.format != expected:
        raise ImageSkip("corrupt", f"sample named .{fmt} holds {img.format} data")
    return img.size


# -- tensors <-> files ------------------------------------------------------------------------------


def is_image_file(path) -> bool:
    """An image by its suffix, not hidden."""
    from pathlib import Path

    path = Path(path)
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def to_uint8(images):
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., 3, H, W), clamped and rounded."""
    import torch

    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images):
    """uint8 (..., 3, H, W) -> float32 (..., 3, H, W) in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def array_to_tensor(array):
    """An 8-bit RGB array (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    import torch

    return from_uint8(torch.tensor(array).permute(2, 0, 1))  # a copy: PIL arrays are read-only


def png_bytes(image) -> bytes:
    """One image (3, H, W) in [-1, 1] -> PNG bytes, rounded to 8 bits."""
    array = to_uint8(image).cpu().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def load_image(path, device="cpu"):
    """An image file -> (3, H, W) float in [-1, 1]. Unreadable files raise `ImageSkip` naming the file."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:  # truncated, empty, not an image
        skip = _decode_error(exc)
        raise ImageSkip(skip.category, f"{path}: {skip.detail}") from exc
    return array_to_tensor(array).to(device)


def save_image_grid(images, path, per_row: int) -> None:
    """Images (N, 3, H, W) in [-1, 1] as one PNG, `per_row` to a row (a partial last row is kept,
    padded with black), written atomically. Layout by `torchvision.utils.make_grid`, without gaps."""
    from torchvision.utils import make_grid

    from brics_cli.core.files import atomic_write_bytes

    grid = make_grid(images.detach().float().cpu(), nrow=max(1, per_row), padding=0, pad_value=-1.0)  # (3, rows*H, per_row*W)
    atomic_write_bytes(path, png_bytes(grid))
