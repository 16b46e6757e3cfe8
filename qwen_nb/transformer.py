"""The Qwen-Image MMDiT: diffusers' `QwenImageTransformer2DModel` and `QwenImageTransformerBlock`.

Parameter names are diffusers' names verbatim (`transformer_blocks.3.img_mod.1.weight`, `...attn.to_q.bias`,
`...img_mlp.net.0.proj.weight`), so a diffusers state dict loads strictly with `model.load_weights`.
`model(latents (B, N, 64), text (B, L, 3584), sigma (B,), grid=(h, w)) -> velocity (B, N, 64)`. For
Qwen-Image-Edit, `grid` is a list of grids: the image's, then each condition picture's, whose tokens follow the
image's in `latents` (the RoPE's frames 1, 2, ...); with `zero_cond_t` (Edit-2511) those tokens are modulated at
sigma 0.
"""

import math
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .attention import FUSED_PROJECTIONS, JointAttention, joint_key_mask, split_rows
from .loading import Config, load_strict, read_config, read_weights
from .quantize import GROUP_SIZE, MODULATION_BITS, is_timestep_weight, quantize_transformer
from .rmsnorm import RMSNorm
from .rope import axis_frequencies, build_rope_table, image_positions, rope_table
from .switches import Switches
from .timestep_embedder import QwenTimestepProjEmbeddings


@dataclass
class TransformerConfig(Config):
    """`transformer/config.json` of Qwen/Qwen-Image; the defaults are the real 20B checkpoint."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16  # None: in_channels, as diffusers
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple = (16, 56, 56)
    # Qwen-Image-Edit-2511: condition-picture tokens modulated at sigma 0. A text-to-image generation has no
    # condition tokens, and with none diffusers' result is the same as without the flag (tested).
    zero_cond_t: bool = False
    eps: float = 1e-6
    # diffusers' flags that qwen_nb does not build (see REFUSED): accepted as keywords so that diffusers' full set of
    # keywords can be given, and refused when true
    guidance_embeds: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    # Flags of diffusers 0.42.1's config that change the computation and that qwen_nb does not build, with why.
    REFUSED = {
        "guidance_embeds": "a guidance-distilled variant: diffusers 0.42.1 itself cannot run it (its timestep "
        "embedding takes no guidance input)",
        "use_additional_t_cond": "Qwen-Image-Layered's extra timestep embedding: it needs an `additional_t_cond` "
        "input that the text-to-image pipeline never gives (diffusers raises too)",
        "use_layer3d_rope": "Qwen-Image-Layered's layer RoPE: positions for a stack of layers, another pipeline",
        "causal_condition": "Qwen-Image 2.1's single-stream transformer: load the checkpoint with "
        "qwen_nb.QwenImage21Pipeline",
    }

    def __post_init__(self):
        self.refuse(vars(self))
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {list(self.axes_dims_rope)} sums to {sum(self.axes_dims_rope)}, but it must sum to "
                f"attention_head_dim = {self.attention_head_dim}: each RoPE axis rotates its own slice of a head."
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"every entry of axes_dims_rope {list(self.axes_dims_rope)} must be even (channel pairs)")
        # in_channels need not be a multiple of patch_size**2: diffusers' transformer takes any width (patch_size
        # only sizes proj_out); the pipeline checks the transformer against the VAE (Sizes.read)

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latents (the VAE's z_dim): in_channels / patch_size**2."""
        if self.in_channels % self.patch_size**2:
            raise ValueError(
                f"in_channels {self.in_channels} is not patch_size**2 = {self.patch_size**2} times a number of latent "
                "channels: this transformer does not take patch_size x patch_size patches of latent pixels"
            )
        return self.in_channels // self.patch_size**2

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        """From a `config.json` dict. Keys that do not change the computation (`_class_name`,
        `pooled_projection_dim`...) are ignored; flags that do and that qwen_nb does not build are refused."""
        cls.refuse(d)
        return super().from_dict(d)

    @classmethod
    def refuse(cls, d: dict) -> None:
        """Raise a ValueError naming each flag of `d` that qwen_nb does not build and that is set."""
        refused = [k for k in cls.REFUSED if d.get(k)]
        if refused:
            raise ValueError(
                "this transformer's config sets "
                + "; ".join(f"{k}=true ({cls.REFUSED[k]})" for k in refused)
                + ". qwen_nb runs Qwen-Image's text-to-image transformer, where these are false: a model built "
                "without them would make wrong pictures."
            )

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
        self.net = [GELUProj(dim, mult * dim, switches), nn.Identity(), nn.Linear(mult * dim, dim)]

    def __call__(self, x):
        return self.net[2](self.net[0](x))


def norm_modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float, switches: Switches) -> mx.array:
    """LayerNorm(x) * (1 + scale) + shift, x (B, S, D), shift and scale (B, D): the adaLN of every block and of the
    output norm."""
    if switches.fused_modulation and switches.fast_layer_norm and shift.shape[0] == 1:
        # one kernel: the modulation is the norm's affine weight and bias
        return mx.fast.layer_norm(x, 1 + scale[0], shift[0], eps)
    x = mx.fast.layer_norm(x, None, None, eps) if switches.fast_layer_norm else layer_norm(x, eps)
    return (modulate_fused if switches.fused_modulation else modulate)(x, shift, scale)


class BlockModulation(nn.Module):
    """A block's two modulation projections, `img_mod` and `txt_mod` (SiLU then a linear to 6 * dim each)."""

    def __init__(self, dim: int):
        super().__init__()
        self.img_mod = [nn.SiLU(), nn.Linear(dim, 6 * dim)]
        self.txt_mod = [nn.SiLU(), nn.Linear(dim, 6 * dim)]

    def modulation(self, temb: mx.array) -> tuple[mx.array, mx.array]:
        """(img, txt) modulation parameters (B, 6D) from the timestep embedding: they depend on sigma only."""
        return self.img_mod[1](nn.silu(temb)), self.txt_mod[1](nn.silu(temb))


class TransformerBlock(BlockModulation):
    """One dual-stream MMDiT block; returns (img, txt) of the input shapes. Built with `modulation=False` it has
    no img_mod/txt_mod and runs only on modulation given from outside (a `ModulationTable`)."""

    def __init__(self, config: TransformerConfig, switches: Switches, modulation: bool = True):
        D = config.dim
        if modulation:
            super().__init__(D)
        else:
            nn.Module.__init__(self)
        self.eps = config.eps
        self.switches = switches
        self.attn = JointAttention(D, config.num_attention_heads, config.attention_head_dim, config.eps, switches)
        self.img_mlp = FeedForward(D, switches)
        self.txt_mlp = FeedForward(D, switches)

    def _residual(self, h, gate, y):
        return (gate_residual_fused if self.switches.fused_modulation else gate_residual)(h, gate, y)

    def __call__(self, img, txt, mod, rope, mask=None, split=None):
        """img (B, N, D), txt (B, L, D); mod = (img_mod, txt_mod), each (B or 1, 6D); rope = (cos, sin).

        With `split`, mod = (img_mod, txt_mod, cond_mod): the image tokens from `split` on (Qwen-Image-Edit's
        condition pictures, under zero_cond_t) take cond_mod, the image modulation at sigma 0."""
        img_mod = mx.split(mod[0], 6, axis=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = mx.split(mod[1], 6, axis=-1)
        cond_mod = None if split is None else mx.split(mod[2], 6, axis=-1)
        sw, eps = self.switches, self.eps

        def img_modulate(x, k):  # k = 0: (shift1, scale1), 3: (shift2, scale2)
            def f(x, p):
                return norm_modulate(x, p[k], p[k + 1], eps, sw)

            return _by_part(f, (x,), img_mod, cond_mod, split)

        def img_residual(h, k, y):  # k = 2: gate1, 5: gate2
            return _by_part(lambda h, y, p: self._residual(h, p[k], y), (h, y), img_mod, cond_mod, split)

        img_attn, txt_attn = self.attn(
            img_modulate(img, 0), norm_modulate(txt, txt_shift1, txt_scale1, eps, sw), rope, mask
        )
        img = img_residual(img, 2, img_attn)
        txt = self._residual(txt, txt_gate1, txt_attn)

        img = img_residual(img, 5, self.img_mlp(img_modulate(img, 3)))
        txt = self._residual(txt, txt_gate2, self.txt_mlp(norm_modulate(txt, txt_shift2, txt_scale2, eps, sw)))
        if img.dtype == mx.float16:  # diffusers clips float16 streams to the finite range after every block
            img, txt = mx.clip(img, -65504, 65504), mx.clip(txt, -65504, 65504)
        return img, txt


def _by_part(f, xs: tuple, mod, cond_mod, split):
    """f(*xs, mod) over all tokens, or with `split` f(*xs[:, :split], mod) and f(*xs[:, split:], cond_mod) joined
    along the sequence (every op it wraps works token by token, so this is exact)."""
    if split is None:
        return f(*xs, mod)
    head = f(*(x[:, :split] for x in xs), mod)
    tail = f(*(x[:, split:] for x in xs), cond_mod)
    return mx.concatenate([head, tail], axis=1)


class OutputModulation(nn.Module):
    """The output norm's projection `linear` (SiLU then dim -> 2 dim); scale comes FIRST in its output."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def modulation(self, temb: mx.array) -> mx.array:
        return self.linear(nn.silu(temb))


class AdaLayerNormContinuous(OutputModulation):
    """diffusers' output norm: LayerNorm(x) * (1 + scale) + shift. Built with `modulation=False` it has no
    `linear` and takes its modulation from outside."""

    def __init__(self, dim: int, eps: float, switches: Switches, modulation: bool = True):
        if modulation:
            super().__init__(dim)
        else:
            nn.Module.__init__(self)
        self.eps = eps
        self.switches = switches

    def __call__(self, x: mx.array, mod: mx.array) -> mx.array:
        scale, shift = mx.split(mod, 2, axis=-1)
        return norm_modulate(x, shift, scale, self.eps, self.switches)


@dataclass
class ModulationTable:
    """Every block's (img_mod, txt_mod) and the output norm's modulation, one row per sigma: for one forward
    (a row per batch element, or one row for the whole batch), or for a whole schedule (a row per step). A
    zero_cond_t transformer's table also holds each block's image modulation at sigma 0 (`cond`, one row), which
    Qwen-Image-Edit-2511's condition-picture tokens take at every step."""

    blocks: list  # [(img (S, 6D), txt (S, 6D))] per block
    out: mx.array  # (S, 2D)
    cond: list | None = None  # [img (1, 6D) at sigma 0] per block, or None

    def step(self, i: int) -> "ModulationTable":
        """Row i alone: step i of a schedule's table."""
        blocks = [(a[i : i + 1], t[i : i + 1]) for a, t in self.blocks]
        return ModulationTable(blocks, self.out[i : i + 1], self.cond)

    def arrays(self) -> list[mx.array]:
        return [a for pair in self.blocks for a in pair] + [self.out] + (self.cond or [])


def _with_zero(sigmas: mx.array, zero_cond: bool) -> mx.array:
    return mx.concatenate([sigmas, mx.zeros((1,), sigmas.dtype)]) if zero_cond else sigmas


def _table(blocks: list, out: mx.array, zero_cond: bool) -> ModulationTable:
    """The table of modulations computed for sigmas (+ [0] when zero_cond: its row goes to `cond`)."""
    if not zero_cond:
        return ModulationTable(blocks, out)
    return ModulationTable([(a[:-1], t[:-1]) for a, t in blocks], out[:-1], [a[-1:] for a, _ in blocks])


def modulation_table(source, sigmas: mx.array, dtype: mx.Dtype) -> ModulationTable:
    """The modulation of every block for sigmas (S,), lazily: `source` is a transformer built with its modulation or
    a `TransformerModulation` (both have `config`, `time_text_embed`, `transformer_blocks[i].modulation`,
    `norm_out`). With the config's zero_cond_t, sigma 0's image modulation is computed alongside (`cond`)."""
    zero_cond = source.config.zero_cond_t
    temb = source.time_text_embed(_with_zero(sigmas, zero_cond).astype(dtype), dtype)
    blocks = [b.modulation(temb) for b in source.transformer_blocks]
    return _table(blocks, source.norm_out.modulation(temb), zero_cond)


class TransformerModulation(nn.Module):
    """The part of the transformer that depends on sigma alone, under diffusers' names: the timestep embedder, each
    block's img_mod/txt_mod and norm_out.linear (6.8B of the real model's 20.4B parameters). A schedule's whole
    modulation table comes from it before the loop (`modulation_table(module, sigmas, dtype)`), and the
    transformer that denoises can then be built without these weights."""

    def __init__(self, config: TransformerConfig, switches: Switches | None = None):
        super().__init__()
        self.config = config
        self.time_text_embed = QwenTimestepProjEmbeddings(config.dim, switches=switches or Switches())
        self.transformer_blocks = [BlockModulation(config.dim) for _ in range(config.num_layers)]
        self.norm_out = OutputModulation(config.dim)


def _call_block(block, img, txt, mod, rope, mask, split=None):
    return block(img, txt, mod, rope, mask, split)


def _is_shape(g) -> bool:
    return isinstance(g, (tuple, list)) and len(g) in (2, 3) and all(isinstance(v, (int, np.integer)) for v in g)


def frame_shapes(grid) -> list[tuple[int, int, int]]:
    """The grid as a list of (frames, h, w), diffusers' `img_shapes` entries. `grid` is an (h, w) patch grid or
    diffusers' (frames, h, w), or a list of them: the image's, then each condition picture's (entry k takes the
    RoPE's frames k .. k + frames - 1, as in diffusers). diffusers' per-sample nesting (a list with one such list per
    batch element) is taken when every element's is the same, as diffusers' RoPE uses the first."""
    if _is_shape(grid):
        grid = [grid]
    grid = list(grid)
    if grid and all(isinstance(g, (tuple, list)) and g and not _is_shape(g) for g in grid):  # per-sample lists
        first = frame_shapes(grid[0])
        if any(frame_shapes(g) != first for g in grid[1:]):
            raise ValueError(
                f"grid gives different shapes for the batch's samples ({grid}): one grid serves the whole batch "
                "(diffusers' RoPE also uses the first sample's alone). Give one grid."
            )
        return first
    if not grid or not all(_is_shape(g) for g in grid):
        raise ValueError(
            f"grid {grid!r} is not an (h, w) patch grid, a (frames, h, w) shape, or a list of them (the image's, "
            "then each condition picture's)"
        )
    shapes = [(1, int(g[0]), int(g[1])) if len(g) == 2 else tuple(int(v) for v in g) for g in grid]
    if any(min(s) < 1 for s in shapes):
        raise ValueError(f"grid {grid!r} has a size below 1")
    return shapes


def frames(grid) -> list[tuple[int, int]]:
    """A (h, w) patch grid, or a list of them (the image's, then condition pictures'), as a list of (h, w); an entry
    of several frames (diffusers' (frames, h, w)) counts once (see `frame_shapes`)."""
    return [(h, w) for _, h, w in frame_shapes(grid)]


@lru_cache(maxsize=16)
def multi_frame_rope(shapes: tuple, text_len: int, axes_dims: tuple, theta: float = 10000.0):
    """(cos, sin) of diffusers' `QwenEmbedRope` for img_shapes entries of several frames: entry k's frames take
    frame positions k, k + 1, ... (diffusers' `freqs_pos[0][idx : idx + frame]`), each frame its centred (h, w)
    grid; the text starts past the largest grid's half. The same float32 roundings as `rope.rope_angles`."""
    f_frame, f_row, f_col = (axis_frequencies(d, theta) for d in axes_dims)
    parts = []
    for k, (f, h, w) in enumerate(shapes):
        rows, cols = (p[:, None].astype(np.float32) for p in image_positions(h, w))
        for j in range(f):
            frame = np.full((h * w, 1), k + j, np.float32)
            parts.append(np.concatenate([frame * f_frame[None], rows * f_row[None], cols * f_col[None]], axis=1))
    start = max(max(h // 2, w // 2) for _, h, w in shapes)
    text_pos = np.arange(start, start + text_len, dtype=np.float32)[:, None]
    text = text_pos * np.concatenate([f_frame, f_row, f_col])[None]
    a = np.concatenate([text, *parts], axis=0).astype(np.float64)
    return mx.array(np.cos(a).astype(np.float32)), mx.array(np.sin(a).astype(np.float32))


class QwenImageTransformer(nn.Module):
    """The MMDiT; `modulation=False` builds it without the weights that depend on sigma alone (see
    `TransformerModulation`), and it then runs only with `mods=` given."""

    def __init__(self, config: TransformerConfig | None = None, switches: Switches | None = None, modulation=True):
        super().__init__()
        self.config = config = config or TransformerConfig()
        self.switches = switches = switches or Switches()
        self.has_modulation = modulation
        D = config.dim
        self.img_in = nn.Linear(config.in_channels, D)
        self.txt_norm = RMSNorm(config.joint_attention_dim, config.eps, switches)
        self.txt_in = nn.Linear(config.joint_attention_dim, D)
        if modulation:
            self.time_text_embed = QwenTimestepProjEmbeddings(D, switches=switches)
        self.transformer_blocks = [TransformerBlock(config, switches, modulation) for _ in range(config.num_layers)]
        self.norm_out = AdaLayerNormContinuous(D, config.eps, switches, modulation)
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

    def _compiled_block(self, masked: bool, split: int | None = None):
        """block(img, txt, mod, rope, mask) as one compiled function of (the block's weights, inputs).

        Traced once with block 0 as a template whose weights are swapped for the traced inputs (and put back),
        then replayed for every block with that block's weights: one trace serves all 60. MLX traces again by
        itself when shapes change (a new image size or text length); a change of switches, of structure
        (fused q/k/v, quantized) or of the zero_cond_t split (a number baked into the trace) makes a new one."""
        template = self.transformer_blocks[0]
        structure = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in tree_flatten(template.parameters())))
        key = (masked, split, self.switches, hash(structure))
        cache = self.__dict__.setdefault("_compiled_blocks", {})  # a plain attribute, not a parameter
        if key not in cache:

            def run(params, img, txt, mod, rope, *mask):
                saved = template.parameters()
                template.update(params)
                out = template(img, txt, mod, rope, mask[0] if mask else None, split)
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

    def modulations(self, sigma: mx.array, dtype: mx.Dtype | None = None) -> ModulationTable:
        """The modulation for sigma (B,) or (1,), or for a whole schedule's sigmas (S,): they depend on sigma
        alone, so they can be computed once for a schedule and each step's row (`table.step(i)`) reused."""
        if not self.has_modulation:
            raise ValueError(
                "this transformer was built without its modulation weights (modulation=False: the pipeline's "
                "schedule_modulation computes them up front): pass mods= (a ModulationTable row, e.g. "
                "pipe.modulation_table(steps, grid).step(i)), or build it with modulation=True"
            )
        return modulation_table(self, sigma, dtype or self.img_in.weight.dtype)

    def rope(self, h: int, w: int, text_len: int, conditions=()):
        """The joint (cos, sin) RoPE table for a (h, w) patch grid, text_len tokens and condition pictures' (h, w)
        grids (Qwen-Image-Edit's frames 1, 2, ...)."""
        make = rope_table if self.switches.rope_cache else build_rope_table
        return make(h, w, text_len, self.config.axes_dims_rope, conditions=tuple(conditions))

    def __call__(
        self,
        latents: mx.array,
        text: mx.array,
        sigma: mx.array | None,
        grid: tuple[int, int],
        text_mask: mx.array | None = None,
        *,
        mods: ModulationTable | None = None,
        block_hook=None,
    ) -> mx.array:
        """latents (B, N, in_channels), text (B, L, joint_attention_dim), sigma (B,) or (1,) -> (B, N, out).

        `grid` is the (h, w) patch grid, or a list of grids: the image's, then each condition picture's, whose
        tokens follow in `latents` (Qwen-Image-Edit; every token's velocity is returned, as diffusers does).
        `text_mask` (B, L), 1 for real tokens, hides padded text keys. `mods` takes a precomputed
        `ModulationTable` row instead of sigma; `block_hook(i, img, txt)` is called after each block
        (for the eval-placement experiment) and may return replacements."""
        if latents.ndim != 3 or text.ndim != 3:
            raise ValueError(
                f"latents {tuple(latents.shape)} and text {tuple(text.shape)} must be 3-D: (batch, tokens, channels)"
            )
        B, N, C = latents.shape
        if text.shape[0] not in (1, B):
            raise ValueError(f"text embeddings have batch {text.shape[0]}, latents {B}: give one text per latent")
        if sigma is not None:
            sigma = sigma if isinstance(sigma, mx.array) else mx.array(sigma, dtype=mx.float32)
            sigma = sigma.reshape(1) if sigma.ndim == 0 else sigma
            if sigma.ndim != 1 or sigma.shape[0] not in (1, B):
                raise ValueError(f"sigma has shape {tuple(sigma.shape)}: give one per batch element, ({B},), or (1,)")
        shapes = frame_shapes(grid)
        grids = [(h, w) for _, h, w in shapes]
        patches = sum(f * h * w for f, h, w in shapes)
        if patches != N:
            shown = " + ".join(f"{h}x{w}" if f == 1 else f"{f}x{h}x{w}" for f, h, w in shapes)
            raise ValueError(f"grid {shown} has {patches} patches, but latents have N = {N} tokens")
        if C != self.config.in_channels:
            raise ValueError(f"latents have {C} channels; this transformer expects {self.config.in_channels}")
        if text.shape[-1] != self.config.joint_attention_dim:
            raise ValueError(f"text embeddings have width {text.shape[-1]}; expected {self.config.joint_attention_dim}")
        L = text.shape[1]
        img = self.img_in(latents)
        txt = self.txt_in(self.txt_norm(text))
        if mods is None:
            mods = self.modulations(sigma, img.dtype)
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(
                f"text_mask has shape {tuple(text_mask.shape)}; it must be (batch, text length) = "
                f"{tuple(text.shape[:2])}, as the text embeddings (1 for real tokens, 0 for padding)"
            )
        mask = None if text_mask is None else joint_key_mask(text_mask, N)

        # Qwen-Image-Edit-2511: the condition pictures' tokens are modulated at sigma 0
        first = shapes[0][0] * shapes[0][1] * shapes[0][2]
        split = first if self.config.zero_cond_t and first < N else None
        if split is not None and mods.cond is None:
            raise ValueError("zero_cond_t needs the modulation at sigma 0: a table made by this model's config")
        cached = self.switches.rope_cache
        if any(f > 1 for f, _, _ in shapes):  # frames of several pictures in one entry: diffusers' frame positions
            cached, rope = True, multi_frame_rope(tuple(shapes), L, tuple(self.config.axes_dims_rope))
        elif cached:
            rope = self.rope(*grids[0], L, grids[1:])
        if self.switches.compiled_blocks:
            run = self._compiled_block(mask is not None, split)
        else:
            run = partial(_call_block, split=split)
        for i, block in enumerate(self.transformer_blocks):
            if not cached:  # the seed's baseline: the table rebuilt inside every block
                rope = self.rope(*grids[0], L, grids[1:])
            mod = mods.blocks[i] if split is None else (*mods.blocks[i], mods.cond[i])
            img, txt = run(block, img, txt, mod, rope, mask)
            if block_hook is not None:
                img, txt = block_hook(i, img, txt) or (img, txt)
        return self.proj_out(self.norm_out(img, mods.out))


# ------------------------------------------------------------------------------------------------ loading
def _quantize_as_stored(model: nn.Module, stored: dict | None, prefix: str = ""):
    """Give a model (or a part of one, at checkpoint path `prefix`) the quantized structure of a folder written by
    `save_pretrained`, before its tensors load."""
    if not stored:
        return None
    bits, group = stored["bits"], stored.get("group_size", GROUP_SIZE)
    return quantize_transformer(model, bits, group, stored.get("modulation_bits", MODULATION_BITS), prefix)


def prepare_transformer(model: QwenImageTransformer, quantize: int | None = None, switches: Switches | None = None):
    """A loaded transformer made ready to run: quantized to `quantize` bits (lazily, unless it already is) and its
    q/k/v fused when `switches.fused_qkv`. Returns the QuantizationReport, or None."""
    report = None
    if quantize and not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        report = quantize_transformer(model, quantize)
    if (switches or model.switches).fused_qkv:
        model.fuse_projections()  # after loading, which is strict on the checkpoint's separate names
    return report


def load_transformer(
    folder,
    dtype: mx.Dtype = mx.bfloat16,
    quantize: int | None = None,
    switches: Switches | None = None,
    modulation: bool = True,
    adjust=None,
    variant: str | None = None,
):
    """(model, QuantizationReport or None) from a checkpoint's `transformer/` folder, lazily (nothing is read until
    evaluated): strict on diffusers' names, then quantized (lazily too) and q/k/v fused as `switches` say. A folder
    written by `save_pretrained` with a `quantization` entry is loaded in that structure. `modulation=False` leaves
    out the weights that depend on sigma alone (`is_timestep_weight`): they are not even read. `adjust(weights)`
    may change the checkpoint-named weights before they load (a LoRA merged before quantizing). `variant`
    ("fp16"): read that variant's files where the folder has them, as diffusers' `variant=` (see
    `loading.weight_layout`)."""
    folder = Path(folder)
    raw = read_config(folder)
    switches = switches or Switches()
    stored = raw.get("quantization")
    if stored and quantize not in (None, stored["bits"]):
        raise ValueError(
            f"{folder} holds a {stored['bits']}-bit transformer: load it with quantize=None (or {stored['bits']}); "
            "to change the bits, quantize the original checkpoint"
        )
    model = QwenImageTransformer(TransformerConfig.from_dict(raw), switches, modulation)
    stored_report = _quantize_as_stored(model, stored)
    keep = None if modulation else (lambda name: not is_timestep_weight(name))
    weights = read_weights(folder, dtype, keep=keep, variant=variant)
    if adjust is not None:
        weights = adjust(weights)
    load_strict(model, weights, "transformer")
    report = prepare_transformer(model, None if stored else quantize, switches)
    return model, stored_report or report


def load_modulation_table(
    folder,
    sigmas: mx.array,
    dtype: mx.Dtype = mx.bfloat16,
    quantize: int | None = None,
    adjust=None,
    variant: str | None = None,
) -> ModulationTable:
    """A schedule's `ModulationTable` straight from a checkpoint's `transformer/` folder, reading the weights that
    depend on sigma alone one block at a time: each block's img_mod/txt_mod are read, used, evaluated and dropped,
    so at most one block's projections are in memory (2 x 57M parameters in the real model), never all 6.8B. With
    `quantize` (or a quantized folder) they are quantized as in the quantized transformer, so the table is the one
    that model would compute. `adjust(weights)` may change the checkpoint-named weights first (a LoRA)."""
    folder = Path(folder)
    raw = read_config(folder)
    config, stored = TransformerConfig.from_dict(raw), raw.get("quantization")
    weights = read_weights(folder, dtype, keep=is_timestep_weight, variant=variant)
    if adjust is not None:
        weights = adjust(weights)

    def part(module: nn.Module, prefix: str) -> nn.Module:
        _quantize_as_stored(module, stored, prefix)
        names = {k: k[len(prefix) :] for k in weights if k.startswith(prefix)}
        load_strict(module, {short: weights.pop(k) for k, short in names.items()}, "transformer", prefix)
        if quantize and not stored:
            quantize_transformer(module, quantize, prefix=prefix)
        return module

    embedder = part(QwenTimestepProjEmbeddings(config.dim), "time_text_embed.")
    temb = embedder(_with_zero(sigmas, config.zero_cond_t).astype(dtype), dtype)
    mx.eval(temb)
    blocks = []
    for i in range(config.num_layers):
        mods = part(BlockModulation(config.dim), f"transformer_blocks.{i}.").modulation(temb)
        mx.eval(mods)  # this block's projections are read here and dropped with the module
        blocks.append(mods)
    out = part(OutputModulation(config.dim), "norm_out.").modulation(temb)
    mx.eval(out)
    return _table(blocks, out, config.zero_cond_t)
