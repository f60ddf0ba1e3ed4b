"""B5: default `dvc repro` wall time against the sum of the stages' own compute,
and the no-op `dvc repro` time.

    python benchmarks/pipeline.py                    # runs in a scratch git repo copy of the working tree
    python benchmarks/pipeline.py --keep /tmp/b5     # keep the scratch project for inspection

The project's tracked and untracked (not ignored) files are copied into a fresh
git repository, so nothing in the checkout (its dvc.lock, cache, models) is
touched. `dvc repro` runs there with a shim first on PATH: `mrpo` there records
each stage command's start and end, then runs the real `mrpo`. Reported: the
repro wall time, the sum of the stage commands' own times, DVC's overhead
(the difference) and its share, and the wall time of a second, no-op `dvc repro`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SHIM = """#!/bin/sh
start=$(python3 -c 'import time; print(time.time())')
"{real}" "$@"
rc=$?
end=$(python3 -c 'import time; print(time.time())')
echo "{{\\"argv\\": \\"$*\\", \\"start\\": $start, \\"end\\": $end, \\"rc\\": $rc}}" >> "{log}"
exit $rc
"""


def copy_project(dest: Path) -> None:
    """Tracked + untracked-not-ignored files of the checkout
    (minus benchmark results) into a new git repo at dest."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=C.REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = C.REPO / rel
        if rel.startswith("benchmarks/results/") or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    # The shared data sits beside the repository; keep relative paths such as ../shared/data working.
    if (C.REPO.parent / "shared").exists() and not (dest.parent / "shared").exists():
        os.symlink(C.REPO.parent / "shared", dest.parent / "shared")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "snapshot"],
    ):
        subprocess.run(cmd, cwd=dest, check=True)
    (dest / "dvc.lock").unlink(missing_ok=True)  # a fresh project: every stage runs


def timed(cmd: list[str], cwd: Path, env: dict, log_path: Path) -> float:
    start = time.perf_counter()
    with log_path.open("a") as log:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {log_path}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--keep", default=None, help="scratch directory to use and keep (default: a temp dir, removed)"
    )
    p.add_argument("--noop-runs", type=int, default=3)
    p.add_argument("--out", default="b5_pipeline")
    args = p.parse_args()

    real_mrpo = shutil.which("mrpo")
    dvc = shutil.which("dvc")
    if real_mrpo is None or dvc is None:
        raise SystemExit("needs the `mrpo` and `dvc` commands on PATH (activate the project's virtualenv)")
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mrpo-b5-"))
    project = base / "main"
    project.mkdir(parents=True, exist_ok=False)
    try:
        copy_project(project)
        shim_dir, stage_log = base / "shim", base / "stage_times.jsonl"
        shim_dir.mkdir()
        (shim_dir / "mrpo").write_text(SHIM.format(real=real_mrpo, log=stage_log))
        (shim_dir / "mrpo").chmod(0o755)
        env = {
            **os.environ,
            "PATH": f"{shim_dir}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        }
        log_path = base / "dvc_repro.log"
        print(f"dvc repro in {project} (log {log_path})", file=sys.stderr, flush=True)
        load_before = C.load_average()
        repro_wall = timed([dvc, "repro"], project, env, log_path)
        stages = [json.loads(line) for line in stage_log.read_text().splitlines()]
        stage_sum = sum(s["end"] - s["start"] for s in stages)
        noop = [timed([dvc, "repro"], project, env, log_path) for _ in range(args.noop_runs)]
        tail = log_path.read_text().splitlines()[-3:]
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    row = {
        "repro_wall_s": repro_wall,
        "stage_commands": [{"cmd": f"mrpo {s['argv']}", "seconds": s["end"] - s["start"]} for s in stages],
        "stage_compute_sum_s": stage_sum,
        "dvc_overhead_s": repro_wall - stage_sum,
        "dvc_overhead_share": (repro_wall - stage_sum) / repro_wall,
        "noop_repro_s": C.spread(noop),
        "noop_log_tail": tail,
        "load_before": load_before,
        "load_after": C.load_average(),
    }
    print(
        f"dvc repro {repro_wall:.1f} s; stage commands {stage_sum:.1f} s; "
        f"DVC overhead {row['dvc_overhead_s']:.1f} s "
        f"({100 * row['dvc_overhead_share']:.1f}%); no-op repro {C.median(noop):.2f} s",
        flush=True,
    )
    payload = {
        "benchmark": "B5 pipeline",
        "command": " ".join(["python"] + sys.argv),
        "machine": C.machine_info(1),
        "commit": C.git_commit(),
        "rows": [row],
    }
    print("wrote", C.write_result(args.out, payload))


if __name__ == "__main__":
    main()
