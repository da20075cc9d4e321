"""PrometheusObserver, MetricsServer and the shipped Grafana/Prometheus configs (no Ray)."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from runtime.metrics import (AUTHZ_BUCKETS_S, CONTENT_TYPE, KILL_CAUSES, MAX_LABEL_CHARS, OTHER, MetricsServer,
                             PrometheusObserver, parse_metrics, sum_samples)
from runtime.observe import NullObserver, Observer

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "warden-dashboard.json"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def scripted(job: str = "job-1") -> PrometheusObserver:
    """A short supervisor session: three allows, three denials, outcomes with two kills."""
    obs = PrometheusObserver(job)
    obs.decision("planner", "search", "allow", None, 8e-6)
    obs.decision("planner", "search", "allow", None, 2e-5)
    obs.decision("coder", "run_python", "allow", None, 4e-5)
    obs.decision("coder", "run_python", "deny", "POLICY_DENIED", 1.2e-5)
    obs.decision("coder", "run_python", "deny", "RATE_LIMITED", 3e-6)
    obs.decision("coder", "delete_file", "deny", "POLICY_DENIED", 3e-3)
    obs.outcome("planner", "search", True, None, 0.004)
    obs.outcome("planner", "search", False, "TOOL_FAILED", 0.2)
    obs.outcome("coder", "run_python", False, "SANDBOX_CPU", 2.0)
    obs.outcome("coder", "run_python", False, "SANDBOX_MEMORY", 0.7)
    obs.budget("planner", "calls", 2, 10)
    obs.budget("planner", "cost", 0.25, 1.0)
    obs.budget("coder", "calls", 12, 10)  # overdrawn along the chain: nothing is left
    obs.approvals_pending(3)
    obs.approvals_pending(2)
    obs.anomaly("coder", "run_python", "denial_burst")
    obs.anomaly("coder", "run_python", "denial_burst")
    obs.quarantine("coder")
    obs.quarantine("coder")
    return obs


# ---------------------------------------------------------------------- the observer
def test_observer_implements_every_observer_method_with_the_same_signature():
    methods = [n for n, v in vars(Observer).items() if callable(v) and not n.startswith("_")]
    assert set(methods) == {"decision", "outcome", "budget", "approvals_pending", "anomaly", "quarantine",
                            "flow", "context", "handles", "answer"}
    for name in methods:
        want = list(inspect.signature(getattr(NullObserver, name)).parameters)
        assert list(inspect.signature(getattr(PrometheusObserver, name)).parameters) == want, name


def test_scripted_session_gives_exact_counts():
    m = parse_metrics(scripted().render().decode())
    j = {"warden_job": "job-1"}
    assert m[key("warden_calls_total", agent="planner", tool="search", decision="allow", **j)] == 2
    assert m[key("warden_calls_total", agent="coder", tool="run_python", decision="allow", **j)] == 1
    assert m[key("warden_calls_total", agent="coder", tool="run_python", decision="deny", **j)] == 2
    assert m[key("warden_calls_total", agent="coder", tool="delete_file", decision="deny", **j)] == 1
    assert sum_samples(m, "warden_calls_total", decision="allow") == 3
    assert sum_samples(m, "warden_calls_total", decision="deny") == 3

    assert m[key("warden_denials_total", agent="coder", tool="run_python", code="POLICY_DENIED", **j)] == 1
    assert m[key("warden_denials_total", agent="coder", tool="run_python", code="RATE_LIMITED", **j)] == 1
    assert m[key("warden_denials_total", agent="coder", tool="delete_file", code="POLICY_DENIED", **j)] == 1
    assert sum_samples(m, "warden_denials_total", code="POLICY_DENIED") == 2

    assert m[key("warden_outcomes_total", agent="planner", tool="search", result="ok", **j)] == 1
    assert m[key("warden_outcomes_total", agent="planner", tool="search", result="TOOL_FAILED", **j)] == 1
    assert m[key("warden_outcomes_total", agent="coder", tool="run_python", result="SANDBOX_CPU", **j)] == 1
    assert m[key("warden_outcomes_total", agent="coder", tool="run_python", result="SANDBOX_MEMORY", **j)] == 1
    assert m[key("warden_sandbox_kills_total", cause="cpu", **j)] == 1
    assert m[key("warden_sandbox_kills_total", cause="memory", **j)] == 1
    for cause in ("timeout", "pids", "output"):  # present from the start, at zero
        assert m[key("warden_sandbox_kills_total", cause=cause, **j)] == 0

    assert m[key("warden_budget_used", agent="planner", kind="calls", **j)] == 2
    assert m[key("warden_budget_remaining", agent="planner", kind="calls", **j)] == 8
    assert m[key("warden_budget_used", agent="planner", kind="cost", **j)] == 0.25
    assert m[key("warden_budget_remaining", agent="planner", kind="cost", **j)] == 0.75
    assert m[key("warden_budget_remaining", agent="coder", kind="calls", **j)] == 0

    assert m[key("warden_approvals_pending", **j)] == 2
    assert m[key("warden_anomalies_total", agent="coder", tool="run_python", kind="denial_burst", **j)] == 2
    assert m[key("warden_quarantined_agents", **j)] == 1
    assert m[key("warden_agent_quarantined", agent="coder", **j)] == 1
    assert sum_samples(m, "warden_observer_errors_total") == 0
    assert not [name for name, _ in m if name.endswith("_created")]


def test_latency_histograms_land_in_the_right_buckets():
    m = parse_metrics(scripted().render().decode())
    j = {"warden_job": "job-1"}
    authz = {float(dict(labels)["le"]): v for (name, labels), v in m.items()
             if name == "warden_authorization_seconds_bucket"}
    assert sorted(authz) == sorted([*AUTHZ_BUCKETS_S, math.inf])
    assert authz[5e-6] == 1  # 3 us
    assert authz[1e-5] == 2  # + 8 us
    assert authz[2.5e-5] == 4  # + 12 us, 20 us
    assert authz[5e-5] == 5  # + 40 us
    assert authz[2.5e-3] == 5 and authz[5e-3] == 6 and authz[math.inf] == 6
    assert m[key("warden_authorization_seconds_count", **j)] == 6
    assert m[key("warden_authorization_seconds_sum", **j)] == pytest.approx(3.083e-3)

    assert m[key("warden_dispatch_seconds_bucket", tool="run_python", le="1.0", **j)] == 1
    assert m[key("warden_dispatch_seconds_bucket", tool="run_python", le="2.5", **j)] == 2
    assert m[key("warden_dispatch_seconds_bucket", tool="search", le="0.005", **j)] == 1
    assert m[key("warden_dispatch_seconds_bucket", tool="search", le="60.0", **j)] == 2
    assert m[key("warden_dispatch_seconds_count", tool="search", **j)] == 2


def test_outcome_without_code_and_sandbox_unavailable_are_not_kills():
    obs = PrometheusObserver("j")
    obs.outcome("a", "t", False, None, 0.1)
    obs.outcome("a", "t", False, "SANDBOX_UNAVAILABLE", 0.1)
    for code, cause in KILL_CAUSES.items():
        obs.outcome("a", "t", False, code, 0.1)
    m = parse_metrics(obs.render().decode())
    assert m[key("warden_outcomes_total", agent="a", tool="t", result="TOOL_FAILED", warden_job="j")] == 1
    assert m[key("warden_outcomes_total", agent="a", tool="t", result="SANDBOX_UNAVAILABLE", warden_job="j")] == 1
    assert sum_samples(m, "warden_sandbox_kills_total") == 5
    assert {dict(labels)["cause"] for name, labels in m if name == "warden_sandbox_kills_total"} == {
        "timeout", "cpu", "memory", "pids", "output"}


def test_unquarantine_and_unbounded_budget():
    obs = PrometheusObserver("j")
    obs.quarantine("a")
    obs.quarantine("b")
    obs.unquarantine("a")
    obs.budget("b", "cost", 5.0, math.inf)
    obs.approvals_pending(-4)
    m = parse_metrics(obs.render().decode())
    assert m[key("warden_quarantined_agents", warden_job="j")] == 1
    assert m[key("warden_agent_quarantined", agent="a", warden_job="j")] == 0
    assert m[key("warden_agent_quarantined", agent="b", warden_job="j")] == 1
    assert m[key("warden_budget_remaining", agent="b", kind="cost", warden_job="j")] == math.inf
    assert m[key("warden_approvals_pending", warden_job="j")] == 0


class Hostile:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def test_huge_or_odd_label_values_never_raise():
    obs = PrometheusObserver('job "x"\n\\')
    odd = ["x" * 100_000, 'quo"te\\back\nnew', "\x00\x07ctl", "\udcff lone surrogate", "", None, 42, "ünï©ødé ✓"]
    for value in odd:
        obs.decision(value, value, "deny", value, 1e-5)
        obs.outcome(value, value, False, value, 0.5)
        obs.budget(value, value, 1, 2)
        obs.anomaly(value, value, value)
        obs.quarantine(value)
    obs.decision("a", "t", "maybe", None, float("nan"))  # not "allow": counted as a deny
    obs.outcome("a", "t", True, None, -1.0)  # a clock step back: clamped to zero
    obs.budget("a", "calls", float("nan"), 3)  # dropped, not stored
    obs.approvals_pending("many")  # type: ignore[arg-type]
    obs.decision(Hostile(), "t", "allow", None, 1e-5)  # type: ignore[arg-type]
    obs.outcome("a", "t", True, None, "slow")  # type: ignore[arg-type]

    text = obs.render().decode()
    m = parse_metrics(text)
    labels = [v for (_, ls) in m for k, v in ls if k != "le"]
    assert max(map(len, labels)) <= MAX_LABEL_CHARS
    assert all(v.isprintable() for v in labels)
    job = 'job "x"\n\\'.replace("\n", "?")
    assert m[key("warden_calls_total", agent="a", tool="t", decision="deny", warden_job=job)] == 1
    assert m[key("warden_denials_total", agent="a", tool="t", code="unknown", warden_job=job)] == 1
    assert m[key("warden_dispatch_seconds_bucket", tool="t", le="0.001", warden_job=job)] == 1
    assert ("warden_budget_used", frozenset({("agent", "a"), ("kind", "calls"), ("warden_job", job)})) not in m
    assert m[key("warden_agent_quarantined", agent="x" * MAX_LABEL_CHARS, warden_job=job)] == 1
    assert m[key("warden_agent_quarantined", agent="unknown", warden_job=job)] == 1  # "" and None
    assert m[key("warden_agent_quarantined", agent="42", warden_job=job)] == 1
    assert m[key("warden_observer_errors_total", method="approvals_pending", warden_job=job)] == 1
    assert m[key("warden_observer_errors_total", method="decision", warden_job=job)] == 1
    assert m[key("warden_observer_errors_total", method="outcome", warden_job=job)] == 1


def test_label_values_are_capped_but_configured_names_keep_their_series():
    obs = PrometheusObserver("j", agents=["planner"], tools=["search"], max_label_values=3)
    for i in range(50):  # an agent inventing tool names must not grow the metric set
        obs.decision("planner", f"junk-{i}", "deny", "UNKNOWN_TOOL", 1e-5)
    obs.decision("planner", "search", "allow", None, 1e-5)
    m = parse_metrics(obs.render().decode())
    tools = {dict(labels)["tool"] for name, labels in m if name == "warden_calls_total"}
    assert tools == {"search", "junk-0", "junk-1", OTHER}
    assert m[key("warden_calls_total", agent="planner", tool=OTHER, decision="deny", warden_job="j")] == 48
    assert m[key("warden_calls_total", agent="planner", tool="search", decision="allow", warden_job="j")] == 1


def test_two_observers_have_separate_registries_and_leave_the_global_one_alone():
    before = {m.name for m in REGISTRY.collect()}
    a, b = PrometheusObserver("a"), PrometheusObserver("a")  # same job name, still no clash
    a.decision("x", "t", "allow", None, 1e-5)
    a.decision("x", "t", "allow", None, 1e-5)
    b.decision("x", "t", "allow", None, 1e-5)
    assert a.registry is not b.registry
    ma, mb = parse_metrics(a.render().decode()), parse_metrics(b.render().decode())
    assert sum_samples(ma, "warden_calls_total") == 2
    assert sum_samples(mb, "warden_calls_total") == 1
    assert {m.name for m in REGISTRY.collect()} == before


def test_parse_metrics_reads_plain_exposition_text():
    text = '# TYPE x_total counter\nx_total{a="1"} 3\nx_total{a="2"} 4\ny 0.5\n'
    m = parse_metrics(text)
    assert m == {key("x_total", a="1"): 3.0, key("x_total", a="2"): 4.0, key("y"): 0.5}
    assert sum_samples(m, "x_total") == 7 and sum_samples(m, "x_total", a="2") == 4


def test_import_is_light():
    code = "import sys, runtime.metrics; print(sorted({'aiohttp', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- the server
def fetch(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def test_server_serves_metrics_and_health_over_http():
    from aiohttp import web

    async def main() -> None:
        first, second = scripted("job-1"), scripted("job-2")
        second.decision("planner", "search", "allow", None, 1e-5)
        server = MetricsServer(first)
        server.add_source(second)
        extra = web.RouteTableDef()

        @extra.get("/control/ping")
        async def ping(request: web.Request) -> web.Response:
            return web.Response(text="pong")

        server.add_routes(extra)
        host, port = await server.start(port=0)
        assert host == "127.0.0.1" and port > 0 and server.address == (host, port)
        try:
            base = f"http://{host}:{port}"
            status, ctype, body = await asyncio.to_thread(fetch, base + "/metrics")
            assert status == 200
            assert ctype.startswith("text/plain; version=0.0.4")
            assert ctype == CONTENT_TYPE
            m = parse_metrics(body)
            assert sum_samples(m, "warden_calls_total", warden_job="job-1") == 6
            assert sum_samples(m, "warden_calls_total", warden_job="job-2") == 7
            assert sum_samples(m, "warden_sandbox_kills_total", cause="cpu") == 2
            assert body.count("# TYPE warden_calls_total counter") == 1  # merged, one block per name

            first.decision("planner", "search", "deny", "TOKEN_REVOKED", 1e-5)  # live: the next scrape sees it
            _, _, body = await asyncio.to_thread(fetch, base + "/metrics")
            assert sum_samples(parse_metrics(body), "warden_denials_total", code="TOKEN_REVOKED") == 1

            assert (await asyncio.to_thread(fetch, base + "/healthz"))[0] == 200
            assert (await asyncio.to_thread(fetch, base + "/control/ping"))[::2] == (200, "pong")
            assert (await asyncio.to_thread(fetch, base + "/nope"))[0] == 404
            with pytest.raises(RuntimeError):
                server.add_routes([web.get("/late", ping)])
            with pytest.raises(RuntimeError):
                await server.start()
        finally:
            await server.stop()
        await server.stop()  # idempotent
        with pytest.raises(urllib.error.URLError):
            await asyncio.to_thread(urllib.request.urlopen, f"http://{host}:{port}/healthz", None, 2)

    asyncio.run(main())


def test_server_mounts_on_a_given_application_and_refuses_duplicate_jobs():
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/hello", hello)
    obs = PrometheusObserver("solo")
    server = MetricsServer(obs, app=app)
    assert server.app is app
    with pytest.raises(ValueError):
        server.add_source(PrometheusObserver("solo"))
    with pytest.raises(TypeError):
        server.add_source(object())

    async def main() -> None:
        host, port = await server.start()
        try:
            assert (await asyncio.to_thread(fetch, f"http://{host}:{port}/hello"))[::2] == (200, "hi")
            status, _, body = await asyncio.to_thread(fetch, f"http://{host}:{port}/metrics")
            assert status == 200 and body == obs.render().decode()
        finally:
            await server.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------- shipped configs
def exposed_names() -> set[str]:
    obs = scripted()
    obs.unquarantine("coder")
    obs.flow("coder", "run_python", "deny")
    obs.context("coder", 0)
    obs.handles("coder", 1, 10)
    obs.answer("coder", "endorsed")
    names: set[str] = set()
    for family in obs.registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def test_grafana_dashboard_is_valid_and_queries_only_exposed_metrics():
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    assert any(i["name"] == "DS_PROMETHEUS" and i["pluginId"] == "prometheus" for i in board["__inputs"])
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert {"job", "agent"} <= set(variables)

    exposed = exposed_names()
    panels = board["panels"]
    assert len(panels) >= 9
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    referenced: set[str] = set()
    for panel in panels:
        assert panel.get("title"), panel
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            names = re.findall(r"warden_[a-z_]+", target["expr"])
            assert names, (panel["title"], target["expr"])
            for name in names:
                if name == "warden_job":  # the constant label, not a metric
                    continue
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                assert name in exposed or base in exposed, (panel["title"], name)
                referenced.add(base)
    assert "warden_authorization_seconds" in referenced and "warden_dispatch_seconds" in referenced


def test_prometheus_scrape_config_points_at_metrics():
    text = SCRAPE_CONFIG.read_text()
    config = yaml.safe_load(text)
    jobs = config["scrape_configs"]
    assert jobs and all(j["metrics_path"] == "/metrics" and j["static_configs"][0]["targets"] for j in jobs)
    assert "port" in text.lower() and "#" in text


# ---------------------------------------------------------------- information flow
def test_flow_context_and_handle_metrics():
    obs = PrometheusObserver("job-f")
    obs.flow("mailer", "email.send", "deny")
    obs.flow("mailer", "email.send", "deny")
    obs.flow("mailer", "email.send", "approve")
    obs.flow("mailer", "email.read", "allow")
    obs.flow("mailer", "email.send", "nonsense")  # not a known result: never counted as an allow
    obs.context("mailer", 2)
    obs.context("mailer", 0)  # tainted
    obs.context("mailer", 2)  # another run of it, untainted: the lowest over its runs stays
    obs.context("reader", 1)
    obs.handles("mailer", 3, 4096)
    obs.handles("mailer", 2, 1024)
    m = parse_metrics(obs.render().decode())
    j = {"warden_job": "job-f", "agent": "mailer"}
    assert m[key("warden_flow_decisions_total", tool="email.send", result="deny", **j)] == 3
    assert m[key("warden_flow_decisions_total", tool="email.send", result="approve", **j)] == 1
    assert m[key("warden_flow_decisions_total", tool="email.read", result="allow", **j)] == 1
    assert sum_samples(m, "warden_flow_decisions_total", result="allow") == 1
    assert m[key("warden_context_integrity", **j)] == 0
    assert m[key("warden_context_integrity", warden_job="job-f", agent="reader")] == 1
    assert m[key("warden_handles", **j)] == 2 and m[key("warden_handle_bytes", **j)] == 1024
    assert sum_samples(m, "warden_observer_errors_total") == 0


def test_flow_metrics_never_raise_and_count_their_errors():
    obs = PrometheusObserver("job-g", max_label_values=2)
    obs.context("a", 3)  # not a level: dropped, counted
    obs.context("a", "high")
    obs.handles("a", "many", 1)
    obs.handles("a", -5, -1)  # clamped, not an error
    for i in range(5):  # agent names past the cap are folded, not new series
        obs.flow(f"agent-{i}", "t" * 500, "allow")
    m = parse_metrics(obs.render().decode())
    assert m[key("warden_observer_errors_total", method="context", warden_job="job-g")] == 2
    assert m[key("warden_observer_errors_total", method="handles", warden_job="job-g")] == 1
    assert m[key("warden_handles", warden_job="job-g", agent="a")] == 0
    agents = {dict(labels)["agent"] for (name, labels) in m if name == "warden_flow_decisions_total"}
    assert OTHER in agents and len(agents) <= 3
    assert ("warden_context_integrity", frozenset({("warden_job", "job-g"), ("agent", "a")})) not in m


def test_dashboard_has_the_flow_panels():
    board = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    for name in ("warden_flow_decisions_total", "warden_context_integrity", "warden_handles",
                 "warden_handle_bytes"):
        assert name in exprs, name
    flow = next(p for p in board["panels"] if p["title"] == "Flow decisions by result")
    assert "result" in flow["targets"][0]["expr"] and flow["gridPos"]["y"] >= 40
