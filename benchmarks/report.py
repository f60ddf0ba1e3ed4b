"""Markdown tables from the raw results in benchmarks/results/*.json (pasted into docs/benchmarks.md).

python benchmarks/report.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def _load(name: str) -> dict | None:
    path = C.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _header(res: dict) -> str:
    m = res["machine"]
    return (
        f"`{res['command']}` — {m['date']}, {m['device']}, torch threads {m['torch_threads']}, "
        f"load at end {m['load_average_1_5_15']}"
    )


def _targets(row: dict) -> str:
    return ", ".join(f"{name} {'met' if ok else '**missed**'}" for name, ok in row["targets_met"].items())


def b4(res: dict) -> list[str]:
    out = [
        _header(res),
        "",
        "| case | mrpo tok/s (batch_tokens) | naive tok/s | speedup | padding mrpo / naive | targets |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        tps = r["tokens_per_s"]
        ours = [k for k in tps if k != "naive"]
        out.append(
            f"| {r['case']} ({r['sequences']} seq) | "
            + ", ".join(f"{tps[k]:,.0f} ({k.split('@')[1]})" for k in ours)
            + f" | {tps['naive']:,.0f} | "
            + ", ".join(f"x{r['speedup_over_naive'][k]:.2f}" for k in ours)
            + " | "
            + ", ".join(f"{100 * r['padding_share'][k]:.1f}%" for k in ours)
            + f" / {100 * r['padding_share']['naive']:.1f}% | "
            + _targets(r)
            + " |"
        )
    return out


def b1(res: dict) -> list[str]:
    out = [
        _header(res),
        "",
        "| case | batch (2B x T) | step ms K=1 / 2 / 4 | K=4/K=1 time | peak RSS MiB K=1 / 2 / 4 "
        "| K=4/K=1 peak | targets |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        ms, mem = r["step_ms_median"], r["memory"]
        out.append(
            f"| {r['case']} | {r['batch_shape_2B_T'][0]} x {r['batch_shape_2B_T'][1]} | "
            + " / ".join(f"{v:.1f}" for v in ms.values())
            + f" | x{r['time_ratio_kmax_over_k1']:.3f}"
            + _paired(r, "paired_time_ratio_kmax_over_k1")
            + " | "
            + " / ".join(f"{v['peak_rss_mib']:.0f}" for v in mem.values())
            + f" | x{r['peak_rss_ratio_kmax_over_k1']:.3f} | "
            + _targets(r)
            + " |"
        )
    return out


def b2(res: dict) -> list[str]:
    out = [
        _header(res),
        "",
        "| case | live refs | ours ms | live ms | ours/live | scoring both refs per epoch "
        "| per step | 1 epoch incl. scoring | break-even epochs | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        out.append(
            f"| {r['case']} | {', '.join(r['live_references'])} | {r['ours_step_ms']:.1f} | "
            f"{r['live_step_ms']:.1f} | "
            f"x{r['ratio_ours_over_live']:.3f}{_paired(r, 'paired_ratio_ours_over_live')} | "
            f"{r['scoring_both_refs_per_epoch_s']:.1f} s "
            f"({r['train_pairs']} pairs, measured on {r['scoring_pairs_measured']}) | "
            f"{r['scoring_per_step_ms']:.1f} ms | "
            f"x{r['ratio_with_scoring_1_epoch']:.3f} | {_break_even(r):.2f} | " + _targets(r) + " |"
        )
    return out


def profile(res: dict) -> list[str]:
    out = [
        _header(res),
        "",
        "| case | optimizer | forward+loss ms | backward ms | optimizer ms | one reference forward ms "
        "| predicted ours/live K=2 | without optimizer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        ph, optimizer = r["phase_ms"], r.get("optimizer", "torch.optim.AdamW (hand-built)")
        out.append(
            f"| {r['case']} (batch {r['batch_pairs']}) | {optimizer} | "
            f"{ph['forward+loss']:.1f} | {ph['backward']:.1f} | {ph['optimizer']:.1f} | "
            f"{ph['reference forward']:.1f} | x{r['predicted_ratio']:.3f} | "
            f"x{r['ratio_without_optimizer']:.3f} |"
        )
    return out


def _paired(r: dict, key: str) -> str:
    """' (paired x..)' when the run recorded the median of per-round ratios."""
    return f" (paired x{r[key]:.3f})" if key in r else ""


def _break_even(r: dict) -> float:
    saved_per_epoch_ms = r["steps_per_epoch"] * (r["live_step_ms"] - r["ours_step_ms"])
    return (
        1000 * r["scoring_both_refs_per_epoch_s"] / saved_per_epoch_ms
        if saved_per_epoch_ms > 0
        else float("inf")
    )


def b3(res: dict) -> list[str]:
    out = [
        _header(res),
        "",
        "| case | ours ms | TRL precomputed ms | TRL live ms | ours/TRL-pre | ours/TRL-live | targets "
        "| TRL precomputed with its defaults (bf16, checkpointing) ms | ours/that |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        ms = r["step_ms_median"]
        if "trl-pre-defaults" in ms:
            defaults = f"{ms['trl-pre-defaults']:.1f} | x{r['ratio_ours_over_trl_pre_defaults']:.3f}"
        elif "settings" in r:
            defaults = f"{r.get('trl_pre_defaults', 'not run')} | —"
        else:
            defaults = "not separated (this run left TRL at its defaults) | —"
        out.append(
            f"| {r['case']} (batch {r['batch_pairs']}) | {ms['ours']:.1f} | {ms['trl-pre']:.1f} | "
            f"{ms['trl-live']:.1f} | "
            f"x{r['ratio_ours_over_trl_pre']:.3f}{_paired(r, 'paired_ratio_ours_over_trl_pre')} | "
            f"x{r['ratio_ours_over_trl_live']:.3f}{_paired(r, 'paired_ratio_ours_over_trl_live')} | "
            + _targets(r)
            + f" | {defaults} |"
        )
    return out


def b5(res: dict) -> list[str]:
    r = res["rows"][0]
    out = [
        _header(res),
        "",
        "| dvc repro wall | sum of stage commands | DVC overhead | no-op dvc repro (median) |",
        "|---|---|---|---|",
        f"| {r['repro_wall_s']:.1f} s | {r['stage_compute_sum_s']:.1f} s | {r['dvc_overhead_s']:.1f} s "
        f"({100 * r['dvc_overhead_share']:.1f}%) | {r['noop_repro_s']['median']:.2f} s |",
        "",
        "| stage command | seconds |",
        "|---|---|",
    ]
    out += [f"| `{s['cmd']}` | {s['seconds']:.1f} |" for s in r["stage_commands"]]
    return out


def b6(res: dict) -> list[str]:
    from scoring_ranks import markdown_row

    one, two = res["designs"]
    out = [
        _header(res),
        "",
        f"| reference | pairs | wall {one} | wall {two} | {two} / 1 wall | forwards {one} "
        f"| forwards {two} (sum over ranks) | wall outside the forwards 1 / {two} | identical file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return out + [markdown_row(r, one, two) for r in res["rows"]]


def _share(v) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, float) else "skipped: not in this checkout"


def b7(res: dict) -> list[str]:
    """B7's tables: padding share, training steps vs TRL, scoring, memory at vocabulary 128k, the summary."""
    out = [_header(res), ""]
    if "padding_share" in res:
        default = res.get("library_features", {}).get("default_batching")
        said = {"padded": "padded (the collator before issue 23)", "grouped": "grouped", "packed": "packed"}
        heads = " | ".join(said[m] + (" (default)" if m == default else "") for m in said)
        out += [f"| max_length | pairs | {heads} |", "|---|---|---|---|---|"]
        for length, row in res["padding_share"].items():
            modes = " | ".join(_share(row.get(m)) for m in ("padded", "grouped", "packed"))
            out.append(f"| {length} | {row['pairs']} | {modes} |")
        out.append("")
    if "step" in res:
        st, peak = res["step"], res["matmul_gflops"]
        out += [
            f"{st['case']}, {st['pairs']} pairs ({st['real_tokens']} real tokens), batch {st['batch_pairs']} "
            f"pairs, max_length {st['max_length']}; torch.mm peak here {peak['float32']:.0f} GFLOP/s fp32, "
            f"{peak['bfloat16']:.0f} bf16; timed rounds per design: "
            f"{next(iter(st['designs'].values()))['epoch_step_seconds']['n']}",
            "",
            "| design | epoch of steps s | tokens/s | / TRL precomputed, same precision (paired) | "
            "fraction of matmul peak |",
            "|---|---|---|---|---|",
        ]
        for name, d in st["designs"].items():
            out.append(
                f"| {name} | {d['epoch_step_seconds']['median']:.1f} | {d['tokens_per_s']:.0f} | "
                f"x{d['ratio_vs_trl_pre_same_precision']:.3f} | {d['matmul_fraction']:.2f} |"
            )
        out += [f"| {name} | {note} | | | |" for name, note in st.get("skipped", {}).items()]
        sc = res["scoring"]
        said = [
            f"{d} {sc[d]['seconds']:.1f} s ({sc[d]['matmul_fraction']:.2f} of the {d} peak)"
            for d in ("float32", "bfloat16")
            if d in sc
        ]
        out += ["", f"Scoring the same {sc['pairs']} pairs (`score_sequences`): " + ", ".join(said) + "."]
        if "bf16_skipped" in res:
            out.append(f"bf16 rows: {res['bf16_skipped']}.")
        out.append("")
    if res.get("memory"):
        out += [
            "| vocabulary 128,256, 4 pairs x 512 tokens | ours step increment MiB | TRL precomputed MiB | "
            "ours / TRL |",
            "|---|---|---|---|",
        ]
        for r in res["memory"]:
            if "measured_in" in r:
                r = {**r, "dtype": f"{r['dtype']} (separate processes)"}
            out.append(
                f"| {r['dtype']}, {r['prompt_tokens']}-token prompts | {r['ours']['increment_mib']:.0f} | "
                f"{r['trl']['increment_mib']:.0f} | x{r['ratio_ours_over_trl']:.3f} |"
            )
        out.append("")
    sm = res.get("summary", {})
    out.append("Summary (last line of the run): `" + json.dumps({k: v for k, v in sm.items()}) + "`")
    return out


def b7_micro(res: dict) -> list[str]:
    """B7 micro: one batch's forward + backward per design (packing; LM-head chunk), per model."""
    out = [_header(res), ""]
    for row in res["rows"]:
        shape = "x".join(str(n) for n in row["padded_shape"])
        out += [
            f"{row['model']}: {row['sequences']} sequences (padded {shape}, {row['real_tokens']} real "
            f"tokens, {row['response_tokens']} response tokens)",
            "",
            "| design | CPU s (median) | min-max | / first design (paired) |",
            "|---|---|---|---|",
        ]
        for part in ("packing", "chunk"):
            for name, d in row.get(part, {}).items():
                sec = d["seconds"]
                out.append(
                    f"| {name} | {sec['median']:.3f} | {sec['min']:.3f}-{sec['max']:.3f} | "
                    f"x{d['ratio_to_first']:.3f} |"
                )
        out.append("")
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    for title, name, fn in (
        ("B1", "b1_train_references", b1),
        ("B2", "b2_live_reference", b2),
        ("B2/B3 step profile", "profile_step", profile),
        ("B3", "b3_trl_dpo", b3),
        ("B4", "b4_scoring", b4),
        ("B5", "b5_pipeline", b5),
        ("B6", "b6_scoring_ranks", b6),
        ("B6, larger data", "b6_scoring_ranks_large", b6),
        ("B7", "b7_lean", b7),
        ("B7 micro", "b7_micro", b7_micro),
    ):
        res = _load(name)
        print(f"### {title}\n")
        print("\n".join(fn(res)) if res else f"(no {name}.json yet)")
        print()


if __name__ == "__main__":
    main()
