"""Tests for sdlora.dataset: scanning a captioned folder, decoding any image mode, buckets and crops."""

import importlib.util
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.data.buckets import assign_bucket, make_buckets, prepare_image
from sdlora.data.folder import ImageItem, dataset_dirs, load_rgb, scan_images, tag_frequency
from sdlora.errors import SdloraError

REPO = Path(__file__).resolve().parents[1]


def prepare_pixels(*args, **kwargs) -> torch.Tensor:
    return prepare_image(*args, **kwargs).pixels


def _png(path: Path, colour=(200, 30, 30), size=(16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _pixels(img: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(p) for p in np.asarray(img).reshape(-1, len(img.getbands())).tolist()]


NO_CAPTIONS = ("no image has a caption (.txt file) and no --trigger was given: the LoRA will learn the style for every "
               'prompt and can only be switched on or off by its strength; pass --trigger "xyz style" to give it a word')


def _scan(root, **kwargs) -> tuple[list[ImageItem], list[str]]:
    warnings: list[str] = []
    return scan_images(root, warn=warnings.append, **kwargs), warnings


def _snapshot(root: Path) -> list[tuple[str, int, int]]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.stat(os.path.join(dirpath, name))
            entries.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime_ns))
    return sorted(entries)


# --- captions -------------------------------------------------------------------------------------


def test_captions_bom_whitespace_newlines_and_trigger(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeff  a red circle \n".encode())
    _png(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("red circle,\n\n  grey   background \r\n", encoding="utf-8")
    _png(tmp_path / "c.png")  # no caption file
    _png(tmp_path / "d.png")
    (tmp_path / "d.txt").write_text("   \n", encoding="utf-8")  # empty caption

    items, warnings = _scan(tmp_path, trigger="xyz style")
    assert [i.caption for i in items] == [
        "xyz style, a red circle",
        "xyz style, red circle, grey background",
        "xyz style",
        "xyz style",
    ]
    assert warnings == []

    plain, _ = _scan(tmp_path)
    assert [i.caption for i in plain] == ["a red circle", "red circle, grey background", "", ""]


def test_trigger_not_doubled_when_caption_already_starts_with_it(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("xyz style, a dog", encoding="utf-8")
    items, _ = _scan(tmp_path, trigger="xyz style")
    assert items[0].caption == "xyz style, a dog"


@pytest.mark.parametrize("ext", [".caption", "caption"])
def test_custom_caption_extension(tmp_path, ext):
    _png(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("from caption file", encoding="utf-8")
    (tmp_path / "a.txt").write_text("from txt file", encoding="utf-8")
    items, _ = _scan(tmp_path, caption_ext=ext)
    assert items[0].caption == "from caption file"


def test_caption_extension_matched_case_insensitively(tmp_path):
    _png(tmp_path / "IMG_1.PNG")
    (tmp_path / "IMG_1.TXT").write_text("upper case caption file", encoding="utf-8")
    items, _ = _scan(tmp_path)
    assert items[0].caption == "upper case caption file"


def test_non_utf8_caption_warns_and_is_still_used(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 scene")
    items, warnings = _scan(tmp_path)
    assert items[0].caption == "caf\ufffd scene"
    assert warnings == ["caption a.txt is neither UTF-8 nor UTF-16; undecodable bytes replaced"]


# --- layout: repeats, recursion, extensions -------------------------------------------------------


def test_repeats_from_nearest_kohya_folder_and_dataset_dir(tmp_path):
    root = tmp_path / "train"
    _png(root / "10_mystyle" / "a.png")
    _png(root / "10_mystyle" / "3_extra" / "b.png")
    _png(root / "10_mystyle" / "nested" / "c.png")
    _png(root / "plain" / "d.png")
    _png(root / "e.png")

    items, _ = _scan(root)
    got = {i.path.relative_to(root).as_posix(): (i.repeats, i.dataset_dir) for i in items}
    assert got == {
        "10_mystyle/a.png": (10, "10_mystyle"),
        "10_mystyle/3_extra/b.png": (3, "10_mystyle"),
        "10_mystyle/nested/c.png": (10, "10_mystyle"),
        "plain/d.png": (1, "plain"),
        "e.png": (1, "train"),
    }
    assert all(i.path.is_absolute() for i in items)


def test_zero_repeats_is_an_error(tmp_path):
    _png(tmp_path / "0_style" / "a.png")
    with pytest.raises(SdloraError, match=r"must be >= 1"):
        _scan(tmp_path)


def test_recursive_case_insensitive_sorted(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    blue = Image.new("RGB", (8, 8), "blue")
    blue.save(tmp_path / "a.PNG")
    blue.save(tmp_path / "b.JPG")
    blue.save(tmp_path / "sub" / "deep" / "c.WebP")
    blue.save(tmp_path / "sub" / "d.bmp")
    Image.new("P", (8, 8), 1).save(tmp_path / "e.Gif")
    blue.save(tmp_path / "f.jpeg")
    (tmp_path / "notes.md").write_text("not an image", encoding="utf-8")
    Image.new("RGB", (8, 8)).save(tmp_path / "g.tiff")  # not a training format
    _png(tmp_path / ".hidden" / "h.png")
    _png(tmp_path / "._i.png")

    items, warnings = _scan(tmp_path)
    assert [i.path.relative_to(tmp_path).as_posix() for i in items] == [
        "a.PNG",
        "b.JPG",
        "e.Gif",
        "f.jpeg",
        "sub/d.bmp",
        "sub/deep/c.WebP",
    ]
    assert warnings == [NO_CAPTIONS]  # no caption and no trigger: said once (issue 13)


# --- unreadable files and errors ------------------------------------------------------------------


def test_broken_files_are_skipped_with_one_warning_each_and_a_summary(tmp_path):
    _png(tmp_path / "good1.png")
    _png(tmp_path / "good2.png")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noisy.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "full.png").unlink()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    noisy.save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "full.jpg").unlink()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a picture", encoding="utf-8")

    items, warnings = _scan(tmp_path)
    assert [i.path.name for i in items] == ["good1.png", "good2.png"]
    assert warnings.pop() == NO_CAPTIONS and len(warnings) == 5
    skipped = sorted(w for w in warnings if w.startswith("skipping "))
    assert [w.split(":")[0] for w in skipped] == [
        "skipping text.png",
        "skipping truncated.jpg",
        "skipping truncated.png",
        "skipping zero.png",
    ]
    assert "skipping zero.png: empty file" in warnings
    assert "skipping text.png: not a readable image file" in warnings
    assert all("\n" not in w and len(w) < 200 for w in warnings)
    assert warnings[-1] == "skipped 4 of 6 files"


def test_missing_folder(tmp_path):
    with pytest.raises(SdloraError, match=r"^image folder not found: .*nope$"):
        scan_images(tmp_path / "nope")


def test_root_is_a_file(tmp_path):
    path = _png(tmp_path / "a.png")
    with pytest.raises(SdloraError, match=r"^image folder is not a directory: "):
        scan_images(path)


def test_folder_without_images(tmp_path):
    (tmp_path / "a.txt").write_text("caption without image", encoding="utf-8")
    with pytest.raises(SdloraError) as info:
        scan_images(tmp_path)
    assert str(info.value) == f"no images (png/jpg/jpeg/webp/bmp/gif) in {tmp_path}"


def test_all_images_unreadable(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("nope", encoding="utf-8")
    warnings: list[str] = []
    with pytest.raises(SdloraError) as info:
        scan_images(tmp_path, warn=warnings.append)
    assert str(info.value) == f"no readable images in {tmp_path}: all 2 files failed to open"
    assert len(warnings) == 2


def test_default_warning_goes_to_stderr(tmp_path, capsys):
    _png(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"")
    scan_images(tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "skipping b.png: empty file" in err[0] and "skipped 1 of 2 files" in err[1]
    assert err[2] == f"warning: {NO_CAPTIONS}"


def test_user_folder_is_left_unchanged(tmp_path):
    root = tmp_path / "data"
    _png(root / "5_style" / "a.png")
    (root / "5_style" / "a.txt").write_text("a caption", encoding="utf-8")
    Image.new("RGBA", (10, 20), (0, 0, 0, 0)).save(root / "5_style" / "b.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    os.utime(root / "5_style" / "a.png", ns=(1_000_000_000, 1_000_000_000))
    before = _snapshot(root)

    items, _ = _scan(root, trigger="t")
    for item in items:
        prepare_pixels(load_rgb(item.path), (64, 64), center_crop=False, rng=random.Random(0))

    assert _snapshot(root) == before


# --- decoding every mode to RGB -------------------------------------------------------------------


def test_alpha_modes_are_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 255, 128))
    rgba.save(tmp_path / "rgba.png")
    img = load_rgb(tmp_path / "rgba.png")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)  # fully transparent red -> white, not red or black
    assert img.getpixel((1, 0)) == (255, 0, 0)
    r, g, b = img.getpixel((2, 0))
    assert r == g and abs(r - 127) <= 1 and b == 255

    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    la.save(tmp_path / "la.png")
    assert _pixels(load_rgb(tmp_path / "la.png")) == [(255, 255, 255), (0, 0, 0)]


def test_palette_with_transparency_and_animated_gif_first_frame(tmp_path):
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "pal.png", transparency=0)
    assert _pixels(load_rgb(tmp_path / "pal.png")) == [(255, 255, 255), (0, 255, 0)]

    frames = [Image.new("RGB", (6, 6), c).convert("P") for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(tmp_path / "anim.gif") as gif:
        assert gif.n_frames == 2
    assert load_rgb(tmp_path / "anim.gif").getpixel((3, 3)) == (255, 0, 0)


def test_grey_one_bit_and_cmyk(tmp_path):
    Image.new("L", (3, 3), 77).save(tmp_path / "l.png")
    assert load_rgb(tmp_path / "l.png").getpixel((1, 1)) == (77, 77, 77)

    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "bits.png")
    assert _pixels(load_rgb(tmp_path / "bits.png")) == [(0, 0, 0), (255, 255, 255)]

    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as img:
        assert img.mode == "CMYK"
    assert all(v >= 250 for v in load_rgb(tmp_path / "cmyk.jpg").getpixel((4, 4)))


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as img:
        assert img.mode.startswith("I")  # I;16 (or I on older Pillow)
    assert [p[0] for p in _pixels(load_rgb(tmp_path / "grey16.png"))] == [0, 64, 128, 255]


def test_thirty_two_bit_and_float_grey(tmp_path):
    Image.fromarray(np.array([[0, 1000, 70000, 140000]], dtype=np.int32)).save(tmp_path / "i32.tiff")
    assert [p[0] for p in _pixels(load_rgb(tmp_path / "i32.tiff"))] == [0, 2, 128, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tiff")
    assert [p[0] for p in _pixels(load_rgb(tmp_path / "f.tiff"))] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored left edge becomes the displayed top
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    img = load_rgb(tmp_path / "rotated.jpg")
    assert img.size == (20, 40)
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


# --- buckets --------------------------------------------------------------------------------------


def test_buckets_for_512_match_hand_computed_list():
    # width w in 64..1024 step 64, h = min(1024, (262144 // w) // 64 * 64), e.g. w=320: 819 -> 768
    one_side = [
        (64, 1024), (128, 1024), (192, 1024), (256, 1024), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]  # fmt: skip
    expected = sorted(set(one_side) | {(h, w) for w, h in one_side})
    buckets = make_buckets(512)
    assert buckets == expected
    assert {(512, 512), (640, 384), (384, 640), (768, 320), (320, 768)} <= set(buckets)
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)


def test_buckets_respect_limits_and_reject_bad_sizes():
    buckets = make_buckets(512, min_size=256, max_size=768)
    # w=704 and w=768 both give h=320, so (320, 704) and (320, 768) are both there, as in kohya
    assert buckets == [(256, 768), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448),
                       (640, 384), (704, 320), (768, 256), (768, 320)]  # fmt: skip
    assert make_buckets(64) == [(64, 64)]
    with pytest.raises(SdloraError, match="multiple of 64"):
        make_buckets(500)


def test_assign_bucket_nearest_aspect_and_ties():
    buckets = make_buckets(512)
    assert assign_bucket(1000, 600, buckets) == (640, 384)  # exactly 5:3
    assert assign_bucket(3000, 3000, buckets) == (512, 512)
    # 0.3: 256/832=0.308 is nearer (in log ratio) than 256/896=0.286 or 320/768=0.417
    assert assign_bucket(300, 1000, buckets) == (256, 832)
    assert assign_bucket(1000, 300, buckets) == (832, 256)
    # 1:1 sits exactly between 2:1 and 1:2 in log ratio; equal-shape duplicates prefer the larger area
    assert assign_bucket(10, 10, [(64, 128), (128, 64)]) in {(64, 128), (128, 64)}
    assert assign_bucket(50, 100, [(64, 128), (128, 256)]) == (128, 256)


# --- prepare_image --------------------------------------------------------------------------------


def _gradient(width: int, height: int) -> Image.Image:
    """R channel = column index, so a crop's left edge can be read back from the tensor."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    return Image.fromarray(pixels)


def test_prepare_image_shape_range_and_values():
    white = prepare_pixels(Image.new("RGB", (50, 30), "white"), (64, 128), True, random.Random(0))
    assert white.shape == (3, 128, 64) and white.dtype == torch.float32
    assert torch.allclose(white, torch.ones_like(white))
    black = prepare_pixels(Image.new("RGB", (300, 100), "black"), (128, 64), False, random.Random(0))
    assert black.shape == (3, 64, 128) and torch.all(black == -1)

    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 170, 3), dtype=np.uint8))
    out = prepare_pixels(noisy, (128, 64), False, random.Random(3))
    assert out.shape == (3, 64, 128) and out.min() >= -1 and out.max() <= 1


def test_prepare_image_covers_then_crops_centre_or_random():
    img = _gradient(240, 80)  # 3:1 into a square bucket: no resize, only a horizontal crop
    centre = prepare_pixels(img, (80, 80), center_crop=True, rng=random.Random(0))
    assert round((centre[0, 0, 0].item() + 1) * 127.5) == 80  # left edge at (240 - 80) / 2

    lefts = set()
    for seed in range(10):
        out = prepare_pixels(img, (80, 80), center_crop=False, rng=random.Random(seed))
        left = round((out[0, 0, 0].item() + 1) * 127.5)
        assert left == random.Random(seed).randint(0, 160)
        assert round((out[0, 0, 79].item() + 1) * 127.5) == left + 79  # still 1:1, no resize
        lefts.add(left)
    assert len(lefts) > 5

    # 1:3 portrait into 128x128: scaled up to 128x384 (covers, minimal crop), then cropped vertically
    tall = Image.new("RGB", (100, 300), "white")
    tall.paste((0, 0, 0), (0, 0, 100, 100))  # black top third
    out = prepare_pixels(tall, (128, 128), center_crop=True, rng=random.Random(0))
    assert out.shape == (3, 128, 128)
    assert out[:, 8:].min() > 0.95  # the centre third is white (a few rows of resampling ringing at the top)
    tops = [prepare_pixels(tall, (128, 128), False, random.Random(seed))[0, 0, 64].item() for seed in range(10)]
    assert min(tops) < -0.9 and max(tops) > 0.95  # random crops reach into the black band, and away from it


def test_prepare_image_accepts_rgba():
    out = prepare_pixels(Image.new("RGBA", (64, 64), (0, 0, 0, 0)), (64, 64), True, random.Random(0))
    assert torch.allclose(out, torch.ones_like(out))


# --- metadata -------------------------------------------------------------------------------------


def test_tag_frequency_and_dataset_dirs():
    items = [
        ImageItem(Path("/d/a.png"), "sks, red circle, grey background", 10, "10_style"),
        ImageItem(Path("/d/b.png"), "sks, blue square, grey background, blue square", 10, "10_style"),
        ImageItem(Path("/d/c.png"), "", 1, "root"),
        ImageItem(Path("/d/d.png"), "sks", 1, "root"),
    ]
    assert tag_frequency(items) == {
        "10_style": {"sks": 2, "red circle": 1, "grey background": 2, "blue square": 1},
        "root": {"sks": 1},
    }
    assert dataset_dirs(items) == {
        "10_style": {"n_repeats": 10, "img_count": 2},
        "root": {"n_repeats": 1, "img_count": 2},
    }


# --- the bundled style-dataset generator ----------------------------------------------------------


def _generator():
    spec = importlib.util.spec_from_file_location("make_style_dataset", REPO / "scripts" / "make_style_dataset.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_style_generator_is_deterministic_and_scannable(tmp_path):
    gen = _generator()
    scene = gen.random_scene(random.Random(5))
    assert scene == gen.random_scene(random.Random(5))
    text = gen.caption(scene)
    assert text.startswith("a ") and text.endswith(" background")
    looks = {}
    for style in gen.STYLES:
        img = gen.render(style, scene, 64)
        assert img.size == (64, 64) and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), np.asarray(gen.render(style, scene, 64)))
        looks[style] = np.asarray(img, dtype=np.float32)
    assert all(np.abs(looks[a] - looks[b]).mean() > 5 for a in looks for b in looks if a < b)

    gen.main(["--style", "halftone", "--count", "3", "--size", "32", "--seed", "1", "--out", str(tmp_path / "ds")])
    items, warnings = _scan(tmp_path / "ds", trigger="sks halftone")
    assert len(items) == 3 and warnings == []
    assert all(i.caption.startswith("sks halftone, a ") for i in items)
    assert (tmp_path / "ds" / "README.md").read_text(encoding="utf-8").count("sks halftone") >= 1


def test_prepare_image_keeps_original_size_and_crop_offset():
    """SDXL's time ids need the file's size and where the crop sat; the mirrored crop is measured from the right."""
    img = Image.new("RGB", (300, 100), "white")  # resized to 384x128 to cover a 128x128 bucket
    out = prepare_image(img, (128, 128), center_crop=True, rng=random.Random(0))
    assert out.original_hw == (100, 300)
    assert out.crop_tl == (0, 128) and out.crop_tl_flipped == (0, 384 - 128 - 128)
    lefts = {prepare_image(img, (128, 128), False, random.Random(s)).crop_tl[1] for s in range(20)}
    assert len(lefts) > 1 and all(0 <= x <= 256 for x in lefts)
