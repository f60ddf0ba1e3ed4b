"""The Trainer's logs as a run's per-step curves."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from mrpo.tracking.names import curve_metrics, metric_name

log = logging.getLogger("mrpo")


class MLflowStepCallback(TrainerCallback):
    """Logs every Trainer log (training curves and validation metrics) on `run` (a Tracker or NullTracker)
    with the global step; a value already logged at that step under that name (the evaluation after
    training, when the last step was also a scheduled one; a point a resumed run holds already) is not
    logged twice. A run resumed from a checkpoint first drops what an earlier attempt logged past it (see
    mrpo.tracking.rewind), so the re-trained steps appear once."""

    def __init__(self, run):
        self.run = run
        self._logged: set[tuple[str, int]] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.run and state.global_step > 0:
            from mrpo.tracking.rewind import rewind_to

            try:
                self._logged |= rewind_to(self.run.client, self.run.run_id, state.global_step)
            except Exception as exc:  # the tracking store is unreachable: never a reason to stop training
                log.warning(
                    "mlflow: cannot read run %s to resume its curves at step %d (%s); steps an earlier "
                    "attempt logged past it may appear twice",
                    self.run.run_id,
                    state.global_step,
                    exc,
                )
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and self.run:
            step = state.global_step
            metrics = {
                k: v for k, v in curve_metrics(logs).items() if (metric_name(k), step) not in self._logged
            }
            self._logged.update((metric_name(k), step) for k in metrics)
            self.run.log_metrics(metrics, step=step)
        return control


def log_evaluation(run, metrics, step: int) -> None:
    """An evaluation's metrics (`val_*`, `test_*` from `Trainer.evaluate`) at `step`, named as curves."""
    run.log_metrics(curve_metrics(metrics), step=step)
