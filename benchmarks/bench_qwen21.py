"""Qwen-Image 2.1 end to end, qwen_nb's `QwenImage21Pipeline` against diffusers' on the same device.

Full-size models (the 32-block single-stream transformer, Qwen3-VL-8B-shaped text encoder with its vision tower, the
16x VAE) with random weights built lazily in bfloat16 (no float32 copy is ever made): a text-to-image generation and
one with a condition picture, each with the KV cache on and off, at 1024x1024 (the condition picture 1024x1024 too),
20 steps, no CFG (2.1's default). Each framework runs in its own subprocess of this script (one process tree, memory
not shared); each variant runs a 2-step warm-up generation first, then the timed one with another prompt: text
encoding, condition-picture encoding, every step, the decode, and the peak memory. qwen_nb runs its four variants
resident (every model kept, as diffusers runs and as the pipeline's plan picks on a card this large), then the two
with the cache sequenced (the text encoder freed before the transformer is read: its smallest peak; reading the
transformer again after each prompt is `weights_s`, reported apart from `median_s`).

    python benchmarks/bench_qwen21.py [--tiny] [--steps 20] [--size 1024x1024] [--cfg 4]
                                      [--peer-python /path/to/python-with-torch-and-diffusers] [--no-peer]
                                      [--attention] [--name N]

--attention times only the prefill's block-causal attention in qwen_nb, one SDPA per segment against one masked
SDPA (qwen_nb.transformer21.BlockCausal), at the full-size shapes (or tiny ones with --tiny).
--tiny: tiny configs, 64x64, 3 steps, diffusers on its CPU: a smoke test in seconds; writes into a temporary folder.
No real vocabulary can be downloaded here, so both frameworks use the tiny test tokenizer and chat template
(tests/fixtures/tiny_qwen21/pipeline/processor): the prompts' token counts differ from the real tokenizer's, the
same for both. Writes assets/bench/qwen21.json (+ .png and the images).
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workers import ROOT, serve, side_by_side  # noqa: E402

PROCESSOR = ROOT / "tests" / "fixtures" / "tiny_qwen21" / "pipeline" / "processor"
IMAGE_TOKEN_ID = 612  # <|image_pad|> of the tiny tokenizer
WARMUP_PROMPT = "a warm-up prompt"
PROMPT = (
    "A coffee shop entrance features a chalkboard sign reading 'Qwen Coffee $2 per cup', with a neon light beside "
    "it, soft morning light, Ultra HD, 4K, cinematic composition."
)
EDIT_PROMPT = "Turn the sign into a wooden board and make it dusk."
NEGATIVE = " "

# The full-size configs (diffusers' class defaults for 2.1's transformer and VAE; Qwen3-VL-8B's text encoder) and
# tiny ones with the same structure (tests/fixtures/make_qwen21_fixtures.py).
FULL = {
    "transformer": {},
    "vae": {},
    "text": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20]},
    ),
    "vision": dict(
        depth=27,
        hidden_size=1152,
        intermediate_size=4304,
        num_heads=16,
        patch_size=16,
        out_hidden_size=4096,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24],
    ),
    "processor": dict(min_pixels=256 * 256, max_pixels=4096 * 4096),
}
TINY = {
    "transformer": dict(
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        context_in_dim=48,
        axes_dims_rope=[8, 12, 12],
    ),
    "vae": dict(
        base_dim=2,
        decoder_base_dim=3,
        z_dim=16,
        num_res_blocks=1,
        latents_mean=[0.0] * 16,
        latents_std=[1.0] * 16,
    ),
    "text": dict(
        vocab_size=640,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 3, 3]},
    ),
    "vision": dict(
        depth=3,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        patch_size=16,
        out_hidden_size=48,
        num_position_embeddings=36,
        deepstack_visual_indexes=[0, 2],
    ),
    "processor": dict(min_pixels=32 * 32, max_pixels=256 * 256),
}
VARIANTS = [("t2i", False), ("t2i", True), ("condition", False), ("condition", True)]


def condition_picture(size: int):
    """A smooth RGB picture of size x size with hard-edged blocks, the same for both frameworks."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([128 + 90 * np.sin(7 * x + 3 * y + k) for k in range(3)], axis=-1)
    rgb[size // 4 : size // 2, size // 3 : 2 * size // 3] = (200, 40, 60)
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))


def sigmas(steps: int) -> list:
    return [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]  # linspace(1, 1/steps, steps)


# ------------------------------------------------------------------------------------------------ qwen_nb worker
def build_qwen_nb(sizes: dict, dtype, keep_text_encoder: bool = True):
    import mlx.core as mx

    from qwen_nb.pipeline21 import FLOW_MATCH_DEFAULTS, QwenImage21Pipeline
    from qwen_nb.qwen3_vl import (
        Qwen3VLConfig,
        Qwen3VLProcessor,
        Qwen3VLTextConfig,
        Qwen3VLTextEncoder,
        Qwen3VLVisionConfig,
    )
    from qwen_nb.scheduler import SchedulerConfig
    from qwen_nb.transformer21 import QwenImage21Transformer, Transformer21Config
    from qwen_nb.vae21 import AutoencoderKLQwenImage21, VAE21Config
    from qwen_nb.vision import ImageProcessorConfig

    mx.random.seed(0)

    def transformer():  # random weights, cast before anything is evaluated: built again if the pipeline frees it
        m = QwenImage21Transformer(Transformer21Config(**sizes["transformer"]))
        m.set_dtype(dtype)
        return m

    def text_encoder():
        t = dict(sizes["text"])
        rope = t.pop("rope_parameters")
        text = Qwen3VLTextConfig(rope_theta=rope["rope_theta"], mrope_section=tuple(rope["mrope_section"]), **t)
        m = Qwen3VLTextEncoder(Qwen3VLConfig(text, Qwen3VLVisionConfig(**sizes["vision"]), IMAGE_TOKEN_ID))
        m.set_dtype(dtype)
        return m

    def vae():
        m = AutoencoderKLQwenImage21(VAE21Config(**sizes["vae"]))
        m.set_dtype(dtype)
        return m

    tiny = Qwen3VLProcessor.from_pretrained(PROCESSOR)
    images = ImageProcessorConfig(patch_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, **sizes["processor"])
    processor = Qwen3VLProcessor(tiny.tokenizer, images, tiny.chat_template)
    scheduler = SchedulerConfig.from_dict({**FLOW_MATCH_DEFAULTS, "use_dynamic_shifting": True})
    return QwenImage21Pipeline.from_components(
        processor,
        transformer,
        text_encoder,
        vae,
        scheduler,
        dtype=dtype,
        keep_text_encoder=keep_text_encoder,
        verbose=False,
    )


def run_qwen_nb(cfg: dict, out_dir: Path) -> dict:
    import mlx.core as mx

    picture = condition_picture(cfg["width"])
    results = {}
    # resident (every model kept, as diffusers runs and as the default plan picks on a large card), then sequenced
    # (the text encoder freed before the transformer is read: the smallest peak) with the cache, 2.1's default
    runs = [(True, kind, cache) for kind, cache in VARIANTS] + [(False, kind, True) for kind in ("t2i", "condition")]
    pipe = None
    for keep, kind, cache in runs:
        if pipe is None or pipe.keep_text_encoder != keep:
            pipe = None
            pipe = build_qwen_nb(TINY if cfg["tiny"] else FULL, mx.bfloat16, keep)
        image = picture if kind == "condition" else None
        prompt = EDIT_PROMPT if image is not None else PROMPT
        negative = NEGATIVE if cfg["cfg_scale"] > 1 else None
        common = dict(
            height=cfg["height"],
            width=cfg["width"],
            cfg_scale=cfg["cfg_scale"],
            image=image,
            use_kv_cache=cache,
            output_resolution=cfg["width"],
            progress=False,
        )
        pipe.generate(WARMUP_PROMPT, negative, sigmas=sigmas(2), seed=0, **common)
        pipe._cache.clear()  # the timed run encodes its prompt, as diffusers' does
        out = pipe.generate(prompt, negative, sigmas=sigmas(cfg["steps"]), seed=42, **common)
        s = pipe.last_stats
        name = f"qwen_nb {kind} kv={'on' if cache else 'off'}" + ("" if keep else " sequenced")
        out.save(out_dir / f"{name.replace(' ', '_').replace('=', '')}.png")
        steps = s.step_times_s
        results[name] = {
            "median_s": s.text_s + s.image_s + sum(steps) + s.decode_s,
            "text_s": s.text_s,
            "picture_and_weights_s": s.image_s + s.load_s,
            "picture_s": s.image_s,
            "weights_s": s.load_s,
            "mode": "resident" if keep else "sequenced",
            "first_step_s": steps[0],
            "later_step_median_s": sorted(steps[1:])[len(steps[1:]) // 2] if len(steps) > 1 else None,
            "denoise_s": sum(steps),
            "decode_s": s.decode_s,
            "peak_gb": round(s.peak_gb, 3),
            "text_tokens": int(pipe.encode(prompt, pipe.condition_pictures(image, cfg["width"])[1])[0].shape[1]),
        }
    return results


def run_attention(cfg: dict) -> dict:
    """The prefill's block-causal attention alone, segments against one masked SDPA, on this device."""
    import mlx.core as mx
    import numpy as np

    from qwen_nb.timing import time_variants
    from qwen_nb.transformer21 import BlockCausal, make_layout

    heads, head_dim = (2, 128) if cfg["tiny"] else (32, 128)
    g = cfg["width"] // 16
    text, slots = 200, g * g // 4
    results = {}
    for label, with_picture in (("t2i", False), ("condition", True)):
        mask = np.zeros(text + (slots if with_picture else 0), bool)
        if with_picture:
            mask[20 : 20 + slots] = True
        shapes = ([(1, g, g)] if with_picture else []) + [(1, g, g)]
        layout = make_layout(np.concatenate([mask, np.ones(slots, bool)]), shapes, (16, 56, 56))
        S = layout.length
        q, k, v = (mx.random.normal((1, heads, S, head_dim)).astype(mx.bfloat16) for _ in range(3))
        variants = {f"{label} {mode} (S={S})": BlockCausal(layout, mode) for mode in ("segments", "mask")}
        timed = time_variants(
            {n: (lambda a=a, q=q, k=k, v=v: a(q, k, v, head_dim**-0.5)) for n, a in variants.items()}, repeats=5
        )
        a, b = (np.array(fn(q, k, v, head_dim**-0.5).astype(mx.float32)) for fn in variants.values())
        for name in timed:
            timed[name]["max_diff_vs_other"] = float(np.abs(a - b).max())
        results.update(timed)
    return results


# ------------------------------------------------------------------------------------------------ diffusers worker
def run_diffusers(cfg: dict, out_dir: Path) -> dict:
    import torch
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin
    from workers import StageClock, clock_result, stamp

    sizes = TINY if cfg["tiny"] else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # random init straight in bf16 on the device: no float32 copy
    with device:
        transformer = QwenImage21Transformer2DModel(**sizes["transformer"])
        vae = AutoencoderKLQwenImage21(**sizes["vae"])
        text_encoder = Qwen3VLForConditionalGeneration(
            Qwen3VLConfig(
                text_config=sizes["text"],
                vision_config=sizes["vision"],
                image_token_id=IMAGE_TOKEN_ID,
                video_token_id=613,
                vision_start_token_id=609,
                vision_end_token_id=610,
            )
        )
    torch.set_default_dtype(torch.float32)
    check = ProcessorMixin.check_argument_for_proper_class  # no video processor without torchvision: skip its check
    ProcessorMixin.check_argument_for_proper_class = lambda self, n, a: None if a is None else check(self, n, a)
    p = sizes["processor"]
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(
            patch_size=16,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            size={"shortest_edge": p["min_pixels"], "longest_edge": p["max_pixels"]},
        ),
        tokenizer=Qwen2Tokenizer.from_pretrained(str(PROCESSOR)),
        video_processor=None,
        chat_template=(PROCESSOR / "chat_template.jinja").read_text(),
    )
    pipe = QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        processor=processor,
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    clock = StageClock(pipe, cuda)
    picture = condition_picture(cfg["width"])
    results = {}
    for kind, cache in VARIANTS:
        image = picture if kind == "condition" else None
        prompt = EDIT_PROMPT if image is not None else PROMPT
        negative = NEGATIVE if cfg["cfg_scale"] > 1 else None

        def generate(prompt, steps, seed, image=image, negative=negative, cache=cache):
            def call(on_step):
                with torch.no_grad():
                    return pipe(
                        prompt=prompt,
                        image=image,
                        negative_prompt=negative,
                        true_cfg_scale=cfg["cfg_scale"],
                        height=cfg["height"],
                        width=cfg["width"],
                        sigmas=sigmas(steps),
                        generator=torch.Generator(device).manual_seed(seed),
                        callback_on_step_end=on_step,
                        output_resolution=cfg["width"],
                        use_kv_cache=cache,
                    ).images[0]

            return clock.run(call)

        generate(WARMUP_PROMPT, 2, 0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out, t = generate(prompt, cfg["steps"], 42)
        name = f"diffusers {kind} kv={'on' if cache else 'off'}"
        out.save(out_dir / f"{name.replace(' ', '_').replace('=', '')}.png")
        later = sorted(t["step_s"][1:])
        results[name] = clock_result(
            t,
            cuda,
            text_s=t["text_s"],
            picture_and_weights_s=t["before_steps_s"],
            first_step_s=t["step_s"][0],
            later_step_median_s=later[len(later) // 2] if later else None,
        )
    return stamp(results, cuda)


# ------------------------------------------------------------------------------------------------ driver
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs at 64x64, 3 steps: a smoke test in seconds")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--size", default=None, help="SIDExSIDE, square (default 1024x1024; 64x64 with --tiny)")
    ap.add_argument("--cfg", type=float, default=1.0, help="true CFG scale (2.1's default 1: no guidance)")
    ap.add_argument("--peer-python", default=sys.executable, help="interpreter with torch + diffusers")
    ap.add_argument("--no-peer", action="store_true", help="qwen_nb only")
    ap.add_argument("--attention", action="store_true", help="time the prefill attention's two forms only")
    ap.add_argument("--name", default=None)
    ap.add_argument("--timeout", type=int, default=3000)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return serve({"qwen_nb": run_qwen_nb, "diffusers": run_diffusers}, a.worker, a.config, a.out)
    from common import finish, print_table, write_report

    width, height = (int(v) for v in (a.size or ("64x64" if a.tiny else "1024x1024")).split("x"))
    if width != height:
        raise SystemExit("--size must be square: the condition picture is the output's size")
    cfg = dict(
        tiny=a.tiny,
        height=height,
        width=width,
        steps=a.steps or (3 if a.tiny else 20),
        cfg_scale=a.cfg,
        dtype="bfloat16",
        weights="random, " + ("tiny configs" if a.tiny else "full-size configs (7B transformer, 8B text encoder)"),
        tokenizer="tests/fixtures/tiny_qwen21 processor (no real vocabulary can be downloaded here)",
    )
    out_dir = Path(
        os.environ.get("QWEN_NB_BENCH_OUT")
        or (tempfile.mkdtemp(prefix="bench_qwen21_") if a.tiny else ROOT / "assets" / "bench")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.attention:
        name = a.name or ("qwen21_attention_tiny" if a.tiny else "qwen21_attention")
        results = run_attention(cfg)
        print_table(results)
        print(f"wrote {write_report(name, cfg, results, 'BlockCausal: segments vs one masked SDPA', out_dir)}")
        return
    name = a.name or ("qwen21_tiny" if a.tiny else "qwen21")
    images = out_dir / f"{name}_images"
    images.mkdir(exist_ok=True)
    notes = [
        "median_s = one timed generation after a 2-step warm-up: text encoding, the condition picture's encoding, "
        "every step, the decode; qwen_nb's weights_s (reading the transformer: again after each prompt when "
        "sequenced) apart, as diffusers holds every model resident.",
        "later_step_median_s: the steps after the first (with the KV cache the first prefills, later ones compute "
        "the target tokens alone).",
        "Random weights: the images are noise; they show both pipelines ran to the end.",
    ]
    ok = side_by_side(__file__, cfg, images, a, "QwenImage21Pipeline", notes)
    finish(
        name, cfg, ok, notes, out_dir,
        lambda k, v: f"{k:28s} text {v['text_s']:.3f} s, first step {v['first_step_s']:.3f} s, later steps "
        f"{v['later_step_median_s'] or 0:.3f} s, decode {v['decode_s']:.3f} s; peak {v['peak_gb']:.2f} GB",
    )  # fmt: skip


if __name__ == "__main__":
    main()
