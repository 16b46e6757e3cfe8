"""An ipywidgets panel for `QwenImagePipeline.generate`: prompt, negative prompt, steps, CFG, seed (with a dice),
size preset, the fast choice (off, or the Lightning LoRA's 8 or 4 steps with CFG off), Generate and Stop; it shows
the live preview, the final image, the time per step and the peak memory.
For an edit pipeline (`QwenImageEditPipeline`) it is in edit mode: a picture upload (one picture, or up to 3 for
Edit-2509/2511) shown as thumbnails, and a size taken from the last picture unless a preset is chosen.

`panel(pipe)` builds and displays one. Generate runs in a background thread so the notebook stays responsive and
Stop works: Stop sets a flag that the step callback checks, raising KeyboardInterrupt there, which `generate`
turns into GenerationInterrupted after the current step. `generate_now()` runs the same thing synchronously (for
scripts, tests and notebook cells that must finish before the next one); `done` is set whenever no generation runs.
"""

import io
import os
import threading
import time

from PIL import Image

from .pipeline import ASPECTS, DEFAULT_CFG, DEFAULT_STEPS, GenerationInterrupted

DISPLAY_PX = 256  # the side the images are shown at
THUMB_PX = 96  # the side the edit mode's input pictures are shown at
FAST = {"off": 0, "8 steps": 8, "4 steps": 4}  # the fast choice: the Lightning LoRA for that many steps (0: none)
FROM_PICTURE = "from the last picture"  # the edit mode's default size


def sizes_for(pipe) -> dict[str, tuple[int, int]]:
    """Size presets {label: (width, height)}: the one size of a checkpoint that declares it was trained at one
    (the demo model), else its native size (1024x1024) and the model card's aspect ratios. An edit pipeline's
    first entry is (None, None): the size the last picture gives."""
    h, w = pipe.native_size
    native = {f"native {w}x{h}": (w, h)}
    if getattr(pipe, "reads_pictures", False):
        return {FROM_PICTURE: (None, None), **{f"{k} {w}x{h}": (w, h) for k, (w, h) in ASPECTS.items()}}
    if pipe.sizes.native_declared:
        return native
    return {**native, **{f"{k} {w}x{h}": (w, h) for k, (w, h) in ASPECTS.items()}}


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") >> 1  # 31 bits: fits an IntText and every seed field


class Panel:
    """The widgets around one pipeline. Display it (`display(panel)`, or the last line of a cell)."""

    def __init__(
        self,
        pipe,
        prompt: str | None = None,
        negative_prompt: str = " ",
        steps: int = 20,
        cfg_scale: float = 4.0,
        seed: int = 42,
        sizes: dict | None = None,
        preview_every: int = 1,
        lightning: dict | None = None,
    ):
        """`lightning` {8: file, 4: file}: Lightning LoRA files to use for the fast choice instead of the hub's."""
        import ipywidgets as w

        self.pipe = pipe
        self.editing = getattr(pipe, "reads_pictures", False)  # an edit pipeline: pictures in, edited picture out
        self.pictures = []  # the edit mode's input pictures (PIL), in order
        self.preview_every = preview_every
        self.sizes = sizes or sizes_for(pipe)
        self.image = None  # the last finished image (PIL)
        self.error: BaseException | None = None  # what stopped the last generation, if anything
        self.runs = 0
        self.done = threading.Event()
        self.done.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        full = w.Layout(width="96%")
        if prompt is None:
            prompt = (
                "make the background a starry night"
                if self.editing
                else "a red circle at the top left on a blue background"
            )
        self.prompt = w.Textarea(value=prompt, description="Prompt", rows=2, layout=full)
        self.negative = w.Text(value=negative_prompt, description="Negative", layout=full)
        self.steps = w.IntSlider(value=steps, min=1, max=100, description="Steps")
        self.cfg = w.FloatSlider(value=cfg_scale, min=0.0, max=10.0, step=0.5, description="CFG")
        self.seed = w.IntText(value=seed, description="Seed", layout=w.Layout(width="220px"))
        self.dice = w.Button(icon="random", tooltip="dice: draw a random seed", layout=w.Layout(width="48px"))
        self.size = w.Dropdown(options=list(self.sizes), description="Size")
        self.lightning = dict(lightning or {})
        self._fast, self._lightning_lora = None, None  # the fast choice applied, and the LoRA it loaded
        self.fast = w.ToggleButtons(options=list(FAST.items()), value=0, description="Fast")
        self.fast.style.button_width = "72px"
        self.fast.observe(lambda change: self._fast_chosen(change["new"]), names="value")
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        shown = {"width": f"{DISPLAY_PX}px", "height": f"{DISPLAY_PX}px"}
        self.preview = w.Image(format="png", layout=w.Layout(**shown, border="1px solid #ccc"))
        self.final = w.Image(format="png", layout=w.Layout(**shown, border="1px solid #ccc"))
        self.status = w.HTML(value="ready")
        self.upload = w.FileUpload(accept="image/*", multiple=True, description="Pictures")
        self.thumbnails = w.HBox([])
        self.upload.observe(lambda change: self._uploaded(change["new"]), names="value")
        for widget, name in [
            (self.generate_button, "generate"),
            (self.stop_button, "stop"),
            (self.dice, "dice"),
            (self.preview, "preview"),
            (self.final, "final"),
            (self.status, "status"),
            (self.upload, "upload"),
            (self.thumbnails, "pictures"),
            (self.fast, "fast"),
        ]:
            widget.add_class(f"qwen-nb-{name}")  # stable hooks for the browser test

        self.dice.on_click(lambda _: self.roll())
        self.generate_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        caption = {"font_size": "12px"}
        pictures = [w.HBox([self.upload, self.thumbnails])] if self.editing else []
        self.widget = w.VBox(
            [
                *pictures,
                self.prompt,
                self.negative,
                w.HBox([self.steps, self.cfg]),
                *([self.fast] if hasattr(pipe, "use_lightning") else []),  # Qwen-Image 2.1 has no Lightning LoRA
                w.HBox([self.seed, self.dice, self.size]),
                w.HBox([self.generate_button, self.stop_button]),
                w.HBox(
                    [
                        w.VBox(
                            [w.HTML("<b>preview</b> (the guess of the final picture)", style=caption), self.preview]
                        ),
                        w.VBox([w.HTML("<b>image</b>", style=caption), self.final]),
                    ]
                ),
                self.status,
            ]
        )
        self.widget.add_class("qwen-nb-panel")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ actions
    def roll(self) -> int:
        """The dice: a new random seed in the seed box."""
        self.seed.value = random_seed()
        return self.seed.value

    def _fast_chosen(self, steps: int | None) -> None:
        """The switch moved: steps and CFG show the choice's defaults (the LoRA loads when Generate runs)."""
        self.steps.value = steps or DEFAULT_STEPS
        self.cfg.value = 1.0 if steps else DEFAULT_CFG

    def set_fast(self, steps: int | None) -> None:
        """Apply the fast choice to the pipeline: the Lightning LoRA for `steps` (8 or 4) and its schedule, or the
        base model (None or 0); LoRAs loaded otherwise stay. Generate applies the switch's value this way."""
        steps = steps or None
        if steps == self._fast:
            return
        pipe = self.pipe
        if self._fast is not None:  # the Lightning LoRA out; the others stay
            pipe.unload_lora(self._lightning_lora)
            pipe.use_base_schedule()
            self._fast, self._lightning_lora = None, None
        if steps is not None:
            pipe.use_lightning(steps, lora=self.lightning.get(steps))
            self._fast, self._lightning_lora = steps, pipe.loras.entries[-1][0]

    def set_pictures(self, pictures) -> None:
        """The edit mode's input pictures (PIL images or paths; what the upload sets), shown as thumbnails."""
        import ipywidgets as w

        pictures = [p if isinstance(p, Image.Image) else Image.open(p) for p in pictures]
        self.pictures = pictures
        thumbs = []
        for p in pictures:
            small = p.copy()
            small.thumbnail((THUMB_PX, THUMB_PX))
            thumbs.append(w.Image(value=png_bytes(small), format="png", layout=w.Layout(border="1px solid #ccc")))
        self.thumbnails.children = thumbs
        limit = getattr(self.pipe, "max_pictures", len(pictures))
        note = f" (this model takes at most {limit})" if len(pictures) > limit else ""
        self.status.value = f"{len(pictures)} picture(s) to edit{note}"

    def _uploaded(self, files) -> None:
        try:  # ipywidgets 8: a tuple of {"name", "content", ...}
            self.set_pictures([Image.open(io.BytesIO(bytes(f["content"]))) for f in files])
        except Exception as e:  # a file that is not a picture: said in the panel
            self.status.value = f"<span style='color:#b00'>could not read the upload: {_escape(str(e))}</span>"

    def params(self) -> dict:
        """generate()'s arguments as the widgets hold them now."""
        width, height = self.sizes[self.size.value]
        params = dict(
            prompt=self.prompt.value,
            negative_prompt=self.negative.value,
            height=height,
            width=width,
            steps=int(self.steps.value),
            cfg_scale=float(self.cfg.value),
            seed=int(self.seed.value),
        )
        if self.editing:
            # one picture as itself (a list of one changes how Qwen-Image-Edit reads it, as in diffusers); none:
            # generate() says a picture is needed
            pictures = self.pictures
            params["image"] = None if not pictures else pictures[0] if len(pictures) == 1 else list(pictures)
        return params

    def start(self) -> threading.Thread | None:
        """Generate in a background thread (what the button does); None if a generation is already running."""
        if not self.done.is_set():
            return None
        self._begin()
        self._thread = threading.Thread(target=self._run, args=(self.params(),), daemon=True)
        self._thread.start()
        return self._thread

    def generate_now(self):
        """Generate in this thread and return the image (None when stopped or failed: see `error`)."""
        if not self.done.is_set():
            raise RuntimeError("a generation is running: wait for panel.done, or press Stop")
        self._begin()
        self._run(self.params())
        return self.image

    def stop(self) -> None:
        """Ask the running generation to stop after its current step."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no generation runs; False on timeout."""
        return self.done.wait(timeout)

    # ------------------------------------------------------------------ the run
    def _begin(self) -> None:
        self.done.clear()
        self._stop.clear()
        self.error = None
        self.runs += 1
        self.generate_button.disabled = True
        self.stop_button.disabled = False

    def _run(self, params: dict) -> None:
        start = time.perf_counter()
        steps = params["steps"]
        self.status.value = f"Generation {self.runs} (seed {params['seed']}): starting"

        def on_step(step, latents):
            if self._stop.is_set():
                raise KeyboardInterrupt
            per_step = (time.perf_counter() - start) / (step + 1)
            self.status.value = (
                f"Generation {self.runs} (seed {params['seed']}): step {step + 1}/{steps}, {per_step:.3f} s/step so far"
            )

        def on_preview(step, image):
            self.preview.value = png_bytes(image)

        try:
            if (self.fast.value or None) != self._fast:
                self.status.value = f"Generation {self.runs}: loading the fast choice ({self.fast.label})"
                self.set_fast(self.fast.value)
            image = self.pipe.generate(
                **params, callback=on_step, preview=on_preview, preview_every=self.preview_every, progress=False
            )
        except GenerationInterrupted as e:
            self.error = e
            self.status.value = f"Generation {self.runs}: stopped after step {e.step} of {e.steps}"
        except Exception as e:  # shown in the panel: a thread's exception would otherwise vanish
            self.error = e
            self.status.value = f"<span style='color:#b00'>Generation {self.runs} failed: {_escape(str(e))}</span>"
        else:
            self.image = image
            self.final.value = png_bytes(image)
            self.status.value = f"Generation {self.runs} (seed {params['seed']}): {self.pipe.last_stats}"
        finally:
            self.generate_button.disabled = False
            self.stop_button.disabled = True
            self.done.set()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def panel(pipe, **options) -> Panel:
    """Build a Panel for `pipe` and display it (in a notebook); returns it."""
    from IPython.display import display

    p = Panel(pipe, **options)
    display(p)
    return p


__all__ = ["Panel", "panel", "sizes_for"]
