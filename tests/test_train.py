"""Training: loss goes down, resume is exact, cached features equal on-the-fly ones, DDP stays in sync."""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config

from captioner import checkpoint
from captioner.data import collate, load_split
from captioner.decoder import caption_loss
from captioner.encoders import build_encoder
from captioner.features import extract
from captioner.scst import reward_function, self_critical_loss
from captioner.train import Trainable, train
from captioner.vocab import tokenize


def test_training_lowers_the_loss_and_writes_logs(tiny_run):
    cfg, best = tiny_run
    out = Path(cfg.train.out_dir)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == cfg.train.epochs
    assert log[-1]["train_loss"] < 0.6 * log[0]["train_loss"]
    assert log[-1]["dev_loss"] < log[0]["dev_loss"]
    assert max(r["bleu4"] for r in log) > 20  # decoded (not teacher-forced) dev captions are right
    assert (out / "curve.png").stat().st_size > 1000
    payload = torch.load(best, weights_only=True)
    assert payload["config"]["train"]["epochs"] == cfg.train.epochs  # the config travels with the weights


def test_resume_continues_exactly(tiny_run, tmp_path):
    cfg0, _ = tiny_run
    data, cache = Path(cfg0.data.root), cfg0.data.feature_cache
    common = ["train.epochs=2", "train.schedule=cosine", "model.dropout=0.3", f"data.feature_cache={cache}"]
    straight = train(tiny_config(data, tmp_path / "a", *common))
    steps_per_epoch = json.loads((tmp_path / "a/run/metrics.jsonl").read_text().splitlines()[0])["step"]
    train(tiny_config(data, tmp_path / "b", *common, f"train.max_steps={steps_per_epoch}"))  # "interrupted"
    resumed = train(tiny_config(data, tmp_path / "b", *common), resume=True)
    for (name, a), b in zip(straight.decoder.state_dict().items(), resumed.decoder.state_dict().values()):
        assert torch.equal(a, b), name
    log = (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in log] == [1, 2]


def test_cached_features_equal_on_the_fly_encoding(captioner, tiny_data, tmp_path):
    examples = load_split(captioner.config.data, "dev")
    cached = extract(captioner.encoder, examples, tmp_path, "dev", batch_size=3, num_workers=0, dtype="float32")
    on_the_fly = captioner.encode(torch.stack([captioner.preprocess(ex.path) for ex in examples]))
    torch.testing.assert_close(torch.from_numpy(np.array(cached)), on_the_fly, atol=1e-4, rtol=1e-4)


def test_feature_extraction_resumes_where_it_stopped(captioner, tiny_data, tmp_path):
    examples = load_split(captioner.config.data, "dev")
    full = np.array(extract(captioner.encoder, examples, tmp_path / "a", "dev", batch_size=4, num_workers=0))
    # A run that stopped after 4 rows: the rest is garbage and `done` says 4.
    extract(captioner.encoder, examples[:4], tmp_path / "b", "dev", batch_size=4, num_workers=0)
    meta = json.loads((tmp_path / "b/dev.json").read_text())
    arr = np.lib.format.open_memmap(tmp_path / "b/dev.npy", mode="w+", dtype="float16", shape=full.shape)
    arr[:4] = full[:4]
    arr[4:] = 7
    arr.flush()
    meta.update(ids=[ex.image_id for ex in examples], done=4)
    (tmp_path / "b/dev.json").write_text(json.dumps(meta))
    resumed = extract(captioner.encoder, examples, tmp_path / "b", "dev", batch_size=4, num_workers=0)
    np.testing.assert_array_equal(np.array(resumed), full)


def test_finetuning_the_encoder_trains_on_images_and_stores_its_weights(tiny_data, tmp_path):
    from captioner import Captioner

    cfg = tiny_config(tiny_data, tmp_path, "model.finetune_encoder=true", "train.epochs=1", "train.max_steps=2",
                      "train.batch_size=4", "train.dev_images=4")
    before = build_encoder("efficientnet_lite0").state_dict()
    model = train(cfg)
    after = model.encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    payload = checkpoint.load(Path(cfg.train.out_dir) / "best.pt")
    assert "encoder" in payload
    loaded = Captioner.load(Path(cfg.train.out_dir) / "best.pt").encoder.state_dict()
    assert all(torch.equal(loaded[k], after[k].float() if after[k].is_floating_point() else after[k]) for k in after)


def test_attention_model_trains_on_cached_regions_and_captions_images(tiny_data, tmp_path):
    from captioner import Captioner
    from captioner.features import extract_all

    cfg = tiny_config(tiny_data, tmp_path, "model.attention=true", "model.feature_proj=32", "train.epochs=4")
    extract_all(cfg, batch_size=16, num_workers=0)
    cache = json.loads((tmp_path / "cache/train.json").read_text())
    assert (cache["encoder"], cache["dim"]) == ("efficientnet_lite0_regions", 49 * 1280)
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < 0.7 * log[0]["train_loss"]
    cap = Captioner.load(tmp_path / "run/best.pt", device="cpu")
    dev = load_split(cfg.data, "dev")
    out = cap.caption([ex.path for ex in dev[:2]])  # images -> regions -> attention -> words
    assert all(r["caption"] for r in out)
    cached = extract(cap.encoder, dev[:2], tmp_path / "fp32", "dev", num_workers=0, dtype="float32")
    dev_feats = torch.from_numpy(np.array(cached))
    assert [cap.format(h)[0]["caption"] for h in cap.decode(dev_feats)] == [r["caption"] for r in out]


def test_ddp_two_processes_keep_identical_parameters(tiny_run, tmp_path):
    cfg0, _ = tiny_run
    overrides = [f"data.root={cfg0.data.root}", f"data.feature_cache={cfg0.data.feature_cache}",
                 f"train.out_dir={tmp_path / 'run'}", "train.epochs=2", "train.batch_size=8", "train.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, str(ROOT / "tests" / "ddp_worker.py"), str(ROOT / "configs" / "tiny.yaml"),
                           str(tmp_path), *overrides], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert (tmp_path / "seed0").read_text() != (tmp_path / "seed1").read_text()  # but their own dropout masks
    log = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[1]["train_loss"] < log[0]["train_loss"]


@pytest.mark.parametrize("reward", ["bleu4", "cider"])
def test_self_critical_training_raises_the_reward_from_a_trained_start(tiny_run, tmp_path, reward):
    cfg0, best = tiny_run
    cfg = tiny_config(Path(cfg0.data.root), tmp_path, "train.objective=scst", "train.epochs=6",
                      f"train.scst_reward={reward}",
                      f"train.init_from={best}", "train.lr=5e-3", "train.batch_size=8",
                      f"data.feature_cache={cfg0.data.feature_cache}")
    torch.manual_seed(0)
    tuned = train(cfg)
    log = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert "train_loss" not in log[0]
    assert log[-1]["train_reward"] > log[0]["train_reward"] + 0.05, [r["train_reward"] for r in log]
    start = checkpoint.load(best)
    assert checkpoint.load(tmp_path / "run/last.pt")["vocab"] == start["vocab"]  # the start's vocabulary
    assert any(not torch.equal(a, b) for a, b in zip(start["decoder"].values(), tuned.decoder.state_dict().values()))


def test_self_critical_loss_adds_the_references_cross_entropy(captioner):
    vocab, model = captioner.vocab, Trainable(copy.deepcopy(captioner.decoder), None)
    feats = torch.randn(2, captioner.encoder.dim)
    captions = [["a red circle", "a big red circle on white"], ["a blue square"]]
    references = [[vocab.encode(c) for c in caps] for caps in captions]
    reward = reward_function("bleu4", [[tokenize(c) for c in caps] for caps in captions])

    def loss(xe_weight):
        torch.manual_seed(0)  # the same samples both times
        return self_critical_loss(model, feats, [0, 1], reward, vocab, 3, 12, references, xe_weight)[0]

    x, tokens, targets = collate([(feats[b], torch.tensor(ids)) for b in (0, 1) for ids in references[b]])
    xe = caption_loss(model(x, tokens), targets)
    assert xe > 0.1
    assert torch.allclose(loss(0.5), loss(0.0) + 0.5 * xe, atol=1e-5)


def test_self_critical_training_needs_a_start_and_a_known_reward(tiny_run, tmp_path):
    cfg0, best = tiny_run
    cfg = tiny_config(Path(cfg0.data.root), tmp_path, "train.objective=scst",
                      f"data.feature_cache={cfg0.data.feature_cache}")
    with pytest.raises(ValueError, match="init_from"):
        train(cfg)
    cfg.train.init_from, cfg.train.scst_reward = str(best), "meteor"
    with pytest.raises(ValueError, match="unknown scst reward 'meteor'"):
        train(cfg)


def test_an_ensemble_cannot_start_a_training_run(tiny_run, tmp_path):
    cfg0, best = tiny_run
    payload = checkpoint.load(best)
    ensemble = tmp_path / "ensemble.pt"
    checkpoint.save(ensemble, **checkpoint.ensemble([payload, payload], ["a", "b"]))
    cfg = tiny_config(Path(cfg0.data.root), tmp_path, "train.objective=scst", f"train.init_from={ensemble}",
                      f"data.feature_cache={cfg0.data.feature_cache}")
    with pytest.raises(ValueError, match="is an ensemble"):
        train(cfg)


def test_bf16_training_lowers_the_loss_and_keeps_fp32_weights(tiny_run, tmp_path):
    cfg0, _ = tiny_run
    cfg = tiny_config(Path(cfg0.data.root), tmp_path, "train.precision=bf16", "train.epochs=4",
                      f"data.feature_cache={cfg0.data.feature_cache}")
    model = train(cfg)
    log = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # self-critical steps sample under the same autocast (their decoding step once mixed dtypes)
    scst = tiny_config(Path(cfg0.data.root), tmp_path / "scst", "train.precision=bf16", "train.objective=scst",
                       f"train.init_from={tmp_path / 'run/best.pt'}", "train.epochs=1", "train.batch_size=8",
                       "train.scst_xe_weight=0.1", f"data.feature_cache={cfg0.data.feature_cache}")
    train(scst)  # with the references' cross-entropy mixed in
    assert "train_reward" in json.loads((tmp_path / "scst/run/metrics.jsonl").read_text().splitlines()[0])
    with pytest.raises(ValueError, match="precision"):
        train(tiny_config(Path(cfg0.data.root), tmp_path / "x", "train.precision=fp8",
                          f"data.feature_cache={cfg0.data.feature_cache}"))
