"""Export training checkpoints as a shippable model: fp16 weights, no optimizer state,
and the decoding defaults chosen on dev (scripts/tune_decoding.py) written into its config.

    python scripts/combine_checkpoints.py runs/flickr8k_lite0/best.pt -o captioner/assets/flickr8k_lite0.pt --set \
        decode.beam_size=5 decode.length_penalty=wu decode.alpha=0.7

Several checkpoints make one ensemble model (`decoder.Ensemble`): `checkpoint.ensemble`
checks they share the vocabulary, the model config and the frozen encoder. With --average
they make one decoder with their mean weights instead (`checkpoint.average`; for models
fine-tuned from one start, such as self-critical runs with other seeds); --weights makes it a
weighted mean, e.g. a point between a cross-entropy model and its self-critical soup:

    python scripts/combine_checkpoints.py XE.pt SOUP.pt --average --weights 0.5 0.5 -o runs/mid.pt
"""
from __future__ import annotations

import argparse

from captioner import checkpoint
from captioner.config import Config, apply_overrides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="checkpoint(s) to export; several make an ensemble")
    p.add_argument("-o", "--out", required=True, help="where to write the model")
    p.add_argument("--average", action="store_true",
                   help="average the checkpoints' weights into one decoder instead of an ensemble")
    p.add_argument("--weights", type=float, nargs="+", help="with --average: one weight per checkpoint")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config overrides, e.g. decode.beam_size=5")
    args = p.parse_args()
    try:
        payloads = [checkpoint.load(s) for s in args.sources]
        if args.weights and (not args.average or len(payloads) == 1):
            raise checkpoint.CheckpointError("--weights weighs an --average of several checkpoints")
        if len(payloads) == 1:
            payload = payloads[0]
        elif args.average:
            payload = checkpoint.average(payloads, args.sources, args.weights)
        else:
            payload = checkpoint.ensemble(payloads, args.sources)
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    config = Config.from_dict(apply_overrides(payload["config"], args.overrides)).to_dict()  # validates keys
    checkpoint.save(args.out, config=config, vocab=payload["vocab"], decoder=payload["decoder"],
                    encoder=payload.get("encoder"), half=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
