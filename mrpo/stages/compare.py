"""`mrpo compare`: does multi-reference help on this data? A seeded comparison with intervals, in one process.

Configurations (params.yaml `compare`): DPO with each reference alone, MRPO with each weighting strategy over
all references, and multi_dpo (uniform weights); each trained once per seed. A seed draws its own
`compare.train_pairs` training pairs (the data-scarce setting) and orders them; every configuration of that
seed trains on the same draw, from the anchor, for `compare.num_epochs` epochs, with the other `train.*`
settings. Nothing is re-scored: the stored score files of the pipeline are reused, so the zoo, the data
split and the scores are those of `seed` in params.yaml, and a comparison seed varies the training draw and
the training order only.

Each member is scored on the whole test split against the anchor (the standard DPO reward accuracy, as the
evaluate stage: mrpo.core.metrics.reward_accuracy), pair by pair; mrpo.core.stats turns the
(seeds x pairs) matrices into intervals and paired differences against DPO with the anchor. With
`compare.lm_eval_limit` > 0 each member also runs the evaluate stage's lm-eval tasks on that many documents.

Outputs in `<compare.output_dir>/<id>/`: comparison.md (the tables and the reference diagnostics),
comparison.csv (per configuration), members.csv (per member), comparison.png (mrpo.reporting.comparison);
a copy of the CSV and PNG at `compare.plots_file` / `compare.image_file` for `dvc plots`; an MLflow parent
run (kind `compare`, tag mrpo.sweep=<id>) with one child run per member (kind `compare-member`), recorded
under the names a pipeline run uses (mrpo.tracking.names).
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
from mrpo.core.weighting import STRATEGIES
from mrpo.data.preference import PreferenceCollator, PreferenceDataset
from mrpo.errors import ConfigError
from mrpo.reporting.comparison import diagnostics_markdown, write_report
from mrpo.tracking.comparison import finish_comparison_run, log_member, start_comparison_run
from mrpo.tracking.tracker import NullTracker

log = logging.getLogger("mrpo")

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
    train_pairs: int = 0

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
    prepared_digest: str = ""
    source: str = "mrpo compare"  # the command, for every run's MLflow Source
    parent_run: NullTracker = field(default_factory=NullTracker)  # a Tracker when tracked
    lineage_tags: dict[str, str] = field(default_factory=dict)  # what every member's run shares
    started: float = field(default_factory=time.perf_counter)

    @property
    def baseline(self) -> str:
        return baseline_label(self.names)


def start(
    cfg: Config, comparison_id: str | None = None, track: bool = True, source: str = "mrpo compare"
) -> Comparison:
    """Read and tokenize the splits once (all references), compute the diagnostics, open the MLflow parent
    run."""
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
    members = comparison_members(names, c.seeds, c.strategies, c.dpo_references, c.multi_dpo)
    comparison_id = comparison_id or time.strftime("compare-%Y%m%d-%H%M%S")
    out_dir = Path(c.output_dir) / comparison_id
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(
        cfg,
        comparison_id,
        out_dir,
        names,
        setup.datasets,
        setup.tokenizer,
        setup.precision,
        members,
        diagnostics_markdown(cfg, names, setup.datasets["val"]),
        _plan_lm_eval(cfg, out_dir) if c.lm_eval_limit > 0 else [],
        setup.prepared_digest,
        source,
    )
    if track:
        start_comparison_run(comparison)
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
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mrpo-compare-") as tmp:
        mcfg = member_config(comparison.cfg, member, Path(tmp))
        trainer, train_pairs = _train_member(comparison, mcfg, member)
        result = _score_member(comparison, mcfg, member, trainer)
        result.train_pairs = train_pairs
        result.seconds = time.perf_counter() - started
    result.mlflow_run_id = log_member(comparison, mcfg, result)
    log.info(
        "compare: %s seed %d: test reward accuracy %.3f (%d steps, %.1fs)",
        member.label,
        member.seed,
        result.accuracy,
        result.steps,
        result.seconds,
    )
    return result


def _train_member(comparison: Comparison, mcfg: Config, member: Member):
    """The member's trainer after training on its seed's draw of `compare.train_pairs` pairs, its
    strategy fitted on the validation pairs as the train stage fits it; (trainer, pairs trained on)."""
    from transformers.trainer_callback import ProgressCallback

    from mrpo.core.weighting import make_strategy
    from mrpo.runtime import resolve_device, seed_everything
    from mrpo.training.policy import load_policy
    from mrpo.training.setup import TrainingSetup, build_trainer

    ds, refs, t = comparison.datasets, list(member.references), mcfg.train
    train = draw_pairs(select_references(ds["train"], refs), mcfg.compare.train_pairs, member.seed)
    strategy = make_strategy(
        t.strategy, len(refs), fixed_weights=t.fixed_weights, window_size=t.window_size, seed=member.seed
    )
    strategy.fit(select_references(ds["val"], refs).reference_margins())
    # no validation set for the Trainer: nothing is evaluated during training, the test split is scored after
    datasets = {"train": train, "val": PreferenceDataset([], refs), "test": ds["test"]}
    setup = TrainingSetup(
        refs, [], "", comparison.tokenizer, datasets, strategy, "compare", comparison.precision
    )
    seed_everything(member.seed)
    trainer = build_trainer(mcfg, setup, model=load_policy(mcfg, resolve_device(t.device)))
    trainer.remove_callback(ProgressCallback)  # fifty progress bars say less than one line per member
    trainer.train()
    return trainer, len(train)


def _score_member(comparison: Comparison, mcfg: Config, member: Member, trainer) -> MemberResult:
    """Per test pair, whether the trained policy prefers the chosen response against the anchor; lm-eval."""
    from mrpo.training.trainer import mean_training_loss

    test, model = comparison.datasets["test"], trainer.model
    pi_w, pi_l = policy_logps(model, test, comparison.tokenizer.pad_token_id, comparison.precision)
    anchor_w = np.array([e.ref_chosen_logps[0] for e in test.examples])
    anchor_l = np.array([e.ref_rejected_logps[0] for e in test.examples])
    correct = pair_correct(pi_w, pi_l, anchor_w, anchor_l, mcfg.train.beta, comparison.precision)
    scores = _lm_eval_member(comparison, mcfg, model) if comparison.lm_eval_tasks else {}
    return MemberResult(
        member,
        correct,
        scores,
        steps=int(trainer.state.global_step),
        final_loss=mean_training_loss(trainer.state.log_history),
    )


def _lm_eval_member(comparison: Comparison, mcfg: Config, model) -> dict[str, float]:
    """The evaluate stage's lm-eval tasks on `compare.lm_eval_limit` documents each, for the member's
    policy."""
    from mrpo.evaluation.lmeval import EvalSettings, flatten_results, lm_eval_model_args, run_lm_eval
    from mrpo.evaluation.preference import policy_reference
    from mrpo.training.policy import save_policy

    save_policy(model, comparison.tokenizer, Path(mcfg.train.output_dir), merge_lora=True)
    settings = dataclasses.replace(EvalSettings.from_config(mcfg), limit=mcfg.compare.lm_eval_limit)
    policy = policy_reference(mcfg)
    results = run_lm_eval(
        lm_eval_model_args(policy, settings.dtype), comparison.lm_eval_tasks, settings, policy.chat_template
    )
    return flatten_results(results, "policy")


def run_all(comparison: Comparison, run: Callable[[Comparison, Member], MemberResult] = run_member) -> list:
    return [run(comparison, m) for m in comparison.members]


def report(comparison: Comparison, results: Sequence[MemberResult], command: str = "mrpo compare") -> dict:
    """The report files (mrpo.reporting.comparison.write_report), logged on the parent run, which ends;
    returns {"rows", "table" (text), "paths", "wall_s"}."""
    out = write_report(comparison, results, command)
    finish_comparison_run(comparison, out["rows"], out["paths"], out["wall_s"])
    return out


def compare(cfg: Config, *, track: bool = True, comparison_id: str | None = None) -> dict:
    """`mrpo compare`: start, every member in turn, the report; prints the table."""
    comparison = start(cfg, comparison_id, track)
    try:
        out = report(comparison, run_all(comparison))
    except BaseException:
        comparison.parent_run.end("FAILED")
        raise
    print(out["table"], end="")
    print(f"comparison {comparison.comparison_id}: {out['paths']['md']} ({out['wall_s'] / 60:.1f} min)")
    return out
