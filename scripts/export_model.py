"""Export a training checkpoint as a shippable model: fp16 weights, no optimizer state,
and the decoding defaults chosen on dev (scripts/tune_decoding.py) written into its config.

    python scripts/export_model.py runs/flickr8k_lite0/best.pt captioner/assets/flickr8k_lite0.pt \
        decode.beam_size=5 decode.length_penalty=wu decode.alpha=0.7
"""
from __future__ import annotations

import argparse

from captioner import checkpoint
from captioner.config import Config, apply_overrides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("overrides", nargs="*", help="decode.key=value (any section.key=value)")
    args = p.parse_args()
    payload = checkpoint.load(args.src)
    config = Config.from_dict(apply_overrides(payload["config"], args.overrides)).to_dict()  # validates keys
    checkpoint.save(args.dst, config=config, vocab=payload["vocab"], decoder=payload["decoder"],
                    encoder=payload.get("encoder"), half=True)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
