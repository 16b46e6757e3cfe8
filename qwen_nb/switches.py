"""Every speed technique of the model as an on/off switch, so one model runs naive or fast.

`Switches()` is the optimized default; `Switches.baseline()` turns everything off. A benchmark flips one field at
a time (`Switches().only(fast_attention=False)`) and `model.set_switches(...)` applies it to every module of a built
model. Notebook 10 and `benchmarks/` measure what each one is worth. These are the model's switches: how the
pipeline schedules work (CFG as one batch, the modulation table) are pipeline options (`PipelineOptions`), and the
VAE's sub-pixel upsampling is an argument of the VAE.
"""

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Switches:
    rope_cache: bool = True  # RoPE tables built once per (grid, text length), not in every block
    timestep_cache: bool = True  # sinusoid frequencies built once, not at every call
    fast_attention: bool = True  # mx.fast.scaled_dot_product_attention, not softmax(QK^T)V written out
    fast_rms_norm: bool = True  # mx.fast.rms_norm, not mean/rsqrt written out
    fast_gelu: bool = True  # the tanh GELU as one compiled kernel, not a chain of elementwise ops
    fast_layer_norm: bool = True  # mx.fast.layer_norm without weights, not mean/var written out
    # scale+shift, gate+residual and RoPE as compiled kernels; together with fast_layer_norm, LayerNorm, scale and
    # shift become one mx.fast.layer_norm call (the modulation as the norm's weight and bias)
    fused_modulation: bool = True
    # each block's whole forward traced once by mx.compile (per shape) and replayed for all 60 blocks with their
    # own weights: MLX fuses the elementwise chains between the matmuls across the block
    compiled_blocks: bool = True
    fused_qkv: bool = True  # q, k, v as one matmul per stream (`model.fuse_projections()`), not three
    # QK RMSNorm + concat + RoPE as one hand-written GPU kernel (CUDA, Metal); needs fast_rms_norm and
    # fused_modulation (it replaces both paths). Off: on an H100 it saved 25% of that step alone but nothing
    # measurable in a whole forward (0.0862 s either way, 30 blocks at 1024x1024).
    qk_kernel: bool = False

    def __post_init__(self):
        for name, needs in REQUIRES.items():
            missing = [n for n in needs if not getattr(self, n)]
            if getattr(self, name) and missing:
                raise ValueError(
                    f"Switches({name}=True) needs {' and '.join(missing)} on too: {name} replaces their code path. "
                    f"Turn {name} off, or turn {', '.join(missing)} on."
                )

    @classmethod
    def baseline(cls) -> "Switches":
        """Every technique off: the naive model the notebooks start from."""
        return cls(**{f.name: False for f in fields(cls)})

    def only(self, **changes) -> "Switches":
        """A copy with some switches changed."""
        return replace(self, **changes)


# A switch that only works with others on: the set-up is refused otherwise (see __post_init__).
REQUIRES = {"qk_kernel": ("fast_rms_norm", "fused_modulation")}
