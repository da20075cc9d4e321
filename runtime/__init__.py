"""Warden: a multi-agent runtime on Ray that treats the model as an untrusted component.

The public API. Ray-dependent pieces (``runtime.actors``, ``runtime.job``) are imported
lazily by the CLI so that importing ``runtime`` does not import Ray.
"""

from .agent import Agent, ToolCallingAgent, is_handle, outcome
from .errors import (ApprovalDenied, AuditUnavailable, ConfigError, DelegationDenied, Denied, DispatchRefused, ErrorCode,
                     FlowDenied, InternalError, MalformedRequest, PolicyDenied, QuotaExceeded, SandboxKilled, SandboxUnavailable,
                     TokenRejected, ToolFailed,
                     UnknownTool, WardenError)
from .harness import Decision, PolicyHarness
from .jobcheck import check_job
from .llm import ChatModel, ModelTurn, OpenAIChatModel, ScriptedModel, run_tool_loop
from .policy_cases import CasesReport, run_cases
from .registry import Registration, register_agent
from .schema import SchemaError
from .tool import HOST, PATH, URL, Tool, ToolContext, tool, tool_from_schema
from .trusted.policy import Policy
from .policyfile import load_policy

__all__ = [
    "Agent", "ToolCallingAgent", "is_handle", "outcome",
    "ApprovalDenied", "AuditUnavailable", "ConfigError", "DelegationDenied", "Denied", "DispatchRefused", "ErrorCode",
    "FlowDenied", "InternalError", "MalformedRequest", "PolicyDenied", "QuotaExceeded", "SandboxKilled", "SandboxUnavailable",
    "TokenRejected", "ToolFailed",
    "UnknownTool", "WardenError",
    "ChatModel", "ModelTurn", "OpenAIChatModel", "ScriptedModel", "run_tool_loop",
    "HOST", "PATH", "URL", "SchemaError", "Tool", "ToolContext", "tool", "tool_from_schema",
    "Policy", "load_policy", "Decision", "PolicyHarness", "CasesReport", "run_cases", "Registration", "register_agent",
    "check_job",
]
