"""CPU smoke tests of the GPU benchmark scripts (issue 5): they run end to end at a tiny size and report sane rows.

The numbers themselves are measured on a GPU and recorded in BENCHMARKS.md; nothing here asserts a speed.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def test_bench_train_runs_every_case_and_the_cli(work):
    bench = _load("bench_train")
    out = bench.main(["--small", "--device", "cpu", "--batches", "1,2", "--lever-batches", "1", "--steps", "2", "--warmup", "1",
                      "--cli-steps", "6", "--work", str(work), "--json", str(work / "train.json")])
    rows = out["rows"]
    cases = {(r["case"], r["batch"]) for r in rows}
    assert {("diffusers+peft eager", 1), ("diffusers+peft eager", 2), ("sdlora (default)", 1), ("sdlora (default)", 2)} <= cases
    assert ("graph + grad checkpointing, frozen TE", 1) in cases
    for r in rows:
        if "ms" in r:
            assert r["ms"] > 0 and math.isfinite(r["ms"])
    default = next(r for r in rows if r["case"] == "sdlora (default)")
    assert default["text_encoder_lora"] and default["targets"] == "cross-attn"  # what `sdlora train` does on a folder base
    assert default["lora_modules"] == 64 + 8  # 16 cross-attn blocks x 4 + 2 text-encoder layers x 4
    cli = rows[-1]
    assert cli["case"].startswith("sdlora train CLI") and cli["it_per_s"] > 0 and cli["fraction_of_bare_step"] > 0
    assert "| sdlora (default) | 1 |" in out["table"]
    assert (work / "cli-out" / "lora.safetensors").exists()


def test_bench_generate_runs_every_case(work):
    bench = _load("bench_generate")
    out = bench.main(["--small", "--device", "cpu", "--steps", "2", "--repeats", "1", "--targets", "cross-attn", "--rank", "4",
                      "--interleave", "2", "--work", str(work), "--json", str(work / "gen.json")])
    cases = [r["case"] for r in out["rows"]]
    assert cases[:5] == ["0 LoRAs", "1 LoRA unfused", "1 LoRA fused", "3 LoRAs unfused", "3 LoRAs fused"]
    assert any(c.startswith("change 3 strengths, unfused") for c in cases)
    assert all(r.get("ms_per_step", 1) > 0 for r in out["rows"])
    paired = [r for r in out["rows"] if r["case"].startswith("interleaved: ") and r["mode"] == "eager"]
    assert [r["case"] for r in paired] == ["interleaved: 0 LoRAs", "interleaved: 1 LoRA unfused", "interleaved: 3 LoRAs unfused",
                                           "interleaved: 3 LoRAs fused"]
    assert paired[0]["vs_none"] == 0 and all(r["rounds"] == 2 for r in paired)


def test_profile_step_kernels_sorts_the_step_into_kinds(work):
    prof = _load("profile_step_kernels")
    rows = prof.main(["--small", "--device", "cpu", "--batches", "1", "--steps", "1", "--work", str(work), "--json", str(work / "k.json")])
    assert [r["overrides"] for r in rows] == [{}, {"text_encoder": False}]  # text-encoder LoRA on (the default), then frozen
    for r in rows:
        assert r["kernel_ms_per_step"] > 0 and abs(sum(r["by_kind_pct"].values()) - 100) < 1
        assert {"convolution", "attention"} <= set(r["by_kind_ms"])  # the UNet's own work is found by name
    assert prof.kind("sm90_xmma_dgrad_implicit_gemm_bf16") == "convolution" and prof.kind("nvjet_sm90_tst_320x128") == "matmul"
    assert prof.kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"


def test_trace_graph_memory_runs_the_chosen_case(work):
    trace = _load("trace_graph_memory")
    out = trace.main(["--small", "--device", "cpu", "--case", "0", "--work", str(work), "--json", str(work / "t.json")])
    assert [c["overrides"] for c in out["cases"]] == [trace.CASES[0]]  # only the chosen case, so each can have its own process
    assert out["cases"][0]["captured"] is False  # CUDA graphs need a GPU; the CPU run checks the path, not memory


def _finite_numbers(row: dict) -> list[float]:
    nums = [v for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert all(math.isfinite(v) for v in nums), row
    return nums


def test_bench_train_sdxl_runs_every_case_and_the_three_cli_runs(work):
    bench = _load("bench_train")
    sdxl = _load("bench_train_sdxl")
    common = ["--family", "sdxl", "--small", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batches", "1",
              "--cli-steps", "3", "--work", str(work)]
    # in two calls, as on the GPU (each under the device's time limit): the steps, then the CLI runs against them
    out = bench.main(common + ["--parts", "baseline,sdlora", "--json", str(work / "train-sdxl.json")])
    cli_out = bench.main(common + ["--parts", "cli", "--bare-json", str(work / "train-sdxl.json"),
                                   "--json", str(work / "train-sdxl-cli.json")])
    assert not any("ms" in r for r in cli_out["rows"]) and not any("it_per_s" in r for r in out["rows"])
    rows = out["rows"] + cli_out["rows"]
    cases = [(r["case"], r["batch"]) for r in rows if "ms" in r]
    baselines = [(c, 1) for c in ("diffusers+peft eager", "diffusers+peft eager, grad checkpointing")]
    main_rows = [(c, 1) for c in sdxl.MAIN]
    levers = [(c, 1) for c in list(sdxl.LEVERS) + list(sdxl.FP8) if "attention" not in c]  # GPU kernels are skipped
    assert cases == baselines + main_rows + levers  # every case, in order: the fp8 ones last
    for r in rows:
        assert _finite_numbers(r)
        if "ms" in r:
            assert r["ms"] > 0
    assert out["roofline"]["unet_forward_flop_per_image"] > 0 and "| fp8 base | 1 |" in out["table"]
    by_case = {r["case"]: r for r in rows if r.get("batch") == 1 and "ms" in r}
    assert by_case["diffusers+peft eager"]["lora_modules"] == 136  # attn1 + attn2 q/k/v/out of the small SDXL UNet
    assert by_case["sdlora (default)"]["text_encoder_lora"] and by_case["fp8 base"]["fp8_base"]
    cli = [r for r in rows if "it_per_s" in r]
    assert [r["case"][:3] for r in cli] == ["(a)", "(b)", "(c)"]
    for r, (flags, bare) in zip(cli, sdxl.CLI.values()):
        assert all(f in r["command"] for f in flags) and r["bare_case"] == bare
        assert r["it_per_s"] > 0 and r["fraction_of_bare_step"] > 0
        assert (Path(r["output"]) / "lora.safetensors").exists()
    loss = rows[-1]
    assert loss["case"].startswith("loss: --fp8-base") and loss["steps"] == 3 and len(loss["fp8_losses"]) == 3
    assert loss["bf16_losses"] != loss["fp8_losses"] and abs(loss["relative_diff_of_means"]) < 0.2


def test_bench_generate_sdxl_runs_every_case(work):
    bench = _load("bench_generate")
    out = bench.main(["--family", "sdxl", "--small", "--device", "cpu", "--steps", "2", "--repeats", "1", "--rank", "4",
                      "--work", str(work), "--json", str(work / "gen-sdxl.json")])
    rows = out["rows"]
    assert [r["case"] for r in rows][:5] == ["0 LoRAs", "1 LoRA unfused", "1 LoRA fused", "3 LoRAs unfused", "3 LoRAs fused"]
    assert {r["targets"] for r in rows} == {"all-linear"} and {r["mode"] for r in rows} == {"graph"}
    assert any(r["case"] == "change 3 strengths, unfused" and r["ms"] > 0 for r in rows)
    for r in rows:
        assert _finite_numbers(r)
        if "ms_per_step" in r:
            assert r["ms_per_image"] == r["ms_per_step"] * 2
    lora = next((work).glob("all-linear-0.safetensors"))
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        prefixes = {k.split("_")[1] for k in f.keys()}
    assert {"unet", "te1", "te2"} <= prefixes  # SDXL's kohya prefixes: the UNet and both text encoders


def test_bench_multi_gpu_runs_one_and_two_processes(work):
    bench = _load("bench_multi_gpu")
    out = bench.main(["--small", "--device", "cpu", "--gpus", "2", "--steps", "3", "--batch", "1", "--work", str(work),
                      "--json", str(work / "multi.json")])
    one, two = out["rows"]
    assert (one["processes"], two["processes"]) == (1, 2) and one["batch_per_gpu"] == two["batch_per_gpu"] == 1
    assert one["it_per_s"] > 0 and two["it_per_s"] > 0
    assert two["img_per_s"] == pytest.approx(two["it_per_s"] * 2) and two["scaling"] > 0  # CPU: no speed asserted
    assert "--gpus 2" in two["command"] and "--gpus" not in one["command"]
    assert "| sd15 | 2 | 1 |" in out["table"]
    assert (work / "sd15-2x1" / "lora.safetensors").exists()


def test_bench_strength_times_both_paths_and_they_agree(work):
    bench = _load("bench_strength")
    out = bench.main(["--family", "sdxl", "--small", "--device", "cpu", "--repeats", "1", "--work", str(work),
                      "--json", str(work / "strength.json")])
    r = out["rows"]
    assert r["hosts"] > 100 and r["loras"] == 3  # the UNet's and both text encoders' layers
    assert r["change_3_strengths_one_layer_at_a_time_ms"] > 0 and r["change_3_strengths_batched_ms"] > 0
    assert r["change_1_strength_ms"] > 0 and r["change_3_strengths_in_one_call_ms"] > 0
    assert r["max_abs_diff_vs_per_layer"] < 1e-5  # the batched refresh writes what each layer alone computes
    from sdlora.lora.layer import LoraHost

    assert LoraHost.merged_inference is None  # the bench leaves the class default as it found it


def test_seed_sweep_trains_and_scores_each_seed(work):
    sweep = _load("seed_sweep")
    out = sweep.main(["--style", "pastel", "--seeds", "0,1", "--prompts", "2", "--strengths", "0,1", "--train-args",
                      "--steps 2 --no-progress", "--work", str(work / "sweep"), "--json", str(work / "sweep.json")])
    assert [r["seed"] for r in out["runs"]] == [0, 1]
    for r in out["runs"]:
        assert set(r["rows"]) == {0.0, 1.0}
        assert all(0 <= v <= 1 for row in r["rows"].values() for v in row.values())
    assert (work / "sweep" / "pastel-1" / "lora.safetensors").exists()


def test_eval_styles_protocol_runs_and_reports_every_bar(work):
    proto = _load("eval_styles")
    out = proto.main(["--looks", "pastel,sketch", "--seeds", "0", "--prompts", "2", "--train-args", "--steps 2",
                      "--work", str(work / "proto"), "--json", str(work / "proto.json")])
    assert [(r["look"], r["seed"]) for r in out["runs"]] == [("pastel", 0), ("sketch", 0)]
    for r in out["runs"]:
        assert set(r["rows"]) == {0.0, 0.25, 0.5, 0.75, 1.0}
        assert set(r["bars"]) == {"style_at_1", "style_at_0", "rises", "dial_at_half", "colour_kept", "shape_kept"}
    assert set(out["mix"]["scores"]) == {"pastel", "sketch"}
    assert out["table"].count("\n") == 3  # header, rule, two rows


def test_default_tuning_trains_a_training_look_under_a_neutral_trigger_and_picks_a_rate(work):
    """scripts/gpu_looks_tune.sh's path on a CPU: eval_styles on a look the base knows, under a trigger that does not
    name it; pick_default keeps the rate whose runs meet more bars, the lower one on a tie."""
    import json

    from sdlora.formats.kohya import load_adapter

    proto, picker = _load("eval_styles"), _load("pick_default")
    path = work / "tune-1e-3.json"
    out = proto.main(["--base", "tiny-looks", "--looks", "woodcut", "--seeds", "0", "--prompts", "1", "--trigger", "sks zq",
                      "--mix", "", "--train-args=--steps 2 --unet-lr 1e-3", "--work", str(work / "tune"), "--json", str(path)])
    assert out["trigger"] == "sks zq" and out["checker"].endswith("tiny-looks-base/checker.safetensors")
    assert load_adapter(work / "tune" / "woodcut-0" / "lora.safetensors").metadata["modelspec.trigger_phrase"] == "sks zq"
    met = sum(out["runs"][0]["bars"].values())
    for lr, change in (("2e-3", 0), ("4e-3", -1)):  # the same run read as two other rates: one ties, one meets fewer
        other = json.loads(path.read_text()) | {"train_args": f"--steps 2 --unet-lr {lr}"}
        bars = other["runs"][0]["bars"]
        if change:
            bars[next(k for k, v in bars.items() if v)] = False
        (work / f"tune-{lr}.json").write_text(json.dumps(other))
    best, table = picker.pick(sorted(work.glob("tune-*.json")))
    assert table == {1e-3: [met], 2e-3: [met], 4e-3: [met - 1]} and best == 1e-3


def test_generation_timer_times_each_base():
    out = _load("time_tiny_generation").main(["--bases", "tiny,tiny-looks", "--steps", "2", "--repeats", "1"])
    assert set(out) == {"tiny", "tiny-looks"} and all(len(v) == 1 and v[0] > 0 for v in out.values())
