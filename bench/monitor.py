"""What a benchmark's process tree uses while it runs: host memory, GPU utilisation, CPU time.

- `tree_rss_bytes(pid)`: resident set of a process and all its descendants (loader and CRF
  workers), from /proc (Linux). RSS counts the libraries that forked workers share once per
  process, so the sum is an upper bound of the memory really used.
- `Sampler`: a background thread that samples the tree's RSS and, where a CUDA GPU is used, its
  utilisation (the percentage of time a kernel ran, as `nvidia-smi` reports it), with time
  stamps, so that each part of a benchmark reads the peak and the mean of its own window.
  GPU utilisation comes from `torch.cuda.utilization()` when pynvml is importable, else from an
  `nvidia-smi --query-gpu=utilization.gpu -lms` subprocess, else it is not known (None).
- `cpu_times()` / `cpu_busy(before, after)`: the machine's busy fraction over all cores between
  two readings of /proc/stat (other processes on the machine count too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time


def tree_rss_bytes(pid: int) -> int:
    """Resident set of pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    total, stack, page = 0, [pid], os.sysconf("SC_PAGE_SIZE")
    while stack:
        current = stack.pop()
        stack.extend(children.get(current, []))
        try:
            with open(f"/proc/{current}/statm") as handle:
                total += int(handle.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot, or None without /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def cpu_busy(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


class _NvidiaSmi:
    """`nvidia-smi ... -lms` in a subprocess; each line it prints is one utilisation sample."""

    def __init__(self, index: str, interval_ms: int, record):
        self.process = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu",
                "--format=csv,noheader,nounits",
                f"-lms={interval_ms}",
                f"--id={index}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.thread = threading.Thread(target=self._read, args=(record,), daemon=True)
        self.thread.start()

    def _read(self, record) -> None:
        for line in self.process.stdout:
            try:
                record(float(line.strip()))
            except ValueError:  # "[N/A]" or a message
                continue

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.thread.join(timeout=5)


def _visible_index(device_index: int) -> str:
    """nvidia-smi's id of torch's CUDA device `device_index` (CUDA_VISIBLE_DEVICES renumbers)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[device_index] if device_index < len(visible) else str(device_index)


class Sampler:
    """Samples the tree's RSS (and the GPU's utilisation when `gpu_index` is given) every
    `interval` seconds until `stop()`; `window(start, end)` summarises one stretch of time."""

    def __init__(self, gpu_index: int | None = None, interval: float = 0.2):
        self.interval, self.pid = interval, os.getpid()
        self.memory: list[tuple[float, int]] = []
        self.gpu: list[tuple[float, float]] = []
        self.gpu_source = "none"
        self._nvml_index, self._smi = None, None
        if gpu_index is not None:
            self.gpu_source = self._start_gpu(gpu_index)
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _start_gpu(self, index: int) -> str:
        import torch

        try:
            torch.cuda.utilization(index)  # needs pynvml
            self._nvml_index = index
            return "torch.cuda.utilization (NVML)"
        except Exception:  # ModuleNotFoundError for pynvml, or an NVML error
            pass
        if shutil.which("nvidia-smi"):
            self._smi = _NvidiaSmi(
                _visible_index(index),
                int(self.interval * 1000),
                lambda value: self.gpu.append((time.perf_counter(), value)),
            )
            return "nvidia-smi"
        return "none"

    def _run(self) -> None:
        import torch

        while self._running:
            now = time.perf_counter()
            self.memory.append((now, tree_rss_bytes(self.pid)))
            if self._nvml_index is not None:
                try:
                    self.gpu.append((now, float(torch.cuda.utilization(self._nvml_index))))
                except Exception:
                    self._nvml_index = None
            time.sleep(self.interval)

    def stop(self) -> None:
        self._running = False
        self._thread.join()
        if self._smi is not None:
            self._smi.stop()

    def window(self, start: float, end: float) -> dict:
        """Peak tree RSS (bytes) and mean GPU utilisation (0-1, None when unknown) in [start, end]."""
        rss = [value for t, value in self.memory if start <= t <= end]
        gpu = [value for t, value in list(self.gpu) if start <= t <= end]
        return {
            "host_peak_bytes": max(rss, default=0),
            "gpu_busy": sum(gpu) / len(gpu) / 100 if gpu else None,
            "gpu_samples": len(gpu),
        }
