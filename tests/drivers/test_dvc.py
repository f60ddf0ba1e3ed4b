"""The DVC pipeline on a real git + DVC repo: full repro, no-op repro, and per-reference staleness."""

from __future__ import annotations

import json
import sys
import time

import pandas as pd
import pytest
import yaml
from helpers import (
    REPO_ROOT,
    STAGES,
    clone_project,
    free_port,
    mrpo_import_files,
    run_tool,
    start_mlflow_server,
    stop_group,
)

from mrpo.pipeline import STAGES as PIPELINE_STAGES


def dvc(args, cwd, check=True):
    return run_tool([sys.executable, "-m", "dvc", *args], cwd, check=check)


def stale_stages(project) -> set[str]:
    """Stages `dvc status` reports as changed (params, deps or outs)."""
    return set(json.loads(dvc(["status", "--json"], project).stdout.strip().splitlines()[-1]))


def edit_params(project, edit) -> None:
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


STAGE_MODULES = {stage.name: stage.module for stage in PIPELINE_STAGES}


def test_each_stage_depends_on_every_module_its_command_runs():
    """A change to any code a stage runs makes DVC re-run it; nothing the stage does not run is listed."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for stage, module in STAGE_MODULES.items():
        body = stages[stage].get("do", stages[stage])
        listed = {d for d in body["deps"] if d.startswith("mrpo/")}
        assert listed == mrpo_import_files(module), stage


# ---------------------------------------------------------------- params per key; dvc.lock in step with the
# code


def declared_params(stage_body: dict) -> list[str]:
    return [p for p in stage_body.get("params", []) if isinstance(p, str)]


def lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def test_every_declared_param_key_exists_in_params_yaml_and_every_profile():
    """DVC refuses to run a stage whose declared param is missing from params.yaml ("Parameters ... are
    missing"), and a profile is applied to params.yaml (`mrpo profile apply`): params.yaml with each profile
    overlay merged in (read_params applies it) must hold every key dvc.yaml declares."""
    import re

    from mrpo.config.load import read_params

    text = (REPO_ROOT / "dvc.yaml").read_text()
    stages = yaml.safe_load(text)["stages"]
    interpolated = set(re.findall(r"\$\{([a-z_]+\.[a-z_.]+)\}", text)) - {"item.model"}
    for params_file in [REPO_ROOT / "params.yaml", *sorted((REPO_ROOT / "profiles").glob("*.yaml"))]:
        params = read_params(params_file)
        unresolved = []
        for key in sorted(interpolated):
            try:
                lookup(params, key)
            except KeyError:
                unresolved.append(key)
        assert not unresolved, f"{params_file.name}: dvc.yaml interpolates keys it lacks: {unresolved}"
        for name, stage in stages.items():
            body = stage.get("do", stage)
            keys = declared_params(body)
            if "foreach" in stage:
                keys = [k.replace("${key}", ref) for k in keys for ref in params["references"]]
            missing = []
            for key in keys:
                try:
                    lookup(params, key)
                except KeyError:
                    missing.append(key)
            assert not missing, f"{params_file.name}: stage {name} declares params missing from it: {missing}"


def test_train_params_leave_out_only_what_cannot_change_the_weights():
    """Changing how often curves are logged or checkpoints saved does not re-train; every other train key
    (each one that can change the weights) is declared."""
    import dataclasses

    from mrpo.config.schema import TrainConfig

    train = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["train"]
    declared = {k.removeprefix("train.") for k in declared_params(train) if k.startswith("train.")}
    left_out = {f.name for f in dataclasses.fields(TrainConfig)} - declared
    assert left_out == {
        "logging_steps",
        "save_steps",
        "checkpoint_dir",
        "output_dir",
        "metrics_file",
        "plots_file",
        "plots_dir",
        "report_to",
        "push_to_hub",
    }


def dvc_md5(path) -> str:
    """DVC 3's md5 of a file (of its bytes) or a directory (`.dir`: of the sorted listing of its files'
    md5s)."""
    import hashlib

    if path.is_file():
        return hashlib.md5(path.read_bytes()).hexdigest()
    entries = sorted(
        (
            {"md5": hashlib.md5(p.read_bytes()).hexdigest(), "relpath": p.relative_to(path).as_posix()}
            for p in path.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ),
        key=lambda e: e["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def lock_drift(root) -> list[str]:
    """How `root`'s dvc.lock differs from its code, params.yaml and dvc.yaml: source deps (every dep that no
    stage writes) whose md5 changed, recorded params whose value changed, stages, params and deps that
    dvc.yaml declares and the lock lacks (or the other way round). Each makes `dvc status` report the stage
    changed."""
    import re

    from mrpo.config.load import parse_yaml_value, read_params

    lock = parse_yaml_value((root / "dvc.lock").read_text())["stages"]
    params = read_params(root / "params.yaml")
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    expected = [
        f"{name}@{key}" if "foreach" in stage else name
        for name, stage in spec.items()
        for key in (params["references"] if "foreach" in stage else [None])
    ]
    drift = [f"stage {s}: not in dvc.lock" for s in expected if s not in lock]

    def resolve(text: str, key: str | None) -> str:
        def value(match) -> str:
            name = match.group(1)
            if name == "key":
                return key
            if name.startswith("item."):
                return str(params["references"][key][name.removeprefix("item.")])
            return str(lookup(params, name))

        return re.sub(r"\$\{([^}]+)\}", value, text)

    for name, stage in spec.items():  # what dvc.yaml declares now, against what the lock recorded
        body = stage.get("do", stage)
        for key in params["references"] if "foreach" in stage else [None]:
            full = f"{name}@{key}" if key else name
            if full not in lock:
                continue
            declared = {resolve(p, key) for p in declared_params(body)}
            recorded = set(lock[full].get("params", {}).get("params.yaml", {}))
            deps = {resolve(d, key) for d in body.get("deps", [])}
            locked = {d["path"] for d in lock[full].get("deps", [])}
            drift += [
                f"stage {full}: param {k} declared, not in dvc.lock" for k in sorted(declared - recorded)
            ]
            drift += [
                f"stage {full}: param {k} in dvc.lock, no longer declared"
                for k in sorted(recorded - declared)
            ]
            drift += [f"stage {full}: dep {d} declared, not in dvc.lock" for d in sorted(deps - locked)]
            drift += [f"stage {full}: dep {d} in dvc.lock, no longer declared" for d in sorted(locked - deps)]
    written = {o["path"] for stage in lock.values() for o in stage.get("outs", [])}
    for name, stage in lock.items():
        for dep in stage.get("deps", []):
            path = root / dep["path"]
            inside = [(dep["path"], w) for w in written] + [(w, dep["path"]) for w in written]
            if dep["path"] in written or any(a.startswith(b.rstrip("/") + "/") for a, b in inside):
                continue  # another stage's output, or a folder of them (data/scores): DVC's, not the code
            if not path.exists():
                drift.append(f"stage {name}: {dep['path']} is gone")
            elif dvc_md5(path) != dep["md5"]:
                drift.append(f"stage {name}: {dep['path']} changed")
        for key, value in stage.get("params", {}).get("params.yaml", {}).items():
            try:
                now = lookup(params, key)
            except KeyError:
                drift.append(f"stage {name}: param {key} is no longer in params.yaml")
                continue
            if now != value:
                drift.append(f"stage {name}: param {key} is {now!r}, dvc.lock has {value!r}")
    return drift


def test_committed_dvc_lock_matches_the_code_and_params():
    """A fresh clone must not re-run stages: dvc.lock records the md5 of the code each stage ran and the
    params it read. Fix: `dvc repro` (it re-runs only what changed) and commit dvc.lock with the metrics it
    updates."""
    drift = lock_drift(REPO_ROOT)
    shown = drift[:20] + ([f"... and {len(drift) - 20} more"] if len(drift) > 20 else [])
    assert not drift, (
        "dvc.lock is out of date with the code, params.yaml or dvc.yaml; run `dvc repro` and commit dvc.lock "
        "(and the metrics it updates):\n  " + "\n  ".join(shown)
    )


@pytest.mark.slow
def test_lock_drift_agrees_with_dvc_on_a_real_repo(tmp_path):
    """The check reads md5s as DVC writes them: clean right after `dvc repro`, a changed file or param is
    named."""
    run_tool(["git", "init", "-q"], tmp_path)
    dvc(["init", "-q"], tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tool.py").write_text("print('hello')\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "a.yaml").write_text("task: a\n")
    (tmp_path / "params.yaml").write_text("references:\n  r: {model: m}\nstep:\n  rate: 1.0e-4\n  n: 3\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: python src/tool.py > out.txt\n    params: [step.rate]\n"
        "    deps: [src/tool.py, tasks]\n    outs: [out.txt]\n"
        "  use:\n    cmd: cat out.txt > used.txt\n    deps: [out.txt]\n    outs: [used.txt]\n"
    )
    dvc(["repro"], tmp_path)
    assert lock_drift(tmp_path) == []
    (tmp_path / "src" / "tool.py").write_text("print('changed')\n")
    (tmp_path / "tasks" / "b.yaml").write_text("task: b\n")
    (tmp_path / "params.yaml").write_text("references:\n  r: {model: m}\nstep:\n  rate: 2.0e-4\n  n: 3\n")
    assert lock_drift(tmp_path) == [
        "stage make: src/tool.py changed",
        "stage make: tasks changed",
        "stage make: param step.rate is 0.0002, dvc.lock has 0.0001",
    ]
    dvc(["repro"], tmp_path)
    assert lock_drift(tmp_path) == []
    spec = (tmp_path / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(spec.replace("params: [step.rate]", "params: [step.rate, step.n]"))
    assert lock_drift(tmp_path) == ["stage make: param step.n declared, not in dvc.lock"]
    assert "make" in json.loads(dvc(["status", "--json"], tmp_path).stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_repro_runs_every_stage_in_order_and_writes_the_outputs(tiny_reproduced):
    out, project = tiny_reproduced["output"], tiny_reproduced["path"]
    at = {stage: out.index(f"Running stage '{stage}'") for stage in STAGES}
    scores = [at[s] for s in STAGES if s.startswith("score@")]
    assert max(at["zoo"], at["prepare"]) < min(scores) and max(scores) < at["train"] < at["evaluate"]
    assert max(scores) < at["diagnose"]
    assert at["evaluate"] < at["summary"] and "# MRPO pipeline summary" in out[at["summary"] :]

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    # score@gpt2_char is keyed by its own reference's settings, not the others'
    assert set(lock["stages"]["score@gpt2_char"]["params"]["params.yaml"]) == {
        "references.gpt2_char",
        "score",
    }

    for ref in ("anchor", "gpt2_char", "llama_expert"):
        scores = pd.read_parquet(project / "data" / "scores" / f"{ref}.parquet")
        assert len(scores) == 200 and scores["fits"].all()
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert set(train) == {"steps", "train_loss", "val_accuracy", "test_accuracy"} and train["steps"] == 6
    record = json.loads((project / "models" / "policy" / "train_metrics.json").read_text())
    assert record["references"] == 3 and "val_reward_accuracy_before" in record
    assert "weight/anchor" in record and "runtime_s" not in record
    # timings apart from every output (they differ run to run), in git-ignored logs/
    for ref in ("anchor", "gpt2_char", "llama_expert"):
        timings = json.loads((project / "logs" / "score" / f"{ref}.json").read_text())
        assert timings["seconds"] > 0 and timings["pairs_per_second"] > 0
    summary = (project / "metrics" / "summary.md").read_text()
    assert "| val reward accuracy |" in summary and "models/policy" in summary
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert {"accuracy_vs_anchor", "mrpo_facts_mc", "mrpo_facts_gen"} <= set(evaluation)
    curves = pd.read_csv(project / "plots" / "train.csv")
    assert {
        "step",
        "loss",
        "rewards/accuracy",
        "weight/anchor",
        "weight/gpt2_char",
        "weight/llama_expert",
    } <= set(curves)
    # metrics are git-tracked (cache: false), outputs DVC-cached
    assert not (project / "metrics" / ".gitignore").exists()
    assert "/policy" in (project / "models" / ".gitignore").read_text()


@pytest.mark.slow
def test_plots_show_colours_each_series_and_includes_the_png_renders(tiny_reproduced, tmp_path):
    import json

    out = dvc(["plots", "show", "--json", "-o", str(tmp_path / "dvc_plots")], tiny_reproduced["path"]).stdout
    # DVC warns on a line of its own about plots whose files are absent: here only those of `mrpo compare`,
    # which is not a stage and never ran in this project
    shown = json.loads(out[out.index("{") :])
    assert {e["name"] for e in shown.get("errors", [])} <= {"Comparison", "plots/comparison.png"}
    plots = shown["data"]
    for name, series in (
        ("Loss", {"loss", "loss_smooth", "val_loss"}),
        ("Reward accuracy", {"rewards/accuracy", "rewards/accuracy_smooth", "val_reward_accuracy"}),
        ("Reference weights", {f"weight/{r}_smooth" for r in ("anchor", "gpt2_char", "llama_expert")}),
    ):
        spec = plots[name][0]["content"]
        # .dvc/plots/lines.json: one colour per series (DVC's own templates colour by revision only)
        assert spec["encoding"]["color"]["field"] == "field"
        assert {row["field"] for row in spec["data"]["values"]} == series
        assert spec["encoding"]["x"]["title"] == "training step" and spec["encoding"]["y"]["title"]
    for png in ("loss.png", "reward_accuracy.png", "reference_weights.png"):
        assert plots[f"plots/{png}"][0]["type"] == "image"


@pytest.mark.slow
def test_second_repro_changes_nothing_and_says_so(tiny_reproduced, tmp_path):
    project = clone_project(tiny_reproduced["path"], tmp_path / "p")
    lock_before = (project / "dvc.lock").read_text()
    start = time.perf_counter()
    out = dvc(["repro"], project).stdout
    seconds = time.perf_counter() - start
    print(f"no-op dvc repro: {seconds:.2f}s (full repro {tiny_reproduced['seconds']:.1f}s)")
    assert "Running stage" not in out
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out
    assert "Data and pipelines are up to date." in out
    assert (project / "dvc.lock").read_text() == lock_before
    assert stale_stages(project) == set()


@pytest.mark.slow
def test_changing_one_reference_reruns_only_its_scoring_and_what_follows(tiny_reproduced, tmp_path):
    project = clone_project(tiny_reproduced["path"], tmp_path / "p")
    before = {
        r: (project / "data" / "scores" / f"{r}.parquet").read_bytes()
        for r in ("anchor", "gpt2_char", "llama_expert")
    }

    edit_params(
        project, lambda p: p["references"]["llama_expert"].update(tokenizer="models/zoo/llama_expert")
    )
    # any edit of params.yaml re-runs the check stage (a second), whose unchanged marker re-runs nothing
    assert stale_stages(project) == {
        "check",
        "score@llama_expert",
        "diagnose",
        "train",
        "evaluate",
        "summary",
    }

    out = dvc(["repro"], project).stdout
    ran = {s for s in STAGES if f"Running stage '{s}'" in out}
    assert ran == {"check", "score@llama_expert", "diagnose", "train", "evaluate", "summary"}, out[-3000:]
    for stage in ("zoo", "prepare", "score@anchor", "score@gpt2_char"):
        assert f"Stage '{stage}' didn't change, skipping" in out
    after = {r: (project / "data" / "scores" / f"{r}.parquet").read_bytes() for r in before}
    assert after["anchor"] == before["anchor"] and after["gpt2_char"] == before["gpt2_char"]
    assert stale_stages(project) == set()


@pytest.mark.slow
def test_rescoring_and_logging_cadence_leave_training_up_to_date(tiny_reproduced, tmp_path):
    """Scoring the same pairs again writes the same bytes, and how often training logs or saves never changes
    the weights: neither makes DVC re-train. The timings of the new scoring run are its metric."""
    project = clone_project(tiny_reproduced["path"], tmp_path / "p")
    before = (project / "data" / "scores" / "anchor.parquet").read_bytes()
    out = dvc(["repro", "--force", "score@anchor"], project).stdout
    assert "Running stage 'score@anchor'" in out
    assert (project / "data" / "scores" / "anchor.parquet").read_bytes() == before
    assert stale_stages(project) == set()
    edit_params(project, lambda p: p["train"].update(logging_steps=3, save_steps=2))
    assert stale_stages(project) == {"check"}  # validated again, nothing re-trained
    edit_params(project, lambda p: p["train"].update(beta=0.2))
    assert stale_stages(project) == {"check", "train", "evaluate", "summary"}


@pytest.mark.slow
def test_rebuilding_the_zoo_writes_the_same_bytes_and_leaves_scoring_up_to_date(tiny_project, tmp_path):
    """The score stages depend on the zoo folder as a whole: building it again with the same settings must
    write the same bytes, its timings going only to its metrics file, so nothing downstream re-runs."""
    project = clone_project(tiny_project, tmp_path / "p")
    dvc(["repro", "score@gpt2_char"], project)  # zoo, prepare, one score stage
    zoo = project / "models" / "zoo"
    before = {str(p.relative_to(zoo)): p.read_bytes() for p in sorted(zoo.rglob("*")) if p.is_file()}
    timings_before = (project / "logs" / "zoo.json").read_text()
    lock_before = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    stale = stale_stages(project)
    assert not stale & {"zoo", "prepare", "score@gpt2_char"} and "score@anchor" in stale

    out = dvc(["repro", "--force", "--single-item", "zoo"], project).stdout
    assert "Running stage 'zoo'" in out
    after = {str(p.relative_to(zoo)): p.read_bytes() for p in sorted(zoo.rglob("*")) if p.is_file()}
    assert after.keys() == before.keys() and len(after) == 18  # 3 members x 6 files
    assert [name for name in after if after[name] != before[name]] == []
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    folder = [o for o in lock["zoo"]["outs"] if o["path"] == "models/zoo"]  # the lock lists metrics as outs
    assert folder and folder == [o for o in lock_before["zoo"]["outs"] if o["path"] == "models/zoo"]
    assert lock["score@gpt2_char"] == lock_before["score@gpt2_char"]
    assert stale_stages(project) == stale  # the score stage that ran stays up to date
    # the new timings go to logs/ (neither DVC nor git tracks it), apart from the folder the score stages read
    assert (project / "logs" / "zoo.json").read_text() != timings_before
    timings = json.loads((project / "logs" / "zoo.json").read_text())
    assert set(timings["members"]) == {"anchor", "gpt2_char", "llama_expert"} and timings["seconds"] > 0
    assert "zoo.json" not in dvc(["metrics", "show", "--json"], project).stdout


UPSTREAM = {"zoo", "prepare", *(f"score@{r}" for r in ("anchor", "gpt2_char", "llama_expert"))}


@pytest.mark.slow
@pytest.mark.parametrize(
    "package, must_stay_up_to_date, must_rerun",
    [
        ("core", UPSTREAM, {"diagnose", "train"}),
        ("tracking", UPSTREAM | {"train"}, set()),
    ],
)
def test_editing_a_package_reruns_only_the_stages_that_use_it(
    tiny_reproduced, tmp_path, package, must_stay_up_to_date, must_rerun
):
    """A comment appended to every module of the objective leaves the zoo, the prepared data and every score
    up to date (re-scoring references is the cost the design exists to avoid); one in the tracking code,
    which writes no DVC output, does not re-train either."""
    project = clone_project(tiny_reproduced["path"], tmp_path / "p")
    assert stale_stages(project) == set()
    # the tracking names key the evaluate stage's records, so they (and their package's docstring-only
    # __init__) stay dependencies (tests/helpers.py RECORD_ONLY)
    kept = {"names.py", "__init__.py"} if package == "tracking" else set()
    for module in sorted((project / "mrpo" / package).glob("*.py")):
        if module.name not in kept:
            module.write_text(module.read_text() + "# an edit that changes nothing\n")
    stale = stale_stages(project)
    assert not stale & must_stay_up_to_date, stale
    assert must_rerun <= stale, stale


@pytest.mark.slow
def test_adding_a_reference_scores_only_that_one(tiny_reproduced, tmp_path):
    project = clone_project(tiny_reproduced["path"], tmp_path / "p")
    edit_params(project, lambda p: p["references"].update(anchor_twin={"model": "models/zoo/anchor"}))
    stale = stale_stages(project)
    assert stale == {"check", "score@anchor_twin", "diagnose", "train", "evaluate", "summary"}
    out = dvc(["repro", "--dry"], project).stdout
    assert "Running stage 'score@anchor_twin'" in out
    assert "Running stage 'score@anchor'" not in out and "Running stage 'score@gpt2_char'" not in out


# ---------------------------------------------------------------- fast: pipeline declaration, one-stage sweep


def test_dvc_yaml_declares_every_stage_with_params_deps_and_outs(tiny_project):
    from flows.stages import pipeline_stages
    from mrpo.config.load import load_config

    cfg = load_config(REPO_ROOT / "params.yaml")
    listed = dvc(["stage", "list", "--name-only"], tiny_project).stdout.split()
    assert listed == pipeline_stages(cfg) == STAGES
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        assert body["cmd"].startswith("mrpo "), name
        assert body["params"] and body["deps"] and body["outs"], (
            f"{name}: params, deps and outs must be declared"
        )
    assert spec["stages"]["score"]["foreach"] == "${references}"
    # the metrics: one headline file per policy-producing stage; timings are no DVC output at all (logs/)
    metrics = {name: stage.get("metrics") for name, stage in spec["stages"].items() if stage.get("metrics")}
    assert metrics == {
        "sft": [{"${sft.metrics_file}": {"cache": False, "persist": True}}],
        "train": [{"${train.metrics_file}": {"cache": False, "persist": True}}],
        "evaluate": [{"${evaluate.metrics_file}": {"cache": False, "persist": True}}],
    }
    assert spec["stages"]["evaluate"]["metrics"] == [
        {"${evaluate.metrics_file}": {"cache": False, "persist": True}}
    ]
    # the weights plot names exactly the default profile's references
    weights = next(p["Reference weights"] for p in spec["plots"] if "Reference weights" in p)
    assert weights["y"]["${train.plots_file}"] == [f"weight/{r.name}_smooth" for r in cfg.references]
    assert weights["y_label"].startswith("reference weight") and weights["x_label"] == "training step"
    assert weights["template"] == "lines" and (REPO_ROOT / ".dvc" / "plots" / "lines.json").is_file()
    # every curve has its validation counterpart, and the PNG renders are image plots and train outputs
    for name, column in (("Loss", "val_loss"), ("Reward accuracy", "val_reward_accuracy")):
        plot = next(p[name] for p in spec["plots"] if isinstance(p, dict) and name in p)
        assert plot["y"]["${train.plots_dir}/validation.csv"] == [column]
    pngs = [f"${{train.plots_dir}}/{n}" for n in ("loss.png", "reward_accuracy.png", "reference_weights.png")]
    images = [*pngs, "${diagnose.image_file}", "${compare.image_file}"]
    assert [p for p in spec["plots"] if isinstance(p, str)] == images
    train_outs = [next(iter(o)) for o in spec["stages"]["train"]["outs"]]
    assert set(pngs) <= set(train_outs) and "${train.plots_dir}/validation.csv" in train_outs
    # DVC resolves the interpolations against params.yaml: one score stage per reference, its own out
    described = dvc(["stage", "list", "score@gpt2_char"], tiny_project).stdout
    assert described.startswith("score@gpt2_char") and "data/scores/gpt2_char.parquet" in described
    assert "logs/score" not in described  # its timings differ run to run: no output of the stage
    assert spec["stages"]["summary"]["outs"] == [{"${summary.file}": {"cache": False, "persist": True}}]


@pytest.mark.slow
def test_exp_run_sets_a_param_and_reruns_only_that_stage(tiny_project, tmp_path):
    import json

    project = clone_project(tiny_project, tmp_path / "p")
    dvc(["repro", "prepare"], project)
    run_tool(["git", "add", "-A"], project)
    run_tool(["git", "commit", "-qm", "prepared"], project)
    out = dvc(["exp", "run", "-n", "small", "-S", "data.synthetic_pairs=120", "prepare"], project).stdout
    assert "Running stage 'prepare'" in out, out[-2000:]
    report = json.loads((project / "data" / "prepared" / "report.json").read_text())
    assert report["rows_read"] == 120
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["synthetic_pairs"] == 120
    shown = json.loads(dvc(["exp", "show", "--json"], project).stdout)
    text = json.dumps(shown)
    assert '"small"' in text and '"synthetic_pairs": 120' in text
    # the same -S again: nothing is stale, DVC says so instead of re-running
    again = dvc(["exp", "run", "-S", "data.synthetic_pairs=120", "prepare"], project).stdout
    assert "Running stage 'prepare'" not in again


@pytest.mark.slow
def test_references_scored_at_once_outside_repro_are_committed_and_dvc_then_sees_them_up_to_date(
    tiny_project, tmp_path
):
    """The multi-GPU recipe in the README: DVC says which score stages are stale, they run at the same time
    (one under torchrun with 2 ranks, one alone; on GPUs each with its own CUDA_VISIBLE_DEVICES), `dvc commit`
    records them, and `dvc repro` then skips them."""
    import os
    import subprocess

    project = clone_project(tiny_project, tmp_path / "p")
    dvc(["repro", "zoo", "prepare"], project)
    assert {"score@anchor", "score@gpt2_char"} <= stale_stages(project)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    score = [sys.executable, "-m", "mrpo.cli", "score", "--reference"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    jobs = [
        subprocess.Popen(
            [*torchrun, "-m", "mrpo.cli", "score", "--reference", "anchor"], cwd=project, env=env
        ),
        subprocess.Popen([*score, "gpt2_char"], cwd=project, env=env),
    ]
    assert [job.wait(timeout=600) for job in jobs] == [0, 0]
    dvc(["commit", "-f", "score@anchor", "score@gpt2_char"], project)
    stale = stale_stages(project)
    assert "score@anchor" not in stale and "score@gpt2_char" not in stale and "score@llama_expert" in stale
    out = dvc(["repro", "--dry", "score@anchor", "score@gpt2_char"], project).stdout
    assert "Running stage" not in out


@pytest.mark.slow
def test_two_checkouts_share_outputs_through_a_dvc_remote_and_runs_through_an_mlflow_server(
    tiny_reproduced, tmp_path
):
    """The several-machines recipe in the README with two checkouts on this machine: checkout A reproduces
    and pushes to a (local-directory) DVC remote; a fresh git clone B pulls, and its `dvc repro` runs
    nothing; both log training runs to one `mlflow server` whose artifact store both write through."""

    from mlflow.tracking import MlflowClient

    a = clone_project(tiny_reproduced["path"], tmp_path / "a")
    dvc(["remote", "add", "-d", "shared", str(tmp_path / "dvc-remote")], a)
    run_tool(["git", "add", "-A"], a)
    run_tool(["git", "commit", "-qm", "pipeline outputs (dvc.lock) and the shared DVC remote"], a)
    dvc(["push"], a)

    b = tmp_path / "b"
    run_tool(["git", "clone", "-q", str(a), str(b)], tmp_path)
    assert not (b / "data" / "scores" / "anchor.parquet").exists()  # git holds dvc.lock, not the outputs
    dvc(["pull"], b)
    out = dvc(["repro"], b).stdout
    assert "Running stage" not in out and "Data and pipelines are up to date." in out
    for path in (
        "data/scores/anchor.parquet",
        "data/scores/llama_expert.parquet",
        "models/policy/model.safetensors",
    ):
        assert (b / path).read_bytes() == (a / path).read_bytes(), path
    assert stale_stages(b) == set()

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(port, tmp_path)
    try:
        for checkout, beta in ((a, "0.2"), (b, "0.3")):  # a new setting each, so each trains a new run
            mrpo = [sys.executable, "-m", "mrpo.cli", "--set", f"train.beta={beta}", "train"]
            run_tool(mrpo, checkout, env={"MLFLOW_TRACKING_URI": uri})
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("mrpo").experiment_id])
        assert sorted(r.data.params["train.beta"] for r in runs) == ["0.2", "0.3"]
        for run in runs:
            assert {"policy.json", "reference_set.json"} <= {
                f.path for f in client.list_artifacts(run.info.run_id)
            }
            assert list((tmp_path / "server-artifacts").rglob(f"{run.info.run_id}/artifacts/policy.json"))
    finally:
        stop_group(server)
