"""Scheduled deployments of the flows, served from this checkout.

    python -m flows.deploy                      # nightly pipeline + weekly sweep, served here
    python -m flows.deploy --only pipeline      # just the pipeline deployment
    python -m flows.deploy --no-schedules       # registered, but run only when triggered
    python -m flows.deploy --interval 60        # every 60 s instead of the crons: see a scheduled run now
    python -m flows.deploy --only pipeline --param 'stages=["prepare"]'   # a parameter of the deployment

`serve` registers the deployments with the Prefect API (PREFECT_API_URL: a running `prefect server start`)
and executes their runs in this process's environment; the server's scheduler creates the scheduled
runs. Trigger one with `prefect deployment run pipeline/mrpo-nightly` or from the UI. SIGTERM or Ctrl-C
stops serving (and pauses the schedules, if the API still answers). For work pools and workers instead,
see prefect.yaml (`prefect deploy --all`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prefect.runner import Runner
from prefect.schedules import Cron, Interval
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

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

FLOWS = {"pipeline": pipeline, "sweep": sweep}


def deployments(
    project_dir: str | Path = ".",
    only: str | None = None,
    schedules: bool = True,
    sweep_parameters: dict[str, Any] | None = None,
    interval: float | None = None,
    parameters: dict[str, Any] | None = None,
) -> list:
    """RunnerDeployments `pipeline/mrpo-nightly` and `sweep/mrpo-weekly` for `project_dir`: on their crons,
    or every `interval` seconds instead; `parameters` override those of every deployment made."""
    project_dir = str(Path(project_dir).resolve())

    def schedule(cron: str) -> list | None:
        if not schedules:
            return None
        return [Interval(interval)] if interval else [Cron(cron, timezone=TIMEZONE)]

    out = []
    if only in (None, "pipeline"):
        out.append(
            pipeline.to_deployment(
                name="mrpo-nightly",
                schedules=schedule(NIGHTLY_CRON),
                parameters={"project_dir": project_dir, "lineage": True, **(parameters or {})},
                description="Nightly `dvc repro` of the MRPO pipeline, stage by stage, with MLflow lineage.",
                tags=["mrpo", "pipeline"],
            )
        )
    if only in (None, "sweep"):
        sweep_params = {"project_dir": project_dir, **SWEEP_PARAMETERS, **(sweep_parameters or {})}
        out.append(
            sweep.to_deployment(
                name="mrpo-weekly",
                schedules=schedule(WEEKLY_CRON),
                parameters={**sweep_params, **(parameters or {})},
                description="Weekly sweep: DPO per reference and MRPO per weighting strategy, over seeds.",
                tags=["mrpo", "sweep"],
            )
        )
    return out


class DeploymentRunner(Runner):
    """Prefect's Runner, stopping within seconds on SIGTERM. Prefect 3.8's own handler leaves its async stop()
    unawaited and exits through asyncio's shutdown: tracebacks, and when the API is gone, 75 s of retries
    to pause the schedules. Here SIGTERM stops the runner from inside its loop (in-flight runs cancelled,
    schedules paused), trying the API once for each."""

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        self._logger.info("SIGTERM received, stopping")
        loop = asyncio.get_running_loop()  # the handler runs on the main thread, inside the runner's loop
        loop.call_soon_threadsafe(lambda: setattr(self, "_stop_task", loop.create_task(self._stop_once())))

    async def _stop_once(self) -> None:
        if not self.started:
            return
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
            await self.astop()

    async def _pause_schedules(self) -> None:
        try:
            with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):  # once: a shutdown does not wait
                await super()._pause_schedules()
        except Exception as exc:  # noqa: BLE001 - any failure leaves the same state: schedules active
            self._logger.warning(
                "Could not pause the deployments' schedules (%s: %s); the server keeps scheduling them "
                "until they are paused (`prefect deployment schedule pause`) or served again",
                type(exc).__name__,
                exc,
            )


def check_api() -> str:
    """The Prefect API URL, after checking that a server answers there; exits 2 with the fix if not."""
    url = PREFECT_API_URL.value()
    if not url:
        fail(
            "PREFECT_API_URL is not set: start a server (`prefect server start`) and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (a temporary server would drop the schedules)"
        )
    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:
        pass  # it answered (an API behind auth may refuse /health)
    except OSError as exc:
        fail(f"no Prefect API answers at {url} ({getattr(exc, 'reason', exc)}): start `prefect server start`")
    return url


def fail(message: str) -> None:
    print(f"flows.deploy: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_param(text: str) -> tuple[str, Any]:
    """`KEY=VALUE`, VALUE as JSON when it parses (`stages=["prepare"]`, `lineage=false`), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def positive_seconds(text: str) -> float:
    seconds = float(text)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"an interval must be positive seconds, got {text}")
    return seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--project-dir", default=".", help="the project checkout the flows run in (default: .)"
    )
    parser.add_argument("--only", choices=tuple(FLOWS), help="serve one deployment only")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--no-schedules", action="store_true", help="register without schedules")
    when.add_argument(
        "--interval",
        type=positive_seconds,
        metavar="SECONDS",
        help=f"schedule every SECONDS instead of the crons ({NIGHTLY_CRON!r}, {WEEKLY_CRON!r}): to see a "
        "scheduled run fire",
    )
    parser.add_argument(
        "--param",
        type=parse_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter of the served deployments' flow (VALUE as JSON, else a string); repeatable",
    )
    parser.add_argument("--limit", type=int, default=1, help="flow runs executed at once (default 1)")
    args = parser.parse_args(argv)
    for key, _ in args.param:
        served = [name for name in FLOWS if args.only in (None, name)]
        lacking = [name for name in served if key not in FLOWS[name].parameters.properties]
        if lacking:
            parser.error(f"--param {key}: not a parameter of the {' and '.join(lacking)} flow (use --only)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    url = check_api()
    deps = deployments(
        args.project_dir,
        args.only,
        schedules=not args.no_schedules,
        interval=args.interval,
        parameters=dict(args.param),
    )
    runner = DeploymentRunner(limit=args.limit)
    for deployment in deps:
        runner.add_deployment(deployment)
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in deps)
    where = Path(args.project_dir).resolve()
    print(f"Serving {names} from {where} against {url}; stop with Ctrl-C or SIGTERM", flush=True)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass
    print("flows.deploy: stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
