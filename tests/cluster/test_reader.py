"""The quarantined reader in a real job on the shared cluster: an agent pays a hidden bill through
the reader's answer, answers that do not validate are READER_INVALID (on record), free text comes
back as a handle, the reader's process holds no token or key and no other handle's content, and a
reader killed (SIGKILL) mid-question is a typed error, then restarted."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from runtime import auditlog
from runtime.reader import SYSTEM_PROMPT
from tests.cluster.reader_agents import PRIVATE_MARKER

from .test_control_plane import Background
from .test_crash import _wait_for

pytestmark = pytest.mark.cluster
IBAN = "DE02120300000000202051"


def _job(tmp_path: Path) -> Path:
    policy = {
        "agent": "biller",
        "tools": {"docs.bill": {"effect": "read", "output": {"hide": True}},
                  "docs.note": {"effect": "read", "output": {"hide": True}},
                  "reader.ask": {"effect": "read"},
                  "bank.pay": {"effect": "write", "ifc": {"args": {"iban": "trusted", "amount": "endorsed"}}},
                  "mail.send": {"effect": "write", "ifc": {"args": {"to": "trusted"}}}},
        "schemas": {"amount": {"type": "number", "minimum": 0, "maximum": 5000}},
    }
    (tmp_path / "biller.yaml").write_text(yaml.safe_dump(policy))
    rules = [{"question": "amount", "extract": r"Amount due: ([0-9.,]+)"},
             {"question": "IBAN", "extract": r"IBAN: (\S+)"},  # with dashes: not the pattern
             {"question": "vendor", "extract": r"Vendor: (\w+)"},  # the letterhead says initech: not in the enum
             {"question": "Summarise", "answer": "A bill from ACME Corp for 1,240.50 EUR, due 2026-12-31."},
             {"question": "Slowly", "answer": True, "delay_s": 30}]
    job = tmp_path / "reader.yaml"
    job.write_text(yaml.safe_dump({
        "name": "reader", "entry": ["biller"], "tools": ["tests.cluster.reader_agents"], "call_timeout_s": 60,
        "workers": {"count": 1},
        "reader": {"model": {"kind": "scripted", "rules": rules}, "count": 1, "max_restarts": 2,
                   "resources": {"num_cpus": 0.1}, "system": "Amounts are in euros."},
        "agents": [{"name": "biller", "class": "tests.cluster.reader_agents:BillAgent",
                    "policy": str(tmp_path / "biller.yaml"),
                    "task": {"dir": str(tmp_path), "iban": IBAN, "boss": "boss@corp.example"}}]}))
    return job


def _reader_pids(gcs_address: str) -> list[int]:
    """Processes Ray titled as a ReaderActor (a worker's title names its actor class) whose raylet is one
    of this cluster's (another Ray on the machine may run readers too)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or b"ray::ReaderActor" not in (entry / "cmdline").read_bytes():
                continue
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if f"--gcs-address={gcs_address}".encode() in Path(f"/proc/{parent}/cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return pids


def _in_memory(pid: int, needles: dict[str, bytes]) -> set[str]:
    """Which ``needles`` occur in the private memory (heap and anonymous mappings) of process ``pid``."""
    found: set[str] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            name = fields[5] if len(fields) > 5 else ""
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if "r" not in fields[1] or name not in ("", "[heap]", "[stack]") or end - start > 1 << 30:
                continue
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            found |= {k for k, n in needles.items() if n in chunk}
    return found


def test_an_agent_pays_a_hidden_bill_through_the_reader(ray_instance, tmp_path):
    job = Background(str(_job(tmp_path)), tmp_path / "runs")
    run_dir = job.run_dir()
    secrets_file = tmp_path / "secrets.json"
    _wait_for("the agent asked its questions", secrets_file.exists, job)
    held = json.loads(secrets_file.read_text())
    (pid,) = _reader_pids(ray_instance.address)
    found = _in_memory(pid, {"token": bytes.fromhex(held["token"]), "request_key": bytes.fromhex(held["request_key"]),
                             "other handle": PRIVATE_MARKER.encode(), "own prompt": SYSTEM_PROMPT[:60].encode()})
    assert found == {"own prompt"}  # the scan works; no token, no request key, no other handle's content
    accepted = run_dir / "reader-0.dispatches"  # the reader's record of the dispatches it accepted
    before = len(accepted.read_text().splitlines())
    (tmp_path / "inspected").write_text("1")
    _wait_for("the slow question reached the reader", lambda: len(accepted.read_text().splitlines()) > before, job)
    os.kill(pid, signal.SIGKILL)  # accepted, so in flight: its model takes 30 s to answer
    result = job.join()

    assert result.ok, result.errors
    out = result.results["biller"]
    assert out["hidden"] is True
    assert out["amount"] == {"ok": True, "value": 1240.5}  # read from the bill, which the agent never saw
    assert out["pay"]["ok"] is True  # amount endorsed, IBAN from the task
    assert out["pay_to_answer"] == {"ok": False, "code": "FLOW_DENIED"}  # the answer is no trusted IBAN
    assert out["iban"] == {"ok": False, "code": "READER_INVALID"}
    assert out["vendor"] == {"ok": False, "code": "READER_INVALID"}
    assert out["summary_is_handle"] is True and out["mail"]["ok"] is True  # free text: forwarded unread
    assert out["no_schema"] == {"ok": False, "code": "MALFORMED"}
    assert out["no_handle"] == {"ok": False, "code": "MALFORMED"}
    assert out["killed"] == {"ok": False, "code": "WORKER_UNAVAILABLE"}  # in flight when its reader died
    assert out["after_restart"] == {"ok": True, "value": 1240.5}  # the restarted reader answers

    records = list(auditlog.read_records(run_dir / "audit.log"))
    asks = [r for r in records if r.get("kind") == "outcome" and r["tool"] == "reader.ask"]
    answered = [r for r in asks if r.get("answer") == 1240.5]
    assert len(answered) == 2 and all(r["label"]["integrity"] == "endorsed" for r in answered)
    invalid = [r for r in asks if r.get("code") == "READER_INVALID"]
    assert len(invalid) == 2 and any("initech" in r["reason"] for r in invalid)  # the raw answer: on record only
    assert any("DE89-3704" in r["reason"] for r in invalid)
    free = [r for r in asks if r.get("handle")]
    assert len(free) == 1 and free[0]["label"]["integrity"] == "untrusted"
    assert [r["code"] for r in asks if r.get("code") == "WORKER_UNAVAILABLE"] == ["WORKER_UNAVAILABLE"]
    denied = {(r["tool"], r["code"]) for r in records if r.get("decision") == "deny"}
    assert denied == {("bank.pay", "FLOW_DENIED"), ("reader.ask", "MALFORMED")}


def test_a_tool_calling_agents_model_asks_the_reader_and_pays_with_the_answer(ray_instance, tmp_path):
    """A ToolCallingAgent whose (scripted) model reads the bill as a handle, asks the reader, and pays the
    amount it was told; the same amount from a revealed bill would come from a tainted context."""
    job = _job(tmp_path)
    spec = yaml.safe_load(job.read_text())
    policy = yaml.safe_load((tmp_path / "biller.yaml").read_text())
    policy["tools"]["handle.reveal"] = {"effect": "read"}
    (tmp_path / "biller.yaml").write_text(yaml.safe_dump(policy))
    ask = {"call": "reader.ask", "args": {"handle": {"$handle_of": "docs.bill"}, "question": "What is the amount due?",
                                          "schema": "amount"}}
    pay = {"call": "bank.pay", "args": {"iban": IBAN, "amount": 1240.5}}
    steps = [{"call": "docs.bill", "args": {}}, ask, pay,
             {"call": "handle.reveal", "args": {"handle": {"$handle_of": "docs.bill"}}}, pay,
             {"answer": "paid"}]
    spec["tools"] = ["tests.cluster.reader_agents", "runtime.toolbox"]
    spec["agents"] = [{"name": "biller", "class": "runtime.agent:ToolCallingAgent", "policy": str(tmp_path / "biller.yaml"),
                       "config": {"model": {"kind": "scripted", "steps": steps}, "max_turns": 8}}]
    spec["task"] = f"Pay the latest bill to {IBAN}."
    job.write_text(yaml.safe_dump(spec))
    result = Background(str(job), tmp_path / "runs").join()

    assert result.ok, result.errors
    out = result.results["biller"]
    assert out["answer"] == "paid"
    assert [(c["tool"], c["ok"], c["code"]) for c in out["calls"]] == [
        ("docs.bill", True, None), ("reader.ask", True, None), ("bank.pay", True, None),
        ("handle.reveal", True, None), ("bank.pay", False, "FLOW_DENIED")]  # read it yourself: the context is tainted
