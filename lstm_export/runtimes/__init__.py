"""Runtimes: one module per backend behind one small interface, and the TVM compiler (tvm_lstm).

Heavy libraries (onnxruntime, tvm, openvino) are imported inside their backend only.
"""
from .base import REGISTRY, Availability, Runtime, RuntimeOptions, create, get_runtime, list_runtimes

__all__ = ["REGISTRY", "Availability", "Runtime", "RuntimeOptions", "create", "get_runtime", "list_runtimes"]
