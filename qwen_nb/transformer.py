"""The Qwen-Image MMDiT: diffusers' `QwenImageTransformer2DModel` and `QwenImageTransformerBlock`.

Parameter names are diffusers' names verbatim (`transformer_blocks.3.img_mod.1.weight`, `...attn.to_q.bias`,
`...img_mlp.net.0.proj.weight`), so a diffusers state dict loads strictly with `model.load_weights`.
`model(latents (B, N, 64), text (B, L, 3584), sigma (B,), grid=(h, w)) -> velocity (B, N, 64)`.
"""

import math
from dataclasses import dataclass, fields
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .attention import FUSED_PROJECTIONS, JointAttention, joint_key_mask, split_rows
from .rmsnorm import RMSNorm
from .rope import build_rope_table, rope_table
from .switches import Switches
from .timestep_embedder import QwenTimestepProjEmbeddings


@dataclass
class TransformerConfig:
    """`transformer/config.json` of Qwen/Qwen-Image; the defaults are the real 20B checkpoint."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple = (16, 56, 56)
    eps: float = 1e-6

    def __post_init__(self):
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {list(self.axes_dims_rope)} sums to {sum(self.axes_dims_rope)}, but it must sum to "
                f"attention_head_dim = {self.attention_head_dim}: each RoPE axis rotates its own slice of a head."
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"every entry of axes_dims_rope {list(self.axes_dims_rope)} must be even (channel pairs)")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        """From a `config.json` dict; keys this model does not use (`_class_name`, `guidance_embeds`...) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def tiny(cls, **overrides) -> "TransformerConfig":
        """A 2-layer, 2-head, 64-wide model with the real structure, for tests and the CPU notebooks."""
        base = dict(
            num_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=48,
            axes_dims_rope=(8, 12, 12),
        )
        return cls(**{**base, **overrides})


def layer_norm(x: mx.array, eps: float) -> mx.array:
    """LayerNorm without affine parameters written out, statistics in float32."""
    xf = x.astype(mx.float32)
    mu = mx.mean(xf, axis=-1, keepdims=True)
    xc = xf - mu
    var = mx.mean(xc * xc, axis=-1, keepdims=True)
    return (xc * mx.rsqrt(var + eps)).astype(x.dtype)


def gelu_tanh(x: mx.array) -> mx.array:
    """The tanh approximation of GELU written out as separate ops, in x's dtype."""
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@partial(mx.compile, shapeless=True)
def gelu_tanh_fused(x: mx.array) -> mx.array:
    """The tanh GELU as one compiled kernel, computed in float32 as torch does for half inputs."""
    # 0.5 x (1 + tanh u) = x sigmoid(2u), and x*x*x for x**3: the same function (within 5e-7 in float32), but
    # the CPU's sigmoid and multiplies are cheaper than its tanh and pow: 1.5x faster than nn.gelu_approx there.
    xf = x.astype(mx.float32)
    u = math.sqrt(2 / math.pi) * (xf + 0.044715 * (xf * xf * xf))
    return (xf * mx.sigmoid(2 * u)).astype(x.dtype)


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return x * (1 + scale[:, None]) + shift[:, None]


def gate_residual(h: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    return h + gate[:, None] * y


modulate_fused = mx.compile(modulate)
gate_residual_fused = mx.compile(gate_residual)


class Identity(nn.Module):
    def __call__(self, x):
        return x


class GELUProj(nn.Module):
    def __init__(self, dim: int, hidden: int, switches: Switches):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        self.switches = switches

    def __call__(self, x):
        x = self.proj(x)
        return gelu_tanh_fused(x) if self.switches.fast_gelu else gelu_tanh(x)


class FeedForward(nn.Module):
    """diffusers' `FeedForward(activation_fn="gelu-approximate")`: net.0.proj -> GELU -> (dropout) -> net.2."""

    def __init__(self, dim: int, switches: Switches, mult: int = 4):
        super().__init__()
        self.net = [GELUProj(dim, mult * dim, switches), Identity(), nn.Linear(mult * dim, dim)]

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """One dual-stream MMDiT block; returns (img, txt) of the input shapes."""

    def __init__(self, config: TransformerConfig, switches: Switches):
        super().__init__()
        D = config.dim
        self.eps = config.eps
        self.switches = switches
        self.img_mod = [nn.SiLU(), nn.Linear(D, 6 * D)]
        self.txt_mod = [nn.SiLU(), nn.Linear(D, 6 * D)]
        self.attn = JointAttention(D, config.num_attention_heads, config.attention_head_dim, config.eps, switches)
        self.img_mlp = FeedForward(D, switches)
        self.txt_mlp = FeedForward(D, switches)

    def modulation(self, temb: mx.array) -> tuple[mx.array, mx.array]:
        """(img, txt) modulation parameters (B, 6D) from the timestep embedding: they depend on sigma only."""
        return self.img_mod[1](nn.silu(temb)), self.txt_mod[1](nn.silu(temb))

    def _norm_modulate(self, x, shift, scale):
        sw = self.switches
        if sw.fused_modulation and sw.fast_layer_norm and shift.shape[0] == 1:
            # LayerNorm, scale and shift in one kernel: the modulation is the norm's affine weight and bias
            return mx.fast.layer_norm(x, 1 + scale[0], shift[0], self.eps)
        x = mx.fast.layer_norm(x, None, None, self.eps) if sw.fast_layer_norm else layer_norm(x, self.eps)
        return (modulate_fused if sw.fused_modulation else modulate)(x, shift, scale)

    def _residual(self, h, gate, y):
        return (gate_residual_fused if self.switches.fused_modulation else gate_residual)(h, gate, y)

    def __call__(self, img, txt, mod, rope, mask=None):
        """img (B, N, D), txt (B, L, D); mod = (img_mod, txt_mod) from `modulation`; rope = (cos, sin)."""
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = mx.split(mod[0], 6, axis=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = mx.split(mod[1], 6, axis=-1)

        img_attn, txt_attn = self.attn(
            self._norm_modulate(img, img_shift1, img_scale1),
            self._norm_modulate(txt, txt_shift1, txt_scale1),
            rope,
            mask,
        )
        img = self._residual(img, img_gate1, img_attn)
        txt = self._residual(txt, txt_gate1, txt_attn)

        img = self._residual(img, img_gate2, self.img_mlp(self._norm_modulate(img, img_shift2, img_scale2)))
        txt = self._residual(txt, txt_gate2, self.txt_mlp(self._norm_modulate(txt, txt_shift2, txt_scale2)))
        return img, txt


class AdaLayerNormContinuous(nn.Module):
    """diffusers' output norm: LayerNorm(x) * (1 + scale) + shift, with scale FIRST in the projected embedding."""

    def __init__(self, dim: int, eps: float, switches: Switches):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.eps = eps
        self.switches = switches

    def modulation(self, temb: mx.array) -> mx.array:
        return self.linear(nn.silu(temb))

    def __call__(self, x: mx.array, mod: mx.array) -> mx.array:
        scale, shift = mx.split(mod, 2, axis=-1)
        if self.switches.fused_modulation and self.switches.fast_layer_norm and mod.shape[0] == 1:
            return mx.fast.layer_norm(x, 1 + scale[0], shift[0], self.eps)
        sw = self.switches
        x = mx.fast.layer_norm(x, None, None, self.eps) if sw.fast_layer_norm else layer_norm(x, self.eps)
        return (modulate_fused if sw.fused_modulation else modulate)(x, shift, scale)


def _call_block(block, img, txt, mod, rope, mask):
    return block(img, txt, mod, rope, mask)


def step_modulations(mods, i: int):
    """Step i's modulations (batch 1) out of `modulations(sigmas)` computed for a whole schedule."""
    blocks, out = mods
    return [(a[i : i + 1], t[i : i + 1]) for a, t in blocks], out[i : i + 1]


class QwenImageTransformer(nn.Module):
    def __init__(self, config: TransformerConfig | None = None, switches: Switches | None = None):
        super().__init__()
        self.config = config = config or TransformerConfig()
        self.switches = switches = switches or Switches()
        D = config.dim
        self.img_in = nn.Linear(config.in_channels, D)
        self.txt_norm = RMSNorm(config.joint_attention_dim, config.eps, switches)
        self.txt_in = nn.Linear(config.joint_attention_dim, D)
        self.time_text_embed = QwenTimestepProjEmbeddings(D, switches=switches)
        self.transformer_blocks = [TransformerBlock(config, switches) for _ in range(config.num_layers)]
        self.norm_out = AdaLayerNormContinuous(D, config.eps, switches)
        self.proj_out = nn.Linear(D, config.patch_size**2 * config.out_channels)

    def set_switches(self, switches: Switches) -> None:
        """Apply a set of switches to this model and every module in it (fusing or splitting q/k/v to match)."""
        for _, m in self.named_modules():
            if hasattr(m, "switches"):
                m.switches = switches
        if switches.fused_qkv:
            self.fuse_projections()
        else:
            self.split_projections()

    def _compiled_block(self, masked: bool):
        """block(img, txt, mod, rope, mask) as one compiled function of (the block's weights, inputs).

        Traced once with block 0 as a template whose weights are swapped for the traced inputs (and put back),
        then replayed for every block with that block's weights: one trace serves all 60. MLX traces again by
        itself when shapes change (a new image size or text length); a change of switches or of structure
        (fused q/k/v, quantized) makes a new function."""
        template = self.transformer_blocks[0]
        structure = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in tree_flatten(template.parameters())))
        key = (masked, self.switches, hash(structure))
        cache = self.__dict__.setdefault("_compiled_blocks", {})  # a plain attribute, not a parameter
        if key not in cache:

            def run(params, img, txt, mod, rope, *mask):
                saved = template.parameters()
                template.update(params)
                out = template(img, txt, mod, rope, mask[0] if mask else None)
                template.update(saved)
                return out

            compiled = mx.compile(run)
            cache.clear()
            cache[key] = lambda block, img, txt, mod, rope, mask: compiled(
                block.parameters(), img, txt, mod, rope, *(() if mask is None else (mask,))
            )
        return cache[key]

    # ---------------------------------------------------------------- structure changes after loading
    def fuse_projections(self) -> None:
        """q, k, v of each stream as one linear in every block (see `JointAttention.fuse_projections`). Call after
        loading: the checkpoint's names are the separate ones, and `diffusers_weights` gives them back."""
        for block in self.transformer_blocks:
            block.attn.fuse_projections()

    def split_projections(self) -> None:
        for block in self.transformer_blocks:
            block.attn.split_projections()

    @property
    def modulation_released(self) -> bool:
        return "time_text_embed" not in self

    def release_modulation(self, blocks=None) -> None:
        """Drop the timestep embedder and the modulation linears (img_mod, txt_mod, norm_out.linear: 6.8B of the
        real model's 20.4B parameters). Afterwards the model runs only with `mods=` precomputed (see
        `modulations`); `restore_modulation` puts weights back. `blocks` limits it to some block indices."""
        for i in range(len(self.transformer_blocks)) if blocks is None else blocks:
            b = self.transformer_blocks[i]
            b.img_mod, b.txt_mod = [], []
        if blocks is None:
            delattr(self.norm_out, "linear")
            delattr(self, "time_text_embed")

    def modulation_names(self) -> list[str]:
        """The checkpoint names of the weights `release_modulation` drops."""
        names = [
            f"transformer_blocks.{i}.{m}.1.{p}"
            for i in range(self.config.num_layers)
            for m in ("img_mod", "txt_mod")
            for p in ("weight", "bias")
        ]
        embedder = QwenTimestepProjEmbeddings(self.config.dim, switches=self.switches)
        names += [f"time_text_embed.{k}" for k, _ in tree_flatten(embedder.parameters())]
        return names + ["norm_out.linear.weight", "norm_out.linear.bias"]

    def restore_modulation(self, weights: dict) -> None:
        """Put the modulation weights back (checkpoint names, e.g. from `read_weights(..., keep=...)`); strict."""
        D = self.config.dim
        for b in self.transformer_blocks:
            b.img_mod = [nn.SiLU(), nn.Linear(D, 6 * D)]
            b.txt_mod = [nn.SiLU(), nn.Linear(D, 6 * D)]
        self.norm_out.linear = nn.Linear(D, 2 * D)
        self.time_text_embed = QwenTimestepProjEmbeddings(D, switches=self.switches)
        names = set(self.modulation_names())
        if set(weights) != names:
            missing, extra = sorted(names - set(weights)), sorted(set(weights) - names)
            raise ValueError(f"restore_modulation: missing {missing[:4]}, unexpected {extra[:4]}")
        dtype = self.img_in.weight.dtype
        self.load_weights([(k, v.astype(dtype)) for k, v in weights.items()], strict=False)

    def diffusers_weights(self) -> dict:
        """The parameters under the checkpoint's (diffusers') names: fused q/k/v split back into three."""
        out = {}
        for k, v in tree_flatten(self.parameters()):
            for fused, names in FUSED_PROJECTIONS.items():
                if f".{fused}." in k:
                    for name, rows in zip(names, split_rows(v, len(names))):
                        out[k.replace(f".{fused}.", f".{name}.")] = rows
                    break
            else:
                out[k] = v
        return out

    def modulations(self, sigma: mx.array, dtype: mx.Dtype | None = None):
        """All modulation parameters for one sigma (B,): ([(img_mod, txt_mod)] per block, out_mod).

        They depend on sigma alone, so they can be computed once for a whole schedule and reused: with S sigmas
        the arrays hold one row per sigma and `step_modulations(mods, i)` picks step i."""
        if self.modulation_released:
            raise ValueError(
                "this transformer's modulation weights were released (release_modulation): pass mods= computed "
                "before, or put them back with restore_modulation"
            )
        dtype = dtype or self.img_in.weight.dtype
        temb = self.time_text_embed(sigma.astype(dtype), dtype)
        return [b.modulation(temb) for b in self.transformer_blocks], self.norm_out.modulation(temb)

    def rope(self, h: int, w: int, text_len: int):
        """The joint (cos, sin) RoPE table for a (h, w) patch grid and text_len tokens."""
        make = rope_table if self.switches.rope_cache else build_rope_table
        return make(h, w, text_len, self.config.axes_dims_rope)

    def __call__(
        self,
        latents: mx.array,
        text: mx.array,
        sigma: mx.array | None,
        grid: tuple[int, int],
        text_mask: mx.array | None = None,
        *,
        mods=None,
        block_hook=None,
    ) -> mx.array:
        """latents (B, N, in_channels), text (B, L, joint_attention_dim), sigma (B,) or (1,) -> (B, N, 64).

        `text_mask` (B, L), 1 for real tokens, hides padded text keys. `mods` takes precomputed
        `modulations(sigma)` instead of sigma; `block_hook(i, img, txt)` is called after each block
        (for the eval-placement experiment) and may return replacements."""
        B, N, C = latents.shape
        h, w = grid
        if h * w != N:
            raise ValueError(f"grid {h}x{w} has h*w = {h * w} patches, but latents have N = {N} tokens")
        if C != self.config.in_channels:
            raise ValueError(f"latents have {C} channels; this transformer expects {self.config.in_channels}")
        if text.shape[-1] != self.config.joint_attention_dim:
            raise ValueError(f"text embeddings have width {text.shape[-1]}; expected {self.config.joint_attention_dim}")
        L = text.shape[1]
        img = self.img_in(latents)
        txt = self.txt_in(self.txt_norm(text))
        if mods is None:
            mods = self.modulations(sigma, img.dtype)
        block_mods, out_mod = mods
        mask = None if text_mask is None else joint_key_mask(text_mask, N)

        cached = self.switches.rope_cache
        rope = self.rope(h, w, L) if cached else None
        run = self._compiled_block(mask is not None) if self.switches.compiled_blocks else _call_block
        for i, block in enumerate(self.transformer_blocks):
            if not cached:  # the seed's baseline: the table rebuilt inside every block
                rope = build_rope_table(h, w, L, self.config.axes_dims_rope)
            img, txt = run(block, img, txt, block_mods[i], rope, mask)
            if block_hook is not None:
                img, txt = block_hook(i, img, txt) or (img, txt)
        return self.proj_out(self.norm_out(img, out_mod))
