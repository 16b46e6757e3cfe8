"""Make the VAE goldens with diffusers 0.42.1 (torch, float32, CPU). Run with the reference environment:

    /work/refenv/bin/python tests/goldens/make_vae_goldens.py

A tiny `AutoencoderKLQwenImage` of the real shape (dim_mult [1, 2, 4, 4], two res blocks, z_dim 16, the real
latents_mean/std) at base_dim 8 gets random weights, every 3x3x3 temporal tap, gamma and bias distinct, rounded
to float16 so that the float16 checkpoint saved here holds them exactly. Writes:
- tests/goldens/vae_folder/: config.json + diffusion_pytorch_model.safetensors from `save_pretrained` (float16,
  time_conv weights included, as in the real checkpoint),
- tests/goldens/vae_goldens.safetensors: decode inputs (normalised latents, NCHW) and outputs through the
  pipeline's own path (`latents / (1 / std) + mean`, `vae.decode(...)[:, :, 0]`), the uint8 images of
  `VaeImageProcessor.postprocess`, encode inputs and the posterior mean (normalised as the img2img pipeline does)
  and log-variance,
- tests/goldens/vae_meta.json: sizes, and the max difference between diffusers' 3-D path and the same model
  evaluated with every causal conv replaced by a 2-D conv on its last temporal tap (the reduction qwen_nb uses).
"""

import json
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qvae
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent
CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[])
DECODE_SIZES = {"square": (1, 8, 8), "wide": (2, 6, 10)}  # (B, h, w) latents
ENCODE_SIZES = {"square": (1, 64, 64), "wide": (2, 48, 80)}  # (B, H, W) images


def build() -> AutoencoderKLQwenImage:
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**CONFIG).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
            if "decoder.conv_out" in name:
                p.mul_(3.0)  # spread the decoded pixels over [-1, 1], a few beyond the clamp
            p.copy_(p.half().float())
    return vae


def pipeline_decode(vae, latents):
    """QwenImagePipeline's decode lines, verbatim in effect."""
    z = latents[:, :, None]  # (B, C, 1, h, w)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
    z = z / inv_std + mean
    return vae.decode(z, return_dict=False)[0][:, :, 0]


def pipeline_encode(vae, images):
    """The img2img pipeline's `_encode_vae_image` with the posterior mean (`.mode()`) instead of a sample."""
    posterior = vae.encode(images[:, :, None]).latent_dist
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
    return ((posterior.mode() - mean) * inv_std)[:, :, 0], posterior.logvar[:, :, 0]


def conv2d_forward(self, x, cache_x=None):
    """A causal conv evaluated as a 2-D conv on its last temporal tap (valid for one frame, no cache)."""
    assert x.shape[2] == 1 and cache_x is None
    pad = self._padding[0]
    y = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, stride=self.stride[1:], padding=pad)
    return y[:, :, None]


def main():
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    vae = build()
    gen = torch.Generator().manual_seed(1)
    tensors, meta = {}, {"config": CONFIG, "diffusers": diffusers.__version__, "decode": {}, "encode": {}}
    time_conv_calls = []
    for m in vae.modules():
        if isinstance(m, qvae.QwenImageResample) and hasattr(m, "time_conv"):
            m.time_conv.register_forward_hook(lambda *a: time_conv_calls.append(1))

    processor = VaeImageProcessor(vae_scale_factor=16)
    with torch.no_grad():
        for name, (b, h, w) in DECODE_SIZES.items():
            latents = torch.randn(b, CONFIG["z_dim"], h, w, generator=gen)
            image = pipeline_decode(vae, latents)
            pil = processor.postprocess(image, output_type="pil")
            tensors[f"decode_{name}_latents"] = latents
            tensors[f"decode_{name}_image"] = image
            tensors[f"decode_{name}_uint8"] = torch.from_numpy(np.stack([np.array(p) for p in pil]))
            meta["decode"][name] = {"latents": [b, h, w], "clamped_fraction": float((image.abs() >= 1).float().mean())}
        for name, (b, H, W) in ENCODE_SIZES.items():
            images = torch.rand(b, 3, H, W, generator=gen) * 2 - 1
            mean, logvar = pipeline_encode(vae, images)
            tensors[f"encode_{name}_images"] = images
            tensors[f"encode_{name}_mean"] = mean
            tensors[f"encode_{name}_logvar"] = logvar
            meta["encode"][name] = {"images": [b, H, W]}
        assert not time_conv_calls, "time_conv ran on a single frame"

        # The 2-D reduction, checked inside diffusers itself: patch every causal conv to a 2-D conv on its last tap.
        original = qvae.QwenImageCausalConv3d.forward
        qvae.QwenImageCausalConv3d.forward = conv2d_forward
        try:
            diff_dec = max(
                (pipeline_decode(vae, tensors[f"decode_{n}_latents"]) - tensors[f"decode_{n}_image"]).abs().max().item()
                for n in DECODE_SIZES
            )
            diff_enc = max(
                (pipeline_encode(vae, tensors[f"encode_{n}_images"])[0] - tensors[f"encode_{n}_mean"])
                .abs()
                .max()
                .item()
                for n in ENCODE_SIZES
            )
        finally:
            qvae.QwenImageCausalConv3d.forward = original
    meta["max_abs_diff_3d_vs_2d"] = {"decode": diff_dec, "encode_mean": diff_enc}
    meta["time_conv_calls"] = len(time_conv_calls)
    print("3-D path vs 2-D evaluation, max |diff|:", meta["max_abs_diff_3d_vs_2d"])

    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "vae_goldens.safetensors")
    vae.to(torch.float16).save_pretrained(OUT / "vae_folder")
    (OUT / "vae_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for k, v in tensors.items():
        print(f"{k:28s} {tuple(v.shape)} {v.dtype} range [{v.min().item():.3f}, {v.max().item():.3f}]")
    print(json.dumps(meta["decode"]))


if __name__ == "__main__":
    main()
