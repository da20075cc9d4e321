"""The flow rows of `warden bench authz`: checked for shape and for measuring what they say (never speed)."""

from __future__ import annotations

from runtime.bench import authz, flow
from runtime.bench.flow import AGENT, READ, FlowBench
from runtime.observe import status_of
from runtime.protocol import encode_call
from runtime.trusted.flow import LEVELS


class _Gc:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_the_flow_case_checks_the_sink_rules_and_the_off_case_does_not():
    bench = FlowBench()
    off, on = bench.token(False), bench.token(True)
    assert bench.supervisor.authorize(bench.requests(off, 1)[0]).flow is None  # no rule: no flow step
    checked = bench.supervisor.authorize(bench.requests(on, 1)[0])
    assert checked.flow["handles"] == checked.flow["violations"] == [] and len(checked.flow["checked"]) == 3
    with_handle = bench.supervisor.authorize(bench.requests(on, 1, body=bench.handle(on))[0])
    assert len(with_handle.flow["handles"]) == 1 and with_handle.flow["violations"] == []
    assert with_handle.args["body"].startswith("the quarterly figures")  # substituted
    assert with_handle.held["body"].readers  # the readers check had a reader set to match 'to' against


def test_the_labelling_case_labels_and_taints():
    for output, level in ((flow.PLAIN_OUTPUT, "untrusted"), (flow.ITEMS_OUTPUT, "trusted")):
        bench = FlowBench(output)
        sup = bench.supervisor
        ok = sup.authorize(encode_call(agent=AGENT, token=bench.token(False), tool=READ, args={"folder": "inbox"},
                                       request_key=bench.request_key))
        label, hide = sup._result_label(ok, flow.MESSAGES)
        # every message is from a trusted sender: the item rule runs over all 20 (its longest path)
        assert label.integrity == LEVELS[level] and label.readers and not hide
        sup._taint(ok.vt, label, {"call_id": ok.call_id, "tool": READ, "agent": AGENT})
        assert [c["label"] for c in status_of(sup)["contexts"]] == [{"integrity": level,
                                                                   "readers": [["*@corp.example"]]}]


def test_quick_figures_have_the_flow_rows():
    figures = {f.name: f for f in flow.decision_figures(2, 50, 10, _Gc) + flow.labelling_figures(2, 50, 10, _Gc)}
    assert set(figures) == {"authorize.flow.off", "authorize.flow.on", "authorize.flow.on.handle",
                            "authorize.flow.on.answers64", "authorize.flow.added", "label.result.declared", "label.result.items20"}
    added = figures["authorize.flow.added"]
    assert added.target == "p50 <= 5 us" and added.met is not None and added.runs == 2
    assert all(f.p50 > 0 for name, f in figures.items() if name != "authorize.flow.added")
    assert any("authorize.flow.added" in note for note in flow.NOTES)

def test_the_authz_suite_runs_the_flow_rows():
    result = authz.run(quick=True, progress=lambda _line: None)
    names = {f["name"] for f in result["figures"]}
    assert {"authorize.flow.added", "label.result.items20"} <= names
    assert set(flow.NOTES) <= set(result["notes"])
