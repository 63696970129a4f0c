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
