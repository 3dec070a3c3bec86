"""One model, many callers: a worker thread that micro-batches concurrent caption requests.

Requests from any number of threads (HTTP handlers, the Gradio UI) are queued;
the single worker takes everything pending, groups requests with the same
decoding options and runs each group as one batch through the Captioner. The
model is only ever touched from that one thread. Images are decoded in the
caller's thread, so bad files fail fast and decoding runs in parallel with the model.

The worker survives any one request: a cancelled request is skipped, and an
error reaches only the request that caused it. The queue is bounded in images:
past `max_queued`, submit raises Overloaded instead of growing memory.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import astuple, dataclass, field
from typing import TYPE_CHECKING, Any

from .config import DecodeConfig
from .limits import Limits, Overloaded

if TYPE_CHECKING:  # either engine serves: the torch Captioner or the torch-free runtime.Runtime
    from .inference import Captioner
    from .runtime import Runtime


@dataclass
class _Job:
    pixels: list[Any]  # torch tensors for a Captioner, numpy arrays for a Runtime
    options: DecodeConfig  # jobs with equal options share a batch
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(self, captioner: Captioner | Runtime, max_batch: int | None = None,
                 max_queued: int = Limits.max_queued):
        # On CPU the encoder is fastest per image at batches of 4-8 (measured: 16 is slower
        # than 8); a GPU wants bigger batches.
        self.max_batch = max_batch or (32 if str(captioner.device).startswith("cuda") else 8)
        self.max_queued = max_queued
        self.captioner = captioner
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._queued = 0  # images submitted and not yet taken by the worker
        self._lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="captioner-batcher", daemon=True)
        self._worker.start()

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def submit(self, pixels: list, options: DecodeConfig | None = None) -> Future:
        """Queue preprocessed images; the future resolves to each image's formatted hypotheses
        (`Captioner.format`). pixels: from the captioner's preprocess; options: from its
        `options(...)`, checked by the caller.

        Raises Overloaded when the queue is full, ValueError for a job bigger than the whole
        queue (even an idle worker would hold it longer than the queue allows), RuntimeError once closed."""
        job = _Job(list(pixels), options or self.captioner.options())
        if len(job.pixels) > self.max_queued:
            raise ValueError(f"{len(job.pixels)} images at once, over the queue's {self.max_queued}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._queued + len(job.pixels) > self.max_queued:
                raise Overloaded(f"busy: {self._queued} images queued for the model")
            self._queued += len(job.pixels)
            self._jobs.put(job)
        return job.future

    def close(self):
        """Finish the queued requests, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self._worker.join()

    def _run(self):
        while True:
            pending = [self._jobs.get()]
            while pending[-1] is not None and sum(len(j.pixels) for j in pending) < self.max_batch:
                try:
                    pending.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            jobs = [j for j in pending if j is not None]
            with self._lock:
                self._queued -= sum(len(j.pixels) for j in jobs)
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                if job.future.set_running_or_notify_cancel():  # False: cancelled while queued, skip it
                    groups.setdefault(astuple(job.options), []).append(job)
            for group in groups.values():
                self._run_group(group, group[0].options)
            if pending[-1] is None:  # close() was called: everything before it is answered
                return

    def _run_group(self, jobs: list[_Job], options: DecodeConfig):
        cap = self.captioner
        try:
            pixels = [p for j in jobs for p in j.pixels]
            results = []
            for i in range(0, len(pixels), self.max_batch):
                batch = cap.stack(pixels[i:i + self.max_batch])
                results += cap.describe(cap.encode(batch), options)
        except Exception as e:  # an invalid option, a malformed tensor...: fail only the job at fault
            if len(jobs) > 1:
                for j in jobs:  # alone, each job succeeds or fails on its own account
                    self._run_group([j], options)
            else:
                jobs[0].future.set_exception(e)
            return
        for j in jobs:
            j.future.set_result(results[:len(j.pixels)])
            results = results[len(j.pixels):]
