from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sd_lora.data.images import (
    MIN_IMAGE_SIDE, REDUCING_GAP, ImageProblem, _decode_upright, check_image, is_image_file, open_image,
    open_image_resized, to_rgb,
)
from sd_lora.errors import UserError

from .conftest import BLUE, RED, photo, write_halves, write_image, write_text


def pixel(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    return tuple(int(v) for v in img.getpixel(xy))


def test_extensions_match_in_any_case():
    assert [is_image_file(n) for n in ("a.PNG", "b.JpEg", "c.webp", "d.bmp", "e.jpg", "f.GIF", "g.txt", "h.psd", "i.Tiff", "j.jfif")] == [
        True, True, True, True, True, True, False, False, True, True]


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    img = Image.new("RGBA", (16, 16), (10, 20, 30, 255))
    img.putpixel((0, 0), (10, 20, 30, 0))
    img.putpixel((1, 0), (0, 0, 0, 128))
    img.save(tmp_path / "a.png")
    out = open_image(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert pixel(out, (0, 0)) == (255, 255, 255)
    assert pixel(out, (2, 0)) == (10, 20, 30)
    assert pixel(out, (1, 0)) == (127, 127, 127)  # half-transparent black over white


def test_la_composited_on_white(tmp_path):
    img = Image.new("LA", (16, 16), (40, 255))
    img.putpixel((0, 0), (40, 0))
    img.save(tmp_path / "a.png")
    out = open_image(tmp_path / "a.png")
    assert (pixel(out, (0, 0)), pixel(out, (1, 0))) == ((255, 255, 255), (40, 40, 40))


def test_palette_with_transparency_composited_on_white(tmp_path):
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 200, 0, 0] + [0] * (254 * 3))
    img.putpixel((0, 0), 0)
    img.save(tmp_path / "a.png", transparency=0)
    assert Image.open(tmp_path / "a.png").mode == "P"
    out = open_image(tmp_path / "a.png")
    assert (pixel(out, (0, 0)), pixel(out, (1, 0))) == ((255, 255, 255), (200, 0, 0))


@pytest.mark.parametrize("mode, key, other", [("RGB", (10, 20, 30), (200, 0, 0)), ("L", 77, 140)])
def test_colour_key_transparency_composited_on_white(tmp_path, mode, key, other):
    img = Image.new(mode, (16, 16), other)
    img.putpixel((0, 0), key)
    img.save(tmp_path / "a.png", transparency=key)  # a tRNS chunk: this one colour is transparent
    assert Image.open(tmp_path / "a.png").mode == mode
    grey = (other,) * 3 if mode == "L" else other
    assert (pixel(open_image(tmp_path / "a.png"), (0, 0)), pixel(open_image(tmp_path / "a.png"), (1, 0))) == ((255, 255, 255), grey)


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 0, 90, 0] + [0] * (254 * 3))
    img.save(tmp_path / "a.png")
    assert pixel(open_image(tmp_path / "a.png")) == (0, 90, 0)


@pytest.mark.parametrize("mode,value,expected", [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255))])
def test_grey_and_bilevel_to_rgb(tmp_path, mode, value, expected):
    Image.new(mode, (16, 16), value).save(tmp_path / "a.png")
    assert pixel(open_image(tmp_path / "a.png")) == expected


def test_cmyk_jpeg_to_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "a.jpg", quality=100)
    assert Image.open(tmp_path / "a.jpg").mode == "CMYK"
    r, g, b = pixel(open_image(tmp_path / "a.jpg"))
    assert r > 240 and g < 15 and b < 15


def test_16_bit_grey_scaled_not_clipped(tmp_path):
    values = np.zeros((16, 16), np.uint16)
    values[0, :4] = [65535, 32768, 0, 1000]
    Image.fromarray(values).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    out = np.asarray(open_image(tmp_path / "a.png"))
    assert out[0, :4, 0].tolist() == [255, 128, 0, 4]
    assert (out[..., 0] == out[..., 2]).all()


def test_16_bit_grey_colour_key_composited_on_white(tmp_path):
    values = np.zeros((16, 16), np.uint16)
    values[0, :3] = [1000, 1001, 40000]
    Image.fromarray(values).save(tmp_path / "a.png", transparency=1000)  # tRNS: the 16-bit value 1000 is transparent
    assert Image.open(tmp_path / "a.png").info["transparency"] == 1000
    out = np.asarray(open_image(tmp_path / "a.png"))
    assert out[0, :4, 0].tolist() == [255, 4, 156, 0]


def test_32_bit_modes_scaled():
    as_int = Image.fromarray(np.full((16, 16), 65535, np.int32))
    assert as_int.mode == "I" and pixel(to_rgb(as_int)) == (255, 255, 255)
    unit_float = Image.fromarray(np.full((16, 16), 0.5, np.float32))
    assert unit_float.mode == "F" and pixel(to_rgb(unit_float)) == (128, 128, 128)
    wide_float = Image.fromarray(np.full((16, 16), 200.0, np.float32))
    assert pixel(to_rgb(wide_float)) == (200, 200, 200)


def test_exif_orientation_applied(tmp_path):
    # Stored 64x32 with red on the left; orientation 6 means "rotate 90 degrees clockwise to display",
    # which puts the stored left edge at the top.
    write_halves(tmp_path / "src.png", (64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(tmp_path / "src.png").save(tmp_path / "a.jpg", exif=exif, quality=95)
    assert check_image(tmp_path / "a.jpg") == (32, 64)
    out = open_image(tmp_path / "a.jpg")
    assert out.size == (32, 64)
    top, bottom = np.asarray(out)[8, 16], np.asarray(out)[56, 16]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_turned_tiff_reports_its_upright_size(tmp_path, orientation):
    # Pillow turns a TIFF upright as it loads it (its size is upright from the start, the orientation tag still
    # there until the load): the size was turned a second time, 64x32 read as 32x64, and the image trained
    # squeezed into a bucket of the wrong aspect.
    write_halves(tmp_path / "src.png", (64, 32))
    Image.open(tmp_path / "src.png").save(tmp_path / "a.tiff", tiffinfo={0x0112: orientation})
    upright = open_image(tmp_path / "a.tiff")
    assert upright.size == (32, 64)
    assert check_image(tmp_path / "a.tiff") == (32, 64)
    resized, size = open_image_resized(tmp_path / "a.tiff", (16, 32))
    assert size == (32, 64) and resized.size == (16, 32)


def test_check_image_returns_size(tmp_path):
    assert check_image(write_image(tmp_path / "a.webp", (40, 24))) == (40, 24)


def truncated(path, fmt):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(buffer, format=fmt)
    data = buffer.getvalue()
    return write_text(path, data[: len(data) // 2])


@pytest.mark.parametrize("make,problem", [
    (lambda p: write_text(p / "a.png", b""), "image is empty (0 bytes)"),
    (lambda p: truncated(p / "a.png", "PNG"), "cannot decode image (truncated file)"),
    (lambda p: truncated(p / "a.jpg", "JPEG"), "cannot decode image (truncated file)"),
    (lambda p: write_text(p / "a.png", "not an image at all"),
     "not an image file (Pillow cannot identify it)"),
    (lambda p: write_image(p / "a.png", (8, 8)),
     f"image too small: 8x8 px (the minimum is {MIN_IMAGE_SIDE} px per side)"),
])
def test_check_image_problems(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(ImageProblem) as caught:
        check_image(path)
    assert caught.value.problem == problem
    assert isinstance(caught.value, UserError)
    assert str(caught.value).startswith(f"{path}: {problem}")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_an_error(tmp_path, monkeypatch):
    path = write_image(tmp_path / "a.png", (40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageProblem, match="decompression bomb: 1600 pixels exceeds the limit of 1000"):
        check_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit Pillow raises itself
    with pytest.raises(ImageProblem, match="decompression bomb"):
        check_image(path)


def test_open_image_plain_rgb_unchanged(tmp_path):
    out = open_image(write_halves(tmp_path / "a.png", (32, 16)))
    assert out.mode == "RGB" and pixel(out, (0, 0)) == RED and pixel(out, (31, 0)) == BLUE


def decode_for(path, target):
    """What `open_image_resized(path, target)` decodes: (image, full upright size, the picture's box in the image)."""
    return _decode_upright(path, (target[0] * REDUCING_GAP, target[1] * REDUCING_GAP))


@pytest.mark.parametrize("cover,decoded", [((100, 75), (200, 150)), ((99, 50), (200, 150)), ((101, 75), (400, 300)),
                                           ((201, 150), (800, 600)), ((1600, 1200), (800, 600)), ((1, 1), (100, 75))])
def test_a_jpeg_to_shrink_is_decoded_at_the_smallest_scale_that_leaves_twice_the_target(tmp_path, cover, decoded):
    image, size, box = decode_for(photo(tmp_path / "a.jpg", (800, 600)), cover)
    assert size == (800, 600) and image.size == decoded and box == (0, 0, *decoded)


def test_a_jpeg_resized_from_a_reduced_decode_matches_the_full_decode(tmp_path):
    path = photo(tmp_path / "a.jpg", (800, 600))
    target = (100, 75)
    resized, size = open_image_resized(path, target)  # decoded at 1/4 scale, 200x150
    assert resized.size == target and resized.mode == "RGB" and size == (800, 600)
    reduced = np.asarray(resized, np.float64)
    full = np.asarray(open_image(path).resize(target, Image.Resampling.LANCZOS), np.float64)
    assert np.abs(reduced - full).mean() < 1.0 and np.abs(reduced - full).max() <= 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_jpeg_whose_sides_are_no_multiple_of_the_scale_is_not_stretched(tmp_path, orientation):
    # 1001x667 at 1/4 scale decodes to 251x167 (libjpeg rounds up): the picture spans 250.25x166.75 of it, its last
    # column and row half empty. Resized whole, the picture was stretched by up to a reduced pixel: 3.3 levels of 255
    # off on average, up to 63 on the texture. Each orientation turns that column and row to another side.
    path = photo(tmp_path / "a.jpg", (1001, 667), orientation)
    upright = open_image(path)
    target = (120, 80) if upright.width > upright.height else (80, 120)
    _, _, box = decode_for(path, target)
    assert (box[2] - box[0], box[3] - box[1]) == (upright.width / 4, upright.height / 4)
    resized, size = open_image_resized(path, target)
    assert size == upright.size
    difference = np.abs(np.asarray(resized, np.float64) - np.asarray(upright.resize(target, Image.Resampling.LANCZOS)))
    assert difference.mean() < 1.0 and difference.max() <= 16


def test_a_png_to_shrink_decodes_whole(tmp_path):
    image, size, box = decode_for(write_halves(tmp_path / "a.png", (64, 32)), (8, 4))
    assert image.size == size == (64, 32) and box == (0, 0, 64, 32)
    resized, size = open_image_resized(tmp_path / "a.png", (8, 4))
    assert resized.size == (8, 4) and size == (64, 32)


def test_the_cover_of_a_turned_jpeg_is_read_upright(tmp_path):
    # Stored 800x400, displayed 400x800 (orientation 6). Cover 200x25 upright needs the stored width 800 whole:
    # read in the stored orientation, it would allow 1/2 scale and return an image 200 px wide, not 400.
    path = photo(tmp_path / "a.jpg", (800, 400), orientation=6)
    image, size, _ = decode_for(path, (200, 25))
    assert size == (400, 800) and image.size == (400, 800)
    image, size, _ = decode_for(path, (50, 100))
    assert size == (400, 800) and image.size == (100, 200)
    assert check_image(path) == (400, 800)


def lossless_jpeg(path, pixels):
    """A lossless JPEG (SOF3, predictor 1: the left neighbour) of 8-bit grey `pixels`, as some scanners and medical
    imaging write; Pillow reads them but cannot write one."""
    import struct

    pixels = np.asarray(pixels, np.int64)
    height, width = pixels.shape
    bits = ""
    for y in range(height):
        for x in range(width):
            predicted = 128 if x == y == 0 else pixels[y, x - 1] if x else pixels[y - 1, x]
            difference = int(pixels[y, x] - predicted)
            category = abs(difference).bit_length()  # SSSS: the difference's size in bits
            bits += f"{category:05b}"  # its Huffman code: canonical, 5 bits for each of the 17 categories
            if category:  # then the difference's low bits, one less if negative (JPEG's ones' complement)
                bits += f"{difference if difference > 0 else difference - 1 + (1 << category):0{category}b}"
    bits += "1" * (-len(bits) % 8)  # pad the last byte with ones
    data = bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")  # byte stuffing

    def segment(marker, payload):
        return struct.pack(">HH", marker, len(payload) + 2) + payload

    huffman = bytes([0x00, 0, 0, 0, 0, 17] + [0] * 11 + list(range(17)))  # DC table 0: 17 codes of 5 bits
    frame = struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])
    scan = bytes([1, 1, 0x00, 1, 0, 0])  # component 1, table 0, predictor 1
    path.write_bytes(b"\xff\xd8" + segment(0xFFC4, huffman) + segment(0xFFC3, frame) + segment(0xFFDA, scan) + data
                     + b"\xff\xd9")
    return path


def test_a_lossless_jpeg_is_decoded_whole(tmp_path):
    # libjpeg has no DCT to scale in a lossless JPEG: with draft it returned the picture whole into Pillow's reduced
    # buffer, and the scan refused a valid file ("cannot decode image (broken data stream ...)").
    y, x = np.mgrid[0:60, 0:80]
    pixels = ((x + y) * 2 + np.random.default_rng(0).integers(0, 20, (60, 80))).clip(0, 255).astype(np.uint8)
    path = lossless_jpeg(tmp_path / "a.jpg", pixels)
    assert np.array_equal(np.asarray(open_image(path))[..., 0], pixels)  # the writer is right: Pillow decodes it
    assert check_image(path) == (80, 60)
    resized, size = open_image_resized(path, (20, 15))
    assert size == (80, 60)
    assert resized.tobytes() == Image.fromarray(pixels).convert("RGB").resize((20, 15), Image.Resampling.LANCZOS).tobytes()
