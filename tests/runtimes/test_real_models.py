"""LSTM models that other people exported, shipped as ONNX files inside public Python packages
(installed by scripts/setup.sh with --no-deps, for their data files only), against ONNX Runtime.

- silero-vad (snakers4/silero-vad): the voice-activity detector in five exports: the default one
  (If branches on the sample rate, unnamed dynamic dims), opset 15 16 kHz, half precision, the
  one without If nodes, and the one for OpenVINO (its pads computed from constants); state in and out.
- faster-whisper (SYSTRAN): its bundled silero_vad_v6.onnx (LSTM with explicit h and c).
- ddddocr: the captcha OCR model (conv stem + LSTM + per-step classifier), whose declared output
  shape [1, seqlen] disagrees with the [T, 1, 8210] its graph computes.
Skipped, with the reason, where the package is not installed. Nothing is downloaded here.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lstm_export.runtimes.base import get_runtime

pytest.importorskip("tvm")


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds the package without importing it (silero_vad imports torch)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def _vad_feeds(batch=1, samples=512, sr=True, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {"input": (rng.standard_normal((batch, samples)) * 0.1).astype(np.float32),
             "state": (rng.standard_normal((2, batch, 128)) * 0.1).astype(np.float32)}
    if sr:
        feeds["sr"] = np.array(16000, np.int64)
    return feeds


def _v6_feeds(steps=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"input": (rng.standard_normal((steps, 576)) * 0.1).astype(np.float32),
            "h": (rng.standard_normal((1, 1, 128)) * 0.1).astype(np.float32),
            "c": (rng.standard_normal((1, 1, 128)) * 0.1).astype(np.float32)}


def _ocr_feeds(width=96, seed=0):
    return {"input1": np.random.default_rng(seed).random((1, 1, 64, width)).astype(np.float32)}


MODELS = {
    "silero_vad": ("silero_vad", "data/silero_vad.onnx", lambda: _vad_feeds()),
    "silero_vad_16k_op15": ("silero_vad", "data/silero_vad_16k_op15.onnx", lambda: _vad_feeds(batch=2)),
    "silero_vad_half": ("silero_vad", "data/silero_vad_half.onnx", lambda: _vad_feeds(sr=False)),
    "silero_vad_op18_ifless": ("silero_vad", "data/silero_vad_op18_ifless.onnx", lambda: _vad_feeds(batch=2)),
    # static shapes, and a Pad whose pads ConstantOfShape -> Concat -> Reshape -> Slice -> ... compute
    "silero_vad_openvino_16k": ("silero_vad", "data/silero_vad_openvino_16k.onnx",
                                lambda: _vad_feeds(samples=576, sr=False)),
    "faster_whisper_silero_v6": ("faster_whisper", "assets/silero_vad_v6.onnx", lambda: _v6_feeds()),
    "ddddocr_common": ("ddddocr", "common.onnx", lambda: _ocr_feeds()),
}


@pytest.fixture(scope="module")
def ort_runtime():
    rt = get_runtime("ort-cpu")
    yield rt


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_a_model_someone_else_exported_matches_onnx_runtime(name, tmp_path):
    package, relative, feeds_of = MODELS[name]
    path = _package_file(package, relative)
    if path is None:
        pytest.skip(f"{package} is not installed (./scripts/setup.sh installs it for its model files)")
    feeds = feeds_of()
    with get_runtime("ort-cpu") as ort_rt, get_runtime("tvm-llvm", cache=False) as tvm_rt:
        ort_rt.prepare(path)
        want = ort_rt.run(feeds)
        tvm_rt.prepare(path)
        got = tvm_rt.run(feeds)
        assert list(got) == list(want)
        for k in want:
            assert got[k].shape == want[k].shape, f"{name} {k}: shape {got[k].shape}, ORT's {want[k].shape}"
            tol = 2e-3 if "half" in name else 1e-4
            np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, err_msg=f"{name} {k}")
        # a second shape through the same runtime (its symbolic dims, or a build for these shapes)
        if name.startswith("silero_vad") and name not in ("silero_vad_half", "silero_vad_openvino_16k"):
            feeds2 = _vad_feeds(batch=3, samples=512, seed=1)
        elif name == "faster_whisper_silero_v6":
            feeds2 = _v6_feeds(steps=7, seed=1)
        elif name == "ddddocr_common":
            feeds2 = _ocr_feeds(width=128, seed=1)
        else:
            return
        want2, got2 = ort_rt.run(feeds2), tvm_rt.run(feeds2)
        for k in want2:
            assert got2[k].shape == want2[k].shape
            np.testing.assert_allclose(got2[k], want2[k], rtol=1e-4, atol=1e-4, err_msg=f"{name} {k}, 2nd shape")
