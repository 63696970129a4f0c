"""The real `sdlora` entry point in a subprocess: bad input is one `sdlora: error:` line (exit 2), never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from .conftest import SKETCH

ERROR = "sdlora: error:"


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """Environment of every subprocess: a per-module tiny-base cache, quiet libraries, no network."""
    env = dict(os.environ)
    env["SDLORA_CACHE"] = str(tmp_path_factory.mktemp("cli-cache"))
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["OMP_NUM_THREADS"] = "2"
    env.pop("HF_HUB_OFFLINE", None)
    return env


def sdlora(env: dict[str, str], *args: str, extra_env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "sdlora.cli.main", *map(str, args)],
        env={**env, **(extra_env or {})}, cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def _lines(text: str) -> list[str]:
    # progress bars redraw with \r: every redraw counts as its own line
    return [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]


def assert_one_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit `code`; the last stderr line is the only `sdlora: error:` line and names the problem; no traceback."""
    detail = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, detail
    assert proc.returncode == code, detail
    lines = _lines(proc.stderr)
    assert lines, detail
    assert lines[-1].startswith(ERROR), detail
    assert sum(ln.startswith(ERROR) for ln in lines) == 1, detail
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in the error line\n{detail}"
    return lines[-1]


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    detail = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, detail
    assert "Traceback" not in proc.stderr and ERROR not in proc.stderr, detail


def copy_images(dest: Path, n: int) -> Path:
    dest.mkdir(parents=True)
    for png in sorted(SKETCH.glob("*.png"))[:n]:
        shutil.copy(png, dest / png.name)
        shutil.copy(png.with_suffix(".txt"), dest / png.with_suffix(".txt").name)
    return dest


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# ---------------------------------------------------------------- help


@pytest.mark.parametrize(
    "args, flags",
    [
        ((), ["train", "generate"]),
        (("train",), ["--images", "--rank", "--config", "--steps", "--trigger", "--overwrite", "--resume"]),
        (("generate",), ["--lora", "--lora-dir", "--prompt", "--base", "--num-images"]),
    ],
    ids=["sdlora", "train", "generate"],
)
def test_help_exits_zero_and_lists_key_flags(cli_env, args, flags):
    proc = sdlora(cli_env, *args, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for flag in flags:
        assert flag in proc.stdout


def test_no_subcommand_is_a_usage_error(cli_env):
    proc = sdlora(cli_env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "usage: sdlora" in proc.stderr


# ---------------------------------------------------------------- bad input: one line, exit 2


def _write_sdxl_lora(path: Path) -> None:
    import torch

    from sdlora.formats.kohya import ModuleWeights, save_adapter

    modules = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ModuleWeights(torch.ones(4, 640), torch.ones(640, 4), 4.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ModuleWeights(torch.ones(4, 768), torch.ones(768, 4), 4.0),
    }
    save_adapter(path, modules, {"ss_base_model_version": "sdxl_base_v1-0"})


def _case_missing_images(tmp: Path):
    return ["train", "--images", tmp / "nope", "--steps", 1, "--output", tmp / "out"], ["image folder not found", "nope"]


def _case_empty_folder(tmp: Path):
    (tmp / "empty").mkdir()
    return ["train", "--images", tmp / "empty", "--steps", 1, "--output", tmp / "out"], ["no images", "empty"]


def _case_unreadable_images(tmp: Path):
    d = tmp / "broken"
    d.mkdir()
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("this is not an image\n")
    (d / "text.txt").write_text("a caption\n")
    return ["train", "--images", d, "--steps", 1, "--output", tmp / "out"], ["no readable images", "broken"]


def _case_text_lora(tmp: Path):
    f = tmp / "notes.safetensors"
    f.write_text("just some text, not tensors\n")
    return ["generate", "--prompt", "x", "--lora", f, "--steps", 1, "--output", tmp / "img"], [
        "notes.safetensors", "is not a .safetensors file"]


def _case_zip_ckpt_lora(tmp: Path):
    import torch

    f = tmp / "model.ckpt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, f)
    return ["generate", "--prompt", "x", "--lora", f, "--steps", 1, "--output", tmp / "img"], [
        "model.ckpt", "not a .safetensors file", "never unpickles"]


def _case_legacy_pickle_lora(tmp: Path):
    import torch

    f = tmp / "old.pt"
    torch.save({"w": torch.zeros(2)}, f, _use_new_zipfile_serialization=False)
    return ["generate", "--prompt", "x", "--lora", f"{f}:0.5", "--steps", 1, "--output", tmp / "img"], [
        "old.pt", "pickle", "never unpickles"]


def _case_sdxl_lora(tmp: Path):
    f = tmp / "sdxl_style.safetensors"
    _write_sdxl_lora(f)
    return ["generate", "--prompt", "x", "--lora", f, "--steps", 1, "--output", tmp / "img"], [
        "sdxl_style.safetensors", "does not fit", "SDXL",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]


def _case_rank_too_large(tmp: Path):
    imgs = copy_images(tmp / "imgs", 2)
    return ["train", "--images", imgs, "--steps", 1, "--rank", 100000, "--output", tmp / "out", "--no-progress"], [
        "--rank 100000", "larger than layer"]


def _case_toml_unknown_key(tmp: Path):
    cfg = tmp / "preset.toml"
    cfg.write_text("[lora]\nrnak = 4\n")
    return ["train", "--config", cfg, "--images", tmp, "--output", tmp / "out"], [
        "unknown option 'rnak'", "preset.toml", "did you mean 'rank'"]


def _case_toml_wrong_type(tmp: Path):
    cfg = tmp / "preset.toml"
    cfg.write_text('steps = "five"\n')
    return ["train", "--config", cfg, "--images", tmp, "--output", tmp / "out"], ["steps", "'five'"]


def _case_bad_lora_spec(tmp: Path):
    return ["generate", "--prompt", "x", "--lora", ":0.5", "--steps", 1, "--output", tmp / "img"], [
        "--lora ':0.5'", "no file given", "FILE:STRENGTH:TE_STRENGTH"]


def _case_missing_prompt_tag(tmp: Path):
    (tmp / "loras").mkdir()
    return ["generate", "--prompt", "a house <lora:missing:0.5>", "--lora-dir", tmp / "loras", "--steps", 1,
            "--output", tmp / "img"], ["<lora:missing>", "not found"]


def _case_base_not_diffusers(tmp: Path):
    d = tmp / "some_folder"
    d.mkdir()
    (d / "readme.txt").write_text("not a model\n")
    return ["generate", "--prompt", "x", "--base", d, "--steps", 1, "--output", tmp / "img"], [
        "some_folder", "not a diffusers model folder"]


def _case_hub_id_offline(tmp: Path):
    return ["generate", "--prompt", "x", "--base", "some/hubid", "--steps", 1, "--output", tmp / "img"], [
        "some/hubid", "not in the local Hugging Face cache", "--base PATH"]


BAD_INPUT = {
    "missing-images-folder": _case_missing_images,
    "empty-images-folder": _case_empty_folder,
    "only-unreadable-images": _case_unreadable_images,
    "lora-text-file": _case_text_lora,
    "lora-zip-ckpt": _case_zip_ckpt_lora,
    "lora-legacy-pickle": _case_legacy_pickle_lora,
    "lora-sdxl-keys": _case_sdxl_lora,
    "rank-larger-than-layer": _case_rank_too_large,
    "toml-unknown-key": _case_toml_unknown_key,
    "toml-wrong-type": _case_toml_wrong_type,
    "bad-lora-spec": _case_bad_lora_spec,
    "missing-prompt-lora-tag": _case_missing_prompt_tag,
    "base-not-diffusers": _case_base_not_diffusers,
    "hub-id-offline": _case_hub_id_offline,
}


@pytest.fixture(scope="module")
def bad_input_runs(cli_env, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess, list[str]]]:
    """Every bad-input case, run a few at a time (each subprocess mostly waits on imports)."""
    prepared = {}
    for case, make in BAD_INPUT.items():
        tmp = tmp_path_factory.mktemp(case)
        args, needles = make(tmp)
        extra = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf")} if case == "hub-id-offline" else None
        prepared[case] = (tmp, args, needles, extra)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {case: pool.submit(sdlora, cli_env, *args, extra_env=extra) for case, (_, args, _, extra) in prepared.items()}
        return {case: (prepared[case][0], fut.result(), prepared[case][2]) for case, fut in futures.items()}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line(bad_input_runs, case):
    tmp, proc, needles = bad_input_runs[case]
    assert_one_error(proc, *needles)
    assert not proc.stdout.strip()  # nothing claims success
    assert not (tmp / "img").exists()  # generate wrote no images
    assert not list((tmp / "out").rglob("*.safetensors")) if (tmp / "out").exists() else True  # train wrote no adapter


# ---------------------------------------------------------------- happy path


@pytest.fixture(scope="module")
def cli_lora(cli_env, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-train")
    imgs = copy_images(root / "images", 4)
    out = root / "X"
    proc = sdlora(cli_env, "train", "--images", imgs, "--steps", 5, "--output", out, "--trigger", "sks sketch",
                  "--no-progress")
    assert_ok(proc)
    adapter = out / "lora.safetensors"
    assert proc.stdout.strip().splitlines()[-1] == str(adapter)
    return adapter


def test_train_writes_a_kohya_file(cli_lora):
    meta = metadata(cli_lora)
    assert meta["ss_steps"] == "5" and meta["ss_network_dim"] == "4"
    assert meta["modelspec.trigger_phrase"] == "sks sketch"


def test_generate_mixes_two_loras_and_records_the_prompt(cli_env, cli_lora, tmp_path):
    prompt = "sks sketch, a lighthouse"
    out = tmp_path / "Y"
    proc = sdlora(cli_env, "generate", "--prompt", prompt, "--lora", f"{cli_lora}:0.8", "--lora", f"{cli_lora}:-0.3:0.5",
                  "--steps", 2, "--num-images", 2, "--output", out)
    assert_ok(proc)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    assert sorted(proc.stdout.split()) == sorted(str(p) for p in pngs)
    for p in pngs:
        with Image.open(p) as img:
            params = img.text["parameters"]
        assert params.startswith(prompt)
        assert "Steps: 2" in params and "LoRAs: lora:0.8, lora:-0.3" in params


def test_existing_output_needs_overwrite(cli_env, tmp_path):
    imgs = copy_images(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me\n")
    args = ["train", "--images", imgs, "--steps", 1, "--rank", 2, "--output", out, "--no-progress"]
    assert_one_error(sdlora(cli_env, *args), str(out), "already exists", "--overwrite")
    assert (out / "precious.txt").exists()

    assert_ok(sdlora(cli_env, *args, "--overwrite"))
    assert not (out / "precious.txt").exists()
    assert (out / "lora.safetensors").exists()


def test_toml_config_sets_options_and_flags_override_it(cli_env, tmp_path):
    imgs = copy_images(tmp_path / "imgs", 2)
    cfg = tmp_path / "preset.toml"
    cfg.write_text(
        "# a preset with grouping tables\n"
        "[lora]\nrank = 8\nalpha = 4\n"
        "[optim]\nsteps = 2\nunet_lr = 1e-3\nseed = 1234\n"
        "[output]\nname = \"mystyle\"\nsave-dtype = \"fp32\"\ncomment = \"from toml\"\n"
    )
    out = tmp_path / "out"
    proc = sdlora(cli_env, "train", "--config", cfg, "--images", imgs, "--rank", 2, "--steps", 1, "--output", out,
                  "--no-progress")
    assert_ok(proc)
    meta = metadata(out / "mystyle.safetensors")
    assert meta["ss_network_dim"] == "2"  # --rank beats the TOML's 8
    assert meta["ss_steps"] == "1"  # --steps beats the TOML's 2
    assert meta["ss_network_alpha"] == "4.0" or float(meta["ss_network_alpha"]) == 4.0  # from the TOML
    assert meta["ss_seed"] == "1234" and meta["ss_training_comment"] == "from toml"
