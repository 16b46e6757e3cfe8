"""Live previews: the latent-to-RGB projection against an independent least-squares solve and the VAE's own decode,
the x0 guess against the flow-matching identity, and `generate(preview=..., preview_every=...)` semantics."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen_nb import preview as previews
from qwen_nb.pipeline import GenerationInterrupted, QwenImagePipeline
from qwen_nb.scheduler import flow_match_sigmas

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_pipeline" / "layout_b"
DEMO = ROOT / "assets" / "demo"
PROMPT = "a red circle at the top left on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return QwenImagePipeline.from_pretrained(TINY, dtype=mx.float32, verbose=False)


def pooled_decode(vae, z: mx.array) -> np.ndarray:
    """The VAE's decode averaged over 8x8 blocks, written out with NumPy: (B, h, w, 16) -> (B, h, w, 3)."""
    img = np.array(vae.decode(z), np.float64)
    B, H, W, _ = img.shape
    return img.reshape(B, H // 8, 8, W // 8, 8, 3).mean(axis=(2, 4))


def held_out(vae, seed: int = 1) -> mx.array:
    return previews.fitting_latents(vae, n=2, side=16, seed=seed)  # other noise, other colour fields


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def test_fit_is_the_least_squares_solution(pipe):
    """The fitted map equals the normal-equations solution (float64, NumPy) on the same decodes, and its residual
    is orthogonal to every feature: the optimum, checked without np.linalg.lstsq."""
    vae = pipe.vae
    z = previews.fitting_latents(vae)
    proj = previews.fit_projection(vae, z)
    assert proj.weight.shape == (16, 3) and proj.bias.shape == (3,)
    assert proj.weight.dtype == np.float32 and proj.bias.dtype == np.float32
    a = np.concatenate([np.array(z, np.float64).reshape(-1, 16), np.ones((z.size // 16, 1))], axis=1)
    y = pooled_decode(vae, z).reshape(-1, 3)
    w = np.linalg.solve(a.T @ a, a.T @ y)
    np.testing.assert_allclose(proj.weight, w[:-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(proj.bias, w[-1], rtol=1e-4, atol=1e-5)
    residual = a @ np.concatenate([proj.weight, proj.bias[None]]).astype(np.float64) - y
    assert np.abs(a.T @ residual).max() / len(a) < 1e-5
    assert abs(proj.rmse - rmse(a @ w, y)) < 1e-5


def test_tiny_random_vae_held_out_error(pipe):
    """On held-out latents the projection is as good as on its fitting data and beats the best constant colour.
    (The tiny pipeline's VAE has random weights, so little of its output is linear in the latents: the fit explains
    only a small part of the variance here; the trained demo VAE below is the real test of the quality.)"""
    vae = pipe.vae
    proj = previews.fit_projection(vae)
    z = held_out(vae)
    target = pooled_decode(vae, z)
    err = rmse(proj(z), target)
    constant = rmse(target.reshape(-1, 3).mean(0), target)
    print(f"tiny VAE: held-out rmse {err:.4f}, fit rmse {proj.rmse:.4f}, constant {constant:.4f}")
    assert err < 1.25 * proj.rmse  # 0.21 vs 0.18 measured: no over-fitting with 17 unknowns and 2048 rows
    assert err < 1.1 * constant


@pytest.mark.skipif(not (DEMO / "vae").exists(), reason="the embedded demo checkpoint (assets/demo) is missing")
def test_trained_demo_vae_held_out_error():
    """With the trained demo VAE the linear map reproduces the pooled decode of held-out latents: most of the
    variance explained (R^2 >= 0.5; 0.6-0.8 measured) and an rmse under 0.3 in [-1, 1] units."""
    vae = QwenImagePipeline.from_pretrained(DEMO, dtype=mx.float32, verbose=False).vae
    proj = previews.fit_projection(vae)
    z = held_out(vae)
    target = pooled_decode(vae, z).reshape(-1, 3)
    pred = proj(z).reshape(-1, 3)
    r2 = 1 - ((pred - target) ** 2).mean() / target.var(0).mean()
    err = rmse(pred, target)
    print(f"demo VAE: held-out rmse {err:.4f}, R^2 {r2:.3f}, fit rmse {proj.rmse:.4f}")
    assert r2 >= 0.5
    assert err < 0.3


def test_projection_is_cached_on_the_vae(pipe):
    vae = pipe.vae
    first = previews.projection_for(vae)
    assert previews.projection_for(vae) is first
    assert "_qwen_nb_preview" not in dict(vae)  # a plain attribute, not a parameter


def test_x0_guess_recovers_the_clean_latents():
    """x_s = (1 - s) x0 + s eps at two sigmas: the guess from the pair is x0 exactly (closed form)."""
    x0 = mx.random.normal((1, 16, 64), key=mx.random.key(0))
    eps = mx.random.normal((1, 16, 64), key=mx.random.key(1))
    for s0, s1 in [(1.0, 0.95), (0.6, 0.52), (0.05, 0.0)]:
        before, after = (1 - s0) * x0 + s0 * eps, (1 - s1) * x0 + s1 * eps
        guess = previews.x0_guess(before, after, s0, s1)
        assert guess.shape == x0.shape and guess.dtype == mx.float32
        np.testing.assert_allclose(np.array(guess), np.array(x0), atol=2e-4)


def test_preview_image_is_the_projection_of_the_unpacked_latents(pipe):
    proj = previews.projection_for(pipe.vae)
    packed = mx.random.normal((1, 4 * 6, 64), key=mx.random.key(3))  # a 64x96 (H x W) image: 4x6 patches
    small = previews.preview(proj, packed, 64, 96, upscale=False)
    assert small.size == (12, 8) and small.mode == "RGB"
    # unpacking by hand: token (r, c), channel ch*4 + dy*2 + dx -> latent pixel (2r + dy, 2c + dx), channel ch
    p = np.array(packed)[0].reshape(4, 6, 16, 2, 2)
    z = p.transpose(0, 3, 1, 4, 2).reshape(8, 12, 16)
    rgb = z.astype(np.float64) @ proj.weight + proj.bias
    expect = np.round(np.clip(rgb * 0.5 + 0.5, 0, 1) * 255)
    assert np.abs(np.asarray(small).astype(int) - expect).max() <= 1
    assert previews.preview(proj, packed, 64, 96).size == (96, 64)


def test_generate_calls_preview_every_n_steps_and_old_callbacks_unchanged(pipe):
    seen, latents, shots = [], [], []

    def old_callback(step, x):  # the (step, latents) callers of before
        seen.append(step)
        latents.append(np.array(x))

    image = pipe.generate(
        PROMPT,
        height=64,
        width=64,
        steps=7,
        seed=5,
        progress=False,
        callback=old_callback,
        preview=lambda step, im: shots.append((step, im)),
        preview_every=3,
    )
    assert seen == list(range(7))
    assert [s for s, _ in shots] == [2, 5, 6]  # every third step, and the last
    assert all(im.size == (64, 64) and im.mode == "RGB" for _, im in shots)
    plain = pipe.generate(PROMPT, height=64, width=64, steps=7, seed=5, progress=False)
    assert np.array_equal(np.asarray(plain), np.asarray(image))  # previews change nothing

    # each preview is the projection of x0 = x' - s' (x' - x) / (s' - s), recomputed from the callback's latents
    sigmas = flow_match_sigmas(7, 16, pipe.scheduler_config)
    proj = previews.projection_for(pipe.vae)
    noise = pipe.initial_noise(64, 64, 5)
    before = [np.array(noise.reshape(1, 16, 4, 2, 4, 2).transpose(0, 2, 4, 1, 3, 5).reshape(1, 16, 64))] + latents
    for step, im in shots:
        s0, s1 = float(sigmas[step]), float(sigmas[step + 1])
        x0 = before[step + 1] - s1 * (before[step + 1] - before[step]) / (s1 - s0)
        expect = previews.preview(proj, mx.array(x0), 64, 64)
        assert np.abs(np.asarray(im).astype(int) - np.asarray(expect).astype(int)).max() <= 1


def test_preview_every_one_is_the_default_and_bad_values_are_refused(pipe):
    shots = []
    pipe.generate(PROMPT, height=64, width=64, steps=3, seed=1, progress=False, preview=lambda s, im: shots.append(s))
    assert shots == [0, 1, 2]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="preview_every must be an integer >= 1"):
            pipe.generate(PROMPT, height=64, width=64, steps=3, preview=lambda s, im: None, preview_every=bad)
    with pytest.raises(ValueError, match="preview must be a function"):
        pipe.generate(PROMPT, height=64, width=64, steps=3, preview="yes")


def test_keyboard_interrupt_in_preview_stops_cleanly(pipe):
    def stop(step, image):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted, match="stopped after step 2 of 5") as e:
        pipe.generate(PROMPT, height=64, width=64, steps=5, seed=2, progress=False, preview=stop)
    assert e.value.latents.shape == (1, 16, 64)
    assert pipe.last_stats.interrupted_at == 2
    assert pipe.generate(PROMPT, height=64, width=64, steps=2, seed=2, progress=False).size == (64, 64)


# ---------------------------------------------------------------------------------------------- the panel
def test_panel_generates_what_generate_makes(pipe):
    from qwen_nb.panel import Panel, sizes_for

    # a checkpoint that declares no native size: 1024x1024 and the model card's; the demo model: its one size
    assert list(sizes_for(pipe).values())[:2] == [(1024, 1024), (1328, 1328)] and len(sizes_for(pipe)) == 8
    demo = QwenImagePipeline.from_pretrained(DEMO, dtype=mx.float32, verbose=False)
    assert list(sizes_for(demo).values()) == [demo.native_size[::-1]]
    p = Panel(pipe, prompt=PROMPT, steps=4, seed=9, sizes={"64x64": (64, 64)})
    image = p.generate_now()
    assert p.done.is_set() and p.error is None
    expect = pipe.generate(PROMPT, " ", 64, 64, steps=4, cfg_scale=4.0, seed=9, progress=False)
    assert np.array_equal(np.asarray(image), np.asarray(expect))
    assert p.final.value[:8] == b"\x89PNG\r\n\x1a\n" and p.preview.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Generation 1 (seed 9): 4 steps at" in p.status.value and "peak memory" in p.status.value
    assert not p.generate_button.disabled and p.stop_button.disabled
    old = p.seed.value
    assert p.roll() == p.seed.value and 0 <= p.seed.value < 2**31 and p.seed.value != old


def test_panel_runs_in_a_thread_and_stop_interrupts_it(pipe):
    from qwen_nb.panel import Panel

    p = Panel(pipe, prompt=PROMPT, steps=50, seed=1, sizes={"64x64": (64, 64)})

    def press_stop(change):  # as soon as the first preview shows
        p.stop()

    p.preview.observe(press_stop, names="value")
    thread = p.start()
    assert thread is not None and p.start() is None  # one generation at a time
    assert p.wait(60)
    thread.join(10)
    assert isinstance(p.error, GenerationInterrupted)
    assert p.error.step == 2  # the flag is seen by the next step's callback
    assert "stopped after step 2 of 50" in p.status.value
    assert p.image is None and not p.generate_button.disabled
    p.preview.unobserve(press_stop, names="value")
    p.steps.value = 2
    assert p.generate_now() is not None  # the pipeline is usable again


def test_panel_shows_errors_instead_of_losing_them(pipe):
    from qwen_nb.panel import Panel

    p = Panel(pipe, prompt=PROMPT, steps=2, sizes={"bad": (8, 64)})
    assert p.generate_now() is None
    assert isinstance(p.error, ValueError) and "multiple of 16" in p.status.value and p.done.is_set()


def test_cli_writes_a_preview_next_to_the_image(tmp_path, capsys):
    from qwen_nb.__main__ import main

    out = tmp_path / "circle.png"
    args = ["generate", "--prompt", PROMPT, "--out", str(out), "--model", str(TINY), "--dtype", "float32"]
    code = main([*args, "--size", "64x48", "--steps", "3", "--seed", "1", "--quiet", "--preview-every", "2"])
    assert code == 0, capsys.readouterr().err
    from PIL import Image

    preview = Image.open(tmp_path / "circle.preview.png")
    assert preview.size == Image.open(out).size == (64, 48)
    assert f"previews went to {tmp_path / 'circle.preview.png'}" in capsys.readouterr().out
    assert main([*args, "--force", "--steps", "2", "--preview-every", "0"]) == 2
    assert "--preview-every takes a number of steps >= 1" in capsys.readouterr().err
