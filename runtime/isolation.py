"""The ``sandbox:`` part of a policy: where a tool's code runs and under which limits.

The trusted core decides whether a call runs; how a sandbox confines it is the sandbox layer's
(``runtime.sandbox``), configured from the same policy file. The supervisor puts these
settings into each dispatch it signs, so a worker cannot be told other limits.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SandboxRule(BaseModel):
    """Where a tool's code runs and under which limits. Unset fields inherit (tool -> policy -> defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["gvisor", "bwrap"] | None = None
    unsandboxed: bool | None = None  # explicit, loud opt-out; never implied
    cpu_s: float | None = Field(default=None, gt=0, le=3600)
    wall_s: float | None = Field(default=None, gt=0, le=3600)
    memory_mb: int | None = Field(default=None, ge=16, le=65536)
    max_pids: int | None = Field(default=None, ge=1, le=4096)
    max_output_bytes: int | None = Field(default=None, ge=1, le=64 << 20)
    workspace_mb: int | None = Field(default=None, ge=1, le=65536)

    @model_validator(mode="after")
    def _unambiguous(self) -> "SandboxRule":
        if self.unsandboxed and self.backend is not None:
            raise ValueError("set either 'backend' or 'unsandboxed: true', not both")
        return self

    def over(self, base: "SandboxRule") -> "SandboxRule":
        """This rule's fields where set, ``base``'s elsewhere."""
        if self.backend is not None:  # choosing a backend for a tool overrides a policy-wide opt-out
            base = base.model_copy(update={"unsandboxed": None})
        return base.model_copy(update=self.model_dump(exclude_none=True))

    def settings(self) -> dict[str, Any]:
        """The form the supervisor puts into a dispatch: backend name and explicit limits."""
        limits = self.model_dump(exclude_none=True, exclude={"backend", "unsandboxed"})
        backend = "none" if self.unsandboxed else (self.backend or DEFAULT_BACKEND)
        return {"backend": backend, "limits": limits}


DEFAULT_BACKEND = "gvisor"  # the strongest isolation is the default; bwrap is chosen explicitly


def sandbox_settings(policy: Any) -> dict[str, dict[str, Any]]:
    """Per tool of ``policy``: ``{"backend": "gvisor"|"bwrap"|"none", "limits": {...}}``; "*" for the rest."""
    out = {"*": policy.sandbox.settings()}
    for name, rule in policy.tools.items():
        if rule.sandbox is not None:
            out[name] = rule.sandbox.over(policy.sandbox).settings()
    return out


def unsandboxed_tools(policy: Any) -> list[str]:
    return sorted(t for t, s in sandbox_settings(policy).items() if s["backend"] == "none")
