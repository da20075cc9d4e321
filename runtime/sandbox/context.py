"""What a tool is handed by its worker besides its arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolContext:
    """Who is calling, and the job's tool configuration (``tool_config`` in the job file)."""

    agent: str
    call_id: str
    job: str
    config: dict[str, Any] = field(default_factory=dict)
    sandbox: Any = None  # a SandboxHandle for sandboxed tools, else None
    # this tool's, from the trusted side (header -> {"value", "origin"}: send value only to origin); never to a sandbox
    credentials: dict[str, dict[str, str]] = field(default_factory=dict)
