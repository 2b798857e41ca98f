"""condiquant: low-bit post-training quantization of image super-resolution networks.

``condiquant.quantize(model, QuantConfig(...), calib=..., scale=...)`` and ``condiquant.evaluate(model, ...)`` are
the Python API (``condiquant/api.py``); ``train.py`` / ``test.py`` are the same pipeline driven by YAML.
"""

__version__ = "0.1.0"

__all__ = ["QuantConfig", "quantize", "evaluate", "rewrite_matmuls"]


def __getattr__(name: str):
    # Lazy, so that importing any submodule does not import the whole pipeline (and cannot import in a circle).
    if name in __all__:
        from condiquant import api

        return getattr(api, name)
    raise AttributeError(f"module 'condiquant' has no attribute {name!r}")
