"""The whole pipeline against diffusers' QwenImagePipeline on tiny random checkpoints (tests/fixtures/tiny_pipeline,
written by tests/fixtures/make_pipeline_fixtures.py), plus the prompt cache, sequenced loading, interrupts,
quantization with save/load, and the memory plan."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import qwen_nb.memory as memory
import qwen_nb.pipeline as pipeline_module
from qwen_nb.memory import MemoryPlanError, plan_memory
from qwen_nb.pipeline import GenerationInterrupted, QwenImagePipeline
from qwen_nb.quantize import is_modulation, is_timestep_weight, quantize_transformer
from qwen_nb.switches import Switches
from qwen_nb.text_encoder import load_text_encoder
from qwen_nb.transformer import QwenImageTransformer, TransformerConfig, load_transformer
from qwen_nb.vae import load_vae

FIXTURES = Path(__file__).parent / "fixtures" / "tiny_pipeline"
LAYOUTS = ["layout_a", "layout_b"]
GOLDENS = mx.load(str(FIXTURES / "goldens.safetensors"))
CASES = {c["name"]: c for c in json.loads((FIXTURES / "goldens.json").read_text())["cases"]}


def load(layout="layout_a", **kw) -> QwenImagePipeline:
    return QwenImagePipeline.from_pretrained(FIXTURES / layout, dtype=mx.float32, verbose=False, **kw)


def run_case(pipe, name, **kw):
    c = CASES[name]
    return pipe.generate(
        c["prompt"],
        c["negative_prompt"],
        c["height"],
        c["width"],
        c["steps"],
        c["cfg_scale"],
        latents=GOLDENS[f"{name}.noise"],
        progress=False,
        **kw,
    )


def pixel_diff(image, name) -> int:
    return int(np.abs(np.asarray(image).astype(int) - np.array(GOLDENS[f"{name}.image"]).astype(int)).max())


@pytest.fixture(scope="module", params=LAYOUTS)
def pipe(request):
    return load(request.param)


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(pipe, name):
    """Same noise, same weights: diffusers' uint8 image within 2/255, every step's latents within 1e-5 (float32)."""
    c = CASES[name]
    steps = []
    image = run_case(pipe, name, callback=lambda i, x: steps.append(np.array(x[0])))
    assert image.size == (c["width"], c["height"]) and image.mode == "RGB"
    np.testing.assert_allclose(np.stack(steps), np.array(GOLDENS[f"{name}.latents"]), rtol=1e-5, atol=1e-5)
    diff = pixel_diff(image, name)
    print(f"{name}: max pixel difference {diff}/255")
    assert diff <= 2


PIPELINE_SETTINGS = {
    "baseline": dict(switches=Switches.baseline(), batched_cfg=False, schedule_modulation=False),
    "no_batched_cfg": dict(batched_cfg=False),
    "no_schedule_modulation": dict(schedule_modulation=False),
    "no_fused_qkv": dict(switches=Switches().only(fused_qkv=False)),
}


@pytest.mark.parametrize("setting", list(PIPELINE_SETTINGS))
def test_pipeline_options_keep_diffusers_parity(setting):
    """Every pipeline option off (and every model switch off too) gives diffusers' latents within 1e-5: CFG as
    two passes (the two prompts have different lengths), modulation per step or up front, q/k/v apart."""
    pipe = load(**PIPELINE_SETTINGS[setting])
    for name in ("square_cfg", "wide_long_negative"):  # negative shorter, then longer than the prompt
        steps = []
        image = run_case(pipe, name, callback=lambda i, x, steps=steps: steps.append(np.array(x[0])))
        np.testing.assert_allclose(np.stack(steps), np.array(GOLDENS[f"{name}.latents"]), rtol=1e-5, atol=1e-5)
        assert pixel_diff(image, name) <= 2


@pytest.mark.parametrize("every", [1, 2])
def test_eval_every_blocks_keeps_diffusers_parity(every):
    """Evaluating inside the step (every block, every 2 blocks) changes when work runs, not what it computes."""
    pipe = load(eval_every=every)
    steps = []
    image = run_case(pipe, "square_cfg", callback=lambda i, x: steps.append(np.array(x[0])))
    np.testing.assert_allclose(np.stack(steps), np.array(GOLDENS["square_cfg.latents"]), rtol=1e-5, atol=1e-5)
    assert pixel_diff(image, "square_cfg") <= 2
    with pytest.raises(ValueError, match="eval_every"):
        load(eval_every=0)


def test_memory_limit_applies_while_generating_and_is_restored():
    before = mx.set_memory_limit(10**12)  # read the current limit ...
    mx.set_memory_limit(before)  # ... and leave it as it was
    seen = []
    pipe = load(memory_limit_gb=0.5)
    image = run_case(pipe, "square_cfg", callback=lambda i, x: seen.append(mx.set_memory_limit(10**12)))
    assert pixel_diff(image, "square_cfg") <= 2  # the same picture, computed under the limit
    assert seen[0] == 500_000_000
    assert mx.set_memory_limit(before) == before  # restored afterwards
    with pytest.raises(ValueError, match="memory_limit_gb"):
        load(memory_limit_gb=-1)


def test_auto_memory_limit_is_the_weights_plus_a_margin_while_denoising():
    before = mx.set_memory_limit(10**12)
    mx.set_memory_limit(before)
    seen = []
    pipe = load()  # memory_limit_gb="auto" by default
    image = run_case(
        pipe, "square_cfg", callback=lambda i, x: seen.append((mx.get_memory_limit(), mx.get_active_memory()))
    )
    assert pixel_diff(image, "square_cfg") <= 2
    limit, active = seen[0]
    margin = memory.AUTO_LIMIT_MARGIN  # over what is held once the weights are in (tiny here)
    assert margin - 10**8 <= limit - active <= margin + 10**7
    assert mx.get_memory_limit() == before


def _run_counting_batches(prompt, negative, **options):
    """(every step's latents, the batch size of every transformer call) of a 3-step CFG generation."""
    pipe = load(**options)
    assert pipe.encode(prompt)[0].shape == pipe.encode(negative)[0].shape
    model = pipe.transformer
    batches, steps = [], []

    class Spy:
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, x, *args, **kw):
            batches.append(x.shape[0])
            return model(x, *args, **kw)

    pipe.components.replace("transformer", Spy())
    pipe.generate(prompt, negative, 64, 64, steps=3, seed=0, progress=False, callback=lambda i, x: steps.append(x))
    return np.stack([np.array(x) for x in steps]), batches


def test_batched_cfg_equals_two_passes_when_texts_have_one_length():
    """CFG as one batch of two runs only when no padding is needed; it must give the two passes' latents (which
    the parity test above ties to diffusers) within 1e-5, and it must really run as a batch of two."""
    prompt, negative = "a red fox in the snow", "a red fox on the snow"  # one length in the tiny tokenizer
    batched, batches = _run_counting_batches(prompt, negative)
    two, passes = _run_counting_batches(prompt, negative, batched_cfg=False)
    assert batches == [2, 2, 2] and passes == [1] * 6
    np.testing.assert_allclose(batched, two, rtol=1e-5, atol=1e-5)


def test_transformer_runs_without_its_modulation_weights_read_per_schedule(monkeypatch):
    """With `schedule_modulation`, the denoising transformer never holds the weights that depend on sigma alone (a
    third of the real model); each new schedule's table is read from the checkpoint block by block, and the same
    schedule again reads nothing."""
    import qwen_nb.transformer as transformer_module

    reads = []
    real = transformer_module.load_modulation_table
    monkeypatch.setattr(pipeline_module, "load_modulation_table", lambda *a, **k: reads.append(1) or real(*a, **k))
    pipe = load()
    full = load_transformer(FIXTURES / "layout_a" / "transformer", mx.float32)[0].diffusers_weights()
    for name, total_reads in (("square_cfg", 1), ("cjk_emoji_single", 2), ("square_cfg", 3), ("square_cfg", 3)):
        assert pixel_diff(run_case(pipe, name), name) <= 2
        assert set(pipe.transformer.diffusers_weights()) == {k for k in full if not is_timestep_weight(k)}
        assert len(reads) == total_reads
    assert pipe.components.builds["transformer"] == 1
    quantized = load(quantize=8)
    run_case(quantized, "square_cfg")
    assert not any(is_timestep_weight(k) for k in quantized.transformer.diffusers_weights())


@pytest.mark.parametrize("name", list(CASES))
def test_prompt_embeddings_match_diffusers(pipe, name):
    c = CASES[name]
    embeds, mask = pipe.encode(c["prompt"])
    assert mask is None  # one prompt: diffusers turns the all-ones mask into None
    np.testing.assert_allclose(np.array(embeds), np.array(GOLDENS[f"{name}.prompt_embeds"]), rtol=1e-5, atol=1e-5)
    if c["negative_prompt"] is not None:
        neg, _ = pipe.encode(c["negative_prompt"])
        assert neg.shape[1] == c["negative_tokens"]
        np.testing.assert_allclose(np.array(neg), np.array(GOLDENS[f"{name}.negative_embeds"]), rtol=1e-5, atol=1e-5)


def test_cfg_only_with_negative_prompt_and_scale_above_one():
    """diffusers: cfg_scale <= 1 or no negative prompt means one pass, the same image for any negative prompt."""
    pipe = load()
    noise = GOLDENS["square_cfg.noise"]
    single = np.asarray(pipe.generate("a fox", None, 64, 64, 2, 4.0, latents=noise, progress=False))
    off = np.asarray(pipe.generate("a fox", "blurry", 64, 64, 2, 1.0, latents=noise, progress=False))
    on = np.asarray(pipe.generate("a fox", "blurry", 64, 64, 2, 4.0, latents=noise, progress=False))
    assert np.array_equal(single, off)
    assert not np.array_equal(single, on)
    assert pipe.last_stats.cfg


def test_seed_is_repeatable_and_accepts_5d_latents():
    pipe = load()
    a = np.asarray(pipe.generate("a fox", height=32, width=48, steps=2, seed=7, progress=False))
    b = np.asarray(pipe.generate("a fox", height=32, width=48, steps=2, seed=7, progress=False))
    c = np.asarray(pipe.generate("a fox", height=32, width=48, steps=2, seed=8, progress=False))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert pipe.last_stats.seed == 8
    noise = GOLDENS["square_cfg.noise"]  # (1, 1, 16, 8, 8), diffusers' form, and its 4-D squeeze
    x5 = np.asarray(pipe.generate("a fox", height=64, width=64, steps=2, latents=noise, progress=False))
    x4 = np.asarray(pipe.generate("a fox", height=64, width=64, steps=2, latents=noise[:, 0], progress=False))
    assert np.array_equal(x5, x4)


def test_stats_report_times_and_peak_memory():
    pipe = load()
    run_case(pipe, "square_cfg")
    s = pipe.last_stats
    assert len(s.step_times_s) == 3 and s.step_s > 0 and s.total_s >= sum(s.step_times_s)
    assert s.peak_gb > 0 and s.interrupted_at is None
    assert "s/step" in str(s) and "peak memory" in str(s)


# ---------------------------------------------------------------------------------------------- text side
def test_prompt_cache_and_sequenced_text_encoder():
    """keep_text_encoder=False: the text encoder is freed after encoding, and the transformer before the text
    encoder comes back for a new prompt; a (prompt, negative) pair seen before needs no text encoder at all."""
    pipe = load(keep_text_encoder=False)
    assert not pipe.keep_text_encoder
    builds = lambda: {k: pipe.components.builds[k] for k in ("text_encoder", "transformer")}  # noqa: E731
    first = np.asarray(run_case(pipe, "square_cfg"))
    assert not pipe.components.loaded("text_encoder") and pipe.components.loaded("transformer")
    assert builds() == {"text_encoder": 1, "transformer": 1}
    again = np.asarray(run_case(pipe, "square_cfg"))  # cached: no text encoder, transformer kept
    assert builds() == {"text_encoder": 1, "transformer": 1} and np.array_equal(first, again)
    assert pixel_diff(again, "square_cfg") <= 2
    run_case(pipe, "cjk_emoji_single")  # new prompt: transformer released, text encoder loaded, then swapped back
    assert builds() == {"text_encoder": 2, "transformer": 2}
    assert not pipe.components.loaded("text_encoder")

    kept = load(keep_text_encoder=True)
    run_case(kept, "square_cfg")
    assert kept.components.loaded("text_encoder") and kept.components.loaded("transformer")


def test_long_prompt_is_cut_to_max_sequence_length_like_diffusers(capsys):
    pipe = QwenImagePipeline.from_pretrained(FIXTURES / "layout_a", dtype=mx.float32, max_sequence_length=8)
    embeds, _ = pipe.encode(CASES["wide_long_negative"]["negative_prompt"])
    assert embeds.shape[1] == 8
    assert "only the first 8 are used" in capsys.readouterr().out
    np.testing.assert_allclose(
        np.array(embeds), np.array(GOLDENS["wide_long_negative.negative_embeds"][:, :8]), rtol=1e-5, atol=1e-5
    )


# prompts at and past max_sequence_length (512), odd latent grids, negative_prompt=None with cfg_scale > 1, empty
# texts: tests/fixtures/make_pipeline_long_fixtures.py
LONG_GOLDENS = mx.load(str(FIXTURES / "long_prompts.safetensors"))
LONG_CASES = json.loads((FIXTURES / "long_prompts.json").read_text())["cases"]


@pytest.fixture(scope="module")
def pipe_b():
    return load("layout_b")


@pytest.mark.parametrize("c", LONG_CASES, ids=[c["name"] for c in LONG_CASES])
def test_prompts_at_and_past_512_tokens_match_diffusers(pipe_b, c):
    """A 600-token prompt cut to 512 with no negative prompt at cfg_scale 4 (no CFG, as diffusers), a 512-token
    prompt against a 700-token negative cut to 512 (one length: batched CFG), 513 tokens against 40, at 80x48,
    48x112 and 112x80 (odd latent grids), and "" against "" (CFG, the template's 5 tokens each): the cut
    embeddings' ends, every step's latents within 1e-5 (float32) and the image within 2/255."""
    name = c["name"]
    for text, key, n in (
        (c["prompt"], "prompt", c["embedded_tokens"]),
        (c["negative_prompt"], "negative", c["negative_embedded_tokens"]),
    ):
        if text is None:
            continue
        embeds, _ = pipe_b.encode(text)
        assert embeds.shape[1] == n
        ends = np.concatenate([np.array(embeds[:, :4]), np.array(embeds[:, -4:])], axis=1)
        np.testing.assert_allclose(ends, np.array(LONG_GOLDENS[f"{name}.{key}_embeds_ends"]), rtol=1e-5, atol=1e-5)
    steps = []
    image = pipe_b.generate(
        c["prompt"],
        c["negative_prompt"],
        c["height"],
        c["width"],
        c["steps"],
        c["cfg_scale"],
        latents=LONG_GOLDENS[f"{name}.noise"],
        progress=False,
        callback=lambda i, x: steps.append(np.array(x[0])),
    )
    assert image.size == (c["width"], c["height"]) and pipe_b.last_stats.cfg == c["cfg_run"]
    np.testing.assert_allclose(np.stack(steps), np.array(LONG_GOLDENS[f"{name}.latents"]), rtol=1e-5, atol=1e-5)
    diff = int(np.abs(np.asarray(image).astype(int) - np.array(LONG_GOLDENS[f"{name}.image"]).astype(int)).max())
    print(f"{name}: latents max|diff| {np.abs(np.stack(steps) - np.array(LONG_GOLDENS[f'{name}.latents'])).max():.2e}, "
          f"max pixel difference {diff}/255")  # fmt: skip
    assert diff <= 2


# ---------------------------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("k", [0, 2])
def test_interrupt_stops_cleanly_and_pipeline_stays_usable(k):
    pipe = load()

    def stop(i, x):
        if i == k:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted, match=f"stopped after step {k + 1} of 4") as e:
        run_case(pipe, "wide_long_negative", callback=stop)
    assert isinstance(e.value, KeyboardInterrupt)  # Ctrl-C semantics kept for scripts
    assert e.value.step == k + 1 and pipe.last_stats.interrupted_at == k + 1
    np.testing.assert_allclose(
        np.array(e.value.latents[0]), np.array(GOLDENS["wide_long_negative.latents"][k]), rtol=1e-5, atol=1e-5
    )
    preview = pipe.decode(e.value.latents, e.value.height, e.value.width)
    assert preview.size == (96, 64)
    assert pixel_diff(run_case(pipe, "wide_long_negative"), "wide_long_negative") <= 2


# ---------------------------------------------------------------------------------------------- quantization
def count_layers(model):
    mods = [m for _, m in model.named_modules()]
    return sum(isinstance(m, nn.QuantizedLinear) for m in mods), sum(type(m) is nn.Linear for m in mods)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_every_linear_modulation_at_8_bits(bits):
    pipe = load(quantize=bits, schedule_modulation=False)  # the modulation in the model, to count it there
    t = pipe.transformer
    assert count_layers(t)[0] == 2 * 10 + 6  # q, k, v fused: one quantized linear per stream instead of three
    t.split_projections()  # counted as the checkpoint has them
    q, plain = count_layers(t)
    assert plain == 0 and q == pipe.quantization.quantized and not pipe.quantization.skipped
    assert q == 2 * 14 + 6  # per block 2 modulation + 8 attention + 4 MLP; img_in, txt_in, 2 time, norm_out, proj_out
    named = dict(t.named_modules())
    for path, m in named.items():
        if isinstance(m, nn.QuantizedLinear):
            mod = ".img_mod." in path + "." or ".txt_mod." in path + "." or path.startswith("norm_out.linear")
            assert m.bits == (max(bits, 8) if mod else bits), path
            assert m.group_size == 64
    assert pipe.text_encoder.model.layers[0].self_attn.q_proj.__class__ is nn.Linear  # text encoder untouched
    image = np.asarray(run_case(pipe, "square_cfg"))
    assert image.shape == (64, 64, 3)


# measured on these cases (tests/fixtures/tiny_pipeline, random weights): 8-bit latents within 0.31% of the
# largest golden value, mean pixel error 0.29/255 (max 4); 4-bit within 5.2%, mean 6.1/255 (max 89: random weights
# amplify a few pixels). The bounds leave about 3x margin; a wrong scale, group or layout is far outside them.
QUANTIZED_BOUNDS = {8: (0.01, 1.0), 4: (0.15, 15.0)}  # (latents: max |diff| / max |golden|, mean |pixel diff|)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_pipeline_stays_close_to_diffusers_float32(bits):
    latent_bound, pixel_bound = QUANTIZED_BOUNDS[bits]
    pipe = load(quantize=bits)
    for name in CASES:
        steps = []
        image = run_case(pipe, name, callback=lambda i, x, steps=steps: steps.append(np.array(x[0])))
        golden = np.array(GOLDENS[f"{name}.latents"])
        rel = np.abs(np.stack(steps) - golden).max() / np.abs(golden).max()
        pixels = np.abs(np.asarray(image).astype(int) - np.array(GOLDENS[f"{name}.image"]).astype(int)).mean()
        print(f"{bits}-bit {name}: latents {rel:.4f} of max, mean pixel difference {pixels:.2f}/255")
        assert rel < latent_bound and pixels < pixel_bound


def test_quantize_reports_layers_it_cannot_quantize():
    """txt_in of TransformerConfig.tiny() is 48 wide, not a multiple of 64: kept in full precision and listed."""
    model = QwenImageTransformer(TransformerConfig.tiny())
    report = quantize_transformer(model, 4)
    assert report.skipped == ["txt_in"]
    q, plain = count_layers(model)
    assert plain == 1 and q == report.quantized


def test_quantized_save_and_load_round_trip(tmp_path):
    pipe = load(quantize=4)
    before = np.asarray(run_case(pipe, "square_cfg"))
    out = pipe.save_pretrained(tmp_path / "q4", max_shard_size=100_000)
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["modulation_bits"] == 8
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    # the text encoder's vision-only and lm_head-only shards were not needed, so not copied
    assert len(list((out / "text_encoder").glob("*.safetensors"))) == 3

    again = load_from(out)
    assert again.quantize == 4
    after = np.asarray(run_case(again, "square_cfg"))
    assert np.array_equal(before, after)
    assert count_layers(again.transformer) == count_layers(pipe.transformer)
    with pytest.raises(ValueError, match="holds a 4-bit transformer"):
        QwenImagePipeline.from_pretrained(out, dtype=mx.float32, quantize=8, verbose=False)


def load_from(folder, **kw):
    return QwenImagePipeline.from_pretrained(folder, dtype=mx.float32, verbose=False, **kw)


def test_unquantized_save_round_trip_and_no_overwrite(tmp_path):
    pipe = load("layout_b")
    out = pipe.save_pretrained(tmp_path / "plain")
    assert pixel_diff(run_case(load_from(out), "cjk_emoji_single"), "cjk_emoji_single") <= 2
    with pytest.raises(FileExistsError, match="not empty; nothing was written"):
        pipe.save_pretrained(out)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        pipe.save_pretrained(mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    with pytest.raises(ValueError, match="overlaps the folder"):
        pipe.save_pretrained(FIXTURES / "layout_b" / "sub", overwrite=True)
    pipe.save_pretrained(out, overwrite=True)
    assert pixel_diff(run_case(load_from(out), "cjk_emoji_single"), "cjk_emoji_single") <= 2


# ---------------------------------------------------------------------------------------------- memory plan
@pytest.mark.parametrize("split", [True, False])
def test_plan_component_bytes_equal_loaded_parameters(split):
    """The plan reads only safetensors headers; its byte counts equal the loaded models' parameters (the
    transformer without its timestep weights under schedule_modulation)."""
    pipe = load(schedule_modulation=split)
    plan = plan_memory(FIXTURES / "layout_a", mx.float32, schedule_modulation=split)
    nbytes = lambda m: sum(v.nbytes for _, v in tree_flatten(m.parameters()))
    assert plan.components["transformer"] == nbytes(pipe.transformer)
    assert plan.components["text_encoder"] == nbytes(pipe.text_encoder)
    q = load(quantize=4, schedule_modulation=split)
    plan4 = plan_memory(FIXTURES / "layout_a", mx.float32, quantize=4, schedule_modulation=split)
    assert plan4.components["transformer"] == nbytes(q.transformer)


def test_plan_real_checkpoint_sizes(tmp_path):
    """The full 20B config, as sparse safetensors files of the real shapes: bf16 = 2 bytes x 20,430,401,088
    parameters (spec 1.1); 8- and 4-bit with group-64 bf16 scales and biases (8.5 / 4.5 bits per weight)."""
    model = QwenImageTransformer(TransformerConfig())
    params = dict(tree_flatten(model.parameters()))  # lazy: nothing is allocated
    assert sum(v.size for v in params.values()) == 20_430_401_088
    header = {k: {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [0, 0]} for k, v in params.items()}
    offset = 0
    for k, v in params.items():
        header[k]["data_offsets"] = [offset, offset + 2 * v.size]
        offset += 2 * v.size
    folder = tmp_path / "transformer"
    folder.mkdir()
    blob = json.dumps(header).encode()
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)  # sparse: no disk used
    shapes = memory.tensor_shapes(folder)
    assert memory.component_bytes(shapes, mx.bfloat16) == 40_860_802_176
    linear = sum(v.size for k, v in params.items() if v.ndim == 2)
    mod = sum(v.size for k, v in params.items() if v.ndim == 2 and is_modulation(k))
    rest = 2 * sum(v.size for k, v in params.items() if v.ndim != 2)
    assert mod == 60 * 2 * 3072 * 18432 + 3072 * 6144
    for bits in (8, 4):
        expected = rest + (linear - mod) * bits // 8 + mod + 4 * linear // 64
        assert memory.component_bytes(shapes, mx.bfloat16, bits) == expected
    assert memory.component_bytes(shapes, mx.bfloat16, 8) / 1e9 == pytest.approx(21.7, abs=0.1)
    assert memory.component_bytes(shapes, mx.bfloat16, 4) / 1e9 == pytest.approx(14.9, abs=0.1)  # modulation at 8 bits


def fake_budget(monkeypatch, usable):
    """A device whose usable memory (after the plan's headroom) is `usable` bytes."""
    nbytes = int(usable / (1 - memory.HEADROOM)) + 1
    monkeypatch.setattr(memory, "device_memory", lambda: (nbytes, "test budget"))


def test_memory_plan_refuses_and_suggests_quantization(monkeypatch):
    plain = plan_memory(FIXTURES / "layout_a", mx.float32, budget=10**12)
    q8 = plan_memory(FIXTURES / "layout_a", mx.float32, quantize=8, budget=10**12)
    fake_budget(monkeypatch, (plain.sequenced_peak + q8.sequenced_peak) // 2)
    with pytest.raises(MemoryPlanError, match=r"will not fit(.|\n)*quantize=8") as e:
        load()
    assert "check_memory=False" in str(e.value)
    assert load(quantize=8).memory_plan.fits
    assert load(check_memory=False).memory_plan.peak == plain.sequenced_peak  # overridden: loads anyway

    fake_budget(monkeypatch, 1000)
    with pytest.raises(MemoryPlanError, match="Even quantize=4 will not fit"):
        load()


def test_memory_plan_sequences_the_text_encoder_when_needed(monkeypatch):
    plan = plan_memory(FIXTURES / "layout_a", mx.float32, budget=10**12)
    assert plan.keep_text_encoder and plan.sequenced_peak < plan.resident_peak
    fake_budget(monkeypatch, (plan.sequenced_peak + plan.resident_peak) // 2)
    pipe = load()
    assert not pipe.keep_text_encoder  # chosen by the plan
    assert pixel_diff(run_case(pipe, "square_cfg"), "square_cfg") <= 2
    assert not pipe.components.loaded("text_encoder")
    with pytest.raises(MemoryPlanError, match="free the text encoder"):
        load(keep_text_encoder=True)


def test_generate_checks_memory_at_its_size():
    pipe = load(plan_size=(64, 64))
    pipe.memory_plan.budget = int(pipe.memory_plan.peak / (1 - memory.HEADROOM)) + 1  # just fits at 64x64
    run_case(pipe, "square_cfg")
    with pytest.raises(MemoryPlanError, match="will not fit"):
        pipe.generate("a fox", height=1024, width=1024, steps=1, progress=False)


def test_plan_keeps_headroom_and_sizes_real_machines():
    """The real checkpoint's sizes (spec; 20.43B transformer, 7.07B text encoder without vision tower and lm_head)
    on Macs of 128/64/32 GB (Metal's working set is 75% of RAM): resident / sequenced bf16 / 4-bit."""
    gb = 1e9
    components = {"text_encoder": 7.07 * 2 * gb, "transformer": 40.86 * gb, "vae": 0.25 * gb}
    act = {"text": 0.3 * gb, "denoise": 0.5 * gb, "decode": 1.6 * gb}
    q = lambda tr, ram: memory.MemoryPlan({**components, "transformer": tr * gb}, act, 0.75 * ram * gb, "t", False)
    assert q(40.86, 128).fits and memory.MemoryPlan(components, act, 96 * gb, "t", True).fits
    assert q(40.86, 64).fits and not memory.MemoryPlan(components, act, 48 * gb, "t", True).fits
    assert not q(40.86, 32).fits and not q(21.7, 32).fits and q(14.9, 32).fits
    assert memory.MemoryPlan(components, act, 100 * gb, "t", True).usable == pytest.approx(90 * gb)


def test_device_memory_prefers_the_recommended_working_set(monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda: {"memory_size": 64e9, "max_recommended_working_set_size": 48e9})
    assert memory.device_memory() == (48_000_000_000, "mx.device_info()['max_recommended_working_set_size']")
    monkeypatch.setattr(mx, "device_info", lambda: {"total_memory": 80e9})
    assert memory.device_memory()[0] == 80_000_000_000
    monkeypatch.setattr(mx, "device_info", lambda: {})
    assert memory.device_memory()[1] == "physical RAM"


def test_pipeline_module_lists_model_card_presets():
    assert pipeline_module.ASPECTS["16:9"] == (1664, 928) and len(pipeline_module.ASPECTS) == 7
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in pipeline_module.ASPECTS.values())


def test_from_components_with_builders_sequences_like_a_checkpoint():
    folder = FIXTURES / "layout_a"
    src = load()
    calls = []

    def build_text_encoder():
        calls.append("te")
        return load_text_encoder(folder / "text_encoder", mx.float32)

    def build_transformer(modulation=True):  # it takes `modulation`: the pipeline may build it without
        calls.append(f"tr modulation={modulation}")
        return load_transformer(folder / "transformer", mx.float32, modulation=modulation)[0]

    pipe = QwenImagePipeline.from_components(
        src.tokenizer,
        build_transformer,
        build_text_encoder,
        load_vae(folder / "vae", mx.float32),  # a module is accepted too
        src.scheduler_config,
        dtype=mx.float32,
        keep_text_encoder=False,
        verbose=False,
    )
    assert pixel_diff(run_case(pipe, "square_cfg"), "square_cfg") <= 2
    assert not pipe.components.loaded("text_encoder")
    assert calls.count("te") == 1 and "tr modulation=True" in calls  # the table came from a whole build
    assert not any(is_timestep_weight(k) for k in pipe.transformer.diffusers_weights())
    assert pixel_diff(run_case(pipe, "cjk_emoji_single"), "cjk_emoji_single") <= 2
    assert calls.count("te") == 2
    assert set(pipe.last_stats.stage_peaks_gb) >= {"text", "weights", "denoise", "decode"}

    whole = QwenImagePipeline.from_components(  # a module keeps its own modulation weights
        src.tokenizer,
        load_transformer(folder / "transformer", mx.float32)[0],
        load_text_encoder(folder / "text_encoder", mx.float32),
        load_vae(folder / "vae", mx.float32),
        src.scheduler_config,
        dtype=mx.float32,
        verbose=False,
    )
    assert pixel_diff(run_case(whole, "square_cfg"), "square_cfg") <= 2


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), by bit arithmetic: independent of MLX's casts."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def test_bf16_sigma_is_rounded_as_diffusers_rounds_it():
    """diffusers passes `t.to(bf16) / 1000` (spec 1.3): sigma = bf16(bf16(1000 sigma) / 1000), e.g. 989.70 -> 988."""
    from qwen_nb.scheduler import flow_match_sigmas

    pipe = QwenImagePipeline.from_pretrained(FIXTURES / "layout_a", dtype=mx.bfloat16, verbose=False)
    real = pipe.transformer
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, x, text, sigma, grid, mask=None, **kw):
            seen.append(np.array(sigma.astype(mx.float32)))
            assert sigma.dtype == mx.bfloat16
            return real(x, text, sigma, grid, mask, **kw)

    scheduled = []  # the sigmas the whole schedule's modulation is computed from, all steps at once
    read = pipe._read_modulation
    pipe._read_modulation = lambda sigmas: scheduled.append(np.array(sigmas.astype(mx.float32))) or read(sigmas)
    pipe.components.replace("transformer", Spy())
    image = pipe.generate("a fox", None, 64, 64, steps=5, seed=0, progress=False)
    t = flow_match_sigmas(5, 16)[:-1] * np.float32(1000)
    expected = bf16_round(bf16_round(t) / np.float32(1000))
    np.testing.assert_array_equal(np.concatenate(seen), expected)
    np.testing.assert_array_equal(np.concatenate(scheduled), expected)
    assert not np.array_equal(expected, bf16_round(t / np.float32(1000)))  # the two roundings differ here
    assert np.asarray(image).std() > 10  # a bfloat16 run gives an image, not a flat or NaN one


# ---------------------------------------------------------------------------------------------- custom sigmas
SIGMA_GOLDENS = mx.load(str(FIXTURES / "custom_sigmas.safetensors"))
SIGMA_CASES = json.loads((FIXTURES / "custom_sigmas.json").read_text())["cases"]


@pytest.mark.parametrize("c", SIGMA_CASES, ids=[c["name"] for c in SIGMA_CASES])
def test_sigmas_of_ones_own_match_diffusers(pipe_b, c):
    """generate(sigmas=[...]) as diffusers' QwenImagePipeline(sigmas=...): the given sigmas shifted for the image's
    tokens, stretched to the terminal sigma, steps = len(sigmas), with CFG at 48x80 and without CFG on sigmas that
    do not start at 1: the scheduler's sigmas, every step's latents within 1e-5 and the image within 2/255."""
    name = c["name"]
    grid = pipe_b.sizes.grid(c["height"], c["width"])
    ours = pipe_b.schedule(99, grid, sigmas=c["sigmas"]).sigmas  # steps is ignored when sigmas are given
    np.testing.assert_allclose(ours, np.array(SIGMA_GOLDENS[f"{name}.scheduler_sigmas"]), rtol=0, atol=1e-6)
    steps = []
    image = pipe_b.generate(
        c["prompt"], c["negative_prompt"], c["height"], c["width"], cfg_scale=c["cfg_scale"], sigmas=c["sigmas"],
        latents=SIGMA_GOLDENS[f"{name}.noise"], progress=False, callback=lambda i, x: steps.append(np.array(x[0])),
    )  # fmt: skip
    assert len(steps) == c["steps"] == len(c["sigmas"])
    np.testing.assert_allclose(np.stack(steps), np.array(SIGMA_GOLDENS[f"{name}.latents"]), rtol=1e-5, atol=1e-5)
    diff = int(np.abs(np.asarray(image).astype(int) - np.array(SIGMA_GOLDENS[f"{name}.image"]).astype(int)).max())
    assert diff <= 2, f"max pixel difference {diff}/255"


@pytest.mark.parametrize("bad", [[], [0.5, 0.0], [1.2], ["a"], [float("nan")]])
def test_bad_sigmas_name_the_rule(pipe_b, bad):
    with pytest.raises(ValueError, match=r"sigmas must be a non-empty list of numbers in \(0, 1\]"):
        pipe_b.generate("a fox", height=32, width=32, sigmas=bad, progress=False)


def test_overlapped_steps_give_the_same_latents_in_order():
    """overlap_steps (the default) queues step k+1 while step k runs: every step's latents, handed to the callback in
    order, are bitwise those of the loop evaluated one step at a time, and the loop's each yielded value is evaluated."""
    from qwen_nb.sampling import evaluated

    runs = {}
    for overlap in (True, False):
        pipe = load(overlap_steps=overlap)
        seen = []
        run_case(pipe, "square_cfg", callback=lambda i, x, seen=seen: seen.append((i, np.array(x))))
        runs[overlap] = seen
    assert [i for i, _ in runs[True]] == list(range(len(runs[False])))
    for (_, a), (_, b) in zip(runs[True], runs[False], strict=True):
        np.testing.assert_array_equal(a, b)
    made = []

    def loop():
        for k in range(3):
            made.append(k)
            yield mx.full((2,), float(k)) * 2

    got = []
    for x in evaluated(loop()):
        got.append((x.tolist(), list(made)))
    assert got == [([0.0, 0.0], [0, 1]), ([2.0, 2.0], [0, 1, 2]), ([4.0, 4.0], [0, 1, 2])]  # one step ahead
    assert [x.tolist() for x in evaluated(loop(), overlap=False)] == [[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]]
