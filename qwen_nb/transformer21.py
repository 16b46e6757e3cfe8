"""The Qwen-Image 2.1 transformer: diffusers' `QwenImage21Transformer2DModel`, single stream and block-causal.

Text tokens, condition-picture latents (in the slots the text encoder reserved, each slot standing for 2x2 latent
tokens) and the target picture's latents form one sequence. Every block is LayerNorm -> (1 + scale) -> attention
with per-head RMSNorm and 3-D RoPE -> tanh(gate) residual, then the same around a SwiGLU MLP; the scales and gates
come from one modulation projection shared by all blocks. Attention is block-causal: text is causal, each picture
attends to everything before it and within itself, the target sees everything. With `causal_condition` the text and
condition tokens are modulated at t = 0, so they do not change from step to step: their keys and values are computed
once (a prefill into a `KVCache`) and every later step computes the target tokens only.

Parameter names are diffusers' verbatim (`transformer_blocks.3.attn.to_q.weight`, `modulation.1.weight`,
`txt_in.text_norm.weight`), so a diffusers state dict loads strictly.
`model(latents (B, N, C), text (B, L, context_in_dim), sigma (B,), layout) -> velocity of the target (B, N_t, C)`.
"""

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .loading import Config, load_strict, read_config, read_weights
from .quantize import GROUP_SIZE, MODULATION_BITS, QuantizationReport, check_bits
from .rmsnorm import RMSNorm
from .rope import apply_rope_fused, axis_frequencies
from .timestep_embedder import timestep_frequencies
from .transformer import gelu_tanh_fused

TOKENS_PER_SLOT = 4  # one slot of the text encoder stands for a 2x2 group of latent tokens


@dataclass
class Transformer21Config(Config):
    """`transformer/config.json` of Qwen/Qwen-Image-2.1 (diffusers' class defaults: 32 blocks of 4096)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = 64  # None: in_channels, as diffusers
    num_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    context_in_dim: int = 4096
    mlp_ratio: int = 3
    axes_dims_rope: tuple = (16, 56, 56)
    eps: float = 1e-6
    causal_condition: bool = True

    def __post_init__(self):
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.patch_size != 1:
            raise ValueError(
                f"patch_size {self.patch_size}: QwenImage21Pipeline feeds the latents unpatched (one token per latent "
                "pixel), so only patch_size 1 fits it"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {list(self.axes_dims_rope)} must be even and sum to attention_head_dim "
                f"{self.attention_head_dim}: each RoPE axis rotates its own pairs of a head's channels"
            )

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def tiny(cls, **overrides) -> "Transformer21Config":
        """2 blocks, 2 heads of 32, text 48 wide, 16 latent channels: the test fixture's shape."""
        base = dict(
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            context_in_dim=48,
            axes_dims_rope=(8, 12, 12),
        )
        return cls(**{**base, **overrides})


# ------------------------------------------------------------------------------------------------ the sequence
@dataclass
class Layout:
    """Where every token of the joint sequence comes from, computed once per generation on the host.

    runs: ("text", a, b) rows a..b of the text embeddings or ("image", a, b) rows of the latents, in sequence order;
    prefix: tokens before the target (text and condition pictures); segments: (start, end, is_text) runs of the
    prefix that attend as one (a text run causally, a picture within itself), each also to everything before it;
    cos, sin: the RoPE table (S, head_dim / 2); blocks: image tokens per picture, the target last."""

    runs: list
    prefix: int
    target: int
    segments: list
    cos: mx.array
    sin: mx.array
    blocks: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.prefix + self.target

    def block_causal_mask(self) -> mx.array:
        """(S, S) bool, True where a query may attend a key: (q >= k) or both in one picture (diffusers' flex
        `mask_mod`)."""
        ids = np.full(self.length, -1)
        for block, (s, e, is_text) in enumerate(self.segments + [(self.prefix, self.length, False)]):
            ids[s:e] = -1 if is_text else block
        q, k = np.arange(self.length)[:, None], np.arange(self.length)[None, :]
        same = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
        return mx.array((q >= k) | same)


def rope_positions(slots: np.ndarray, img_shapes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame, row, column) positions of the joint sequence, as diffusers' `QwenImage21Rope`: text advances one
    position on all three axes; each picture sits at the frame position reached by the text before it, its tokens
    on a (row, column) grid centred on zero, and the position then advances by the picture's longer side.
    `slots` is the joint sequence's image-token mask (S,)."""
    is_image = slots.tolist()
    S = len(is_image)
    frame, rows, cols = [], [], []
    cursor, position = 0, 0
    for _, h, w in img_shapes:
        start = is_image.index(True, cursor)
        n = start - cursor
        frame += range(position, position + n)
        position += n
        cursor = start + h * w
        frame += [position] * (h * w)
        position += max(h, w)
        rows += [r for r in range(-(h - h // 2), h // 2) for _ in range(w)]
        cols += [c for _ in range(h) for c in range(-(w - w // 2), w // 2)]
    frame += range(position, position + S - cursor)
    frame = np.array(frame, np.int64)
    row, col = frame.copy(), frame.copy()
    row[slots], col[slots] = rows, cols
    return frame, row, col


def make_layout(image_pad_mask, img_shapes, axes_dims=(16, 56, 56), theta: float = 10000.0) -> Layout:
    """The layout of a text-encoder sequence whose True entries of `image_pad_mask` (L,) are picture slots (the
    condition pictures' and, appended at the end, the target's), for pictures of latent grids `img_shapes` [(1, h, w)]
    with the target last, as diffusers' `build_token_metadata` and `QwenImage21Rope` read them."""
    slots = np.asarray(image_pad_mask, bool).reshape(-1)
    img_shapes = [tuple(int(v) for v in s) for s in img_shapes]
    blocks = [t * h * w for t, h, w in img_shapes]
    expanded = np.repeat(slots, np.where(slots, TOKENS_PER_SLOT, 1))  # the joint sequence's image mask
    if expanded.sum() != sum(blocks):
        raise ValueError(
            f"the pictures' latent grids {[list(s) for s in img_shapes]} hold {sum(blocks)} tokens, but the text "
            f"encoder reserved {int(slots.sum())} slots = {int(expanded.sum())} tokens for them: each slot stands "
            "for 2x2 latent tokens, so a picture's text-encoder grid must be half its latent grid (condition "
            "pictures resized by the pipeline are; check the processor's pixel range)"
        )
    if not expanded[-blocks[-1] :].all():
        raise ValueError("the target picture's slots must end the sequence (the pipeline appends them)")
    # text rows are the text encoder's positions (a slot's own row is replaced by its picture's latent tokens)
    runs, position, image_row = [], 0, 0
    for is_img, group in _groups(slots):
        n = len(group)
        if is_img:
            runs.append(("image", image_row, image_row + TOKENS_PER_SLOT * n))
            image_row += TOKENS_PER_SLOT * n
        else:
            runs.append(("text", position, position + n))
        position += n
    # block ids over the image tokens, from the pictures' sizes (two adjacent pictures are still two blocks)
    ids = np.full(len(expanded), -1)
    ids[expanded] = np.repeat(np.arange(len(blocks)), blocks)
    prefix = len(expanded) - blocks[-1]
    segments, start = [], 0
    for index in range(1, prefix + 1):
        if index == prefix or ids[index] != ids[start]:
            segments.append((start, index, bool(ids[start] < 0)))
            start = index
    frame, row, col = rope_positions(expanded, img_shapes)
    freqs = [axis_frequencies(d, theta) for d in axes_dims]
    angles = np.concatenate(
        [p[:, None].astype(np.float32) * f[None] for p, f in zip((frame, row, col), freqs)], axis=1
    ).astype(np.float64)
    cos, sin = mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))
    return Layout(runs, prefix, blocks[-1], segments, cos, sin, blocks)


def _groups(flags: np.ndarray):
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    return [(bool(g[0]), g) for g in np.split(flags, edges) if len(g)]


# ------------------------------------------------------------------------------------------------ the KV cache
class KVCache:
    """Every block's keys and values of the prefix (B, H, P, Dh), after RMSNorm and RoPE: diffusers'
    `QwenImage21KVCache`. Filled by the first call with `cache=` (the prefill), read by every later call."""

    def __init__(self, num_layers: int):
        self.layers: list = [None] * num_layers

    @property
    def filled(self) -> bool:
        return all(kv is not None for kv in self.layers)

    def arrays(self) -> list:
        return [a for kv in self.layers if kv is not None for a in kv]


# ------------------------------------------------------------------------------------------------ the model
class ZeroCenterRMSNorm(nn.Module):
    """`QwenImage21ZeroCenterRMSNorm`: RMSNorm whose stored weight is scale - 1, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.zeros((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32) + 1, self.eps).astype(x.dtype)


class TextProjection(nn.Module):
    """`QwenImage21TextProjection`: zero-centred RMSNorm, linear, tanh GELU, linear (no biases)."""

    def __init__(self, context_dim: int, dim: int, eps: float):
        super().__init__()
        self.text_norm = ZeroCenterRMSNorm(context_dim, eps)
        self.in_layer = nn.Linear(context_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out_layer(gelu_tanh_fused(self.in_layer(self.text_norm(x))))


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, channels: int = 256):
        super().__init__()
        self.linear_1 = nn.Linear(channels, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class TimestepProjEmbeddings(nn.Module):
    """`QwenImage21TimestepProjEmbeddings`: [cos, sin] of (1000 t) f for 128 frequencies, then an MLP; (B,) -> (B, D)."""

    def __init__(self, dim: int, channels: int = 256):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(dim, channels)
        self._freqs = timestep_frequencies(channels)  # not a parameter

    def __call__(self, t: mx.array, dtype: mx.Dtype) -> mx.array:
        a = (1000.0 * t.astype(mx.float32))[:, None] * self._freqs[None]  # diffusers scales t before the product
        return self.timestep_embedder(mx.concatenate([mx.cos(a), mx.sin(a)], axis=-1).astype(dtype))


class SwiGLU(nn.Module):
    """`QwenImage21SwiGLUFeedForward`: out(silu(gate_layer(x)) * proj(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)
        self.gate_layer = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out(nn.silu(self.gate_layer(x)) * self.proj(x))


class Attention(nn.Module):
    """`QwenImage21Attention`: q, k, v (no biases), per-head RMSNorm on q and k, RoPE, attention, to_out.0."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads = heads
        self.scale = head_dim**-0.5
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_v = nn.Linear(dim, heads * head_dim, bias=False)
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.to_out = [nn.Linear(heads * head_dim, dim, bias=False)]  # diffusers' to_out.1 is a Dropout

    def qkv(self, x: mx.array, rope) -> tuple:
        """q, k, v (B, H, S, Dh) of x (B, S, D), q and k normalised and rotated."""
        B, S, _ = x.shape

        def heads(t):
            return t.reshape(B, S, self.heads, -1)  # (B, S, H, Dh)

        q, k = self.norm_q(heads(self.to_q(x))), self.norm_k(heads(self.to_k(x)))
        q, k = apply_rope_fused(q, *rope), apply_rope_fused(k, *rope)
        return tuple(t.transpose(0, 2, 1, 3) for t in (q, k, heads(self.to_v(x))))

    def __call__(self, x: mx.array, rope, attend, cached=None, store=None) -> mx.array:
        """x (B, S, D) -> (B, S, D). `attend(q, k, v, scale)` is the prefill's block-causal attention; with `cached`
        (k, v) of the prefix, x is the target alone and attends to [prefix, itself] unmasked. `store(k, v)` receives
        the prefix's keys and values of a prefill."""
        B, S, _ = x.shape
        q, k, v = self.qkv(x, rope)
        if cached is not None:
            k, v = mx.concatenate([cached[0], k], axis=2), mx.concatenate([cached[1], v], axis=2)
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            if store is not None:
                store(k, v)
            o = attend(q, k, v, self.scale)
        return self.to_out[0](o.transpose(0, 2, 1, 3).reshape(B, S, -1))


@dataclass
class TokenModulation:
    """The shared modulation as each token reads it: (1 + scale) and tanh(gate) of the attention and the MLP, each
    (B, 1, D) when every token uses its sample's row, or (B, S, D) when the prefix uses the t = 0 row."""

    scale1: mx.array
    gate1: mx.array
    scale2: mx.array
    gate2: mx.array


def _rows(params: mx.array, B: int, prefix: int, target: int) -> mx.array:
    """diffusers' `_select_modulation_rows`: rows 0..B-1 for the target tokens, the trailing t = 0 row for the
    `prefix` tokens before them; (B + 1, D) -> (B, 1 or S, D)."""
    real = params[:B, None]
    if prefix == 0:
        return real
    zero = mx.broadcast_to(params[B:, None], (B, prefix, params.shape[-1]))
    return mx.concatenate([zero, mx.broadcast_to(real, (B, target, params.shape[-1]))], axis=1)


class TransformerBlock(nn.Module):
    """`QwenImage21TransformerBlock`: single stream, modulated by the shared projection; shape-preserving."""

    def __init__(self, config: Transformer21Config):
        super().__init__()
        D = config.dim
        self.eps = config.eps
        self.attn = Attention(D, config.num_attention_heads, config.attention_head_dim, config.eps)
        self.img_mlp = SwiGLU(D, D * config.mlp_ratio)

    def __call__(self, x, mod: TokenModulation, rope, attend=None, cached=None, store=None) -> mx.array:
        h = mx.fast.layer_norm(x, None, None, self.eps) * mod.scale1
        x = x + mod.gate1 * self.attn(h, rope, attend, cached, store)
        h = mx.fast.layer_norm(x, None, None, self.eps) * mod.scale2
        return x + mod.gate2 * self.img_mlp(h)


class BlockCausal:
    """The prefill's attention: `(q >= k) or same picture` over the joint sequence.

    "segments" (the default) runs one fused attention per run of the prefix, each over the keys up to its end (a
    text run with MLX's causal mask, which is aligned to the last key), and one for the target over every key: no
    mask array, and the scores a query may not use are never computed. "mask" runs one attention over the whole
    sequence with an (S, S) boolean mask. Both give the same numbers. Measured with `benchmarks/bench_qwen21.py
    --attention --size 512x512` (32 heads of 128, bfloat16, 200 text tokens; MLX 0.32.4 on 2 shared x86 cores,
    assets/bench/qwen21_attention_cpu_512.json): a 512x512 target alone (1224 tokens) 7.7 s segments vs 8.5 s mask;
    with a 512x512 condition picture (2248 tokens) 16.7 s vs 23.0 s. Segments is also the form whose memory does
    not grow with S^2 (the mask is 70M entries at 1024x1024 with a 1024x1024 condition picture and 200 text tokens)."""

    def __init__(self, layout: Layout, mode: str = "segments"):
        if mode not in ("segments", "mask"):
            raise ValueError(f"attention mode must be 'segments' or 'mask', not {mode!r}")
        self.layout, self.mode = layout, mode
        self.mask = layout.block_causal_mask() if mode == "mask" else None

    def __call__(self, q, k, v, scale: float) -> mx.array:
        if self.mode == "mask":
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=self.mask)
        outs = []
        for start, end, is_text in self.layout.segments:
            outs.append(
                mx.fast.scaled_dot_product_attention(
                    q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale=scale, mask="causal" if is_text else None
                )
            )
        P = self.layout.prefix
        outs.append(mx.fast.scaled_dot_product_attention(q[:, :, P:], k, v, scale=scale))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


class QwenImage21Transformer(nn.Module):
    """The single-stream block-causal transformer; returns the target tokens' velocity."""

    def __init__(self, config: Transformer21Config | None = None, attention: str = "segments"):
        super().__init__()
        self.config = config = config or Transformer21Config()
        self.attention = attention  # the prefill's block-causal attention: "segments" or "mask" (BlockCausal)
        D = config.dim
        self.time_text_embed = TimestepProjEmbeddings(D)
        self.txt_in = TextProjection(config.context_in_dim, D, config.eps)
        self.img_in = nn.Linear(config.in_channels, D, bias=False)
        self.modulation = [nn.SiLU(), nn.Linear(D, 4 * D, bias=False)]  # shared: [scale1, gate1, scale2, gate2]
        self.transformer_blocks = [TransformerBlock(config) for _ in range(config.num_layers)]
        self.norm_out = OutputNorm(D, config.eps)
        self.proj_out = nn.Linear(D, config.out_channels, bias=False)

    @property
    def dtype(self) -> mx.Dtype:
        return self.img_in.weight.dtype if isinstance(self.img_in, nn.Linear) else self.img_in.scales.dtype

    def layout(self, image_pad_mask, img_shapes) -> Layout:
        return make_layout(image_pad_mask, img_shapes, self.config.axes_dims_rope)

    def _embed(self, sigma: mx.array, B: int, dtype: mx.Dtype):
        """(temb, modulation) rows for sigma (B,) or (1,), plus the t = 0 row under causal_condition."""
        t = mx.broadcast_to(sigma.astype(dtype), (B,))
        if self.config.causal_condition:
            t = mx.concatenate([t, mx.zeros((1,), dtype)])
        temb = self.time_text_embed(t, dtype)
        return temb, self.modulation[1](nn.silu(temb))

    def __call__(
        self,
        latents: mx.array,
        text: mx.array | None,
        sigma: mx.array,
        layout: Layout,
        cache: KVCache | None = None,
        block_hook=None,
    ) -> mx.array:
        """latents (B, N, C): condition pictures' latents then the target's (N = all picture tokens), or only the
        target's when `cache` is filled; text (B, L, context_in_dim) (unused with a filled cache); sigma (B,) or
        (1,). With an empty `cache` the call is the prefill and fills it. Returns the target's velocity (B, N_t, C)."""
        config = self.config
        B, N, C = latents.shape
        if C != config.in_channels:
            raise ValueError(f"latents have {C} channels; this transformer takes {config.in_channels}")
        decode = cache is not None and cache.filled
        if cache is not None and not config.causal_condition:
            raise ValueError(
                "a KV cache needs causal_condition=True: only then are the text and condition tokens the same at "
                "every step (modulated at t = 0). Generate with use_kv_cache=False."
            )
        expected = layout.target if decode else sum(layout.blocks)
        if N != expected:
            raise ValueError(f"latents have {N} tokens; this layout needs {expected} ({layout.blocks} per picture)")
        img = self.img_in(latents)
        dtype = img.dtype
        temb, mod = self._embed(sigma, B, dtype)
        P, T = layout.prefix, layout.target
        if decode:
            x, rope, prefix = img, (layout.cos[P:], layout.sin[P:]), 0
        else:
            if text is None or text.shape[-1] != config.context_in_dim:
                raise ValueError(f"text embeddings (B, L, {config.context_in_dim}) are needed for a full forward")
            txt = self.txt_in(text)
            parts = [(txt if kind == "text" else img)[:, a:b] for kind, a, b in layout.runs]
            x, rope = mx.concatenate(parts, axis=1), (layout.cos, layout.sin)
            prefix = P if config.causal_condition else 0
        scale1, gate1, scale2, gate2 = mx.split(mod, 4, axis=-1)
        tokens = TokenModulation(
            *(_rows(p, B, prefix, T) for p in (1 + scale1, mx.tanh(gate1), 1 + scale2, mx.tanh(gate2)))
        )
        attend = None if decode else BlockCausal(layout, self.attention)
        for i, block in enumerate(self.transformer_blocks):
            cached = cache.layers[i] if decode else None
            store = None
            if cache is not None and not decode:

                def store(k, v, i=i):
                    cache.layers[i] = (k[:, :, :P], v[:, :, :P])

            x = block(x, tokens, rope, attend, cached, store)
            if block_hook is not None:
                x = block_hook(i, x) or x
        x = x[:, -T:]
        return self.proj_out(self.norm_out(x, temb[:B]))


class OutputNorm(nn.Module):
    """`QwenImage21AdaLayerNormContinuous`: LayerNorm(x) * (1 + scale), scale = linear(silu(temb)) (no shift)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)
        self.eps = eps

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        scale = self.linear(nn.silu(temb).astype(x.dtype))  # (B, D): the target tokens' rows
        return mx.fast.layer_norm(x, None, None, self.eps) * (1 + scale[:, None])


# ------------------------------------------------------------------------------------------------ loading
def is_modulation21(name: str) -> bool:
    """The projections that set every token's scale and gate: quantized, they keep at least 8 bits."""
    return name.startswith(("modulation.", "norm_out.linear"))


def quantize_transformer21(model: nn.Module, bits: int, group_size: int = GROUP_SIZE) -> QuantizationReport:
    """Quantize the linears in place (lazily): `modulation.1` and `norm_out.linear` at max(bits, 8), the rest at
    `bits`; a linear whose input width is not a multiple of `group_size` stays in full precision (listed)."""
    bits = check_bits(bits)
    report = QuantizationReport(bits, group_size, MODULATION_BITS)

    def predicate(path: str, module: nn.Module):
        if not isinstance(module, nn.Linear):
            return False
        if module.weight.shape[1] % group_size:
            report.skipped.append(path)
            return False
        b = max(bits, MODULATION_BITS) if is_modulation21(path + ".weight") else bits
        return {"group_size": group_size, "bits": b, "mode": "affine"}

    nn.quantize(model, class_predicate=predicate)
    report.quantized = sum(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    return report


def load_transformer21(
    folder,
    dtype: mx.Dtype = mx.bfloat16,
    quantize: int | None = None,
    attention: str = "segments",
    adjust=None,
    variant: str | None = None,
):
    """(model, QuantizationReport or None) from a 2.1 checkpoint's `transformer/` folder, lazily and strictly;
    `adjust(weights)` may change the checkpoint-named weights before they load (a LoRA merged before quantizing)."""
    folder = Path(folder)
    raw = read_config(folder)
    if raw.get("quantization"):
        raise ValueError(f"{folder} holds a quantized transformer: qwen_nb saves quantized 2.1 checkpoints nowhere")
    model = QwenImage21Transformer(Transformer21Config.from_dict(raw), attention)
    weights = read_weights(folder, dtype, variant=variant)
    if adjust is not None:
        weights = adjust(weights)
    load_strict(model, weights, "Qwen-Image 2.1 transformer")
    report = quantize_transformer21(model, quantize) if quantize else None
    return model, report
