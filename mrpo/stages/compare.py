"""`mrpo compare`: does multi-reference help on this data? A seeded comparison with intervals, in one process.

Configurations (params.yaml `compare`): DPO with each reference alone, MRPO with each weighting strategy over
all references, and multi_dpo (uniform weights); each trained once per seed, from the anchor, on the seed's
own draw of `compare.train_pairs` training pairs (shared by every configuration of that seed), with the other
`train.*` settings. The pipeline's zoo, split and stored scores are reused (those of params.yaml's `seed`).

Each member is scored on the whole test split against the anchor, pair by pair (the evaluate stage's reward
accuracy, mrpo.core.metrics), and with `compare.lm_eval_limit` > 0 on the evaluate stage's lm-eval tasks; so
is the untrained policy (the anchor). mrpo.reporting.comparison turns these into intervals and paired
differences against DPO with the anchor, Holm-adjusted over configurations x metrics.

Outputs in `<compare.output_dir>/<id>/`: comparison.md, comparison.csv, members.csv, comparison.png (rewritten
after every member, so a stopped comparison keeps the members done), members/ (each member's result as it
finishes: run again with the same id, a stopped comparison trains only the members it lacks,
mrpo.evaluation.members), compare.log (the libraries' logs);
the CSV and PNG copied to `compare.plots_file` / `compare.image_file`; an MLflow parent run (kind `compare`)
with one child run per member (kind `compare-member`).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mrpo.config.schema import Config
from mrpo.core.weighting import STRATEGIES
from mrpo.data.preference import PreferenceDataset
from mrpo.data.selection import draw_pairs, select_references
from mrpo.errors import ConfigError
from mrpo.evaluation.held_out import held_out_correct
from mrpo.evaluation.members import Member, MemberResult, fingerprint, inputs_digest, keep, kept
from mrpo.reporting.comparison import diagnostics_markdown, write_report
from mrpo.reporting.console import quiet_libraries
from mrpo.tracking.comparison import adopt_member, finish_comparison_run, log_member, start_comparison_run
from mrpo.tracking.tracker import NullTracker

log = logging.getLogger("mrpo")

KEPT_NOTE = ", kept from an earlier run"
DEFAULT_STRATEGIES = tuple(s for s in STRATEGIES if s != "fixed")  # fixed needs weights: ask for it by name


# ---------------------------------------------------------------- what runs


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
    inputs: str = ""  # the splits' and stored scores' digest (mrpo.evaluation.members.inputs_digest)
    source: str = "mrpo compare"  # the command, for every run's MLflow Source
    parent_run: NullTracker = field(default_factory=NullTracker)  # a Tracker when tracked
    lineage_tags: dict[str, str] = field(default_factory=dict)  # what every member's run shares
    untrained: MemberResult | None = None  # the policy before training, scored as the members are
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

    if track:
        from mrpo.tracking.health import check_tracking

        check_tracking(cfg, "compare")  # before any model loads: an unreachable server costs seconds
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
        inputs_digest(setup.prepared_digest, setup.datasets),
        source,
    )
    untrained = Member(f"untrained:{names[0]}", 0, "none", "none", (names[0],))
    comparison.untrained = _kept_or_run(
        comparison, untrained, cfg, lambda: score_untrained(comparison, untrained)
    )
    if track:
        start_comparison_run(comparison)
    log.info("%s", describe(comparison))
    return comparison


def describe(comparison: Comparison) -> str:
    """The comparison in one line: members, configurations, seeds, pairs, lm-eval."""
    c, members = comparison.cfg.compare, comparison.members
    labels = list(dict.fromkeys(m.label for m in members))
    lm = (
        f"lm-eval {len(comparison.lm_eval_tasks)} task(s) x {c.lm_eval_limit} docs"
        if comparison.lm_eval_tasks
        else "no lm-eval"
    )
    return (
        f"compare {comparison.comparison_id}: {len(members)} members = {len(labels)} configurations "
        f"({', '.join(labels)}) x {len(c.seeds)} seeds ({', '.join(map(str, c.seeds))}); "
        f"{min(c.train_pairs, len(comparison.datasets['train']))} training pairs per seed, "
        f"{c.num_epochs:g} epoch(s); {len(comparison.datasets['test'])} test pairs; {lm}; "
        f"baseline {comparison.baseline}"
    )


def score_untrained(comparison: Comparison, member: Member) -> MemberResult:
    """The policy before training (the anchor, as load_policy makes it) scored as a member: test pairs
    against the anchor; lm-eval through the evaluate stage's anchor cache (the same documents)."""
    from mrpo.evaluation.lmeval import EvalSettings, cached_lm_eval, flatten_results
    from mrpo.runtime import resolve_device
    from mrpo.training.setup import load_policy

    cfg, test = comparison.cfg, comparison.datasets["test"]
    model = load_policy(cfg, resolve_device(cfg.train.device))
    pad, precision = comparison.tokenizer.pad_token_id, comparison.precision
    correct = held_out_correct(model, test, pad, cfg.train.beta, precision)
    scores = {}
    if comparison.lm_eval_tasks:
        settings = dataclasses.replace(EvalSettings.from_config(cfg), limit=cfg.compare.lm_eval_limit)
        cache = Path(cfg.evaluate.cache_dir)
        chat = cfg.anchor.chat_template
        results, _ = cached_lm_eval(cfg.anchor, comparison.lm_eval_tasks, settings, cache, chat)
        scores = flatten_results(results, "policy")  # the members' names, so the report lines them up
    return MemberResult(member, correct, scores)


def _kept_or_run(
    comparison: Comparison, member: Member, settings: Config, run: Callable[[], MemberResult]
) -> MemberResult:
    """The result an earlier run of this comparison kept for `member` with the same settings and inputs,
    else `run()`'s, kept as soon as it is there."""
    key = fingerprint(settings, member, comparison.inputs)
    result = kept(comparison.out_dir, member, key)
    if result is None:
        result = run()
        keep(comparison.out_dir, result, key)
    return result


def _plan_lm_eval(cfg: Config, out_dir: Path) -> list:
    from mrpo.evaluation.lmeval_tasks import plan_tasks, write_held_out_data

    planned = plan_tasks(cfg, out_dir / "lm_eval_data")
    write_held_out_data(cfg, planned)
    return planned


def run_member(comparison: Comparison, member: Member) -> MemberResult:
    """Train one member from the anchor on its seed's draw; score it on the test split against the anchor.
    A result kept by an earlier run of the comparison (same settings and inputs) is reused instead."""
    settings = member_config(comparison.cfg, member, Path("member"))
    result = _kept_or_run(comparison, member, settings, lambda: _run_member(comparison, member))
    if result.reused:
        adopt_member(comparison, result.mlflow_run_id)
    log.info("compare: %s", member_line(result))
    return result


def _run_member(comparison: Comparison, member: Member) -> MemberResult:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mrpo-compare-") as tmp:
        mcfg = member_config(comparison.cfg, member, Path(tmp))
        trainer, train_pairs = _train_member(comparison, mcfg, member)
        result = _score_member(comparison, mcfg, member, trainer)
        result.train_pairs = train_pairs
        result.seconds = time.perf_counter() - started
    result.mlflow_run_id = log_member(comparison, mcfg, result)
    return result


def member_line(result: MemberResult) -> str:
    m = result.member
    scores = "".join(f", {k.removeprefix('policy/')} {v:.3f}" for k, v in sorted(result.scores.items()))
    return (
        f"{m.label} seed {m.seed}: test reward acc vs anchor {result.accuracy:.3f}{scores} "
        f"({result.steps} steps, {result.seconds:.1f}s{KEPT_NOTE if result.reused else ''})"
    )


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
    from mrpo.training.progress import mean_training_loss

    test, model = comparison.datasets["test"], trainer.model
    pad, precision = comparison.tokenizer.pad_token_id, comparison.precision
    correct = held_out_correct(model, test, pad, mcfg.train.beta, precision)
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
    return run_members(comparison, lambda line: None, run)


def run_members(
    comparison: Comparison,
    say: Callable[[str], None],
    run: Callable[[Comparison, Member], MemberResult] = run_member,
) -> list[MemberResult]:
    """Every member in turn, one line each. The report is rewritten after each member, so a comparison that
    stops (an error, Ctrl-C, a deadline) keeps a correct report of the members done; the final one replaces
    it."""
    results: list[MemberResult] = []
    total = len(comparison.members)
    for i, member in enumerate(comparison.members, 1):
        results.append(run(comparison, member))
        say(f"[{i}/{total}] {member_line(results[-1])}")
        if i < total:
            write_report(comparison, results, f"mrpo compare (partial: {i} of {total} members done)")
    return results


def report(comparison: Comparison, results: Sequence[MemberResult], command: str = "mrpo compare") -> dict:
    """The report files (mrpo.reporting.comparison.write_report), logged on the parent run, which ends;
    returns {"rows", "table" (text), "paths", "wall_s"}."""
    out = write_report(comparison, results, command)
    finish_comparison_run(comparison, out["rows"], out["paths"], out["wall_s"])
    return out


def compare(cfg: Config, *, track: bool = True, comparison_id: str | None = None) -> dict:
    """`mrpo compare`: start, every member in turn (one line each), the report; prints the tables. The
    libraries' logs go to compare.log in the comparison's folder; their warnings are shown once, counted."""
    comparison_id = comparison_id or time.strftime("compare-%Y%m%d-%H%M%S")
    with quiet_libraries(Path(cfg.compare.output_dir) / comparison_id / "compare.log") as console:
        comparison = start(cfg, comparison_id, track)
        console.say(f"{describe(comparison)}; library logs: {console.log_path}")
        try:
            results = run_members(comparison, console.say)
            out = report(comparison, results)
        except BaseException:
            comparison.parent_run.end("FAILED")
            raise
    print("\n".join(console.warning_lines() + [out["table"]]))
    print(f"comparison {comparison.comparison_id}: {out['paths']['md']} ({out['wall_s'] / 60:.1f} min)")
    return out
