"""--vae, --v-prediction and --zero-terminal-snr: what they change on a loaded base, and what they refuse."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler

from sdlora.errors import SdloraError
from sdlora.models.overrides import configure_schedule, inference_overrides, load_vae, vae_dtype
from sdlora.models.single_file_sgm_write import vae_ldm_state_dict
from tests.sdxl_folder import SCHEDULER, VAE


@pytest.fixture(scope="module")
def base_vae():
    torch.manual_seed(0)
    return AutoencoderKL(**VAE).eval()


def test_fp16_only_for_a_vae_that_says_it_is_safe():
    assert vae_dtype({"force_upcast": True}, torch.float16) == torch.float32
    assert vae_dtype({}, torch.float16) == torch.float32
    assert vae_dtype({"force_upcast": False}, torch.float16) == torch.float16
    assert vae_dtype({"force_upcast": True}, torch.bfloat16) == torch.bfloat16


def test_vae_folder_and_ldm_single_file(base_vae, tmp_path):
    torch.manual_seed(1)
    other = AutoencoderKL(**(VAE | {"force_upcast": False})).eval()
    other.save_pretrained(tmp_path / "fixed")
    vae = load_vae(str(tmp_path / "fixed"), base_vae, torch.float16)
    assert vae.dtype == torch.float16  # declared fp16-safe
    assert torch.equal(vae.state_dict()["decoder.conv_out.weight"], other.state_dict()["decoder.conv_out.weight"].half())
    from safetensors.torch import save_file

    state = {k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_ldm_state_dict(other).items()}
    save_file(state, str(tmp_path / "vae.safetensors"))  # the layout A1111/ComfyUI VAE files have
    single = load_vae(str(tmp_path / "vae.safetensors"), base_vae, torch.float16)
    assert single.dtype == torch.float32  # the base's config (force_upcast) decides for a bare file
    assert all(torch.equal(a, b) for a, b in zip(single.state_dict().values(), other.state_dict().values()))
    assert single.config.scaling_factor == base_vae.config.scaling_factor


def test_vae_of_another_family_is_refused(base_vae, tmp_path):
    AutoencoderKL(**(VAE | {"latent_channels": 16})).save_pretrained(tmp_path / "flux-like")
    with pytest.raises(SdloraError, match="latent_channels"):
        load_vae(str(tmp_path / "flux-like"), base_vae, torch.float32)
    with pytest.raises(SdloraError, match="not found"):
        load_vae(str(tmp_path / "nothing.bin"), base_vae, torch.float32)


def test_v_prediction_and_zero_terminal_snr():
    sched = DDPMScheduler.from_config(SCHEDULER)
    assert configure_schedule(sched) is sched
    v = configure_schedule(sched, v_prediction=True, zero_terminal_snr=True)
    assert v.config.prediction_type == "v_prediction" and float(v.alphas_cumprod[-1]) == 0.0
    assert float(sched.alphas_cumprod[-1]) > 0.004  # SD's schedule leaves signal at t=999; ztsnr removes it
    kwargs = inference_overrides(v.config, "EulerDiscreteScheduler")
    euler = EulerDiscreteScheduler.from_config(v.config, **kwargs)
    euler.set_timesteps(10)
    assert int(euler.timesteps[0]) == 999 and euler.config.prediction_type == "v_prediction"
    assert inference_overrides(sched.config, "PNDMScheduler") == {}
    with pytest.raises(SdloraError, match="PNDM"):
        inference_overrides(v.config, "PNDMScheduler")
    assert json.loads(json.dumps(dict(v.config)))["rescale_betas_zero_snr"] is True
