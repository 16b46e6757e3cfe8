"""Where does a transformer forward's time go? Times, at full width on the current device, the pieces of one
MMDiT block (its linears alone, the attention kernel alone, the elementwise rest) and whole forwards of
`num_layers` blocks with several implementation choices. Exploration for the performance work (issue 7).

Usage: python benchmarks/probe_block.py [--side 1024] [--layers 60] [--txt 128] [--tiny]
"""

import argparse
import json
import math
import time

import mlx.core as mx
import mlx.nn as nn

from qwen_nb.switches import Switches
from qwen_nb.transformer import QwenImageTransformer, TransformerConfig


def bench(fn, reps=5, warm=2):
    for _ in range(warm):
        mx.eval(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--txt", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cases", default="", help="more (side x batch) forwards after the first, e.g. 512x1,512x2")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = TransformerConfig(num_layers=a.layers)
    dt = mx.bfloat16
    if a.tiny:
        cfg = TransformerConfig.tiny()
        dt = mx.float32
        a.side, a.txt = 128, 16
    h = w = a.side // 16
    N, L, B, D = h * w, a.txt, a.batch, cfg.dim
    print("device", mx.device_info().get("device_name"), mx.default_device(), "mlx", mx.__version__, flush=True)

    model = QwenImageTransformer(cfg)
    model.set_dtype(dt)
    mx.eval(model.parameters())
    print("params GB", sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters())) / 1e9, flush=True)
    x = mx.random.normal((B, N, cfg.in_channels)).astype(dt)
    txt = mx.random.normal((B, L, cfg.joint_attention_dim)).astype(dt)
    sigma = mx.array([0.7] * B)
    res = {}
    flops = B * (2 * 12 * D * D * a.layers * (N + L) + 4 * (N + L) ** 2 * D * a.layers)

    # pieces of one block
    blk = model.transformer_blocks[0]
    img = mx.random.normal((B, N, D)).astype(dt)
    tx = mx.random.normal((B, L, D)).astype(dt)
    hid = mx.random.normal((B, N, 4 * D)).astype(dt)
    mx.eval(img, tx, hid)

    def linears():
        at = blk.attn
        outs = [
            at.to_q(img),
            at.to_k(img),
            at.to_v(img),
            at.add_q_proj(tx),
            at.add_k_proj(tx),
            at.add_v_proj(tx),
            at.to_out[0](img),
            at.to_add_out(tx),
            blk.img_mlp.net[0].proj(img),
            blk.img_mlp.net[2](hid),
            blk.txt_mlp.net[0].proj(tx),
            blk.txt_mlp.net[2](hid[:, :L]),
        ]
        return outs

    res["block_linears_ms"] = bench(linears) * 1e3
    q = mx.random.normal((B, cfg.num_attention_heads, N + L, cfg.attention_head_dim)).astype(dt)
    mx.eval(q)
    res["block_sdpa_ms"] = bench(lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=0.088)) * 1e3
    mods = model.modulations(sigma[:1], dt)
    mx.eval(mods)
    rope = model.rope(h, w, L)
    res["block_full_ms"] = bench(lambda: blk(img, tx, mods[0][0], rope)) * 1e3
    cblk = mx.compile(lambda i, t: blk(i, t, mods[0][0], rope))
    res["block_compiled_ms"] = bench(lambda: cblk(img, tx)) * 1e3
    print(json.dumps(res), flush=True)

    # whole forwards
    def fwd():
        return model(x, txt, sigma, grid=(h, w))

    def fwd_mods():
        return model(x, txt, None, grid=(h, w), mods=mods)

    cfwd = mx.compile(lambda x_, t_: model(x_, t_, None, grid=(h, w), mods=mods))

    variants = {"default": fwd, "precomputed_mods": fwd_mods, "compiled_forward": lambda: cfwd(x, txt)}
    for name, fn in variants.items():
        s = bench(fn)
        res[f"forward_{name}_s"] = s
        print(name, round(s, 4), "s", round(flops / s / 1e12, 1), "TFLOP/s", flush=True)
    model.set_switches(Switches().only(fused_modulation=False))
    res["forward_unfused_modulation_s"] = bench(fwd)
    model.set_switches(Switches().only(qk_kernel=False))
    res["forward_no_qk_kernel_s"] = bench(fwd)
    print("no qk kernel", res["forward_no_qk_kernel_s"], flush=True)
    model.set_switches(Switches())
    for case in filter(None, a.cases.split(",")):
        side, b = map(int, case.split("x"))
        hh = ww = side // 16
        xx = mx.random.normal((b, hh * ww, cfg.in_channels)).astype(dt)
        tt = mx.random.normal((b, L, cfg.joint_attention_dim)).astype(dt)
        fl = b * (2 * 12 * D * D * a.layers * (hh * ww + L) + 4 * (hh * ww + L) ** 2 * D * a.layers)
        cf = mx.compile(lambda x_, t_, hh=hh, ww=ww: model(x_, t_, None, grid=(hh, ww), mods=mods))
        for name, fn in {
            "default": lambda: model(xx, tt, mx.array([0.7] * b), grid=(hh, ww)),
            "compiled_forward": lambda: cf(xx, tt),
        }.items():
            s_ = bench(fn)
            res[f"case_{case}_{name}_s"] = s_
            print(case, name, round(s_, 4), "s", round(fl / s_ / 1e12, 1), "TFLOP/s", flush=True)
    res["peak_gb"] = mx.get_peak_memory() / 1e9
    res.update(side=a.side, layers=a.layers, txt=L, batch=B, flops_T=flops / 1e12)
    print(json.dumps(res), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
