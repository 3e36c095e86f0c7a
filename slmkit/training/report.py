"""What a training run leaves for people: the loss-curve PNG and the model card (README.md with a HF YAML header)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slmkit.files import atomic_write_bytes


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-line leaves a torn last line; skip it
            continue
    return rows


def plot_loss(metrics: list[dict], out_png: Path, title: str = "") -> Path | None:
    """Train loss (smoothed) and validation loss against tokens seen."""
    train = [m for m in metrics if m.get("kind") == "train"]
    val = [m for m in metrics if m.get("kind") in ("eval", "final") and "loss" in m]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        xs, ys = [m["tokens"] for m in train], [m["loss"] for m in train]
        ema, smooth = ys[0], []
        for y in ys:  # exponential moving average: per-step loss is noisy at small batch sizes
            ema = 0.9 * ema + 0.1 * y
            smooth.append(ema)
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth, color="tab:blue", label="train loss")
    if val:
        ax.plot([m["tokens"] for m in val], [m["loss"] for m in val], "o-", color="tab:orange", label="val loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png


_ORDER = {"epoch": "shuffled passes: every window once a pass, at a moving phase",
          "random": "independent random windows"}


def write_model_card(out: Path, info: dict) -> None:
    """README.md with the Hugging Face YAML header and the run's figures."""
    final = info.get("final_eval") or {}
    lr = float(info.get("lr") or float("nan"))  # 3 significant digits: 0.009, not 0.009000000000000001
    from slmkit.model.presets import is_encoder

    enc = is_encoder(info)  # masked-LM encoders: another pipeline, another way to use the folder
    kind, auto = ("masked-LM encoder", "AutoModelForMaskedLM") if enc else ("decoder", "AutoModelForCausalLM")
    use = (f"slm finetune {out} --task classify --data train.csv --out classifier" if enc else
           f"slm generate {out} --prompt 'Once upon a time'")
    header = ["---", "library_name: transformers", f"pipeline_tag: {'fill-mask' if enc else 'text-generation'}",
              "tags:", "- slmkit",
              "- small-language-model", f"- {info.get('model_type', 'llama')}", "---", ""]
    lines = [
        f"# {out.name}", "",
        f"A {info['parameters']:,}-parameter {info.get('model_type', 'llama')} {kind} trained from scratch with "
        "[slmkit](https://pypi.org/project/slmkit/) (`slm train`).", "",
        "## Use", "", "```bash", use, "```", "", "```python",
        f"from transformers import {auto}, AutoTokenizer",
        f"model = {auto}.from_pretrained('{out}')",
        f"tokenizer = AutoTokenizer.from_pretrained('{out}')", "```", "",
        "## Model", "", "| field | value |", "|---|---|",
        f"| preset | {info.get('preset')} |", f"| parameters | {info['parameters']:,} |",
        f"| layers / width / heads | {info.get('layers')} / {info.get('hidden_size')} / {info.get('heads')} |",
        f"| context (tokens) | {info.get('block_size')} |",
        f"| tokenizer | {info.get('tokenizer')} ({info.get('vocab_size'):,} tokens) |", "",
        "## Data", "", f"- files: {', '.join(info.get('data', [])[:5])}{' …' if len(info.get('data', [])) > 5 else ''}",
        f"- {info.get('corpus_tokens', 0):,} tokens ({info.get('corpus_bytes', 0):,} bytes); "
        + (f"held out: {', '.join(info['eval_data'])}" if info.get("eval_data") else
           f"last {info.get('val_fraction', 0):.1%} held out"), "",
        "## Training", "", "| field | value |", "|---|---|",
        f"| steps | {info.get('step', 0):,}{' (stopped early: held-out loss rose)' * bool(info.get('stopped_early'))}"
        " |",
        f"| tokens seen | {info.get('tokens_seen', 0):,} |",
        *([f"| weights kept | step {info['best_step']:,} (best held-out loss) |"]
          if info.get("best_step") not in (None, info.get("step")) else []),
        f"| training time | {info.get('train_seconds', 0):.0f} s |",
        f"| throughput | {info.get('tokens_per_s', 0):,.0f} tokens/s |",
        f"| batch × block × accumulation | {info.get('batch_size')} × {info.get('block_size')} × "
        f"{info.get('grad_accum')} |",
        f"| learning rate | {lr:.3g} (warmup + cosine) |",
        *([f"| data order | {_ORDER.get(info['sampling'], info['sampling'])} |"] if info.get("sampling") else []),
        *([f"| weight decay | {info['weight_decay']:.3g} |"] if info.get("weight_decay") is not None else []),
        *([f"| residual dropout | {info['dropout']:g} from {info.get('dropout_start') or 0:.0%} of the budget |"]
          if info.get("dropout") else []),
        *([f"| logits | divided by {info['logit_temperature']:g} after training (fitted on the held-out split) |"]
          if info.get("logit_temperature", 1.0) != 1.0 else []),
        f"| device / dtype | {info.get('device')} / "
        f"{info.get('dtype')} |", "",
        "## Evaluation (held-out split)", "", "| metric | value |", "|---|---|",
        f"| loss (nats/token) | {final.get('loss', float('nan')):.4f} |",
        f"| perplexity | {final.get('perplexity', float('nan')):.2f} |",
        f"| bits per byte | {final.get('bits_per_byte', float('nan')):.4f} |",
        f"| tokens evaluated | {final.get('tokens', 0):,} |", "",
        "![loss curve](loss.png)", "",
    ]
    if info.get("samples"):
        lines += ["## Samples", ""] + [f"```text\n{s}\n```\n" for s in info["samples"]]
    atomic_write_bytes(out / "README.md", "\n".join(header + lines).encode())


def plot_confusion(cm, labels: list[str], out_png: Path, title: str = "") -> Path:
    """Confusion-matrix heat map with counts (rows: true label, columns: predicted)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    k = len(labels)
    size = min(16, 4 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ax.imshow(cm, cmap="Blues")
    if k <= 30:  # beyond that the numbers are unreadable; the colours still show the structure
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(out_png), buf.getvalue())
    return Path(out_png)
