"""The full-size Qwen-Image transformer (random weights, bfloat16) on the current device: what each speed technique
is worth, what one CFG step costs, quantized weights, and the peers on the same device (issue 7).

Sections (`--only forward,cfg,quant,peers`; default all but peers, which `--peers` adds):
- forward: one forward at 1024x1024 (64x64 patches), batch 1, 128 text tokens. `optimized` (default Switches()),
  `baseline` (every switch off), each field of Switches flipped alone from the default (`no_<field>`, or
  `with_<field>` for a field that is off by default), `compiled` (mx.compile of the forward) and
  `precomputed_mods` (modulations computed once, outside the timed call).
- cfg: one CFG step at 512x512 (32x32 patches), cond and uncond texts of 128 tokens, `cfg_combine` included:
  two passes of batch 1, with and without a text mask; one batch of 2 (sigma (1,) broadcast), masked, compiled;
  and `single_pass` (one batch-1 forward, to set beside the peers).
- quant: the forward of the first section with 8-bit and 4-bit weights (`qwen_nb.quantize`), each on a fresh
  random model built after the bfloat16 one is freed, one at a time.
- peers: diffusers (a subprocess of `--peer-python`) and mflux (in-process, if it imports) at 1024 batch 1,
  512 batch 1 and 512 batch 2, as `/work/shared/perf/peer_probe.py` times them.

    python benchmarks/bench_transformer.py [--tiny] [--layers 60] [--only forward,cfg] [--peers --peer-python PY]

Every variant is checked once (its error recorded, not fatal), then timed side by side: warm-up, alternating
repeats, median; peak memory includes the weights. The report (assets/bench/transformer_<kind>.json + .png, or
$QWEN_NB_BENCH_OUT, or --out) is rewritten after each section, so a run cut short keeps what it measured.
`--tiny` (TransformerConfig.tiny(), float32, 128 px and 64 px, 16 text tokens) is a smoke test of every path in
seconds on a CPU; its report goes to a temporary folder unless --out is given.
"""

import argparse
import dataclasses
import gc
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import peers as peer_lib
from common import sync, time_variants, write_report

from qwen_nb.pipeline import materialize
from qwen_nb.quantize import quantize_transformer
from qwen_nb.scheduler import cfg_combine
from qwen_nb.switches import Switches
from qwen_nb.transformer import QwenImageTransformer, TransformerConfig

SECTIONS = ("forward", "cfg", "quant", "peers")
CFG_SCALE = 4.0


def device_kind() -> str:
    return "cuda" if mx.cuda.is_available() else ("metal" if mx.metal.is_available() else "cpu")


def gb() -> str:
    active, peak, cache = mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory()
    return f"active {active / 1e9:.2f} GB, peak {peak / 1e9:.2f} GB, cache {cache / 1e9:.2f} GB"


def build(config: TransformerConfig, dtype, bits: int | None = None) -> QwenImageTransformer:
    """Random weights, cast (and quantized) lazily before anything is evaluated, then evaluated block by block."""
    t = time.perf_counter()
    model = QwenImageTransformer(config)
    model.set_dtype(dtype)
    if bits:
        quantize_transformer(model, bits)
    model.set_switches(Switches())  # as the pipeline does after loading (and quantizing): e.g. q/k/v fused
    materialize(model)
    print(f"built a {config.num_layers}-block model ({bits or str(dtype)}) in {time.perf_counter() - t:.1f} s; {gb()}",
          flush=True)  # fmt: skip
    return model


def max_diff(a, b) -> float:
    a = mx.concatenate([x.reshape(-1) for x in a]) if isinstance(a, (list, tuple)) else a
    b = mx.concatenate([x.reshape(-1) for x in b]) if isinstance(b, (list, tuple)) else b
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))  # NumPy has no bfloat16
    return float(np.nanmax(np.abs(a - b))) if a.size else 0.0


def run_section(section: str, variants: dict, flops: dict, a, reference: str | None = None, prepared=False):
    """Check each variant once (a failure is recorded and the variant dropped), then time the rest side by side.
    `variants`: name -> fn, or (prepare, fn) when `prepared`. Returns (results, errors)."""
    results, errors, outs = {}, {}, {}
    ok, preps = {}, {}
    for name, v in variants.items():
        prep, fn = v if prepared else ((lambda: None), v)
        preps[name] = prep
        t = time.perf_counter()
        try:
            prep()
            out = fn()
            sync(out)
            outs[name] = out
            ok[name] = fn
            print(f"  {section}/{name}: first call {time.perf_counter() - t:.2f} s; {gb()}", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing variant must not end a one-shot GPU run
            errors[f"{section}/{name}"] = f"{type(e).__name__}: {e}"
            print(f"  {section}/{name}: FAILED {type(e).__name__}: {e}", flush=True)
    # reference: one variant's name, or a function naming each variant's reference (None: not comparable)
    ref_of = reference if callable(reference) else (lambda _: reference)
    diffs = {k: (ref_of(k), max_diff(o, outs[ref_of(k)])) for k, o in outs.items() if ref_of(k) in outs}
    outs = None
    gc.collect()
    t = time.perf_counter()
    try:
        timed = time_variants(ok, a.repeats, a.warmup - 1, prepare=preps)
    except Exception as e:  # noqa: BLE001 - fall back to one variant at a time
        print(f"  {section}: side-by-side timing failed ({type(e).__name__}: {e}); one at a time", flush=True)
        timed = {}
        for name, fn in ok.items():
            try:
                timed.update(time_variants({name: fn}, a.repeats, 0, prepare=preps))
            except Exception as e2:  # noqa: BLE001
                errors[f"{section}/{name}"] = f"{type(e2).__name__}: {e2}"
    print(f"  {section}: timed {len(timed)} variants in {time.perf_counter() - t:.1f} s", flush=True)
    for name, r in timed.items():
        r["section"] = section
        r["tflops"] = round(flops[name] / r["median_s"] / 1e12, 2)
        if name in diffs:
            r["max_abs_diff_vs"], r["max_abs_diff"] = diffs[name]
        results[f"{section}/{name}"] = r
    return results, errors


def forward_section(model, inputs, a) -> tuple:
    x, txt, sigma, grid = inputs
    flops = peer_lib.forward_flops(a.side, 1, a.txt, a.layers, model.config.dim)
    default = Switches()

    def setter(sw):
        def prepare():
            model.set_switches(sw)
            # a switch may restructure the model lazily (fused_qkv concatenates or slices weights): done here,
            # outside the timed call
            mx.eval(model.parameters())

        return prepare

    def fwd():
        return model(x, txt, sigma, grid)

    compiled = mx.compile(lambda x_, t_: model(x_, t_, sigma, grid))  # traced at its first call, default switches
    mods = model.modulations(sigma)
    mx.eval(mods.arrays())
    variants = {
        "optimized": (setter(default), fwd),
        "compiled": (setter(default), lambda: compiled(x, txt)),
        "precomputed_mods": (setter(default), lambda: model(x, txt, None, grid, mods=mods)),
    }
    # the variants that change the model's structure last, so it is restructured twice per round, not each call
    flips = sorted(technique_fields(), key=lambda f: f == "fused_qkv")
    for f in flips:
        on = getattr(default, f)
        variants[flip_name(f, on)] = (setter(default.only(**{f: not on})), fwd)
    variants["baseline"] = (setter(Switches.baseline()), fwd)
    results, errors = run_section("forward", variants, {k: flops for k in variants}, a, "optimized", prepared=True)
    setter(default)()
    return results, errors


# The pipeline's options (PipelineOptions), measured by a pair of variants: against the plain two passes the
# pipeline runs otherwise (batched_cfg needs texts of one length; a padded batch needs a key mask), and the forward
# that computes its modulation against one given the precomputed table.
PIPELINE_LEVEL = {
    "batched_cfg (texts of one length)": ("cfg/two_passes", "cfg/batched"),
    "padded CFG batch with a key mask": ("cfg/two_passes", "cfg/batched_masked"),
    "schedule_modulation": ("forward/optimized", "forward/precomputed_mods"),
}


def technique_fields() -> list:
    return [f.name for f in dataclasses.fields(Switches)]


def flip_name(field: str, on: bool) -> str:
    return f"no_{field}" if on else f"with_{field}"


def speedups(results: dict) -> dict:
    """Each technique against its own baseline: seconds with it off over seconds with it on (> 1: it helps)."""
    default = Switches()
    med = {k: r["median_s"] for k, r in results.items()}
    pairs = {}
    for f in technique_fields():
        on = getattr(default, f)
        flipped = f"forward/{flip_name(f, on)}"
        pairs[f] = (flipped, "forward/optimized") if on else ("forward/optimized", flipped)
    pairs.update(PIPELINE_LEVEL)
    pairs["all_switches (baseline -> optimized)"] = ("forward/baseline", "forward/optimized")
    pairs["mx.compile of the forward"] = ("forward/optimized", "forward/compiled")
    pairs["mx.compile of the batched CFG step"] = ("cfg/batched", "cfg/batched_compiled")
    out = {}
    for name, (off, on) in pairs.items():
        if off in med and on in med:
            out[name] = {
                "off": off,
                "on": on,
                "off_s": med[off],
                "on_s": med[on],
                "speedup": round(med[off] / med[on], 4),
            }
    return out


def cfg_section(model, a) -> tuple:
    h = w = a.cfg_side // 16
    dt = model.img_in.weight.dtype
    keys = mx.random.split(mx.random.key(1), 3)
    x = mx.random.normal((1, h * w, 64), key=keys[0]).astype(dt)
    cond = mx.random.normal((1, a.txt, model.config.joint_attention_dim), key=keys[1]).astype(dt)
    uncond = mx.random.normal((1, a.txt, model.config.joint_attention_dim), key=keys[2]).astype(dt)
    real = min(a.uncond_real, a.txt)  # the unconditional prompt's real tokens; the rest is padding
    mask_c = mx.ones((1, a.txt), dtype=mx.int32)
    mask_u = (mx.arange(a.txt) < real).astype(mx.int32)[None]
    x2, t2, m2 = mx.concatenate([x, x]), mx.concatenate([cond, uncond]), mx.concatenate([mask_c, mask_u])
    sigma = mx.array([0.7]).astype(dt)
    grid = (h, w)
    mx.eval(x, cond, uncond, mask_u, x2, t2, m2)

    def two_passes(mask=False):
        c = model(x, cond, sigma, grid, mask_c if mask else None)
        u = model(x, uncond, sigma, grid, mask_u if mask else None)
        return cfg_combine(c, u, CFG_SCALE)

    def batched(x_, t_, m_=None):
        v = model(x_, t_, sigma, grid, m_)
        return cfg_combine(v[:1], v[1:], CFG_SCALE)

    def batched_mods(x_, t_, m_):
        v = model(x_, t_, None, grid, m_, mods=mods)
        return cfg_combine(v[:1], v[1:], CFG_SCALE)

    mods = model.modulations(sigma)  # sigma (1,): broadcast over the batch of two
    mx.eval(mods.arrays())
    batched_c = mx.compile(batched)
    batched_cm = mx.compile(lambda x_, t_, m_: batched(x_, t_, m_))
    batched_cmm = mx.compile(batched_mods)
    variants = {
        "single_pass": lambda: model(x, cond, sigma, grid),
        "two_passes": two_passes,
        "two_passes_masked": lambda: two_passes(True),
        "batched": lambda: batched(x2, t2),
        "batched_masked": lambda: batched(x2, t2, m2),
        "batched_compiled": lambda: batched_c(x2, t2),
        "batched_masked_compiled": lambda: batched_cm(x2, t2, m2),
        # a padded batch of two with the table: what an earlier pipeline ran for texts of different lengths
        "batched_masked_mods": lambda: batched_mods(x2, t2, m2),
        "batched_masked_mods_compiled": lambda: batched_cmm(x2, t2, m2),
    }
    one = peer_lib.forward_flops(a.cfg_side, 1, a.txt, a.layers, model.config.dim)
    flops = {k: one if k == "single_pass" else 2 * one for k in variants}

    def reference(name):  # the same maths: masked against masked, unmasked against unmasked
        return None if name == "single_pass" else ("two_passes_masked" if "masked" in name else "two_passes")

    return run_section("cfg", variants, flops, a, reference)


def quant_section(config, inputs, a) -> tuple:
    x, txt, sigma, grid = inputs
    flops = peer_lib.forward_flops(a.side, 1, a.txt, a.layers, config.dim)
    results, errors = {}, {}
    for bits in a.bits:
        name = f"int{bits}"
        model = None
        try:
            model = build(config, a.dtype, bits)
            r, e = run_section("quant", {name: lambda m=model: m(x, txt, sigma, grid)}, {name: flops}, a)
            results.update(r)
            errors.update(e)
        except Exception as e:  # noqa: BLE001
            errors[f"quant/{name}"] = f"{type(e).__name__}: {e}"
            print(f"  quant/{name}: FAILED {type(e).__name__}: {e}", flush=True)
        model = None
        gc.collect()
        mx.clear_cache()
        print(f"  freed the {name} model; {gb()}", flush=True)
    return results, errors


def peers_section(a) -> tuple:
    cases = [
        {"label": f"{a.side} B1", "side": a.side, "passes": [[1, a.txt]]},
        {"label": f"{a.cfg_side} B1", "side": a.cfg_side, "passes": [[1, a.txt]]},
        {"label": f"{a.cfg_side} B2", "side": a.cfg_side, "passes": [[2, a.txt]]},
    ]
    kwargs = dict(peer_lib.TINY) if a.tiny else {"num_layers": a.layers}
    if a.tiny and a.layers:
        kwargs["num_layers"] = a.layers
    found, errors = [], {}
    if a.peer_python:
        print(f"peers: diffusers in a subprocess of {a.peer_python}", flush=True)
        d = peer_lib.run_diffusers(a.peer_python, cases, kwargs, a.repeats, a.warmup, a.peer_timeout)
        found += d["results"]
        if d["error"]:
            errors["peers/diffusers"] = d["error"]
    else:
        print("peers: no --peer-python, diffusers skipped", flush=True)
    print("peers: mflux in-process", flush=True)
    m = peer_lib.run_mflux(cases, kwargs, str(a.dtype).split(".")[-1], a.repeats, a.warmup)
    found += m["results"]
    if m["error"]:
        errors["peers/mflux"] = m["error"]
    results = {f"peers/{r['peer'].split()[0]} {r['label']}": {**r, "section": "peers"} for r in found}
    return results, errors, found


def print_results(results: dict) -> None:
    print(f"\n{'variant':44s} {'median ms':>10s} {'min ms':>9s} {'TFLOP/s':>8s} {'peak GB':>8s}")
    for name, r in results.items():
        print(f"{name:44s} {r['median_s'] * 1e3:10.2f} {r['min_s'] * 1e3:9.2f} {r.get('tflops', 0):8.1f} "
              f"{r.get('peak_gb') or 0:8.2f}")  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="TransformerConfig.tiny() in float32: a CPU smoke test")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to N blocks (default 60; tiny 2)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="warm-up calls per variant, the checking call included")
    ap.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
    ap.add_argument("--peers", action="store_true", help="add the peers section")
    ap.add_argument("--peer-python", default=None, help="a Python with torch + diffusers (else diffusers is skipped)")
    ap.add_argument("--peer-timeout", type=float, default=300, help="seconds for the diffusers subprocess")
    ap.add_argument("--bits", default="8,4", help="quantized variants")
    ap.add_argument("--out", default=None, help="report folder (default $QWEN_NB_BENCH_OUT or assets/bench)")
    a = ap.parse_args()
    only = {s.strip() for s in a.only.split(",") if s.strip()} or {"forward", "cfg", "quant"}
    if a.peers:
        only.add("peers")
    unknown = only - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    a.bits = [int(b) for b in a.bits.split(",") if b]
    a.warmup = max(a.warmup, 1)
    kind = device_kind()
    if a.tiny:
        config = TransformerConfig.tiny(**({"num_layers": a.layers} if a.layers else {}))
        a.dtype, a.side, a.cfg_side, a.txt, a.uncond_real = mx.float32, 128, 64, 16, 6
    else:
        config = TransformerConfig(**({"num_layers": a.layers} if a.layers else {}))
        a.dtype, a.side, a.cfg_side, a.txt, a.uncond_real = mx.bfloat16, 1024, 512, 128, 12
    a.layers = config.num_layers
    name = f"transformer_{kind}" + ("_tiny" if a.tiny else "")
    out_dir = Path(a.out) if a.out else (Path(tempfile.mkdtemp()) if a.tiny else None)
    print(f"{name}: sections {sorted(only)}, {a.layers} blocks of width {config.dim}, {a.dtype}, "
          f"repeats {a.repeats}, warm-up {a.warmup}; device {mx.default_device()}, MLX {mx.__version__}", flush=True)  # fmt: skip

    config_out = dict(
        layers=a.layers,
        width=config.dim,
        heads=config.num_attention_heads,
        joint_attention_dim=config.joint_attention_dim,
        dtype=str(a.dtype).split(".")[-1],
        forward_image_px=a.side,
        forward_grid=[a.side // 16] * 2,
        cfg_image_px=a.cfg_side,
        cfg_grid=[a.cfg_side // 16] * 2,
        text_tokens=a.txt,
        uncond_real_tokens_when_masked=a.uncond_real,
        cfg_scale=CFG_SCALE,
        repeats=a.repeats,
        warmup=a.warmup,
        sections=sorted(only),
        switches_default=dataclasses.asdict(Switches()),
        flops_per_forward_T=round(peer_lib.forward_flops(a.side, 1, a.txt, a.layers, config.dim) / 1e12, 3),
        flops_per_cfg_pass_T=round(peer_lib.forward_flops(a.cfg_side, 1, a.txt, a.layers, config.dim) / 1e12, 3),
        flops_formula="B * (2*12*D^2*layers*S + 4*S^2*D*layers), S = image + text tokens (peer_probe.py)",
    )
    results, errors, extra = {}, {}, {"speedups": {}, "peers": [], "section_seconds": {}}
    notes = (
        "Random weights. median_s: median seconds per call (a forward, or a whole CFG step with cfg_combine); peak "
        "memory includes the weights. forward/no_<f>: switch f off alone from the default; speedups: the forward "
        "with a technique off over the forward with it on. quant/* use a fresh random model, built after the "
        "bfloat16 one was freed. peers/*: diffusers (torch, subprocess) and mflux (MLX) on the same device."
    )

    def report():
        extra["speedups"] = speedups(results)
        path = write_report(name, {**config_out, "errors": errors, **extra}, results, notes, out_dir=out_dir)
        data = json.loads(path.read_text())
        data["peers"], data["speedups"], data["errors"] = extra["peers"], extra["speedups"], errors
        path.write_text(json.dumps(data, indent=2))
        return path

    t_all = time.perf_counter()
    model = None
    h = w = a.side // 16
    keys = mx.random.split(mx.random.key(0), 2)
    inputs = (
        mx.random.normal((1, h * w, config.in_channels), key=keys[0]).astype(a.dtype),
        mx.random.normal((1, a.txt, config.joint_attention_dim), key=keys[1]).astype(a.dtype),
        mx.array([0.7]).astype(a.dtype),
        (h, w),
    )
    mx.eval(inputs[:3])

    def run(section: str, body) -> None:
        """One section: body() -> (results, errors); a failure is recorded, the report rewritten either way."""
        if section not in only:
            return
        t = time.perf_counter()
        print(f"\n== {section} ({gb()}) ==", flush=True)
        try:
            r, e = body()
            results.update(r)
            errors.update(e)
        except Exception as e:  # noqa: BLE001
            errors[section] = f"{type(e).__name__}: {e}"
            print(f"{section} FAILED: {errors[section]}", flush=True)
        extra["section_seconds"][section] = round(time.perf_counter() - t, 1)
        print(f"== {section}: {extra['section_seconds'][section]} s; report {report()}", flush=True)

    def bf16_model():
        nonlocal model
        model = model or build(config, a.dtype)
        return model

    run("forward", lambda: forward_section(bf16_model(), inputs, a))
    run("cfg", lambda: cfg_section(bf16_model(), a))
    model = None  # the bfloat16 model goes before any other is built
    gc.collect()
    mx.clear_cache()
    run("quant", lambda: quant_section(config, inputs, a))

    def peers():
        r, e, extra["peers"] = peers_section(a)
        return r, e

    run("peers", peers)

    print_results(results)
    print("\nspeed-up of each technique over its own baseline (seconds off / seconds on):")
    for field, s in speedups(results).items():
        print(
            f"  {field:40s} x{s['speedup']:6.3f}   {s['off']} {s['off_s'] * 1e3:.2f} ms -> {s['on']} {s['on_s'] * 1e3:.2f} ms"
        )
    for k, e in errors.items():
        print(f"  ERROR {k}: {e}")
    print(f"total {time.perf_counter() - t_all:.1f} s; wrote {report()}", flush=True)


if __name__ == "__main__":
    main()
