"""Prometheus metrics for the supervisor's decisions, and a small HTTP server that exposes them.

``PrometheusObserver`` implements ``runtime.observe.Observer``. It keeps:

* its own ``CollectorRegistry`` (never the process-global one), so several jobs or tests in
  one process cannot clash;
* a constant ``warden_job`` label on every series. It is not called ``job`` because
  Prometheus sets ``job`` itself from the scrape config; with distinct ``warden_job`` values,
  several observers can be served from one endpoint without duplicate series.

Invariants: every observer method is cheap and never raises (it sits on the supervisor's hot
path; a failure is counted in ``warden_observer_errors_total`` and logged once). Label values
are coerced to printable strings of at most ``MAX_LABEL_CHARS`` characters, and each label
admits at most ``max_label_values`` distinct values, after which new values are reported as
``OTHER``: agent and tool names in denials come from requests an agent wrote, and an agent
must not be able to grow the metric set without bound (a memory and scrape-size attack).

``MetricsServer`` serves ``GET /metrics`` (text format 0.0.4) and ``GET /healthz`` with
aiohttp, imported only when a server is built so that ``import runtime.metrics`` stays light.
It binds to 127.0.0.1 by default; exposing it wider is an explicit choice of the caller.
"""

from __future__ import annotations

import logging
import math
from enum import Enum
from typing import TYPE_CHECKING, Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .errors import ErrorCode

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "AUTHZ_BUCKETS_S", "CONTENT_TYPE", "DISPATCH_BUCKETS_S", "KILL_CAUSES", "MAX_LABEL_CHARS", "OTHER",
    "MetricsServer", "PrometheusObserver", "parse_metrics", "sum_samples",
]

log = logging.getLogger(__name__)

# The classic text format; prometheus-client >= 0.22 calls its own default 1.0.0.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_LABEL_CHARS = 64
DEFAULT_MAX_LABEL_VALUES = 256
OTHER = "_other"    # a label value past the cap
UNKNOWN = "unknown"  # a missing (None or empty) label value

# Authorization is pure and in-process (microseconds); dispatch crosses Ray and a sandbox.
AUTHZ_BUCKETS_S = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2)
DISPATCH_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Outcome code -> the cause label of warden_sandbox_kills_total. SANDBOX_UNAVAILABLE is not a
# kill: nothing ran.
KILL_CAUSES: dict[str, str] = {
    ErrorCode.SANDBOX_TIMEOUT.value: "timeout",
    ErrorCode.SANDBOX_CPU.value: "cpu",
    ErrorCode.SANDBOX_MEMORY.value: "memory",
    ErrorCode.SANDBOX_PIDS.value: "pids",
    ErrorCode.SANDBOX_OUTPUT.value: "output",
}
_FAILED_WITHOUT_CODE = ErrorCode.TOOL_FAILED.value  # as the supervisor maps codes it does not know
_BUDGET_KINDS = ("calls", "cost")
_ANOMALY_KINDS = ("rate", "denial_burst")
_FLOW_RESULTS = ("allow", "deny", "approve")
_METHODS = ("decision", "outcome", "budget", "approvals_pending", "anomaly", "quarantine", "unquarantine", "flow",
            "context", "handles")


def _clean(value: object) -> str:
    if isinstance(value, Enum):  # ErrorCode is a str Enum; str() of it would be "ErrorCode.X"
        value = value.value
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    text = text[:MAX_LABEL_CHARS]
    if not text:
        return UNKNOWN
    if not text.isprintable():  # control characters, lone surrogates (which would break UTF-8 encoding)
        text = "".join(c if c.isprintable() else "?" for c in text)
    return text


class _LabelValues:
    """The admitted values of one label: at most ``cap`` distinct values, then ``OTHER``."""

    __slots__ = ("_seen", "_cap")

    def __init__(self, cap: int, preset: Iterable[str] = ()) -> None:
        self._cap = cap
        self._seen: dict[str, str] = {}
        for value in preset:
            self(value)

    def __call__(self, value: object) -> str:
        if type(value) is str:  # fast path: the raw value was seen before
            hit = self._seen.get(value)
            if hit is not None:
                return hit
        text = _clean(value)
        hit = self._seen.get(text)
        if hit is not None:
            return hit
        if len(self._seen) >= self._cap:
            return OTHER
        self._seen[text] = text
        return text


def _seconds(value: object) -> float | None:
    """A duration to observe (negative: a clock step, clamped to 0), or None to skip NaN/inf."""
    seconds = float(value)  # type: ignore[arg-type]
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


class PrometheusObserver:
    """An ``Observer`` that counts the supervisor's decisions in its own registry.

    ``agents`` and ``tools`` (optional) are admitted as label values up front, so the
    configured names keep their own series even if requests naming unknown tools fill the cap.
    """

    def __init__(self, job: str, *, agents: Iterable[str] = (), tools: Iterable[str] = (),
                 max_label_values: int = DEFAULT_MAX_LABEL_VALUES) -> None:
        self.job = _clean(job)
        self.registry = CollectorRegistry()
        self._agent = _LabelValues(max_label_values, agents)
        self._tool = _LabelValues(max_label_values, tools)
        self._code = _LabelValues(max_label_values, [c.value for c in ErrorCode])
        self._kind = _LabelValues(max_label_values, _BUDGET_KINDS + _ANOMALY_KINDS)
        self._quarantined: set[str] = set()
        self._logged: set[str] = set()

        r, j = self.registry, "warden_job"
        self.calls = Counter("warden_calls", "Tool calls decided by the supervisor.",
                             [j, "agent", "tool", "decision"], registry=r)
        self.denials = Counter("warden_denials", "Denied tool calls, by error code.",
                               [j, "agent", "tool", "code"], registry=r)
        self.authorization_seconds = Histogram(
            "warden_authorization_seconds", "Time to decide a call (decode to quota reservation).",
            [j], buckets=AUTHZ_BUCKETS_S, registry=r).labels(self.job)
        self.dispatch_seconds = Histogram("warden_dispatch_seconds", "Time from dispatch to result, by tool.",
                                          [j, "tool"], buckets=DISPATCH_BUCKETS_S, registry=r)
        self.outcomes = Counter("warden_outcomes", "Results of dispatched calls: ok or the failure code.",
                                [j, "agent", "tool", "result"], registry=r)
        self.sandbox_kills = Counter("warden_sandbox_kills", "Sandboxed calls killed for breaching a limit.",
                                     [j, "cause"], registry=r)
        self.budget_used = Gauge("warden_budget_used", "Use of a budget of the agent's token chain.",
                                 [j, "agent", "kind"], registry=r)
        self.budget_remaining = Gauge("warden_budget_remaining", "What is left of a budget (limit - used, >= 0).",
                                      [j, "agent", "kind"], registry=r)
        self.approvals = Gauge("warden_approvals_pending", "Calls parked until a human decides.",
                               [j], registry=r).labels(self.job)
        self.anomalies = Counter("warden_anomalies", "Anomaly signals raised by the supervisor.",
                                 [j, "agent", "tool", "kind"], registry=r)
        self.quarantined_agents = Gauge("warden_quarantined_agents", "Agents currently quarantined.",
                                        [j], registry=r).labels(self.job)
        self.agent_quarantined = Gauge("warden_agent_quarantined", "1 while the agent is quarantined, else 0.",
                                       [j, "agent"], registry=r)
        self.flow_decisions = Counter("warden_flow_decisions", "Calls through the flow check (a token with "
                                      "sink rules, or handles passed): allow, deny (FLOW_DENIED) or approve (parked).",
                                      [j, "agent", "tool", "result"], registry=r)
        self.context_integrity = Gauge("warden_context_integrity", "Lowest integrity over the agent's runs: "
                                       "2 trusted, 1 endorsed, 0 untrusted (tainted).", [j, "agent"], registry=r)
        self.handle_count = Gauge("warden_handles", "Live handles issued to the agent.", [j, "agent"], registry=r)
        self.handle_bytes = Gauge("warden_handle_bytes", "Bytes of content the supervisor holds behind the "
                                  "agent's live handles.", [j, "agent"], registry=r)
        self.reader_answers = Counter("warden_reader_answers", "Answers of the quarantined reader to the agent: "
                                      "endorsed (validated), untrusted (validated, of a pattern the agent wrote), "
                                      "free (free text, a handle) or invalid (READER_INVALID).",
                                      [j, "agent", "result"], registry=r)
        self._integrity: dict[str, int] = {}  # agent -> lowest integrity reported (it never goes up)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # see _series
        self.observer_errors = Counter("warden_observer_errors", "Observer calls that failed (and were dropped).",
                                       [j, "method"], registry=r)
        # Known series start at zero, so rate() and dashboards see them before the first event.
        for cause in KILL_CAUSES.values():
            self.sandbox_kills.labels(self.job, cause)
        for method in _METHODS:
            self.observer_errors.labels(self.job, method)

    def _series(self, metric: Any, *values: str) -> Any:
        """``metric.labels(job, *values)``, kept: the per-call series are a few, and labels() costs microseconds."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= 1 << 14:  # label values are capped; this only bounds the memo
                self._children.clear()
            child = self._children[key] = metric.labels(self.job, *values)
        return child

    # ------------------------------------------------------------------ Observer
    def decision(self, agent: str, tool: str, decision: str, code: str | None, authz_s: float) -> None:
        try:
            a, t, seconds = self._agent(agent), self._tool(tool), _seconds(authz_s)
            verdict = "allow" if decision == "allow" else "deny"  # anything else is not an allow
            self._series(self.calls, a, t, verdict).inc()
            if verdict == "deny":
                self._series(self.denials, a, t, self._code(code)).inc()
            if seconds is not None:
                self.authorization_seconds.observe(seconds)
        except Exception:
            self._failed("decision")

    def outcome(self, agent: str, tool: str, ok: bool, code: str | None, dispatch_s: float) -> None:
        try:
            a, t, seconds = self._agent(agent), self._tool(tool), _seconds(dispatch_s)
            result = "ok" if ok else self._code(code if code else _FAILED_WITHOUT_CODE)
            self._series(self.outcomes, a, t, result).inc()
            cause = KILL_CAUSES.get(result)
            if cause is not None:
                self.sandbox_kills.labels(self.job, cause).inc()
            if seconds is not None:
                self._series(self.dispatch_seconds, t).observe(seconds)
        except Exception:
            self._failed("outcome")

    def budget(self, agent: str, kind: str, used: float, limit: float) -> None:
        try:
            a, k = self._agent(agent), self._kind(kind)
            used_f = float(used)
            limit_f = math.inf if limit is None else float(limit)
            if math.isnan(used_f) or math.isnan(limit_f):
                return
            self._series(self.budget_used, a, k).set(used_f)
            self._series(self.budget_remaining, a, k).set(max(limit_f - used_f, 0.0))
        except Exception:
            self._failed("budget")

    def approvals_pending(self, count: int) -> None:
        try:
            self.approvals.set(max(int(count), 0))
        except Exception:
            self._failed("approvals_pending")

    def anomaly(self, agent: str, tool: str, kind: str) -> None:
        try:
            self.anomalies.labels(self.job, self._agent(agent), self._tool(tool), self._kind(kind)).inc()
        except Exception:
            self._failed("anomaly")

    def quarantine(self, agent: str) -> None:
        try:
            a = self._agent(agent)
            self._quarantined.add(a)
            self.agent_quarantined.labels(self.job, a).set(1)
            self.quarantined_agents.set(len(self._quarantined))
        except Exception:
            self._failed("quarantine")

    def flow(self, agent: str, tool: str, result: str) -> None:
        try:
            verdict = result if result in _FLOW_RESULTS else "deny"  # anything unknown is not an allow
            self.flow_decisions.labels(self.job, self._agent(agent), self._tool(tool), verdict).inc()
        except Exception:
            self._failed("flow")

    def context(self, agent: str, integrity: int) -> None:
        try:
            level = int(integrity)
            if not 0 <= level <= 2:
                raise ValueError(f"integrity {integrity!r} is not 0, 1 or 2")
            a = self._agent(agent)  # a run reports its own level: the gauge is the lowest over the agent's runs
            self._integrity[a] = min(self._integrity.get(a, 2), level)
            self.context_integrity.labels(self.job, a).set(self._integrity[a])
        except Exception:
            self._failed("context")

    def handles(self, agent: str, count: int, nbytes: int) -> None:
        try:
            a, n, size = self._agent(agent), int(count), int(nbytes)
            self.handle_count.labels(self.job, a).set(max(n, 0))
            self.handle_bytes.labels(self.job, a).set(max(size, 0))
        except Exception:
            self._failed("handles")

    def answer(self, agent: str, result: str) -> None:
        try:
            verdict = result if result in ("endorsed", "untrusted", "free") else "invalid"  # unknown: no answer
            self.reader_answers.labels(self.job, self._agent(agent), verdict).inc()
        except Exception:
            self._failed("answer")

    # ------------------------------------------------------------------ beyond the Observer protocol
    def unquarantine(self, agent: str) -> None:
        """An operator lifted the agent's quarantine."""
        try:
            a = self._agent(agent)
            self._quarantined.discard(a)
            self.agent_quarantined.labels(self.job, a).set(0)
            self.quarantined_agents.set(len(self._quarantined))
        except Exception:
            self._failed("unquarantine")

    def render(self) -> bytes:
        """This observer's metrics in the Prometheus text format."""
        return generate_latest(_Exposition([self.registry]))  # type: ignore[arg-type]

    def _failed(self, method: str) -> None:
        # Never raise from here either: this runs inside the supervisor's except clauses.
        try:
            self.observer_errors.labels(self.job, method).inc()
            if method not in self._logged:
                self._logged.add(method)
                log.warning("metrics observer %s failed; the event was dropped", method, exc_info=True)
        except Exception:
            return


class _Exposition:
    """A collector over several registries, as they are exposed.

    Families with one name are merged into one, so the text has one HELP/TYPE block per
    metric. ``_created`` samples are dropped: the 0.0.4 text format would turn each into an
    extra gauge series, doubling the series count for a timestamp no panel uses.
    """

    def __init__(self, sources: Iterable[Any] = ()) -> None:
        self.sources: list[Any] = list(sources)

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for source in list(self.sources):
            for family in source.collect():
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                created = family.name + "_created"
                into.samples.extend(s for s in family.samples if s.name != created)
        return merged.values()


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` for one or more observers, on aiohttp.

    Sources are ``PrometheusObserver`` objects or anything with ``collect()`` (a
    ``CollectorRegistry``). More routes can be mounted before ``start`` with ``add_routes``, or
    by passing an ``aiohttp.web.Application`` that already has them.
    """

    def __init__(self, *sources: Any, app: web.Application | None = None) -> None:
        from aiohttp import web  # noqa: PLC0415 - keeps `import runtime.metrics` light

        self._web = web
        self._exposition = _Exposition()
        self._jobs: set[str] = set()
        for source in sources:
            self.add_source(source)
        self.app = app if app is not None else web.Application()
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    def add_source(self, source: Any) -> None:
        """Serve another observer or registry too (also allowed while running)."""
        job = getattr(source, "job", None)
        registry = getattr(source, "registry", source)
        if not callable(getattr(registry, "collect", None)):
            raise TypeError(f"not a metrics source: {type(source).__name__}")
        if job is not None:
            if job in self._jobs:
                raise ValueError(f"two observers for job {job!r} would export the same series")
            self._jobs.add(job)
        self._exposition.sources.append(registry)

    def add_routes(self, routes: Iterable[Any]) -> None:
        """Mount more routes (``web.RouteDef`` items or a ``web.RouteTableDef``) before ``start``."""
        if self._runner is not None:
            raise RuntimeError("add routes before start(); the router is frozen once serving")
        self.app.add_routes(routes)

    def render(self) -> bytes:
        return generate_latest(self._exposition)  # type: ignore[arg-type]

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on host:port (0 picks a free port) and return the address actually bound."""
        if self._runner is not None:
            raise RuntimeError("metrics server already started")
        runner = self._web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            site = self._web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        self.address = (str(bound[0]), int(bound[1]))
        return self.address

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        return self._web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _healthz(self, request: web.Request) -> web.Response:
        return self._web.Response(text="ok\n")


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a scrape keyed by (sample name, labels): ``warden_calls_total``, ``..._bucket``."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return samples


def sum_samples(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and want <= have)
