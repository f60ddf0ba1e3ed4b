"""The Trainer's logs as a run's per-step curves."""

from __future__ import annotations

from transformers import TrainerCallback

from mrpo.tracking.names import curve_metrics


class MLflowStepCallback(TrainerCallback):
    """Logs every Trainer log (training curves and validation metrics) on `run` (a Tracker or NullTracker)
    with the global step; a value already logged at that step under that name (the evaluation after
    training, when the last step was also a scheduled one) is not logged twice."""

    def __init__(self, run):
        self.run = run
        self._logged: set[tuple[str, int]] = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and self.run:
            step = state.global_step
            metrics = {k: v for k, v in curve_metrics(logs).items() if (k, step) not in self._logged}
            self._logged.update((k, step) for k in metrics)
            self.run.log_metrics(metrics, step=step)
        return control


def log_evaluation(run, metrics, step: int) -> None:
    """An evaluation's metrics (`val_*`, `test_*` from `Trainer.evaluate`) at `step`, named as curves."""
    run.log_metrics(curve_metrics(metrics), step=step)
