"""The `sft` stage on the tiny zoo: the loss falls on a memorisable set, only response tokens carry loss,
a resumed run equals an uninterrupted one, outputs swap in atomically, the output scores as a reference, bad
settings exit 2 naming the key, and sft.enabled false only writes a marker. Real models, real files, real
Trainer, real MLflow (a sqlite store per test)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO_ROOT

from mrpo.config.load import load_config, parse_config
from mrpo.errors import ConfigError

ROWS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "Tom has 4 apples and eats 1. How many are left?", "answer": "4 - 1 = <<4-1=3>>3\n#### 3"},
    {"question": "What is 6 times 7?", "answer": "6 * 7 = <<6*7=42>>42\n#### 42"},
    {"question": "Half of 10?", "answer": "10 / 2 = <<10/2=5>>5\n#### 5"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_raw(tiny_zoo: dict, root: Path, **sft) -> dict:
    """The default params with sft on: the tiny zoo's anchor fine-tuned on GSM8K-style rows under `root`."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    zoo_dir = Path(tiny_zoo["output_dir"])
    raw["zoo"]["output_dir"] = str(zoo_dir)
    raw["references"] = {name: {"model": str(path)} for name, path in tiny_zoo["members"].items()}
    raw["data"]["output_dir"] = str(root / "data/prepared")
    raw["tracking"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    data = write_jsonl(root / "gsm8k.jsonl", ROWS)
    raw["sft"].update(
        {
            "enabled": True,
            "model": str(tiny_zoo["members"]["anchor"]),
            "data": {"source": "gsm8k", "paths": [str(data)]},
            "output_dir": str(root / "models/sft"),
            "checkpoint_dir": str(root / "checkpoints/sft"),
            "metrics_file": str(root / "metrics/sft.json"),
            "plots_file": str(root / "plots/sft.csv"),
            "max_length": 64,
            "learning_rate": 3e-3,
            "max_steps": 30,
            "batch_size": 4,
            "logging_steps": 1,
            "save_steps": 10,
            "device": "cpu",
        }
    )
    for key, value in sft.items():
        node = raw["sft"]
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mrpo.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def write_params(raw: dict, root: Path) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------- learning


def test_loss_falls_on_a_memorisable_set(tiny_zoo, tmp_path):
    from mrpo.stages.sft import sft

    cfg = parse_config(sft_raw(tiny_zoo, tmp_path))
    metrics = sft(cfg, track=False)
    assert metrics["steps"] == 30 and metrics["train_rows"] == 4 and metrics["skipped_rows"] == 0
    assert metrics["final_loss"] < 0.5 * metrics["first_loss"], metrics
    curve = Path(cfg.sft.plots_file).read_text().splitlines()
    assert curve[0] == "step,loss,learning_rate" and len(curve) == 31
    assert json.loads(Path(cfg.sft.metrics_file).read_text())["final_loss"] == metrics["final_loss"]


def test_lora_merged_writes_a_plain_loadable_model_with_its_card(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mrpo.stages.sft import sft

    raw = sft_raw(tiny_zoo, tmp_path, **{"lora.enabled": True, "max_steps": 4, "learning_rate": 1e-2})
    cfg = parse_config(raw)
    metrics = sft(cfg, track=False)
    out = Path(cfg.sft.output_dir)
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "adapter_config.json").exists()  # merged into plain weights
    assert not any("lora" in name for name in weights(out))
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_zoo["members"]["anchor"], use_safetensors=True)
    assert set(model.state_dict()) == set(base.state_dict())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)  # peft's llama targets
    AutoTokenizer.from_pretrained(out)
    card = (out / "README.md").read_text()
    assert "LoRA r=8, alpha 16, merged" in card and f"{metrics['steps']} steps" in card


def test_only_response_tokens_carry_loss(tiny_zoo):
    """The loss's gradient at every position whose target is a prompt token is exactly zero, so changing the
    prompt's target tokens cannot change the gradient; a changed response token changes it. The loss is the
    scorer's own per-token log-prob of the response (mrpo.modeling.logprobs), negated and averaged."""
    from transformers import AutoModelForCausalLM

    from mrpo.data.sft import SftRow
    from mrpo.modeling.logprobs import response_logps
    from mrpo.modeling.models import load_tokenizer
    from mrpo.training.sft import IGNORE_INDEX, SftCollator, encode_example, sft_reference

    cfg = parse_config(sft_raw(tiny_zoo, Path("/tmp/unused")))
    tokenizer = load_tokenizer(sft_reference(cfg))
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo["members"]["anchor"], use_safetensors=True)
    row = SftRow("What is 2 + 3?", json.dumps([{"role": "user", "content": "What is 2 + 3?"}]), "5", "row 1")
    item = encode_example(tokenizer, row, 64, chat_template=False)
    prompt_length = item["labels"].count(IGNORE_INDEX)
    assert item["labels"][prompt_length:] == item["input_ids"][prompt_length:]
    assert item["input_ids"][-1] == tokenizer.eos_token_id  # EOS appended to the response
    batch = SftCollator(tokenizer.pad_token_id)([item])

    def gradients(batch) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(**batch)
        out.logits.retain_grad()
        out.loss.backward()
        return out.loss.detach(), out.logits.grad[0], [p.grad.clone() for p in model.parameters()]

    loss, logit_grad, grads = gradients(batch)
    # position t predicts token t + 1: positions 0 .. P-2 predict prompt tokens, P-1 onwards the response
    assert torch.count_nonzero(logit_grad[: prompt_length - 1]) == 0
    assert all(
        torch.count_nonzero(logit_grad[t]) > 0 for t in range(prompt_length - 1, len(item["input_ids"]) - 1)
    )
    response_mask = torch.tensor([[0] * prompt_length + [1] * (len(item["input_ids"]) - prompt_length)])
    with torch.no_grad():
        scored = response_logps(model, batch["input_ids"], batch["attention_mask"], response_mask)
    n_response = len(item["input_ids"]) - prompt_length
    assert torch.allclose(loss, -scored[0] / n_response, atol=1e-5)

    ids = list(item["input_ids"])
    ids[prompt_length] = (ids[prompt_length] + 1) % len(tokenizer)  # one response token changed
    other = {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt_length + ids[prompt_length:]}
    _, _, changed = gradients(SftCollator(tokenizer.pad_token_id)([other]))
    assert any(not torch.allclose(a, b) for a, b in zip(grads, changed, strict=True))


# ---------------------------------------------------------------- resume, atomic outputs


def test_a_resumed_run_equals_an_uninterrupted_one(tiny_zoo, tmp_path):
    from transformers import TrainerCallback

    from mrpo.stages.sft import sft

    settings = {"max_steps": 8, "save_steps": 3, "batch_size": 2}
    whole = parse_config(sft_raw(tiny_zoo, tmp_path / "whole", **settings))
    sft(whole, track=False)

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:  # after checkpoint-3, before checkpoint-6
                raise RuntimeError("interrupted at step 5")
            return control

    cut = parse_config(sft_raw(tiny_zoo, tmp_path / "cut", **settings))
    with pytest.raises(RuntimeError, match="interrupted at step 5"):
        sft(cut, callbacks=[Interrupt()], track=False)
    assert not Path(cut.sft.output_dir).exists()
    assert (Path(cut.sft.checkpoint_dir) / "checkpoint-3" / "mrpo_checkpoint.json").is_file()
    metrics = sft(cut, track=False)
    assert metrics["resumed"] is True and metrics["steps"] == 8
    a, b = weights(Path(whole.sft.output_dir)), weights(Path(cut.sft.output_dir))
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_a_late_failure_leaves_every_previous_output_byte_identical(tiny_zoo, tmp_path, monkeypatch):
    from mrpo.stages import sft as stage

    cfg = parse_config(sft_raw(tiny_zoo, tmp_path, max_steps=2))
    stage.sft(cfg, track=False)
    outputs = [Path(p) for p in stage.sft_outputs(cfg)]
    before = {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in outputs}

    def broken_card(*args, **kwargs):  # fails after the new model is staged, before anything swaps in
        raise OSError("disk gone while writing the model card")

    monkeypatch.setattr(stage, "model_card", broken_card)
    with pytest.raises(OSError, match="disk gone"):
        stage.sft(parse_config(sft_raw(tiny_zoo, tmp_path, max_steps=3)), track=False)
    assert {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in outputs} == before
    leftovers = [p.name for p in tmp_path.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


# ---------------------------------------------------------------- the output as a reference; MLflow


@pytest.mark.slow
def test_the_sft_output_scores_like_any_other_reference_and_the_run_is_tracked(tiny_zoo, tmp_path):
    import mlflow

    raw = sft_raw(tiny_zoo, tmp_path, max_steps=3)
    raw["references"]["specialist"] = {"model": raw["sft"]["output_dir"]}
    raw["data"]["synthetic_pairs"] = 60
    raw["score"].update(
        {"output_dir": str(tmp_path / "data/scores"), "metrics_dir": str(tmp_path / "logs/score")}
    )
    raw["score"].update({"max_length": 64, "device": "cpu"})
    params = write_params(raw, tmp_path)
    for args in (["prepare"], ["sft"], ["score", "--reference", "specialist"]):
        proc = run_cli(["--params", str(params), *args], tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    import pandas as pd

    scores = pd.read_parquet(tmp_path / "data/scores/specialist.parquet")
    assert len(scores) > 0
    logps = scores[["chosen_logp", "rejected_logp"]].to_numpy()
    assert logps.size and (logps < 0).all() and pd.notna(logps).all()

    # a client of its own: mlflow.set_tracking_uri would leave MLFLOW_TRACKING_URI set for every later test
    client = mlflow.MlflowClient(raw["tracking"]["tracking_uri"])
    experiment = client.get_experiment_by_name("mrpo").experiment_id
    runs = client.search_runs([experiment], "tags.`mrpo.kind` = 'sft'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0].data
    assert run.params["sft.model"] == raw["sft"]["model"] and run.metrics["steps"] == 3
    assert run.tags["mrpo.stage"] == "sft" and run.tags["mlflow.source.name"] == "mrpo sft"


# ---------------------------------------------------------------- bad input, disabled


def test_sft_disabled_writes_only_the_marker_quickly(tmp_path):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params = write_params(raw, tmp_path)
    start = time.perf_counter()
    proc = run_cli(["--params", str(params), "sft"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 60
    assert [p.name for p in (tmp_path / "models/sft").iterdir()] == ["SFT_DISABLED"]
    assert json.loads((tmp_path / "metrics/sft.json").read_text()) == {"enabled": False}
    assert (tmp_path / "plots/sft.csv").read_text() == "step,loss,learning_rate\n"


BAD_INPUT = [
    ({"model": None}, "sft.model: got None; required when sft.enabled is true"),
    ({"model": "/nope/model"}, "sft.model: '/nope/model' does not exist; build the zoo"),
    ({"data.skip_rows": 10}, "sft.data.skip_rows: no rows left in"),
    ({"data.source": "file"}, "row 1: no column 'prompt' (sft.data.prompt_column)"),
    ({"data.paths": ["missing.jsonl"]}, "missing.jsonl: file not found (sft.data.paths"),
    ({"data.source": "prepared", "data.paths": []}, "prepared data not found; run `mrpo prepare` first"),
    ({"max_length": 8}, "sft.max_length: no response of the 4 rows fits 8 tokens"),
    ({"output_dir": "data/prepared"}, "that is sft.output_dir ('data/prepared'), the sft stage's output"),
    ({"output_dir": "out", "checkpoint_dir": "out"}, "sft.checkpoint_dir: got 'out'; must differ"),
    ({"lr_scheduler": "nope"}, "sft.lr_scheduler: got 'nope'; allowed: linear"),
]


# Each case is a process of its own (seconds): the fast tier keeps a configuration error and a data error.
@pytest.mark.parametrize(
    ("change", "message"),
    [c if i in (0, 3) else pytest.param(*c, marks=pytest.mark.slow) for i, c in enumerate(BAD_INPUT)],
    ids=lambda v: str(v)[:40],
)
def test_bad_input_exits_2_naming_the_key_or_file(tiny_zoo, tmp_path, change, message):
    raw = sft_raw(tiny_zoo, tmp_path, **change)
    proc = run_cli(["--params", str(write_params(raw, tmp_path)), "sft"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the log lines: the error, one line
    assert last.startswith(("mrpo sft: ", "mrpo: configuration error: ")) and message in last, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_reference_naming_a_disabled_sft_output_is_refused(tiny_zoo, tmp_path):
    raw = sft_raw(tiny_zoo, tmp_path, enabled=False)
    raw["references"]["specialist"] = {"model": raw["sft"]["output_dir"]}
    with pytest.raises(ConfigError, match=r"^references\.specialist\.model: got .*sft\.enabled is false"):
        parse_config(raw)


def test_load_config_reads_the_sft_section(tmp_path):
    cfg = load_config(REPO_ROOT / "params.yaml")
    assert cfg.sft.enabled is False and cfg.sft.output_dir == "models/sft" and cfg.sft.lora.merge is True


def test_dvc_runs_sft_before_the_score_stage_of_a_reference_naming_its_output(tiny_project, tmp_path):
    """In a real DVC project: a reference in sft.output_dir is a dependency of the score stages (a marked
    dep, written by `mrpo profile sync`), so DVC's graph puts sft before score@<name>."""
    from helpers import clone_project, run_tool

    project = clone_project(tiny_project, tmp_path / "project")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["references"]["specialist"] = {"model": "models/sft"}
    raw["sft"].update({"enabled": True, "model": "models/zoo/anchor", "data": {"source": "prepared"}})
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run_tool([sys.executable, "-m", "mrpo.cli", "profile", "sync"], project)
    deps = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["score"]["do"]["deps"]
    assert "models/sft" in deps
    dag = run_tool([sys.executable, "-m", "dvc", "dag", "--dot", "score@specialist"], project).stdout
    assert '"sft" -> "score@specialist"' in dag, dag
    assert '"prepare" -> "sft"' in dag and '"zoo" -> "sft"' in dag, dag


def test_rows_of_each_source_with_skip_rows_and_max_rows(tiny_zoo, tmp_path):
    from mrpo.data.sft import sft_rows
    from mrpo.stages.prepare import prepare

    gsm8k = parse_config(sft_raw(tiny_zoo, tmp_path, **{"data.skip_rows": 1, "data.max_rows": 2}))
    rows = sft_rows(gsm8k)
    assert [(r.prompt, r.response) for r in rows] == [(x["question"], x["answer"]) for x in ROWS[1:3]]
    assert rows[0].where.endswith("gsm8k.jsonl row 2")
    assert json.loads(rows[0].prompt_messages) == [{"role": "user", "content": ROWS[1]["question"]}]

    two = write_jsonl(tmp_path / "b.jsonl", [{"q": "a?", "r": "b"}, {"q": "c?", "r": "d"}])
    files = {"data.source": "file", "data.paths": [str(two), str(two)], "data.skip_rows": 1}
    cfg = parse_config(
        sft_raw(tiny_zoo, tmp_path, **files, **{"data.prompt_column": "q", "data.response_column": "r"})
    )
    assert [(r.prompt, r.response, r.where[-5:]) for r in sft_rows(cfg)] == [("c?", "d", "row 2")] * 2

    raw = sft_raw(tiny_zoo, tmp_path, **{"data.source": "prepared", "data.paths": []})
    raw["data"]["synthetic_pairs"] = 50
    prepared = parse_config(raw)
    prepare(prepared)
    import pandas as pd

    train = pd.read_parquet(Path(prepared.data.output_dir) / "train.parquet")
    rows = sft_rows(prepared)
    assert [(r.prompt, r.response) for r in rows] == list(zip(train["prompt"], train["chosen"], strict=True))
    assert rows[0].prompt_messages == train["prompt_messages"].iloc[0]
