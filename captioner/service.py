"""The HTTP API: POST /v1/captions, GET /healthz, OpenAPI docs at /docs, the Gradio UI at / (the ui extra).

All requests (API and UI) share one model through a Batcher, so concurrent
clients are batched and none runs the model at the same time as another. On a CPU
the model is the checkpoint's bundle in onnxruntime (bundles.load), so serving
imports no torch; on a GPU or with --engine torch it is the torch Captioner. Images
are admitted by their pixel count, read from the header, into a fixed budget
(limits.py): at capacity a request gets 503 with Retry-After instead of growing
memory. Every error body is JSON {"detail": message}: bad input gets a 4xx and
never takes the server down; an unexpected error gets a 500 with an error_id that
is also in the log.

    captioner serve --port 8000
    curl -F images=@dog.jpg -F n_best=3 http://127.0.0.1:8000/v1/captions
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.datastructures import Headers

from . import __version__
from .images import ImageError, ImageTooLarge, decode_cost, open_image
from .limits import MAX_BEAM, MAX_LEN, MAX_N_BEST, Limits, Overloaded, PixelBudget
from .microbatch import Batcher

if TYPE_CHECKING:  # either engine serves: the torch Captioner or the torch-free runtime.Runtime
    from .inference import Captioner
    from .runtime import Runtime

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # an overload lasts about as long as a few large decodes


class Caption(BaseModel):
    caption: str
    score: float


class Tag(BaseModel):
    tag: str  # an everyday noun for the encoder's ImageNet classes (captioner.tags)
    prob: float  # the summed probability of its classes


class CaptionResult(BaseModel):
    filename: str
    caption: str
    score: float
    tags: list[Tag] | None = None  # keywords, likeliest first (absent for an encoder without a classifier)
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


def _error(code: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"detail": message, **extra}, status_code=code)


def _busy(message: str) -> HTTPException:
    return HTTPException(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})


def _token_check(token: str):
    """A dependency that admits requests carrying `Authorization: Bearer <token>`, compared in constant time."""
    expected = f"Bearer {token}".encode()

    async def check(request: Request):
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            raise HTTPException(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
    return check


def create_app(captioner: Captioner | Runtime, limits: Limits = Limits(), ui: bool = True,
               auth_token: str | None = None) -> FastAPI:
    """The service's app. auth_token: when given, /v1/captions wants it as a bearer token and the UI as
    its login password; /healthz stays open for probes."""
    # A job is at most max_files images, so the queue always has room for one when idle.
    batcher = Batcher(captioner, max_queued=max(limits.max_queued, limits.max_files))
    budget = PixelBudget(limits.pixel_budget, limits.max_waiting, limits.max_wait_s)

    def preprocess(src):
        """One image, from any thread: its size and mode from the header, then a decode within the pixel budget."""
        image = open_image(src, limits.max_pixels)
        with budget.admit(decode_cost(image.width, image.height, image.mode)):
            return captioner.preprocess(image)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    # FastAPIOffline serves the /docs page's scripts itself instead of from a CDN: it works offline.
    description = "Image captioning: POST images, get captions." + (" The demo UI is at /." if ui else "")
    app = FastAPIOffline(title="captioner", version=__version__, lifespan=lifespan, description=description)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.state.batcher, app.state.budget = batcher, budget
    _add_error_handlers(app)

    @app.get("/healthz", responses={503: {"description": "the captioning worker has stopped"}})
    async def healthz():
        if not batcher.alive:
            return _error(503, "the captioning worker has stopped", status="down")
        return {"status": "ok", "device": str(captioner.device)}

    _add_captions_route(app, captioner, limits, preprocess, [Depends(_token_check(auth_token))] if auth_token else [])
    if ui:  # gradio is imported only here: the API alone never loads it
        import gradio as gr

        from .ui import build_ui, launch_options

        def caption(images: list, **decode_options) -> list:
            """The UI's door to the model: the API's limits and queue, safe from any thread; waits at most
            limits.max_answer_s. Returns what `Captioner.caption` returns for a list."""
            options = captioner.options(**decode_options)
            future = batcher.submit([preprocess(im) for im in images], options)
            try:
                results = future.result(timeout=limits.max_answer_s)
            except TimeoutError:
                future.cancel()  # still queued: the worker skips it
                raise Overloaded(f"busy: no answer within {limits.max_answer_s:g} s") from None
            return results if options.n_best > 1 else [r[0] for r in results]

        gr.mount_gradio_app(app, build_ui(captioner, caption=caption, limits=limits), path="",
                            **launch_options(limits, auth_token))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                             for e in exc.errors())
        return _error(422, problems)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        error_id = uuid.uuid4().hex[:12]
        log.error("error %s in %s %s", error_id, request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error, id {error_id} in the server log", error_id=error_id)


def _add_captions_route(app: FastAPI, captioner: Captioner | Runtime, limits: Limits, preprocess,
                        dependencies: list) -> None:
    batcher = app.state.batcher

    @app.post("/v1/captions", response_model=CaptionsResponse, response_model_exclude_none=True,
              dependencies=dependencies,
              responses={401: {"description": "the server wants a token and this request has none or another"},
                         413: {"description": "body, file count or image over the limits"},
                         415: {"description": "a file is not a readable image"},
                         503: {"description": "at capacity: retry after the Retry-After header's seconds"}})
    async def captions(images: list[UploadFile] = File(..., description="one or more images, field repeated"),
                       beam_size: int | None = Form(None, ge=1, le=MAX_BEAM, description="default: the model's"),
                       n_best: int = Form(1, ge=1, le=MAX_N_BEST, description="captions per image, <= beam_size"),
                       max_len: int | None = Form(None, ge=1, le=MAX_LEN, description="longest caption in words"),
                       guide: str | None = Form(None, pattern="^(on|off)$",
                                                description="on | off: guided by the tags (default: the model's)")):
        if len(images) > limits.max_files:
            raise HTTPException(413, f"too many files: {len(images)}, the limit is {limits.max_files}")
        try:
            options = captioner.options(beam_size=beam_size, n_best=n_best, max_len=max_len, guide=guide)
        except ValueError as e:  # n_best over the beam
            raise HTTPException(422, str(e)) from None
        names = [f.filename or f"images[{i}]" for i, f in enumerate(images)]
        for f, name in zip(images, names):
            if not f.size:
                raise HTTPException(422, f"{name}: empty file (0 bytes)")

        def preprocess_all():  # the uploads stay spooled (on disk when large) until each is admitted
            pixels = []
            for f, name in zip(images, names):
                try:
                    f.file.seek(0)
                    pixels.append(preprocess(f.file))
                except ImageTooLarge as e:
                    raise HTTPException(413, f"{name}: {e}") from None
                except ImageError as e:
                    raise HTTPException(415, f"{name}: {e}") from None
                except Overloaded as e:
                    raise _busy(f"{name}: {e}") from None
            return pixels

        pixels = await run_in_threadpool(preprocess_all)
        try:
            future = batcher.submit(pixels, options)
        except Overloaded as e:
            raise _busy(str(e)) from None
        results = await asyncio.wrap_future(future)
        return {"results": [{"filename": name, **r[0], **({"captions": r} if n_best > 1 else {})}
                            for name, r in zip(names, results)]}


def serve(captioner: Captioner | Runtime, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          auth_token: str | None = None, ui: bool = True):
    import uvicorn

    if not auth_token and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --auth-token: anyone who can reach this port can use it "
                    "(docs/service.md, Deployment)", host)
    uvicorn.run(create_app(captioner, limits, ui=ui, auth_token=auth_token), host=host, port=port)
