"""`python -m qwen_nb generate --fast 8|4 --lora FILE_OR_REPO[:SCALE]` in process on the tiny pipeline: the
Lightning preset and stacked LoRAs against the diffusers + peft goldens of tests/fixtures/lora (the noise they were
made with put in place of the seed's), the hub download replaced by the fixture file, and every bad input; the
notebook panel's fast choice the same way."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qwen_nb import lora as L
from qwen_nb.__main__ import build_parser, lora_source, main
from qwen_nb.pipeline import LIGHTNING_FILES, LIGHTNING_REPO, QwenImagePipeline

FIXTURES = Path(__file__).parent / "fixtures"
LORAS = FIXTURES / "lora"
MODEL = FIXTURES / "tiny_pipeline" / "layout_a"
META = json.loads((LORAS / "goldens.json").read_text())
GOLDENS = mx.load(str(LORAS / "goldens.safetensors"))
LIGHTNING = mx.load(str(LORAS / "lightning_schedule.safetensors"))  # use_lightning(4) with lightning_attn_mlp
NOISE = mx.load(str(FIXTURES / "tiny_pipeline" / "goldens.safetensors"))[f"{META['base_case']}.noise"]
ARGS = ["--model", str(MODEL), "--dtype", "float32", "--size", "64x64", "--quiet"]


@pytest.fixture
def golden_noise(monkeypatch):
    """Every generation starts from the noise the goldens were made with (torch drew it, not a seed of ours)."""
    draw = QwenImagePipeline.initial_noise
    monkeypatch.setattr(
        QwenImagePipeline, "initial_noise", lambda self, h, w, seed=None, latents=None: draw(self, h, w, None, NOISE)
    )


@pytest.fixture
def hub(monkeypatch):
    """The hub download of a LoRA file, replaced: records (repo, file) and returns the fixture Lightning LoRA."""
    calls = []

    def fetch(repo_id, weight_name, revision, cache_dir, verbose):
        calls.append((repo_id, weight_name))
        return LORAS / "lightning_attn_mlp.safetensors"

    monkeypatch.setattr(L, "_hub_file", fetch)
    return calls


def run(capsys, *args):
    code = main(["generate", *args])
    return code, capsys.readouterr()


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def assert_image(path: Path, golden) -> None:
    diff = int(np.abs(pixels(path) - np.array(golden).astype(int)).max())
    assert diff <= 2, f"max pixel difference {diff}/255"


def zero_lora(path: Path) -> Path:
    """A Lightning-format LoRA whose update is zero (B = 0): the model it is loaded into is unchanged."""
    m = "diffusion_model.transformer_blocks.0.attn.to_q"
    mx.save_safetensors(
        str(path),
        {
            f"{m}.lora_down.weight": mx.ones((4, 64)),
            f"{m}.lora_up.weight": mx.zeros((64, 4)),
            f"{m}.alpha": mx.array(4.0),
        },
    )
    return path


# ---------------------------------------------------------------------------------------------- against diffusers
def test_fast_4_downloads_the_lightning_lora_and_matches_diffusers(tmp_path, capsys, golden_noise, hub):
    """--fast 4: the 4-step Lightning file of lightx2v/Qwen-Image-Lightning, the distilled schedule, 4 steps, CFG
    off: diffusers' QwenImagePipeline with that LoRA and scheduler, true_cfg_scale=1, 4 steps."""
    out = tmp_path / "fast.png"
    code, io = run(capsys, "--prompt", META["prompt"], "--out", str(out), "--fast", "4", *ARGS)
    assert code == 0, io.err
    assert hub == [(LIGHTNING_REPO, LIGHTNING_FILES[4])]
    assert_image(out, LIGHTNING["image"])
    assert "Lightning 4 steps" in io.out
    assert "Steps: 4, CFG: 1.0" in Image.open(out).text["parameters"]


def test_stacked_loras_with_their_scales_match_diffusers(tmp_path, capsys, golden_noise, hub):
    """--lora FILE:0.7 --lora FILE:-0.4 is diffusers' set_adapters with weights [0.7, -0.4] (the stacked golden)."""
    out = tmp_path / "stacked.png"
    specs = [f"{LORAS / e['file']}:{e['scale']}" for e in CASES["stacked"]["loras"]]
    args = ["--prompt", META["prompt"], "--out", str(out), "--steps", str(META["steps"]), "--cfg", "4"]
    code, io = run(capsys, *args, "--lora", specs[0], "--lora", specs[1], *ARGS)
    assert code == 0, io.err
    assert hub == []  # files: nothing downloaded
    assert_image(out, GOLDENS["stacked.image"])
    assert "x 0.7" in io.out and "x -0.4" in io.out


CASES = {c["name"]: c for c in META["cases"]}


def test_fast_with_a_local_lightning_file_composes_with_a_style_lora(tmp_path, capsys, golden_noise, hub):
    """--fast 4 --lightning FILE reads the file (no download); --lora adds its LoRA on top: a zero Lightning update
    with the fixture LoRA as the style LoRA is again the Lightning golden."""
    out = tmp_path / "style.png"
    zero = zero_lora(tmp_path / "zero.safetensors")
    style = LORAS / "lightning_attn_mlp.safetensors"
    args = ["--prompt", META["prompt"], "--out", str(out), "--fast", "4", "--lightning", str(zero)]
    code, io = run(capsys, *args, "--lora", str(style), *ARGS)
    assert code == 0, io.err
    assert hub == []
    assert_image(out, LIGHTNING["image"])
    text = Image.open(out).text["parameters"]
    assert "LoRA: Lightning 4 steps (zero.safetensors); " in text and str(style) in text


def test_steps_and_cfg_given_win_over_the_preset(tmp_path, capsys, hub):
    out = tmp_path / "given.png"
    code, io = run(capsys, "--prompt", "p", "--out", str(out), "--fast", "8", "--steps", "2", "--cfg", "3", *ARGS)
    assert code == 0, io.err
    assert hub == [(LIGHTNING_REPO, LIGHTNING_FILES[8])]
    assert "Steps: 2, CFG: 3.0" in Image.open(out).text["parameters"]


def test_fast_with_img2img_counts_the_preset_steps(tmp_path, capsys, hub):
    """--strength with --fast 4: diffusers' get_timesteps on 4 steps skips int(4 - 4 * 0.3) = 2 of them."""
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(picture)
    args = ["--prompt", "p", "--image", str(picture), "--strength", "0.3", "--fast", "4", *ARGS]
    code, io = run(capsys, *args, "--out", str(tmp_path / "b.png"))
    assert code == 0, io.err
    assert "2 of 4 steps run at strength 0.3" in io.out


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value", ["style.safetensors:strong", "style.safetensors:nan", ":0.5"])
def test_a_bad_scale_is_refused_by_the_parser(capsys, value):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", "--prompt", "p", "--out", "x.png", "--lora", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--lora" in err and ("not a number" in err or "finite" in err or "before the scale" in err)


def test_lora_values_parse_to_source_and_scale(tmp_path):
    parse = lambda *a: build_parser().parse_args(["generate", "--prompt", "p", "--out", "x.png", *a]).lora
    assert parse() == []
    assert parse("--lora", "a.safetensors", "--lora", "owner/name:-0.25") == [
        ("a.safetensors", 1.0),
        ("owner/name", -0.25),
    ]
    odd = tmp_path / "v1:2.safetensors"  # an existing path is taken whole, colon or not
    odd.write_bytes(b"")
    assert parse("--lora", str(odd)) == [(str(odd), 1.0)]
    assert lora_source("owner/name") == ("owner/name", None)
    assert lora_source("owner/name/sub/style.safetensors") == ("owner/name", "sub/style.safetensors")
    assert lora_source(str(LORAS / "kohya_attn_mlp.safetensors")) == (str(LORAS / "kohya_attn_mlp.safetensors"), None)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora", "missing/style.safetensors"], "no such file or folder"),
        (["--lora", "./nowhere"], "no such file or folder"),
        (["--lightning", "x.safetensors"], "add --fast with its steps"),
        (["--fast", "8", "--lightning", "/no/such.safetensors"], "--lightning /no/such.safetensors: no such file"),
        (["--fast", "6"], None),  # argparse: invalid choice
    ],
)
def test_lora_option_errors_before_the_model_loads(tmp_path, capsys, hub, extra, message):
    out = tmp_path / "x.png"
    if message is None:
        with pytest.raises(SystemExit):
            run(capsys, "--prompt", "p", "--out", str(out), *ARGS, *extra)
        return
    code, io = run(capsys, "--prompt", "p", "--out", str(out), *ARGS, *extra)
    assert code == 2 and message in io.err and "Tip: " in io.err
    assert not out.exists() and hub == []


def test_a_pickle_lora_is_refused_with_the_conversion(tmp_path, capsys):
    bad = tmp_path / "style.pt"
    bad.write_bytes(b"\x80\x04not really")
    code, io = run(capsys, "--prompt", "p", "--out", str(tmp_path / "x.png"), *ARGS, "--lora", f"{bad}:0.5")
    assert code == 2
    assert "is a pickle file" in io.err and "save_file" in io.err


def test_a_lora_that_does_not_fit_names_the_option(tmp_path, capsys):
    wrong = tmp_path / "wrong.safetensors"
    m = "diffusion_model.transformer_blocks.0.attn.to_q"
    mx.save_safetensors(
        str(wrong), {f"{m}.lora_down.weight": mx.ones((4, 32)), f"{m}.lora_up.weight": mx.ones((64, 4))}
    )
    code, io = run(capsys, "--prompt", "p", "--out", str(tmp_path / "x.png"), *ARGS, "--lora", str(wrong))
    assert code == 2
    assert f"--lora {wrong}: " in io.err and "do not fit this transformer's shapes" in io.err


# ---------------------------------------------------------------------------------------------- the other commands
def test_edit_shares_the_options(tmp_path, capsys):
    args = build_parser().parse_args(
        ["edit", "--image", "a.png", "--prompt", "p", "--out", "x.png", "--fast", "4", "--lightning", "l.safetensors"]
        + ["--lora", "s.safetensors:0.5"]
    )
    assert (args.fast, args.lightning, args.lora) == (4, Path("l.safetensors"), [("s.safetensors", 0.5)])
    picture = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(picture)
    code = main(
        ["edit", "--image", str(picture), "--prompt", "p", "--out", str(tmp_path / "x.png")] + ["--lightning", "l"]
    )
    assert code == 2 and "add --fast" in capsys.readouterr().err


def test_qwen21_refuses_fast_by_name(tmp_path, capsys):
    model = FIXTURES / "tiny_qwen21" / "pipeline"
    code = main(["generate", "--prompt", "p", "--out", str(tmp_path / "x.png"), "--model", str(model), "--fast", "8"])
    assert code == 2 and "--fast is for Qwen-Image" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the panel
def test_panel_fast_choice_matches_diffusers_and_keeps_other_loras(golden_noise):
    """The panel's fast switch: 4 steps is use_lightning(4) (the Lightning golden); off again is the base model
    with the LoRA loaded through the API still on (the modulation LoRA's golden); steps and CFG follow."""
    pytest.importorskip("ipywidgets")
    from qwen_nb.panel import Panel

    pipe = QwenImagePipeline.from_pretrained(MODEL, dtype=mx.float32, verbose=False)
    lightning = {4: LORAS / "lightning_attn_mlp.safetensors"}
    p = Panel(pipe, prompt=META["prompt"], sizes={"64x64": (64, 64)}, lightning=lightning)
    p.fast.value = 4
    assert (p.steps.value, p.cfg.value) == (4, 1.0)
    assert len(pipe.loras) == 0  # loaded when Generate runs
    image = p.generate_now()
    assert image is not None, p.status.value
    diff = int(np.abs(np.asarray(image).astype(int) - np.array(LIGHTNING["image"]).astype(int)).max())
    assert diff <= 2 and not pipe.last_stats.cfg and pipe.last_stats.steps == 4

    p.fast.value = 0
    assert (p.steps.value, p.cfg.value) == (20, 4.0)
    pipe.load_lora(LORAS / "kohya_modulation.safetensors")  # a style LoRA loaded meanwhile survives the switch
    p.fast.value = 8
    p.lightning[8] = LORAS / "lightning_attn_mlp.safetensors"
    assert p.generate_now() is not None and len(pipe.loras) == 2
    p.fast.value = 0
    p.steps.value, p.negative.value = META["steps"], META["negative_prompt"]
    image = p.generate_now()
    assert [lo.source for lo, _ in pipe.loras.entries] == [str(LORAS / "kohya_modulation.safetensors")]
    diff = int(np.abs(np.asarray(image).astype(int) - np.array(GOLDENS["modulation.image"]).astype(int)).max())
    assert diff <= 2 and pipe.last_stats.cfg and pipe.defaults == {"steps": 20, "cfg_scale": 4.0}


def test_panel_fast_choice_failure_is_said_in_the_status(tmp_path):
    pytest.importorskip("ipywidgets")
    from qwen_nb.panel import Panel

    pipe = QwenImagePipeline.from_pretrained(MODEL, dtype=mx.float32, verbose=False)
    p = Panel(pipe, sizes={"64x64": (64, 64)}, lightning={8: tmp_path / "gone.safetensors"})
    p.fast.value = 8
    assert p.generate_now() is None
    assert "failed" in p.status.value and "gone.safetensors does not exist" in p.status.value
