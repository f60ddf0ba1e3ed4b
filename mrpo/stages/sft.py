"""The `sft` stage: supervised fine-tuning of `sft.model` on (prompt, response) rows (mrpo.data.sft), the loss
on the response tokens only (mrpo.training.sft).

Outputs (paths from params.yaml `sft`): the model directory (safetensors, tokenizer, a model card; LoRA merged
when sft.lora.merge) that `references.<name>.model` can name like any local model, so `score@<name>` scores it
and an anchor pointing at it is the SFT-then-DPO recipe; the metrics JSON; the per-step loss CSV for `dvc
plots`. All are written beside their final paths and swapped in together (mrpo.staging), so a failed run
leaves the previous set. An interrupted run resumes from its newest sealed checkpoint in sft.checkpoint_dir
(mrpo.training.checkpoints); one MLflow run records it. With sft.enabled false the stage writes only a marker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from mrpo.config.schema import Config
from mrpo.io import write_json_atomically
from mrpo.preflight import check_stage
from mrpo.reporting.plots import write_csv
from mrpo.runtime import resolve_device, seed_everything
from mrpo.staging import StagedOutputs, recover, refuse_directories
from mrpo.training.checkpoints import RunState, resume_point, write_run_state
from mrpo.training.policy import is_main_process

log = logging.getLogger("mrpo")

DISABLED_MARKER = "SFT_DISABLED"
CARD = "README.md"
PLOT_COLUMNS = ["step", "loss", "learning_rate"]
SFT_RECORD = "sft_metrics.json"  # the headline metrics, also beside the model


def sft_outputs(cfg: Config) -> dict[Path, str]:
    """Every output the stage replaces, all together (see mrpo.staging), and its key."""
    s = cfg.sft
    return {
        Path(s.output_dir): "sft.output_dir",
        Path(s.metrics_file): "sft.metrics_file",
        Path(s.plots_file): "sft.plots_file",
    }


def sft(cfg: Config, *, callbacks: Sequence[TrainerCallback] = (), track: bool = True) -> dict[str, Any]:
    """Run the sft stage end to end; returns the metrics it wrote to `sft.metrics_file`."""
    check_stage(cfg, "sft")
    if is_main_process():
        outputs = sft_outputs(cfg)
        recover(outputs)  # a run killed while swapping its outputs in: the previous set back
        refuse_directories({p: key for p, key in outputs.items() if p != Path(cfg.sft.output_dir)})
    if not cfg.sft.enabled:
        return _write_disabled(cfg)
    return _fine_tune(cfg, callbacks, track)


def _write_disabled(cfg: Config) -> dict[str, Any]:
    s = cfg.sft
    metrics = {"enabled": False}
    with StagedOutputs() as staged:
        out = staged.directory(s.output_dir)
        (out / DISABLED_MARKER).write_text("sft.enabled is false in params.yaml; no model was fine-tuned\n")
        write_json_atomically(staged.file(s.metrics_file), metrics)
        write_csv(staged.file(s.plots_file), PLOT_COLUMNS, [])
        staged.commit()
    log.info("sft disabled: wrote %s", Path(s.output_dir) / DISABLED_MARKER)
    return metrics


def _fine_tune(cfg: Config, callbacks: Sequence[TrainerCallback], track: bool) -> dict[str, Any]:
    from mrpo.tracking.callback import MLflowStepCallback
    from mrpo.tracking.tracker import tracked_run
    from mrpo.training.sft import build_sft_trainer

    s = cfg.sft
    main = is_main_process()  # under torchrun every rank trains; rank 0 alone records and writes
    started = time.perf_counter()
    seed_everything(cfg.seed)
    ref, tokenizer, examples, identity, fingerprint = _examples(cfg)
    Path(s.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    start = resume_point(s.checkpoint_dir, fingerprint, clean=main)
    with tracked_run(cfg, enabled=track and main, **_run_start(cfg, start.mlflow_run_id)) as run:
        if main:
            write_run_state(s.checkpoint_dir, RunState(fingerprint, run.run_id))
        _log_inputs(cfg, run, fingerprint, identity)
        device = resolve_device(s.device)
        trainer = build_sft_trainer(
            cfg, _load_model(cfg, ref), tokenizer, examples, device, [*callbacks, MLflowStepCallback(run)]
        )
        if start.checkpoint:
            log.info("sft: resuming from %s", start.checkpoint)
        trainer.train(resume_from_checkpoint=str(start.checkpoint) if start.checkpoint else None)
        metrics = _metrics(trainer, examples, start.checkpoint is not None)
        if main:
            _write_outputs(cfg, trainer, tokenizer, metrics, identity)
        runtime = time.perf_counter() - started
        run.log_metrics({**_numbers(metrics), "runtime_s": runtime}, step=metrics["steps"])
        for path in (s.metrics_file, s.plots_file):
            run.log_artifact(path, "sft")
        if main:
            write_run_state(s.checkpoint_dir, RunState(fingerprint, run.run_id, completed=True))
    log.info(
        "sft: done in %.0fs, %d steps; loss %.4f -> %.4f; model in %s",
        runtime,
        metrics["steps"],
        metrics["first_loss"],
        metrics["final_loss"],
        s.output_dir,
    )
    return metrics


def _examples(cfg: Config):
    """The rows tokenized for sft.model (the reference it loads as, its tokenizer), the model's identity and
    the run's fingerprint."""
    from mrpo.config.inputs import check_declared
    from mrpo.data.sft import sft_rows
    from mrpo.modeling.models import load_tokenizer, model_fingerprint
    from mrpo.training import sft as training

    check_declared(cfg, "sft")  # under DVC: dvc.yaml lists sft.data.paths and a local sft.model as deps
    rows = sft_rows(cfg)  # before loading anything: a bad row fails in seconds
    ref = training.sft_reference(cfg)
    with training.naming_sft_model():
        tokenizer = load_tokenizer(ref)
        identity = model_fingerprint(ref)
    template = training.uses_chat_template(cfg, tokenizer)
    examples = training.encode_rows(cfg, rows, tokenizer, template)
    fingerprint = training.sft_fingerprint(cfg, identity, training.examples_digest(examples))
    log.info(
        "sft: %s on %d rows (%s%s; %d longer than sft.max_length left out), chat template %s",
        cfg.sft.model,
        len(examples),
        cfg.sft.data.source,
        f", the first {cfg.sft.data.skip_rows} of each file skipped" if cfg.sft.data.skip_rows else "",
        examples.skipped,
        template,
    )
    return ref, tokenizer, examples, identity, fingerprint


def _load_model(cfg: Config, ref):
    from mrpo.training.policy import load_trainable
    from mrpo.training.sft import naming_sft_model

    with naming_sft_model():
        return load_trainable(ref, cfg.sft.lora, dropout_off=False, stage="sft")


def _run_start(cfg: Config, resume_run_id: str | None) -> dict[str, Any]:
    """`start_run`'s arguments: one run of kind sft, named after what it fine-tunes (with a short hash of the
    settings, as the pipeline runs are), tagged like the train stage's."""
    from mrpo.tracking import lineage, names

    s = cfg.sft
    model = Path(s.model).name or s.model
    digest = names.params_digest(sft_params(cfg))
    tags = {
        "mrpo.stage": "sft",
        "mrpo.seed": str(cfg.seed),
        "mrpo.sft.model": s.model,
        "mrpo.data_source": s.data.source,
        **lineage.launch_tags(),
        **lineage.git_tags(lineage.git_state(".", lineage.pipeline_outputs("."))),
    }
    return {
        "kind": "sft",
        "name": f"sft-{model}-{s.data.source}-s{cfg.seed}-{digest[:6]}",
        "source": "mrpo sft",
        "tags": tags,
        "description": f"Supervised fine-tuning of {s.model} on {s.data.source} rows "
        f"({'LoRA' if s.lora.enabled else 'full'}); seed {cfg.seed}; model in {s.output_dir}.",
        "resume_run_id": resume_run_id,
    }


def sft_params(cfg: Config) -> dict[str, Any]:
    """The run's params: every sft.* value and the seed."""
    from mrpo.tracking.names import run_params

    return {k: v for k, v in run_params(cfg).items() if k.startswith("sft.") or k == "seed"}


def _log_inputs(cfg: Config, run, fingerprint: str, identity: dict[str, str]) -> None:
    from mrpo.tracking import names

    params = sft_params(cfg)
    run.log_params(params)
    run.set_tags(
        {
            names.PARAMS_DIGEST: names.params_digest(params),
            "mrpo.sft_fingerprint": fingerprint,
            **{f"mrpo.sft.model_{k}": v for k, v in identity.items()},
        }
    )


def _metrics(trainer, examples, resumed: bool) -> dict[str, Any]:
    from mrpo.training.progress import mean_training_loss
    from mrpo.training.sft import loss_curve

    curve = loss_curve(trainer.state.log_history)
    return {
        "first_loss": curve[0]["loss"] if curve else None,
        "final_loss": curve[-1]["loss"] if curve else None,
        "train_loss": mean_training_loss(trainer.state.log_history),
        "steps": int(trainer.state.global_step),
        "train_rows": len(examples),
        "skipped_rows": examples.skipped,
        "chat_template": examples.chat_template,
        "resumed": resumed,
    }


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v is not None}


def _write_outputs(
    cfg: Config, trainer, tokenizer, metrics: dict[str, Any], identity: dict[str, str]
) -> None:
    """The model (finite weights only; LoRA merged when sft.lora.merge) with its card, the metrics and the
    loss curve, staged and swapped in together: a failure anywhere before leaves every previous output."""
    from mrpo.training.policy import check_finite_weights, save_policy
    from mrpo.training.sft import loss_curve

    s = cfg.sft
    check_finite_weights(trainer.model, s.output_dir)
    record = {k: v for k, v in metrics.items() if k != "resumed"}  # the same inputs write the same bytes
    with StagedOutputs() as staged:
        out = staged.directory(s.output_dir)
        save_policy(trainer.model, tokenizer, out, merge_lora=s.lora.merge, key="sft.output_dir")
        (out / CARD).write_text(model_card(cfg, record, identity), encoding="utf-8")
        write_json_atomically(out / SFT_RECORD, record)
        write_json_atomically(staged.file(s.metrics_file), record)
        write_csv(staged.file(s.plots_file), PLOT_COLUMNS, loss_curve(trainer.state.log_history))
        staged.commit()


def model_card(cfg: Config, metrics: dict[str, Any], identity: dict[str, str]) -> str:
    """A short model card: what was fine-tuned on what, how, and how the loss went."""
    s = cfg.sft
    files = ", ".join(s.data.paths) or f"{cfg.data.output_dir}/train.parquet"
    how = "every weight trained"
    if s.lora.enabled:
        how = f"LoRA r={s.lora.r}, alpha {s.lora.alpha}" + (", merged" if s.lora.merge else " (adapter)")
    pinned = ", ".join(f"{k} {v}" for k, v in identity.items())
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [mrpo, sft]",
            "---",
            f"# SFT of {s.model}",
            "",
            f"Fine-tuned by `mrpo sft` from `{s.model}` ({pinned}) on {metrics['train_rows']} rows",
            f"of source `{s.data.source}` ({files}; {s.data.skip_rows} rows skipped per file).",
            f"Loss on the response tokens only; chat template {metrics['chat_template']}; {how}.",
            f"{metrics['steps']} steps, learning rate {s.learning_rate:g} ({s.lr_scheduler}), batch",
            f"{s.batch_size} x {s.gradient_accumulation_steps}, max_length {s.max_length}, seed {cfg.seed}.",
            f"Loss {metrics['first_loss']:.4f} at the first logged step, "
            f"{metrics['final_loss']:.4f} at the last.",
            "",
        ]
    )
