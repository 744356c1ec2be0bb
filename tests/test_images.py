"""brics_cli.core.images: skip categories, mode conversions, crops, resize and deterministic encoding.

Every fixture is built here with PIL / numpy, in memory.
"""

import io
import pickle
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from brics_cli.core.images import (
    CATEGORIES,
    FILTERS,
    ImageSkip,
    center_crop_box,
    crop_resize,
    decode_check,
    decode_rgb,
    encode,
    random_crop_box,
)


def to_bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def skip_category(data, **kw):
    with pytest.raises(ImageSkip) as info:
        decode_rgb(data, **kw)
    assert info.value.category in CATEGORIES
    return info.value.category


def patch_png_size(png, width, height):
    """Rewrite the IHDR width/height (and its CRC) of a real PNG; the pixel data stays tiny."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


# --- skip categories -------------------------------------------------------------------------------


def test_image_skip_str_and_pickle():
    skip = ImageSkip("corrupt", "bad huffman table")
    assert str(skip) == "corrupt: bad huffman table"
    again = pickle.loads(pickle.dumps(skip))  # raised in shard worker processes
    assert (again.category, again.detail) == ("corrupt", "bad huffman table")


def test_empty():
    assert skip_category(b"") == "empty"


@pytest.mark.parametrize("data", [bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), b"hello, not an image\n" * 20])
def test_not_image(data):
    assert skip_category(data) == "not_image"


def test_truncated_png_and_jpeg():
    img = noise(80, 64)
    png, jpg = to_bytes(img, "PNG"), to_bytes(img, "JPEG", quality=90)
    assert skip_category(png[: len(png) // 2]) == "truncated"
    assert skip_category(jpg[: len(jpg) // 2]) == "truncated"


def test_corrupt_png_and_jpeg_scan():
    img = noise(80, 64)
    png = bytearray(to_bytes(img, "PNG"))
    i = png.find(b"IDAT") + 10
    png[i : i + 50] = bytes(50)  # zlib stream broken, length intact
    assert skip_category(bytes(png)) == "corrupt"
    jpg = bytearray(to_bytes(img, "JPEG", quality=90))
    i = jpg.find(b"\xff\xda")  # start of scan header
    jpg[i + 2 : i + 12] = bytes(10)
    assert skip_category(bytes(jpg)) == "corrupt"


def test_jpeg_garbage_in_scan_only_ever_skips():
    """libjpeg shrugs off some garbage (a warning, not an error); whatever it does, nothing but ImageSkip escapes."""
    jpg = to_bytes(noise(80, 64), "JPEG", quality=90)
    skipped = 0
    for seed in range(12):
        r = random.Random(seed)
        bad = bytearray(jpg)
        mid = len(bad) // 2
        bad[mid : mid + 200] = bytes(r.randrange(256) for _ in range(200))
        try:
            img, _ = decode_rgb(bytes(bad))
            assert img.mode == "RGB" and img.size == (80, 64)
        except ImageSkip as skip:
            assert skip.category in ("corrupt", "truncated")
            skipped += 1
    assert skipped > 0


def test_too_large_header_claims_30000_squared():
    png = patch_png_size(to_bytes(Image.new("RGB", (1, 1)), "PNG"), 30000, 30000)
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may leak either
        assert skip_category(png) == "too_large"
    assert Image.MAX_IMAGE_PIXELS == before


def test_too_large_is_decided_before_decoding(monkeypatch):
    # 9000 x 9000 is under PIL's own bomb limits, so only decode_rgb's max_pixels can refuse it.
    png = patch_png_size(to_bytes(Image.new("RGB", (1, 1)), "PNG"), 9000, 9000)

    def no_decoding(self):
        raise AssertionError("decoded a file that the header already ruled out")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageSkip) as info:
        decode_rgb(png, max_pixels=10_000_000)
    assert info.value.category == "too_large" and "9000x9000" in info.value.detail


def test_pil_bomb_warning_neither_leaks_nor_decides(monkeypatch):
    """12000 x 12000 is past PIL's warning size but under the default max_pixels: it goes on to decoding."""
    png = patch_png_size(to_bytes(Image.new("RGB", (1, 1)), "PNG"), 12000, 12000)

    def stub_decoder(self):
        raise OSError("stub decoder reached")  # spares allocating 432 MB for a tiny file

    monkeypatch.setattr(ImageFile.ImageFile, "load", stub_decoder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageSkip) as info:
            decode_rgb(png)
    assert info.value.category == "corrupt" and "stub decoder reached" in info.value.detail
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_max_pixels_boundary():
    png = to_bytes(noise(64, 32), "PNG")
    assert decode_rgb(png, max_pixels=64 * 32)[0].size == (64, 32)
    assert skip_category(png, max_pixels=64 * 32 - 1) == "too_large"
    assert skip_category(to_bytes(Image.new("RGB", (1, 1)), "PNG"), max_pixels=0) == "too_large"


def test_too_small_skip_or_upscale():
    img = noise(100, 120)
    box = center_crop_box(*img.size)
    with pytest.raises(ImageSkip) as info:
        crop_resize(img, box, 128)
    assert info.value.category == "too_small"
    assert crop_resize(img, box, 128, small="upscale").size == (128, 128)
    assert crop_resize(img, box, 100).size == (100, 100)  # side == resolution is kept


# --- conversions to RGB ----------------------------------------------------------------------------


def palette_image():
    img = Image.frombytes("P", (3, 1), bytes([0, 1, 2]))
    img.putpalette([10, 20, 30, 255, 0, 0, 0, 0, 255] + [0] * 759)
    return img


def rgba_image():
    # transparent red, opaque blue, half-transparent black
    return Image.frombytes("RGBA", (3, 1), bytes([255, 0, 0, 0, 0, 0, 255, 255, 0, 0, 0, 128]))


CONVERSIONS = {
    # name: (encoded input, expected RGB pixels (H=1, W, 3) as gray values or RGB triples)
    "CMYK": (to_bytes(Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255])), "TIFF"),
             [(255, 255, 255), (0, 255, 255), (0, 0, 0)]),
    "L": (to_bytes(Image.frombytes("L", (3, 1), bytes([0, 7, 255])), "PNG"), [0, 7, 255]),
    "LA": (to_bytes(Image.frombytes("LA", (3, 1), bytes([100, 0, 100, 255, 0, 128])), "PNG"), [255, 100, 127]),
    "1": (to_bytes(Image.fromarray(np.array([[False, True, False]])), "PNG"), [0, 255, 0]),
    "P": (to_bytes(palette_image(), "PNG"), [(10, 20, 30), (255, 0, 0), (0, 0, 255)]),
    "P+transparency": (to_bytes(palette_image(), "PNG", transparency=1), [(10, 20, 30), (255, 255, 255), (0, 0, 255)]),
    "RGBA": (to_bytes(rgba_image(), "PNG"), [(255, 255, 255), (0, 0, 255), (127, 127, 127)]),
    "I;16": (to_bytes(Image.fromarray(np.array([[0, 256, 65535, 1000]], np.uint16)), "PNG"), [0, 1, 255, 3]),
    "I;16B": (to_bytes(Image.frombytes("I;16B", (3, 1), np.array([256, 65535, 511], ">u2").tobytes()), "TIFF"), [1, 255, 1]),
    "I": (to_bytes(Image.fromarray(np.array([[0, 256, 65535, 70000, -5]], np.int32)), "TIFF"), [0, 1, 255, 255, 0]),
    "F": (to_bytes(Image.fromarray(np.array([[-3.0, 0.4, 1.6, 254.7, 300.0]], np.float32)), "TIFF"), [0, 0, 2, 255, 255]),
}


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_conversion_to_rgb(name):
    data, expected = CONVERSIONS[name]
    img, info = decode_rgb(data)
    expected = np.array(expected, np.uint8)
    if expected.ndim == 1:
        expected = np.repeat(expected[:, None], 3, axis=1)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), expected[None])
    mode = name.split("+")[0]
    assert info["mode"] == mode and info["converted"].startswith(f"{mode}->RGB")
    assert ("alpha over white" in info["converted"]) == (name in ("LA", "P+transparency", "RGBA"))


def test_rgb_is_untouched():
    src = noise(20, 10)
    img, info = decode_rgb(to_bytes(src, "PNG"))
    assert info == {"format": "PNG", "mode": "RGB", "size": [20, 10], "converted": None, "exif_transposed": False}
    np.testing.assert_array_equal(np.asarray(img), np.asarray(src))


def test_cmyk_jpeg_decodes_to_the_right_colours():
    """Photoshop-style (Adobe, inverted) CMYK JPEG: cyan must come back cyan, not red."""
    cmyk = Image.frombytes("CMYK", (1, 1), bytes([255, 0, 0, 0])).resize((16, 16))
    img, info = decode_rgb(to_bytes(cmyk, "JPEG", quality=100))
    assert info["converted"] == "CMYK->RGB"
    assert np.abs(np.asarray(img).astype(int) - [0, 255, 255]).max() <= 3


# --- EXIF orientation ------------------------------------------------------------------------------


def exif_with_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def test_exif_orientation_6_rotates_jpeg():
    data = to_bytes(noise(40, 20), "JPEG", quality=90, exif=exif_with_orientation(6))
    img, info = decode_rgb(data)
    assert img.size == (20, 40) and info["size"] == [40, 20] and info["exif_transposed"] is True
    upright = to_bytes(noise(40, 20), "JPEG", quality=90, exif=exif_with_orientation(1))
    img, info = decode_rgb(upright)
    assert img.size == (40, 20) and info["exif_transposed"] is False


def test_exif_orientation_6_moves_pixels_clockwise():
    stored = Image.new("RGB", (4, 2))
    stored.putpixel((0, 0), (255, 0, 0))
    img, _ = decode_rgb(to_bytes(stored, "PNG", exif=exif_with_orientation(6)))
    # Orientation 6: the camera was turned, the viewer rotates 90 degrees clockwise.
    assert img.size == (2, 4) and img.getpixel((1, 0)) == (255, 0, 0)


# --- crops and resize ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, box",
    [((300, 200), (50, 0, 250, 200)), ((301, 200), (50, 0, 250, 200)), ((200, 301), (0, 50, 200, 250)), ((64, 64), (0, 0, 64, 64))],
)
def test_center_crop_box(size, box):
    assert center_crop_box(*size) == box


def test_random_crop_box_inside_and_seeded():
    boxes = [random_crop_box(50, 30, 20, random.Random(7)) for _ in range(3)]
    assert boxes[0] == boxes[1] == boxes[2]
    rng = random.Random(0)
    lefts, tops = set(), set()
    for _ in range(500):
        left, top, right, bottom = random_crop_box(50, 30, 20, rng)
        assert 0 <= left and 0 <= top and right <= 50 and bottom <= 30
        assert right - left == bottom - top == 20
        lefts.add(left)
        tops.add(top)
    assert lefts == set(range(31)) and tops == set(range(11))  # every position is reachable
    with pytest.raises(ValueError):
        random_crop_box(50, 30, 31, rng)


@pytest.mark.parametrize("filter", list(FILTERS))
@pytest.mark.parametrize("resolution", [32, 96])  # down and (with upscale) up
def test_crop_resize_matches_pil(filter, resolution):
    img = noise(300, 270, seed=3)
    # 270 -> 32 is past 2x the 2.0 reducing_gap, where PIL would otherwise pre-shrink with a box filter.
    for box in (center_crop_box(*img.size), random_crop_box(*img.size, 50, random.Random(1))):
        out = crop_resize(img, box, resolution, filter, small="upscale")
        ref = img.crop(box).resize((resolution, resolution), FILTERS[filter], reducing_gap=None)
        assert out.size == (resolution, resolution)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_crop_resize_rejects_unknown_names():
    img = noise(40, 40)
    with pytest.raises(ValueError, match="lanczos"):
        crop_resize(img, (0, 0, 40, 40), 32, "nearest")
    with pytest.raises(ValueError, match="upscale"):
        crop_resize(img, (0, 0, 40, 40), 32, small="pad")


# --- encoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, quality", [("png", 95), ("jpg", 95), ("jpg", 75), ("webp", 90), ("webp", 100)])
def test_encode_is_deterministic(fmt, quality):
    img = noise(48, 48, seed=5)
    assert encode(img, fmt, quality) == encode(img.copy(), fmt, quality)


@pytest.mark.parametrize("fmt, quality", [("png", 95), ("webp", 100)])
def test_encode_lossless_round_trip(fmt, quality):
    img = noise(48, 40, seed=6)
    back = Image.open(io.BytesIO(encode(img, fmt, quality))).convert("RGB")
    np.testing.assert_array_equal(np.asarray(back), np.asarray(img))


def test_encode_drops_metadata_and_picks_jpeg_subsampling():
    img = noise(32, 32)
    img.info.update(icc_profile=b"fake-icc", exif=exif_with_orientation(6).tobytes(), gamma=0.45)
    png = encode(img, "png")
    assert all(chunk not in png for chunk in (b"iCCP", b"eXIf", b"gAMA", b"tEXt"))
    for quality, sampling in ((95, 0), (90, 0), (89, 2)):
        jpg = encode(img, "jpg", quality)
        decoded = Image.open(io.BytesIO(jpg))
        assert b"Exif" not in jpg and JpegImagePlugin.get_sampling(decoded) == sampling


# --- decode_check ----------------------------------------------------------------------------------


def test_decode_check():
    img = noise(32, 24)
    for fmt in ("png", "jpg", "webp"):
        data = encode(img, fmt, 90)
        assert decode_check(data, fmt) == (32, 24)
        for bad in (data[: len(data) // 2], data[:8] + bytes(len(data) - 8), b""):
            with pytest.raises(ImageSkip) as info:
                decode_check(bad, fmt)
            assert info.value.category == "corrupt"
    with pytest.raises(ImageSkip, match="holds PNG"):
        decode_check(encode(img, "png"), "jpg")
