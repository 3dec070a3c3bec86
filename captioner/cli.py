"""Command line: `captioner <command> ...`. Commands that caption get their model from bundles.load (the
torch-free runtime on a CPU) or inference.Captioner, never by building one."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UI_NEEDS, CheckpointError, StaleCache, WeightsUnavailable, file_system_error, missing_package
from .output import Deprecated, decode_args, decode_options, print_captions


def _model_args(p):
    """The model a command captions with: which checkpoint, on which device, in which precision, run by which
    encoder engine."""
    p.add_argument("--checkpoint", "-c", default=None, help="checkpoint file (default: the shipped model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="decoder precision (default: the model's); bf16 is faster on AMX/AVX512-BF16 CPUs and GPUs")
    _engine_arg(p)


def _engine_arg(p):
    p.add_argument("--engine", choices=["auto", "onnxruntime", "torch"], default=None,
                   help="what runs the encoder (default: the model's, auto = onnxruntime on a CPU, torch on a GPU)")


def _server_args(p, port: int):
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for every one)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--max-pixels", type=int, help="width x height limit of one image (default 40 million)")
    p.add_argument("--auth-token", default=os.environ.get("CAPTIONER_AUTH_TOKEN") or None,
                   help="a secret the API wants as 'Authorization: Bearer TOKEN' and the UI as its login password "
                        "(default: $CAPTIONER_AUTH_TOKEN; set one whenever --host is beyond loopback)")


def cmd_caption(args):
    from . import bundles
    from .config import DecodeConfig

    DecodeConfig().replace(**decode_options(args))  # a bad value fails here, whichever engine then serves
    cap = bundles.load(args.checkpoint, device=args.device, precision=args.precision, engine=args.engine)
    return print_captions(cap.caption, args.images, n_best=args.n_best, as_json=args.json, **decode_options(args))


def _sidecars(args):
    """caption-dir's --sidecar, --sidecar-dir, --embed and --overwrite as a sidecars.Sidecars (None: none asked)."""
    from pathlib import Path

    from .files import DEFAULT_CHECKPOINT, file_sha256
    from .sidecars import Sidecars

    if not (args.sidecar or args.embed):
        if args.sidecar_dir or args.overwrite:
            raise ValueError("--sidecar-dir and --overwrite go with --sidecar or --embed")
        return None
    checkpoint = Path(args.checkpoint or DEFAULT_CHECKPOINT)
    folder = Path(args.sidecar_dir) if args.sidecar_dir else None
    return Sidecars(kinds=tuple(dict.fromkeys(args.sidecar)), folder=folder, overwrite=args.overwrite, embed=args.embed,
                    model=f"{checkpoint.name} sha256:{file_sha256(checkpoint)[:16]}")


def cmd_caption_dir(args):
    from . import bundles
    from .folder import DEFAULT_EXTS, caption_dir
    from .shards import resolve_shard

    index, count, source = resolve_shard(args.shard)  # before loading the model: a typo fails fast
    if count > 1:
        print(f"caption-dir: shard {index}/{count} (from {source})", file=sys.stderr)
    out = args.out.replace("{shard}", f"{index}-of-{count}")
    sidecars = _sidecars(args)
    cap = bundles.load(args.checkpoint, device=args.device, precision=args.precision, engine=args.engine)
    exts = args.ext.split(",") if args.ext else DEFAULT_EXTS
    s = caption_dir(cap, args.dir, out, recursive=args.recursive, exts=exts,
                    batch_size=args.batch_size, workers=args.workers, shard_spec=(index, count),
                    retry_errors=args.retry_errors, wait=args.wait, options=cap.options(**decode_options(args)),
                    sidecars=sidecars)
    retried = f" ({s.retried} of them retried error rows)" if s.retried else ""
    print(f"{s.total} images: {s.captioned} captioned, {s.errors} errors{retried}, {s.skipped} already in {out}",
          file=sys.stderr)
    if sidecars:
        print(f"sidecars and embedding: {sidecars.report() or 'nothing to write'}", file=sys.stderr)
    return 0


def cmd_alt_text(args):
    from . import bundles
    from .alttext import fill_alt_text
    from .config import DecodeConfig
    from .files import write_atomic

    DecodeConfig().replace(**decode_options(args))
    cap = bundles.load(args.checkpoint, device=args.device, precision=args.precision, engine=args.engine)
    page, report = fill_alt_text(args.page, lambda path: cap.caption(path, **decode_options(args))["caption"])
    if args.in_place:
        if report.filled:
            write_atomic(os.path.realpath(args.page), page)
    else:
        sys.stdout.buffer.write(page)
        sys.stdout.flush()
    print(f"alt-text: {report}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_evaluate(args):
    from .evaluate import evaluate, format_report

    report = evaluate(args.data, args.split, args.images, checkpoint=args.checkpoint, device=args.device,
                      precision=args.precision, engine=args.engine,
                      results=args.results, human=args.human, coco=False if args.no_coco else None,
                      out=args.out, batch_size=args.batch_size, workers=args.workers, progress=not args.json,
                      **decode_options(args))
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def cmd_extract_features(args):
    from .config import load_config
    from .features import extract_all

    cfg = load_config(args.config, args.overrides)
    if args.engine:
        cfg.decode.engine = args.engine
    extract_all(cfg, batch_size=args.batch_size, num_workers=args.workers)
    return 0


def cmd_train(args):
    from .config import load_config
    from .train import train

    train(load_config(args.config, args.overrides), resume=args.resume)
    return 0


def cmd_finetune(args):
    from .finetune import Settings, finetune, format_report

    given = dict(start=args.start, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                 min_count=args.min_count, replay=args.replay, self_critical=args.self_critical,
                 val_fraction=args.val_fraction, device=args.device, seed=args.seed, workers=args.workers,
                 forget_budget=args.forget_budget)
    settings = Settings(**{k: v for k, v in given.items() if v is not None})  # unset: Settings' defaults
    report = finetune(args.data, args.out, fmt=args.format, images=args.images, val=args.val, settings=settings)
    print(format_report(report, args.out))
    return 0


def _gradio_installed() -> bool:
    """Whether the ui extra's gradio is there. A folder named gradio in the working directory imports as an
    empty namespace package (a spec without an origin): that is no gradio either."""
    from importlib.util import find_spec

    spec = find_spec("gradio")
    return spec is not None and spec.origin is not None


def cmd_demo(args):
    if not _gradio_installed():
        raise ImportError("no gradio", name="gradio")  # main prints missing_package's one line
    from . import bundles
    from .limits import Limits
    from .ui import build_ui, launch_options

    cap = bundles.load(args.checkpoint, device=args.device, precision=args.precision, engine=args.engine)
    limits = Limits(**({"max_pixels": args.max_pixels} if args.max_pixels else {}))
    build_ui(cap, limits=limits).launch(server_name=args.host, server_port=args.port,
                                        **launch_options(limits, args.auth_token))
    return 0


def cmd_serve(args):
    from . import bundles
    from .service import Limits, serve

    ui = args.ui
    if ui and not _gradio_installed():  # a plain install (no ui extra) still serves what it can: the API
        print(f"captioner serve: serving the API alone: the demo page at / needs {UI_NEEDS}", file=sys.stderr)
        ui = False
    given = dict(max_files=args.max_files, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                 pixels_in_flight=args.pixels_in_flight)
    limits = Limits(**{k: v for k, v in given.items() if v is not None})  # unset: the service's defaults
    cap = bundles.load(args.checkpoint, device=args.device, precision=args.precision, engine=args.engine)
    serve(cap, host=args.host, port=args.port, limits=limits, auth_token=args.auth_token, ui=ui)
    return 0


def cmd_export(args):
    from .export import ExportError, export

    try:
        out = export(args.checkpoint, args.out, int8_decoder=args.int8_decoder)
    except ExportError as e:
        print(f"captioner export: cannot export: {e}", file=sys.stderr)
        return 2
    print(f"bundle written to {out}; caption without torch: python -m captioner.runtime {out} IMAGE ...",
          file=sys.stderr)
    return 0


def _caption_dir_parser(sub):
    p = sub.add_parser("caption-dir", help="caption every image in a folder into a .jsonl or .csv (resumable)")
    p.add_argument("dir", help="folder of images")
    p.add_argument("--out", required=True, metavar="RESULTS_FILE", help="results file, .jsonl or .csv; rerunning "
                   "with it resumes. {shard} in it becomes i-of-n, so the shards of one torchrun command write apart")
    p.add_argument("--recursive", action="store_true", help="include subfolders")
    p.add_argument("--ext", default=None, help="comma-separated extensions"
                   " (default: jpg,jpeg,png,gif,bmp,webp,tif,tiff)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (0 = in the main process)")
    p.add_argument("--shard", default=None,
                   help="i/n (0 <= i < n): caption only shard i of n; a file's shard is a hash of its relative path. "
                        "Default: from torchrun's RANK/WORLD_SIZE or a Slurm array's "
                        "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else 0/1")
    p.add_argument("--retry-errors", action="store_true", help="caption again the images whose row is an error")
    p.add_argument("--wait", action="store_true",
                   help="if another run is writing --out, wait for it to end (default: refuse at once)")
    _model_args(p)
    decode_args(p)
    p.add_argument("--sidecar", action="append", choices=["xmp", "txt"], default=[],
                   help="also write the caption beside each photo: xmp (photo.jpg.xmp: description, keywords, "
                   "model; merged into an existing one) or txt (photo.txt); repeatable")
    p.add_argument("--sidecar-dir", default=None, help="write the sidecars into this folder, mirroring the photos' "
                   "tree (default: beside each photo)")
    p.add_argument("--embed", action="store_true", help="also write the caption into each JPEG's and PNG's own XMP "
                   "(rewrites your files; the pixels are checked unchanged, else the original is put back)")
    p.add_argument("--overwrite", action="store_true", help="replace a description or txt someone else wrote "
                   "(default: keep it)")
    p.set_defaults(func=cmd_caption_dir)


def _alt_text_parser(sub):
    p = sub.add_parser("alt-text", help="fill the missing or empty alt text of a web page's local images")
    p.add_argument("page", help="HTML file; src paths are read relative to it")
    p.add_argument("--in-place", action="store_true",
                   help="rewrite the page (atomically) instead of printing the filled page to stdout")
    _model_args(p)
    decode_args(p)
    p.set_defaults(func=cmd_alt_text)


def _caption_parser(sub):
    p = sub.add_parser("caption", help="caption images")
    p.add_argument("images", nargs="+", help="image files")
    _model_args(p)
    decode_args(p)
    p.add_argument("--n-best", type=int, default=1, help="print the N best captions per image")
    p.add_argument("--json", action="store_true", help='JSON lines: {"image", "caption", "score"}')
    p.set_defaults(func=cmd_caption)


def _evaluate_parser(sub):
    p = sub.add_parser("evaluate",
                       help="BLEU (and coco-caption metrics) of a model, a results file or humans on a split")
    p.add_argument("--data", required=True, help="Flickr8k folder, Karpathy split JSON or COCO captions JSON")
    p.add_argument("--split", default=None, help="train, dev or test (Flickr8k, Karpathy; not for a COCO file)")
    p.add_argument("--images", default=None, help="image folder (Karpathy, COCO)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--results", default=None, help='score this COCO results file [{"image_id", "caption"}] '
                        "instead of a model")
    source.add_argument("--human", action="store_true", help="human ceiling: leave-one-out BLEU of the references")
    p.add_argument("--out", default=None, metavar="REPORT_DIR",
                   help="write results.json, per_image.csv and scores.json here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--no-coco", action="store_true", help="skip the coco-caption metrics (they need Java)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (0 = in the main process)")
    _model_args(p)
    decode_args(p)
    p.set_defaults(func=cmd_evaluate)


def _training_parsers(sub):
    """extract-features and train: both read a training config and take section.key=value overrides."""
    p = sub.add_parser("extract-features", help="cache encoder features of the train and dev splits")
    p.add_argument("--config", required=True, help="training config YAML (configs/*.yaml)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (0 = in the main process)")
    _engine_arg(p)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=cmd_extract_features)

    p = sub.add_parser("train", help="train a decoder (also under torchrun for DDP)")
    p.add_argument("--config", required=True, help="training config YAML (configs/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=cmd_train)


def _export_parser(sub):
    p = sub.add_parser("export", help="write a bundle (ONNX graphs + bundle.json) that captions without torch "
                       "(python -m captioner.runtime)")
    p.add_argument("--checkpoint", "-c", default=None, help="checkpoint file (default: the shipped model)")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR",
                   help="bundle folder to write (new, empty, or an older bundle)")
    p.add_argument("--int8-decoder", action="store_true",
                   help="quantize the decoder step to int8 (smaller, faster; some captions change: docs/deploy.md)")
    p.set_defaults(func=cmd_export)


def _finetune_parser(sub):
    p = sub.add_parser("finetune", help="fine-tune a model on your own captioned photos (new words included)")
    p.add_argument("--data", required=True, help="captions: CSV (image,caption), JSONL, COCO or Karpathy JSON, "
                   "or a Flickr8k folder")
    p.add_argument("--images", default=None, help="the folder the data's image paths are relative to")
    p.add_argument("--format", default="auto", choices=["auto", "csv", "jsonl", "coco", "karpathy", "flickr8k"])
    p.add_argument("--val", default=None, help="validation captions in the same format (default: split off "
                   "--val-fraction of the images)")
    p.add_argument("--val-fraction", type=float, default=None, help="share of the images kept for validation "
                   "(default 0.2)")
    p.add_argument("--checkpoint", "-c", dest="start", default=None, metavar="CHECKPOINT",
                   help="checkpoint to start from (default: the shipped model)")
    p.add_argument("--from", dest="start", action=Deprecated, new="--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run folder: best.pt, report.json, the split, the feature cache")
    _finetune_training_args(p)
    p.set_defaults(func=cmd_finetune)


def _finetune_training_args(p):
    """finetune's knobs; each defaults to None so that finetune.Settings' own default holds."""
    p.add_argument("--epochs", type=int, default=None, help="most teacher-forcing epochs (default 15; "
                   "stops early when validation BLEU-4 stalls)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 5e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="captions per batch (default 32)")
    p.add_argument("--min-count", type=int, default=None, help="a new word needs this many uses in the training "
                   "captions to get an id (default: the starting model's data.min_count)")
    p.add_argument("--replay", type=float, default=None, help="share of the training captions drawn from the "
                   "starting model's own training data (needs its cached features): forgets less (default 0)")
    p.add_argument("--self-critical", type=int, default=None, metavar="EPOCHS",
                   help="then this many self-critical epochs with a CIDEr-D reward (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="image-decoding processes for feature extraction")
    p.add_argument("--forget-budget", type=float, default=None, metavar="BLEU_POINTS",
                   help="how much the starting model's own dev split may lose: this many BLEU-4 points and 3 times "
                   "as many CIDEr-D; the model kept is the point between the starting and the fine-tuned model "
                   "with the best validation CIDEr-D within it (default 1.0; inf: the new domain only)")


def _server_parsers(sub):
    """demo and serve: the same model and network arguments, each its own default port."""
    p = sub.add_parser("demo", help="the Gradio demo in the browser (the ui extra)")
    _model_args(p)
    _server_args(p, port=7860)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="HTTP API (POST /v1/captions, docs at /docs) with the demo UI at / (the ui extra)")
    _model_args(p)
    _server_args(p, port=8000)
    p.add_argument("--max-files", type=int, help="images per request (default 16)")
    p.add_argument("--max-upload-mb", type=float, help="request body limit (default 20)")
    p.add_argument("--pixels-in-flight", type=int,
                   help="pixels decoded at once, the memory budget (default twice --max-pixels)")
    p.add_argument("--no-ui", dest="ui", action="store_false",
                   help="the API alone: no demo UI at /, and ready sooner (gradio is never imported)")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # In this order in `captioner --help`: captioning first, then measuring, training, deploying, serving.
    for add in (_caption_parser, _caption_dir_parser, _alt_text_parser, _evaluate_parser, _training_parsers,
                _export_parser, _finetune_parser, _server_parsers):
        add(sub)
    return parser


def main(argv=None) -> int:
    """Runs one command; an error the user can act on is one line on stderr and exit status 2."""
    # numpy's OpenBLAS keeps its idle threads spinning for ~0.1 s after each product, and after the tags'
    # small ones (32x1280 by 1280x1000) they took a core from the encoder, the search and the readers
    # (with other jobs on 2 cores, caption-dir took 1.3x as long). One thread has no pool to spin; numpy
    # is not loaded yet.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, WeightsUnavailable, StaleCache, FileNotFoundError, ValueError) as e:
        problem = f"error: {e}"
    except OSError as e:
        if (message := file_system_error(e)) is None:
            raise
        problem = f"error: {message}"
    except ImportError as e:
        if (problem := missing_package(e)) is None:
            raise
    print(f"captioner {args.command}: {problem}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
