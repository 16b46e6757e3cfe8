"""A whole Qwen-Image generation end to end, qwen_nb against diffusers' `QwenImagePipeline` on the same device.

Full-size models (20B transformer, Qwen2.5-VL-7B text encoder, VAE) with random weights in bfloat16; a
1024x1024, 20-step generation with true CFG (scale 4, negative prompt " "): text encoding, the denoising loop and
the VAE decode, each timed, and the peak memory. Each framework runs in its own subprocess so their memory does not
overlap; each does a 2-step warm-up generation (kernel compilation) first (qwen_nb with --fast: its N steps), then
the timed one with new prompts.

    python benchmarks/bench_pipeline.py [--tiny] [--steps 20] [--size 1024x1024] [--keep-text-encoder]
                                        [--peer-python /path/to/python-with-torch-and-diffusers] [--no-peer]
                                        [--fast 8|4] [--lora-rank 64] [--quantize 8 [--lora-adapters]] [--name N]

--fast N runs the step-distilled set-up: the Lightning schedule (base_shift = max_shift = ln 3, no terminal
stretch), N steps, CFG off (one pass a step). --lora-rank R gives both frameworks the same random LoRA of rank R
(diffusers/peft format, every attention and MLP linear of every block, written once to a temporary file) fused into
the weights: qwen_nb merges it as the transformer is built, diffusers by `fuse_lora()` then `unload_lora_weights()`.
--quantize (qwen_nb only) quantizes the transformer, the LoRA merged before quantizing or, with --lora-adapters, run
beside the quantized linears.

qwen_nb runs sequenced by default (the text encoder freed before the transformer's weights are materialised, as
the pipeline does on a machine where both do not fit); --keep-text-encoder keeps everything resident, as
diffusers does. diffusers runs when its interpreter (--peer-python, default this one) imports torch and
diffusers and has CUDA (or always with --tiny, on its CPU); it holds every model on the card (about 58 GB of
weights, vision tower and lm_head included, plus its activations: if an 80 GB card runs out of memory in the
decode, --peer-vae-tiling turns on diffusers' tiled VAE decoding). No real vocabulary can be downloaded here, so both
use the tiny test tokenizer (tests/fixtures/tiny_tokenizer): the prompt's token count differs from the real
tokenizer's, the same for both frameworks. Writes assets/bench/pipeline.json (+ .png, + the two images);
--tiny (tiny configs, 64x64, 3 steps: seconds on a CPU) writes into a temporary folder instead.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workers import ROOT, peer_available, run_worker, serve  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "tiny_tokenizer" / "json"
WARMUP_PROMPT = "a warm-up prompt"
PROMPT = (
    "A coffee shop entrance features a chalkboard sign reading 'Qwen Coffee $2 per cup', with a neon light beside "
    "it, soft morning light, Ultra HD, 4K, cinematic composition."
)
NEGATIVE = " "
CFG = 4.0

# The real configs (spec sections 1.1, 2.1, 5) and tiny ones with the same structure (tests/fixtures).
FULL = {
    "transformer": dict(
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        axes_dims_rope=[16, 56, 56],
    ),
    "text": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        mrope_section=[16, 24, 24],
    ),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
    "vae": dict(base_dim=96, num_res_blocks=2),
}
TINY = {
    "transformer": dict(
        num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=[8, 12, 12]
    ),
    "text": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=640,
        mrope_section=[2, 3, 3],
    ),
    "vision": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
    "vae": dict(base_dim=8, num_res_blocks=2),
}


# ------------------------------------------------------------------------------------------------ qwen_nb worker
def lightning_overrides() -> dict:
    import math

    return dict(base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None, time_shift_type="exponential")


def write_random_lora(path: Path, sizes: dict, rank: int) -> None:
    """A random rank-`rank` LoRA in diffusers/peft names on every attention and MLP linear of every block (bf16)."""
    import mlx.core as mx

    t = sizes["transformer"]
    D = t["num_attention_heads"] * t["attention_head_dim"]
    shapes = {f"attn.{n}": (D, D) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
    shapes.update({"attn.to_out.0": (D, D), "attn.to_add_out": (D, D)})
    for stream in ("img_mlp", "txt_mlp"):
        shapes.update({f"{stream}.net.0.proj": (4 * D, D), f"{stream}.net.2": (D, 4 * D)})
    key = mx.random.key(64)
    tensors = {}
    for i in range(t["num_layers"]):
        for name, (out, inp) in shapes.items():
            key, ka, kb = mx.random.split(key, 3)
            prefix = f"transformer.transformer_blocks.{i}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (mx.random.normal((rank, inp), key=ka) / inp**0.5).astype(mx.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (0.01 * mx.random.normal((out, rank), key=kb)).astype(mx.bfloat16)
    mx.save_safetensors(str(path), tensors, metadata={"format": "pt"})


def random_builders(sizes: dict, dtype):
    """Functions building qwen_nb's transformer, text encoder and VAE of these sizes with random weights, lazily
    and cast before anything is evaluated: no float32 copy ever exists. The pipeline calls them again when it frees
    a model and needs it back (sequenced memory); the transformer's takes `modulation` (schedule_modulation)."""
    from qwen_nb.text_encoder import QwenTextEncoder, TextEncoderConfig
    from qwen_nb.transformer import QwenImageTransformer, TransformerConfig
    from qwen_nb.vae import AutoencoderKLQwenImage, VAEConfig

    def cast(m):
        m.set_dtype(dtype)
        return m

    def transformer(modulation=True):
        return cast(QwenImageTransformer(TransformerConfig(**sizes["transformer"]), modulation=modulation))

    def text_encoder():
        t = {k: v for k, v in sizes["text"].items() if k != "mrope_section"}
        return cast(QwenTextEncoder(TextEncoderConfig(head_dim=t["hidden_size"] // t["num_attention_heads"], **t)))

    def vae():
        return cast(AutoencoderKLQwenImage(VAEConfig(**sizes["vae"])))

    return transformer, text_encoder, vae


def run_qwen_nb(cfg: dict, out_dir: Path) -> dict:
    import mlx.core as mx

    from qwen_nb.pipeline import QwenImagePipeline
    from qwen_nb.scheduler import SchedulerConfig
    from qwen_nb.tokenizer import QwenTokenizer

    sizes = TINY if cfg["tiny"] else FULL
    dtype = mx.bfloat16
    mx.random.seed(0)
    transformer, text_encoder, vae = random_builders(sizes, dtype)
    scheduler = SchedulerConfig().merged(lightning_overrides() if cfg.get("fast") else None)
    pipe = QwenImagePipeline.from_components(
        QwenTokenizer.from_pretrained(TOKENIZER),
        transformer,
        text_encoder,
        vae,
        scheduler,
        dtype=dtype,
        keep_text_encoder=cfg["keep_text_encoder"],
        vae_tile=cfg["vae_tile"],
        eval_every=cfg.get("eval_every"),
        memory_limit_gb=cfg.get("memory_limit_gb") or "auto",  # the pipeline's default unless a number is given
        quantize=cfg.get("quantize"),
        lora_adapters=bool(cfg.get("lora_adapters")),
        verbose=False,
    )
    if cfg.get("lora"):
        pipe.load_lora(cfg["lora"])
    h, w, scale = cfg["height"], cfg["width"], cfg["cfg_scale"]
    negative = NEGATIVE if scale > 1 else None
    # a Lightning run warms up on its own few steps: the modulation table (read from a whole random transformer built
    # again, with its LoRA merged and quantized) is then made once, not once for the warm-up and again
    warm = cfg["steps"] if cfg.get("fast") else 2
    pipe.generate(WARMUP_PROMPT, "a warm-up negative", h, w, steps=warm, cfg_scale=scale, seed=0, progress=False)
    image = pipe.generate(PROMPT, negative, h, w, steps=cfg["steps"], cfg_scale=scale, seed=42, progress=False)
    s = pipe.last_stats
    image.save(out_dir / "qwen_nb.png")
    denoise = sum(s.step_times_s)
    return {
        "median_s": s.text_s + denoise + s.decode_s,  # what diffusers' call does with its weights resident
        "text_s": s.text_s,
        "step_s": s.step_s,
        "step_median_s": sorted(s.step_times_s)[len(s.step_times_s) // 2],
        "denoise_s": denoise,
        "decode_s": s.decode_s,
        "weights_s": s.load_s,
        "total_with_weights_s": s.total_s,
        "peak_gb": round(s.peak_gb, 3),
        "stage_peaks_gb": {k: round(v, 3) for k, v in s.stage_peaks_gb.items()},
        "text_tokens": int(pipe.encode(PROMPT)[0].shape[1]),
        "keep_text_encoder": pipe.keep_text_encoder,
        "mode": "resident" if pipe.keep_text_encoder else "sequenced (text encoder freed before the transformer)",
        "image": "qwen_nb.png",
    }


# ------------------------------------------------------------------------------------------------ diffusers worker
def run_diffusers(cfg: dict, out_dir: Path) -> dict:
    import torch
    from diffusers import QwenImagePipeline
    from transformers import Qwen2Tokenizer
    from workers import flow_scheduler, random_qwen_image

    sizes = TINY if cfg["tiny"] else FULL
    transformer, vae, text_encoder, device = random_qwen_image(sizes)
    cuda = device.type == "cuda"
    scheduler = flow_scheduler(**(lightning_overrides() if cfg.get("fast") else {}))
    pipe = QwenImagePipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=Qwen2Tokenizer.from_pretrained(str(TOKENIZER)),
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    if cfg["peer_vae_tiling"]:
        pipe.vae.enable_tiling()
    if cfg.get("lora"):  # fused into the weights, the LoRA layers removed: no per-step cost
        pipe.load_lora_weights(cfg["lora"], adapter_name="bench")
        pipe.fuse_lora()
        pipe.unload_lora_weights()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def generate(prompt, negative, steps, seed):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            pe, pm = pipe.encode_prompt(prompt, device=device, max_sequence_length=512)
            ne, nm = pipe.encode_prompt(negative, device=device, max_sequence_length=512) if negative else (None, None)
        sync()
        t1 = time.perf_counter()
        marks = []

        def on_step(p, i, t, kw):
            sync()
            marks.append(time.perf_counter())
            return {}

        with torch.no_grad():
            image = pipe(
                prompt_embeds=pe,
                prompt_embeds_mask=pm,
                negative_prompt_embeds=ne,
                negative_prompt_embeds_mask=nm,
                true_cfg_scale=cfg["cfg_scale"],
                height=cfg["height"],
                width=cfg["width"],
                num_inference_steps=steps,
                generator=torch.Generator(device).manual_seed(seed),
                callback_on_step_end=on_step,
                output_type="pil",
            ).images[0]
        sync()
        t2 = time.perf_counter()
        steps_s = [b - a for a, b in zip([t1] + marks[:-1], marks)]
        return image, t1 - t0, steps_s, t2 - marks[-1], int(pe.shape[1])

    generate(WARMUP_PROMPT, "a warm-up negative" if cfg["cfg_scale"] > 1 else None, 2, 0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    negative = NEGATIVE if cfg["cfg_scale"] > 1 else None
    image, text_s, steps_s, decode_s, tokens = generate(PROMPT, negative, cfg["steps"], 42)
    image.save(out_dir / "diffusers.png")
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0
    import diffusers

    return {
        "median_s": text_s + sum(steps_s) + decode_s,
        "text_s": text_s,
        "step_s": sum(steps_s) / len(steps_s),
        "step_median_s": sorted(steps_s)[len(steps_s) // 2],
        "denoise_s": sum(steps_s),
        "decode_s": decode_s,
        "peak_gb": round(peak, 3),
        "peak_note": "torch.cuda.max_memory_allocated (all weights resident, vision tower and lm_head included)"
        if cuda
        else "CPU: not measured",
        "text_tokens": tokens,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "image": "diffusers.png",
    }


# ------------------------------------------------------------------------------------------------ driver
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs at 64x64, 3 steps: a smoke test in seconds")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 1024x1024; 64x64 with --tiny)")
    ap.add_argument("--keep-text-encoder", action="store_true", help="qwen_nb keeps every model resident")
    ap.add_argument("--vae-tile", type=int, default=None, help="qwen_nb decodes in latent tiles of this side")
    ap.add_argument("--eval-every", type=int, default=None, help="qwen_nb evaluates every N transformer blocks")
    ap.add_argument("--memory-limit-gb", type=float, default=None, help="qwen_nb's memory_limit_gb (default 'auto')")
    ap.add_argument("--peer-python", default=sys.executable, help="interpreter with torch + diffusers")
    ap.add_argument("--no-peer", action="store_true", help="qwen_nb only")
    ap.add_argument("--peer-vae-tiling", action="store_true", help="diffusers decodes with vae.enable_tiling()")
    ap.add_argument("--fast", type=int, choices=[8, 4], default=None, help="the Lightning schedule, N steps, CFG off")
    ap.add_argument("--lora-rank", type=int, default=None, help="a random LoRA of this rank fused in both frameworks")
    ap.add_argument("--quantize", type=int, choices=[8, 4], default=None, help="qwen_nb's transformer quantized")
    ap.add_argument("--lora-adapters", action="store_true", help="qwen_nb runs the LoRA beside quantized linears")
    ap.add_argument("--name", default=None, help="report name (default pipeline or pipeline_tiny)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return serve({"qwen_nb": run_qwen_nb, "diffusers": run_diffusers}, a.worker, a.config, a.out)
    from common import device_name, write_report

    width, height = (int(v) for v in (a.size or ("64x64" if a.tiny else "1024x1024")).split("x"))
    cfg = dict(
        tiny=a.tiny,
        height=height,
        width=width,
        steps=a.steps or a.fast or (3 if a.tiny else 20),
        cfg_scale=1.0 if a.fast else CFG,
        negative_prompt=None if a.fast else NEGATIVE,
        fast=a.fast,
        lora_rank=a.lora_rank,
        quantize=a.quantize,
        lora_adapters=a.lora_adapters,
        dtype="bfloat16",
        keep_text_encoder=True if a.keep_text_encoder else False,
        vae_tile=a.vae_tile,
        eval_every=a.eval_every,
        memory_limit_gb=a.memory_limit_gb,
        peer_vae_tiling=a.peer_vae_tiling,
        weights="random, " + ("tiny configs" if a.tiny else "full-size configs (20B transformer, 7B text encoder)"),
        tokenizer="tests/fixtures/tiny_tokenizer (no real vocabulary can be downloaded here)",
    )
    if os.environ.get("QWEN_NB_BENCH_OUT"):
        out_dir = Path(os.environ["QWEN_NB_BENCH_OUT"])
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="bench_pipeline_")) if a.tiny else ROOT / "assets" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = a.name or ("pipeline_tiny" if a.tiny else "pipeline")
    images = out_dir / f"{name}_images"
    images.mkdir(exist_ok=True)
    if a.lora_rank:
        cfg["lora"] = str(Path(tempfile.mkdtemp(prefix="bench_lora_")) / "lora.safetensors")
        write_random_lora(Path(cfg["lora"]), TINY if a.tiny else FULL, a.lora_rank)

    results = {"qwen_nb": run_worker(__file__, sys.executable, "qwen_nb", cfg, images, a.timeout)}
    if a.quantize:
        a.no_peer = True  # diffusers has no comparable quantization here: qwen_nb alone
    notes = [
        "median_s = text encoding + denoising loop + VAE decode of one timed generation after a warm-up (2 steps; a "
        "Lightning run its own steps) "
        "(weights resident for diffusers; for qwen_nb its weight materialisation is weights_s, outside median_s).",
        "Random weights: the images are noise; they are saved only to show both pipelines ran to the end.",
    ]
    if not a.no_peer:
        ok, why = peer_available(a.peer_python, a.tiny)
        if ok:
            results["diffusers"] = run_worker(__file__, a.peer_python, "diffusers", cfg, images, a.timeout)
        else:
            notes.append(f"diffusers not run: {why}.")
    ok = {k: v for k, v in results.items() if "median_s" in v}
    for k, v in results.items():
        if "median_s" in v:
            print(
                f"{k:10s} total {v['median_s']:.3f} s: text {v['text_s']:.3f} s, {cfg['steps']} steps x "
                f"{v['step_s']:.3f} s, decode {v['decode_s']:.3f} s; peak {v['peak_gb']:.2f} GB"
            )
        else:
            print(f"{k:10s} {v['error'][:200]}")
    if "qwen_nb" in ok and "diffusers" in ok:
        notes.append(f"qwen_nb / diffusers time: {ok['qwen_nb']['median_s'] / ok['diffusers']['median_s']:.3f}")
    notes += [f"{k} failed: {v['error']}" for k, v in results.items() if k not in ok]
    if not ok:
        raise SystemExit("no framework finished: nothing written")
    path = write_report(name, cfg, ok, " ".join(notes), out_dir=out_dir)
    print(f"wrote {path} on {device_name()}")


if __name__ == "__main__":
    main()
