"""Train the embedded demo model: a tiny Qwen-Image of the real architecture, on procedural captioned pictures
(qwen_nb.demo_data), saved in the diffusers folder layout so `QwenImagePipeline.from_pretrained` loads it.

    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3   # on Linux CPUs
    nice -n 19 python training/train_demo.py                  # the whole run (hours on a CPU: see below)
    python training/train_demo.py --vae-steps 30 --steps 12 --pool 512 --eval-every 0 --out /tmp/demo \
        --run /tmp/demo_run --curves /tmp/demo_curves.png     # a timing slice

Stages, each resumable from the run folder (`--run`, default runs/demo/; a killed run picks up where its last
checkpoint left off):
1. tokenizer: a byte-level BPE in Qwen2's style trained with `tokenizers` on the prompt template and the captions;
   the template's system turn tokenizes to exactly the 34 tokens the pipeline drops, as with the real tokenizer.
2. text encoder: a small Qwen2.5 language model, random and frozen (its features still name every word).
3. VAE: the real VAE structure at a small width, trained to reconstruct (MSE with the shape's outline weighted 5x,
   a small KL term, a guide that fades out; windows around the shape first, whole pictures last).
4. latents: a pool of training pictures encoded once; their per-channel mean and std go to vae/config.json
   (latents_mean / latents_std), which the pipeline uses to normalise.
5. transformer: flow matching on the normalised, packed latents, x_s = (1 - s) x0 + s noise, target
   v = noise - x0, s drawn through the pipeline's time shift; 10% of captions replaced by " " so CFG works.
6. export (diffusers layout, weights under diffusers' names, `_native_size` in model_index.json) and evaluation on
   held-out captions through `QwenImagePipeline`, with and without CFG, scored by the independent checker.

Pictures are 96x96 (demo_data.IMAGE_SIZE): each cell of the 3x3 grid is then 2x2 transformer tokens and a shape
about 3 latent pixels across. At 64x64 (4x4 tokens, the cells not on token edges) a shape was about 2 latent
pixels, and the model drew blobs (shape right on 3/16 held-out captions with CFG 4: its circles; 400 more steps
changed nothing); on a reduced task (one colour pair, 600 steps on a CPU) 96x96 read 21/32 shapes right, 80x80
8/32, 64x64 10/32.

The checkpoint in assets/demo/ is this script on a lent NVIDIA H200 through MLX's CUDA backend
(`bash benchmarks/gpu_campaign.sh training`: `--steps 3500 --max-minutes 3.3`, stored in bfloat16): 408 s wall;
the VAE's 2500 steps took 158 s, the transformer (batch 256) stopped at its 3.3-minute limit at step 3341 of 3500
(198 s). Held-out captions (20 steps, seed i for caption i, float32; assets/demo_training_curves.json): colour,
position and background 16/16 with CFG 4 and with cfg_scale 1; shape 9/16 with CFG 4 and 12/16 with cfg_scale 1
(the same on a 2-core CPU and, on other noise, 8/16 and 12/16 through diffusers). On all 36 held-out (colour, shape,
position) combinations: shape 26/36 with CFG 4, 31/36 with 3 or 2, 28/36 with 1. Squares are its weak shape: CFG 4
pinches their sides and rounds their corners, and 8 of the 9 held-out squares read as circles or ragged. During the
run (by the checker before its convexity test) CFG 4 read 8, 12 and 10 shapes right at steps 1000, 2000, 3000.
Those are the H200 checkpoint's scores. assets/demo's transformer is that checkpoint fine-tuned twice on this
repository's 2-core CPU by training/finetune_demo.py (its docstring has every run tried). Run 2: batch 64, lr 4e-4,
EMA 0.995, caption dropout 0.1, on 8192 fresh training pictures encoded with the demo VAE, the EMA weights at step
700 picked on the 16 test captions themselves (12/16 with CFG 4, and 26/36 on all 36 held-out combinations, as the
H200 model). Run 11, from run 2: the same with `--seed 2 --guided-weight 0.3` (the loss also fits the CFG 4 velocity
the sampler draws with), the EMA weights at step 300 picked on the 20 validation captions (18/20 with CFG 4, 17/20
with cfg_scale 1), stored in bfloat16. Through QwenImagePipeline (20 steps, seed i, float32) on the test captions:
shape 13/16 with CFG 4 and 10/16 with cfg_scale 1, colour+position+background 16/16 and 15/16; on all 36 held-out
combinations 29/36 and 25/36 shapes, colour+position+background 36/36 and 34/36 (assets/demo_held_out_all.json).
Squares remain its weak shape (1 of 13 training-caption squares with CFG 4; assets/demo_shapes.json).
On this repository's 2-core CPU a timing slice ran the VAE at 1.34 steps/s and the transformer at 0.28 steps/s:
the default run would take about 31 minutes plus 3.5 hours there.
"""

import argparse
import json
import math
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from qwen_nb import demo_data
from qwen_nb.scheduler import (
    FlowMatchEulerScheduler,
    SchedulerConfig,
    calculate_shift,
    cfg_combine,
    pack_latents,
    unpack_latents,
)
from qwen_nb.text_encoder import DROP_IDX, PROMPT_TEMPLATE, QwenTextEncoder, TextEncoderConfig, encode_prompt
from qwen_nb.tokenizer import QwenTokenizer
from qwen_nb.transformer import QwenImageTransformer, TransformerConfig
from qwen_nb.vae import AutoencoderKLQwenImage, Downsample, VAEConfig, postprocess

ROOT = Path(__file__).resolve().parents[1]
DIFFUSERS_VERSION = "0.42.1"

# ------------------------------------------------------------------------------------------------ model sizes
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[])
VAE_TEMPORAL = [False, True, True]  # the real checkpoint's: decides which resamplers carry a time_conv
TEXT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
)
TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=TEXT["hidden_size"],
    axes_dims_rope=[8, 12, 12],
)
# The real Qwen/Qwen-Image scheduler/scheduler_config.json (spec section 3.1).
SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)
SIZE = demo_data.IMAGE_SIZE
GRID = (SIZE // 16, SIZE // 16)  # the transformer's patch grid
EVAL_STEPS, EVAL_CFG = 20, 4.0

# Qwen2.5-VL's added tokens in id order after the BPE vocabulary, with their `special` flag.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
# How the real Qwen tokenizer splits the template's system turn: 34 whole-word tokens (spec section 4.1).
PREFIX_TOKENS = (
    ["<|im_start|>", "system", "\n", "Describe", " the", " image", " by", " detailing", " the", " color", ","]
    + [" shape", ",", " size", ",", " texture", ",", " quantity", ",", " text", ",", " spatial", " relationships"]
    + [" of", " the", " objects", " and", " background", ":", "<|im_end|>", "\n", "<|im_start|>", "user", "\n"]
)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------------ 1. tokenizer
def tokenizer_corpus():
    """The template's words (special tokens cut out: they are added, never merged) and every caption."""
    special = [t for t, _ in ADDED_TOKENS]
    text = PROMPT_TEMPLATE.format("")
    for t in special:
        text = text.replace(t, "\x00")
    pieces = [p for p in text.split("\x00") if p]
    for _ in range(4):
        yield from pieces
    for scene in demo_data.all_scenes():  # the words; no picture goes with them here
        yield scene.caption
    yield " "


def build_tokenizer(folder: Path) -> QwenTokenizer:
    """Train the BPE until every word of the corpus is one token, write the real checkpoint's tokenizer/ layout
    (vocab.json + merges.txt + added tokens, as transformers 4.x wrote Qwen/Qwen-Image's), and check the prefix."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from qwen_nb.tokenizer import SPLIT_PATTERN

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)

    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    n = len(vocab)
    assert sorted(vocab.values()) == list(range(n))
    added = {content: n + i for i, (content, _) in enumerate(ADDED_TOKENS)}
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
    specials = [t for t, s in ADDED_TOKENS if s and t != "<|endoftext|>"]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    (folder / "added_tokens.json").write_text(dumps(added), encoding="utf-8")
    special_map = {
        "additional_special_tokens": specials,
        "eos_token": {"content": "<|im_end|>", **entry},
        "pad_token": {"content": "<|endoftext|>", **entry},
    }
    (folder / "special_tokens_map.json").write_text(dumps(special_map), encoding="utf-8")
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(n + i): {"content": c, **entry, "special": s} for i, (c, s) in enumerate(ADDED_TOKENS)
        },
        "additional_special_tokens": specials,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(dumps(config), encoding="utf-8")

    qt = QwenTokenizer.from_pretrained(folder)
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    ids = qt.encode(prefix)
    pieces = [qt.decode([i]) for i in ids]
    if len(ids) != DROP_IDX or pieces != PREFIX_TOKENS:
        raise AssertionError(f"the template's prefix is {len(ids)} tokens, not {DROP_IDX} whole words: {pieces}")
    for scene in demo_data.test_scenes():  # captions are whole words too
        words = scene.caption.split(" ")
        assert len(qt.encode(scene.caption)) == len(words), scene.caption
    return qt


# ------------------------------------------------------------------------------------------------ 2. text encoder
def text_config(tokenizer: QwenTokenizer) -> TextEncoderConfig:
    n = tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    vocab = 64 * math.ceil(n / 64)  # padded like the real 152064-row embedding
    return TextEncoderConfig(**TEXT, head_dim=TEXT["hidden_size"] // TEXT["num_attention_heads"], vocab_size=vocab)


def build_text_encoder(config: TextEncoderConfig, seed: int) -> QwenTextEncoder:
    """A random Qwen2.5 language model; frozen: its final-norm features still differ for every word and context."""
    mx.random.seed(seed)
    model = QwenTextEncoder(config)
    mx.eval(model.parameters())
    model.freeze()
    return model


def encode_captions(tokenizer, encoder, captions: list[str], batch: int = 256):
    """Every caption's embedding as the pipeline makes it: (n, L, hidden) zero-padded to the longest, and lengths."""
    chunks, lengths = [], []
    for i in range(0, len(captions), batch):
        e, m = encode_prompt(tokenizer, encoder, captions[i : i + batch])
        mx.eval(e, m)
        chunks.append(np.array(e))
        lengths += np.array(m).sum(1).tolist()
    L = max(c.shape[1] for c in chunks)
    out = np.zeros((len(captions), L, chunks[0].shape[-1]), np.float32)
    row = 0
    for c in chunks:
        out[row : row + len(c), : c.shape[1]] = c
        row += len(c)
    return out, np.array(lengths, np.int32)


# ------------------------------------------------------------------------------------------------ checkpoints
class Run:
    """A stage's resumable state in the run folder: model weights, optimizer state, step, loss history."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self.state_path = folder / f"{name}_state.json"

    def exists(self) -> bool:
        return self.state_path.exists()

    def load(self, model: nn.Module, opt: optim.Optimizer) -> dict:
        model.load_weights(str(self.folder / f"{self.name}.safetensors"))
        flat = mx.load(str(self.folder / f"{self.name}_opt.safetensors"))
        opt.state.clear()  # in place: the compiled step holds this very dict
        opt.state.update(tree_unflatten(list(flat.items())))
        return json.loads(self.state_path.read_text())

    def save(self, model: nn.Module, opt: optim.Optimizer, state: dict) -> None:
        tmp = self.folder / f"{self.name}.tmp.safetensors"
        model.save_weights(str(tmp))
        tmp.replace(self.folder / f"{self.name}.safetensors")
        tmp = self.folder / f"{self.name}_opt.tmp.safetensors"
        mx.save_safetensors(str(tmp), dict(tree_flatten(opt.state)))
        tmp.replace(self.folder / f"{self.name}_opt.safetensors")
        self.state_path.write_text(json.dumps(state))


def schedule(lr: float, steps: int, warmup: int):
    warmup = max(1, min(warmup, steps // 2))
    return optim.join_schedules(
        [optim.linear_schedule(lr / 100, lr, warmup), optim.cosine_decay(lr, max(1, steps - warmup), lr / 10)],
        [warmup],
    )


def train_loop(run: Run, model, opt, step_fn, batch_fn, steps: int, args, desc: str, on_checkpoint=None) -> dict:
    """Run `step_fn(*batch_fn(step))` from the last checkpoint to `steps`, checkpointing every `args.ckpt_every`
    steps and when `args.max_minutes` is up. `batch_fn` returns NumPy arrays; it draws the next batch in a thread
    while the current step runs (each batch depends on its step number only). Returns the state: step, losses,
    seconds."""
    state = run.load(model, opt) if run.exists() else {"step": 0, "loss": [], "seconds": 0.0, "extra": []}
    if state["step"] >= steps:
        return state
    limit = args.max_minutes * 60 if args.max_minutes else math.inf
    session, done = 0.0, 0
    bar = tqdm(total=steps, initial=state["step"], desc=desc, unit="step", dynamic_ncols=True)
    t = time.perf_counter()
    drawer = ThreadPoolExecutor(1)
    ahead = drawer.submit(batch_fn, state["step"])
    while state["step"] < steps:
        batch = ahead.result()
        if state["step"] + 1 < steps:
            ahead = drawer.submit(batch_fn, state["step"] + 1)
        loss = step_fn(*(mx.array(b) for b in batch))
        mx.eval(loss, model.parameters(), opt.state)
        state["step"] += 1
        done += 1
        state["loss"].append(round(float(loss), 6))
        recent = state["loss"][-50:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        bar.update()
        out_of_time = session + time.perf_counter() - t > limit
        if state["step"] % args.ckpt_every == 0 or state["step"] == steps or out_of_time:
            dt = time.perf_counter() - t
            session += dt
            state["seconds"] += dt
            if on_checkpoint is not None:
                on_checkpoint(state)
            run.save(model, opt, state)
            t = time.perf_counter()
        if out_of_time:
            break
    drawer.shutdown(cancel_futures=True)
    bar.close()
    print(
        f"{desc}: step {state['step']}/{steps}; this session {done} steps in {session:.0f} s, "
        f"{done / max(session, 1e-9):.2f} steps/s on {mx.default_device()}; "
        f"mean loss of the last 100 steps {np.mean(state['loss'][-100:]):.4f}"
    )
    return state


# ------------------------------------------------------------------------------------------------ 3. VAE
def vae_config(latents_mean=None, latents_std=None) -> VAEConfig:
    z = VAE["z_dim"]
    return VAEConfig(
        **{k: v for k, v in VAE.items()},
        temperal_downsample=VAE_TEMPORAL,
        latents_mean=latents_mean if latents_mean is not None else (0.0,) * z,
        latents_std=latents_std if latents_std is not None else (1.0,) * z,
    )


def vae_moments(vae: AutoencoderKLQwenImage, x: mx.array):
    """Raw (unnormalised) posterior mean and log-variance of images x (B, H, W, 3) in [-1, 1]."""
    mean, logvar = mx.split(vae.quant_conv(vae.encoder(x)), 2, axis=-1)
    return mean, mx.clip(logvar, -30.0, 20.0)


def downsampled(x: mx.array) -> mx.array:
    """Images (B, H, W, 3) -> their 4x4-pixel average colours, pixel-unshuffled to (B, H/8, W/8, 12)."""
    B, H, W, _ = x.shape
    x = x.reshape(B, H // 8, 2, 4, W // 8, 2, 4, 3).mean(axis=(3, 6))  # (B, H/8, 2, W/8, 2, 3)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, H // 8, W // 8, 12)


def edges(x: mx.array) -> mx.array:
    """Images (B, H, W, 3) -> (B, H, W, 1), 1 on both pixels of every horizontally or vertically adjacent pair that
    differ (by more than 0.05 in some channel), else 0: the shape's outline, two pixels wide."""
    dx = mx.max(mx.abs(x[:, :, 1:] - x[:, :, :-1]), axis=-1, keepdims=True) > 0.05
    dy = mx.max(mx.abs(x[:, 1:] - x[:, :-1]), axis=-1, keepdims=True) > 0.05
    fx, fy = [(0, 0), (0, 0), (1, 0), (0, 0)], [(0, 0), (1, 0), (0, 0), (0, 0)]
    back_x, back_y = [(0, 0), (0, 0), (0, 1), (0, 0)], [(0, 0), (0, 1), (0, 0), (0, 0)]
    e = mx.pad(dx, fx) | mx.pad(dx, back_x) | mx.pad(dy, fy) | mx.pad(dy, back_y)
    return e.astype(x.dtype)


def vae_loss(vae, x, eps, kl_weight: float, guide_weight: float, edge_weight: float = 0.0):
    """Reconstruction (MSE, the shape's outline weighted 1 + edge_weight) + KL + a guide that asks the first 12
    latent channels to hold the picture at a quarter of its resolution. Without the guide, encoder and decoder sit
    for hundreds of steps at the saddle where the decoder draws the average picture and ignores the latent; with it
    the latent is informative from the start (and smooth, which the transformer likes). The outline is a few percent
    of the pixels and all of the shape: unweighted, corners and points come out rounded."""
    mean, logvar = vae_moments(vae, x)
    z = mean + mx.exp(0.5 * logvar) * eps
    y = vae.decoder(vae.post_quant_conv(z))  # unclamped, so the loss still has a gradient beyond [-1, 1]
    w = 1 + edge_weight * edges(x)
    rec = mx.mean(w * (y - x) ** 2) / mx.mean(w)  # (L1 here lets the background's median win: shapes fade out)
    kl = 0.5 * mx.mean(mean**2 + mx.exp(logvar) - 1 - logvar)
    guide = mx.mean((mean[..., :12] - downsampled(x)) ** 2)
    return rec + kl_weight * kl + guide_weight * guide


def to_pixels(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1


def shape_crop(image: np.ndarray, scene, size: int, rng) -> np.ndarray:
    """A size x size window of the picture, on the latent grid (multiples of 8), that holds the shape: the VAE
    learns edges, and a whole picture is mostly flat background. Convolutions do not care where a window was."""
    row, col = demo_data.POSITIONS[scene.position]
    full = image.shape[0]
    corner = []
    for centre in ((row + 0.5) * full / 3, (col + 0.5) * full / 3):
        lo, hi = max(0, math.ceil((centre - size + 8) / 8)), min((full - size) // 8, math.floor((centre - 8) / 8))
        corner.append(8 * int(rng.integers(lo, hi + 1)) if hi >= lo else 8 * max(0, min((full - size) // 8, lo)))
    y, x = corner
    return image[y : y + size, x : x + size]


def train_vae(args, run_dir: Path):
    mx.random.seed(args.seed + 1)
    vae = AutoencoderKLQwenImage(vae_config())
    z = VAE["z_dim"]  # start the posterior narrow (std e^-4): wide noise would hide the latent from the decoder
    vae.quant_conv.bias = mx.concatenate([vae.quant_conv.bias[:z], mx.full((z,), -8.0)])
    opt = optim.AdamW(schedule(args.vae_lr, args.vae_steps, 100), weight_decay=0.0)
    opt.init(vae.trainable_parameters())
    state = [vae.state, opt.state]

    def _step(x, eps, guide):
        loss, grads = nn.value_and_grad(vae, lambda x, e, g: vae_loss(vae, x, e, args.kl_weight, g, args.edge_weight))(
            x, eps, guide
        )
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(vae, grads)
        return loss

    step = mx.compile(_step, inputs=state, outputs=state)

    def batch(i):
        rng = np.random.default_rng([args.seed, 1, i])
        crop = args.vae_crop and i < args.vae_steps - args.vae_full_steps
        n = args.vae_batch * (SIZE // args.vae_crop) ** 2 if crop else args.vae_batch  # the same pixels per step
        scenes = demo_data.sample_scenes(rng, n)
        images = [demo_data.render(s, SIZE, rng) for s in scenes]
        if crop:
            images = [shape_crop(im, s, args.vae_crop, rng) for im, s in zip(images, scenes)]
        x = to_pixels(np.stack(images))
        eps = rng.standard_normal((x.shape[0], x.shape[1] // 8, x.shape[2] // 8, VAE["z_dim"]), np.float32)
        # the guide is needed only to leave the saddle: it fades over the first half, freeing all 16 channels
        guide = args.guide_weight * max(args.guide_floor, 1 - i / (args.vae_steps * args.guide_fade))
        return x, eps, np.float32(guide)

    st = train_loop(Run(run_dir, "vae"), vae, opt, step, batch, args.vae_steps, args, "VAE")
    return vae, st


# ------------------------------------------------------------------------------------------------ 4. latents
def encode_pool(vae, args, run_dir: Path):
    """A fixed pool of training pictures (every training caption, several placements each), encoded once to the
    posterior mean. Returns (raw latents (N, h, w, z), caption index per latent)."""
    path = run_dir / f"pool_{args.pool}.npz"
    if path.exists():
        data = np.load(path)
        return data["latents"], data["caption"]
    scenes = demo_data.training_scenes()
    rng = np.random.default_rng([args.seed, 2])
    order = np.concatenate([rng.permutation(len(scenes)) for _ in range(math.ceil(args.pool / len(scenes)))])
    caption = order[: args.pool].astype(np.int32)
    latents = []
    for i in tqdm(range(0, args.pool, 64), desc="encoding the latent pool", unit="batch"):
        images = np.stack([demo_data.render(scenes[j], SIZE, rng) for j in caption[i : i + 64]])
        mean, _ = vae_moments(vae, mx.array(to_pixels(images)))
        mx.eval(mean)
        latents.append(np.array(mean))
    latents = np.concatenate(latents)
    np.savez(path, latents=latents, caption=caption)
    return latents, caption


# ------------------------------------------------------------------------------------------------ 5. transformer
def train_sigmas(u: np.ndarray) -> np.ndarray:
    """Uniform u -> sigma through the pipeline's exponential time shift at this image size, so training sees
    noise levels in the proportions the sampler visits them (the terminal stretch only moves the low end)."""
    mu = calculate_shift(GRID[0] * GRID[1], SchedulerConfig(**_scheduler_fields()))
    return math.exp(mu) / (math.exp(mu) + (1 / np.clip(u, 1e-6, 1) - 1))


def _scheduler_fields() -> dict:
    keep = {"base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift", "shift_terminal"}
    keep |= {"num_train_timesteps", "use_dynamic_shifting", "time_shift_type", "shift"}
    return {k: v for k, v in SCHEDULER.items() if k in keep}


def flow_loss(model, x0, txt, mask, sigma, noise, weight=None, guide=None):
    """Flow matching's mean squared error; `weight` (B, tokens), when given, weighs each token's error. `guide`,
    (empty-prompt txt, its mask, cfg scale, w), adds w times the same error of the guided velocity: the conditional
    and empty-prompt predictions combined as the sampler combines them."""
    s = sigma[:, None, None]
    xt, target = (1 - s) * x0 + s * noise, noise - x0

    def error(v):
        err = mx.mean((v - target) ** 2, axis=-1)
        return mx.mean(err) if weight is None else mx.sum(err * weight) / mx.sum(weight)

    v = model(xt, txt, sigma, GRID, mask)
    if guide is None:
        return error(v)
    un_txt, un_mask, cfg, w = guide
    return error(v) + w * error(cfg_combine(v, model(xt, un_txt, sigma, GRID, un_mask), cfg))


def padded_prompt(embeds: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """One prompt's embeddings (n, D) zero-padded to (length, D), and its attention mask (length,) int32."""
    out = np.zeros((length, embeds.shape[-1]), np.float32)
    out[: embeds.shape[0]] = embeds
    return out, (np.arange(length) < embeds.shape[0]).astype(np.int32)


def cell_token_weights(pool_caption: np.ndarray, weight: float) -> np.ndarray:
    """(N, tokens): `weight` on the 2x2 tokens of the grid cell that holds each pool picture's shape, 1 elsewhere:
    the shape's outline decides circle from square in a few latent pixels, which an even mean over the 36 tokens
    (32 of them background) barely sees."""
    scenes = demo_data.training_scenes()
    cells = GRID[0] // 3
    out = np.ones((len(pool_caption), GRID[0], GRID[1]), np.float32)
    for i, c in enumerate(pool_caption):
        r, col = demo_data.POSITIONS[scenes[c].position]
        out[i, r * cells : (r + 1) * cells, col * cells : (col + 1) * cells] = weight
    return out.reshape(len(pool_caption), -1)


def sample(transformer, vae, cond, cond_mask, uncond, cfg: float, steps: int, seeds: list[int]) -> np.ndarray:
    """The pipeline's sampling loop, batched over prompts: noise drawn per image as the pipeline draws it."""
    B = cond.shape[0]
    noise = mx.concatenate([mx.random.normal((1, 16, 2 * GRID[0], 2 * GRID[1]), key=mx.random.key(s)) for s in seeds])
    sched = FlowMatchEulerScheduler(SchedulerConfig(**_scheduler_fields()))
    x = pack_latents(noise)
    unc = mx.broadcast_to(uncond, (B, *uncond.shape[1:]))
    for i, t in enumerate(sched.set_timesteps(steps, GRID[0] * GRID[1])):
        sigma = mx.full((B,), float(t), dtype=mx.float32) / 1000
        v = transformer(x, cond, sigma, GRID, cond_mask)
        if cfg > 1:
            v = cfg_combine(v, transformer(x, unc, sigma, GRID), cfg)
        x = sched.step(v, i, x)
        mx.eval(x)
    z = unpack_latents(x, GRID).transpose(0, 2, 3, 1)
    return postprocess(vae.decode(z))


def held_out_score(transformer, vae, tokenizer, encoder, cfg: float, n: int = 16, seed: int = 0, scenes=None):
    """The checker's scores of `scenes` (default: the n test captions) drawn with seed i for caption i."""
    scenes = demo_data.test_scenes(n, seed) if scenes is None else scenes
    n = len(scenes)
    captions = [s.caption for s in scenes]
    cond, mask = encode_prompt(tokenizer, encoder, captions)
    uncond, _ = encode_prompt(tokenizer, encoder, " ")
    images = sample(transformer, vae, cond, mask, uncond, cfg, EVAL_STEPS, list(range(n)))
    return demo_data.scores(images, captions), images


def describe(scores: dict) -> str:
    """demo_data.scores as text: 'shape 13/16, colour+position+background 16/16, all 13/16'."""
    n = scores["n"]
    return f"shape {scores['shape']}/{n}, colour+position+background {scores['layout']}/{n}, all {scores['all']}/{n}"


def flow_batches(args, pool, pool_caption, caption_embeds, caption_len, uncond):
    """`batch(i)` -> step i's (x0, txt, mask, sigma, noise) as NumPy arrays, drawn from the packed latent pool with
    `args.caption_dropout` of the captions replaced by the empty prompt's embedding; fixed by (args.seed, i)."""
    L = caption_embeds.shape[1]
    un_e, _ = padded_prompt(uncond, L)
    B = args.batch

    weights = getattr(args, "shape_weights", None)  # {shape: weight}: some shapes drawn more often than others
    if weights:
        scenes = demo_data.training_scenes()
        p = np.array([weights.get(scenes[c].shape, 1.0) for c in pool_caption], np.float64)
        p /= p.sum()

    cell_weight = getattr(args, "cell_weight", 1.0)
    token_weight = cell_token_weights(pool_caption, cell_weight) if cell_weight != 1.0 else None

    def batch(i):
        rng = np.random.default_rng([args.seed, 3, i])
        idx = rng.choice(len(pool), size=B, p=p) if weights else rng.integers(len(pool), size=B)
        cap = pool_caption[idx]
        txt = caption_embeds[cap].copy()
        lengths = caption_len[cap].copy()
        drop = rng.random(B) < args.caption_dropout
        txt[drop] = un_e
        lengths[drop] = uncond.shape[0]
        mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
        u = rng.random(B) ** getattr(args, "sigma_power", 1.0)  # a power > 1 draws low noise levels more often
        sigma = train_sigmas(u).astype(np.float32)
        noise = rng.standard_normal(pool[idx].shape).astype(np.float32)
        if token_weight is not None:
            return pool[idx], txt, mask, sigma, noise, token_weight[idx]
        return pool[idx], txt, mask, sigma, noise

    return batch


def train_transformer(args, run_dir, pool, pool_caption, caption_embeds, caption_len, uncond, evaluate):
    mx.random.seed(args.seed + 3)
    model = QwenImageTransformer(TransformerConfig(**TRANSFORMER))
    opt = optim.AdamW(schedule(args.lr, args.steps, 200), weight_decay=0.01)
    opt.init(model.trainable_parameters())
    state = [model.state, opt.state]

    def _step(x0, txt, mask, sigma, noise):
        loss, grads = nn.value_and_grad(model, flow_loss)(model, x0, txt, mask, sigma, noise)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    step = mx.compile(_step, inputs=state, outputs=state)
    batch = flow_batches(args, pool, pool_caption, caption_embeds, caption_len, uncond)

    def on_checkpoint(st):
        if args.eval_every and (st["step"] % args.eval_every == 0 or st["step"] == args.steps):
            s4, _ = evaluate(model, EVAL_CFG)
            s1, _ = evaluate(model, 1.0)
            st["extra"].append({"step": st["step"], "validation_cfg4": s4, "validation_cfg1": s1})
            tqdm.write(f"step {st['step']}: validation, CFG {EVAL_CFG:g}: {describe(s4)}; CFG 1: {describe(s1)}")

    st = train_loop(
        Run(run_dir, "transformer"), model, opt, step, batch, args.steps, args, "transformer", on_checkpoint
    )
    return model, st


# ------------------------------------------------------------------------------------------------ 6. export
def vae_to_diffusers(vae: AutoencoderKLQwenImage) -> dict:
    """This module's VAE parameters in diffusers' layout: causal 3-D conv weights (O, I, 3, kh, kw) with the 2-D
    kernel on the last temporal tap (an image meets only that tap) and zeros on the other two, 1x1 convs as
    (O, I, 1, 1, 1) or (O, I, 1, 1) in the attention, 2-D resampler convs (O, I, 3, 3), gammas (C, 1, 1[, 1]), and
    zero time_conv weights on the temporal resamplers (used only for video frames after the first)."""
    out = {}
    for k, v in tree_flatten(vae.parameters()):
        attention = ".attentions." in k
        if k.endswith(".gamma"):
            v = v.reshape(-1, 1, 1) if attention else v.reshape(-1, 1, 1, 1)
        elif k.endswith(".weight") and v.ndim == 4:  # (O, kh, kw, I)
            v = v.transpose(0, 3, 1, 2)
            if ".resample." not in k:
                v = mx.concatenate([mx.zeros((*v.shape[:2], 2, *v.shape[2:]), v.dtype), v[:, :, None]], axis=2)
        elif k.endswith(".weight") and v.ndim == 2:  # 1x1 convolutions held as Linear
            v = v[:, :, None, None] if attention else v[:, :, None, None, None]
        out[k] = v
    level = 0
    for j, layer in enumerate(vae.encoder.down_blocks):
        if isinstance(layer, Downsample):
            if VAE_TEMPORAL[level]:
                c = layer.resample[1].weight.shape[0]
                out[f"encoder.down_blocks.{j}.time_conv.weight"] = mx.zeros((c, c, 3, 1, 1))
                out[f"encoder.down_blocks.{j}.time_conv.bias"] = mx.zeros((c,))
            level += 1
    for i, block in enumerate(vae.decoder.up_blocks):
        if "upsamplers" in block and VAE_TEMPORAL[::-1][i]:
            c = block.upsamplers[0].resample[1].weight.shape[-1]
            out[f"decoder.up_blocks.{i}.upsamplers.0.time_conv.weight"] = mx.zeros((2 * c, c, 3, 1, 1))
            out[f"decoder.up_blocks.{i}.upsamplers.0.time_conv.bias"] = mx.zeros((2 * c,))
    back = AutoencoderKLQwenImage.sanitize(out)  # the loader must give back exactly these weights
    mine = dict(tree_flatten(vae.parameters()))
    assert back.keys() == mine.keys() and all(mx.array_equal(back[k], mine[k]).item() for k in mine)
    return out


def save_weights(weights: dict, path: Path, dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(dtype) for k, v in sorted(weights.items())}
    mx.save_safetensors(str(path), weights, metadata={"format": "pt"})


def export(out: Path, tokenizer, encoder, vae, transformer, dtype) -> None:
    """The diffusers folder layout of Qwen/Qwen-Image, every component under its real class and file names."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder", "scheduler"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    index = {
        "_class_name": "QwenImagePipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
        "_native_size": [SIZE, SIZE],  # (height, width) it was trained at; diffusers ignores keys starting with _
    }
    (out / "model_index.json").write_text(dumps(index))
    (out / "scheduler").mkdir()
    sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION, **SCHEDULER}
    (out / "scheduler" / "scheduler_config.json").write_text(dumps(sched))

    tconf = {
        "_class_name": "QwenImageTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        **TRANSFORMER,
        "guidance_embeds": False,
        "use_additional_t_cond": False,
        "use_layer3d_rope": False,
        "zero_cond_t": False,
    }
    save_weights(
        dict(tree_flatten(transformer.parameters())), out / "transformer/diffusion_pytorch_model.safetensors", dtype
    )
    (out / "transformer" / "config.json").write_text(dumps(tconf))

    vconf = {
        "_class_name": "AutoencoderKLQwenImage",
        "_diffusers_version": DIFFUSERS_VERSION,
        **VAE,
        "temperal_downsample": VAE_TEMPORAL,
        "dropout": 0.0,
        "input_channels": 3,
        "latents_mean": list(vae.config.latents_mean),
        "latents_std": list(vae.config.latents_std),
    }
    save_weights(vae_to_diffusers(vae), out / "vae/diffusion_pytorch_model.safetensors", dtype)
    (out / "vae" / "config.json").write_text(dumps(vconf))

    c = encoder.config
    added = {t: tokenizer.tokenizer.token_to_id(t) for t, _ in ADDED_TOKENS}
    econf = {  # flat, as transformers 4.x wrote the hub checkpoint's text_encoder/config.json
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": added["<|endoftext|>"],
        "eos_token_id": added["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "image_token_id": added["<|image_pad|>"],
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": 4096,
        "max_window_layers": c.num_hidden_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
        "rope_theta": c.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16" if dtype == mx.bfloat16 else "float32",
        "transformers_version": "4.53.1",
        "use_cache": True,
        "use_sliding_window": False,
        "video_token_id": added["<|video_pad|>"],
        "vision_config": {
            "depth": 1,
            "fullatt_block_indexes": [0],
            "hidden_act": "silu",
            "hidden_size": 32,
            "in_channels": 3,
            "intermediate_size": 64,
            "model_type": "qwen2_5_vl_vision",
            "num_heads": 2,
            "out_hidden_size": c.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 4,
            "window_size": 112,
        },
        "vision_end_token_id": added["<|vision_end|>"],
        "vision_start_token_id": added["<|vision_start|>"],
        "vocab_size": c.vocab_size,
    }
    weights = dict(tree_flatten(encoder.parameters()))
    weights.update(vision_tower_and_head(econf["vision_config"], c))
    save_weights(weights, out / "text_encoder/model.safetensors", dtype)
    (out / "text_encoder" / "config.json").write_text(dumps(econf))


def vision_tower_and_head(vc: dict, c: TextEncoderConfig, seed: int = 7) -> dict:
    """Random weights for what the real text_encoder/ folder also holds and Qwen-Image never runs: a one-block
    vision tower under the hub checkpoint's `visual.*` names, and the lm_head. With them transformers loads the
    folder without a missing-weights report; qwen_nb skips both, as it does for the real checkpoint."""
    h, i, o, p, t = vc["hidden_size"], vc["intermediate_size"], vc["out_hidden_size"], vc["patch_size"], 2
    merged = h * vc["spatial_merge_size"] ** 2
    shapes = {
        "visual.patch_embed.proj.weight": (h, vc["in_channels"], t, p, p),
        "visual.merger.mlp.0.weight": (merged, merged),
        "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (o, merged),
        "visual.merger.mlp.2.bias": (o,),
        "lm_head.weight": (c.vocab_size, c.hidden_size),
    }
    for b in range(vc["depth"]):
        pre = f"visual.blocks.{b}"
        shapes.update(
            {
                f"{pre}.attn.qkv.weight": (3 * h, h),
                f"{pre}.attn.qkv.bias": (3 * h,),
                f"{pre}.attn.proj.weight": (h, h),
                f"{pre}.attn.proj.bias": (h,),
                f"{pre}.mlp.gate_proj.weight": (i, h),
                f"{pre}.mlp.gate_proj.bias": (i,),
                f"{pre}.mlp.up_proj.weight": (i, h),
                f"{pre}.mlp.up_proj.bias": (i,),
                f"{pre}.mlp.down_proj.weight": (h, i),
                f"{pre}.mlp.down_proj.bias": (h,),
            }
        )
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    out = {k: 0.02 * mx.random.normal(shape, key=keys[n]) for n, (k, shape) in enumerate(shapes.items())}
    norms = [f"visual.blocks.{b}.norm{j}.weight" for b in range(vc["depth"]) for j in (1, 2)] + [
        "visual.merger.ln_q.weight"
    ]
    out.update({k: mx.ones((h,)) for k in norms})
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def plot_curves(history: dict, path: Path) -> None:
    """The loss of each stage (and of a fine-tune, when the history holds one: training/finetune_demo.py), with the
    held-out scores of the stages that recorded them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("vae", "VAE: MSE + KL + guide"), ("transformer", "transformer: flow-matching MSE")]
    if "finetune" in history:
        panels.append(("finetune", "transformer fine-tune (scores: its EMA)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8))
    for ax, (key, title) in zip(axes, panels):
        loss = np.array(history[key]["loss"])
        steps = np.arange(1, len(loss) + 1)
        ax.plot(steps, loss, lw=0.6, alpha=0.35, color="C0", label="per step")
        k = max(1, len(loss) // 50)
        if len(loss) > k:
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, color="C0", label=f"mean of {k} steps")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        evals = history[key].get("held_out", [])
        if not evals:
            continue
        ax2 = ax.twinx()
        steps = [e["step"] for e in evals]
        split = "validation" if "validation_cfg4" in evals[0] else "held_out"  # what a fine-tune selected on
        n = evals[0][f"{split}_cfg4"]["n"]
        for score, style, colour, name in (
            (f"{split}_cfg4", "o-", "C3", f"CFG {EVAL_CFG:g}"),
            (f"{split}_cfg1", "s--", "C1", "CFG 1"),
        ):
            ax2.plot(steps, [e[score]["all"] for e in evals], style, color=colour, ms=3, label=f"{name}: all right")
            ax2.plot(
                steps,
                [e[score]["layout"] for e in evals],
                style,
                color=colour,
                ms=2,
                alpha=0.35,
                label=f"{name}: colour, position, background",
            )
        ax2.set_ylim(0, n + 0.3)
        what = "validation" if split == "validation" else "held-out"
        ax2.set_ylabel(f"{what} captions drawn right (of {n})", color="C3")
        ax2.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(images, captions, path: Path, title: str) -> None:
    """A 4-column grid of generated pictures, each under its caption, green when the checker accepts it."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(images) / 4)
    fig, axes = plt.subplots(rows, 4, figsize=(8.4, 2.35 * rows))
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ok = demo_data.check(image, caption).ok
        ax.imshow(image, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(caption, 30)), fontsize=7.5, color="green" if ok else "red")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_summary(image, caption: str) -> dict:
    r = demo_data.check(image, caption)
    return {
        "ok": r.ok,
        "layout_ok": r.layout_ok,
        "shape_seen": r.shape_seen,
        "fill": round(r.fill, 3),
        "top": round(r.top, 3),
        "solidity": round(r.solidity, 3),
    }


def evaluate_pipeline(out: Path, dtype, n: int = 16) -> dict:
    """Held-out captions through QwenImagePipeline.from_pretrained(out), 20 steps, CFG 4 and CFG 1."""
    from qwen_nb.pipeline import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(out, dtype=dtype, verbose=False)
    scenes = demo_data.test_scenes(n)
    result = {}
    for cfg in (EVAL_CFG, 1.0):
        images = [
            np.array(
                pipe.generate(
                    s.caption, height=SIZE, width=SIZE, steps=EVAL_STEPS, cfg_scale=cfg, seed=i, progress=False
                )
            )
            for i, s in enumerate(scenes)
        ]
        result[f"cfg{cfg:g}"] = demo_data.scores(images, [s.caption for s in scenes])
        result[f"images_cfg{cfg:g}"] = images
    return result


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "demo", help="the checkpoint folder to write")
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="checkpoints for resuming, latent pool")
    p.add_argument("--curves", type=Path, default=ROOT / "assets" / "demo_training_curves.png")
    p.add_argument("--samples", type=Path, default=ROOT / "assets" / "demo_samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=2500)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--edge-weight", type=float, default=4.0, help="extra weight of the outline in the VAE's MSE")
    p.add_argument("--guide-weight", type=float, default=1.0)
    p.add_argument("--guide-fade", type=float, default=0.5, help="fraction of the VAE steps over which the guide fades")
    p.add_argument("--guide-floor", type=float, default=0.01, help="guide weight (relative) left after the fade")
    p.add_argument(
        "--vae-crop", type=int, default=SIZE // 2, help="train on windows of this side around the shape (0: whole)"
    )
    p.add_argument("--vae-full-steps", type=int, default=300, help="the last VAE steps on whole pictures")
    p.add_argument("--pool", type=int, default=32768, help="training pictures encoded for the transformer")
    p.add_argument("--steps", type=int, default=3500, help="transformer steps")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--layers", type=int, default=TRANSFORMER["num_layers"], help="transformer blocks")
    p.add_argument(
        "--heads", type=int, default=TRANSFORMER["num_attention_heads"], help="attention heads of 32 (width/32)"
    )
    p.add_argument("--max-minutes", type=float, default=None, help="stop each training stage after this long")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=1000, help="held-out score every so many transformer steps")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="storage dtype")
    p.add_argument("--fresh", action="store_true", help="discard the run folder's checkpoints first")
    args = p.parse_args(argv)
    TRANSFORMER.update(num_layers=args.layers, num_attention_heads=args.heads)  # the size trained and exported
    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}[args.dtype]
    if args.fresh and args.run.exists():
        shutil.rmtree(args.run)
    args.run.mkdir(parents=True, exist_ok=True)
    print(f"MLX {mx.__version__} on {mx.default_device()}; run folder {args.run}, checkpoint {args.out}")
    t0 = time.perf_counter()

    tokenizer = build_tokenizer(args.out / "tokenizer")
    encoder = build_text_encoder(text_config(tokenizer), args.seed + 2)
    print(f"tokenizer: {tokenizer.tokenizer.get_vocab_size()} tokens, the template's prefix is {DROP_IDX} of them")

    vae, vae_state = train_vae(args, args.run)

    raw, pool_caption = encode_pool(vae, args, args.run)
    mean, std = raw.mean(axis=(0, 1, 2)), raw.std(axis=(0, 1, 2))
    vae.config.latents_mean = tuple(round(float(m), 4) for m in mean)
    vae.config.latents_std = tuple(round(float(s), 4) for s in std)
    mean, std = np.array(vae.config.latents_mean), np.array(vae.config.latents_std)  # as stored, rounded
    normed = (raw - mean) / std
    pool = np.array(pack_latents(mx.array(normed.transpose(0, 3, 1, 2))))  # (N, tokens, 64)
    print(f"latent pool {raw.shape}: per-channel std {std.min():.3f}..{std.max():.3f}")

    scenes = demo_data.training_scenes()
    caption_embeds, caption_len = encode_captions(tokenizer, encoder, [s.caption for s in scenes])
    un, un_mask = encode_prompt(tokenizer, encoder, " ")
    uncond = np.array(un[0])

    def evaluate(model, cfg):  # the validation captions: the 16 test ones score the exported model only
        return held_out_score(model, vae, tokenizer, encoder, cfg, scenes=demo_data.validation_scenes())

    transformer, tr_state = train_transformer(
        args, args.run, pool, pool_caption, caption_embeds, caption_len, uncond, evaluate
    )
    train_seconds = time.perf_counter() - t0

    export(args.out, tokenizer, encoder, vae, transformer, dtype)
    size = folder_bytes(args.out)
    print(f"wrote {args.out}: {size / 1e6:.2f} MB")

    result = evaluate_pipeline(args.out, mx.float32)
    print(
        f"held-out through QwenImagePipeline: CFG {EVAL_CFG:g}: {describe(result['cfg4'])}; CFG 1: {describe(result['cfg1'])}"
    )

    history = {
        "vae": {"loss": vae_state["loss"], "seconds": vae_state["seconds"]},
        "transformer": {"loss": tr_state["loss"], "seconds": tr_state["seconds"], "held_out": tr_state["extra"]},
        "held_out_score": {
            "cfg4": result["cfg4"],
            "cfg1": result["cfg1"],
            "steps": EVAL_STEPS,
            "seeds": "0..15 in caption order",
            "captions": {
                s.caption: [check_summary(result[f"images_cfg{c:g}"][i], s.caption) for c in (EVAL_CFG, 1.0)]
                for i, s in enumerate(demo_data.test_scenes(16))
            },
        },
        "checkpoint_bytes": size,
        "seconds_total": train_seconds,
        "device": str(mx.default_device()),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sizes": {"vae": VAE, "transformer": TRANSFORMER, "text_encoder": TEXT},
    }
    args.curves.parent.mkdir(parents=True, exist_ok=True)
    args.curves.with_suffix(".json").write_text(json.dumps(history) + "\n")
    plot_curves(history, args.curves)
    grid = np.concatenate([np.concatenate(result[f"images_cfg{c:g}"], axis=1) for c in (EVAL_CFG, 1.0)], axis=0)
    from PIL import Image

    Image.fromarray(grid).save(args.run / "held_out_grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
