"""Decoder ablation at equal budget: same features, data, epochs, optimizer and decoding;
only the recurrent cell or the way v enters changes.

    python scripts/ablate.py --config configs/flickr8k_lite0.yaml --epochs 3
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.config import load_config
from captioner.train import train

VARIANTS = {
    "LSTM, v in every step (W_iv)": [],
    "LSTM, v only at init (h0, c0)": ["model.inject=init"],
    "GRU, v in every step": ["model.cell=gru"],
    "RNN (tanh), v in every step": ["model.cell=rnn"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/flickr8k_lite0.yaml")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied to every variant")
    args = p.parse_args()
    rows = []
    for name, variant in VARIANTS.items():
        out = Path(args.out) / (name.split(",")[0].lower() + "_" + ("init" if "init" in name else "every"))
        cfg = load_config(args.config, [f"train.out_dir={out}", f"train.epochs={args.epochs}", "train.patience=1000",
                                        *args.overrides, *variant])
        model = train(cfg)
        log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        best = max(log, key=lambda r: r["bleu4"])
        rows.append({"variant": name, "params_M": sum(p.numel() for p in model.decoder.parameters()) / 1e6,
                     **{k: best[k] for k in ("epoch", "bleu1", "bleu4", "dev_loss")}})
    print(json.dumps(rows))
    print(f"\n| decoder ({args.epochs} epochs each) | params | best epoch | dev BLEU-1 | dev BLEU-4 | dev loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['params_M']:.2f}M | {r['epoch']} | {r['bleu1']:.1f} | {r['bleu4']:.1f} "
              f"| {r['dev_loss']:.3f} |")


if __name__ == "__main__":
    main()
