"""One error tree for all of Warden, each error with a stable code.

    WardenError                      base; .code (ErrorCode), .tool, .reason, .retryable
    ├── Denied                       the trusted core refused a call (fail closed)
    │   ├── MalformedRequest         MALFORMED, TOO_LARGE: bounded decode failed
    │   ├── UnknownTool              UNKNOWN_TOOL
    │   ├── TokenRejected            BAD_TOKEN, TOKEN_EXPIRED, TOKEN_NOT_YET_VALID,
    │   │                            TOKEN_REVOKED, WRONG_HOLDER, WRONG_AUDIENCE,
    │   │                            BAD_REQUEST_MAC, REPLAY, DEPTH_EXCEEDED
    │   ├── PolicyDenied             POLICY_DENIED: a caveat does not hold
    │   ├── QuotaExceeded            RATE_LIMITED (.retry_after_s), CONCURRENCY_LIMIT,
    │   │                            BUDGET_EXHAUSTED, APPROVAL_QUEUE_FULL (the agent has
    │   │                            as many calls parked for approval as it may)
    │   ├── AuditUnavailable         AUDIT_UNAVAILABLE: no record, no call
    │   ├── DelegationDenied         DELEGATION_DENIED
    │   ├── ApprovalDenied           APPROVAL_DENIED, APPROVAL_TIMEOUT: a human said no, or nobody answered
    │   ├── FlowDenied               FLOW_DENIED: data of the wrong label would reach a sink;
    │   │                            HANDLE_UNKNOWN, HANDLE_DENIED, HANDLE_LIMIT: a handle unknown
    │   │                            (expired, lost in a shard restart), another agent's, over the limits;
    │   │                            READER_INVALID: a reader's answer its schema does not admit
    │   └── DispatchRefused          DISPATCH_REFUSED: a worker refused an unauthenticated dispatch
    ├── ToolFailed                   TOOL_FAILED, WORKER_UNAVAILABLE: allowed, but did not succeed;
    │   │                            EGRESS_REFUSED: http.fetch refused a destination that is not public
    │   ├── SandboxKilled            SANDBOX_TIMEOUT, SANDBOX_CPU, SANDBOX_MEMORY, SANDBOX_PIDS,
    │   │                            SANDBOX_OUTPUT: a limit was breached; the process tree was killed
    │   └── SandboxUnavailable       SANDBOX_UNAVAILABLE: the policy's backend cannot run here
    ├── ConfigError                  POLICY_INVALID, JOB_INVALID: a file that does not load
    └── InternalError                INTERNAL: a bug; still a denial, never an allow

A denial shows the agent only ``code`` and ``tool`` (``public()``); the audit log gets
``reason``, the full explanation with values ("calls=11, limit=10"). Mistakes of the agent's
own making (``MALFORMED``, ``TOO_LARGE``: "unknown arguments ['colour']") and a tool's own
error message (``TOOL_FAILED``) also travel as ``detail``, capped at ``MAX_DETAIL_CHARS``: they
hold nothing of the policy, and an agent cannot correct what it is not told. Errors cross the
Ray boundary as plain data (``to_wire`` / ``from_wire``), never as pickled exceptions.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    MALFORMED = "MALFORMED"
    TOO_LARGE = "TOO_LARGE"
    UNKNOWN_TOOL = "UNKNOWN_TOOL"
    BAD_TOKEN = "BAD_TOKEN"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    TOKEN_NOT_YET_VALID = "TOKEN_NOT_YET_VALID"
    TOKEN_REVOKED = "TOKEN_REVOKED"
    WRONG_HOLDER = "WRONG_HOLDER"
    WRONG_AUDIENCE = "WRONG_AUDIENCE"
    BAD_REQUEST_MAC = "BAD_REQUEST_MAC"
    REPLAY = "REPLAY"
    DEPTH_EXCEEDED = "DEPTH_EXCEEDED"
    WRONG_SHARD = "WRONG_SHARD"
    POLICY_DENIED = "POLICY_DENIED"
    RATE_LIMITED = "RATE_LIMITED"
    CONCURRENCY_LIMIT = "CONCURRENCY_LIMIT"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
    APPROVAL_QUEUE_FULL = "APPROVAL_QUEUE_FULL"
    AUDIT_UNAVAILABLE = "AUDIT_UNAVAILABLE"
    DELEGATION_DENIED = "DELEGATION_DENIED"
    APPROVAL_DENIED = "APPROVAL_DENIED"
    APPROVAL_TIMEOUT = "APPROVAL_TIMEOUT"
    FLOW_DENIED = "FLOW_DENIED"
    HANDLE_UNKNOWN = "HANDLE_UNKNOWN"
    HANDLE_DENIED = "HANDLE_DENIED"
    HANDLE_LIMIT = "HANDLE_LIMIT"
    READER_INVALID = "READER_INVALID"
    DISPATCH_REFUSED = "DISPATCH_REFUSED"
    TOOL_FAILED = "TOOL_FAILED"
    WORKER_UNAVAILABLE = "WORKER_UNAVAILABLE"
    EGRESS_REFUSED = "EGRESS_REFUSED"
    SANDBOX_TIMEOUT = "SANDBOX_TIMEOUT"
    SANDBOX_CPU = "SANDBOX_CPU"
    SANDBOX_MEMORY = "SANDBOX_MEMORY"
    SANDBOX_PIDS = "SANDBOX_PIDS"
    SANDBOX_OUTPUT = "SANDBOX_OUTPUT"
    SANDBOX_UNAVAILABLE = "SANDBOX_UNAVAILABLE"
    SUPERVISOR_UNAVAILABLE = "SUPERVISOR_UNAVAILABLE"
    POLICY_INVALID = "POLICY_INVALID"
    JOB_INVALID = "JOB_INVALID"
    INTERNAL = "INTERNAL"


MAX_DETAIL_CHARS = 500
# The codes whose reason reaches the agent: none of them is a decision of the policy.
DETAIL_CODES = frozenset({ErrorCode.MALFORMED, ErrorCode.TOO_LARGE, ErrorCode.TOOL_FAILED})


class WardenError(Exception):
    """Base of every Warden error. ``reason`` is for the audit log, not for the agent."""

    default_code: ErrorCode = ErrorCode.INTERNAL
    retryable: bool = False

    def __init__(
        self,
        reason: str = "",
        *,
        code: ErrorCode | None = None,
        tool: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.code = ErrorCode(code) if code is not None else self.default_code
        self.reason = reason or self.code.value
        self.tool = tool
        self.retry_after_s = retry_after_s
        self.detail: str | None = None  # set on the agent's side from the reply (see DETAIL_CODES)
        super().__init__(self.reason)

    def __str__(self) -> str:
        where = f" [{self.tool}]" if self.tool else ""
        return f"{self.code.value}{where}: {self.reason}"

    def public(self) -> str:
        """What an agent (and so the model) may see: the code and the tool, no policy values;
        for the codes of ``DETAIL_CODES``, the detail the reply carried."""
        where = f" on tool '{self.tool}'" if self.tool else ""
        extra = f"; retry after {self.retry_after_s:.3f}s" if self.retry_after_s else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.code.value}{where}{extra}{detail}"

    def to_wire(self, *, with_reason: bool = False) -> dict[str, Any]:
        wire: dict[str, Any] = {"code": self.code.value, "tool": self.tool}
        if self.retry_after_s is not None:
            wire["retry_after_s"] = self.retry_after_s
        if with_reason:
            wire["reason"] = self.reason
        if self.code in DETAIL_CODES:
            wire["detail"] = self.reason[:MAX_DETAIL_CHARS]
        return wire

    @staticmethod
    def from_wire(wire: dict[str, Any]) -> "WardenError":
        try:
            code = ErrorCode(wire.get("code"))
        except ValueError:
            code = ErrorCode.INTERNAL
        cls = _CLASS_OF_CODE.get(code, InternalError)
        exc = cls(
            str(wire.get("reason") or wire.get("detail") or code.value),
            code=code,
            tool=wire.get("tool"),
            retry_after_s=wire.get("retry_after_s"),
        )
        if code in DETAIL_CODES and wire.get("detail"):
            exc.detail = str(wire["detail"])[:MAX_DETAIL_CHARS]
        return exc


class Denied(WardenError):
    """The trusted core refused the call. Nothing was dispatched."""

    default_code = ErrorCode.POLICY_DENIED


class MalformedRequest(Denied):
    default_code = ErrorCode.MALFORMED


class UnknownTool(Denied):
    default_code = ErrorCode.UNKNOWN_TOOL


class TokenRejected(Denied):
    default_code = ErrorCode.BAD_TOKEN


class PolicyDenied(Denied):
    default_code = ErrorCode.POLICY_DENIED


class QuotaExceeded(Denied):
    default_code = ErrorCode.BUDGET_EXHAUSTED

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.code in (ErrorCode.RATE_LIMITED, ErrorCode.CONCURRENCY_LIMIT, ErrorCode.APPROVAL_QUEUE_FULL)


class AuditUnavailable(Denied):
    default_code = ErrorCode.AUDIT_UNAVAILABLE


class DelegationDenied(Denied):
    default_code = ErrorCode.DELEGATION_DENIED


class ApprovalDenied(Denied):
    default_code = ErrorCode.APPROVAL_DENIED


class FlowDenied(Denied):
    """Information-flow control refused the call: a sink rule, or a handle the agent may not use.
    ``flow``: the rule broken, the argument, its label and where the label came from (for the record)."""

    default_code = ErrorCode.FLOW_DENIED

    def __init__(self, reason: str = "", *, flow: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(reason, **kwargs)
        self.flow = flow


class DispatchRefused(Denied):
    default_code = ErrorCode.DISPATCH_REFUSED


class ToolFailed(WardenError):
    """The call was allowed and dispatched, but the tool did not succeed."""

    default_code = ErrorCode.TOOL_FAILED


class SandboxKilled(ToolFailed):
    """A sandbox limit was breached; the whole process tree was killed. The worker is fine."""

    default_code = ErrorCode.SANDBOX_TIMEOUT


class SandboxUnavailable(ToolFailed):
    """The backend the policy asks for is not installed or cannot run on this host."""

    default_code = ErrorCode.SANDBOX_UNAVAILABLE


class SupervisorUnavailable(WardenError):
    """The supervisor shard handling the call stopped (crashed or restarting) before it answered.
    The call may or may not have run; it is never retried on the agent's behalf."""

    default_code = ErrorCode.SUPERVISOR_UNAVAILABLE


class ConfigError(WardenError):
    """A policy or job file that does not load. The job does not start."""

    default_code = ErrorCode.POLICY_INVALID


class InternalError(Denied):
    """A bug in Warden. Still a denial: the trusted core never allows on error."""

    default_code = ErrorCode.INTERNAL


_CLASS_OF_CODE: dict[ErrorCode, type[WardenError]] = {
    ErrorCode.MALFORMED: MalformedRequest,
    ErrorCode.TOO_LARGE: MalformedRequest,
    ErrorCode.UNKNOWN_TOOL: UnknownTool,
    ErrorCode.BAD_TOKEN: TokenRejected,
    ErrorCode.TOKEN_EXPIRED: TokenRejected,
    ErrorCode.TOKEN_NOT_YET_VALID: TokenRejected,
    ErrorCode.TOKEN_REVOKED: TokenRejected,
    ErrorCode.WRONG_HOLDER: TokenRejected,
    ErrorCode.WRONG_AUDIENCE: TokenRejected,
    ErrorCode.BAD_REQUEST_MAC: TokenRejected,
    ErrorCode.REPLAY: TokenRejected,
    ErrorCode.DEPTH_EXCEEDED: TokenRejected,
    ErrorCode.WRONG_SHARD: TokenRejected,
    ErrorCode.POLICY_DENIED: PolicyDenied,
    ErrorCode.RATE_LIMITED: QuotaExceeded,
    ErrorCode.CONCURRENCY_LIMIT: QuotaExceeded,
    ErrorCode.BUDGET_EXHAUSTED: QuotaExceeded,
    ErrorCode.APPROVAL_QUEUE_FULL: QuotaExceeded,
    ErrorCode.AUDIT_UNAVAILABLE: AuditUnavailable,
    ErrorCode.DELEGATION_DENIED: DelegationDenied,
    ErrorCode.DISPATCH_REFUSED: DispatchRefused,
    ErrorCode.APPROVAL_DENIED: ApprovalDenied,
    ErrorCode.APPROVAL_TIMEOUT: ApprovalDenied,
    ErrorCode.FLOW_DENIED: FlowDenied,
    ErrorCode.HANDLE_UNKNOWN: FlowDenied,
    ErrorCode.HANDLE_DENIED: FlowDenied,
    ErrorCode.HANDLE_LIMIT: FlowDenied,
    ErrorCode.READER_INVALID: FlowDenied,
    ErrorCode.TOOL_FAILED: ToolFailed,
    ErrorCode.WORKER_UNAVAILABLE: ToolFailed,
    ErrorCode.EGRESS_REFUSED: ToolFailed,
    ErrorCode.SANDBOX_TIMEOUT: SandboxKilled,
    ErrorCode.SANDBOX_CPU: SandboxKilled,
    ErrorCode.SANDBOX_MEMORY: SandboxKilled,
    ErrorCode.SANDBOX_PIDS: SandboxKilled,
    ErrorCode.SANDBOX_OUTPUT: SandboxKilled,
    ErrorCode.SANDBOX_UNAVAILABLE: SandboxUnavailable,
    ErrorCode.SUPERVISOR_UNAVAILABLE: SupervisorUnavailable,
    ErrorCode.POLICY_INVALID: ConfigError,
    ErrorCode.JOB_INVALID: ConfigError,
    ErrorCode.INTERNAL: InternalError,
}
