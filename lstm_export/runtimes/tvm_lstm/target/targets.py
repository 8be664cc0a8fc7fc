"""Compile targets: `llvm` (this machine), `cuda`, or any full TVM target, for cross-compiling.

TVM 0.27 takes targets as JSON dicts only; `parse_target` also reads the CLI string form users know
(`llvm -mcpu=haswell -mattr=+avx2,+fma -num-cores=4`) and turns it into that dict.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
from pathlib import Path

from lstm_export.common.errors import UserError, first_line


def usable_cores() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def arch_of(triple: str) -> str:
    """The architecture a target triple names (x86_64-linux-gnu -> x86_64)."""
    return str(triple).split("-")[0]


def machine_arch() -> str:
    """This machine's architecture in LLVM's spelling."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo), or an empty set where it does not say."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_target(threads: int | None = None):
    """llvm for this CPU: its own -mcpu (and so its ISA), its triple and its usable cores."""
    import tvm
    from tvm.target import codegen
    cfg = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "mtriple": codegen.llvm_get_system_triple(),
           "num-cores": threads or usable_cores()}
    return tvm.target.Target(cfg)


def cuda_target(arch: str = "sm_90"):
    import tvm
    if not arch.startswith("sm_") or not arch[3:].isdigit():
        raise UserError(f"--arch {arch!r} must look like sm_90")
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def _from_cli_string(text: str) -> dict:
    """'llvm -mcpu=haswell -mattr=+avx2,+fma -num-cores=4' -> the equivalent JSON dict."""
    words = shlex.split(text)
    cfg: dict = {"kind": words[0]}
    for w in words[1:]:
        if not w.startswith("-") or "=" not in w:
            raise UserError(f"--target {text!r}: {w!r} is not of the form -key=value")
        key, value = w.lstrip("-").split("=", 1)
        if key == "mattr":
            cfg[key] = [v for v in value.split(",") if v]
        elif value.lstrip("-").isdigit():
            cfg[key] = int(value)
        else:
            cfg[key] = value
    return cfg


def parse_target(text: str, threads: int | None = None, arch: str = "sm_90"):
    """A tvm.target.Target from `llvm`, `cuda`, a JSON dict or the CLI string form.

    A cross-compile names what it builds for: `mtriple` (aarch64-linux-gnu), `mcpu` (haswell,
    neoverse-n1), `mattr` (+avx2,+fma) and `num-cores`. Without num-cores an llvm target gets this
    machine's usable cores when its triple is this machine's, else 1; `threads` overrides both.
    """
    import tvm
    from tvm.target import codegen
    text = (text or "").strip()
    if text == "llvm":
        return host_target(threads)
    if text == "cuda":
        return cuda_target(arch)
    if not text:
        raise UserError("--target is empty; give llvm, cuda, or a TVM target such as "
                        "'llvm -mcpu=haswell -num-cores=4' or '{\"kind\": \"llvm\", \"mcpu\": \"haswell\"}'")
    if text[0] in "{[":  # JSON (an array is refused below)
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--target is not valid JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(cfg, dict) or "kind" not in cfg:
            raise UserError('--target JSON must be an object with a "kind", e.g. {"kind": "llvm", "mcpu": "haswell"}')
    else:
        cfg = _from_cli_string(text)
    if cfg["kind"] not in ("llvm", "cuda"):
        raise UserError(f"--target kind {cfg['kind']!r} is not supported; use llvm or cuda")
    if cfg["kind"] == "llvm":
        mcpu = cfg.get("mcpu")
        if mcpu and not _valid_cpu(str(mcpu), cfg):
            raise UserError(f"--target mcpu {mcpu!r} is not a CPU LLVM knows for this triple; e.g. haswell, "
                            "skylake-avx512, znver3, neoverse-n1")
        if threads:
            cfg["num-cores"] = threads
        elif "num-cores" not in cfg:
            host = cfg.get("mtriple") in (None, codegen.llvm_get_system_triple())
            cfg["num-cores"] = usable_cores() if host else 1
        if int(cfg["num-cores"]) < 1:
            raise UserError(f"--target num-cores must be at least 1, got {cfg['num-cores']}")
    try:
        if cfg["kind"] == "cuda":
            return tvm.target.Target(cfg, host={"kind": "llvm"})
        return tvm.target.Target(cfg)
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"--target {text!r} is not a TVM target: {first_line(e, 200)}") from None


def _valid_cpu(mcpu: str, cfg: dict) -> bool:
    from tvm.target import codegen
    try:
        return bool(codegen.llvm_is_valid_cpu(mcpu, str(cfg.get("mtriple") or codegen.llvm_get_system_triple())))
    except Exception:  # noqa: BLE001 -- an LLVM that cannot tell: let TVM decide
        return True


def is_cross(target) -> bool:
    """Whether an llvm target's code cannot run on this machine's architecture (another triple)."""
    from tvm.target import codegen
    triple = target.attrs.get("mtriple")
    return triple is not None and arch_of(triple) != arch_of(codegen.llvm_get_system_triple())
