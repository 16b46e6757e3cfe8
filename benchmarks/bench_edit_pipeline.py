"""A whole Qwen-Image-Edit-2509 edit end to end, qwen_nb's `QwenImageEditPipeline` against diffusers'
`QwenImageEditPlusPipeline` on the same device.

Full-size models with random weights built lazily in bfloat16 (the 20B transformer, Qwen2.5-VL-7B's language model
and its 32-block vision tower, the VAE): a 1024x1024 edit of one and of two 1024x1024 pictures, 20 steps with true
CFG (scale 4, negative prompt " "): the prompt encoded with the pictures (processor, vision tower, language model),
the pictures' VAE encoding, every step, the decode, and the peak memory. Each framework runs in its own subprocess;
each variant first runs a 2-step warm-up edit, then the timed one with another prompt.

    python benchmarks/bench_edit_pipeline.py [--tiny] [--steps 20] [--no-peer] [--peer-python PY] [--name N]

qwen_nb runs in each of --modes (MODES: default "sequenced,resident"): sequenced (the default: the text encoder and
vision tower freed before the transformer's weights are read, the smallest peak), resident (every model kept, as
diffusers runs), and sequenced without the step overlap or without the pipeline's memory limit, to time what each
costs or buys. In sequenced mode each edit reads the
transformer again after encoding its prompt: that reading is `weights_s`, reported apart from `median_s` (which
counts what diffusers' call does with its weights resident). No real vocabulary can be downloaded here, so both use
the tiny test tokenizer of tests/fixtures/tiny_edit (the prompt's own tokens are fewer than the real tokenizer's;
the pictures' tokens, most of the text sequence, are the real count). Writes assets/bench/edit_pipeline.json
(+ .png, + the images); --tiny (tiny configs, 64x64 output, 3 steps: a smoke test on a CPU) writes into a
temporary folder.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline  # noqa: E402
from workers import ROOT, serve, side_by_side  # noqa: E402

PROCESSOR = ROOT / "tests" / "fixtures" / "tiny_edit" / "checkpoint" / "processor"
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 612, 613, 609, 610  # the tiny tokenizer's ids
WARMUP_PROMPT = "a warm-up edit"
PROMPT = "Put the person of picture 1 on the sign of picture 2 and turn the scene into a rainy evening."
ONE_PROMPT = "Turn the chalkboard sign into a wooden board reading 'Qwen Coffee' and make it dusk."
NEGATIVE = " "

# Qwen-Image-Edit-2509's models are Qwen-Image's (bench_pipeline.py's sizes, its vision tower included; the tower's
# other fields are the real ones by default), with the Pillow image processor's pixel bounds
FULL = {**bench_pipeline.FULL, "processor": dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)}
TINY = {**bench_pipeline.TINY, "processor": dict(min_pixels=56 * 56, max_pixels=28 * 28 * 10)}
VARIANTS = {"one picture": 1, "two pictures": 2}


def pictures(count: int) -> list:
    """`count` 1024x1024 RGB pictures, smooth with a hard-edged block each, the same for both frameworks."""
    import numpy as np
    from PIL import Image

    out = []
    for n in range(count):
        y, x = np.mgrid[0:1024, 0:1024] / 1024
        rgb = np.stack([128 + 90 * np.sin((5 + 2 * n) * x + 3 * y + k) for k in range(3)], axis=-1)
        rgb[256:512, 340 - 100 * n : 680 - 100 * n] = (200, 40 + 100 * n, 60)
        out.append(Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8)))
    return out


def prompt_for(count: int) -> str:
    return ONE_PROMPT if count == 1 else PROMPT


# ------------------------------------------------------------------------------------------------ qwen_nb worker
MODES = {  # name: the pipeline's options that differ from its defaults
    "sequenced": {},  # the default
    "resident": {"keep_text_encoder": True},
    "sequenced without overlap": {"overlap_steps": False},  # each step evaluated before the next is built
    "sequenced without memory limit": {"memory_limit_gb": None},  # MLX's own limit in place of the weights + 2 GB
}


def build_qwen_nb(sizes: dict, dtype_name: str = "bfloat16", **options):
    import mlx.core as mx

    from qwen_nb.edit import QwenImageEditPipeline
    from qwen_nb.scheduler import SchedulerConfig
    from qwen_nb.tokenizer import QwenTokenizer
    from qwen_nb.vision import ImageProcessorConfig, Qwen25VisionTransformer, QwenVLProcessor, VisionConfig

    dtype = getattr(mx, dtype_name)
    mx.random.seed(0)
    vision = VisionConfig(
        image_token_id=IMAGE_PAD, mrope_section=tuple(sizes["text"]["mrope_section"]), **{
            k: tuple(v) if isinstance(v, list) else v for k, v in sizes["vision"].items()
        }
    )  # fmt: skip

    transformer, text_encoder, vae = bench_pipeline.random_builders(sizes, dtype)

    def vision_tower():
        m = Qwen25VisionTransformer(vision)
        m.set_dtype(dtype)
        return m

    processor = QwenVLProcessor(QwenTokenizer.from_pretrained(PROCESSOR), ImageProcessorConfig(**sizes["processor"]))
    return QwenImageEditPipeline.from_components(
        processor,
        transformer,
        text_encoder,
        vae,
        vision_tower,
        SchedulerConfig(),
        kind="plus",
        vision_config=vision,
        dtype=dtype,
        verbose=False,
        **{"keep_text_encoder": False, **options},
    )


def run_qwen_nb(cfg: dict, out_dir: Path) -> dict:
    results = {}
    for mode in cfg["modes"]:
        # a CPU computes bfloat16 slowly: the tiny smoke test runs qwen_nb in float32
        pipe = build_qwen_nb(TINY if cfg["tiny"] else FULL, "float32" if cfg["tiny"] else "bfloat16", **MODES[mode])
        for label, count in VARIANTS.items():
            pics = pictures(count)
            common = dict(height=cfg["height"], width=cfg["width"], cfg_scale=cfg["cfg_scale"], progress=False)
            pipe.generate(WARMUP_PROMPT, pics, "a warm-up negative", steps=2, seed=0, **common)
            out = pipe.generate(prompt_for(count), pics, NEGATIVE, steps=cfg["steps"], seed=42, **common)
            s = pipe.last_stats
            name = f"qwen_nb {label} ({mode})"
            out.save(out_dir / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}.png")
            steps = s.step_times_s
            results[name] = {
                "median_s": s.text_s + s.image_s + sum(steps) + s.decode_s,
                "text_and_vision_s": s.text_s,
                "pictures_vae_s": s.image_s,
                "step_median_s": sorted(steps)[len(steps) // 2],
                "denoise_s": sum(steps),
                "decode_s": s.decode_s,
                "weights_s": s.load_s,
                "total_with_weights_s": s.total_s,
                "peak_gb": round(s.peak_gb, 3),
                "stage_peaks_gb": {k: round(v, 3) for k, v in s.stage_peaks_gb.items()},
                "mode": mode,
            }
        del pipe
    return results


# ------------------------------------------------------------------------------------------------ diffusers worker
def run_diffusers(cfg: dict, out_dir: Path) -> dict:
    import torch
    from diffusers import QwenImageEditPlusPipeline
    from transformers import Qwen2Tokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin
    from workers import StageClock, clock_result, flow_scheduler, random_qwen_image, stamp

    sizes = TINY if cfg["tiny"] else FULL
    ids = dict(image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD)
    ids.update(vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    transformer, vae, text_encoder, device = random_qwen_image(sizes, **ids)
    cuda = device.type == "cuda"
    check = ProcessorMixin.check_argument_for_proper_class  # no video processor without torchvision: skip its check
    ProcessorMixin.check_argument_for_proper_class = lambda self, n, a: None if a is None else check(self, n, a)
    p = sizes["processor"]
    tokenizer = Qwen2Tokenizer.from_pretrained(str(PROCESSOR))
    pixels = Qwen2VLImageProcessorPil(size={"shortest_edge": p["min_pixels"], "longest_edge": p["max_pixels"]})
    pipe = QwenImageEditPlusPipeline(
        scheduler=flow_scheduler(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        processor=Qwen2VLProcessor(image_processor=pixels, tokenizer=tokenizer, video_processor=None),
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    clock = StageClock(pipe, cuda)
    results = {}
    for label, count in VARIANTS.items():
        pics = pictures(count)

        def edit(prompt, negative, steps, seed, pics=pics):
            def call(on_step):
                with torch.no_grad():
                    return pipe(
                        image=pics,
                        prompt=prompt,
                        negative_prompt=negative,
                        true_cfg_scale=cfg["cfg_scale"],
                        height=cfg["height"],
                        width=cfg["width"],
                        num_inference_steps=steps,
                        generator=torch.Generator(device).manual_seed(seed),
                        callback_on_step_end=on_step,
                    ).images[0]

            return clock.run(call)

        edit(WARMUP_PROMPT, "a warm-up negative", 2, 0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out, t = edit(prompt_for(count), NEGATIVE, cfg["steps"], 42)
        name = f"diffusers {label}"
        out.save(out_dir / f"{name.replace(' ', '_')}.png")
        results[name] = clock_result(t, cuda, text_and_vision_s=t["text_s"], pictures_vae_s=t["before_steps_s"])
    return stamp(results, cuda)


# ------------------------------------------------------------------------------------------------ driver
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs, 64x64 output, 3 steps: a smoke test")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=4.0, help="true CFG scale")
    ap.add_argument("--peer-python", default=sys.executable, help="interpreter with torch + diffusers")
    ap.add_argument("--no-peer", action="store_true", help="qwen_nb only")
    ap.add_argument("--name", default=None)
    ap.add_argument("--modes", default="sequenced,resident", help=f"qwen_nb's, comma-separated, of {list(MODES)}")
    ap.add_argument("--timeout", type=int, default=3000, help="seconds for each framework's subprocess")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    modes = [m.strip() for m in a.modes.split(",")]
    if unknown := [m for m in modes if m not in MODES]:
        ap.error(f"unknown --modes {unknown}: choose from {list(MODES)}")
    if a.worker:
        return serve({"qwen_nb": run_qwen_nb, "diffusers": run_diffusers}, a.worker, a.config, a.out)
    from common import finish

    side = 64 if a.tiny else 1024
    cfg = dict(
        tiny=a.tiny,
        height=side,
        width=side,
        pictures="1024x1024 each",
        steps=a.steps or (3 if a.tiny else 20),
        cfg_scale=a.cfg,
        negative_prompt=NEGATIVE,
        modes=modes,
        dtype="bfloat16",
        weights="random, "
        + ("tiny configs" if a.tiny else "full-size configs (20B transformer, 7B text encoder + vision tower)"),
        tokenizer="tests/fixtures/tiny_edit processor's tokenizer (no real vocabulary can be downloaded here)",
    )
    out_dir = Path(
        os.environ.get("QWEN_NB_BENCH_OUT")
        or (tempfile.mkdtemp(prefix="bench_edit_") if a.tiny else ROOT / "assets" / "bench")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    name = a.name or ("edit_pipeline_tiny" if a.tiny else "edit_pipeline")
    images = out_dir / f"{name}_images"
    images.mkdir(exist_ok=True)
    notes = [
        "median_s = one timed edit after a 2-step warm-up: the prompt encoded with its pictures (vision tower and "
        "language model), the pictures' VAE encoding, every step, the decode; qwen_nb's weights_s (reading the "
        "transformer, again after each prompt in sequenced mode) apart, as diffusers holds every model resident.",
        "Random weights: the images are noise; they show both pipelines ran to the end.",
    ]
    ok = side_by_side(__file__, cfg, images, a, "QwenImageEditPlusPipeline", notes)
    finish(
        name, cfg, ok, notes, out_dir,
        lambda k, v: f"{k:34s} text+vision {v['text_and_vision_s']:.3f} s, pictures {v['pictures_vae_s']:.3f} s, "
        f"step {v['step_median_s']:.3f} s, decode {v['decode_s']:.3f} s, weights {v.get('weights_s', 0):.2f} s; "
        f"peak {v['peak_gb']:.2f} GB",
    )  # fmt: skip


if __name__ == "__main__":
    main()
