"""Load the demo checkpoint with diffusers' own QwenImagePipeline and score what it draws: the proof that
assets/demo/ is a faithful diffusers folder (every tensor name and shape as diffusers builds the model).

Run with the reference environment (torch, diffusers, transformers), outside CI:
    /work/refenv/bin/python training/check_with_diffusers.py [assets/demo]
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


def load_demo_data():
    """qwen_nb.demo_data without importing qwen_nb (whose __init__ needs MLX)."""
    spec = importlib.util.spec_from_file_location("demo_data", ROOT / "qwen_nb" / "demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stored_shapes(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def main(folder: Path) -> int:
    from diffusers import QwenImagePipeline

    demo_data = load_demo_data()
    pipe = QwenImagePipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name, file in (
        ("transformer", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
    ):
        model = getattr(pipe, name)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        stored = stored_shapes(folder / name / file)
        assert stored == expected, (name, set(stored) ^ set(expected))
        print(f"{name}: all {len(stored)} tensors match diffusers' names and shapes")
    lm = {k: v for k, v in pipe.text_encoder.state_dict().items() if "visual" not in k and "lm_head" not in k}
    stored = stored_shapes(folder / "text_encoder" / "model.safetensors")
    stored = {k: v for k, v in stored.items() if "visual" not in k and "lm_head" not in k}  # as for lm
    assert len(stored) == len(lm), (len(stored), len(lm))
    prefix = pipe.prompt_template_encode.split("{}")[0]
    n = len(pipe.tokenizer(prefix)["input_ids"])
    assert n == pipe.prompt_template_encode_start_idx == 34, n
    print(f"text encoder: {len(stored)} language-model tensors; transformers' tokenizer gives the prefix {n} tokens")

    scenes = demo_data.test_scenes(16)
    for cfg in (4.0, 1.0):
        images = []
        for i, s in enumerate(scenes):
            out = pipe(
                prompt=s.caption,
                negative_prompt=" ",
                true_cfg_scale=cfg,
                height=demo_data.IMAGE_SIZE,  # the native size (model_index.json's _native_size)
                width=demo_data.IMAGE_SIZE,
                num_inference_steps=20,
                generator=torch.Generator().manual_seed(i),
            )
            images.append(np.asarray(out.images[0]))
        n = demo_data.scores(images, [s.caption for s in scenes])
        print(
            f"diffusers QwenImagePipeline, 16 held-out captions, 20 steps, true_cfg_scale {cfg:g}: shape "
            f"{n['shape']}/16, colour+position+background {n['layout']}/16, everything {n['all']}/16"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "assets" / "demo"))
