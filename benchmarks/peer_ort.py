"""The peer dfq's ONNX Runtime export is compared against: ONNX Runtime's own static quantizer,
``onnxruntime.quantization.quantize_static`` in its x86-preferred setting — QDQ format, QUInt8
(asymmetric, per-tensor) activations, QInt8 (symmetric) per-channel weights, MinMax calibration.
ORT's defaults are kept otherwise (no reduce_range, every quantizable op type).

Pre-processing: ``quant_pre_process`` (symbolic + ONNX shape inference and ORT's basic graph
optimisation: constant folding, Conv+BN / Conv+Add fusion, Identity removal) runs first, as ORT's
quantization guide recommends: the quantizer relies on value_info shapes for some ops and on
BN being folded so that it quantizes the fused conv weights. If pre-processing fails (it needs
a model that ORT's symbolic shape inference understands) the FP model is quantized as it is,
with a warning.

    python benchmarks/peer_ort.py --fp model.onnx --out peer.onnx --calib 32
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

PEER_NAME = "onnxruntime.quantization.quantize_static U8S8 per-channel QDQ (MinMax)"


class ImageReader(CalibrationDataReader):
    """Feeds ``images`` ([N, C, H, W] float32) to the calibrator in batches of ``batch_size``."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 8) -> None:
        self.input_name = input_name
        self.images = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        self.batch_size = max(1, int(batch_size))
        self._pos = 0

    def get_next(self):
        if self._pos >= len(self.images):
            return None
        batch = self.images[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._pos = 0


def _input_name_and_batch(model: onnx.ModelProto) -> tuple[str, bool]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"expected one model input, got {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    dynamic = bool(dims) and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0)
    return inputs[0].name, dynamic


def quantize_static_peer(fp_onnx_path, out_path, calibration_images: np.ndarray, *, per_channel: bool = True,
                         batch_size: int = 8, preprocess: bool = True) -> Path:
    """Quantize the FP ONNX at ``fp_onnx_path`` with ORT's ``quantize_static`` (QDQ, U8
    activations, S8 weights, ``per_channel``, MinMax) calibrated on ``calibration_images``
    ([N, C, H, W]) and write it to ``out_path``. Batches of ``batch_size`` are used when the
    model's batch dim is dynamic, single images otherwise. Returns ``Path(out_path)``."""
    fp_onnx_path, out_path = Path(fp_onnx_path), Path(out_path)
    images = calibration_images
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim < 2 or len(images) == 0:
        raise ValueError(f"calibration_images must be a non-empty [N, ...] array, got shape {images.shape}")
    name, dynamic = _input_name_and_batch(onnx.load(str(fp_onnx_path), load_external_data=False))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dfq_peer_") as tmp:
        src = fp_onnx_path
        if preprocess:
            pre = Path(tmp) / "preprocessed.onnx"
            try:
                quant_pre_process(str(fp_onnx_path), str(pre))
                src = pre
            except Exception as e:  # noqa: BLE001 — the quantizer can still run on the raw model
                warnings.warn(f"quant_pre_process failed on {fp_onnx_path} ({type(e).__name__}: {e}); "
                              "quantizing the model without pre-processing")
        reader = ImageReader(name, images, batch_size if dynamic else 1)
        quantize_static(str(src), str(out_path), reader,
                        quant_format=QuantFormat.QDQ,
                        per_channel=per_channel,
                        reduce_range=False,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return out_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Quantize an FP ONNX with ORT's quantize_static (the dfq peer)")
    ap.add_argument("--fp", required=True, help="FP32 ONNX model (dynamic batch dim preferred)")
    ap.add_argument("--out", required=True, help="where to write the QDQ model")
    ap.add_argument("--calib", type=int, default=32, help="number of random-normal calibration images")
    ap.add_argument("--input-shape", type=int, nargs="+", default=None,
                    help="C H W (default: read from the model)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--per-tensor", action="store_true", help="per-tensor weights instead of per-channel")
    ap.add_argument("--no-preprocess", action="store_true", help="skip quant_pre_process")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shape = args.input_shape
    if shape is None:
        model = onnx.load(args.fp, load_external_data=False)
        inits = {i.name for i in model.graph.initializer}
        inp = next(i for i in model.graph.input if i.name not in inits)
        dims = inp.type.tensor_type.shape.dim[1:]
        if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            ap.error("the model's input shape is not static; pass --input-shape C H W")
        shape = [d.dim_value for d in dims]
    rng = np.random.default_rng(args.seed)
    images = rng.standard_normal((args.calib, *shape), dtype=np.float32)
    out = quantize_static_peer(args.fp, args.out, images, per_channel=not args.per_tensor,
                               batch_size=args.batch_size, preprocess=not args.no_preprocess)
    print(f"wrote {out} ({PEER_NAME}, {args.calib} random-normal calibration images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
