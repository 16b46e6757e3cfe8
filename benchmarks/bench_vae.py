"""The VAE decode, qwen_nb against diffusers' `AutoencoderKLQwenImage`, at 1024x1024 and 1328x1328.

Full config (base_dim 96, z_dim 16), random weights, bfloat16, batch 1. qwen_nb variants: the plain decode, the
decode with the nearest-x2-then-conv upsamplers written plainly (to show what the sub-pixel form is worth), and
tiled decodes (`tile=TILE` = 96 and 64 latent pixels, default exact overlap 25). Each variant's time is the
median of alternating repeats after warm-up; its peak memory is `mx.get_peak_memory()` after
`mx.reset_peak_memory()` (weights included: the whole VAE, encoder too, ~254 MB).

diffusers runs in the same process when torch, a CUDA device and diffusers import: on `cuda` in bfloat16 with the
very same weights (copied bit for bit into qwen_nb, so the outputs are compared too), decoding as the pipeline
does (`latents / (1 / std) + mean`, `vae.decode(...)[:, :, 0]`), plain and with its own tiling
(`enable_tiling()`, 256-pixel tiles, stride 192); peak memory is `torch.cuda.max_memory_allocated()` after
`reset_peak_memory_stats()`, weights included. `torch.backends.cudnn.benchmark` is on (its fastest convs).

    python benchmarks/bench_vae.py [--tiny] [--repeats 5] [--sizes 1024 1328] [--no-peer]

Writes assets/bench/vae.json (+ .png). `--tiny` is a smoke test of the script: the tiny test config (base_dim 8)
in float32 (bfloat16 convs are slow on a CPU), 128 and 192 pixels, tile 16 with overlap 8 (approximate: the exact
overlap, 25, would leave one tile), no diffusers; seconds on a CPU; writes assets/bench/vae_tiny.json.
"""

import argparse
import gc
import statistics
import time

import mlx.core as mx
import numpy as np
from common import print_table, time_variants, write_report

from qwen_nb import vae as qvae
from qwen_nb.vae import TILE, AutoencoderKLQwenImage, VAEConfig


def torch_peer(device: str):
    """torch and diffusers' VAE class when both import and `device` is there, else None."""
    try:
        import torch
        from diffusers import AutoencoderKLQwenImage as TorchVAE
    except ImportError:
        return None
    return (torch, TorchVAE) if device == "cpu" or torch.cuda.is_available() else None


def weights_from_torch(torch, vae_t) -> dict:
    """diffusers' bf16 state dict as MLX bf16 arrays, bit for bit (through int16, no float32 copy)."""
    out = {}
    for k, v in vae_t.state_dict().items():
        bits = v.detach().contiguous().view(torch.int16).cpu().numpy()
        out[k] = mx.array(bits).view(mx.bfloat16)
    return out


def time_torch(torch, fn, repeats: int, warmup: int = 2) -> dict:
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times, peak = [], 0
    for _ in range(repeats):
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        peak = max(peak, torch.cuda.max_memory_allocated() if cuda else 0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "peak_gb": round(peak / 1e9, 3),
    }


def run_diffusers(torch, vae_t, z: mx.array, config: VAEConfig, repeats: int, device: str):
    """Time diffusers' decode of the same latents as the pipeline does it, plain and tiled; return the timings
    and both images (B, H, W, 3) as float32 numpy."""
    zt = torch.from_numpy(np.array(z.astype(mx.float32))).to(device, torch.bfloat16)
    zt = zt.permute(0, 3, 1, 2)[:, :, None]  # (1, 16, 1, h, w)
    mean = torch.tensor(config.latents_mean, device=device).view(1, -1, 1, 1, 1).to(torch.bfloat16)
    inv_std = 1.0 / torch.tensor(config.latents_std, device=device).view(1, -1, 1, 1, 1).to(torch.bfloat16)

    @torch.inference_mode()
    def decode():
        return vae_t.decode(zt / inv_std + mean, return_dict=False)[0][:, :, 0]

    timed = {}
    vae_t.disable_tiling()
    timed["diffusers"] = time_torch(torch, decode, repeats)
    ref = decode().float().permute(0, 2, 3, 1).cpu().numpy()
    vae_t.enable_tiling()
    timed["diffusers tiled 256/192"] = time_torch(torch, decode, repeats)
    ref_tiled = decode().float().permute(0, 2, 3, 1).cpu().numpy()
    vae_t.disable_tiling()
    if device == "cuda":
        torch.cuda.empty_cache()
    return timed, ref, ref_tiled


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny config, small images: a CPU smoke test")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="square image sides in pixels")
    p.add_argument("--no-peer", action="store_true", help="skip diffusers even when it imports")
    p.add_argument("--peer-device", default="cuda", help="diffusers' device; cpu only to smoke-test this script")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in latent pixels (default: exact)")
    args = p.parse_args()

    config = VAEConfig.tiny() if args.tiny else VAEConfig()
    sizes = args.sizes or ([128, 192] if args.tiny else [1024, 1328])
    tiles = [16] if args.tiny else [TILE, 64]
    overlap = args.overlap if args.overlap is not None else (8 if args.tiny else config.exact_overlap)
    dtype = mx.float32 if args.tiny else mx.bfloat16
    peer = None if args.no_peer or (args.tiny and args.peer_device == "cuda") else torch_peer(args.peer_device)
    device = args.peer_device

    mx.random.seed(0)
    model = AutoencoderKLQwenImage(config)
    vae_t = None
    if peer:
        torch, TorchVAE = peer
        torch.backends.cudnn.benchmark = True
        torch.manual_seed(0)
        with torch.device(device):
            vae_t = TorchVAE(base_dim=config.base_dim, z_dim=config.z_dim).to(torch.bfloat16).eval()
        model.load_weights(list(model.sanitize(weights_from_torch(torch, vae_t)).items()), strict=True)
    else:
        model.set_dtype(dtype)  # before the first eval: the random float32 weights are never materialised
    mx.eval(model.parameters())
    plain = AutoencoderKLQwenImage(config, subpixel=False)  # the same weights, upsampling the plain way
    plain.update(model.parameters())

    results, parity = {}, {}
    for size in sizes:
        h = w = size // config.scale_factor
        z = mx.random.normal((1, h, w, config.z_dim), key=mx.random.key(size)).astype(dtype)
        mx.eval(z)

        variants = {
            f"{size} qwen_nb": lambda z=z: model.decode(z),
            f"{size} qwen_nb plain upsample": lambda z=z: plain.decode(z),
        }
        for tile in tiles:
            variants[f"{size} qwen_nb tiled {tile}"] = lambda z=z, tile=tile: model.decode(
                z, tile=tile, overlap=overlap
            )
        results.update(time_variants(variants, repeats=args.repeats))
        ours = {"plain": model.decode(z), "tiled": model.decode(z, tile=tiles[0], overlap=overlap)}
        mx.eval(ours)
        parity[size] = {
            "max_abs_tiled_vs_plain": float(mx.abs(ours["tiled"].astype(mx.float32) - ours["plain"]).max()),
        }

        if vae_t is not None:
            timed, ref, ref_tiled = run_diffusers(torch, vae_t, z, config, args.repeats, device)
            results.update({f"{size} {k}": v for k, v in timed.items()})
            diff = np.abs(np.array(ours["plain"].astype(mx.float32)) - ref)
            parity[size].update(
                max_abs_vs_diffusers=float(diff.max()),
                mean_abs_vs_diffusers=float(diff.mean()),
                max_abs_diffusers_tiled_vs_plain=float(np.abs(ref_tiled - ref).max()),
            )
        print_table({k: v for k, v in results.items() if k.startswith(f"{size} ")})
        print(size, parity[size])

    notes = (
        "Peak memory includes the resident weights (whole VAE). qwen_nb's tiled decodes with the exact overlap "
        f"({config.exact_overlap} latent pixels; this run: {overlap}) equal the plain decode to rounding; diffusers' tiling "
        "blends independently decoded tiles (mid-block attention per tile) and is approximate. "
        + ("Weights shared bit for bit with diffusers." if vae_t is not None else "diffusers not run.")
    )
    bench_config = {
        "vae": {"base_dim": config.base_dim, "z_dim": config.z_dim, "dim_mult": list(config.dim_mult)},
        "dtype": str(model.post_quant_conv.weight.dtype).replace("mlx.core.", ""),
        "batch": 1,
        "sizes": sizes,
        "tiles": tiles,
        "overlap": overlap,
        "repeats": args.repeats,
        "attn_chunk_elements": qvae.ATTN_CHUNK_ELEMENTS,
        "parity": parity,
    }
    if vae_t is not None:
        bench_config["torch"] = torch.__version__
        bench_config["peer_device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    path = write_report("vae_tiny" if args.tiny else "vae", bench_config, results, notes)
    print("wrote", path)


if __name__ == "__main__":
    main()
