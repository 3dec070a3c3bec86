"""The Gradio demo: caption one photo (beam size, n-best list, max length) or several at once.

`build_ui(captioner)` returns the Blocks app; `captioner demo` launches it alone,
`captioner serve` mounts it at / next to the HTTP API. Either way the model runs
one batch at a time: alone, every event shares one Gradio queue slot; in the
service, they go through its Batcher. Both apply the same Limits as the API: files
per event, pixels per image, upload size (launch_options), a bounded event queue,
and uploads deleted after limits.cache_age_s.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

# The demo must work offline: no telemetry or version check calls home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from .images import ImageError, open_image  # noqa: E402
from .limits import MAX_BEAM, MAX_LEN, MAX_N_BEST, Limits, Overloaded  # noqa: E402

if TYPE_CHECKING:  # either engine: the torch Captioner or the torch-free runtime.Runtime
    from .inference import Captioner
    from .runtime import Runtime

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "demo" / "examples"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MODEL_QUEUE = "captioner"  # the one Gradio concurrency group of every event that runs the model


def upload_path(payload) -> str | None:
    """The photo input's value for the functions: the upload's path, unopened, so that only
    images.open_image opens it. gr.Image's own preprocessing opens every upload with Pillow first, in any
    format and before captioner's checks: a truncated file or a bomb fails there with an error that does
    not say why, and an image sent inline as base64 is decoded whole (refused here)."""
    if payload is not None and payload.path is None:
        raise gr.Error("Upload the image as a file: inline (base64) images are not accepted.")
    return None if payload is None else payload.path


def example_images(folder: Path = EXAMPLES_DIR) -> list[str]:
    """The demo's example photos (none when the package is installed without the repo's demo/)."""
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def launch_options(limits: Limits = Limits(), auth_token: str | None = None) -> dict:
    """Keyword arguments for `Blocks.launch` / `gr.mount_gradio_app`: the upload limit, and with a
    token, a login whose password is the token (any user name)."""
    options = {"max_file_size": limits.max_body_bytes}
    if auth_token:
        options["auth"] = lambda _user, password: hmac.compare_digest(password.encode(), auth_token.encode())
    return options


def build_ui(captioner: Captioner | Runtime, caption=None, examples: list[str] | None = None,
             limits: Limits = Limits()) -> gr.Blocks:
    """The demo app around `captioner`.

    caption(images: list, **decode_options) -> list of results runs the model. By
    default it is captioner.caption on images within limits.max_pixels, and all events
    share one queue slot, so one request at a time runs the model. The HTTP service
    passes its own caption instead (its limits, its Batcher), safe to call from
    limits.ui_workers events at once.
    """
    concurrency = 1 if caption is None else limits.ui_workers
    if caption is None:
        def caption(images: list, **decode_options) -> list:
            return captioner.caption([open_image(im, limits.max_pixels) for im in images], **decode_options)
    caption_one, caption_many = _event_functions(caption, limits)
    queue = dict(concurrency_limit=concurrency, concurrency_id=MODEL_QUEUE)
    defaults = captioner.options()
    examples = example_images() if examples is None else examples

    # Gradio keeps every upload on disk until told otherwise: sweep every minute (or sooner for a
    # shorter age) and delete what is older than the age.
    age = limits.cache_age_s
    with gr.Blocks(title="Image captioner", analytics_enabled=False, delete_cache=(min(60, age), age)) as ui:
        gr.Markdown("# Image captioner\nA CNN encoder reads the photo; an LSTM decoder, given the image "
                    "at every step, writes the caption. Beam search keeps the best few candidates.")
        one = _one_image_tab(defaults, examples)
        several = _several_images_tab(defaults)
        inputs = [one.input, *one.options]
        one.run.click(caption_one, inputs, one.outputs, api_name="caption", **queue)
        # A new photo (uploaded or an example clicked) is captioned at once; clearing it clears the output.
        one.input.change(lambda im, *rest: caption_one(im, *rest) if im else ("", "", None), inputs, one.outputs,
                         api_visibility="private", **queue)
        several.run.click(caption_many, [several.input, *several.options], several.outputs,
                          api_name="caption_many", **queue)
    ui.queue(max_size=limits.ui_queue)
    return ui


def _tag_text(result: dict) -> str:
    return ", ".join(f"{t['tag']} {t['prob']:.2f}" for t in result.get("tags") or [])


def _event_functions(caption, limits: Limits):
    """(caption_one, caption_many): what the two tabs run, through `caption`, with Gradio's errors."""
    def run_model(images: list, **decode_options) -> list:
        try:
            return caption(images, **decode_options)
        except Overloaded:
            raise gr.Error("The server is busy; try again in a moment.") from None

    def caption_one(image, beam_size, n_best, max_len):
        if image is None:
            raise gr.Error("Upload an image first.")
        beam_size, n_best = int(beam_size), min(int(n_best), int(beam_size))
        try:
            result = run_model([image], beam_size=beam_size, n_best=n_best, max_len=int(max_len))[0]
        except ImageError as e:
            raise gr.Error(f"Cannot read this image: {e}") from None
        hyps = result if n_best > 1 else [result]
        return hyps[0]["caption"], _tag_text(hyps[0]), [[h["caption"], h["score"]] for h in hyps]

    def caption_many(files, beam_size, max_len):
        if not files:
            raise gr.Error("Upload one or more images first.")
        if len(files) > limits.max_files:
            raise gr.Error(f"Too many files: {len(files)}, the limit is {limits.max_files} at once.")
        options = dict(beam_size=int(beam_size), max_len=int(max_len))
        try:
            results = run_model(files, **options)
        except ImageError:  # find the unreadable ones, caption the rest
            results = []
            for f in files:
                try:
                    results += run_model([f], **options)
                except ImageError as e:
                    results.append({"caption": f"error: {e}", "score": None})
        names = [Path(f).name for f in files]
        gallery = [(f, r["caption"]) for f, r in zip(files, results) if r["score"] is not None]
        return gallery, [[n, r["caption"], r["score"], _tag_text(r)] for n, r in zip(names, results)]

    return caption_one, caption_many


class _Tab(NamedTuple):
    """A tab's components that events use: the input, its button, the decoding options and the outputs."""
    input: gr.components.Component
    run: gr.Button
    outputs: list
    options: list


def _one_image_tab(defaults, examples: list[str]) -> _Tab:
    """One photo: its caption, its tags and the n-best list."""
    with gr.Tab("One image"):
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, label="Photo",
                                 sources=["upload", "clipboard"], elem_id="photo")
                # Gradio calls the component's preprocess (a subclass of gr.Image would make Gradio
                # write a .pyi stub of this module beside it).
                image.preprocess = upload_path
                beam = gr.Slider(1, MAX_BEAM, value=defaults.beam_size, step=1, label="Beam size")
                n_best = gr.Slider(1, MAX_N_BEST, value=1, step=1,
                                   label="Captions shown (n-best, at most the beam size)")
                max_len = gr.Slider(3, MAX_LEN, value=min(defaults.max_len, MAX_LEN), step=1,
                                    label="Max length (words)")
                run = gr.Button("Caption", variant="primary", elem_id="caption-button")
            with gr.Column():
                best = gr.Textbox(label="Caption", elem_id="caption", interactive=False)
                tags = gr.Textbox(label="Tags (the encoder's ImageNet classes as nouns, with probabilities)",
                                  elem_id="tags", interactive=False)
                table = gr.Dataframe(headers=["caption", "score (log-prob, length-normalised)"], label="N best",
                                     interactive=False, wrap=True, column_widths=["75%", "25%"])
        if examples:
            gr.Examples(examples=[[p] for p in examples], inputs=[image], cache_examples=False)
    return _Tab(image, run, [best, tags, table], [beam, n_best, max_len])


def _several_images_tab(defaults) -> _Tab:
    """Several photos at once: a gallery and a table of captions."""
    with gr.Tab("Several images"):
        with gr.Row():
            with gr.Column():
                files = gr.File(file_count="multiple", file_types=["image"], label="Photos", elem_id="photos")
                beam = gr.Slider(1, MAX_BEAM, value=defaults.beam_size, step=1, label="Beam size")
                max_len = gr.Slider(3, MAX_LEN, value=min(defaults.max_len, MAX_LEN), step=1,
                                    label="Max length (words)")
                run = gr.Button("Caption all", variant="primary")
            with gr.Column():
                gallery = gr.Gallery(label="Captioned", columns=3)
                table = gr.Dataframe(headers=["file", "caption", "score", "tags"], interactive=False,
                                     wrap=True, column_widths=["20%", "45%", "10%", "25%"])
    return _Tab(files, run, [gallery, table], [beam, max_len])
