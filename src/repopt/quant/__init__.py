"""Deployment: BN folding, INT8 quantization (torchao PT2E, x86; onnxruntime QDQ), weight statistics, ONNX export.

Nothing here imports torchao, matplotlib or onnx until a function that needs them is called; a missing optional
dependency raises a MissingExtraError (an ImportError) that names the pip extra to install.
"""
from ._extras import MissingExtraError
from .analysis import kernel_stats, plot_kernel_histograms
from .export import ExportDependencyError, check_onnx, export_onnx
from .fold import conv_bn_pairs, fold_batchnorm, fused_conv_bn
from .onnx_int8 import (CLASSIFIER_FORMAT, FORMAT_KEY, InputShapeError, OnnxFileError, OnnxModel, OnnxQuantSettings,
                        quantize_onnx, set_metadata)
from .program import ProgramFileError, load_int8_program, read_program_info, save_int8_program
from .ptq import (Int8Model, QuantDependencyError, QuantSettings, cpu_has_vnni, evaluate_top1, quantize_ptq,
                  quantize_qat, time_per_batch_ms)

__all__ = ["fold_batchnorm", "fused_conv_bn", "conv_bn_pairs", "QuantSettings", "Int8Model", "quantize_ptq",
           "quantize_qat", "evaluate_top1", "time_per_batch_ms", "cpu_has_vnni", "kernel_stats",
           "plot_kernel_histograms", "export_onnx", "check_onnx", "MissingExtraError", "QuantDependencyError",
           "ExportDependencyError", "OnnxQuantSettings", "quantize_onnx", "OnnxModel", "set_metadata", "FORMAT_KEY",
           "CLASSIFIER_FORMAT", "InputShapeError", "OnnxFileError", "save_int8_program", "load_int8_program",
           "read_program_info", "ProgramFileError"]
