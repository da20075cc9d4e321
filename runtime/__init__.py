"""Warden: a multi-agent runtime on Ray that treats the model as an untrusted component.

The public API. Ray-dependent pieces (``runtime.actors``, ``runtime.job``) are imported
lazily by the CLI so that importing ``runtime`` does not import Ray.
"""

from .agent import Agent, ToolCallingAgent
from .errors import (ApprovalDenied, AuditUnavailable, ConfigError, DelegationDenied, Denied, DispatchRefused, ErrorCode,
                     InternalError, MalformedRequest, PolicyDenied, QuotaExceeded, SandboxKilled, SandboxUnavailable,
                     TokenRejected, ToolFailed,
                     UnknownTool, WardenError)
from .llm import ChatModel, ModelTurn, OpenAIChatModel, ScriptedModel, run_tool_loop
from .schema import SchemaError
from .tool import HOST, PATH, URL, Tool, ToolContext, tool, tool_from_schema

__all__ = [
    "Agent", "ToolCallingAgent",
    "ApprovalDenied", "AuditUnavailable", "ConfigError", "DelegationDenied", "Denied", "DispatchRefused", "ErrorCode",
    "InternalError", "MalformedRequest", "PolicyDenied", "QuotaExceeded", "SandboxKilled", "SandboxUnavailable",
    "TokenRejected", "ToolFailed",
    "UnknownTool", "WardenError",
    "ChatModel", "ModelTurn", "OpenAIChatModel", "ScriptedModel", "run_tool_loop",
    "HOST", "PATH", "URL", "SchemaError", "Tool", "ToolContext", "tool", "tool_from_schema",
]
