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
