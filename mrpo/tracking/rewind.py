"""A resumed run's curves hold one point per step.

A run resumed from the checkpoint at step S re-trains every step after S, and a previous attempt may have
logged some of them already (it ran past S before it died, or fell back past a damaged checkpoint). MLflow's
client cannot delete metric points, so on a SQL store (sqlite, PostgreSQL, MySQL: the default here) the
points past S are deleted directly and the re-trained values replace them. Another store (a tracking server)
keeps the first values: they are not logged again, with a warning, so no step is recorded twice.
"""

from __future__ import annotations

import logging

log = logging.getLogger("mrpo")


def _delete_points_after(store, run_id: str, step: int) -> int:
    """Delete `run_id`'s metric points past `step` and point each metric's latest value at what is left."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric

    with store.ManagedSessionMaker(read_only=False) as session:
        deleted = (
            session.query(SqlMetric)
            .filter(SqlMetric.run_uuid == run_id, SqlMetric.step > step)
            .delete(synchronize_session=False)
        )
        stale = session.query(SqlLatestMetric).filter(
            SqlLatestMetric.run_uuid == run_id, SqlLatestMetric.step > step
        )
        for latest in stale.all():
            newest = (
                session.query(SqlMetric)
                .filter(SqlMetric.run_uuid == run_id, SqlMetric.key == latest.key)
                .order_by(SqlMetric.step.desc(), SqlMetric.timestamp.desc(), SqlMetric.value.desc())
                .first()
            )
            if newest is None:
                session.delete(latest)
            else:
                latest.value, latest.step = newest.value, newest.step
                latest.timestamp, latest.is_nan = newest.timestamp, newest.is_nan
    return deleted


def logged_points(client, run_id: str) -> set[tuple[str, int]]:
    """(metric name, step) of every point the run holds."""
    keys = client.get_run(run_id).data.metrics
    return {(key, m.step) for key in keys for m in client.get_metric_history(run_id, key)}


def rewind_to(client, run_id: str, step: int) -> set[tuple[str, int]]:
    """Forget `run_id`'s points past `step` where the store allows it; the (name, step) points it still holds,
    which must not be logged again."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    points = logged_points(client, run_id)
    beyond = sorted({s for _, s in points if s > step})
    if not beyond:
        return points
    store = client._tracking_client.store  # MLflow has no public call that deletes metric points
    if isinstance(store, SqlAlchemyStore):
        deleted = _delete_points_after(store, run_id, step)
        log.info(
            "mlflow: run %s resumes at step %d: replacing the %d point(s) an earlier attempt logged at steps "
            "%d-%d",
            run_id,
            step,
            deleted,
            beyond[0],
            beyond[-1],
        )
        return {(key, s) for key, s in points if s <= step}
    log.warning(
        "mlflow: run %s resumes at step %d, and this tracking store cannot delete the points an earlier "
        "attempt logged at steps %d-%d; they keep their first values and are not logged again",
        run_id,
        step,
        beyond[0],
        beyond[-1],
    )
    return points
