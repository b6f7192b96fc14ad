"""How good are BN-inversion images for the low-bit reconstruction? A proxy, not an export.

EfficientNet-Lite0 W4A8 (onnxruntime target's scheme): synthesize the reconstruction recipe's fast
image set (DeepInversion's priors included) with ``SynthConfig`` overrides, reconstruct every 4-bit
layer for ``--iters`` iterations, score the fake-quant model's top-1 on all 1,300 real images of
``../shared`` (the accuracy records' set: an earlier version scored 520 of them, on which the FP
model is a point better, 84.23% against 83.23%). Also records
the same model with its activation quantizers off (``top1_weights_only``: what the 8-bit
activation ranges calibrated on the images cost on real ones), and what the images look like:
the FP model's mean confidence and target-class hits, the neighbour
correlation of the pixels (real images: about 0.93) and the summed BN-statistics loss.

    python benchmarks/synth_proxy.py --name default                  # the recipe's images as they are
    python benchmarks/synth_proxy.py --name learn-step --recon '{"learn_step": true}'   # reconstruction options
    python benchmarks/synth_proxy.py --name plain \\
        --synth '{"init": "white", "tv_weight": 0, "coarse": 0, "steps": 200, "first_bn_weight": 1}'

``--synth`` overrides the recipe's preset as it is at the record's commit: since 578250d that preset
includes ``smooth`` 1.25, so earlier records' ``{}`` (e.g. ``baseline-s23``) is ``{"smooth": 0}`` now.
About 40 minutes on one thread (synthesis 23 of them). Records: ``benchmarks/results/synth_proxy.{json,md}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import REPO, merge_records, shared_root, write_markdown
from dfq.common.provenance import machine_info
from dfq.export.targets import get_target
from dfq.pipeline.calibrate import batched_logits, calibrate
from dfq.pipeline.data import image_folder, iterate_images
from dfq.pipeline.load import load_model
from dfq.pipeline.quantize import quantize
from dfq.pipeline.reconstruct import ReconstructConfig, reconstruct
from dfq.pipeline.synthesize import BNStatsHook, SynthConfig, synthesize

RESULTS = REPO / "benchmarks" / "results" / "synth_proxy.json"
COLUMNS = ["name", "synth", "recon", "iters", "top1_fakequant", "top1_weights_only", "top1_fp", "neighbour_corr", "colour_corr", "bn_loss", "fp_confidence",
           "target_hits", "wall_s", "commit"]


def neighbour_correlation(x: torch.Tensor) -> float:
    a = x - x.mean(dim=(2, 3), keepdim=True)
    return float((a[..., 1:, :] * a[..., :-1, :]).mean() / a.pow(2).mean())


def colour_correlation(x: torch.Tensor) -> float:
    """Mean over images of the correlation between each pair of colour channels (real images: 0.90)."""
    a = x.flatten(2) - x.flatten(2).mean(2, keepdim=True)
    a = a / a.pow(2).sum(2, keepdim=True).sqrt().clamp_min(1e-12)
    c = a @ a.transpose(1, 2)
    return float((c.sum((1, 2)) - c.diagonal(dim1=1, dim2=2).sum(1)).mean() / (x.shape[1] * (x.shape[1] - 1)))


@torch.no_grad()
def describe(model, images: torch.Tensor, labels: torch.Tensor) -> dict:
    with BNStatsHook(model) as hook:
        losses, probs = [], []
        for i in range(0, len(images), 32):
            probs.append(F.softmax(model(images[i:i + 32]), 1))
            losses.append(hook.loss())
    p = torch.cat(probs)
    return {"neighbour_corr": neighbour_correlation(images), "colour_corr": colour_correlation(images), "bn_loss": float(torch.stack(losses).mean()),
            "fp_confidence": float(p.max(1).values.mean()), "target_hits": float((p.argmax(1) == labels).float().mean())}


# SynthConfig fields added after the first cached sets, with the value those sets were made with:
# at that value they stay out of the key, so the earlier sets are found again.
_LATER_FIELDS = {"granularity": "batch", "output_loss": "ce", "canvas": 0, "smooth": 0.0, "desaturate": 0.0}


def _cache_fields(cfg: SynthConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if _LATER_FIELDS.get(k, object()) != v}


def cached_synthesis(model, spec, cfg: SynthConfig, cache: Path | None):
    """The BN-inversion images and labels of ``cfg``, from ``cache`` when it holds the set of the
    same config (the model and the synthesis code are the caller's to keep the same)."""
    path = None
    if cache is not None:
        key = hashlib.sha256(json.dumps(_cache_fields(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = cache / f"lite0-{key}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=True)
            return saved["images"], saved["labels"]
    images, labels = synthesize(model, spec.input_size, spec.mean, spec.std, spec.num_classes, cfg, progress=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": images, "labels": labels}, path)
    return images, labels


def run(name: str, overrides: dict, iters: int, recon: dict | None = None, cache: Path | None = None) -> dict:
    t0 = time.time()
    root = shared_root()
    loaded = load_model(root / "models/imagenet/efficientnet-lite0-57934424.pth")
    model, spec = loaded.model.eval(), loaded.spec
    real = list(iterate_images(image_folder(root / "data/imagenet-val1300", spec), 40))
    rx, ry = torch.cat([x for x, _ in real]), torch.cat([y for _, y in real])
    cfg = dataclasses.replace(SynthConfig.for_budget("fast", spec.input_size, reconstruction=True), **overrides)
    t_synth = time.time()
    images, labels = cached_synthesis(model, spec, cfg, cache)
    t_synth = time.time() - t_synth
    holdout = max(8, len(images) // 4)
    q = quantize(model, get_target("onnxruntime").quant_config(bits=4, act_bits=8), images[:2])
    calibrate(q, images[:-holdout], holdout=images[-holdout:], seed=0)
    rc = dataclasses.replace(ReconstructConfig.for_budget("fast", spec.input_size), iterations=iters, **(recon or {}))
    reconstruct(q, images[:-holdout], rc, progress=False)
    q.module.eval()
    with torch.no_grad():
        top1_q = float((batched_logits(q.module, rx, 40).argmax(1) == ry).float().mean())
        top1_fp = float((batched_logits(model, rx, 40).argmax(1) == ry).float().mean())
        for a in q.act_quantizers().values():   # the 4-bit weights alone: what the activations' ranges cost
            a.enabled = False
        top1_w = float((batched_logits(q.module, rx, 40).argmax(1) == ry).float().mean())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"name": name, "synth": json.dumps(overrides, sort_keys=True), "recon": json.dumps(recon or {}, sort_keys=True),
            "iters": iters, "top1_fakequant": 100 * top1_q,
            "top1_weights_only": 100 * top1_w, "top1_fp": 100 * top1_fp, **describe(model, images, labels), "wall_s": time.time() - t0,
            "synthesis_s": t_synth,
            "commit": commit, "command": " ".join(sys.argv), "machine": machine_info()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--synth", default="{}", help="SynthConfig overrides as JSON")
    ap.add_argument("--iters", type=int, default=200, help="reconstruction iterations per layer")
    ap.add_argument("--out", type=Path, default=RESULTS, help="records file (the .md is written beside it)")
    ap.add_argument("--cache", type=Path, help="folder that keeps each image set for later runs (outside the repository)")
    ap.add_argument("--recon", default="{}", help="ReconstructConfig overrides as JSON (e.g. '{\"learn_step\": true}')")
    args = ap.parse_args(argv)
    record = run(args.name, json.loads(args.synth), args.iters, json.loads(args.recon), args.cache)
    records = merge_records(args.out, [record], key=("name", "synth", "iters"))
    write_markdown(args.out.with_suffix(".md"), records, COLUMNS,
                   "BN-inversion image variants: EfficientNet-Lite0 W4A8 fake-quant top-1 after reconstruction (proxy)")
    print(json.dumps({k: record[k] for k in COLUMNS}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
