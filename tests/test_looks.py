"""The looks of sdlora/eval/looks.py: enough of them, held out by name, deterministic, colour and silhouette
kept, each one visibly its own; and the dataset writer draws any of them (world's three byte for byte)."""

import filecmp
import functools
import itertools
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdlora.eval import world
from sdlora.eval.datasets import main as dataset_main
from sdlora.eval.looks import (
    ALL_LOOKS,
    HELD_OUT_LOOKS,
    LOOKS,
    TRAINING_LOOKS,
    get_look,
    hue_name,
    look_caption,
    render_look,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 128
SCENES = [world.random_scene(random.Random(f"looks-{i}")) for i in range(60)]


@functools.cache
def _pixels(look: str, index: int) -> np.ndarray:
    return np.asarray(render_look(look, SCENES[index], SIZE))  # kept as uint8: 23 looks x 60 scenes is 68 MB


def _render(look: str, index: int) -> np.ndarray:
    return _pixels(look, index).astype(np.float32) / 255


def _masks(scene: world.Scene, size: int) -> list[Image.Image]:
    return [world._mask(world._outline(shape, size), size) for shape in scene.shapes]


def _inside(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask.filter(ImageFilter.MinFilter(5))) > 127  # 2 px in from the edge


# --- the registry ---------------------------------------------------------------------------------


def test_enough_looks_and_the_split():
    assert "plain" in TRAINING_LOOKS and len(TRAINING_LOOKS) - 1 >= 12
    assert {"sketch", "pastel", "halftone"} <= set(HELD_OUT_LOOKS) and len(HELD_OUT_LOOKS) - 3 >= 4
    assert not set(TRAINING_LOOKS) & set(HELD_OUT_LOOKS)
    assert ALL_LOOKS == TRAINING_LOOKS + HELD_OUT_LOOKS and set(LOOKS) == set(ALL_LOOKS)
    for name in ALL_LOOKS:
        look = get_look(name)
        assert look.name == name and len(look.description) > 20 and look.words
        assert (look.draw is None) == (name in world.STYLES)  # world's own styles are drawn by world.render


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_held_out_looks_are_never_named_by_a_training_look():
    """No word of a held-out look's name or caption words occurs inside a training look's (whole tokens or
    substrings, so neither "glass"/"glassy" nor "cross-hatching"/"cross stitch" can leak), and no look word is
    a content word of the captions (a colour, shape, size, background or layout word)."""
    def words(names):
        return set().union(*(_tokens(n) | set().union(*map(_tokens, LOOKS[n].words)) for n in names))

    held, trained = words(HELD_OUT_LOOKS), words(TRAINING_LOOKS)
    clashes = [(h, t) for h in held for t in trained if h in t or t in h]
    assert not clashes, clashes
    content = set().union(*map(_tokens, [*world.COLOURS, *world.SHAPES, *world.SIZES, *world.BACKGROUNDS,
                                         *world.PLACEMENTS, *world.RELATIONS, "a on background"]))
    assert not (held | trained) & content, (held | trained) & content


def test_unknown_look_names_the_choices():
    for call in (lambda: render_look("cubism", SCENES[0], 32), lambda: get_look("cubism"),
                 lambda: look_caption(SCENES[0], "cubism", True, random.Random(0))):
        with pytest.raises(ValueError, match=r"unknown look 'cubism'; choose from plain, hatching, .*embroidery"):
            call()


def test_look_caption_names_the_look_only_when_asked():
    rng = random.Random(0)
    for look in ALL_LOOKS:
        scene, words = SCENES[3], LOOKS[look].words
        content = world.caption(scene)
        assert look_caption(scene, look, False, rng) == content
        seen = set()
        for _ in range(40):
            text = look_caption(scene, look, True, rng)
            placed = [(w, True) for w in words if text == f"{w}, {content}"] + [(w, False) for w in words if text == f"{content}, {w}"]
            assert len(placed) == 1, text
            seen |= set(placed)
        assert len(seen) == 2 * len(words)  # every word, before and after the content


# --- rendering ------------------------------------------------------------------------------------


def test_renders_are_deterministic_rgb_and_world_styles_unchanged():
    for look in ALL_LOOKS:
        a, b = render_look(look, SCENES[1], 64), render_look(look, SCENES[1], 64)
        assert a.size == (64, 64) and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b)), look
    for style in world.STYLES:
        assert np.array_equal(np.asarray(render_look(style, SCENES[2], 64)), np.asarray(world.render(style, SCENES[2], 64)))


def test_texture_comes_from_the_scene_and_not_the_process():
    code = ("import hashlib, numpy as np, random; from sdlora.eval import world, looks; "
            "s = world.random_scene(random.Random(7)); "
            "print(hashlib.sha256(b''.join(np.asarray(looks.render_look(n, s, 32)).tobytes() for n in looks.ALL_LOOKS)).hexdigest())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                           env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}).stdout
            for seed in ("1", "2")}
    assert len(runs) == 1
    textured = [look for look in ("hatching", "stippling", "watercolour", "grainy", "crayon", "stained-glass", "chalk")
                if not np.array_equal(np.asarray(render_look(look, SCENES[0], 64)),
                                      np.asarray(render_look(look, world.Scene(SCENES[0].shapes, SCENES[0].background,
                                                                               SCENES[0].layout, 99), 64)))]
    assert len(textured) == 7, textured  # another texture_seed draws another texture


def test_the_hue_judge_is_not_vacuous():
    for name, rgb in world.COLOURS.items():
        assert hue_name(np.tile(np.asarray(rgb, np.float32) / 255, (50, 1))) == name
        faint = np.asarray(world._mix(rgb, (243, 239, 229), 0.8), np.float32) / 255  # 20% wash on paper still reads
        assert hue_name(np.tile(faint, (50, 1))) == name
    mask = _inside(_masks(SCENES[0], SIZE)[0])
    assert hue_name(_render("plain", 0).mean(-1, keepdims=True).repeat(3, -1)[mask]) is None  # greyscale: lost


@pytest.mark.parametrize("look", ALL_LOOKS)
def test_every_look_keeps_each_objects_colour(look):
    """The hue judge names the right colour for >= 97% of the objects of 60 random scenes at 128 px."""
    right = []
    for index, scene in enumerate(SCENES):
        pixels = _render(look, index)
        for shape, mask in zip(scene.shapes, _masks(scene, SIZE)):
            right.append(hue_name(pixels[_inside(mask)]) == shape.colour)
    assert np.mean(right) >= 0.97, f"{look}: colour kept for {np.mean(right):.1%} of {len(right)} objects"


@pytest.mark.parametrize("look", ALL_LOOKS)
def test_every_look_keeps_the_silhouettes(look):
    """Crude but look-blind: split the pixels near each object (lightly blurred) by whichever is nearer, the
    object's mean colour or the surrounding ring's; the split must overlap the true shape (IoU, mean of 20
    scenes >= 0.4; about 0.95 for plain, lowest for neon, whose shapes are glowing outlines on dark)."""
    ious = []
    for index, scene in enumerate(SCENES[:20]):
        image = Image.fromarray(np.rint(_render(look, index) * 255).astype(np.uint8)).filter(ImageFilter.BoxBlur(2))
        pixels = np.asarray(image, dtype=np.float32)
        masks = _masks(scene, SIZE)
        for i, mask in enumerate(masks):
            truth = np.asarray(mask) > 127
            near = np.asarray(mask.filter(ImageFilter.MaxFilter(15))) > 127
            ring = near & ~(np.asarray(mask.filter(ImageFilter.MaxFilter(5))) > 127)
            for other in masks[:i] + masks[i + 1:]:
                ring &= ~(np.asarray(other.filter(ImageFilter.MaxFilter(7))) > 127)
            inside, outside = pixels[_inside(mask)].mean(0), pixels[ring].mean(0)
            found = near & (np.linalg.norm(pixels - inside, axis=-1) < np.linalg.norm(pixels - outside, axis=-1))
            ious.append((found & truth).sum() / (found | truth).sum())
    assert np.mean(ious) >= 0.4, f"{look}: mean IoU {np.mean(ious):.2f}"


def test_every_look_differs_from_every_other_on_the_same_scene():
    """Pixel space, same scene: the mean absolute difference of every pair of looks (plain included) is over 5
    (of 255) on each of 8 scenes, single and two-object, on every background."""
    close = []
    for a, b in itertools.combinations(ALL_LOOKS, 2):
        worst = min(np.abs(_render(a, i) - _render(b, i)).mean() * 255 for i in range(8))
        if worst <= 5:
            close.append((a, b, round(float(worst), 1)))
    assert not close, close


def _features(look: str, index: int) -> np.ndarray:
    """Ten small statistics of a render, on the objects and on the background away from them: local variance,
    edge density, chroma, large-scale luminance spread; the background's brightness; and how much more the
    edges run across rows than across columns (stripes and hatching have a direction)."""
    pixels = _render(look, index)
    image = Image.fromarray(np.rint(pixels * 255).astype(np.uint8))
    fine = np.abs(pixels - np.asarray(image.filter(ImageFilter.BoxBlur(1)), dtype=np.float32) / 255).mean(-1)
    broad = np.asarray(image.filter(ImageFilter.BoxBlur(4)), dtype=np.float32).mean(-1) / 255
    lum, chroma = pixels.mean(-1), pixels.max(-1) - pixels.min(-1)
    across_rows, across_cols = np.abs(np.diff(lum, axis=0)) > 0.08, np.abs(np.diff(lum, axis=1)) > 0.08
    edges = np.zeros(lum.shape, bool)
    edges[1:] |= across_rows
    edges[:, 1:] |= across_cols
    objects = np.zeros(lum.shape, np.uint8)
    for mask in _masks(SCENES[index], SIZE):
        objects |= np.asarray(mask) > 127
    obj = objects > 0
    bg = ~(np.asarray(Image.fromarray(objects * 255).filter(ImageFilter.MaxFilter(9))) > 127)
    direction = (across_rows.sum() - across_cols.sum()) / max(across_rows.sum() + across_cols.sum(), 1)
    return np.array([fine[obj].mean(), fine[bg].mean(), edges[obj].mean(), edges[bg].mean(), chroma[obj].mean(),
                     chroma[bg].mean(), broad[obj].std(), broad[bg].std(), lum[bg].mean(), direction])


def test_a_simple_statistic_tells_the_looks_apart():
    """Each look's mean of _features over 8 scenes differs from every other look's: at least one feature by
    12% of its range over all the looks (the closest pair, plain and collage, differ by about 22%)."""
    means = {look: np.mean([_features(look, i) for i in range(8)], axis=0) for look in ALL_LOOKS}
    spread = np.ptp(np.stack(list(means.values())), axis=0)
    same = [(a, b) for a, b in itertools.combinations(ALL_LOOKS, 2) if (np.abs(means[a] - means[b]) / spread).max() < 0.12]
    assert not same, same


# --- the dataset writer ---------------------------------------------------------------------------


def test_dataset_writer_draws_any_look_and_world_styles_byte_for_byte(tmp_path):
    dataset_main(["--style", "stained-glass", "--count", "3", "--size", "32", "--out", str(tmp_path / "glass")])
    names = sorted(p.name for p in (tmp_path / "glass").iterdir())
    assert names == ["000.png", "000.txt", "001.png", "001.txt", "002.png", "002.txt", "README.md"]
    assert 'Suggested trigger: "sks stained-glass"' in (tmp_path / "glass" / "README.md").read_text(encoding="utf-8")
    assert (tmp_path / "glass" / "000.txt").read_text(encoding="utf-8").startswith("a ")
    for style, seed in (("sketch", 0), ("pastel", 1), ("halftone", 2)):  # the shipped folders, remade the same
        dataset_main(["--style", style, "--seed", str(seed), "--out", str(tmp_path / style)])
        files = sorted(p.name for p in (REPO / "datasets" / style).iterdir())
        match, mismatch, errors = filecmp.cmpfiles(REPO / "datasets" / style, tmp_path / style, files, shallow=False)
        assert not mismatch and not errors and len(match) == 49, (style, mismatch, errors)


def test_eval_scores_every_look_a_looks_checker_knows(tmp_path):
    """run_eval reads the style names off the checker it is given (a looks checker: one score per look)."""
    import torch

    from sdlora.eval.checker import Checker, save_checker
    from sdlora.eval.evaluate import builtin_prompts, run_eval
    from sdlora.models.base import load_base

    torch.manual_seed(0)
    names = ["plain", "neon", "chalk"]
    save_checker(Checker(width=16, style_names=names), tmp_path / "c.safetensors")
    report, _ = run_eval(load_base("tiny"), [], builtin_prompts(2, None), [1.0], ["neon"], steps=2,
                         checker_path=tmp_path / "c.safetensors")
    scores = report.rows[0]["style_scores"]
    assert list(scores) == names and all(0 <= v <= 1 for v in scores.values())
