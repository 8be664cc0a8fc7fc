"""The one C build helper (lstm_export/common/cbuild.py): the cache key holds the compiler's identity,
builds are renamed into place, failures are one line. The oracle is the built library itself: loaded
with ctypes, it must return what its source says."""
import ctypes
import os
import shutil
import stat

import pytest

from lstm_export.common import cbuild

CC = cbuild.default_compiler()
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc or gcc) on PATH")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "lstm-export"


def _source(tmp_path, value: int):
    src = tmp_path / f"k{value}.c"
    src.write_text(f"int answer(void) {{ return {value}; }}\n")
    return src


def _wrapper(tmp_path, name: str, version: str):
    """A compiler that is `CC` under another name and --version: what a change of CC looks like."""
    path = tmp_path / name
    path.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "{version}"; exit 0; fi\nexec {CC} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_library_is_built_once_and_loads(tmp_path, cache):
    src = _source(tmp_path, 42)
    lib = cbuild.cached_library("demo", "k", src, CC, ["-O2", "-fPIC", "-shared"])
    assert lib.parent == cache / "demo" and ctypes.CDLL(str(lib)).answer() == 42
    mtime = lib.stat().st_mtime_ns
    assert cbuild.cached_library("demo", "k", src, CC, ["-O2", "-fPIC", "-shared"]) == lib
    assert lib.stat().st_mtime_ns == mtime  # taken from the cache, not rebuilt
    assert not [p for p in lib.parent.iterdir() if p.name.startswith(".build-")]


def test_another_compiler_flag_or_source_is_another_entry(tmp_path, cache):
    flags = ["-O2", "-fPIC", "-shared"]
    src = _source(tmp_path, 1)
    base = cbuild.cached_library("demo", "k", src, CC, flags)
    other_cc = cbuild.cached_library("demo", "k", src, _wrapper(tmp_path, "cc-new", "cc 99.0"), flags)
    other_flags = cbuild.cached_library("demo", "k", src, CC, ["-O0", "-fPIC", "-shared"])
    src.write_text("int answer(void) { return 2; }\n")
    other_src = cbuild.cached_library("demo", "k", src, CC, flags)
    assert len({base, other_cc, other_flags, other_src}) == 4
    assert ctypes.CDLL(str(other_src)).answer() == 2


def test_a_failed_build_is_one_line_and_leaves_nothing(tmp_path, cache):
    src = tmp_path / "bad.c"
    src.write_text("int answer(void) { return }\n")
    with pytest.raises(cbuild.CBuildError) as e:
        cbuild.cached_library("demo", "bad", src, CC, ["-fPIC", "-shared"])
    assert "\n" not in str(e.value) and "error" in str(e.value)
    assert not any((cache / "demo").iterdir())


def test_a_compiler_that_does_not_run_is_named(tmp_path, cache):
    with pytest.raises(cbuild.CBuildError, match="does not run"):
        cbuild.cached_library("demo", "k", _source(tmp_path, 3), str(tmp_path / "no-such-cc"), ["-shared"])


def test_every_cache_of_ours_is_under_one_root(cache):
    from lstm_export.runtimes.tvm_lstm.pipeline import cache as tvm_cache
    from lstm_export.runtimes.tvm_lstm.pipeline import plan_select
    assert tvm_cache.cache_root() == cache / "tvm" and plan_select.plans_root() == cache / "plans"


def test_the_native_kernel_builds_through_it(tmp_path, cache, monkeypatch):
    """A change of CC gives the training kernel a new build (a stale .so from the old compiler once
    survived such a change in the reduced-precision kernel's cache)."""
    from lstm_export import native
    first = native._build()
    monkeypatch.setenv("CC", _wrapper(tmp_path, "cc-other", "other 1.0"))
    second = native._build()
    assert first != second and first.parent == second.parent == cache / "native"
    assert os.path.getsize(second) > 0 and shutil.which(CC)


def test_the_reduced_precision_kernel_keys_its_compiler(tmp_path, cache):
    """engine.host_library (the kernel timed while compiling) once keyed its cache on the source and
    flags only, so a .so built by another compiler survived a change of CC."""
    pytest.importorskip("tvm")
    from lstm_export.runtimes.tvm_lstm.kernels.lowp import engine
    try:
        engine.host_library(CC)
    except Exception as e:  # an older compiler without the AMX / AVX512-BF16 intrinsics
        pytest.skip(f"{CC} cannot build the reduced-precision kernel here: {e}")
    engine.host_library(_wrapper(tmp_path, "cc-other", "other 2.0"))
    assert len(list((cache / "lowp").glob("lowp_lstm-*.so"))) == 2
