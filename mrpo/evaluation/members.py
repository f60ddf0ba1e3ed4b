"""What each member of a comparison produced, kept in `<compare.output_dir>/<id>/members/` as it finishes,
so re-running a stopped comparison with its id (`mrpo compare --id ID`) trains only the members it lacks.

A kept result is reused only for the same member, the same settings and the same inputs: its fingerprint
covers every setting the member trains and is scored with (all of the config but tracking, the report and
the list of members, so adding a seed or a strategy keeps the rest) and a digest of the prepared splits and
the stored reference log-probs. Anything else re-runs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mrpo.config.schema import Config
from mrpo.io import jsonable, write_json_atomically

log = logging.getLogger("mrpo")

MEMBERS_DIR = "members"
_NOT_SETTINGS = ("tracking", "summary")  # where runs are recorded and summarised: not what they compute
_COMPARE_SETTINGS = ("train_pairs", "num_epochs", "lm_eval_limit")  # the rest of `compare` lists or reports


@dataclass(frozen=True)
class Member:
    """One training run: a configuration (label) and a seed."""

    label: str
    seed: int
    objective: str
    strategy: str
    references: tuple[str, ...]  # anchor first for mrpo/multi_dpo; the one reference for dpo


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
    reused: bool = False  # kept by an earlier run of the comparison, not trained by this one

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


def inputs_digest(prepared_digest: str, datasets: dict) -> str:
    """The prepared splits and every reference's stored log-probs the members see, in one digest."""
    h = hashlib.sha256(prepared_digest.encode())
    for split in sorted(datasets):
        for e in datasets[split].examples:
            h.update(e.pair_id.encode())
            h.update(np.asarray(e.ref_chosen_logps, np.float64).tobytes())
            h.update(np.asarray(e.ref_rejected_logps, np.float64).tobytes())
    return h.hexdigest()


def fingerprint(settings: Config, member: Member, inputs: str) -> str:
    """What decides a member's result: `settings` (the config it ran with, scratch paths fixed by the
    caller), the member and the inputs' digest."""
    config = {k: v for k, v in dataclasses.asdict(settings).items() if k not in _NOT_SETTINGS}
    config["compare"] = {k: config["compare"][k] for k in _COMPARE_SETTINGS}
    payload = {"member": dataclasses.asdict(member), "config": config, "inputs": inputs}
    return hashlib.sha256(json.dumps(jsonable(payload), sort_keys=True, default=str).encode()).hexdigest()


def result_path(out_dir: Path, member: Member) -> Path:
    return out_dir / MEMBERS_DIR / f"{member.label.replace(':', '_')}-s{member.seed}.json"


def keep(out_dir: Path, result: MemberResult, key: str) -> None:
    record = dataclasses.asdict(result)
    record.pop("reused")
    write_json_atomically(result_path(out_dir, result.member), {**record, "fingerprint": key})


def kept(out_dir: Path, member: Member, key: str) -> MemberResult | None:
    """The result an earlier run kept for `member` under the same fingerprint; None (and why, when there
    was one) otherwise."""
    path = result_path(out_dir, member)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(MemberResult)} - {"member", "correct", "reused"}
        result = MemberResult(
            member,
            np.asarray(record["correct"], dtype=float),
            **{k: record[k] for k in fields if k in record},
        )
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("compare: %s is unreadable (%s); %s runs again", path, exc, _name(member))
        return None
    if record.get("fingerprint") != key:
        log.info("compare: %s was kept with other settings or inputs; %s runs again", path, _name(member))
        return None
    result.final_loss = math.nan if result.final_loss is None else result.final_loss
    result.reused = True
    return result


def _name(member: Member) -> str:
    return f"{member.label} seed {member.seed}"
