"""Weight quantization of the transformer with `nn.quantize` (affine, group size 64).

The timestep-modulation linears (`img_mod`, `txt_mod`, `norm_out.linear`) stay at 8 bits or more: they set the
scale, shift and gate of every LayerNorm, a third of the model's weights, and their errors act on every token.
The text encoder is never quantized (its errors change what the image shows). `nn.quantize` would skip or reject a
linear whose input width is not a multiple of the group size: those are left in full precision and listed, and
the number of QuantizedLinear layers is checked after quantizing.
"""

from dataclasses import dataclass, field

import mlx.nn as nn

BITS = (3, 4, 5, 6, 8)
GROUP_SIZE = 64
MODULATION_BITS = 8


def is_modulation(name: str) -> bool:
    """The modulation projections (checkpoint names): every block's img_mod/txt_mod and the output norm's
    projection. Quantized, they keep at least MODULATION_BITS."""
    return ".img_mod." in name or ".txt_mod." in name or name.startswith("norm_out.linear")


def is_timestep_weight(name: str) -> bool:
    """The weights that depend on sigma alone: the modulation projections and the timestep embedder feeding them
    (6.8B of the real transformer's 20.4B parameters). A schedule's modulation can be computed from them up front."""
    return is_modulation(name) or name.startswith("time_text_embed.")


def quantized_bits(
    name: str, shape: tuple, bits: int, group_size: int = GROUP_SIZE, modulation_bits: int = MODULATION_BITS
) -> int | None:
    """Bits a transformer weight is quantized to, or None when it stays in full precision (biases, norms, and
    linears whose input width is not a multiple of the group size, which nn.quantize would skip)."""
    if len(shape) != 2 or not name.endswith(".weight") or shape[1] % group_size:
        return None
    return max(bits, modulation_bits) if is_modulation(name) else bits


def check_bits(quantize) -> int | None:
    """None, or a supported number of bits; anything else is a ValueError naming the choices."""
    if quantize is None:
        return None
    if isinstance(quantize, bool) or quantize not in BITS:
        raise ValueError(
            f"unknown quantization {quantize!r}: use quantize=8 (about half the memory of bfloat16) or 4 (about a "
            f"quarter), or None for none. Supported bits: {', '.join(map(str, BITS))}."
        )
    return int(quantize)


@dataclass
class QuantizationReport:
    bits: int
    group_size: int
    modulation_bits: int
    quantized: int = 0  # QuantizedLinear layers after quantizing
    skipped: list = field(default_factory=list)  # linears left in full precision (input width % group size != 0)

    def to_config(self) -> dict:
        """The marker written into transformer/config.json by `save_pretrained`."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "modulation_bits": self.modulation_bits,
            "method": "mlx nn.quantize (affine)",
        }


def quantize_transformer(
    model: nn.Module,
    bits: int,
    group_size: int = GROUP_SIZE,
    modulation_bits: int = MODULATION_BITS,
    prefix: str = "",
) -> QuantizationReport:
    """Quantize the transformer's linears in place (lazily: call before its weights are evaluated). `prefix` is
    the module's own checkpoint path when it is a part of the transformer (e.g. "transformer_blocks.3.")."""
    bits = check_bits(bits)
    report = QuantizationReport(bits, group_size, modulation_bits)
    chosen = {}

    def predicate(path: str, module: nn.Module):
        if not isinstance(module, nn.Linear):
            return False
        b = quantized_bits(prefix + path + ".weight", module.weight.shape, bits, group_size, modulation_bits)
        if b is None:
            report.skipped.append(path)
            return False
        chosen[path] = b
        return {"group_size": group_size, "bits": b, "mode": "affine"}

    nn.quantize(model, class_predicate=predicate)
    report.quantized = sum(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    if report.quantized != len(chosen):
        raise RuntimeError(
            f"nn.quantize produced {report.quantized} QuantizedLinear layers, but {len(chosen)} were selected: "
            "some linears were silently left unquantized."
        )
    return report
