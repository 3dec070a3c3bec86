"""captioner: CNN encoder -> feature v -> LSTM decoder with W_iv·v in every step."""
from .inference import Captioner

__all__ = ["Captioner"]
__version__ = "0.1.0"
