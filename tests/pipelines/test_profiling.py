"""`StageConfig.profile`: the step profiler writes op tables, a summary and a trace for exactly the
configured steps of the configured rank, and a bad range is a config error naming the field."""
from __future__ import annotations

import json

import pytest
import torch

from lance_platform.config import ConfigError
from pipelines.config import ProfileConfig, load_stage_config
from pipelines.profiling import StepProfiler


def run_steps(profiler: StepProfiler, n: int) -> None:
    w = torch.randn(64, 64, requires_grad=True)
    for step in range(n):
        profiler.before(step)
        (torch.randn(8, 64) @ w).relu().sum().backward()
        profiler.after(step)


def test_profiles_the_configured_steps_and_writes_tables_summary_and_trace(tmp_path):
    run_steps(StepProfiler(ProfileConfig(steps=2, start_step=1), rank=0, directory=tmp_path, use_gpu=False), 5)
    out = tmp_path / "profile"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == [1, 2] and summary["gpu_busy"] is None and summary["wall_ms_per_step"] > 0
    # each profiled step: randn x2, mm, relu, sum and their backward -- a handful of ops, counted per step
    assert 5 <= summary["ops_per_step"] < 200
    assert "aten::mm" in (out / "ops_by_cpu_time.txt").read_text()
    trace = json.loads((out / "trace.json").read_text())
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    assert not (out / "ops_by_device_time.txt").exists()


def test_other_ranks_and_a_disabled_profile_write_nothing(tmp_path):
    run_steps(StepProfiler(ProfileConfig(steps=1, start_step=0, rank=1), rank=0, directory=tmp_path, use_gpu=False), 2)
    run_steps(StepProfiler(ProfileConfig(steps=0), rank=0, directory=tmp_path, use_gpu=False), 2)
    assert not (tmp_path / "profile").exists()


def test_profile_range_beyond_the_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="profile.start_step"):
        load_stage_config(None, ["steps=10", "profile.steps=3", "profile.start_step=8"], require_shards=False)
    with pytest.raises(ConfigError, match="profile.rank"):
        load_stage_config(None, ["profile.steps=1", "profile.start_step=0", "profile.rank=2"], require_shards=False)
    assert load_stage_config(None, ["steps=10", "profile.steps=3", "profile.start_step=7"],
                             require_shards=False).profile.steps == 3


def test_gpu_time_counts_kernels_once_not_the_ops_or_annotations_around_them():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from pipelines.profiling import device_time_us

    def event(device, us, annotation=False):
        return SimpleNamespace(device_type=device, self_device_time_total=us, is_user_annotation=annotation)

    events = [event(DeviceType.CPU, 120.0),              # aten::mm: its kernel's time again
              event(DeviceType.CUDA, 100.0),             # the kernel
              event(DeviceType.CUDA, 20.0),              # a memcpy
              event(DeviceType.CUDA, 500.0, annotation=True)]  # FSDP::pre_forward around both
    assert device_time_us(events) == 120.0
