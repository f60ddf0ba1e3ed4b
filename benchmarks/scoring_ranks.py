"""B6: `mrpo score` in one process against 2 data-parallel gloo ranks under torchrun, on CPU.

    python benchmarks/scoring_ranks.py            # every reference, the default data (~4 min on 2 cores)
    python benchmarks/scoring_ranks.py --pairs 24000 96000 --references anchor --rounds 2 \
        --out b6_scoring_ranks_large              # where a second rank starts to pay off, if anywhere

Each run is the real command in a fresh process, on a scratch copy of the default profile's zoo and
prepared data (built with `mrpo zoo` / `mrpo prepare` when the checkout has none), with a fresh
score.output_dir and score.metrics_dir:

    python -m mrpo.cli score --reference R                                            (1 process)
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m mrpo.cli score --reference R

The two alternate round by round after a warm-up round. Per run: the wall time of the command, and the
scoring compute the stage itself records in score.metrics_dir/R.json (`seconds`: the forward passes only,
summed over ranks). Every round the 2-rank score file must equal that round's 1-process file: the same
pair_ids in the same order, the same `fits`, and chosen/rejected log-probs within --tolerance.

`--pairs N` scales the data: N <= the synthetic task's distinct pairs re-runs `mrpo prepare` with
data.synthetic_pairs N; a larger N repeats the default prepared splits (pair_ids suffixed `#k`), so each
extra copy costs the same tokens again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def scaled_data(cfg, scratch: Path, n_pairs: int | None):
    """The Config to score and its pair count: the default prepared data, or `n_pairs` of them."""
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mrpo.config.knobs import SYNTHETIC_MAX_PAIRS
    from mrpo.data.prepared import SPLITS
    from mrpo.stages.prepare import prepare

    base_n = cfg.data.synthetic_pairs
    if n_pairs is None or n_pairs == base_n:
        return cfg, base_n
    out = scratch / f"prepared-{n_pairs}"
    data = dataclasses.replace(cfg.data, output_dir=str(out))
    if (out / "train.parquet").is_file():  # made by an earlier run in a kept --project
        return dataclasses.replace(cfg, data=data), n_pairs
    if n_pairs <= SYNTHETIC_MAX_PAIRS:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(data, synthetic_pairs=n_pairs))
        prepare(cfg)
        return cfg, n_pairs
    # More pairs than the task has: the prepared splits repeated, the train split cut to make n_pairs.
    reps = math.ceil(n_pairs / base_n)
    out.mkdir(parents=True)
    tables = {s: pq.read_table(Path(cfg.data.output_dir) / f"{s}.parquet") for s in SPLITS}
    held_out = sum(t.num_rows for s, t in tables.items() if s != "train") * reps
    for split, table in tables.items():
        copies = []
        for k in range(reps):
            ids = table.column("pair_id").to_pylist()
            ids = ids if k == 0 else [f"{pid}#{k}" for pid in ids]
            copies.append(table.set_column(table.schema.get_field_index("pair_id"), "pair_id", pa.array(ids)))
        tiled = pa.concat_tables(copies)
        if split == "train":
            tiled = tiled.slice(0, n_pairs - held_out)
        pq.write_table(tiled, out / f"{split}.parquet")
    return dataclasses.replace(cfg, data=data), n_pairs


def overrides(cfg) -> list[str]:
    """--set arguments that point the CLI at the scratch zoo and data, on CPU."""
    sets = {f"references.{r.name}.model": r.model for r in cfg.references}
    sets |= {"data.output_dir": cfg.data.output_dir, "score.device": "cpu"}
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def commands(nproc: int) -> dict[str, list[str]]:
    """The two designs' launchers (the CLI's arguments are appended)."""
    return {
        "1 process": [sys.executable, "-m", "mrpo.cli"],
        f"{nproc} ranks": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "mrpo.cli",
        ],
    }


def run_score(launcher: list[str], sets: list[str], reference: str, out: Path) -> dict:
    """One scoring command into a fresh `out`; its wall time and the stage's own timing record."""
    out.mkdir(parents=True)
    cmd = [
        *launcher,
        *sets,
        "--set",
        f"score.output_dir={out / 'scores'}",
        "--set",
        f"score.metrics_dir={out / 'metrics'}",
        "score",
        "--reference",
        reference,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(C.REPO), os.environ.get("PYTHONPATH")])),
    }
    log_path = out / "log.txt"
    start = time.perf_counter()
    with log_path.open("w") as log:
        rc = subprocess.run(cmd, cwd=C.REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}):\n{tail}")
    timing = json.loads((out / "metrics" / f"{reference}.json").read_text())
    return {"wall_s": wall, "compute_s": timing["seconds"], "file": out / "scores" / f"{reference}.parquet"}


def compare_files(one: Path, two: Path) -> dict:
    """How the 2-rank score file differs from the 1-process one: pair_ids, fits, log-probs, metadata."""
    import numpy as np

    from mrpo.data.scorefile import read_scores

    a, meta_a = read_scores(one)
    b, meta_b = read_scores(two)
    same_ids = a["pair_id"].tolist() == b["pair_id"].tolist()
    same_fits = same_ids and bool((a["fits"].to_numpy() == b["fits"].to_numpy()).all())
    diff = math.inf
    if same_fits:
        diff = 0.0
        for col in ("chosen_logp", "rejected_logp"):
            x, y = a[col].to_numpy(np.float64), b[col].to_numpy(np.float64)
            if not (np.isnan(x) == np.isnan(y)).all():
                diff = math.inf
                break
            both = ~np.isnan(x)
            diff = max(diff, float(np.abs(x[both] - y[both]).max(initial=0.0)))
    return {
        "same_pair_ids": same_ids,
        "same_fits": same_fits,
        "max_abs_logp_diff": diff,
        "metadata_equal": meta_a == meta_b,
    }


def measure(cfg, reference: str, n_pairs: int, args, scratch: Path, warmup: int) -> dict:
    """Alternate the two designs on one reference; the row of the results JSON."""
    launchers = commands(args.nproc)
    sets = overrides(cfg)
    one, two = launchers
    runs: dict[str, list[dict]] = {name: [] for name in launchers}

    def design(name):
        def go():
            run = run_score(
                launchers[name],
                sets,
                reference,
                scratch / f"{reference}-{n_pairs}" / name / str(len(runs[name])),
            )
            runs[name].append(run)
            return run["wall_s"]

        return go

    print(f"{reference} ({n_pairs} pairs): {one} vs {two}", file=sys.stderr, flush=True)
    load_before = C.load_average()
    C.interleaved({name: design(name) for name in launchers}, rounds=args.rounds, warmup=warmup)
    checks = [compare_files(r1["file"], r2["file"]) for r1, r2 in zip(runs[one], runs[two], strict=True)]
    identical = all(
        c["same_pair_ids"] and c["same_fits"] and c["max_abs_logp_diff"] <= args.tolerance for c in checks
    )
    kept = {name: rs[warmup:] for name, rs in runs.items()}  # the warm-up round is not timed
    wall = {name: [r["wall_s"] for r in rs] for name, rs in kept.items()}
    compute = {name: [r["compute_s"] for r in rs] for name, rs in kept.items()}
    ranks = {one: 1, two: args.nproc}
    # Compute per rank: the stage records the forwards' seconds summed over ranks; shards are dealt
    # round-robin, so each rank's share is about 1/nproc of it.
    overhead = {
        name: C.median([1 - c / ranks[name] / w for c, w in zip(compute[name], wall[name], strict=True)])
        for name in kept
    }
    row = {
        "reference": reference,
        "pairs": n_pairs,
        # The exact command lines, the scratch directory written as $SCRATCH.
        "commands": {
            name: " ".join(
                ["python" if a == sys.executable else a for a in launchers[name]]
                + sets
                + ["--set", "score.output_dir=$RUN/scores", "--set", "score.metrics_dir=$RUN/metrics"]
                + ["score", "--reference", reference]
            ).replace(str(scratch.parent), "$SCRATCH")
            for name in launchers
        },
        "wall_s": {name: C.spread(v) for name, v in wall.items()},
        "compute_s_summed_over_ranks": {name: C.spread(v) for name, v in compute.items()},
        "ratio_wall_ranks_over_1": C.median(wall[two]) / C.median(wall[one]),
        "paired_ratio_wall_ranks_over_1": C.paired_ratio(wall[two], wall[one]),
        "ratio_compute_sum_ranks_over_1": C.median(compute[two]) / C.median(compute[one]),
        "overhead_share": overhead,
        "checks_per_round_incl_warmup": checks,
        "max_abs_logp_diff": max(c["max_abs_logp_diff"] for c in checks),
        "tolerance": args.tolerance,
        "identical": identical,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in C.load_average()],
    }
    print(markdown_row(row, one, two), flush=True)
    return row


def markdown_row(r: dict, one: str = "1 process", two: str = "2 ranks") -> str:
    """One line of the B6 table (benchmarks/report.py prints the same)."""
    w, c = r["wall_s"], r["compute_s_summed_over_ranks"]
    return (
        f"| {r['reference']} | {r['pairs']} | {w[one]['median']:.1f} s | {w[two]['median']:.1f} s | "
        f"x{r['ratio_wall_ranks_over_1']:.2f} | {c[one]['median']:.1f} s | {c[two]['median']:.1f} s | "
        f"{100 * r['overhead_share'][one]:.0f}% / {100 * r['overhead_share'][two]:.0f}% | "
        f"{'yes' if r['identical'] else '**no**'} (max diff {r['max_abs_logp_diff']:.1e}) |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--references", nargs="+", default=None, help="default: every reference in params.yaml")
    p.add_argument(
        "--pairs",
        type=int,
        nargs="+",
        default=[None],
        help="pairs to score, one size after another (default: data.synthetic_pairs)",
    )
    p.add_argument("--nproc", type=int, default=2, help="ranks of the data-parallel design")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds, before the first row only")
    p.add_argument("--tolerance", type=float, default=1e-6, help="max abs log-prob difference allowed")
    p.add_argument(
        "--project", default=None, help="scratch directory to use and keep (default: temp, removed)"
    )
    p.add_argument("--out", default="b6_scoring_ranks")
    args = p.parse_args()

    keep = args.project is not None
    scratch = Path(args.project) if keep else Path(tempfile.mkdtemp(prefix="mrpo-b6-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        if (scratch / "zoo").is_dir():  # a kept project from an earlier run
            cfg = _scratch_config(scratch)
        else:
            cfg = C.zoo_project(scratch, need_scores=False)
        names = args.references or [r.name for r in cfg.references]
        runs = scratch / "runs"
        shutil.rmtree(runs, ignore_errors=True)  # every run scores into a fresh directory
        rows = []
        for size in args.pairs:
            sized, n_pairs = scaled_data(cfg, scratch, size)
            for name in names:
                rows.append(measure(sized, name, n_pairs, args, runs, 0 if rows else args.warmup))
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    one, two = commands(args.nproc)
    payload = {
        "benchmark": "B6 scoring ranks",
        "command": " ".join(["python"] + sys.argv),
        "designs": {one: "one `mrpo score` process", two: f"torchrun --standalone, {args.nproc} gloo ranks"},
        "machine": C.machine_info(1),
        "commit": C.git_commit(),
        "rows": rows,
    }
    print("wrote", C.write_result(args.out, payload))


def _scratch_config(scratch: Path):
    """The Config zoo_project made for `scratch`, without copying or building again."""
    from mrpo.config.load import load_config

    base = load_config(C.REPO / "params.yaml")
    sets = {f"references.{r.name}.model": str(scratch / "zoo" / Path(r.model).name) for r in base.references}
    sets |= {"data.output_dir": str(scratch / "prepared"), "score.device": "cpu"}
    return load_config(C.REPO / "params.yaml", sets)


if __name__ == "__main__":
    main()
