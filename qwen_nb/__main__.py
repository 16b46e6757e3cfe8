"""Command line: `python -m qwen_nb generate --prompt "..." --out image.png` (also installed as `qwen-nb`).

Each subcommand is a function `add_<name>(subparsers)` that registers its parser and sets `func`; `main` dispatches.
Errors a user can fix (a size, a missing file, memory) print one message and exit with status 2, no traceback.
On Linux the command restarts itself once with OpenBLAS preloaded when it is installed (qwen_nb.blas).
"""

import argparse
import math
import os
import sys
from pathlib import Path

from . import blas

DEFAULT_MODEL = "Qwen/Qwen-Image"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class UsageError(Exception):
    """A problem with the command line; printed with a tip, exit status 2."""


def parse_size(text: str) -> tuple[int, int]:
    """'1664x928' -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size takes WIDTHxHEIGHT in pixels, e.g. 1328x1328, not {text!r}") from None
    return w, h


def parse_seed(text: str) -> int:
    from .pipeline import MAX_SEED

    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed takes a whole number from 0 to 2**64 - 1, not {text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"--seed must be from 0 to 2**64 - 1 ({MAX_SEED}), got {seed}")
    return seed


def default_model() -> str:
    return os.environ.get("QWEN_NB_WEIGHTS", "").strip() or DEFAULT_MODEL


def parse_memory_limit(text: str):
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, 'auto' or 'none', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the memory limit must be a positive number of GB, got {text}")
    return value


class Given(argparse.Action):
    """Store the value and note that the option was given (`args.given`): Qwen-Image 2.1's defaults differ."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


def parse_lora_spec(text: str) -> tuple[str, float]:
    """'FILE_OR_REPO[:SCALE]' -> (source, scale); a path that exists is taken whole, colon or not."""
    source, colon, tail = text.rpartition(":")
    if not colon or Path(text).expanduser().exists():
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lora takes FILE_OR_REPO[:SCALE] with SCALE a number (e.g. style.safetensors:0.8); in {text!r}, "
            f"{tail!r} is not a number"
        ) from None
    if not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"--lora {text}: the scale must be a finite number (e.g. 0.8), got {tail}")
    if not source:
        raise argparse.ArgumentTypeError(f"--lora {text}: name the LoRA before the scale, e.g. style.safetensors:0.8")
    return source, scale


def add_lora_options(p, lightning_help: str) -> None:
    """--fast 8|4, --lightning FILE and --lora FILE_OR_REPO[:SCALE] (repeatable): generate's and edit's."""
    p.add_argument(
        "--fast",
        type=int,
        choices=[8, 4],
        default=None,
        help="the step-distilled model: lightx2v's Lightning LoRA for 8 or 4 steps, its schedule, that many steps "
        f"and CFG off (unless --steps/--cfg are given); {lightning_help}",
    )
    p.add_argument(
        "--lightning",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --fast: the Lightning LoRA file to use instead of downloading it",
    )
    p.add_argument(
        "--lora",
        type=parse_lora_spec,
        action="append",
        default=[],
        metavar="FILE_OR_REPO[:SCALE]",
        help="a LoRA (a .safetensors file, a folder holding one, a hub repo id, or owner/name/FILE.safetensors) "
        "with its scale (default 1); repeat it to stack LoRAs; with --fast, on top of the Lightning LoRA",
    )


def lora_source(spec: str) -> tuple[str, str | None]:
    """(source, weight_name) of a --lora value: a local path, a hub repo id, or owner/name/FILE.safetensors."""
    from .hub import looks_like_repo_id
    from .lora import PICKLE_SUFFIXES

    path = Path(spec).expanduser()
    if path.exists():
        return str(path), None
    parts = spec.split("/")
    named_file = Path(spec).suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)
    if named_file and len(parts) >= 3 and looks_like_repo_id("/".join(parts[:2])):
        return "/".join(parts[:2]), "/".join(parts[2:])
    if looks_like_repo_id(spec) and not named_file:
        return spec, None
    raise UsageError(
        f"--lora {spec}: no such file or folder. Give a LoRA's .safetensors file, a folder holding one, a hub repo "
        "id (owner/name), or owner/name/FILE.safetensors for one file of a hub repo."
    )


def check_lora_options(args) -> None:
    """The LoRA options checked before any model loads: files exist, no pickle, --lightning only with --fast."""
    from .lora import PICKLE_SUFFIXES, _refuse_pickle

    if args.lightning is not None:
        if args.fast is None:
            raise UsageError("--lightning FILE names the Lightning LoRA of --fast 8|4: add --fast with its steps")
        if not args.lightning.expanduser().exists():
            raise UsageError(f"--lightning {args.lightning}: no such file")
    for spec, _ in args.lora:
        source, weight_name = lora_source(spec)
        if Path(weight_name or source).suffix.lower() in PICKLE_SUFFIXES:
            _refuse_pickle(spec)


def apply_lora_options(pipe, args) -> list[str]:
    """--fast (use_lightning), then each --lora with its scale; returns lines saying what was loaded."""
    done = []
    if args.fast is not None:
        lightning = None if args.lightning is None else args.lightning.expanduser()
        pipe.use_lightning(args.fast, lora=lightning)
        done.append(f"Lightning {args.fast} steps" + ("" if lightning is None else f" ({lightning.name})"))
    for spec, scale in args.lora:
        source, weight_name = lora_source(spec)
        try:
            pipe.load_lora(source, scale, weight_name=weight_name)
        except ValueError as e:
            hint = " (on the command line: --lora owner/name/FILE.safetensors)" if "weight_name=" in str(e) else ""
            raise ValueError(f"--lora {spec}: {e}{hint}") from None
        done.append(f"{spec}" if scale == 1 else f"{spec} x {scale:g}")
    return done


def add_generate(subparsers) -> None:
    from .pipeline import ASPECTS

    p = subparsers.add_parser(
        "generate",
        help="make one image from a prompt",
        description="Generate an image with Qwen-Image (diffusers' QwenImagePipeline semantics).",
    )
    p.add_argument("--prompt", required=True, help="what the image shows")
    p.add_argument("--out", required=True, type=Path, help="image file to write (.png, .jpg, .webp)")
    p.add_argument(
        "--model",
        default=None,
        help=f"hub id or folder (default: $QWEN_NB_WEIGHTS, else {DEFAULT_MODEL}; the embedded demo model, no "
        "download: assets/demo)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=20,
        action=Given,
        help="denoising steps (default 20, N with --fast N; the model card uses 50; Qwen-Image 2.1: its author's "
        "schedule, which diffusers keeps whatever the steps say)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--size",
        type=parse_size,
        help="WIDTHxHEIGHT, multiples of 16 (default: the checkpoint's native size: 1024x1024 for Qwen-Image)",
    )
    size.add_argument(
        "--aspect",
        choices=list(ASPECTS),
        help="a model-card preset: " + ", ".join(f"{k}={w}x{h}" for k, (w, h) in ASPECTS.items()),
    )
    p.add_argument(
        "--cfg",
        type=float,
        default=4.0,
        action=Given,
        help="true CFG scale (default 4.0; 1 with --fast and for 2.1; <= 1 turns CFG off)",
    )
    p.add_argument(
        "--image",
        type=Path,
        default=None,
        metavar="PATH",
        help="img2img: start from this picture, resized to the output size (--size; default the native size, as "
        "diffusers' QwenImageImg2ImgPipeline); with a Qwen-Image 2.1 model, a condition picture",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --image: how much of it is redrawn, in (0, 1] (default 0.6): about strength x --steps steps run",
    )
    p.add_argument(
        "--mask",
        type=Path,
        default=None,
        metavar="PATH",
        help="with --image: inpaint; a picture of the image's size, white where it is repainted, black where kept",
    )
    p.add_argument(
        "--negative", default=" ", action=Given, help="negative prompt (default ' ', the model card's; 2.1: none)"
    )
    p.add_argument(
        "--seed", type=parse_seed, default=None, help="noise seed, 0 to 2**64 - 1 (default: random, printed)"
    )
    add_lora_options(p, "downloaded once from lightx2v/Qwen-Image-Lightning (--lightning FILE: a local copy)")
    p.add_argument("--quantize", type=int, default=None, help="quantize the transformer to 8 or 4 bits")
    p.add_argument(
        "--parallel",
        choices=["cfg", "tensor"],
        default=None,
        help="under mlx.launch: cfg (the prompt's and the negative prompt's passes on two ranks) or tensor (the "
        "transformer split over the ranks); rank 0 writes --out",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="default: float32 on a CPU (bfloat16 matmuls are far slower there: assets/bench/blas_cpu.json), bfloat16 "
        "on a GPU",
    )
    p.add_argument("--keep-text-encoder", action="store_true", help="keep the text encoder resident")
    p.add_argument("--no-memory-check", action="store_true", help="load even when the memory plan says no")
    p.add_argument(
        "--memory-limit-gb",
        type=parse_memory_limit,
        default="auto",
        help="MLX's memory limit while generating: GB, 'auto' (the weights held + 2 GB; default) or 'none'",
    )
    p.add_argument("--force", action="store_true", help="overwrite --out (and its preview file) if they exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar or plan")
    p.add_argument(
        "--preview-every",
        type=int,
        default=None,
        metavar="N",
        help="every N steps, write a cheap preview of the picture so far next to --out (NAME.preview.png)",
    )
    p.set_defaults(func=run_generate)


def check_new_file(path: Path, force: bool, what: str) -> None:
    if path.exists() and not force:
        raise UsageError(f"{path} exists; nothing was written. Choose another {what}, or add --force to replace it.")


def run_generate(args) -> int:
    import mlx.core as mx

    from .pipeline21 import is_qwen21

    parallel = getattr(args, "parallel", None)
    if is_qwen21(args.model or default_model()):  # Qwen-Image 2.1: its own pipeline (run_generate21)
        if parallel is not None:
            raise UsageError("--parallel runs Qwen-Image (QwenImagePipeline); Qwen-Image 2.1 runs in one process")
        return run_generate21(args)
    main_rank = parallel is None or mx.distributed.init().rank() == 0  # the other ranks stay quiet, write nothing
    args.quiet = args.quiet or not main_rank

    from .image_input import load_pair
    from .pipeline import ASPECTS, GenerationInterrupted, QwenImagePipeline, check_size
    from .sampling import check_strength

    out = args.out.expanduser()
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--out {out} should end in one of {', '.join(IMAGE_SUFFIXES)}")
    check_new_file(out, args.force or not main_rank, "--out")
    if main_rank and not out.parent.exists():
        raise UsageError(f"the folder {out.parent} does not exist: create it first")
    size = args.size or ASPECTS.get(args.aspect)
    if size is not None:
        check_size(size[1], size[0])  # before the model loads
    if args.preview_every is not None and args.preview_every < 1:
        raise UsageError(f"--preview-every takes a number of steps >= 1, got {args.preview_every}")
    preview_path = out.with_name(out.stem + ".preview.png")
    if args.preview_every is not None:
        check_new_file(preview_path, args.force or not main_rank, "--out (the preview goes to NAME.preview.png)")
    if args.image is None and (args.strength is not None or args.mask is not None):
        raise UsageError(f"{'--strength' if args.strength is not None else '--mask'} goes with --image PATH")
    check_lora_options(args)
    given = getattr(args, "given", set())
    steps = args.steps if "steps" in given or args.fast is None else args.fast  # --fast N: N steps, CFG off
    cfg = args.cfg if "cfg" in given or args.fast is None else 1.0
    strength = 0.6 if args.strength is None else args.strength
    if args.image is not None:
        check_strength(strength, steps)
    picture, mask = load_pair(args.image, args.mask, ("--image", "--mask"))  # read and checked before the model

    model = args.model or default_model()  # offline, the hub's error names the embedded demo model
    pipe = QwenImagePipeline.from_pretrained(
        model,
        dtype=None if args.dtype is None else getattr(mx, args.dtype),
        quantize=args.quantize,
        keep_text_encoder=True if args.keep_text_encoder else None,
        check_memory=not args.no_memory_check,
        plan_size=None if size is None else (size[1], size[0]),
        verbose=not args.quiet,
        memory_limit_gb=args.memory_limit_gb,
        parallel=parallel,
    )
    loras = apply_lora_options(pipe, args)
    width, height = size if size is not None else pipe.native_size[::-1]
    try:
        image = pipe.generate(
            args.prompt,
            negative_prompt=args.negative,
            height=height,
            width=width,
            steps=steps,
            cfg_scale=cfg,
            seed=args.seed,
            image=picture,
            strength=strength,
            mask_image=mask,
            progress=not args.quiet,
            preview=None if args.preview_every is None else (lambda step, image: image.save(preview_path)),
            preview_every=args.preview_every or 1,
        )
    except GenerationInterrupted as e:
        print(f"\n{e.args[0].split(';')[0]}; nothing was written.", file=sys.stderr)
        return 130
    if not main_rank:
        return 0
    stats = pipe.last_stats
    info = None
    if out.suffix.lower() == ".png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        start = "" if picture is None else f", Image: {args.image}, Strength: {strength}"
        start += "" if mask is None else f", Mask: {args.mask}"
        start += f", LoRA: {'; '.join(loras)}" if loras else ""
        info.add_text(
            "parameters",
            f"{args.prompt}\nNegative prompt: {args.negative}\nSteps: {steps}, CFG: {cfg}, "
            f"Seed: {stats.seed}, Size: {width}x{height}{start}, Model: {model}",
        )
    if info is not None:
        image.save(out, pnginfo=info)
    else:
        image.save(out)
    run = "" if picture is None else f", {stats.steps} of {steps} steps run at strength {strength}"
    run += f", {'; '.join(loras)}" if loras else ""
    print(f"wrote {out} ({width}x{height}, seed {stats.seed}{run})")
    if args.preview_every is not None:
        print(f"previews went to {preview_path} (the last one: the guess after the last step)")
    print(f"time per step {stats.step_s:.3f} s, total {stats.total_s:.2f} s, peak memory {stats.peak_gb:.2f} GB")
    return 0


def run_generate21(args) -> int:
    """`generate` for a Qwen-Image 2.1 checkpoint: diffusers' QwenImage21Pipeline defaults (the author's schedule,
    no CFG) unless --steps / --cfg / --negative are given; --image is a condition picture; the image is RGBA."""
    import mlx.core as mx

    from .pipeline import GenerationInterrupted
    from .pipeline21 import QwenImage21Pipeline

    model = args.model or default_model()
    out = args.out.expanduser()
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--out {out} should end in one of {', '.join(IMAGE_SUFFIXES)}")
    check_new_file(out, args.force, "--out")
    if not out.parent.exists():
        raise UsageError(f"the folder {out.parent} does not exist: create it first")
    for flag, value in (
        ("--aspect", args.aspect),
        ("--strength", args.strength),
        ("--mask", args.mask),
        ("--preview-every", args.preview_every),
        ("--fast", args.fast),
        ("--lightning", args.lightning),
    ):
        if value is not None:
            raise UsageError(f"{flag} is for Qwen-Image; {model} is Qwen-Image 2.1, which has no such option")
    if args.image is not None and not args.image.expanduser().is_file():
        raise UsageError(f"--image {args.image}: no such file")
    check_lora_options(args)
    given = getattr(args, "given", set())
    steps = args.steps if "steps" in given else None
    cfg = args.cfg if "cfg" in given else 1.0
    negative = args.negative if "negative" in given or cfg > 1 else None
    width, height = args.size if args.size is not None else (None, None)
    pipe = QwenImage21Pipeline.from_pretrained(
        model,
        dtype=None if args.dtype is None else getattr(mx, args.dtype),
        quantize=args.quantize,
        keep_text_encoder=True if args.keep_text_encoder else None,
        check_memory=not args.no_memory_check,
        plan_size=None if args.size is None else (height, width),
        verbose=not args.quiet,
        memory_limit_gb=args.memory_limit_gb,
    )
    apply_lora_options(pipe, args)
    try:
        image = pipe.generate(
            args.prompt,
            negative,
            height,
            width,
            steps,
            cfg,
            seed=args.seed,
            image=None if args.image is None else args.image.expanduser(),
            progress=not args.quiet,
        )
    except GenerationInterrupted as e:
        print(f"\n{e.args[0].split(';')[0]}; nothing was written.", file=sys.stderr)
        return 130
    stats = pipe.last_stats
    width, height = image.size
    if out.suffix.lower() in (".jpg", ".jpeg"):
        image = image.convert("RGB")  # JPEG has no alpha: the RGBA picture's colour channels
    options = {}
    if out.suffix.lower() == ".png":
        from PIL.PngImagePlugin import PngInfo

        options["pnginfo"] = PngInfo()
        picture = "" if args.image is None else f", Image: {args.image}"
        options["pnginfo"].add_text(
            "parameters",
            f"{args.prompt}\nNegative prompt: {negative}\nSteps: {stats.steps}, CFG: {cfg}, Seed: {stats.seed}, "
            f"Size: {width}x{height}{picture}, Model: {model}",
        )
    image.save(out, **options)
    print(f"wrote {out} ({width}x{height} {image.mode}, seed {stats.seed}, {stats.steps} steps)")
    print(f"time per step {stats.step_s:.3f} s, total {stats.total_s:.2f} s, peak memory {stats.peak_gb:.2f} GB")
    return 0


DEFAULT_EDIT_MODEL = "Qwen/Qwen-Image-Edit-2511"


def add_edit(subparsers) -> None:
    p = subparsers.add_parser(
        "edit",
        help="edit a picture (or combine up to 3) following an instruction",
        description="Edit pictures with Qwen-Image-Edit, -2509 or -2511 (diffusers' QwenImageEditPipeline / "
        "QwenImageEditPlusPipeline semantics): the output has the last picture's aspect ratio at about 1024x1024 "
        "unless --size is given.",
    )
    p.add_argument("--image", required=True, nargs="+", type=Path, metavar="PICTURE", help="picture(s) to edit")
    p.add_argument("--prompt", required=True, help="the instruction, e.g. 'make the sky a sunset'")
    p.add_argument("--out", required=True, type=Path, help="image file to write (.png, .jpg, .webp)")
    p.add_argument(
        "--model",
        default=None,
        help=f"hub id or folder (default: $QWEN_NB_EDIT_WEIGHTS, else {DEFAULT_EDIT_MODEL}; Qwen/Qwen-Image-Edit "
        "takes one picture, -2509 and -2511 up to 3)",
    )
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20, N with --fast N)")
    p.add_argument("--size", type=parse_size, help="WIDTHxHEIGHT, multiples of 16 (default: from the last picture)")
    p.add_argument("--cfg", type=float, default=None, help="true CFG scale (default 4.0, 1 with --fast; <= 1: off)")
    p.add_argument("--negative", default=" ", help="negative prompt (default ' ')")
    p.add_argument("--seed", type=parse_seed, default=None, help="noise seed (default: random, printed)")
    add_lora_options(
        p,
        "Edit and -2509: downloaded from lightx2v/Qwen-Image-Lightning; -2511: give its file (from "
        "lightx2v/Qwen-Image-Edit-2511-Lightning) with --lightning FILE",
    )
    p.add_argument("--quantize", type=int, default=None, help="quantize the transformer to 8 or 4 bits")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: float32 on a CPU")
    p.add_argument("--keep-text-encoder", action="store_true", help="keep the text encoder resident")
    p.add_argument("--no-memory-check", action="store_true", help="load even when the memory plan says no")
    p.add_argument("--memory-limit-gb", type=parse_memory_limit, default="auto", help="GB, 'auto' (default) or 'none'")
    p.add_argument("--force", action="store_true", help="overwrite --out (and its preview file) if they exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar or plan")
    p.add_argument("--preview-every", type=int, default=None, metavar="N", help="write NAME.preview.png every N steps")
    p.set_defaults(func=run_edit)


def run_edit(args) -> int:
    import mlx.core as mx

    from .edit import QwenImageEditPipeline, read_picture
    from .pipeline import GenerationInterrupted, check_size

    out = args.out.expanduser()
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--out {out} should end in one of {', '.join(IMAGE_SUFFIXES)}")
    check_new_file(out, args.force, "--out")
    if not out.parent.exists():
        raise UsageError(f"the folder {out.parent} does not exist: create it first")
    pictures = [read_picture(path, i) for i, path in enumerate(args.image)]  # before the model loads
    if args.size is not None:
        check_size(args.size[1], args.size[0])
    if args.preview_every is not None and args.preview_every < 1:
        raise UsageError(f"--preview-every takes a number of steps >= 1, got {args.preview_every}")
    preview_path = out.with_name(out.stem + ".preview.png")
    if args.preview_every is not None:
        check_new_file(preview_path, args.force, "--out (the preview goes to NAME.preview.png)")
    check_lora_options(args)

    model = args.model or os.environ.get("QWEN_NB_EDIT_WEIGHTS", "").strip() or DEFAULT_EDIT_MODEL
    pipe = QwenImageEditPipeline.from_pretrained(
        model,
        dtype=None if args.dtype is None else getattr(mx, args.dtype),
        quantize=args.quantize,
        keep_text_encoder=True if args.keep_text_encoder else None,
        check_memory=not args.no_memory_check,
        verbose=not args.quiet,
        memory_limit_gb=args.memory_limit_gb,
    )
    if args.fast is not None and args.lightning is None and pipe.zero_cond_t:
        raise UsageError(
            f"{model} is Qwen-Image-Edit-2511, which has its own Lightning LoRAs: download one from "
            "lightx2v/Qwen-Image-Edit-2511-Lightning and give it with --lightning FILE"
        )
    apply_lora_options(pipe, args)
    width, height = args.size if args.size is not None else (None, None)
    steps = pipe.defaults["steps"] if args.steps is None else args.steps
    cfg = pipe.defaults["cfg_scale"] if args.cfg is None else args.cfg
    try:
        image = pipe.generate(
            args.prompt,
            pictures[0] if len(pictures) == 1 else pictures,  # one picture as itself (a list changes Edit's reading)
            negative_prompt=args.negative,
            height=height,
            width=width,
            steps=steps,
            cfg_scale=cfg,
            seed=args.seed,
            progress=not args.quiet,
            preview=None if args.preview_every is None else (lambda step, image: image.save(preview_path)),
            preview_every=args.preview_every or 1,
        )
    except GenerationInterrupted as e:
        print(f"\n{e.args[0].split(';')[0]}; nothing was written.", file=sys.stderr)
        return 130
    stats = pipe.last_stats
    width, height = image.size
    kwargs = {}
    if out.suffix.lower() == ".png":
        from PIL.PngImagePlugin import PngInfo

        kwargs["pnginfo"] = PngInfo()
        kwargs["pnginfo"].add_text(
            "parameters",
            f"{args.prompt}\nNegative prompt: {args.negative}\nSteps: {steps}, CFG: {cfg}, "
            f"Seed: {stats.seed}, Size: {width}x{height}, Model: {model}, Pictures: "
            + ", ".join(p.name for p in args.image),
        )
    image.save(out, **kwargs)
    print(f"wrote {out} ({width}x{height}, seed {stats.seed}, edited from {len(args.image)} picture(s))")
    print(f"time per step {stats.step_s:.3f} s, total {stats.total_s:.2f} s, peak memory {stats.peak_gb:.2f} GB")
    return 0


def add_course(subparsers) -> None:
    p = subparsers.add_parser(
        "course",
        help="run the notebook series (or some of it) top to bottom and save the outputs",
        description="Run the course notebooks in fresh kernels and save their outputs (--no-save: only run them): "
        "on the embedded demo model by default, on the real one with QWEN_NB_WEIGHTS=Qwen/Qwen-Image (or a folder).",
    )
    from .course_runner import add_arguments

    add_arguments(p)
    p.set_defaults(func=run_course)


def run_course(args) -> int:
    from .course_runner import run_from_args

    return run_from_args(args)


def add_lab(subparsers) -> None:
    p = subparsers.add_parser(
        "lab",
        help="open the notebooks in JupyterLab (with OpenBLAS preloaded in its kernels on Linux)",
        description="Start JupyterLab on the notebooks folder; extra arguments go to `jupyter lab`. On Linux its "
        "kernels get OpenBLAS preloaded when it is installed, as `course` does.",
    )
    p.add_argument("lab_args", nargs=argparse.REMAINDER, help="arguments for jupyter lab (e.g. --no-browser)")
    p.set_defaults(func=run_lab)


def run_lab(args) -> int:
    import subprocess

    from .course import NOTEBOOKS

    if not any(a.startswith("--notebook-dir") or a.startswith("--ServerApp.root_dir") for a in args.lab_args):
        args.lab_args = [f"--ServerApp.root_dir={NOTEBOOKS}", *args.lab_args]
    return subprocess.call([sys.executable, "-m", "jupyterlab", *args.lab_args], env=blas.environment())


def program_name() -> str:
    """How the user called us: `qwen-nb` (the console script) or `python -m qwen_nb`."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m qwen_nb" if name in ("", "__main__.py", "-c") else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name(), description="Qwen-Image in MLX.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    add_generate(subparsers)
    add_edit(subparsers)
    add_course(subparsers)
    add_lab(subparsers)
    return parser


def main(argv=None) -> int:
    from .hub import HubError
    from .loading import CheckpointError
    from .memory import MemoryPlanError

    if argv is None:  # a real command line: restart with OpenBLAS where that helps (it cannot be loaded later)
        blas.restart_with_openblas()
    import warnings

    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, OSError, CheckpointError, MemoryPlanError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"Tip: {program_name()} {args.command} --help lists the options.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
