"""The train stage's curves as files a reader can open offline: CSVs for `dvc plots` and PNG renders.

`plots/train.csv` (one row per logging step) gains trailing-mean columns (`<name>_smooth`), because a
per-batch reward accuracy of 16 pairs jumps by 1/16 from step to step and hides the trend. The validation
curve (`plots/validation.csv`) is the periodic evaluation on the validation split (`train.eval_steps`),
with the untrained policy at step 0 and the final policy at the last step. The PNGs need no browser and no
network (`dvc plots show` writes an HTML page that loads vega from a CDN).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mrpo.io import atomic_file, write_text_atomically

SMOOTH_WINDOW = 10  # logging steps in the trailing mean of the smoothed training curves
SMOOTHED = ("loss", "rewards/accuracy")
VALIDATION_COLUMNS = ("step", "val_loss", "val_reward_accuracy")
VALIDATION_FILE = "validation.csv"
PNG_FILES = ("loss.png", "reward_accuracy.png", "reference_weights.png")


def trailing_mean(values: Sequence[float | None], window: int = SMOOTH_WINDOW) -> list[float | None]:
    """Mean of the last `window` present values at each position (None where nothing is present yet)."""
    out: list[float | None] = []
    recent: list[float] = []
    for v in values:
        if v is not None:
            recent = [*recent, float(v)][-window:]
        out.append(sum(recent) / len(recent) if recent and v is not None else None)
    return out


def with_smoothed(columns: list[str], rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """`rows` plus `<name>_smooth` for the noisy per-batch curves (SMOOTHED and every
    `weight/<reference>`)."""
    names = [c for c in columns if c in SMOOTHED or c.startswith("weight/")]
    rows = [dict(r) for r in rows]
    for name in names:
        for row, value in zip(rows, trailing_mean([r.get(name) for r in rows]), strict=True):
            if value is not None:
                row[f"{name}_smooth"] = value
    return columns + [f"{n}_smooth" for n in names], rows


def validation_rows(rows: list[dict[str, Any]], before: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The validation curve: step 0 from the before-training metrics, then every evaluation on the
    validation split (`eval_*` during training, `val_*` after it), one row per step."""
    curve: dict[int, dict[str, Any]] = {}
    if before.get("val_loss_before") is not None:
        curve[0] = {
            "step": 0,
            "val_loss": before["val_loss_before"],
            "val_reward_accuracy": before.get("val_reward_accuracy_before"),
        }
    for row in rows:
        for prefix in ("eval", "val"):
            if f"{prefix}_loss" in row:
                curve[row["step"]] = {
                    "step": row["step"],
                    "val_loss": row[f"{prefix}_loss"],
                    "val_reward_accuracy": row.get(f"{prefix}_rewards/accuracy"),
                }
    return [curve[s] for s in sorted(curve)]


def write_csv(path: str | Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, buffer.getvalue())


_CURVES = (  # file, training metric, validation metric, y label
    ("loss.png", "loss", "val_loss", "loss (training objective)"),
    (
        "reward_accuracy.png",
        "rewards/accuracy",
        "val_reward_accuracy",
        "reward accuracy (vs. the objective's reference)",
    ),
)


def _series(source: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[name]) for r in source if r.get(name) not in (None, "")]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def render_pngs(
    out_dir: str | Path,
    rows: list[dict[str, Any]],
    validation: list[dict[str, Any]],
    references: Sequence[str],
    title: str,
) -> list[Path]:
    """loss.png, reward_accuracy.png and reference_weights.png under `out_dir`: raw per-step curves faint,
    their trailing means bold, the validation curve with markers; one colour per reference."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_render_curve(out_dir / name, rows, validation, m, v, y, title) for name, m, v, y in _CURVES]
    return [*written, _render_weights(out_dir / "reference_weights.png", rows, references, title)]


def _render_curve(
    path: Path, rows, validation, metric: str, val_metric: str, ylabel: str, title: str
) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(rows, metric), color="tab:blue", alpha=0.25, lw=1, label="train, per step")
    ax.plot(
        *_series(rows, f"{metric}_smooth"),
        color="tab:blue",
        lw=2.2,
        label=f"train, mean of {SMOOTH_WINDOW} steps",
    )
    ax.plot(*_series(validation, val_metric), "o-", color="tab:orange", lw=2, label="validation")
    if metric == "rewards/accuracy":
        ax.set_ylim(-0.02, 1.02)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="training step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)


def _render_weights(path: Path, rows, references: Sequence[str], title: str) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ("-", "--", ":", "-.")
    for i, ref in enumerate(references):
        steps, values = _series(rows, f"weight/{ref}_smooth")
        # Constant weights (uniform, fixed, vdw, vaw) draw on top of each other: dashes keep each visible.
        ax.plot(steps, values, styles[i % len(styles)], color=f"C{i}", lw=2.2, label=ref)
    ax.set_ylim(0, 1)
    ax.set(
        xlabel="training step",
        ylabel=f"reference weight alpha (mean of {SMOOTH_WINDOW} steps)",
        title=f"{title}: reference weights",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)
