"""sdlora.config: defaults, TOML presets (tables, dash keys, unknown keys), validation errors."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from sdlora.cli.main import build_parser
from sdlora.errors import SdloraError
from sdlora.training.config import FIELD_NAMES, TrainConfig, load_toml, make_config, validate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))


def toml(tmp_path: Path, text: str, name: str = "preset.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ---------------------------------------------------------------- defaults


def test_defaults():
    cfg = make_config(None, images="imgs")
    assert cfg.images == "imgs" and cfg.base == "tiny"
    assert cfg.rank == 4 and cfg.alpha is None and cfg.targets is None and cfg.text_encoder
    assert cfg.steps is None and cfg.epochs is None and cfg.batch_size == 1 and cfg.grad_accum == 1
    assert cfg.unet_lr is None and cfg.te_lr is None and cfg.lr_scheduler == "constant"
    assert cfg.seed == 42 and cfg.save_dtype == "fp16" and cfg.name == "lora" and not cfg.overwrite
    assert cfg.sample_prompt == [] and cfg.progress and not cfg.flip and cfg.buckets
    assert cfg.resolved_output() == Path("output") / "lora"
    assert make_config(None, images="i", output="o/x").resolved_output() == Path("o/x")


def test_unset_options_take_the_base_recommendation_then_the_fallback(tmp_path):
    from sdlora.models.tiny import tiny_base_dir
    from sdlora.training.config import apply_base_defaults

    plain = apply_base_defaults(make_config(None, images="i"), tmp_path)  # a base without recommendations
    assert (plain.unet_lr, plain.targets, plain.steps, plain.noise_offset) == (1e-4, "cross-attn", 500, 0.0)
    tiny = apply_base_defaults(make_config(None, images="i"), tiny_base_dir())
    assert (tiny.unet_lr, tiny.targets, tiny.steps, tiny.noise_offset, tiny.min_snr_gamma) == (1e-3, "all-linear", 500, 0.3, 5)
    assert plain.min_snr_gamma is None  # off unless a base recommends it
    mine = apply_base_defaults(make_config(None, images="i", unet_lr=2e-4, targets="attn", epochs=3, noise_offset=0.0), tiny_base_dir())
    assert (mine.unet_lr, mine.targets, mine.steps, mine.noise_offset) == (2e-4, "attn", None, 0.0)  # explicit values and --epochs win


def test_list_default_is_not_shared():
    a, b = TrainConfig(images="a"), TrainConfig(images="b")
    a.sample_prompt.append("x")
    assert b.sample_prompt == []


def test_every_option_has_help_and_a_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    for f in fields(TrainConfig):
        if f.metadata.get("hidden"):
            continue
        assert f.metadata["help"]
        assert "--" + f.name.replace("_", "-") in help_text


# ---------------------------------------------------------------- TOML


def test_toml_tables_are_flattened_and_dash_keys_accepted(tmp_path):
    p = toml(tmp_path, """
images = "data/style"
[lora]
rank = 8
alpha = 4.0
text-encoder = false
[optim]
unet-lr = 5e-4
lr_scheduler = "cosine"
[optim.warmup]
lr-warmup-steps = 10
[samples]
sample_prompt = ["a", "b"]
""")
    values = load_toml(p)
    assert values == {
        "images": "data/style", "rank": 8, "alpha": 4.0, "text_encoder": False, "unet_lr": 5e-4,
        "lr_scheduler": "cosine", "lr_warmup_steps": 10, "sample_prompt": ["a", "b"],
    }
    cfg = make_config(p)
    assert cfg.rank == 8 and cfg.alpha == 4.0 and not cfg.text_encoder and cfg.lr_warmup_steps == 10


def test_single_sample_prompt_string_becomes_a_list(tmp_path):
    assert load_toml(toml(tmp_path, 'sample_prompt = "a red circle"\n')) == {"sample_prompt": ["a red circle"]}


def test_overrides_beat_the_toml(tmp_path):
    p = toml(tmp_path, 'images = "a"\nrank = 8\nseed = 7\n')
    cfg = make_config(p, rank=2, images="b")
    assert cfg.rank == 2 and cfg.images == "b" and cfg.seed == 7


@pytest.mark.parametrize(
    "text, key, hint",
    [
        ("rnak = 4\n", "rnak", "rank"),
        ("[lora]\nlearning_rate = 1e-4\n", "learning_rate", None),
        ("unet-lr = 1e-4\nsample-promt = 'x'\n", "sample-promt", "sample_prompt"),
        ("interrupt_at_step = 3\n", "interrupt_at_step", None),  # the test hook is not an option
    ],
)
def test_unknown_key_is_named_with_a_suggestion(tmp_path, text, key, hint):
    p = toml(tmp_path, text)
    with pytest.raises(SdloraError) as e:
        load_toml(p)
    msg = str(e.value)
    assert f"unknown option '{key}'" in msg and str(p) in msg and "\n" not in msg
    if hint:
        assert f"did you mean '{hint}'?" in msg
    assert "interrupt_at_step'?" not in msg  # the hidden test hook is never suggested


def test_missing_and_malformed_toml(tmp_path):
    with pytest.raises(SdloraError, match="config file not found"):
        load_toml(tmp_path / "nope.toml")
    with pytest.raises(SdloraError, match="invalid TOML"):
        load_toml(toml(tmp_path, "rank = \n"))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "text, match",
    [
        ("rank = 'four'\n", "rank must be a whole number"),
        ("rank = 4.5\n", "rank must be a whole number"),
        ("steps = 'five'\n", "steps must be a whole number"),
        ("unet_lr = 'fast'\n", "unet_lr must be a number"),
        ("alpha = true\n", "alpha must be a number"),
        ("flip = 'yes'\n", "flip must be true or false"),
        ("trigger = 5\n", "trigger must be a string"),
        ("sample_prompt = ['a', 3]\n", "sample_prompt must be a list of strings"),
        ("targets = 'everything'\n", "invalid targets 'everything'"),
    ],
)
def test_wrong_types_are_one_line_errors(tmp_path, text, match):
    p = toml(tmp_path, 'images = "imgs"\n' + text)
    with pytest.raises(SdloraError, match=match) as e:
        make_config(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=10, epochs=2), "not both"),
        (dict(resolution=500), "multiple of 64"),
        (dict(resolution=32), "multiple of 64"),
        (dict(rank=0), "--rank must be at least 1"),
        (dict(batch_size=0), "--batch-size must be at least 1"),
        (dict(steps=0), "--steps must be at least 1"),
        (dict(epochs=0), "--epochs must be at least 1"),
        (dict(unet_lr=0.0), "learning rates must be positive"),
        (dict(cache_latents="gpu"), "choose one of memory, disk"),
    ],
)
def test_invalid_values(kw, match):
    with pytest.raises(SdloraError, match=match):
        make_config(None, images="imgs", **kw)


def test_resolution_multiple_of_64_is_fine():
    assert make_config(None, images="imgs", resolution=576).resolution == 576


def test_images_or_resume_required():
    with pytest.raises(SdloraError, match="--images"):
        make_config(None)
    assert make_config(None, resume="output/lora").resume == "output/lora"


def test_steps_and_epochs_from_toml_and_flags_conflict(tmp_path):
    p = toml(tmp_path, 'images = "imgs"\nepochs = 3\n')
    with pytest.raises(SdloraError, match="not both"):
        make_config(p, steps=5)


def test_unknown_override_is_rejected():
    with pytest.raises(SdloraError, match="unknown option"):
        make_config(None, images="imgs", rnak=3)


def test_validate_catches_later_edits():
    cfg = make_config(None, images="imgs")
    cfg.rank = "4"
    with pytest.raises(SdloraError, match="rank"):
        validate(cfg)


# ---------------------------------------------------------------- shipped presets


def test_presets_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny-demo.toml", "sd15-style.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    values = load_toml(path)
    assert values and set(values) <= FIELD_NAMES
    make_config(path, images="imgs")  # and validates


def test_sd15_style_preset_values():
    v = load_toml(REPO / "configs" / "sd15-style.toml")
    assert v["rank"] == 16 and v["alpha"] == 8 and v["unet_lr"] == 5e-4 and v["te_lr"] == 1e-4
    assert v["min_snr_gamma"] == 5 and v["resolution"] == 512 and v["batch_size"] == 2
    assert v["lr_scheduler"] == "cosine" and v["lr_warmup_steps"] > 0
    assert v["mixed_precision"] == "bf16" and v["flip"] is False
    assert "200-400" in (REPO / "configs" / "sd15-style.toml").read_text()


def test_tiny_demo_preset_values():
    v = load_toml(REPO / "configs" / "tiny-demo.toml")
    assert v["base"] == "tiny" and v["rank"] == 4 and v["unet_lr"] == 1e-3 and v["steps"] == 300
    assert v["sample_prompt"] and v["sample_every"] == 100
    assert "trigger" not in v  # given on the command line
