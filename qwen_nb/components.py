"""The pipeline's models, each built on first use, released to free its memory and built again when needed.

`ComponentStore({"transformer": build, "text_encoder": build, "vae": build})` takes zero-argument functions: a
checkpoint's own loaders (`load_transformer`, `load_text_encoder`, `load_vae` on its folders, all lazy) or functions
that build models in memory. A model given as a module is wrapped in a function returning it, so releasing it frees
nothing, and the pipeline works the same.
"""

import gc
from collections import Counter

import mlx.core as mx
import mlx.nn as nn


def as_builder(model_or_function):
    """A zero-argument function building the model: the function itself, or one returning the module given."""
    if callable(model_or_function) and not isinstance(model_or_function, nn.Module):
        return model_or_function
    return lambda: model_or_function


class ComponentStore:
    def __init__(self, builders: dict):
        self._builders = dict(builders)
        self._models = {}
        self.builds = Counter()  # how often each model was built (each build of a checkpoint's reads its files)

    def __getitem__(self, name: str):
        if name not in self._models:
            self._models[name] = self._builders[name]()
            self.builds[name] += 1
        return self._models[name]

    def loaded(self, name: str) -> bool:
        return name in self._models

    def release(self, name: str) -> None:
        """Forget the model (its memory is freed once nothing else holds it); the next use builds it again."""
        if self._models.pop(name, None) is not None:
            gc.collect()
            mx.clear_cache()

    def replace(self, name: str, model) -> None:
        """Hold `model` as this component until it is released (a wrapped model in a test, say)."""
        self._models[name] = model
