"""dfq: data-free quantization of CNNs to deployable integer models.

One verb per stage, each a plain function over a model and a config dataclass; ``dfq-export`` runs
the same functions in the same order (:mod:`dfq.stages`)::

    import dfq
    loaded = dfq.load_model("resnet20.th")
    spec = loaded.spec
    images, labels = dfq.synthesize(loaded.model, spec.input_size, spec.mean, spec.std, spec.num_classes,
                                    dfq.SynthConfig.for_budget("fast", spec.input_size))
    target = dfq.get_target("onnxruntime")                 # or "tensorrt"
    qmodel = dfq.quantize(loaded.model, target.quant_config(bits=8), images[:2])
    dfq.calibrate(qmodel, images)
    dfq.bias_correct(qmodel, images)
    dfq.export_onnx(qmodel, "resnet20.onnx")
    fidelity = dfq.verify_artifact(loaded.model, qmodel, "resnet20.onnx", target,
                                   dfq.tensor_batches(images[-64:], 32), threads=2)

``dfq.finetune`` (with a recipe from ``dfq.RECIPES``) fine-tunes between calibration and bias
correction; ``dfq.build_engine`` builds a TensorRT engine from a tensorrt-target ONNX.
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
    "calibrate": "dfq.pipeline.calibrate",
    "finetune": "dfq.pipeline.finetune",
    "FinetuneConfig": "dfq.pipeline.finetune",
    "RECIPES": "dfq.pipeline.recipes",
    "bias_correct": "dfq.pipeline.bias_correction",
    "get_target": "dfq.export.targets",
    "target_names": "dfq.export.targets",
    "export_onnx": "dfq.export.onnx_export",
    "verify_artifact": "dfq.export.check",
    "tensor_batches": "dfq.export.check",
    "compare_latency": "dfq.export.ort_runtime",
    "OrtIntegerReference": "dfq.export.ort_reference",
    "build_engine": "dfq.export.tensorrt",
    "ExportJob": "dfq.job",
    "run_export": "dfq.run",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dfq' has no attribute {name!r}")
