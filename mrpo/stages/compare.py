"""`mrpo compare`: does multi-reference help on this data? A seeded comparison with intervals, in one process.

Configurations (params.yaml `compare`): DPO with each reference alone, MRPO with each weighting strategy over
all references, and multi_dpo (uniform weights); each trained once per seed. A seed draws its own
`compare.train_pairs` training pairs (the data-scarce setting) and orders them; every configuration of that
seed trains on the same draw, from the anchor, for `compare.num_epochs` epochs, with the other `train.*`
settings. Nothing is re-scored: the stored score files of the pipeline are reused, so the zoo, the data
split and the scores are those of `seed` in params.yaml, and a comparison seed varies the training draw and
the training order only.

Each member is scored on the whole test split against the anchor (the standard DPO reward accuracy, as the
evaluate stage: mrpo.core.metrics.reward_accuracy), pair by pair; mrpo.core.stats turns the (seeds x pairs)
matrices
into intervals and paired differences against DPO with the anchor. With `compare.lm_eval_limit` > 0 each
member also runs the evaluate stage's lm-eval tasks on that many documents.

Outputs in `<compare.output_dir>/<id>/`: comparison.md (the tables and the reference diagnostics),
comparison.csv (per configuration), members.csv (per member), comparison.png; a copy of the CSV and PNG at
`compare.plots_file` / `compare.image_file` for `dvc plots`; an MLflow parent run (tag mrpo.sweep=<id>)
with one child run per member.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrpo.config.schema import Config
from mrpo.core.metrics import LOGP_TIE_TOLERANCE
from mrpo.core.stats import bootstrap_summary, paired_t_p_value, t_interval
from mrpo.core.weighting import STRATEGIES
from mrpo.data.preference import PreferenceCollator, PreferenceDataset
from mrpo.errors import ConfigError
from mrpo.io import atomic_file, write_text_atomically
from mrpo.reporting.tables import markdown_table, text_table

log = logging.getLogger("mrpo")

ACCURACY = "test_reward_accuracy_vs_anchor"
DEFAULT_STRATEGIES = tuple(s for s in STRATEGIES if s != "fixed")  # fixed needs weights: ask for it by name


# ---------------------------------------------------------------- what runs


@dataclass(frozen=True)
class Member:
    """One training run: a configuration (label) and a seed."""

    label: str
    seed: int
    objective: str
    strategy: str
    references: tuple[str, ...]  # anchor first for mrpo/multi_dpo; the one reference for dpo


def comparison_members(
    names: Sequence[str],
    seeds: Sequence[int],
    strategies: Sequence[str] | None = None,
    dpo_references: Sequence[str] | None = None,
    multi_dpo: bool = True,
) -> list[Member]:
    """Every configuration for every seed, seed by seed (so a stopped comparison has whole seeds)."""
    strategies = DEFAULT_STRATEGIES if strategies is None else tuple(strategies)
    members = []
    for seed in seeds:
        for ref in names if dpo_references is None else dpo_references:
            members.append(Member(f"dpo:{ref}", seed, "dpo", "uniform", (ref,)))
        if len(names) > 1:
            for s in strategies:
                members.append(Member(f"mrpo:{s}", seed, "mrpo", s, tuple(names)))
            if multi_dpo:
                members.append(Member("multi_dpo", seed, "multi_dpo", "uniform", tuple(names)))
    return members


def baseline_label(names: Sequence[str]) -> str:
    return f"dpo:{names[0]}"


def member_config(cfg: Config, member: Member, work_dir: Path) -> Config:
    """The train stage's config for one member: its objective, references, strategy and seed; the comparison's
    epochs; no periodic evaluation or checkpoints (nothing resumes), outputs in a scratch directory."""
    t = cfg.train
    train = dataclasses.replace(
        t,
        objective=member.objective,
        strategy=member.strategy,
        references=None if member.objective == "dpo" else member.references,
        dpo_reference=member.references[0] if member.objective == "dpo" else None,
        fixed_weights=t.fixed_weights if member.strategy == "fixed" else None,
        num_epochs=cfg.compare.num_epochs,
        max_steps=-1,
        eval_steps=10**9,
        save_steps=10**9,
        logging_steps=10**9,
        output_dir=str(work_dir / "policy"),
        checkpoint_dir=str(work_dir / "checkpoints"),
    )
    return dataclasses.replace(cfg, seed=member.seed, train=train)


# ---------------------------------------------------------------- data: one tokenization for every member


def select_references(dataset: PreferenceDataset, names: Sequence[str]) -> PreferenceDataset:
    """The same pairs with only the columns of `names` (in that order): a member's K references."""
    cols = [dataset.reference_names.index(n) for n in names]

    def pick(x):
        return None if x is None else x[cols]

    examples = [
        dataclasses.replace(
            e,
            ref_chosen_logps=e.ref_chosen_logps[cols],
            ref_rejected_logps=e.ref_rejected_logps[cols],
            ref_chosen_tokens=pick(e.ref_chosen_tokens),
            ref_rejected_tokens=pick(e.ref_rejected_tokens),
        )
        for e in dataset.examples
    ]
    return PreferenceDataset(examples, names, dataset.skipped)


def draw_pairs(dataset: PreferenceDataset, n: int, seed: int) -> PreferenceDataset:
    """`n` training pairs drawn without replacement, determined by `seed` (all of them when there are
    fewer)."""
    order = np.random.default_rng(seed).permutation(len(dataset))[:n]
    return PreferenceDataset([dataset.examples[i] for i in sorted(order)], dataset.reference_names)


# ---------------------------------------------------------------- scoring a member


def pair_correct(
    policy_chosen: np.ndarray,
    policy_rejected: np.ndarray,
    anchor_chosen: np.ndarray,
    anchor_rejected: np.ndarray,
    beta: float,
    precision: torch.dtype = torch.float32,
) -> np.ndarray:
    """Per pair 1.0 when the policy's reward against the anchor prefers the chosen response beyond a tie, else
    0.0: the per-pair form of mrpo.core.metrics.reward_accuracy (its mean is the evaluate stage's
    reward_accuracy_vs_anchor)."""
    gap = beta * ((policy_chosen - anchor_chosen) - (policy_rejected - anchor_rejected))
    return (gap > beta * LOGP_TIE_TOLERANCE[precision]).astype(np.float64)


def policy_logps(
    model, dataset: PreferenceDataset, pad_token_id: int, precision: torch.dtype, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) sequence log-probs of the policy on every pair, computed as training computes
    them."""
    from mrpo.modeling.logprobs import forward_precision, response_logps
    from mrpo.modeling.models import cpu_threads_for, torch_threads

    collate = PreferenceCollator(pad_token_id)
    device = next(model.parameters()).device
    chosen, rejected = [], []
    model.eval()
    with torch.no_grad(), torch_threads(cpu_threads_for(model, device)):
        for i in range(0, len(dataset), batch_size):
            batch = collate(dataset.examples[i : i + batch_size])
            n = batch["ref_chosen_logps"].shape[0]
            with forward_precision(precision, device):
                logps = response_logps(
                    model,
                    batch["input_ids"].to(device),
                    batch["attention_mask"].to(device),
                    batch["response_mask"].to(device),
                )
            chosen.append(logps[:n].double().cpu().numpy())
            rejected.append(logps[n:].double().cpu().numpy())
    return np.concatenate(chosen), np.concatenate(rejected)


@dataclass
class MemberResult:
    member: Member
    correct: np.ndarray  # (test pairs,) 0/1 against the anchor
    scores: dict[str, float] = field(default_factory=dict)  # lm-eval, flat
    seconds: float = 0.0
    steps: int = 0
    final_loss: float = math.nan
    mlflow_run_id: str | None = None

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


# ---------------------------------------------------------------- the comparison


@dataclass
class Comparison:
    """Everything shared by the members: the tokenized splits with all references, the diagnostics, MLflow."""

    cfg: Config
    comparison_id: str
    out_dir: Path
    names: list[str]
    datasets: dict[str, PreferenceDataset]
    tokenizer: Any
    precision: torch.dtype
    members: list[Member]
    diagnostics_md: str
    lm_eval_tasks: list = field(default_factory=list)
    parent_run: Any = None  # mrpo.tracking.tracker.PipelineRun
    started: float = field(default_factory=time.perf_counter)

    @property
    def baseline(self) -> str:
        return baseline_label(self.names)


def start(cfg: Config, comparison_id: str | None = None, track: bool = True) -> Comparison:
    """Read and tokenize the splits once (all references), compute the diagnostics, open the MLflow parent
    run."""
    from mrpo.reporting.diagnostics import diagnose_scores, report_markdown
    from mrpo.training.setup import prepare_training

    c = cfg.compare
    names = [r.name for r in cfg.references]
    all_refs = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train, objective="mrpo", references=None, strategy="uniform", fixed_weights=None
        ),
    )
    setup = prepare_training(all_refs)
    if len(setup.datasets["test"]) == 0:
        raise ConfigError(
            "data.test_fraction: the test split has no trainable pairs; the comparison scores on it"
        )
    val = setup.datasets["val"]
    diagnostics_md = "_No validation pairs: no reference diagnostics._\n"
    if len(val):
        chosen = np.stack([e.ref_chosen_logps for e in val.examples])
        rejected = np.stack([e.ref_rejected_logps for e in val.examples])
        t = cfg.train
        diagnostics_md = report_markdown(
            diagnose_scores(
                names,
                chosen,
                rejected,
                epsilon=t.epsilon,
                adaptive_epsilon=t.adaptive_epsilon,
                fixed_weights=t.fixed_weights
                if t.fixed_weights and len(t.fixed_weights) == len(names)
                else None,
                window_size=t.window_size,
                seed=cfg.seed,
            )
        )
    members = comparison_members(names, c.seeds, c.strategies, c.dpo_references, c.multi_dpo)
    comparison_id = comparison_id or time.strftime("compare-%Y%m%d-%H%M%S")
    out_dir = Path(c.output_dir) / comparison_id
    out_dir.mkdir(parents=True, exist_ok=True)
    lm_eval_tasks = _plan_lm_eval(cfg, out_dir) if c.lm_eval_limit > 0 else []
    comparison = Comparison(
        cfg,
        comparison_id,
        out_dir,
        names,
        setup.datasets,
        setup.tokenizer,
        setup.precision,
        members,
        diagnostics_md,
        lm_eval_tasks,
    )
    if track:
        comparison.parent_run = _start_parent_run(comparison)
    log.info(
        "compare %s: %d members (%d configurations x %d seeds), %d training pairs per seed, %d test pairs",
        comparison_id,
        len(members),
        len({m.label for m in members}),
        len(c.seeds),
        min(c.train_pairs, len(setup.datasets["train"])),
        len(setup.datasets["test"]),
    )
    return comparison


def _plan_lm_eval(cfg: Config, out_dir: Path) -> list:
    from mrpo.evaluation.lmeval_tasks import plan_tasks, write_held_out_data

    planned = plan_tasks(cfg, out_dir / "lm_eval_data")
    write_held_out_data(cfg, planned)
    return planned


def run_member(comparison: Comparison, member: Member) -> MemberResult:
    """Train one member from the anchor on its seed's draw; score it on the test split against the anchor."""
    from transformers.trainer_callback import ProgressCallback

    from mrpo.core.weighting import make_strategy
    from mrpo.runtime import resolve_device, seed_everything
    from mrpo.training.setup import TrainingSetup, build_trainer, load_policy
    from mrpo.training.trainer import mean_training_loss

    started = time.perf_counter()
    cfg, ds = comparison.cfg, comparison.datasets
    with tempfile.TemporaryDirectory(prefix="mrpo-compare-") as tmp:
        mcfg = member_config(cfg, member, Path(tmp))
        refs = list(member.references)
        train = draw_pairs(select_references(ds["train"], refs), cfg.compare.train_pairs, member.seed)
        t = mcfg.train
        strategy = make_strategy(
            t.strategy, len(refs), fixed_weights=t.fixed_weights, window_size=t.window_size, seed=member.seed
        )
        strategy.fit(select_references(ds["val"], refs).reference_margins())
        # no validation set for the Trainer: nothing is evaluated during training, the test split is scored
        # below
        datasets = {"train": train, "val": PreferenceDataset([], refs), "test": ds["test"]}
        setup = TrainingSetup(
            refs, [], "", comparison.tokenizer, datasets, strategy, "compare", comparison.precision
        )
        seed_everything(member.seed)
        device = resolve_device(t.device)
        trainer = build_trainer(mcfg, setup, model=load_policy(mcfg, device))
        trainer.remove_callback(ProgressCallback)  # fifty progress bars say less than one line per member
        trainer.train()
        model = trainer.model
        pi_w, pi_l = policy_logps(model, ds["test"], comparison.tokenizer.pad_token_id, comparison.precision)
        anchor_w = np.array([e.ref_chosen_logps[0] for e in ds["test"].examples])
        anchor_l = np.array([e.ref_rejected_logps[0] for e in ds["test"].examples])
        correct = pair_correct(pi_w, pi_l, anchor_w, anchor_l, t.beta, comparison.precision)
        scores = _lm_eval_member(comparison, mcfg, model) if comparison.lm_eval_tasks else {}
        result = MemberResult(
            member,
            correct,
            scores,
            time.perf_counter() - started,
            int(trainer.state.global_step),
            mean_training_loss(trainer.state.log_history),
        )
    if comparison.parent_run is not None:
        result.mlflow_run_id = _log_member(comparison, mcfg, result)
    log.info(
        "compare: %s seed %d: test reward accuracy %.3f (%d steps, %.1fs)",
        member.label,
        member.seed,
        result.accuracy,
        result.steps,
        result.seconds,
    )
    return result


def _lm_eval_member(comparison: Comparison, mcfg: Config, model) -> dict[str, float]:
    """The evaluate stage's lm-eval tasks on `compare.lm_eval_limit` documents each, for the member's
    policy."""
    from mrpo.evaluation.lmeval import EvalSettings, flatten_results, lm_eval_model_args, run_lm_eval
    from mrpo.evaluation.preference import policy_reference
    from mrpo.training.setup import save_policy

    save_policy(model, comparison.tokenizer, Path(mcfg.train.output_dir), merge_lora=True)
    settings = dataclasses.replace(EvalSettings.from_config(mcfg), limit=mcfg.compare.lm_eval_limit)
    policy = policy_reference(mcfg)
    results = run_lm_eval(
        lm_eval_model_args(policy, settings.dtype), comparison.lm_eval_tasks, settings, policy.chat_template
    )
    return flatten_results(results, "policy")


def run_all(comparison: Comparison, run: Callable[[Comparison, Member], MemberResult] = run_member) -> list:
    return [run(comparison, m) for m in comparison.members]


# ---------------------------------------------------------------- summarising


def summarise(
    results: Sequence[MemberResult], baseline: str, resamples: int = 2000, confidence: float = 0.95
) -> list[dict[str, Any]]:
    """One row per configuration: accuracy with its bootstrap interval; the paired difference against
    `baseline` with interval and p-value (seeds present in both); lm-eval scores with t intervals and paired
    t-tests."""
    by_label: dict[str, dict[int, MemberResult]] = {}
    for r in results:
        by_label.setdefault(r.member.label, {})[r.member.seed] = r
    base = by_label.get(baseline, {})
    rows = []
    for i, (label, runs) in enumerate(by_label.items()):
        seeds = sorted(runs)
        matrix = np.stack([runs[s].correct for s in seeds])
        acc = bootstrap_summary(matrix, resamples, confidence, seed=i)
        row: dict[str, Any] = {
            "label": label,
            "seeds": len(seeds),
            "accuracy": acc["mean"],
            "accuracy_low": acc["low"],
            "accuracy_high": acc["high"],
            "seconds": float(np.mean([runs[s].seconds for s in seeds])),
        }
        paired = [s for s in seeds if s in base]
        if label != baseline and paired:
            diff = np.stack([runs[s].correct - base[s].correct for s in paired])
            d = bootstrap_summary(diff, resamples, confidence, seed=1000 + i)
            row.update({"diff": d["mean"], "diff_low": d["low"], "diff_high": d["high"], "p": d["p"]})
        for metric in sorted({k for s in seeds for k in runs[s].scores}):
            values = [runs[s].scores[metric] for s in seeds if metric in runs[s].scores]
            mean, low, high = t_interval(values, confidence)
            row.update({metric: mean, f"{metric} low": low, f"{metric} high": high})
            both = [s for s in paired if metric in runs[s].scores and metric in base[s].scores]
            if label != baseline and both:
                a = [runs[s].scores[metric] for s in both]
                b = [base[s].scores[metric] for s in both]
                _, dlow, dhigh = t_interval(np.subtract(a, b), confidence)
                row.update(
                    {
                        f"{metric} diff": float(np.mean(np.subtract(a, b))),
                        f"{metric} diff low": dlow,
                        f"{metric} diff high": dhigh,
                        f"{metric} p": paired_t_p_value(a, b),
                    }
                )
        rows.append(row)
    return rows


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _interval(row: dict, key: str, signed: bool = False) -> str:
    if key not in row:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    lo, hi = row.get(f"{key}_low", row.get(f"{key} low")), row.get(f"{key}_high", row.get(f"{key} high"))
    if lo is None or not math.isfinite(lo):
        return fmt.format(row[key])
    return f"{fmt.format(row[key])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def lm_eval_metrics(rows: Sequence[dict]) -> list[str]:
    return sorted({k for r in rows for k in r if k.startswith("policy/") and " " not in k})


def table_rows(
    rows: Sequence[dict], baseline: str, confidence: float = 0.95, compact: bool = False
) -> tuple[list[str], list[list[str]]]:
    """The table: configuration, seeds, accuracy [CI], difference vs baseline [CI], p, lm-eval scores [CI];
    `compact` (the terminal's) keeps one lm-eval metric per task."""
    metrics = lm_eval_metrics(rows)
    if compact:
        metrics = list({m.split("/")[1]: m for m in reversed(metrics)}.values())[
            ::-1
        ]  # the first of each task
    ci = f"{confidence:.0%} CI"
    header = ["configuration", "seeds", f"test reward acc [{ci}]", f"vs {baseline} [{ci}]", "p"]
    header += [f"{m.removeprefix('policy/')} [{ci}]" for m in metrics]
    body = []
    for r in rows:
        line = [r["label"], str(r["seeds"]), _interval(r, "accuracy")]
        line += ["(baseline)", ""] if r["label"] == baseline else [_interval(r, "diff", True), _f(r.get("p"))]
        line += [_interval(r, m) for m in metrics]
        body.append(line)
    return header, body


def lm_eval_diff_rows(rows: Sequence[dict], baseline: str) -> tuple[list[str], list[list[str]]]:
    """lm-eval scores' paired differences against the baseline: per metric 'diff [CI] p=...' (t over
    seeds)."""
    metrics = lm_eval_metrics(rows)
    header = ["configuration", *(f"{m.removeprefix('policy/')}: vs {baseline} [CI], p" for m in metrics)]
    body = []
    for r in rows:
        if r["label"] == baseline:
            continue
        cells = []
        for m in metrics:
            key = f"{m} diff"
            if key not in r:
                cells.append("-")
                continue
            lo, hi = r[f"{key} low"], r[f"{key} high"]
            ci = f" [{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) else ""
            cells.append(f"{r[key]:+.3f}{ci}, p={_f(r[f'{m} p'])}")
        body.append([r["label"], *cells])
    return header, body


def plot_comparison(rows: Sequence[dict], baseline: str, path: str | Path, confidence: float) -> None:
    """Two panels with error bars (the intervals): accuracy per configuration, its difference vs the
    baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    colors = [
        "tab:blue" if lbl.startswith("dpo") else "tab:green" if lbl == "multi_dpo" else "tab:orange"
        for lbl in labels
    ]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.42 * len(rows) + 1.6), sharey=True)
    for ax, key, title in (
        (axes[0], "accuracy", "held-out reward accuracy vs anchor"),
        (axes[1], "diff", f"difference vs {baseline} (paired)"),
    ):
        mean = np.array([r.get(key, np.nan) for r in rows], dtype=float)
        low = np.array([r.get(f"{key}_low", np.nan) for r in rows], dtype=float)
        high = np.array([r.get(f"{key}_high", np.nan) for r in rows], dtype=float)
        err = np.nan_to_num(np.vstack([mean - low, high - mean]))
        for i in range(len(rows)):  # points, not bars: an accuracy near 0.5 is not a length from 0
            ax.errorbar(mean[i], y[i], xerr=err[:, i : i + 1], fmt="o", color=colors[i], capsize=3)
        ax.axvline(0.5 if key == "accuracy" else 0.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{title}, mean and {confidence:.0%} CI", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def member_rows(results: Sequence[MemberResult]) -> list[dict[str, Any]]:
    return [
        {
            "label": r.member.label,
            "seed": r.member.seed,
            ACCURACY: r.accuracy,
            "steps": r.steps,
            "train_loss": r.final_loss,
            "seconds": round(r.seconds, 2),
            **r.scores,
            "mlflow_run_id": r.mlflow_run_id,
        }
        for r in results
    ]


def report(comparison: Comparison, results: Sequence[MemberResult], command: str = "mrpo compare") -> dict:
    """Write comparison.md / .csv / .png and members.csv, copy the CSV and PNG for `dvc plots`, log them on
    the parent MLflow run; returns {"rows", "table" (text), "paths", "wall_s"}."""
    import pandas as pd

    c = comparison.cfg.compare
    rows = summarise(results, comparison.baseline, c.bootstrap, c.confidence)
    header, body = table_rows(rows, comparison.baseline, c.confidence)
    wall = time.perf_counter() - comparison.started
    out = comparison.out_dir
    paths = {
        "md": out / "comparison.md",
        "csv": out / "comparison.csv",
        "members": out / "members.csv",
        "png": out / "comparison.png",
    }
    write_text_atomically(paths["csv"], pd.DataFrame(rows).to_csv(index=False))
    write_text_atomically(paths["members"], pd.DataFrame(member_rows(results)).to_csv(index=False))
    plot_comparison(rows, comparison.baseline, paths["png"], c.confidence)
    n_train = min(c.train_pairs, len(comparison.datasets["train"]))
    lm = (
        f"lm-eval: {', '.join(t.name for t in comparison.lm_eval_tasks)} on {c.lm_eval_limit} "
        "documents per task per member (t intervals over seeds, paired t-test p)."
        if comparison.lm_eval_tasks
        else "lm-eval: skipped (compare.lm_eval_limit is 0); "
        "run the evaluate stage on a chosen configuration."
    )
    seeds = ", ".join(map(str, sorted({m.seed for m in comparison.members})))
    md = [
        f"# Comparison `{comparison.comparison_id}`\n",
        f"Command: `{command}`. Wall time {wall / 60:.1f} min for {len(results)} members.\n",
        f"Each configuration trained once per seed ({seeds}) "
        f"on {n_train} training pairs drawn per seed, {c.num_epochs:g} epoch(s), from the anchor "
        f"`{comparison.names[0]}`; scored on all {len(comparison.datasets['test'])} test pairs. "
        "Test reward accuracy is against the anchor: the share of test pairs whose implicit reward "
        "beta * (log pi - log pi_anchor) prefers the chosen response.\n",
        f"Intervals: {c.confidence:.0%} two-level bootstrap ({c.bootstrap} resamples of seeds, "
        "then of test pairs). "
        f"Difference: paired with `{comparison.baseline}` by seed and test pair; "
        f"p is the two-sided bootstrap p-value that it is 0. {lm}\n",
        markdown_table(header, body),
        *(
            [
                "\nlm-eval scores, paired with the baseline by seed:\n",
                markdown_table(*lm_eval_diff_rows(rows, comparison.baseline)),
            ]
            if lm_eval_metrics(rows)
            else []
        ),
        "\n![comparison](comparison.png)\n",
        "\n## Reference diagnostics (before training)\n",
        comparison.diagnostics_md,
        "\n## What this does and does not show\n",
        "It shows how each objective and weighting did on this data, task and reference set, with the "
        "uncertainty from training draws and the finite test set. It does not show the result transfers to "
        "other data, references or hyperparameters (all configurations share the `train` settings, untuned), "
        "and the references, data split and scores are those of params.yaml's `seed`, not re-drawn per seed. "
        "Many configurations are compared with one baseline: "
        "a p-value near 0.05 among ten is weak evidence.\n",
    ]
    write_text_atomically(paths["md"], "\n".join(md))
    for src, dest in ((paths["csv"], c.plots_file), (paths["png"], c.image_file)):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    if comparison.parent_run is not None:
        _finish_parent_run(comparison, rows, paths, wall)
    terminal = text_table(*table_rows(rows, comparison.baseline, c.confidence, compact=True))
    return {"rows": rows, "table": terminal, "paths": paths, "wall_s": wall}


def compare(cfg: Config, *, track: bool = True, comparison_id: str | None = None) -> dict:
    """`mrpo compare`: start, every member in turn, the report; prints the table."""
    comparison = start(cfg, comparison_id, track)
    results = run_all(comparison)
    out = report(comparison, results)
    print(out["table"], end="")
    print(f"comparison {comparison.comparison_id}: {out['paths']['md']} ({out['wall_s'] / 60:.1f} min)")
    return out


# ---------------------------------------------------------------- MLflow


def _start_parent_run(comparison: Comparison):
    from mrpo.tracking import tracker as tracking

    cfg = comparison.cfg
    uri = tracking.tracking_uri(cfg)
    client = tracking.client_for(uri)
    experiment_id = tracking.ensure_experiment(client, cfg.tracking.experiment, uri)
    run = client.create_run(
        experiment_id,
        run_name=comparison.comparison_id,
        tags={"mrpo.sweep": comparison.comparison_id, "mrpo.kind": "compare"},
    )
    parent = tracking.PipelineRun(run.info.run_id, experiment_id, uri)
    tracking.log_params(
        parent,
        {f"compare.{k}": v for k, v in dataclasses.asdict(cfg.compare).items()}
        | {"reference_set.names": comparison.names, "seed": cfg.seed, "members": len(comparison.members)},
    )
    return parent


def _log_member(comparison: Comparison, mcfg: Config, result: MemberResult) -> str:
    from mrpo.tracking import tracker as tracking

    parent = comparison.parent_run
    client = tracking.client_for(parent.tracking_uri)
    m = result.member
    run = client.create_run(
        parent.experiment_id,
        run_name=f"{comparison.comparison_id}-{m.label}-s{m.seed}",
        tags={
            "mlflow.parentRunId": parent.run_id,
            "mrpo.sweep": comparison.comparison_id,
            "mrpo.sweep_label": m.label,
            "mrpo.kind": "compare-member",
        },
    )
    child = tracking.PipelineRun(run.info.run_id, parent.experiment_id, parent.tracking_uri)
    t = mcfg.train
    tracking.log_params(
        child,
        {
            "train.objective": t.objective,
            "train.strategy": t.strategy,
            "reference_set.names": list(m.references),
            "seed": m.seed,
            "train.beta": t.beta,
            "train.num_epochs": t.num_epochs,
            "compare.train_pairs": mcfg.compare.train_pairs,
        },
    )
    tracking.log_metrics(
        child,
        {
            f"compare/{ACCURACY}": result.accuracy,
            "compare/steps": result.steps,
            "compare/seconds": result.seconds,
            "final/train_loss": result.final_loss,
            **result.scores,
        },
    )
    tracking.finish_run(child)
    return child.run_id


def _finish_parent_run(comparison: Comparison, rows: list[dict], paths: dict, wall: float) -> None:
    from mrpo.tracking import tracker as tracking

    parent = comparison.parent_run
    metrics = {"compare/wall_s": wall}
    for r in rows:
        for key in ("accuracy", "accuracy_low", "accuracy_high", "diff", "diff_low", "diff_high", "p"):
            if key in r:
                metrics[f"{r['label'].replace(':', '.')}/{key}"] = r[key]
    tracking.log_metrics(parent, metrics)
    client = tracking.client_for(parent.tracking_uri)
    for path in paths.values():
        client.log_artifact(parent.run_id, str(path), "comparison")
    tracking.finish_run(parent)
