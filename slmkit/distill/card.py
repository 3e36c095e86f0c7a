"""The student's model card (README.md): what it was distilled from, how, and what it kept of the teacher."""

from __future__ import annotations

import math

from slmkit.files import atomic_write_bytes

METRIC = {"classify": "accuracy", "causal": "loss", "mlm": "loss"}


def retention(task: str, student: dict, teacher: dict) -> float | None:
    """What the student kept of the teacher on the same held-out split: its accuracy over the teacher's (classify),
    or the teacher's perplexity over its own, exp(teacher loss - student loss) (causal, mlm): 1.0 = as good."""
    if not student or not teacher:
        return None
    if task == "classify":
        return student["accuracy"] / max(teacher["accuracy"], 1e-12)
    return math.exp(teacher["loss"] - student["loss"])


def write_card(cfg, summary: dict) -> None:
    final, teacher = summary["final_eval"], summary["teacher_eval"]
    metric = METRIC[cfg.task]
    auto = {"causal": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM",
            "classify": "AutoModelForSequenceClassification"}[cfg.task]
    loss = (f"{cfg.alpha_ce:g} x soft CE (T={cfg.temperature:g}) + {cfg.alpha_mlm:g} x masked-LM + "
            f"{cfg.alpha_cos:g} x hidden-state cosine (DistilBERT)" if cfg.task == "mlm" else
            f"{cfg.alpha:g} x T^2 x {cfg.loss} (T={cfg.temperature:g}) + {1 - cfg.alpha:g} x cross-entropy on the "
            "data's labels")
    kept = summary.get("retention")
    lines = ["---", "library_name: transformers", "tags:", "- slmkit", "- distillation", "---", "",
             f"# {cfg.out.name}", "",
             f"A {summary['parameters']:,}-parameter student distilled from `{cfg.teacher}` with slmkit "
             f"(`slm distill --task {cfg.task}`).", "",
             "```python", f"from transformers import {auto}, AutoTokenizer",
             f"model = {auto}.from_pretrained('{cfg.out}')", f"tokenizer = AutoTokenizer.from_pretrained('{cfg.out}')",
             "```", "", "## Distillation", "", "| field | value |", "|---|---|",
             f"| teacher | `{cfg.teacher}` |", f"| student | {summary['student']} |",
             f"| loss | {loss} |",
             f"| training | {summary['step']:,} steps, {summary['tokens_seen']:,} tokens, "
             f"{summary['train_seconds']:.0f} s ({summary['tokens_per_s']:,.0f} tokens/s) |",
             f"| data | {', '.join(cfg.data[:3])}{' …' if len(cfg.data) > 3 else ''} |"]
    if summary.get("cache"):
        c = summary["cache"]
        lines.append(f"| teacher cache | top-{c['k']} of {c['tokens']:,} positions, {c['bytes'] / 2**20:,.0f} MiB, "
                     f"built in {c['build_seconds']:.0f} s |")
    lines += ["", "## Held-out", ""]
    if final and teacher:
        lines += [f"| | {metric} |", "|---|---|", f"| student | {final[metric]:.4f} |",
                  f"| teacher | {teacher[metric]:.4f} |", "",
                  f"Retention: **{kept:.1%}** (" + ("accuracy over the teacher's" if cfg.task == "classify" else
                                                    "the teacher's perplexity over the student's") +
                  ", the same held-out split)."]
    else:
        lines.append("No held-out split was evaluated.")
    atomic_write_bytes(cfg.out / "README.md", ("\n".join(lines) + "\n").encode())
