"""The README's course timings are the committed reports' (`python -m qwen_nb course --report`), so a re-run that
changes them cannot leave the README behind silently."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def course_line(with_openblas: dict, without: dict) -> str:
    """The README's sentence on the course with and without OpenBLAS, from the two reports."""
    slowest = max(with_openblas["notebooks"], key=with_openblas["notebooks"].get)
    over = [n.removesuffix(".ipynb") for n, t in without["notebooks"].items() if t > 60]
    return (
        f"On this repository's 2-core Linux machine the {len(with_openblas['notebooks'])} notebooks took "
        f"{with_openblas['total_s']:.0f} s with OpenBLAS (the slowest, {slowest.removesuffix('.ipynb')}, "
        f"{with_openblas['notebooks'][slowest]:.0f} s) and {without['total_s']:.0f} s with the wheel's own BLAS "
        f"({without['total_s'] / with_openblas['total_s']:.1f}x), where {len(over)} of them "
        f"({', '.join(over)}) went over the 60 s a notebook should take"
    )


def test_readme_quotes_the_committed_course_reports():
    reports = [json.loads((ROOT / "assets" / name).read_text()) for name in REPORTS]
    assert "openblas" in reports[0]["blas"] and "no OpenBLAS" in reports[1]["blas"]
    assert set(reports[0]["notebooks"]) == set(reports[1]["notebooks"])  # the same series both ways
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert course_line(*reports) in readme, course_line(*reports)


REPORTS = ("course_times.json", "course_times_reference_blas.json")


def test_readme_quotes_the_committed_blas_report():
    """The matmul speeds the README gives for the wheel's BLAS, OpenBLAS and bfloat16 are blas_cpu.json's."""
    g = json.loads((ROOT / "assets" / "bench" / "blas_cpu.json").read_text())["gflops"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    reference, openblas = g["reference BLAS (the wheel's)"], g["OpenBLAS preloaded"]
    assert f"runs at {reference['float32']} GFLOP/s with it and at {openblas['float32']} GFLOP/s" in readme
    assert f"bfloat16 runs at {reference['bfloat16']} and {openblas['bfloat16']} GFLOP/s" in readme
    assert max(reference["bfloat16"], openblas["bfloat16"]) < openblas["float32"] / 10  # "far slower" holds


if __name__ == "__main__":  # prints the sentence to paste into the README after a new report
    print(course_line(*(json.loads((ROOT / "assets" / n).read_text()) for n in REPORTS)))


def test_readme_hero_scores_are_the_committed_ones():
    """The demo model's scores in the README's picture caption: the accepted fine-tune's 16-caption scores
    (demo_training_curves.json) and the 36-combination ones (demo_held_out_all.json, shipped and H200 model)."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    finetune = json.loads((ROOT / "assets" / "demo_training_curves.json").read_text())["finetune"]
    cfg4, cfg1 = finetune["accepted"]["pipeline_cfg4"], finetune["accepted"]["pipeline_cfg1"]
    assert f"shape right on {cfg4['shape']}/16 with CFG 4 and {cfg1['shape']}/16 with `cfg_scale=1`" in readme
    assert f"background on {cfg4['layout']}/16 with CFG 4 and {cfg1['layout']}/16 with `cfg_scale=1`" in readme
    assert f"the second time ({finetune['seconds']:.0f} s)" in readme
    assert f"`--guided-weight {finetune['args']['guided_weight']:g}`" in readme
    models = json.loads((ROOT / "assets" / "demo_held_out_all.json").read_text())["models"]
    new, old = models["CFG-aware fine-tune (assets/demo)"], models["H200 run (commit 54422d2)"]
    assert f"{new['cfg4']['shape']}/36 shapes with CFG 4 (the H200 model {old['cfg4']['shape']})" in readme
    assert f"{new['cfg1']['shape']}/36 with `cfg_scale=1` (the H200 model {old['cfg1']['shape']};" in readme
    assert f"background {new['cfg4']['layout']}/36 and {new['cfg1']['layout']}/36" in readme
    assert new["cfg4"]["shape"] > new["cfg1"]["shape"]  # "guidance now draws the shape better than no guidance"


def test_readme_shape_diagnosis_is_the_committed_one():
    """The README's account of the demo model's wrong shapes (squares, on training captions too; not the VAE) and
    of the validation-selected fine-tune, against assets/demo_shapes.json (training/shape_diagnosis.py)."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    report = json.loads((ROOT / "assets" / "demo_shapes.json").read_text())
    shipped = report["assets/demo"]
    train = shipped["training_36_cfg4"]
    squares, others = train["asked"]["square"], train["n"] - train["asked"]["square"]
    squares_wrong = sum(v for k, v in train["wrong"].items() if k.startswith("square->"))
    others_right = train["right"] - (squares - squares_wrong)
    assert f"accepts {squares - squares_wrong} of {squares} squares with CFG 4" in readme
    assert f"and {others_right} of the {others} other shapes" in readme
    assert max(train["wrong"], key=train["wrong"].get) == "square->circle"  # "read as circles"
    vae = shipped["vae_round_trip"]["square"]
    assert f"its VAE alone keeps {vae['kept']} of {vae['n']} squares" in readme
    assert all(v["kept"] == v["n"] for k, v in shipped["vae_round_trip"].items() if k != "square")
    assert "chosen on 20 other held-out captions" in readme and "never on these 16" in readme
    assert f"right on {shipped['test_16_cfg4']['right']}/16 with CFG 4" in readme  # the picture's count, again


def test_readme_h200_figures_of_2026_12_05_are_the_committed_ones():
    """The README's Qwen-Image 2.1, edit and quantized-adapter figures measured on the H200 that day, against the
    JSON reports they came from (assets/bench/*_h200.json)."""
    readme = " ".join((ROOT / "README.md").read_text().split())

    def report(name):
        data = json.loads((ROOT / "assets" / "bench" / f"{name}.json").read_text())
        assert "H200" in data["device"]
        return data["results"]

    q = report("qwen21_h200")
    s, gb = (lambda k: f"{q[k]['median_s']:.2f} s"), (lambda k: f"{q[k]['peak_gb']:.1f} GB")  # noqa: E731
    for k in ("qwen_nb t2i kv=on", "qwen_nb t2i kv=off", "qwen_nb condition kv=on", "qwen_nb condition kv=off"):
        assert s(k) in readme, k
    assert f"diffusers took {s('diffusers t2i kv=on')} with the cache and {s('diffusers t2i kv=off')} without" in readme
    assert f"{s('diffusers condition kv=on')} and {s('diffusers condition kv=off')} with a condition picture" in readme
    assert f"peaks {gb('qwen_nb t2i kv=on')} for text-to-image and {gb('qwen_nb condition kv=on')} with" in readme
    seq_t2i, seq_pic = q["qwen_nb t2i kv=on sequenced"], q["qwen_nb condition kv=on sequenced"]
    assert f"Sequenced, the default, the cached generations took {s('qwen_nb t2i kv=on sequenced')} and" in readme
    assert f"and {s('qwen_nb condition kv=on sequenced')} at peaks of {gb('qwen_nb t2i kv=on sequenced')} and" in readme
    assert f"{gb('qwen_nb condition kv=on sequenced')}." in readme
    assert max(seq_t2i["peak_gb"], seq_pic["peak_gb"]) <= 30  # the peak target, by default
    assert seq_t2i["mode"] == seq_pic["mode"] == "sequenced"
    assert seq_t2i["median_s"] < 5 and seq_pic["median_s"] < 7  # its time targets, by default too

    e = report("edit_pipeline_h200")
    one, two = e["qwen_nb one picture (sequenced)"], e["qwen_nb two pictures (sequenced)"]
    d1, d2 = e["diffusers one picture"], e["diffusers two pictures"]
    assert f"{one['median_s']:.2f} s from one picture and {two['median_s']:.2f} s from two" in readme
    assert (
        f"peak {one['peak_gb']:.1f}-{two['peak_gb']:.1f} GB; diffusers {d1['median_s']:.2f} s and {d2['median_s']:.2f} s"
        in readme
    )
    assert f"({one['step_median_s']:.3f} s against {d1['step_median_s']:.3f} s with one picture)" in readme
    assert one["median_s"] > 11 and two["median_s"] > 18 and one["peak_gb"] <= 40  # "not met; the memory one is"

    f = report("edit_floor_h200")
    r1, r2 = f["one picture"], f["two pictures"]
    assert f"{r1['step_tflop']} TFLOP from one picture and {r2['step_tflop']} TFLOP from" in readme
    assert f"attention {100 * r1['attention_share']:.1f}% and {100 * r2['attention_share']:.1f}% of it" in readme
    assert f"less than {r1['step_floor_s']:.3f} s and {r2['step_floor_s']:.3f} s, so an edit not less" in readme
    assert f"less than {r1['floor_s']:.2f} s and {r2['floor_s']:.2f} s with the measured" in readme
    over = [round(100 * (r["floor_over_target"] - 1)) for r in (r1, r2)]
    assert f"{over[0]}% and {over[1]}% above the targets" in readme and min(over) > 0
    assert f"steps run at {r1['measured_tflops']} and {r2['measured_tflops']} TFLOP/s" in readme
    ceilings = json.loads((ROOT / "assets" / "bench" / "edit_floor_h200.json").read_text())["config"]["ceilings"]
    assert f"(bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s," in readme
    assert f"`mx.fast.scaled_dot_product_attention` {ceilings['attention_tflops']:.0f} TFLOP/s)" in readme
    for label, r in f.items():  # the measured edit it is set against is the committed one
        ran = e[f"qwen_nb {label} (sequenced)"]
        assert (r["measured_s"], r["measured_step_s"]) == (round(ran["median_s"], 2), round(ran["step_median_s"], 4))

    forward = report("transformer_h200")
    merged = {8: forward["quant/int8"]["median_s"], 4: forward["quant/int4"]["median_s"]}  # a merged LoRA's step
    assert f"an 8-bit forward takes {merged[8]:.3f} s and a 4-bit one {merged[4]:.3f} s" in readme
    more = []
    for bits in (8, 4):
        r = report(f"pipeline_fast8_lora64_qquantize{bits}loraadapters_h200")["qwen_nb"]
        assert f"{r['median_s']:.2f} s at {bits} bits ({r['step_s']:.3f} s/step, peak {r['peak_gb']:.1f} GB)" in readme
        more.append(round(100 * (r["step_s"] / merged[bits] - 1)))
    assert f"{more[0]}% and {more[1]}% more a step than the quantized forward alone" in readme
    bf16 = forward["forward/optimized"]["median_s"]
    assert f"takes {merged[8] / bf16:.1f}x a bfloat16 one ({merged[8]:.3f} s against {bf16:.3f} s in the same" in readme


def test_the_edit_floor_counts_the_models_own_linears():
    """edit_floor_h200.json's TFLOP a step, counted again from the transformer block's own linear shapes (2 x in x
    out a token, each stream on its tokens; the modulation linears run once a step, not a token) and the joint
    attention (QK^T and PV: 4 S^2 x heads x head width), for both CFG passes of their own text lengths."""
    import mlx.nn as nn

    from qwen_nb.transformer import QwenImageTransformer, TransformerConfig

    config = TransformerConfig()
    block = QwenImageTransformer(TransformerConfig(num_layers=1)).transformer_blocks[0]  # lazy: nothing computed
    per_token = {"img": 0, "txt": 0}
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear) and "_mod" not in name:
            stream = "txt" if name.startswith("txt_") or "add_" in name else "img"
            per_token[stream] += 2 * m.weight.shape[0] * m.weight.shape[1]
    width = config.num_attention_heads * config.attention_head_dim
    floor = json.loads((ROOT / "assets" / "bench" / "edit_floor_h200.json").read_text())
    for r in floor["results"].values():
        n = r["image_tokens"]
        assert n == (1 + r["pictures"]) * (1024 // 16) ** 2
        flops = 0
        for L in r["text_tokens"].values():
            S = n + L
            flops += config.num_layers * (per_token["img"] * n + per_token["txt"] * L + 4 * S * S * width)
        assert abs(flops / 1e12 - r["step_tflop"]) <= 0.05, (flops / 1e12, r["step_tflop"])
