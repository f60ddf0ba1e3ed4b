"""Scheduled deployments of the flows, served from this checkout.

    python -m flows.deploy                      # nightly pipeline + weekly sweep, served here
    python -m flows.deploy --only pipeline      # just the pipeline deployment
    python -m flows.deploy --no-schedules       # registered, but run only when triggered

`serve` registers the deployments with the Prefect API (PREFECT_API_URL) and executes their
runs in this process's environment; trigger one with
`prefect deployment run pipeline/mrpo-nightly` or from the UI. For work pools and workers
instead, see prefect.yaml (`prefect deploy --all`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.schedules import Cron

from flows.pipeline import pipeline
from flows.sweep import sweep

NIGHTLY_CRON = "0 2 * * *"  # every day at 02:00
WEEKLY_CRON = "0 3 * * 0"  # Sundays at 03:00
TIMEZONE = "UTC"  # whatever the serving machine's zone

# The weekly sweep's default shape; shrink it per deployment with its parameters.
SWEEP_PARAMETERS: dict[str, Any] = {
    "seeds": [0, 1],
    "strategies": None,
    "dpo_references": None,
    "overrides": None,
    "output_dir": "sweeps",
}


def deployments(
    project_dir: str | Path = ".",
    only: str | None = None,
    schedules: bool = True,
    sweep_parameters: dict[str, Any] | None = None,
) -> list:
    """RunnerDeployments `pipeline/mrpo-nightly` and `sweep/mrpo-weekly` for `project_dir`."""
    project_dir = str(Path(project_dir).resolve())
    out = []
    if only in (None, "pipeline"):
        out.append(
            pipeline.to_deployment(
                name="mrpo-nightly",
                schedules=[Cron(NIGHTLY_CRON, timezone=TIMEZONE)] if schedules else None,
                parameters={"project_dir": project_dir, "lineage": True},
                description="Nightly `dvc repro` of the MRPO pipeline, stage by stage, with MLflow lineage.",
                tags=["mrpo", "pipeline"],
            )
        )
    if only in (None, "sweep"):
        out.append(
            sweep.to_deployment(
                name="mrpo-weekly",
                schedules=[Cron(WEEKLY_CRON, timezone=TIMEZONE)] if schedules else None,
                parameters={"project_dir": project_dir, **SWEEP_PARAMETERS, **(sweep_parameters or {})},
                description="Weekly sweep: DPO per reference and MRPO per weighting strategy, over seeds.",
                tags=["mrpo", "sweep"],
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--project-dir", default=".", help="the project checkout the flows run in (default: .)"
    )
    parser.add_argument("--only", choices=("pipeline", "sweep"), help="serve one deployment only")
    parser.add_argument("--no-schedules", action="store_true", help="register without schedules")
    parser.add_argument("--limit", type=int, default=1, help="flow runs executed at once (default 1)")
    args = parser.parse_args(argv)
    serve(*deployments(args.project_dir, args.only, schedules=not args.no_schedules), limit=args.limit)


if __name__ == "__main__":
    main()
