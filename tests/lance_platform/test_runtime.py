"""Ray setup failures are one typed, actionable error, never a traceback from inside Ray."""
from __future__ import annotations

import pytest

from lance_platform import runtime
from lance_platform.runtime import RayUnavailableError, init_ray


def test_a_local_ray_that_times_out_at_start_is_one_line(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def slow_start(**kwargs):
        assert kwargs["address"] == "local"
        raise TimeoutError("Timed out after 60 seconds while waiting for the GCS to start.\nmore detail")

    monkeypatch.setattr(ray, "init", slow_start)
    with pytest.raises(RayUnavailableError) as err:
        init_ray()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("could not start a local Ray: Timed out after 60 seconds")
    assert "--address" in message


def test_an_unreachable_cluster_is_one_line(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: (_ for _ in ()).throw(ConnectionError("no GCS at 127.0.0.2:6379\nx")))
    with pytest.raises(RayUnavailableError, match=r"^cannot connect to Ray at 127.0.0.1:1: no GCS at 127.0.0.2:6379$"):
        runtime.init_ray("127.0.0.1:1")
