"""Profiling a few training steps (`StageConfig.profile`): `torch.profiler` on one rank over
`profile.steps` steps from `profile.start_step`, written to <stage dir>/profile/:

    ops_by_device_time.txt   operators by self GPU time (CUDA) -- what the GPU spends its time on
    ops_by_cpu_time.txt      operators by self CPU time -- what the host spends launching them
    summary.json             wall time per step, GPU busy time per step and their ratio (`gpu_busy`:
                             well below 1 means the step waits on the host: launches, syncs, Python)
    trace.json               with `profile.trace`: a Chrome / Perfetto trace of those steps

A step that is not profiled costs nothing; a profiled one runs somewhat slower (the profiler's own
bookkeeping), so its wall time is an upper bound.

Host memory of this process (Linux): `reset_peak_host_rss()` frees what it can and restarts the peak,
`peak_host_rss_mib()` reads it (VmHWM: getrusage's ru_maxrss cannot be reset, and a spawned worker
inherits the peak of the process it forked from), `host_rss_mib()` is the resident size now.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import resource
import time
from pathlib import Path

import torch

from lance_platform.files import write_text_atomic

from .config import ProfileConfig

log = logging.getLogger(__name__)


def host_rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_host_rss_mib() -> float:
    """This process's peak resident memory (MiB) since `reset_peak_host_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_host_rss() -> float:
    """Collect garbage, hand freed heap back to the system (glibc's malloc_trim), restart the peak;
    returns the resident memory then (MiB), the base a later `peak_host_rss_mib()` is read against."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return host_rss_mib()


class StepProfiler:
    """`before(step)` / `after(step)` around every step; active only on `profile.rank` for the
    configured steps, and only when there is a directory to write to."""

    def __init__(self, cfg: ProfileConfig, rank: int, directory: Path | None, use_gpu: bool) -> None:
        self.cfg = cfg
        self.directory = directory
        self.use_gpu = use_gpu
        self.enabled = cfg.steps > 0 and rank == cfg.rank and directory is not None
        if cfg.steps > 0 and rank == cfg.rank and directory is None:
            log.warning("profile.steps=%d: the stage has no storage directory to write the profile to; not profiled",
                        cfg.steps)
        self._prof = None
        self._start = 0.0

    @property
    def last_step(self) -> int:
        return self.cfg.start_step + self.cfg.steps - 1

    def before(self, step: int) -> None:
        if not self.enabled or step != self.cfg.start_step:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.use_gpu else [])
        if self.use_gpu:
            torch.cuda.synchronize()
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._start = time.perf_counter()

    def after(self, step: int) -> None:
        if self._prof is None or step != self.last_step:
            return
        if self.use_gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._start
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        self.write(prof, wall)

    def write(self, prof, wall: float) -> dict:
        out = self.directory / "profile"
        out.mkdir(parents=True, exist_ok=True)
        averages = prof.key_averages()
        device_us = device_time_us(averages)
        steps = self.cfg.steps
        summary = {"steps": [self.cfg.start_step, self.last_step], "rank": self.cfg.rank,
                   "wall_ms_per_step": wall * 1e3 / steps,
                   "device_busy_ms_per_step": device_us / 1e3 / steps if self.use_gpu else None,
                   "gpu_busy": device_us / 1e6 / wall if self.use_gpu and wall > 0 else None,
                   "ops_per_step": sum(e.count for e in averages if e.key.startswith("aten::")) / steps}
        write_text_atomic(out / "ops_by_cpu_time.txt", averages.table(sort_by="self_cpu_time_total", row_limit=60))
        if self.use_gpu:
            write_text_atomic(out / "ops_by_device_time.txt", averages.table(sort_by="self_device_time_total", row_limit=60))
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.cfg.trace:
            prof.export_chrome_trace(str(out / "trace.json"))
        log.info("profiled steps %d-%d: %.0f ms/step wall, %s; written to %s", self.cfg.start_step, self.last_step,
                 summary["wall_ms_per_step"],
                 f"GPU busy {summary['gpu_busy']:.0%}" if summary["gpu_busy"] is not None else "CPU only", out)
        return summary


def device_time_us(events) -> float:
    """GPU time of kernels and copies: the device-side events, not the CPU ops that launched them (whose
    device time is their kernels' again) nor user annotations (FSDP's, the optimizer's), which span them."""
    from torch.autograd import DeviceType

    return float(sum(e.self_device_time_total for e in events
                     if e.device_type == DeviceType.CUDA and not e.is_user_annotation))

