"""Shared helpers of the benchmarks: timing whole processes, peak memory, JSON results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": load_average()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``uptime``), where the system has them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_process(cmd: list[str], env: dict[str, str] | None = None,
                timeout: float | None = None) -> dict[str, Any]:
    """Run a command as a whole process: wall seconds, peak resident memory (MiB), stdout.
    A process still running after ``timeout`` seconds is killed (RuntimeError)."""
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=err)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        if timer:
            timer.cancel()
            if seconds >= timeout:
                raise RuntimeError(f"{' '.join(cmd[:4])} ... killed after {timeout:.0f} s")
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode not in (0, 2):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    # CPU seconds of the process and of the loader workers it waited for: less sensitive to
    # other jobs on a shared machine than the wall time.
    return {"seconds": round(seconds, 3), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "stdout": stdout}


def write_result(name: str, result: dict[str, Any], out: str | None = None) -> Path:
    result = {"benchmark": name, "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    json.dump(result, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return path
