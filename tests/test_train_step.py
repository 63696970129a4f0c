"""Decisions of the fast training step that CI can check without a GPU (the speed itself is in BENCHMARKS.md)."""

import torch

from sdlora.training.setup import compile_pays, use_cuda_graph

from .conftest import quick_config


def test_compile_auto_only_where_the_measured_saving_repays_compilation(tmp_path):
    # ~150 s per shape against 4.5 / 10.7 / 27 ms saved per step at batch 1 / 4 / 16 (H100, BENCHMARKS.md)
    assert not compile_pays(1000, 1) and not compile_pays(30_000, 1) and compile_pays(40_000, 1)
    assert not compile_pays(13_000, 4) and compile_pays(15_000, 4)
    assert not compile_pays(5_000, 16) and compile_pays(6_000, 16)
    assert compile_pays(10_000, 32)  # nearest measured batch: 16


def test_cuda_graph_only_where_the_step_can_be_captured(tmp_path):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = quick_config(tmp_path, tmp_path / "o")
    assert use_cuda_graph(cfg, cuda, "bf16") and use_cuda_graph(cfg, cuda, "no")
    assert not use_cuda_graph(cfg, cpu, "no")
    assert not use_cuda_graph(cfg, cuda, "fp16")  # the grad scaler reads the GPU every step
    assert not use_cuda_graph(quick_config(tmp_path, tmp_path / "o", grad_accum=2), cuda, "bf16")
    assert not use_cuda_graph(quick_config(tmp_path, tmp_path / "o", cuda_graph=False), cuda, "bf16")
    assert not use_cuda_graph(quick_config(tmp_path, tmp_path / "o", optimizer="adamw8bit"), cuda, "bf16")


def test_forced_gpu_attention_kernel_is_a_clear_error_on_the_cpu(tmp_path, style_dir):
    import pytest

    from sdlora.errors import SdloraError
    from sdlora.training.loop import train

    with pytest.raises(SdloraError, match="--sdpa-backend flash needs a CUDA GPU"):
        train(quick_config(style_dir, tmp_path / "o", steps=1, sdpa_backend="flash"))


def test_compiling_blocks_shares_graphs_and_keeps_code_outside_the_step_eager():
    """--compile-scope blocks compiles each ResNet/transformer block and text-encoder layer in place; validation and
    samples run under eager_blocks() (nothing compiled there), and the run's end undoes it."""
    from sdlora.models.base import load_base
    from sdlora.training.setup import compile_model, compiled_blocks, eager_blocks, uncompile_blocks

    base = load_base("tiny")
    unet, tes = base.unet, list(base.text_encoders.values())
    blocks = compiled_blocks(unet, tes)
    assert {type(m).__name__ for m in blocks} == {"ResnetBlock2D", "Transformer2DModel", "CLIPEncoderLayer"}
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        ref = unet(x, t, c).sample
        torch._dynamo.reset()
        assert compile_model(unet, "blocks", tes) is unet  # in place, not a wrapper
        assert all(m._compiled_call_impl is not None for m in blocks)
        with eager_blocks():
            out = unet(x, t, c).sample
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # nothing was compiled
        assert torch.equal(out, ref)
    uncompile_blocks(unet, tes)
    assert all(m._compiled_call_impl is None for m in blocks)
