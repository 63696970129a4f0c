"""Issue 13 through the command line: path and permission mistakes are one line, `meta` keeps a file's protections
and loses no concurrent edit, captions decode by their byte-order mark, non-finite numbers never make a black image.

Permission cases run the real `sdlora` in a subprocess; under root (which ignores permission bits) it runs without
the two capabilities that let it, so a mode-000 file is unreadable and a mode-555 folder unwritable as for anyone.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sdlora.cli.main import main
from sdlora.data.folder import scan_images
from sdlora.formats.header import edit_metadata
from sdlora.formats.kohya import ModuleWeights, load_adapter, save_adapter

from .conftest import SKETCH
from .test_cli import ERROR, assert_one_error

NOBODY = 65534


def without_override(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m sdlora.cli.main ARGS` where permission bits bind: as root, with the capabilities that bypass
    them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) dropped by util-linux's setpriv; as anyone else, as is."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make permission bits apply to the command")
        caps = "-dac_override,-dac_read_search"
        prefix = [setpriv, "--bounding-set", caps, "--inh-caps", caps]
    env = {**os.environ, "SDLORA_CACHE": str(tmp / "cache"), "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "2"}
    return subprocess.run([*prefix, sys.executable, "-m", "sdlora.cli.main", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc: int, err: str, *needles: str) -> str:
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert rc == 2 and lines and lines[-1].startswith(ERROR), err
    assert sum(ln.startswith(ERROR) for ln in lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


def tiny_lora(path: Path, nan_module: str | None = None) -> Path:
    """A rank-2 LoRA on four of the tiny base's cross-attention layers (NaN in one module when asked)."""
    from sdlora.lora.targets import unet_targets
    from sdlora.models.base import load_base

    g = torch.Generator().manual_seed(0)
    modules = {}
    for t in unet_targets(load_base("tiny").unet, "cross-attn")[:4]:
        out_f, in_f = t.layer.weight.shape[:2]
        modules[t.kohya_name] = ModuleWeights(torch.randn(2, in_f, generator=g) * 0.1, torch.randn(out_f, 2, generator=g) * 0.1, 2.0)
    if nan_module:
        name = sorted(modules)[int(nan_module)]
        modules[name].up[0, 0] = float("nan")
    save_adapter(path, modules, {"ss_output_name": path.stem}, torch.float32)
    return path


# ---------------------------------------------------------------- item 2: OSError -> one line


def test_output_that_is_a_file_is_one_line(capsys, tmp_path):
    f = tmp_path / "taken.png"
    f.write_bytes(b"x")
    rc, _, err = run(capsys, "generate", "--prompt", "x", "--steps", 1, "--output", f)
    one_error_line(rc, err, "--output", str(f), "is a file, not a folder")
    rc, _, err = run(capsys, "train", "--images", SKETCH, "--steps", 1, "--output", f / "run")
    one_error_line(rc, err, "--output", str(f), "is a file, not a folder")
    assert f.read_bytes() == b"x"


def test_unwritable_output_folder_unreadable_file_and_readonly_meta_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    lora = tiny_lora(locked / "style.safetensors")
    lora.chmod(0o666)  # writable, but its folder is not: the replacement cannot be written beside it
    secret = tmp_path / "secret.safetensors"
    shutil.copy(lora, secret)
    secret.chmod(0o000)
    locked.chmod(0o555)
    before = lora.read_bytes()
    cases = [("generate", "--prompt", "x", "--steps", 1, "--output", locked / "images"),
             ("inspect", secret), ("meta", lora, "--set", "title=x")]
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:  # each subprocess mostly waits on imports
            gen, insp, meta = pool.map(lambda args: without_override(tmp_path, *args), cases)
        assert_one_error(gen, "--output", "cannot write in", str(locked))
        assert_one_error(insp, "cannot access", str(secret), "Permission denied")  # the generic handler: what, which path, why
        assert_one_error(meta, "cannot edit", str(lora), "not writable")
        assert lora.read_bytes() == before and sorted(p.name for p in locked.iterdir()) == ["style.safetensors"]
    finally:
        locked.chmod(0o755)


def test_unreadable_and_utf16_captions_long_captions_through_train(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    pngs = sorted(SKETCH.glob("*.png"))[:4]
    for p in pngs:
        shutil.copy(p, imgs / p.name)
    a, b, c, d = (imgs / p.with_suffix(".txt").name for p in pngs)
    a.write_bytes("\ufeffcat, red circle".encode("utf-16-le"))  # Notepad's "Unicode"
    b.write_bytes("\ufeffdog, blue square".encode("utf-16-be"))
    c.write_text("a caption nobody may read")
    c.chmod(0o000)
    d.write_text(", ".join(f"word{i}" for i in range(60)))  # ~120 tokens: over CLIP's 77
    out_dir = tmp_path / "run"
    proc = without_override(tmp_path, "train", "--images", imgs, "--steps", 1, "--trigger", "sks", "--output", out_dir,
                   "--no-progress", "--no-text-encoder")
    assert proc.returncode == 0, proc.stderr
    assert f"skipping {pngs[2].name}: cannot read its caption {c.name}" in proc.stderr
    assert "not valid UTF-8" not in proc.stderr and "neither UTF-8 nor UTF-16" not in proc.stderr
    assert proc.stderr.count("longer than CLIP's 77 tokens") == 1
    meta = safetensors.safe_open(str(out_dir / "lora.safetensors"), "pt").metadata()
    tags = json.loads(meta["ss_tag_frequency"])["imgs"]
    assert tags["cat"] == tags["dog"] == tags["red circle"] == tags["blue square"] == 1
    assert meta["ss_num_train_images"] == "3"


def test_utf16_and_other_caption_bytes_decode():
    from sdlora.data.folder import decode_caption

    text = "pastel, ein großer Kreis"
    for enc in ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"):
        raw = text.encode(enc)
        if enc in ("utf-16-le", "utf-16-be"):
            assert decode_caption(raw) == text  # no BOM: told by the zero bytes
            raw = "\ufeff".encode(enc) + raw
        assert decode_caption(raw) == text, enc
    assert decode_caption(b"caf\xe9 au lait") is None  # Latin-1: truly not UTF-8 or UTF-16, so the caller warns


def test_no_captions_and_no_trigger_is_said_once(capsys, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in sorted(SKETCH.glob("*.png"))[:2]:
        shutil.copy(p, imgs / p.name)
    rc, _, err = run(capsys, "train", "--images", imgs, "--steps", 1, "--output", tmp_path / "o", "--no-progress",
                     "--no-text-encoder")
    assert rc == 0, err
    assert err.count("no image has a caption") == 1 and "--trigger" in err
    warned: list[str] = []
    scan_images(imgs, trigger="sks style", warn=warned.append)
    assert warned == []  # with a trigger the LoRA has a word to switch it on


# ---------------------------------------------------------------- item 3: meta keeps protections, loses no edit


def test_meta_refuses_a_read_only_file_keeps_mode_and_owner(capsys, tmp_path):
    f = tiny_lora(tmp_path / "style.safetensors")
    f.chmod(0o444)
    before = f.read_bytes()
    rc, _, err = run(capsys, "meta", f, "--set", "title=new")
    one_error_line(rc, err, str(f), "read-only", "--force")
    assert f.read_bytes() == before
    rc, out, err = run(capsys, "meta", f, "--set", "title=new", "--force")
    assert rc == 0, err
    assert stat.S_IMODE(f.stat().st_mode) == 0o444 and load_adapter(f).metadata["modelspec.title"] == "new"

    g = tiny_lora(tmp_path / "theirs.safetensors")
    g.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(g, NOBODY, NOBODY)
    owner = (g.stat().st_uid, g.stat().st_gid)
    rc, _, err = run(capsys, "meta", g, "--set", "author=me")
    assert rc == 0, err
    assert (g.stat().st_uid, g.stat().st_gid) == owner and stat.S_IMODE(g.stat().st_mode) == 0o640
    assert not list(tmp_path.glob(".*"))  # no lock or temp file left behind


def test_concurrent_meta_edits_all_survive(tmp_path):
    f = tiny_lora(tmp_path / "style.safetensors")
    tensors = safetensors.torch.load_file(f)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def edit(i: int) -> None:
        try:
            start.wait()
            for k in range(3):
                edit_metadata(f, {f"modelspec.note_{i}_{k}": f"value {i} {k}"}, [])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=edit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    meta = load_adapter(f).metadata
    assert {k for k in meta if k.startswith("modelspec.note_")} == {f"modelspec.note_{i}_{k}" for i in range(8) for k in range(3)}
    after = safetensors.torch.load_file(f)
    assert after.keys() == tensors.keys() and all(torch.equal(after[k], tensors[k]) for k in tensors)


def test_meta_refuses_to_replace_a_file_changed_under_it(tmp_path, monkeypatch):
    import sdlora.formats.header as header

    f = tiny_lora(tmp_path / "style.safetensors")
    real = header._keep_mode_and_owner

    def meddle(tmp, before, path):  # another program appends to the file while sdlora writes the new one
        real(tmp, before, path)
        with open(path, "ab") as fh:
            fh.write(b" ")

    monkeypatch.setattr(header, "_keep_mode_and_owner", meddle)
    with pytest.raises(header.SdloraError, match="changed while its metadata was being edited"):
        edit_metadata(f, {"title": "x"}, [])
    changed = f.read_bytes()
    assert changed.endswith(b" ") and "modelspec.title" not in json.dumps(header.read_header(f)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.safetensors"]


# ---------------------------------------------------------------- item 1: non-finite numbers


def test_nonfinite_strengths_and_weights_are_refused(capsys, tmp_path):
    good = tiny_lora(tmp_path / "good.safetensors")
    bad = tiny_lora(tmp_path / "bad.safetensors", nan_module="1")
    bad_name = sorted(load_adapter(bad).modules)[1]
    images = tmp_path / "img"
    for value in ("inf", "nan", "-inf"):
        rc, _, err = run(capsys, "generate", "--prompt", "x", "--steps", 1, "--lora", f"{good}:{value}", "--output", images)
        one_error_line(rc, err, "strength", value)
    rc, out, err = run(capsys, "inspect", bad)
    assert rc == 0 and "1 of 4 modules hold NaN or infinite weights" in out and bad_name in out
    rc, out, err = run(capsys, "inspect", bad, "--json")
    assert rc == 0 and json.loads(out)["nonfinite_module_names"] == [bad_name]
    rc, _, err = run(capsys, "generate", "--prompt", "x", "--steps", 1, "--lora", bad, "--output", images)
    one_error_line(rc, err, str(bad), "NaN or infinite", bad_name)
    rc, _, err = run(capsys, "merge", "--lora", good, "--lora", bad, "--output", tmp_path / "m.safetensors")
    one_error_line(rc, err, str(bad), "NaN or infinite", bad_name)
    assert not images.exists() and not (tmp_path / "m.safetensors").exists()


def test_sampler_stops_when_latents_blow_up(capsys, tmp_path):
    good = tiny_lora(tmp_path / "good.safetensors")
    rc, _, err = run(capsys, "generate", "--prompt", "x", "--steps", 3, "--lora", f"{good}:1e30", "--output", tmp_path / "img")
    one_error_line(rc, err, "sampling stopped at step 1 of 3", "NaN or infinite")
    assert not (tmp_path / "img").exists() or not list((tmp_path / "img").iterdir())


# ---------------------------------------------------------------- item 8: eval shows time left


def test_eval_progress_bar_shows_time_left(capsys, tmp_path):
    rc, out, err = run(capsys, "eval", "--num-prompts", 1, "--strengths", "0,1", "--steps", 2, "--output", tmp_path / "e")
    assert rc == 0, err
    assert "eval: 2 images" in err and "0/4 steps, image 1/2" in err and "4/4 steps, image 2/2" in err and " left]" in err
    assert (tmp_path / "e" / "grid.png").exists()


# ---------------------------------------------------------------- item 5: strength errors say what is wrong


@pytest.mark.parametrize("suffix, needle", [(":abc", "bad strength 'abc'"), (":1:2:3:4", "too many strengths"),
                                            (":", "empty strength after ':'"), (":0.5x", "bad strength '0.5x'"),
                                            (":1e400", "strength '1e400' is not a finite number")])
def test_bad_strengths_name_the_strength_and_the_forms(capsys, tmp_path, suffix, needle):
    good = tiny_lora(tmp_path / "good.safetensors")
    rc, _, err = run(capsys, "generate", "--prompt", "x", "--steps", 1, "--lora", f"{good}{suffix}", "--output", tmp_path / "i")
    line = one_error_line(rc, err, needle, "FILE:STRENGTH:TE_STRENGTH")
    assert "not found" not in line


def test_prompt_tag_multipliers_must_be_finite_numbers(capsys, tmp_path):
    tiny_lora(tmp_path / "style.safetensors")
    for tag, needles in (("<lora:style:inf>", ["<lora:style:inf>", "not a finite number"]),
                         ("<lora:style:1:2:3>", ["<lora:style:1:2:3>", "bad prompt tag"]),
                         ("<lora:style:abc>", ["lbw 'abc'", "expected a preset"]),  # a word there is a block preset
                         ("<lora:style:te=x>", ["<lora:style:te=x>", "multipliers are numbers"])):
        rc, _, err = run(capsys, "generate", "--prompt", f"a circle {tag}", "--lora-dir", tmp_path, "--steps", 1,
                         "--output", tmp_path / "i")
        one_error_line(rc, err, *needles)
