"""dfq: data-free quantization of CNNs to deployable integer models.

One verb per stage, each a plain function over a model and a config dataclass::

    from dfq import (load_model, synthesize, SynthConfig, quantize, QuantConfig, calibrate, bias_correct,
                     export_onnx, OrtIntegerReference)
    loaded = load_model("resnet20.th")
    images, labels = synthesize(loaded.model, loaded.spec.input_size, loaded.spec.mean, loaded.spec.std,
                                loaded.spec.num_classes, SynthConfig.for_budget("fast", loaded.spec.input_size))
    qmodel = quantize(loaded.model, QuantConfig(bits=8, target="onnxruntime"), images[:2])
    calibrate(qmodel, images)
    bias_correct(qmodel, images)
    export_onnx(qmodel, "resnet20.onnx")
    reference = OrtIntegerReference(qmodel)   # the same model in ONNX Runtime's integer arithmetic

Names are imported lazily so ``import dfq`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "dfq.pipeline.load",
    "get_spec": "dfq.pipeline.models",
    "list_archs": "dfq.pipeline.models",
    "synthesize": "dfq.pipeline.synthesize",
    "SynthConfig": "dfq.pipeline.synthesize",
    "quantize": "dfq.pipeline.quantize",
    "QuantConfig": "dfq.pipeline.quantize",
    "PRESETS": "dfq.pipeline.quantize",
    "calibrate": "dfq.pipeline.calibrate",
    "bias_correct": "dfq.pipeline.calibrate",
    "OrtIntegerReference": "dfq.export.ort_reference",
    "export_onnx": "dfq.export.onnx_export",
    "build_engine": "dfq.export.tensorrt",
    "tensorrt_violations": "dfq.export.rules",
    "ExportJob": "dfq.job",
    "run_export": "dfq.job",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dfq' has no attribute {name!r}")
