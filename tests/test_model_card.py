"""Model cards on every export (`jdpo.train.model_card`) and the Hub upload (`jdpo.train.hub_upload`):
the card's Hub header, settings and metrics, the revisions and folders uploaded, retries, and a run
without network that exports, fails the upload with a clear message and exits with status 4."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from helpers import run_config

from jdpo import config as jconfig
from jdpo.errors import EXIT_UPLOAD_FAILED, HubUploadError
from jdpo.train import hub_upload, model_card
from jdpo.train.model_card import ModelCard


def header(text):
    m = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    assert m, text[:200]
    return yaml.safe_load(m.group(1))


@pytest.fixture
def base(tmp_path):
    """A base model in a hub-cache snapshot, with its own card (a license)."""
    snap = tmp_path / "hub" / "models--SomeOrg--Tiny-1B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("---\nlicense: apache-2.0\ntags: [base]\n---\n# Tiny\n")
    return snap


def test_card_header_settings_metrics_and_loading(base, tmp_path):
    local = tmp_path / "prefs.jsonl"
    local.write_text("{}\n")
    cfg = jconfig.replace(jconfig.Config(), **{
        "model.path": str(base), "data.train": ["someone/prefs:1000", str(local)],
        "data.eval": ["someone/prefs-test"], "lora.rank": 8, "lora.quantize": "nf4", "dpo.beta": 0.2,
        "data.chat_template_kwargs": "{enable_thinking: false}",
    })  # fmt: skip
    evals = {0: {"eval/loss": 0.693, "eval/rewards/accuracies": 0.5},
             2: {"eval/loss": 0.61, "eval/rewards/accuracies": 0.75},
             4: {"eval/loss": 0.65, "eval/rewards/accuracies": 0.7}}  # fmt: skip
    card = ModelCard(cfg, step=4, evals=evals, best=(2, "eval/loss", 0.61))
    adapter = card.render("adapter", "final")
    h = header(adapter)
    assert (
        h["base_model"] == "SomeOrg/Tiny-1B" and h["library_name"] == "peft" and h["license"] == "apache-2.0"
    )
    assert h["tags"] == ["dpo", "jdpo", "sigmoid", "lora"] and h["datasets"] == [
        "someone/prefs",
        "someone/prefs-test",
    ]
    assert "| beta | 0.2 |" in adapter and "{'enable_thinking': False}" in adapter
    assert "| eval/loss | 0.65 | 0.61 |" in adapter  # final (step 4) and best (step 2)
    assert "final (step 4)" in adapter and "best by eval/loss (step 2)" in adapter
    assert 'AutoPeftModelForCausalLM.from_pretrained("final")' in adapter
    assert "full-precision base" in adapter and "final_merged/" in adapter  # the QLoRA note
    assert yaml.safe_load(adapter.split("```yaml\n")[1].split("```")[0])["dpo"]["beta"] == 0.2
    merged = card.render("merged", "final_merged")
    assert header(merged)["library_name"] == "transformers" and "full-precision" not in merged
    best = card.render("model", "OWNER/NAME", best=True, revision="best")
    assert "best eval (eval/loss = 0.61, step 2)" in best
    assert 'AutoModelForCausalLM.from_pretrained("OWNER/NAME", revision="best")' in best
    # A plain local base: no base_model (the Hub takes ids only), the path in the text; no evals.
    plain = ModelCard(jconfig.replace(cfg, **{"model.path": str(tmp_path)}), step=3, evals={})
    text = plain.render("model", "final")
    assert "base_model" not in header(text) and str(tmp_path) in text and "No eval split" in text


def test_upload_plan_revisions_and_retries(base, tmp_path, monkeypatch):
    final, best = tmp_path / "run" / "final", tmp_path / "run" / "best"
    for d in (final, best):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x")
    hub = {"train.push_to_hub": "me/tiny-dpo", "train.hub_private": True, "train.keep_best": "eval/loss:min"}
    cfg = jconfig.replace(jconfig.Config(), **{"model.path": str(base), **hub})
    card = ModelCard(cfg, step=4, evals={2: {"eval/loss": 0.6}}, best=(2, "eval/loss", 0.6))
    sent, failures = [], [ConnectionError("no route"), TimeoutError("slow")]

    def upload(u):  # the network boundary
        if failures:
            raise failures.pop(0)
        sent.append((u, open(f"{u.folder}/README.md").read()))
        return f"https://hub/{u.repo_id}/commit/{len(sent)}"

    monkeypatch.setattr(hub_upload, "upload_to_hub", upload)
    urls = hub_upload.push(cfg, card, final, best, lora_run=False, best_step=2, backoff_s=0)
    assert urls == ["https://hub/me/tiny-dpo/commit/1", "https://hub/me/tiny-dpo/commit/2"]
    (main, main_card), (best_up, best_card) = sent
    assert (main.folder, main.revision, main.private) == (str(final), None, True)
    assert (best_up.folder, best_up.revision) == (str(best), "best") and "step 2" in best_up.commit_message
    assert 'from_pretrained("me/tiny-dpo")' in main_card and 'revision="best"' in best_card
    rev = jconfig.replace(cfg, **{"train.hub_revision": "v1"})
    assert hub_upload.revisions(rev) == ("v1", "v1-best")
    # A permanent failure is not retried; the message names the exports and how to upload later.
    calls = []

    def refused(u):
        calls.append(u)
        raise hub_upload.OfflineModeIsEnabled("HF_HUB_OFFLINE is set")

    monkeypatch.setattr(hub_upload, "upload_to_hub", refused)
    with pytest.raises(
        HubUploadError, match=r"failed \(OfflineModeIsEnabled.*on disk .*hf upload me/tiny-dpo"
    ):
        hub_upload.push(cfg, card, final, None, lora_run=False, backoff_s=0)
    assert len(calls) == 1


def test_hub_settings_are_checked_before_anything_loads(monkeypatch):
    with pytest.raises(jconfig.ConfigError, match="OWNER/NAME"):
        jconfig.replace(jconfig.Config(), **{"train.push_to_hub": "just-a-name"})
    with pytest.raises(jconfig.ConfigError, match="train.hub_private=True .* needs train.push_to_hub"):
        jconfig.replace(jconfig.Config(), **{"train.hub_private": True})
    with pytest.raises(jconfig.ConfigError, match="needs train.export"):
        jconfig.replace(jconfig.Config(), **{"train.push_to_hub": "me/x", "train.export": False})
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub_upload.huggingface_hub, "get_token", lambda: None)
    with pytest.raises(jconfig.ConfigError, match="no Hugging Face token"):
        hub_upload.check_token(jconfig.replace(jconfig.Config(), **{"train.push_to_hub": "me/x"}))


# slow (19 s): the upload's retries and failure by test_upload_plan_revisions_and_retries.
@pytest.mark.slow
def test_a_run_without_network_exports_then_fails_the_upload_with_status_4(assets, tmp_path, monkeypatch,
                                                                           capsys):  # fmt: skip
    """The real upload call against an endpoint nothing listens on: retried, then exit status 4 with the
    export (and its card with the final and best evals) on disk."""
    from jdpo import cli

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub_upload, "BACKOFF_S", 0.0)
    monkeypatch.setattr(hub_upload, "ATTEMPTS", 2)
    out = tmp_path / "run"
    cfg = run_config(assets, out, **{"train.max_steps": 2, "train.eval_every": 1,
                                     "train.keep_best": "eval/loss:min", "train.push_to_hub": "me/tiny-dpo",
                                     "mesh.data": 1, "mesh.fsdp": 1, "train.batch_rows": 4})  # fmt: skip
    jconfig.dump(cfg, tmp_path / "run.yaml")
    assert cli.main(["train", "--config", str(tmp_path / "run.yaml")]) == EXIT_UPLOAD_FAILED == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err and "uploading" in err and "me/tiny-dpo" in err and "exit status 4" in err
    assert (out / "final" / "model.safetensors").exists() and (out / "best" / "model.safetensors").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["eval/loss"] for r in records if "eval/loss" in r}
    best_step = json.loads((out / "best" / "best.json").read_text())["step"]
    for name in ("final", "best"):
        text = (out / name / "README.md").read_text()
        assert header(text)["tags"][:2] == ["dpo", "jdpo"]
        assert f"| eval/loss | {loss[2]:.4g} | {loss[best_step]:.4g} |" in text
    assert "best eval (eval/loss" in (out / "best" / "README.md").read_text()
    assert model_card.eval_records(out)[2]["eval/loss"] == loss[2]
