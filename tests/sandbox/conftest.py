"""Sandbox tests run against the real backends. They are required, not optional: when a
backend cannot run here the tests fail with the reason (``make test`` installs both)."""

from __future__ import annotations

import pytest

from runtime.errors import SandboxUnavailable
from runtime.sandbox.pool import make_backend

BACKENDS = ["bwrap", "gvisor"]


def require_backend(name: str):
    backend = make_backend(name)
    try:
        backend.check()
    except SandboxUnavailable as exc:
        pytest.fail(f"{name} backend unavailable: {exc.reason}")
    return backend


@pytest.fixture(params=BACKENDS)
def backend_name(request) -> str:
    require_backend(request.param)
    return request.param
