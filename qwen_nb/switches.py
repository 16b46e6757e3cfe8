"""Every speed technique of the course as an on/off switch, so one model runs naive or fast.

`Switches()` is the optimized default; `Switches.baseline()` turns everything off. A benchmark flips one field at
a time (`dataclasses.replace(Switches(), fast_attention=False)`) and `model.set_switches(...)` applies it to
every module of a built model. Notebook 10 and `benchmarks/` measure what each one is worth.
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
    fused_modulation: bool = True  # LayerNorm+scale+shift, gate+residual and RoPE as fused kernels
    # each block's whole forward traced once by mx.compile (per shape) and replayed for all 60 blocks with their
    # own weights: MLX fuses the elementwise chains between the matmuls across the block
    compiled_blocks: bool = True
    fused_qkv: bool = True  # q, k, v as one matmul per stream (`model.fuse_projections()`), not three
    # Pipeline-level: CFG's two passes as one batch of two (when both texts have one length: padding would need a
    # key mask, which costs more than it saves at 1024x1024), and the
    # modulation of every step computed up front, after which the modulation weights (6.8B parameters, a third
    # of the transformer) are released and read again only for another schedule.
    batched_cfg: bool = True
    schedule_modulation: bool = True
    # QK RMSNorm + concat + RoPE as one hand-written GPU kernel (CUDA, Metal). Off: on an H100 it saved 25% of
    # that step alone but nothing measurable in a whole forward (0.0862 s either way, 30 blocks at 1024x1024).
    qk_kernel: bool = False

    @classmethod
    def baseline(cls) -> "Switches":
        """Every technique off: the naive model the notebooks start from."""
        return cls(**{f.name: False for f in fields(cls)})

    def only(self, **changes) -> "Switches":
        """A copy with some switches changed."""
        return replace(self, **changes)
