"""What the service takes on: per-request limits, and the pixels it decodes at once.

Memory is the budget. A request waiting for its turn holds only its upload, spooled
to disk; a decode holds its pixels (3 bytes each as RGB, more while a mode conversion
copies them) and the resized image. So the service admits images by their
`images.decode_cost` (in RGB pixels), read from the header, into a fixed budget; when
the budget is spent and the short wait list is full, or a wait runs out, the request
is refused with `Overloaded` (HTTP 503 with Retry-After) instead of growing memory.
No module here imports gradio: the service with the UI off never loads it.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

from .images import MAX_PIXELS

MAX_BEAM, MAX_N_BEST, MAX_LEN = 10, 5, 40  # the decoding options a client may ask for, API and UI alike


class Overloaded(RuntimeError):
    """The service is at capacity: try again shortly."""


@dataclass(frozen=True)
class Limits:
    max_files: int = 16  # images per request
    max_upload_mb: float = 20.0  # whole request body, all files and form overhead
    max_pixels: int = MAX_PIXELS  # width x height of one image, checked before decoding it
    pixels_in_flight: int | None = None  # pixels decoded at once; None: room for two of the largest images
    max_waiting: int = 8  # requests waiting for room in the pixel budget; more are refused at once
    max_wait_s: float = 10.0  # how long one of them waits before it is refused
    max_queued: int = 128  # preprocessed images waiting for the model (600 KB each at 224x224)
    max_answer_s: float = 60.0  # a UI event waits this long for the model, then gives up its place
    ui_workers: int = 4  # UI events preprocessing and waiting at once; each holds a thread of the pool
    ui_queue: int = 16  # UI events waiting for one of those; more are refused at once
    cache_age_s: int = 3600  # uploads to the UI are deleted this long after they arrive

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def pixel_budget(self) -> int:
        return max(self.pixels_in_flight or 2 * self.max_pixels, self.max_pixels)  # one legal image always fits


class PixelBudget:
    """A weighted semaphore over pixels, safe from any thread:
    `with budget.admit(decode_cost(w, h, mode)): decode()`."""

    def __init__(self, capacity: int, max_waiting: int, max_wait_s: float):
        self.capacity, self.max_waiting, self.max_wait_s = capacity, max_waiting, max_wait_s
        self.in_use = self.waiting = 0
        self._changed = threading.Condition()

    @contextmanager
    def admit(self, pixels: int):
        pixels = min(pixels, self.capacity)  # an image over the whole budget waits until it has it all
        with self._changed:
            if self.in_use + pixels > self.capacity:
                if self.waiting >= self.max_waiting:
                    raise Overloaded(f"busy: {self.in_use} pixels being decoded and {self.waiting} images waiting")
                self.waiting += 1
                try:
                    room = self._changed.wait_for(lambda: self.in_use + pixels <= self.capacity, self.max_wait_s)
                finally:
                    self.waiting -= 1
                if not room:
                    raise Overloaded(f"busy: no room to decode this image within {self.max_wait_s:g} s")
            self.in_use += pixels
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= pixels
                self._changed.notify_all()
