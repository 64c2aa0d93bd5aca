"""A description of the machine a benchmark ran on, gathered without side effects."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any

import zmq

from .._version import __version__

__all__ = ["describe", "format_machine"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _redis_server_version() -> str | None:
    path = shutil.which("redis-server")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip() or None


def describe() -> dict[str, Any]:
    """CPU model, core counts, memory, load, OS, and the versions that shape the numbers."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _memory_gib(),
        "load_average": load,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "zkv": __version__,
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "cloudpickle": _version_of("cloudpickle"),
        "redis_py": _version_of("redis"),
        "redis_server": _redis_server_version(),
        "executable": sys.executable,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def format_machine(info: dict[str, Any]) -> str:
    """The description as a few lines for the top of the report."""
    load = " ".join(str(x) for x in info.get("load_average") or []) or "?"
    redis = info.get("redis_server") or "not installed"
    redis_py = info.get("redis_py") or "not installed"
    return "\n".join([
        f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"{info.get('memory_gib')} GiB, {info['os']}",
        f"load average at start: {load}",
        f"{info['python']}, zkv {info['zkv']}, pyzmq {info['pyzmq']} (libzmq {info['libzmq']}), "
        f"cloudpickle {info.get('cloudpickle')}",
        f"redis-server {redis}, redis-py {redis_py}",
        f"date: {info['date']}",
    ])
