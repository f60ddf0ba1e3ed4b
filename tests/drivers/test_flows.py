"""The Prefect deployment end to end: a real Prefect server on loopback, the `pipeline`
deployment registered and executed by `serve`, a run triggered through the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import (
    REPO_ROOT,
    STAGES,
    clone_project,
    run_tool,
    start_prefect_server,
    stop_group,
    wait_for,
)


def record_id(project: Path) -> str:
    return json.loads((project / "models" / "policy.mlflow_run.json").read_text())["run_id"]


def processes_with_env(key: str, value: str) -> list[str]:
    """Command lines of live processes whose environment holds key=value (this user's processes)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{key}={value}".encode() in environ.read_bytes().split(b"\0"):
                state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # exited meanwhile, or not ours
            continue
    return found


def flow_run_artifacts(client, flow_run_id):
    """{key: Artifact} of one flow run, its flow-level artifacts included. Posted directly: the sync
    client sends unset filters as null (rejected by the server), and an empty task-run filter would
    keep only artifacts made inside tasks."""
    from prefect.client.schemas.objects import Artifact

    body = {
        "artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}},
        "sort": "KEY_ASC",
        "limit": 200,
        "offset": 0,
    }
    response = client._client.post("/artifacts/filter", json=body)
    response.raise_for_status()
    return {a.key: a for a in Artifact.model_validate_list(response.json())}


@pytest.mark.slow
def test_pipeline_deployment_runs_through_the_api(prefect_server, tiny_reproduced, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project = clone_project(tiny_reproduced["path"], tmp_path / "project")
    # a changed training setting: train and evaluate must really run, the rest stays DVC-cached
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["max_steps"] = 4
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = dict(prefect_server, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.deploy",
            "--project-dir",
            str(project),
            "--only",
            "pipeline",
            "--no-schedules",
        ],
        cwd=project,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with (
            temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}),
            get_client(sync_client=True) as client,
        ):

            def deployment():
                try:
                    return client.read_deployment_by_name("pipeline/mrpo-nightly")
                except Exception:  # noqa: BLE001 - not registered yet
                    return None

            dep = wait_for(deployment, 90, "serve to register pipeline/mrpo-nightly", serve, log)
            assert dep.parameters["project_dir"] == str(project.resolve())
            run = client.create_flow_run_from_deployment(dep.id, parameters={"project_dir": str(project)})
            final = wait_for(
                lambda: (r := client.read_flow_run(run.id)).state.is_final() and r,
                420,
                "the flow run to finish",
                serve,
                log,
            )
            assert final.state.is_completed(), f"{final.state}\n{log.read_text()[-6000:]}"

            tasks = {
                t.name: t
                for t in client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                    sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                    limit=200,
                )
            }
            assert "mlflow-lineage" in tasks  # a readable name, not the function's
            stage_tasks = set(tasks) - {"mlflow-lineage"}
            assert stage_tasks == set(STAGES)
            assert all(t.state.is_completed() for t in tasks.values())
            artifacts = flow_run_artifacts(client, run.id)
    finally:
        stop_group(serve)

    # each stage published its metrics; DVC re-ran only what the change made stale
    # keyed in pipeline order, so sorted by key they read as the pipeline runs
    assert sorted(artifacts) == [
        "pipeline-summary",
        "stage-00-check",
        "stage-01-zoo",
        "stage-02-prepare",
        "stage-03-sft",
        "stage-04-score-anchor",
        "stage-05-score-gpt2-char",
        "stage-06-score-llama-expert",
        "stage-07-diagnose",
        "stage-07-reference-diagnostics",
        "stage-08-train",
        "stage-09-evaluate",
    ]
    assert (
        "skipped" in artifacts["stage-04-score-anchor"].data
        and "| pairs | 200 |" in artifacts["stage-04-score-anchor"].data
    )
    train_artifact = artifacts["stage-08-train"].data
    assert "ran" in train_artifact and "Objective **mrpo**, strategy **uniform**, beta 0.1" in train_artifact
    assert (
        "| metric | before | after | change |" in train_artifact
        and "| val reward accuracy |" in train_artifact
    )
    assert "| anchor | 0.3333 |" in train_artifact  # the weights, formatted
    assert "e+0" not in train_artifact
    summary = artifacts["pipeline-summary"].data
    assert "| train | ran |" in summary and "| zoo | skipped |" in summary
    assert "# MRPO pipeline summary" in summary and "| val reward accuracy |" in summary
    assert f"/runs/{record_id(project)}" in summary  # the MLflow run, linked

    # the outputs: a 4-step policy, its metrics, and a lineage-complete MLflow run
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert train["steps"] == 4
    assert (project / "models" / "policy" / "model.safetensors").is_file()
    record = json.loads((project / "models" / "policy.mlflow_run.json").read_text())
    from mlflow import MlflowClient

    mlflow_run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(record["run_id"])
    assert (
        mlflow_run.data.tags["mrpo.git_commit"]
        == subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True
        ).stdout.strip()
    )
    assert mlflow_run.data.params["train.max_steps"] == "4"


@pytest.mark.slow
def test_prefect_cli_lists_flows_and_deployments(prefect_server, tmp_path):
    """`prefect flow ls` and `prefect deployment ls` against a real server: with FastAPI >= 0.151 the Prefect
    3.8 server refuses the CLI's filter bodies (explicit nulls) with HTTP 422; constraints.txt pins
    0.150.0."""
    for what in ("flow", "deployment"):
        proc = run_tool(
            [sys.executable, "-m", "prefect", what, "ls"], tmp_path, env=prefect_server, check=False
        )
        assert proc.returncode == 0 and "422" not in proc.stdout, proc.stdout[-3000:]


# ---------------------------------------------------------------- fast: one stage through DVC and Prefect


def edit_params(project: Path, edit) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    edit(raw)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_a_configuration_error_is_not_retried(tiny_project, tmp_path):
    from flows.pipeline import retry_if_transient
    from flows.stages import StageFailed, reproduce_stage

    project = clone_project(tiny_project, tmp_path / "project")
    edit_params(project, lambda p: p["data"].update(val_fraction=0.7, test_fraction=0.7))
    with pytest.raises(StageFailed) as info:
        reproduce_stage("prepare", project)
    exc = info.value
    assert exc.command_exit == 2 and not exc.transient, exc.output[-2000:]
    assert "configuration error" in str(exc) and "fix the cause" in str(exc)

    from prefect.states import Failed

    assert retry_if_transient(None, None, Failed(data=exc)) is False
    # A command that crashed (exit 1) or never reported (killed, or DVC failed first) may pass on a retry.
    for command_exit in (1, None):
        flaky = StageFailed("prepare", 255, "ERROR: failed to reproduce 'prepare'", command_exit)
        assert flaky.transient and retry_if_transient(None, None, Failed(data=flaky)) is True
    from mrpo.errors import ConfigError

    assert retry_if_transient(None, None, Failed(data=ConfigError("train.beta: got 0"))) is False


# What DVC 3.67 prints (stdout and stderr merged, as flows.stages.dvc reads it) when a stage fails, captured
# from real `dvc repro --single-item` / `dvc exp run` runs in a throwaway repo; (output, mrpo's exit or None,
# transient?, what the reason must say).
DVC_FAILURES = {
    "missing param": (
        "ERROR: failed to reproduce 'train': Parameters 'train.foo' are missing from 'params.yaml'.\n",
        None,
        False,
        "Fix: add train.foo to params.yaml, or drop it from the stage's params in dvc.yaml.",
    ),
    "missing param, dvc exp run": (
        "Reproducing experiment 'e1'\n"
        "WARNING: No file hash info found for '/tmp/r/.dvc/tmp/exps/standalone/tmpj3bs1qa2/out.txt'. "
        "It won't be created.\n"
        "ERROR: failed to reproduce 'train': Parameters 'train.foo' are missing from 'params.yaml'.\n"
        "ERROR: failed to reproduce 'train': Parameters 'train.foo' are missing from 'params.yaml'.\n",
        None,
        False,
        "add train.foo to params.yaml",
    ),
    "dvc.yaml syntax": (
        "'./dvc.yaml' is invalid.\n\nWhile parsing a block mapping, in line 2, column 3\n"
        "  2   train:\n\nDid not find expected key, in line 4, column 4\n  4    outs: [\n",
        None,
        False,
        "'./dvc.yaml' is invalid. Fix: correct ./dvc.yaml",
    ),
    "dvc.yaml schema": (
        "'./dvc.yaml' validation failed.\n\n"
        "extra keys not allowed, in stages -> train -> outz, line 5, column 7\n"
        "  4 \u2502   outz:\n  5 \u2502     - out.txt\n",
        None,
        False,
        "'./dvc.yaml' validation failed.",
    ),
    "unknown stage": (
        "ERROR: Stage 'score@nope' not found inside 'dvc.yaml' file\n",
        None,
        False,
        "no stage score@nope in dvc.yaml",
    ),
    "missing dependency": (
        "ERROR: failed to reproduce 'train': [Errno 2] No such file or directory: '/tmp/r/data.csv'\n",
        None,
        False,
        "a dependency is missing: create /tmp/r/data.csv",
    ),
    "undefined ${...}": (
        "ERROR: failed to parse 'stages.train.cmd' in 'dvc.yaml': Could not find 'train.nope'\n",
        None,
        False,
        "fix stages.train.cmd in dvc.yaml",
    ),
    "params.yaml syntax": (
        "ERROR: unable to read: 'params.yaml', YAML file structure is corrupted: "
        "while parsing a flow sequence\n"
        '  in "<unicode string>", line 2, column 7\n'
        "did not find expected ',' or ']'\n"
        '  in "<unicode string>", line 3, column 1\n',
        None,
        False,
        "fix the syntax of params.yaml",
    ),
    "no dvc.yaml": ("ERROR: 'dvc.yaml' does not exist\n", None, False, "run from the project's root"),
    "not a DVC repository": (
        "ERROR: you are not inside of a DVC repository (checked up to mount point '/')\n",
        None,
        False,
        "run from the project's root",
    ),
    "sweep override of a missing key": (
        "ERROR: Invalid `--set-param` value: Could not override 'train.nokey'.\n"
        "To append to your config use +train.nokey=1: Key 'nokey' is not in struct\n"
        "    full_key: train.nokey\n    object_type=dict\n",
        None,
        False,
        "train.nokey is not in params.yaml",
    ),
    "command not found": (
        "Running stage 'train':\n> mrpo train\n/bin/bash: line 1: mrpo: command not found\n"
        "ERROR: failed to reproduce 'train': failed to run: mrpo train, exited with 127\n",
        None,
        False,
        "the stage's command was not found",
    ),
    "declared output not written": (
        "Running stage 'train':\n> mrpo train\n"
        "ERROR: failed to reproduce 'train': output 'out.txt' does not exist\n",
        0,
        False,
        "the command ended without writing out.txt",
    ),
    # retried: the cause is outside the pipeline's files and may be gone on the next try
    "killed": (
        "Running stage 'train':\n> mrpo train\n"
        "ERROR: failed to reproduce 'train': failed to run: mrpo train, exited with -9\n",
        None,
        True,
        "killed by signal 9",
    ),
    "path locked by another dvc": (
        "ERROR: '/tmp/r/a.txt' is busy, it is being blocked by:\n"
        "  (PID 21437): /venv/bin/dvc repro --single-item slow\n\n"
        "If there are no processes with such PIDs, you can manually remove '/tmp/r/.dvc/tmp/rwlock' and try "
        "again.\n",
        None,
        True,
        "another DVC process is using the stage's paths",
    ),
    "crash": (
        "Running stage 'train':\n> mrpo train\nTraceback (most recent call last):\n"
        "FileNotFoundError: [Errno 2] No such file or directory: 'x'\n"
        "ERROR: failed to reproduce 'train': failed to run: mrpo train, exited with 1\n",
        1,
        True,
        "mrpo exited 1, not a user error",
    ),
    "no error line": ("Running stage 'train':\n> mrpo train\n", None, True, "mrpo never reported an exit"),
    "user error": (
        "mrpo: configuration error: train.beta: got -0.1; must be > 0\n"
        "ERROR: failed to reproduce 'train': failed to run: mrpo train, exited with 2\n",
        2,
        False,
        "a user-fixable error",
    ),
}


@pytest.mark.parametrize("case", DVC_FAILURES)
def test_dvc_failures_are_classified_from_dvcs_own_words(case):
    from prefect.states import Failed

    from flows.stages import StageFailed, classify_failure, retry_if_transient

    output, command_exit, transient, says = DVC_FAILURES[case]
    verdict = classify_failure(output, command_exit)
    assert (verdict.transient, says in verdict.reason) == (transient, True), verdict
    exc = StageFailed("train", 255, output, command_exit)
    assert retry_if_transient(None, None, Failed(data=exc)) is transient
    headline = str(exc).splitlines()[0]
    assert says in headline and ("will retry" in headline) is transient
    if verdict.quoted:  # DVC's error line reads once, in the headline, not again in the tail
        assert str(exc).count(verdict.quoted) == 1


def test_the_captured_dvc_wordings_are_what_this_dvc_prints(tmp_path):
    """The permanent cases above, live: if a DVC upgrade rewords one, this fails rather than the flows
    quietly retrying it again."""
    from flows.stages import classify_failure, dvc

    dvc(["init", "--no-scm", "-q"], tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.1\n")
    stage = "stages:\n  train:\n    cmd: {cmd}\n{extra}    outs:\n      - out.txt\n"
    cases = {  # name: (cmd, more of the stage, the stage to reproduce, what the reason must say)
        "missing param": (
            "echo hi > out.txt",
            "    params:\n      - train.lr\n      - train.foo\n",
            "train",
            "Parameters 'train.foo' are missing from 'params.yaml'. Fix: add train.foo to params.yaml",
        ),
        "unknown stage": ("echo hi > out.txt", "", "trian", "no stage trian in dvc.yaml"),
        "missing dependency": (
            "echo hi > out.txt",
            "    deps:\n      - data.csv\n",
            "train",
            f"create {tmp_path / 'data.csv'}",
        ),
        "undefined ${...}": ("echo ${train.nope} > out.txt", "", "train", "fix stages.train.cmd in dvc.yaml"),
        "command not found": ("no-such-command-xyz", "", "train", "the stage's command was not found"),
        "declared output not written": ("echo hi", "", "train", "without writing out.txt"),
        "dvc.yaml schema": (
            "echo hi > out.txt",
            "    outz: []\n",
            "train",
            "'./dvc.yaml' validation failed.",
        ),
    }
    for case, (cmd, extra, target, says) in cases.items():
        (tmp_path / "dvc.yaml").write_text(stage.format(cmd=cmd, extra=extra))
        proc = dvc(["repro", "--single-item", target], tmp_path, check=False)
        verdict = classify_failure(proc.stdout, None)
        assert proc.returncode != 0 and not verdict.transient and says in verdict.reason, (case, proc.stdout)


MISSING_PARAM_SCRIPT = r"""
import json, sys, time
from flows.pipeline import pipeline
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

start = time.monotonic()
state = pipeline(project_dir=sys.argv[1], stages=["prepare"], lineage=False, return_state=True)
seconds = time.monotonic() - start
run_id = state.state_details.flow_run_id
with get_client(sync_client=True) as client:
    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
print("RESULT " + json.dumps({
    "state": state.type.value, "seconds": seconds, "logs": [entry.message for entry in logs],
    "tasks": [[t.name, t.run_count, t.state.type.value, t.state.message] for t in tasks],
}))
"""


@pytest.mark.slow
def test_a_param_dvc_yaml_declares_but_params_yaml_lacks_fails_the_stage_once(tiny_project, tmp_path):
    """DVC refuses the stage before mrpo runs (mrpo never reports an exit): the flow's stage task fails on
    its first attempt, with no retry, and says which key is missing and how to fix it."""
    project = clone_project(tiny_project, tmp_path / "project")
    dvc_yaml = project / "dvc.yaml"
    declared = "    cmd: mrpo prepare\n    params:\n      - seed\n      - data\n"
    assert declared in dvc_yaml.read_text()
    dvc_yaml.write_text(dvc_yaml.read_text().replace(declared, declared + "      - data.foo\n"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(tmp_path / "prefect_home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", MISSING_PARAM_SCRIPT, str(project)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-6000:]
    out = json.loads(lines[-1][len("RESULT ") :])

    assert out["state"] == "FAILED"
    [[name, run_count, state, message]] = out["tasks"]
    assert (name, run_count, state) == ("prepare", 1, "FAILED"), out["tasks"]  # one attempt, no retry
    assert not any("Retry" in m for m in out["logs"]), out["logs"]
    assert "not transient" in message and "Parameters 'data.foo' are missing from 'params.yaml'" in message
    assert "Fix: add data.foo to params.yaml, or drop it from the stage's params in dvc.yaml." in message
    assert not (project / "data" / "prepared").exists()  # mrpo prepare never ran


def test_deployments_and_prefect_yaml_agree():
    from prefect.client.schemas.schedules import CronSchedule

    from flows.deploy import NIGHTLY_CRON, WEEKLY_CRON, deployments

    deps = {d.name: d for d in deployments(REPO_ROOT)}
    assert set(deps) == {"mrpo-nightly", "mrpo-weekly"}
    crons = {name: [s.schedule.cron for s in d.schedules] for name, d in deps.items()}
    assert crons == {"mrpo-nightly": [NIGHTLY_CRON], "mrpo-weekly": [WEEKLY_CRON]}
    assert all(isinstance(s.schedule, CronSchedule) for d in deps.values() for s in d.schedules)
    assert deps["mrpo-nightly"].parameters == {"project_dir": str(REPO_ROOT), "lineage": True}
    assert deps["mrpo-weekly"].parameters["seeds"] == [0, 1]
    assert deployments(REPO_ROOT, only="pipeline", schedules=False)[0].schedules in (None, [])

    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["mrpo-nightly"]["schedules"][0]["cron"] == NIGHTLY_CRON
    assert by_name["mrpo-weekly"]["schedules"][0]["cron"] == WEEKLY_CRON
    import importlib

    for d in by_name.values():  # every entrypoint names a real flow
        path, name = d["entrypoint"].split(":")
        flow_obj = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        assert flow_obj.name == {"mrpo-nightly": "pipeline", "mrpo-weekly": "sweep"}[d["name"]]


def test_deploy_interval_replaces_the_crons_and_the_cli_refuses_what_cannot_work(capsys):
    """`--interval` swaps every cron for that interval; `--param` sets flow parameters; without a reachable
    API, or with a parameter the served flow lacks, `python -m flows.deploy` exits 2 at once."""
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deployments, main, parse_args

    deps = deployments(REPO_ROOT, interval=60, parameters={"seeds": [0]}, only="sweep")
    assert [type(s.schedule) for s in deps[0].schedules] == [IntervalSchedule]
    assert deps[0].schedules[0].schedule.interval.total_seconds() == 60 and deps[0].parameters["seeds"] == [0]
    args = parse_args(["--only", "pipeline", "--interval", "2.5", "--param", 'stages=["prepare"]'])
    assert args.interval == 2.5 and args.param == [("stages", ["prepare"])]

    def refused(argv: list[str], url: str | None = "http://127.0.0.1:9/api") -> str:
        with temporary_settings(updates={PREFECT_API_URL: url}), pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        return capsys.readouterr().err

    assert "no Prefect API answers at http://127.0.0.1:9/api" in refused(["--interval", "60"])
    assert "PREFECT_API_URL is not set: start a server" in refused([], url=None)
    assert "not a parameter of the sweep flow (use --only)" in refused(["--param", 'stages=["prepare"]'])
    assert "an interval must be positive seconds" in refused(["--interval", "0"])
    assert "not allowed with argument --no-schedules" in refused(["--no-schedules", "--interval", "5"])


EPHEMERAL_SCRIPT = r"""
import json, sys
from flows.deploy import deployments
from flows.pipeline import pipeline
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import TaskRunSort
from test_flows import flow_run_artifacts  # tests/drivers/ is on PYTHONPATH

project = sys.argv[1]
state = pipeline(project_dir=project, stages=["prepare"], lineage=False, return_state=True)
again = pipeline(project_dir=project, stages=["prepare"], lineage=False)
ids = [dep.apply() for dep in deployments(project)]  # register both deployments with their schedules
with get_client(sync_client=True) as client:
    run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    tasks = client.read_task_runs(
        flow_run_filter=run_filter, sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50
    )
    artifacts = flow_run_artifacts(client, state.state_details.flow_run_id).values()
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    logs = client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])),
        limit=200
    )
    registered = {}
    for dep_id in ids:
        dep = client.read_deployment(dep_id)
        registered[dep.name] = {"flow": client.read_flow(dep.flow_id).name, "parameters": dep.parameters,
                                "crons": [s.schedule.cron for s in dep.schedules if s.active]}
print("RESULT " + json.dumps({
    "state": state.type.value, "summary": state.result(), "again": again,
    "tasks": [[t.name, t.run_count, t.state.type.value] for t in tasks],
    "artifacts": {a.key: a.data for a in artifacts}, "deployments": registered,
    "logs": [entry.message for entry in logs],
}))
"""


@pytest.mark.slow
def test_pipeline_flow_and_deployments_on_an_ephemeral_prefect_api(tiny_project, tmp_path):
    """A real flow run and real deployment registration, Prefect's ephemeral API in a tmp PREFECT_HOME."""
    project = clone_project(tiny_project, tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(tmp_path / "prefect_home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # a loaded 2-core CI box
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT), str(REPO_ROOT / "tests"), str(REPO_ROOT / "tests" / "drivers")]
            ),
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", EPHEMERAL_SCRIPT, str(project)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=420,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-6000:]
    out = json.loads(lines[-1][len("RESULT ") :])

    assert out["state"] == "COMPLETED"
    assert out["summary"]["stages"]["prepare"]["status"] == "ran"
    assert out["summary"]["metrics"]["prepare"]["rows_kept"] == 200
    assert "mlflow_run_id" not in out["summary"]  # lineage needs train, which was not asked for
    assert out["again"]["stages"]["prepare"]["status"] == "skipped"  # DVC, not Prefect, decides
    assert out["tasks"] == [["prepare", 1, "COMPLETED"]]
    assert set(out["artifacts"]) == {"stage-02-prepare", "pipeline-summary"}
    assert "| rows_kept | 200 |" in out["artifacts"]["stage-02-prepare"]
    assert "| prepare | ran |" in out["artifacts"]["pipeline-summary"]
    # the stage's own output (DVC's and mrpo's lines) is in the task's Prefect logs
    assert "Running stage 'prepare':" in out["logs"] and "> mrpo prepare" in out["logs"]
    assert any("mrpo: prepare:" in m for m in out["logs"]), out["logs"]
    assert (project / "data" / "prepared" / "train.parquet").is_file()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"check", "prepare"}  # every stage runs after the check of params.yaml

    deps = out["deployments"]
    assert deps["mrpo-nightly"]["flow"] == "pipeline" and deps["mrpo-nightly"]["crons"] == ["0 2 * * *"]
    assert deps["mrpo-weekly"]["flow"] == "sweep" and deps["mrpo-weekly"]["crons"] == ["0 3 * * 0"]
    assert deps["mrpo-nightly"]["parameters"]["project_dir"] == str(project.resolve())


@pytest.mark.slow
def test_one_work_queue_per_stage_kind_runs_each_kind_on_the_machine_whose_worker_serves_it(
    prefect_server, tiny_reproduced, tmp_path
):
    """The several-machines recipe in the README with two checkouts as two machines: one process work pool,
    a `score` deployment on queue `scoring` and a `train` deployment on queue `training` (prefect.yaml's pull
    step runs each flow in $MRPO_PROJECT_DIR); the worker in checkout A serves scoring, the one in B
    training."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    a = clone_project(tiny_reproduced["path"], tmp_path / "a")
    b = clone_project(tiny_reproduced["path"], tmp_path / "b")
    edits = {
        a: lambda p: p["references"]["anchor"].update(tokenizer="models/zoo/anchor"),  # score@anchor stale
        b: lambda p: p["train"].update(max_steps=4),  # train stale
    }
    for checkout, edit in edits.items():
        raw = yaml.safe_load((checkout / "params.yaml").read_text())
        edit(raw)
        (checkout / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = dict(
        prefect_server,
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        PREFECT_WORKER_QUERY_SECONDS="1",
    )

    def prefect(*args, cwd=a, extra=None, timeout=180):
        proc = subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            cwd=cwd,
            env={**env, **(extra or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def stale(checkout) -> set[str]:
        out = subprocess.run(
            [sys.executable, "-m", "dvc", "status", "--json"], cwd=checkout, capture_output=True, text=True
        )
        return set(json.loads(out.stdout.strip().splitlines()[-1]))

    assert "score@anchor" in stale(a) and "score@anchor" not in stale(b) and "train" in stale(b)
    prefect("work-pool", "create", "mrpo", "--type", "process")
    for name, queue, stages in (("score", "scoring", ["score@anchor"]), ("train", "training", ["train"])):
        deploy = [
            "--no-prompt",
            "deploy",
            "flows/pipeline.py:pipeline",
            "-n",
            name,
            "-p",
            "mrpo",
            "-q",
            queue,
        ]
        prefect(*deploy, "--param", f"stages={json.dumps(stages)}", "--param", "lineage=false")
    with (
        temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        runs = {
            name: client.create_flow_run_from_deployment(
                client.read_deployment_by_name(f"pipeline/{name}").id
            )
            for name in ("score", "train")
        }
        for checkout, queue in ((a, "scoring"), (b, "training")):  # one worker per machine, its own queue
            worker = ["worker", "start", "--pool", "mrpo", "--work-queue", queue, "--run-once"]
            prefect(*worker, cwd=checkout, extra={"MRPO_PROJECT_DIR": str(checkout)}, timeout=420)
        for name, run in runs.items():
            assert client.read_flow_run(run.id).state.is_completed(), name
    # Each kind ran where its worker was: A scored (and trained nothing), B trained (and scored nothing).
    assert "score@anchor" not in stale(a) and "train" in stale(a)
    assert "train" not in stale(b)
    assert json.loads((b / "metrics" / "train.json").read_text())["steps"] == 4
    assert json.loads((a / "metrics" / "train.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_the_scheduler_fires_the_served_pipeline_deployment(tiny_project, tmp_path):
    """What a user relies on, as the README says it: `prefect server start`, then `python -m flows.deploy
    --interval`; the server's scheduler (not `prefect deployment run`) creates a run of pipeline/mrpo-nightly
    and the served deployment runs it to COMPLETED. Only the prepare stage (`--param`), to keep it short.
    SIGTERM stops serving promptly and pauses the schedule; nothing is left running."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project = clone_project(tiny_project, tmp_path / "project")
    env, server = start_prefect_server(tmp_path)
    serve = None
    try:
        log = tmp_path / "serve.log"
        command = ["--project-dir", str(project), "--only", "pipeline", "--interval", "3"]
        command += ["--param", 'stages=["prepare"]', "--param", "lineage=false"]
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.deploy", *command],
            cwd=project,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as c:

            def deployment():
                try:
                    return c.read_deployment_by_name("pipeline/mrpo-nightly")
                except Exception:  # noqa: BLE001 - not registered yet
                    return None

            dep = wait_for(deployment, 90, "flows.deploy to register pipeline/mrpo-nightly", serve, log)
            assert [s.schedule.interval.total_seconds() for s in dep.schedules] == [3]
            assert dep.parameters == {"project_dir": str(project), "stages": ["prepare"], "lineage": False}
            of_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))

            def completed():
                runs = c.read_flow_runs(deployment_filter=of_deployment, limit=200)
                return [r for r in runs if r.state and r.state.is_completed()]

            run = wait_for(completed, 240, "a scheduled run to complete", serve, log)[0]
            runs = c.read_flow_runs(deployment_filter=of_deployment, limit=200)
            assert run.auto_scheduled and run.created_by.type == "SCHEDULE", run
            assert run.parameters == dep.parameters
            assert all(r.auto_scheduled for r in runs)  # the scheduler made every run; nobody ran one by hand
            seconds = stop_group(serve)
            assert serve.returncode == 0 and seconds < 15, (serve.returncode, seconds, log.read_text())
            assert c.read_deployment(dep.id).paused  # the runner paused its schedule on the way out
        assert (project / "data" / "prepared" / "train.parquet").is_file()
        assert "Traceback" not in log.read_text(), log.read_text()[-6000:]
    finally:
        if serve is not None:
            stop_group(serve)
        stop_group(server)
    assert processes_with_env("PREFECT_HOME", env["PREFECT_HOME"]) == []
