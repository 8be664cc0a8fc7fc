"""The one runtime factory (runtimes.base.create): every command and the bench build runtimes from one
RuntimeOptions value, and each class declares which options its constructor takes."""
import dataclasses
import inspect

import pytest

from lstm_export.common.errors import UserError
from lstm_export.runtimes.base import REGISTRY, RuntimeOptions, create, runtime_class

FIELDS = {f.name for f in dataclasses.fields(RuntimeOptions)}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_class_declares_options_its_constructor_takes(name):
    try:
        cls = runtime_class(name)
    except ImportError as e:  # a peer's module that imports its library at the top
        pytest.skip(f"{name}: {e}")
    params = inspect.signature(cls.__init__).parameters
    assert set(cls.OPTIONS) <= FIELDS, f"{name}: OPTIONS names what RuntimeOptions does not have"
    assert set(cls.OPTIONS) <= set(params), f"{name}: OPTIONS {cls.OPTIONS}, constructor takes {list(params)}"


def test_create_passes_the_options_a_runtime_takes_and_leaves_the_rest():
    opts = RuntimeOptions(threads=1, spin=False, target="llvm -mcpu=haswell", cache=False)
    ort = create("ort-cpu", opts)
    assert (ort.threads, ort.spin) == (1, False)
    ref = create("onnx-reference", opts)  # takes none of them: built all the same
    assert ref.name == "onnx-reference"


def test_create_reaches_the_tvm_runtime():
    pytest.importorskip("tvm")
    rt = create("tvm-llvm", RuntimeOptions(threads=2, target="llvm -mcpu=haswell", cache=False))
    assert (rt.threads, rt.compile_target, rt.cache) == (2, "llvm -mcpu=haswell", False)
    assert create("tvm-llvm").cache is True  # unset options keep the constructor's defaults


def test_an_unknown_name_is_one_line():
    with pytest.raises(UserError, match="unknown runtime 'ort-gpu'.*choose one of"):
        create("ort-gpu", RuntimeOptions())
