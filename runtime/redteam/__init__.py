"""``warden redteam``: run the attack catalogue through real jobs and report what stopped each attack.

A catalogue is a directory (``redteam/`` in the project) of scenario files. Each scenario
names its agents, the per-agent policy each runs under (``policies/<name>.yaml``: the policy
of the agent's role, written once, never for the scenario) and the script its model plays:
the benign task and, hidden in it, the injected actions (``attack: ID``). The runner

1. groups the scenarios into as few jobs as the agent names allow and writes each job file
   (and its policies, stripped of every flow rule with ``without_flow``) into the run directory;
2. runs the jobs one after another on one Ray through ``runtime.job.run_loaded`` (what
   ``warden run`` does), while a scripted operator answers every parked call through the
   job's real operator API: a call of the benign task is approved, anything else denied;
3. judges each scripted action from the job's audit log alone (decision, approval and
   outcome records), never from what the agent says: an injected action is *stopped* when no
   attempt of it took effect and each was refused by a layer (capability, flow, reader, quota,
   sandbox, approval), or when it was never made because an input it needed was refused; the
   benign task *completed* when each of its actions took effect;
4. plays the scenarios that ask the quarantined reader again without it (``without_reader``
   steps: the data revealed to the agent), for the human approvals per benign task both ways.

The judging (``judge_scenario``) and the figures (``totals``) are plain functions of the
records, unit-tested without Ray.
"""

from .catalogue import LAYERS, Action, AgentDef, Scenario, load_catalogue, load_scenario
from .jobs import group_scenarios, job_steps, load_shipped_job, strip_flow, write_job
from .judge import (Report, ScenarioResult, approvals_by_task, format_report, judge_scenario, layer_of,
                    reader_totals, totals)
from .operator import args_match, operate, operator_decision
from .run import new_run_dir, run_catalogue, save

__all__ = ["LAYERS", "Action", "AgentDef", "Report", "Scenario", "ScenarioResult", "approvals_by_task", "args_match",
           "format_report", "group_scenarios", "job_steps", "judge_scenario", "layer_of", "load_catalogue",
           "load_scenario", "load_shipped_job", "new_run_dir", "operate", "operator_decision", "reader_totals",
           "run_catalogue", "save", "strip_flow", "totals", "write_job"]
