"""captioner: CNN encoder -> feature v -> LSTM decoder with W_iv·v in every step."""
__all__ = ["Captioner"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Captioner imports torch: loaded on first use, so the torch-free captioner.runtime can import the package.
    if name == "Captioner":
        from .inference import Captioner

        return Captioner
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
