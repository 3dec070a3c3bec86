"""The HTTP API: POST /v1/captions, GET /healthz, OpenAPI docs at /docs, the Gradio UI at /.

All requests (API and UI) share one Captioner through a Batcher, so concurrent
clients are batched and none runs the model at the same time as another. Bad
input gets a 4xx JSON error {"detail": message} and never takes the server down.

    captioner serve --port 8000
    curl -F images=@dog.jpg -F n_best=3 http://127.0.0.1:8000/v1/captions
"""
from __future__ import annotations

import asyncio
import io
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel
from starlette.datastructures import Headers

from . import __version__
from .microbatch import Batcher
from .images import ImageError
from .inference import Captioner
from .ui import MAX_BEAM, MAX_LEN, build_ui


@dataclass(frozen=True)
class Limits:
    max_files: int = 16  # images per request
    max_upload_mb: float = 20.0  # whole request body, all files and form overhead
    max_pixels: int = 40_000_000  # width x height of one image, checked before decoding it

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class Caption(BaseModel):
    caption: str
    score: float


class CaptionResult(BaseModel):
    filename: str
    caption: str
    score: float
    captions: list[Caption] | None = None  # the n-best list, only when n_best > 1


class CaptionsResponse(BaseModel):
    results: list[CaptionResult]


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit / 2**20:g} MB")


class BodyLimit:
    """ASGI middleware: refuse a request body over max_bytes while it is read, never buffering more.

    A declared Content-Length over the limit is refused before reading anything; a
    body without one (chunked) is counted as it streams in and cut off at the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(413, BodyTooLarge(self.max_bytes).detail)(scope, receive, send)
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)  # an HTTPException: route handlers turn it into the 413
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:  # raised outside a route's handlers (e.g. in a mounted app)
            if started:
                raise
            await _error(413, e.detail)(scope, receive, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def _check_and_preprocess(captioner: Captioner, data: bytes, name: str, max_pixels: int) -> torch.Tensor:
    if not data:
        raise HTTPException(422, f"{name}: empty file (0 bytes)")
    try:  # the header alone gives the size: refuse huge images before decoding any pixels
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"{name}: image too large: {e}") from None
    except Exception:
        pass  # not an image Pillow knows: preprocess below says why
    else:
        if width * height > max_pixels:
            raise HTTPException(413, f"{name}: image is {width}x{height} = {width * height} pixels, "
                                     f"over the limit of {max_pixels}")
    try:
        return captioner.preprocess(data)
    except ImageError as e:
        raise HTTPException(415, f"{name}: {e}") from None


def create_app(captioner: Captioner, limits: Limits = Limits(), ui: bool = True) -> FastAPI:
    batcher = Batcher(captioner)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    # FastAPIOffline serves the /docs page's scripts itself instead of from a CDN: it works offline.
    app = FastAPIOffline(title="captioner", version=__version__, lifespan=lifespan,
                         description="Image captioning: POST images, get captions. The demo UI is at /.")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                             for e in exc.errors())
        return _error(422, problems)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "device": str(captioner.device)}

    @app.post("/v1/captions", response_model=CaptionsResponse, response_model_exclude_none=True,
              responses={413: {"description": "body, file count or image over the limits"},
                         415: {"description": "a file is not a readable image"}})
    async def captions(images: list[UploadFile] = File(..., description="one or more images, field repeated"),
                       beam_size: int | None = Form(None, ge=1, le=MAX_BEAM, description="default: the model's"),
                       n_best: int = Form(1, ge=1, le=MAX_BEAM, description="captions per image, <= beam_size"),
                       max_len: int | None = Form(None, ge=1, le=MAX_LEN, description="longest caption in words")):
        if len(images) > limits.max_files:
            raise HTTPException(413, f"too many files: {len(images)}, the limit is {limits.max_files}")
        beam_size = beam_size or captioner.config.decode.beam_size
        if n_best > beam_size:
            raise HTTPException(422, f"n_best ({n_best}) must not exceed beam_size ({beam_size})")
        names = [f.filename or f"images[{i}]" for i, f in enumerate(images)]
        datas = [await f.read() for f in images]
        pixels = await run_in_threadpool(
            lambda: [_check_and_preprocess(captioner, d, n, limits.max_pixels) for d, n in zip(datas, names)])
        results = await asyncio.wrap_future(
            batcher.submit(pixels, beam_size=beam_size, n_best=n_best, max_len=max_len))
        out = []
        for name, r in zip(names, results):
            if n_best > 1:
                out.append({"filename": name, **r[0], "captions": r})
            else:
                out.append({"filename": name, **r})
        return {"results": out}

    if ui:
        import gradio as gr

        gr.mount_gradio_app(app, build_ui(captioner, caption=batcher.caption), path="")
    return app


def serve(captioner: Captioner, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits()):
    import uvicorn

    uvicorn.run(create_app(captioner, limits), host=host, port=port)
