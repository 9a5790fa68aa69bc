"""Energy a stage used, read from the hardware's own counters, or the reason it cannot be.

Only counters the vendors expose are read; nothing is estimated from a TDP or a utilisation figure
(CodeCarbon falls back to such estimates when it finds no counter, so it is not used here):
- RAPL (Intel, and AMD Zen through the same powercap driver): `energy_uj` of every top-level
  package domain under /sys/class/powercap (`intel-rapl:N`), summed; the counter wraps at
  `max_energy_range_uj`, which `EnergyMeter` corrects for one wrap per domain between reads (a counter that
  went down while that range is unreadable makes the stage's energy not measurable, with why).
- NVML (`pynvml`, NVIDIA): `nvmlDeviceGetTotalEnergyConsumption` of every visible GPU (mJ since driver load).
- AMD SMI (`amdsmi`): `amdsmi_get_energy_count` of every GPU (counter x resolution, µJ).
Every one of them counts the whole package or device, other processes' work included: on a shared
machine a stage's joules include its neighbours'. When none is readable, `reason` says why, and the
audit writes "not measurable on this machine" with it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
NOT_MEASURABLE = "not measurable on this machine"


@dataclass
class Reading:
    """Joules per counter at one moment (None: no counter) and why there is none."""

    joules: dict[str, float] = field(default_factory=dict)
    wrap: dict[str, float] = field(default_factory=dict)  # counter range in joules, for wrap-around
    sources: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def _rapl(root: Path, reading: Reading) -> None:
    if not root.is_dir():
        reading.reasons.append(f"RAPL: {root} does not exist (no powercap driver, or a container without it)")
        return
    domains = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)  # packages, not subdomains
    if not domains:
        reading.reasons.append(f"RAPL: no intel-rapl:N package domain under {root}")
        return
    found = False
    for d in domains:
        try:
            uj = int((d / "energy_uj").read_text().strip())
        except PermissionError:
            reading.reasons.append(f"RAPL: {d / 'energy_uj'} is not readable by this user (root only since "
                                   "Linux 5.10, CVE-2020-8694)")
            continue
        except (OSError, ValueError) as e:
            reading.reasons.append(f"RAPL: {d / 'energy_uj'}: {e}")
            continue
        try:
            wrap = int((d / "max_energy_range_uj").read_text().strip()) / 1e6
        except (OSError, ValueError):
            wrap = 0.0
        reading.joules[f"rapl:{d.name}"], reading.wrap[f"rapl:{d.name}"] = uj / 1e6, wrap
        found = True
    if found:
        reading.sources.append("rapl")


def _nvml(reading: Reading) -> None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        reading.reasons.append("NVML: pynvml is not installed")
        return
    try:
        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        for i in range(n):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            reading.joules[f"nvml:{i}"] = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # mJ
        if n:
            reading.sources.append("nvml")
        else:
            reading.reasons.append("NVML: no NVIDIA GPU")
    except Exception as e:  # NVMLError_NotSupported (pre-Volta), no driver, ...
        reading.reasons.append(f"NVML: {e}")


def _amdsmi(reading: Reading) -> None:
    try:
        import amdsmi  # type: ignore[import-not-found]
    except ImportError:
        reading.reasons.append("AMD SMI: amdsmi is not installed")
        return
    try:
        amdsmi.amdsmi_init()
        handles = amdsmi.amdsmi_get_processor_handles()
        for i, h in enumerate(handles):
            e = amdsmi.amdsmi_get_energy_count(h)
            reading.joules[f"amdsmi:{i}"] = e["energy_accumulator"] * e["counter_resolution"] / 1e6  # µJ
        if handles:
            reading.sources.append("amdsmi")
        else:
            reading.reasons.append("AMD SMI: no AMD GPU")
    except Exception as e:
        reading.reasons.append(f"AMD SMI: {e}")


def read_counters(powercap: Path = POWERCAP, gpus: bool = True) -> Reading:
    """Every readable energy counter now. `powercap` is a parameter so that a test can hand in a tree."""
    reading = Reading()
    _rapl(Path(powercap), reading)
    if gpus:
        _nvml(reading)
        _amdsmi(reading)
    return reading


class EnergyMeter:
    """Joules between `start()` and `stop()`, summed over every counter readable at both."""

    def __init__(self, powercap: Path = POWERCAP, gpus: bool = True):
        self.powercap, self.gpus = Path(powercap), gpus
        self.first: Reading | None = None
        self.t0 = 0.0

    def start(self) -> EnergyMeter:
        self.first, self.t0 = read_counters(self.powercap, self.gpus), time.perf_counter()
        return self

    def stop(self) -> dict:
        """{"joules": float | None, "sources": [...], "status": "measured" | NOT_MEASURABLE + reason}."""
        if self.first is None:
            raise RuntimeError("EnergyMeter.stop() before start()")
        last = read_counters(self.powercap, self.gpus)
        keys = sorted(set(self.first.joules) & set(last.joules))
        if not keys:
            reasons = "; ".join(dict.fromkeys(self.first.reasons + last.reasons)) or "no energy counter"
            return {"joules": None, "sources": [], "status": f"{NOT_MEASURABLE}: {reasons}"}
        total, lost = 0.0, []
        for k in keys:
            d = last.joules[k] - self.first.joules[k]
            if d < 0:  # the counter wrapped (RAPL: every few minutes to hours, by package power)
                if not self.first.wrap.get(k):
                    lost.append(f"{k} went down between the reads and its range is unknown (RAPL: "
                                "max_energy_range_uj unreadable), so the wrap cannot be corrected")
                    continue
                d += self.first.wrap[k]
            total += d
        if lost:  # the other counters' sum leaves out a package or device: not the stage's energy either
            return {"joules": None, "sources": [], "status": f"{NOT_MEASURABLE}: {'; '.join(lost)}"}
        return {"joules": total, "sources": sorted({k.split(":")[0] for k in keys}), "status": "measured",
                "counters": keys, "seconds": time.perf_counter() - self.t0}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
