"""The default torch thread count on CPU: physical cores of the allowed CPUs, capped by the cgroup quota."""
from __future__ import annotations

from sluice.engine import cpu_threads
from sluice.engine.cpu_threads import cgroup_cpu_quota, resolve_cpu_threads


def test_cgroup_quota_rounds_up_and_max_means_none(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert cgroup_cpu_quota(str(cpu_max)) == 2
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_quota(str(cpu_max)) is None
    assert cgroup_cpu_quota(str(tmp_path / "missing")) is None


def test_default_is_physical_cores_capped_by_quota(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLUICE_CPU_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "physical_cores", lambda: 8)
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: 3)
    assert resolve_cpu_threads(None) == 3
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: None)
    assert resolve_cpu_threads(None) == 8


def test_flag_then_env_then_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    monkeypatch.delenv("SLUICE_CPU_THREADS", raising=False)
    assert resolve_cpu_threads(None) is None  # torch already follows OMP_NUM_THREADS
    monkeypatch.setenv("SLUICE_CPU_THREADS", "2")
    assert resolve_cpu_threads(None) == 2
    assert resolve_cpu_threads(4) == 4
