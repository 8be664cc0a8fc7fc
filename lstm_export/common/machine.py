"""What machine this is, in the words reports and benchmark file names use."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, its AMD Zen generation where the name leaves it out
    (a VM's "AMD EPYC" is Zen 3 or Zen 4, which differ in vector width), and the core count."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    fields = {}
    for line in info:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if name is None:
        return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    zen = zen_generation(fields.get("vendor_id", ""), fields.get("cpu family", ""), fields.get("model", ""))
    if zen and "zen" not in name.lower():
        name += f" ({zen})"
    return f"{name} ({os.cpu_count()} cores)"


def zen_generation(vendor: str, family: str, model: str) -> str | None:
    """AMD's family/model numbers -> "Zen 2" / "Zen 3" / "Zen 4" / "Zen 5" (None if not AMD or unknown)."""
    if vendor != "AuthenticAMD" or not family.isdigit() or not model.isdigit():
        return None
    f, m = int(family), int(model)
    if f == 23:
        return "Zen 2" if m >= 0x30 else "Zen"
    if f == 25:
        return "Zen 4" if 0x10 <= m <= 0x1F or 0x60 <= m <= 0x7F or 0xA0 <= m <= 0xAF else "Zen 3"
    if f == 26:
        return "Zen 5"
    return None
