"""The model card (`README.md`) of every export: `final/`, `best/`, a LoRA run's PEFT `final/` and its
`final_merged/`.

The card starts with the Hugging Face Hub's YAML header: `base_model` (a hub id: `model.path` when it
is one, or the id a hub-cache snapshot path holds; a plain local path is named in the text instead),
`library_name` (transformers, or peft for an adapter), `tags` (dpo, jdpo, the loss types, lora),
`datasets` (the sources that are hub names) and `license` (copied from the base's own card when it has
one). Then what the export is (which step, which checkpoint), the main training settings as a table,
the final and best eval metrics as a table (read back from the run's metrics.jsonl, so a card written
later by `Trainer.from_checkpoint(...).export()` has them too), how to load it (transformers, and
peft for an adapter), and the whole config as YAML.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from jdpo.config import Config, to_dict
from jdpo.data.sources import parse_source_spec
from jdpo.models.peft import qlora_note
from jdpo.report.metrics import METRICS_FILE, read_metrics

CARD = "README.md"
KINDS = ("model", "adapter", "merged")  # a full model, a PEFT adapter directory, LoRA merged into the base


def _front_matter(text: str) -> dict:
    """The YAML header of a model card (between the leading '---' lines), {} without one."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not m:
        return {}
    try:
        header = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return header if isinstance(header, dict) else {}


def hub_id(path: str) -> str | None:
    """The hub id a model path stands for: the path itself when it is not a local path (owner/name), the
    id of a hub-cache snapshot (`.../models--Owner--Name/snapshots/<sha>`), else None."""
    m = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", path)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return path
    return None


def base_card_header(path: str) -> dict:
    """The YAML header of the base model's own README.md (local base only), {} without one."""
    card = os.path.join(path, CARD)
    if not os.path.isfile(card):
        return {}
    with open(card, encoding="utf-8", errors="replace") as f:
        return _front_matter(f.read())


def hub_datasets(config: Config) -> list[str]:
    """The data sources that are hub dataset names (not local paths), amounts stripped, in order."""
    out = []
    for source in (*config.data.train, *config.data.eval):
        path = parse_source_spec(source).path
        if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) and path not in out:
            out.append(path)
    return out


def eval_records(output_dir) -> dict[int, dict[str, float]]:
    """step -> the eval metrics logged at that step, from the run's metrics.jsonl ({} without one)."""
    path = output_dir / METRICS_FILE
    if not path.exists():
        return {}
    out: dict[int, dict[str, float]] = {}
    for r in read_metrics(path):
        ev = {k: v for k, v in r.items() if k.startswith("eval/") and isinstance(v, int | float)}
        if ev:
            out.setdefault(int(r["step"]), {}).update(ev)
    return out


@dataclass(frozen=True)
class ModelCard:
    """What a run's cards say: its config, the step the export holds, the best eval (`train.keep_best`:
    step, metric, value; None without it), the run's eval metrics by step and its last step (the final
    column of the metrics: the run's, also on `best/`'s card; default `step`)."""

    config: Config
    step: int
    evals: dict[int, dict[str, float]]
    best: tuple[int, str, float] | None = None
    final_step: int | None = None

    @classmethod
    def of_run(
        cls, config: Config, output_dir, step: int, best=None, final_step: int | None = None
    ) -> ModelCard:
        """The card of a run in `output_dir` whose export holds `step`; `best` a `guards.BestEval` (or
        None); `final_step` the run's last step."""
        best_eval = None if best is None or best.step is None else (best.step, best.metric, best.value)
        return cls(config, step, eval_records(output_dir), best_eval, final_step)

    def header(self, kind: str) -> dict[str, Any]:
        c = self.config
        base = hub_id(c.model.path)
        header: dict[str, Any] = {}
        if base:
            header["base_model"] = base
        header["library_name"] = "peft" if kind == "adapter" else "transformers"
        tags = ["dpo", "jdpo", *c.dpo.loss_type, *(["lora"] if c.lora.rank else [])]
        tags += ["online-dpo"] if c.dpo.online else []
        header["tags"] = list(dict.fromkeys(tags))
        datasets = hub_datasets(c)
        if datasets:
            header["datasets"] = datasets
        base_header = base_card_header(c.model.path)
        for key in ("license", "license_name", "license_link"):
            if key in base_header:
                header[key] = base_header[key]
        header["pipeline_tag"] = "text-generation"
        return header

    def settings(self) -> list[tuple[str, Any]]:
        c = self.config
        rows = [
            ("base model", c.model.path),
            ("loss", ", ".join(c.dpo.loss_type)),
            ("beta", c.dpo.beta),
            ("reference", c.dpo.reference),
            ("learning rate", c.optim.learning_rate),
            ("steps", self.step),
            ("rows per micro-batch x micro-batches", f"{c.train.batch_rows} x {c.train.grad_accum}"),
            ("max length / max prompt length", f"{c.data.max_length} / {c.data.max_prompt_length}"),
            ("train data", ", ".join(c.data.train)),
            ("eval data", ", ".join(c.data.eval) or f"eval_fraction {c.data.eval_fraction}"),
            ("seed", c.train.seed),
        ]
        if c.data.chat_template_kwargs:
            rows.append(("chat template kwargs", dict(c.data.chat_template_kwargs)))
        if c.lora.rank:
            lo = c.lora
            quantized = f", base quantised to {lo.quantize}" if lo.quantize != "none" else ""
            rows.append(
                ("LoRA", f"rank {lo.rank}, alpha {lo.alpha}, targets {', '.join(lo.targets)}{quantized}")
            )
        if c.dpo.online:
            o = c.online
            sampling = f"{o.samples_per_prompt} samples x {o.prompts_per_step} prompts a step"
            rows.append(("online", f"reward {o.reward}, {sampling}, <= {o.max_new_tokens} new tokens"))
        return rows

    def metrics_table(self) -> str:
        """| metric | final (step s) | best (step b) |; a line saying so without evals."""
        if not self.evals:
            return "No eval split was evaluated (give `data.eval` or `data.eval_fraction`).\n"
        last = self.step if self.final_step is None else self.final_step
        final_step = max((s for s in self.evals if s <= last), default=None)
        cols = []
        if final_step is not None:
            cols.append((f"final (step {final_step})", self.evals[final_step]))
        if self.best is not None and self.best[0] in self.evals:
            cols.append((f"best by {self.best[1]} (step {self.best[0]})", self.evals[self.best[0]]))
        if not cols:
            return "No eval up to this step.\n"
        names = sorted({k for _, ev in cols for k in ev})
        lines = ["| metric | " + " | ".join(h for h, _ in cols) + " |", "|---|" + "---|" * len(cols)]
        for name in names:
            cells = [f"{ev[name]:.4g}" if name in ev else "" for _, ev in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def usage(self, kind: str, name: str, revision: str | None = None) -> str:
        base = hub_id(self.config.model.path) or self.config.model.path
        args = f'"{name}"' + (f', revision="{revision}"' if revision else "")
        jdpo = "" if revision else f"\nor with jdpo: `jdpo generate --model {name} --prompt '...'`.\n"
        if kind == "adapter":
            return (
                "```python\nfrom peft import AutoPeftModelForCausalLM\n"
                "from transformers import AutoTokenizer\n\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained({args})  # loads the base: {base}\n"
                f"tokenizer = AutoTokenizer.from_pretrained({args})\n"
                "merged = model.merge_and_unload()  # or keep the adapter separate\n```\n" + jdpo
            )
        return (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({args})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({args})\n```\n" + jdpo
        )

    def render(self, kind: str, name: str, *, best: bool = False, revision: str | None = None) -> str:
        """The card of the export `name` (its directory name, or a hub id with its `revision`) of `kind`
        (`KINDS`); `best`: the export of `train.keep_best`'s checkpoint."""
        if kind not in KINDS:
            raise ValueError(f"model card kind {kind!r}: one of {KINDS}")
        c = self.config
        what = {
            "model": "the policy",
            "adapter": "the policy's LoRA adapter (PEFT format)",
            "merged": "the policy with its LoRA adapter merged into the base",
        }[kind]
        held = f"the state after step {self.step}"
        if best and self.best is not None:
            step, metric, value = self.best
            held = f"the checkpoint of the best eval ({metric} = {value:.4g}, step {step})"
        parts = [
            "---\n" + yaml.safe_dump(self.header(kind), sort_keys=False) + "---\n",
            f"# {name.rstrip('/').split('/')[-1]}\n",
            f"{what.capitalize()} trained with Direct Preference Optimization ({', '.join(c.dpo.loss_type)}, "
            f"beta {c.dpo.beta}) by jdpo from `{c.model.path}`: {held}.\n",
        ]
        if kind == "adapter" and c.lora.quantize != "none":
            note = qlora_note(c.lora.quantize, name.rstrip("/").split("/")[-1])
            parts.append(note.replace("# ", "## ", 1))
        parts += [
            "## Training settings\n",
            "| setting | value |\n|---|---|\n"
            + "".join(f"| {k} | {str(v).replace('|', '/')} |\n" for k, v in self.settings()),
            "## Evaluation\n",
            self.metrics_table(),
            "## How to load\n",
            self.usage(kind, name, revision),
            "## Full config\n",
            "<details><summary>config.yaml</summary>\n\n```yaml\n"
            + yaml.safe_dump(to_dict(c), sort_keys=False)
            + "```\n\n</details>\n",
        ]
        return "\n".join(parts)


def write_card(directory: str, card: ModelCard, kind: str, name: str, *, best: bool = False,
               revision: str | None = None) -> None:  # fmt: skip
    """`README.md` in the (local) export `directory` (`ModelCard.render`'s arguments)."""
    with open(os.path.join(directory, CARD), "w", encoding="utf-8") as f:
        f.write(card.render(kind, name, best=best, revision=revision))
