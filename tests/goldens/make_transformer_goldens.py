"""Make the transformer and scheduler goldens from diffusers 0.42.1 (torch CPU, float32). Not run by CI.

    /work/refenv/bin/python tests/goldens/make_transformer_goldens.py     (pip install -r requirements-reference.txt)

Writes into tests/goldens/:
- `transformer_{a,b}_weights.safetensors`: the state dict of a tiny `QwenImageTransformer2DModel`, diffusers' names.
  The random weights are drawn as bfloat16 values and stored as bfloat16: casting them to float32 is exact, so the
  float32 goldens below are the float32 model with exactly these weights, at half the file size.
- `transformer_{a,b}.safetensors`: inputs and outputs (float32) of RMSNorm, RoPE, one attention call, the timestep
  embedding, one block and the whole transformer; for config A also a bfloat16 run of the whole transformer.
- `rope_tables.safetensors`: cos/sin of `QwenEmbedRope` for the real axes (16, 56, 56) at 64x64, 83x83 and
  58x104 (1664x928 px) with 12 text tokens and at 64x64 with 1024, on a fixed subset of the rows (the full
  tables are megabytes).
- `scheduler.safetensors`: sigmas and timesteps of the pipeline's schedule at several sizes, one Euler step,
  pack/unpack and the CFG combine.

Every random value comes from a seeded NumPy generator, so a rerun writes identical files.
"""

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent
torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)

# `scheduler/scheduler_config.json` of Qwen/Qwen-Image (spec section 3.1), not the class defaults.
SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

CONFIGS = {
    # 2 heads x 32, square 4x4 grid, batch 1, no mask
    "a": dict(
        model=dict(
            num_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=48,
            axes_dims_rope=(8, 12, 12),
        ),
        grid=(4, 4),
        text_len=7,
        sigma=[0.7],
        text_lens=None,
        seed=1,
    ),
    # odd sizes: 3 heads x 20 with an odd number of frequencies per axis (3, 3, 4), a 3x5 grid, batch 2 whose
    # second prompt is 2 tokens shorter (zero-padded, as the pipeline pads), different sigma per sample
    "b": dict(
        model=dict(
            num_layers=2, attention_head_dim=20, num_attention_heads=3, joint_attention_dim=40, axes_dims_rope=(6, 6, 8)
        ),
        grid=(3, 5),
        text_len=6,
        sigma=[0.35, 0.9],
        text_lens=[6, 4],
        seed=2,
    ),
}


def t32(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def to_save(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32).contiguous().clone()


def info(**fields) -> dict:
    """File metadata as ONE json string: safetensors writes several metadata keys in a random order."""
    return {"info": json.dumps(fields)}


def randomize(model: torch.nn.Module, rng: np.random.Generator) -> None:
    """Random bfloat16-representable weights: ~1/sqrt(fan_in) for matrices, 1 + noise for norm weights (so the
    norm weight is not a no-op), small biases."""
    for name, p in model.named_parameters():
        if p.ndim == 2:
            v = rng.standard_normal(p.shape) / np.sqrt(p.shape[1])
        elif "norm" in name:
            v = 1.0 + 0.2 * rng.standard_normal(p.shape)
        else:
            v = 0.1 * rng.standard_normal(p.shape)
        p.copy_(t32(v).to(torch.bfloat16).to(torch.float32))


def rope_cos_sin(pos_embed: QwenEmbedRope, h: int, w: int, text_len: int):
    img, txt = pos_embed([(1, h, w)], max_txt_seq_len=text_len, device=torch.device("cpu"))
    return img.real, img.imag, txt.real, txt.imag


def make_config(tag: str, spec: dict) -> None:
    rng = np.random.default_rng(spec["seed"])
    model = QwenImageTransformer2DModel(**spec["model"]).eval()
    randomize(model, rng)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
        OUT / f"transformer_{tag}_weights.safetensors",
        metadata=info(config=spec["model"]),
    )

    cfg = model.config
    D = cfg.num_attention_heads * cfg.attention_head_dim
    h, w = spec["grid"]
    N, L, B = h * w, spec["text_len"], len(spec["sigma"])
    g = {}

    # inputs of the full model: packed latents, text embeddings (zero past each prompt's length), sigma, mask
    latents = t32(rng.standard_normal((B, N, cfg.in_channels)))
    text = t32(rng.standard_normal((B, L, cfg.joint_attention_dim)))
    mask = None
    if spec["text_lens"] is not None:
        mask = torch.zeros(B, L, dtype=torch.long)  # the pipeline's prompt_embeds_mask is int64
        for b, n in enumerate(spec["text_lens"]):
            mask[b, :n] = 1
            text[b, n:] = 0
        g["text_mask"] = mask.to(torch.int32)
    sigma = t32(spec["sigma"])
    g.update(latents=latents, text=text, sigma=sigma)

    # RMSNorm: the model's own txt_norm on the raw text, and a per-head norm of the attention
    g["rmsnorm_x"] = text
    g["rmsnorm_y"] = model.txt_norm(text)
    qk = t32(3 * rng.standard_normal((B, N, cfg.num_attention_heads, cfg.attention_head_dim)))
    g["rmsnorm_head_x"] = qk
    g["rmsnorm_head_y"] = model.transformer_blocks[0].attn.norm_q(qk)
    g["rmsnorm_head_weight"] = model.transformer_blocks[0].attn.norm_q.weight
    # a standalone bfloat16 RMSNorm (weight and input bfloat16): diffusers rounds to bf16 before the weight
    norm = RMSNorm(cfg.joint_attention_dim, eps=1e-6).to(torch.bfloat16)
    norm.weight.copy_(model.txt_norm.weight)
    g["rmsnorm_bf16_y"] = norm(text.to(torch.bfloat16))

    # RoPE for this grid and text length
    rope = model.pos_embed([(1, h, w)], max_txt_seq_len=L, device=torch.device("cpu"))
    img_cos, img_sin, txt_cos, txt_sin = rope_cos_sin(model.pos_embed, h, w, L)
    g.update(rope_img_cos=img_cos, rope_img_sin=img_sin, rope_txt_cos=txt_cos, rope_txt_sin=txt_sin)

    # timestep embedding: the model's sigma, and a sweep of sigmas over the schedule's range
    g["temb"] = model.time_text_embed(sigma, latents)
    sweep = t32([1.0, 0.98765, 0.7, 0.5, 0.3141, 0.1, 0.02, 0.0])
    g["temb_sweep_sigma"] = sweep
    g["temb_sweep"] = model.time_text_embed(sweep, latents)

    # one attention call (the attn of block 0) on random modulated streams, with the mask if this config has one
    block = model.transformer_blocks[0]
    attn_img = t32(rng.standard_normal((B, N, D)))
    attn_txt = t32(rng.standard_normal((B, L, D)))
    g.update(attn_img=attn_img, attn_txt=attn_txt)
    g["attn_out_img"], g["attn_out_txt"] = block.attn(
        hidden_states=attn_img,
        encoder_hidden_states=attn_txt,
        encoder_hidden_states_mask=None,
        image_rotary_emb=rope,
    )
    if mask is not None:
        g["attn_masked_out_img"], g["attn_masked_out_txt"] = block.attn(
            hidden_states=attn_img,
            encoder_hidden_states=attn_txt,
            encoder_hidden_states_mask=mask.bool(),
            image_rotary_emb=rope,
        )

    # one block on random residual streams (large, as real residuals are), with the real temb
    block_img = t32(4 * rng.standard_normal((B, N, D)))
    block_txt = t32(4 * rng.standard_normal((B, L, D)))
    g.update(block_img=block_img, block_txt=block_txt)
    g["block_out_txt"], g["block_out_img"] = block(
        hidden_states=block_img,
        encoder_hidden_states=block_txt,
        encoder_hidden_states_mask=None if mask is None else mask.bool(),
        temb=g["temb"],
        image_rotary_emb=rope,
    )

    # the whole transformer
    def run(m, dtype):
        return m(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=text.to(dtype),
            encoder_hidden_states_mask=mask,
            timestep=sigma.to(dtype),
            img_shapes=[[(1, h, w)]] * B,
            return_dict=False,
        )[0]

    g["out"] = run(model, torch.float32)
    if tag == "a":  # the same weights (bfloat16 values: exact) and inputs run in bfloat16
        g["out_bf16"] = run(model.to(torch.bfloat16), torch.bfloat16)

    save_file(
        {k: to_save(v) for k, v in g.items()},
        OUT / f"transformer_{tag}.safetensors",
        metadata=info(grid=[h, w], config=spec["model"]),
    )


def make_rope_tables() -> None:
    """Real axes, realistic grids: 64x64 (1024 px), 83x83 (1328 px, odd side), 58x104 (1664x928 px), with 12
    text tokens; and 64x64 with the pipeline's longest text, 1024 tokens (text positions up to 1055)."""
    pos_embed = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    rng = np.random.default_rng(3)
    g = {}
    cases = {"sq64": (64, 64, 12), "sq83": (83, 83, 12), "wide": (58, 104, 12), "long": (64, 64, 1024)}
    for name, (h, w, L) in cases.items():
        img_cos, img_sin, txt_cos, txt_sin = rope_cos_sin(pos_embed, h, w, L)
        N = h * w
        # the corners and edges of the grid, its centre, and random rows; for long text the ends and random rows
        rows = {0, w - 1, N - w, N - 1, (h // 2) * w + w // 2, (h // 2 - 1) * w + w // 2 - 1}
        rows = torch.tensor(sorted(rows | set(rng.choice(N, 90 if L <= 12 else 20, replace=False).tolist())))
        text_rows = torch.arange(L) if L <= 12 else torch.tensor(sorted({0, L - 1} | set(rng.choice(L, 60).tolist())))
        g[f"{name}_rows"], g[f"{name}_text_rows"] = rows.to(torch.int32), text_rows.to(torch.int32)
        g[f"{name}_img_cos"], g[f"{name}_img_sin"] = img_cos[rows], img_sin[rows]
        g[f"{name}_txt_cos"], g[f"{name}_txt_sin"] = txt_cos[text_rows], txt_sin[text_rows]
    save_file(
        {k: v.contiguous() if v.dtype == torch.int32 else to_save(v) for k, v in g.items()},
        OUT / "rope_tables.safetensors",
        metadata=info(cases=cases, axes_dims_rope=[16, 56, 56]),
    )


def pipeline_schedule(steps: int, height: int, width: int):
    """What `QwenImagePipeline.__call__` does before its loop: sigmas, mu from the image sequence length,
    retrieve_timesteps."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    seq = (height // 16) * (width // 16)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    c = scheduler.config
    mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    timesteps, _ = retrieve_timesteps(scheduler, steps, torch.device("cpu"), sigmas=sigmas, mu=mu)
    return scheduler, timesteps, seq, mu


def make_scheduler() -> None:
    rng = np.random.default_rng(4)
    g, cases = {}, {}
    for name, (height, width, steps) in {
        "1024_20": (1024, 1024, 20),
        "1024_50": (1024, 1024, 50),
        "1328_50": (1328, 1328, 50),
        "1664x928_50": (928, 1664, 50),
        "512_4": (512, 512, 4),
        "1024_1": (1024, 1024, 1),
    }.items():
        scheduler, timesteps, seq, mu = pipeline_schedule(steps, height, width)
        g[f"sigmas_{name}"], g[f"timesteps_{name}"] = scheduler.sigmas, timesteps
        cases[name] = dict(height=height, width=width, steps=steps, image_seq_len=seq, mu=mu)

    # one Euler step (index 3 of the 1024x1024, 20-step schedule), float32 and bfloat16
    scheduler, timesteps, _, _ = pipeline_schedule(20, 1024, 1024)
    v, x = t32(rng.standard_normal((1, 16, 64))), t32(rng.standard_normal((1, 16, 64)))
    g.update(step_v=v, step_x=x)
    for suffix, dtype in (("", torch.float32), ("_bf16", torch.bfloat16)):
        scheduler.set_begin_index(3)
        scheduler._step_index = None
        g[f"step_out{suffix}"] = scheduler.step(v.to(dtype), timesteps[3], x.to(dtype), return_dict=False)[0]
    cases["step"] = dict(schedule="1024_20", index=3)

    # pack / unpack: (B, C, H, W) latents of a 6x10 latent image -> (B, 15, 64) tokens and back
    z = t32(rng.standard_normal((2, 16, 6, 10)))
    packed = QwenImagePipeline._pack_latents(z, 2, 16, 6, 10)
    g.update(pack_z=z, pack_tokens=packed)
    g["unpack_z"] = QwenImagePipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8)[:, :, 0]

    # the CFG combine with norm rescale, exactly as in the pipeline's loop
    cond, uncond = t32(rng.standard_normal((2, 15, 64))), t32(rng.standard_normal((2, 15, 64)))
    true_cfg_scale = 4.0
    comb_pred = uncond + true_cfg_scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
    g.update(cfg_cond=cond, cfg_uncond=uncond, cfg_out=comb_pred * (cond_norm / noise_norm))
    cases["cfg_scale"] = true_cfg_scale

    save_file(
        {k: to_save(v) for k, v in g.items()},
        OUT / "scheduler.safetensors",
        metadata=info(cases=cases, scheduler_config=SCHEDULER_CONFIG),
    )


if __name__ == "__main__":
    for tag, spec in CONFIGS.items():
        make_config(tag, spec)
    make_rope_tables()
    make_scheduler()
    for f in sorted(OUT.glob("*.safetensors")):
        print(f"{f.name:40s} {f.stat().st_size / 1e3:8.1f} kB")
