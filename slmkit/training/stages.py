"""The stages every training recipe is made of: train, finetune, classify (and distill, federated clients) compose them.

    open_output -> recipe's own stages (data -> tokenizer -> model -> plan) -> Session.fit -> finish

- `open_output`: nothing in OUT is overwritten without --overwrite; --resume reads the saved run file.
- `Task`: what a recipe trains on (its batches, its loss, its held-out evaluation); recipes differ here.
- `Weights`: the one place a run writes its weights into its folder (a model, or a LoRA adapter) and reads the best
  ones back.
- `Session`: the run in its folder around `fit`: metrics log, atomic checkpoints and --resume from them, held-out
  evaluation with early stopping (the folder always holds the best weights so far), the best weights restored at
  the end.
- `finish`: the final evaluation logged, the loss plot and training_summary.json.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from slmkit import distributed as dist
from slmkit.data.corpus import EpochSampler
from slmkit.files import atomic_write_json, check_out
from slmkit.model.adapters import ADAPTER_RECORD, require_peft
from slmkit.model.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from slmkit.model.folder import load_saved_weights, save_model, unwrap
from slmkit.options import parse_duration
from slmkit.training.config import LoraConfig, RunConfig
from slmkit.training.fit import Budget, EarlyStop, FitConfig, FitState, fit
from slmkit.training.report import plot_loss, read_metrics

METRICS = "metrics.jsonl"
SUMMARY = "training_summary.json"


def cleans_up(*keep: str):
    """Decorator for a pipeline's run(cfg, ...): when the run fails (an error, Ctrl-C) before it left anything
    resumable in cfg.out (KEEP: e.g. its checkpoint), the folder it created is removed, so a failed run leaves no empty
    or half-written output behind. A folder that existed before the run is never touched."""
    keep = keep or (CHECKPOINT,)

    def wrap(run):
        @functools.wraps(run)
        def guarded(cfg, *args, **kwargs):
            out = Path(cfg.out)
            existed = out.exists()
            try:
                return run(cfg, *args, **kwargs)
            except BaseException:
                if not existed and out.is_dir() and not any((out / k).exists() for k in keep):
                    shutil.rmtree(out, ignore_errors=True)
                raise
        return guarded
    return wrap


def open_output(out: Path, resume: bool, overwrite: bool, run_file: str, holds: tuple[str, ...] = ("config.json",),
                clear: bool = False, resumable: bool = True, sources: Iterable[Path | str] = ()) -> dict | None:
    """Check OUT before anything is written: never the current folder, a parent of it, or one of the run's inputs
    (SOURCES: data, base model, teacher); --resume needs a checkpoint and RUN_FILE there (returned, parsed); a fresh
    run refuses a folder that already holds a model (HOLDS, or a checkpoint) unless --overwrite, which with CLEAR
    removes it first. RESUMABLE: whether the error may suggest --resume."""
    check_out(out, overwrite=True, sources=[Path(s) for s in sources])  # only the never-cases; the rest is below
    if resume:
        if not (out / CHECKPOINT).is_file() or not (out / run_file).is_file():
            raise SystemExit(f"error: --resume: {out} holds no {CHECKPOINT} of this kind of run; start without "
                             "--resume")
        return json.loads((out / run_file).read_text())
    if out.exists() and any((out / name).exists() for name in (*holds, CHECKPOINT)):
        if not overwrite:
            hint = "pass --resume to continue it, --overwrite to replace it" if resumable else "pass --overwrite"
            raise SystemExit(f"error: {out} already holds a model; {hint}, or choose another --out")
        if clear:
            shutil.rmtree(out)
    return None


@dataclass
class Task:
    """What a recipe trains on."""
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (x, y) on the device
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x, y) -> scalar
    evaluate: Callable[[nn.Module, int], dict] | None  # (model, at most N tokens) -> {'loss', 'tokens', ...}
    batches_per_pass: int  # this process's micro-batches in one pass over the training data
    generator: torch.Generator  # random draws and masks; checkpoints hold its state
    windows: EpochSampler | None = None  # shuffled passes (--sampling epoch); checkpoints hold its count
    note: str = ""  # what the start line says of the data
    final_tokens: int = 4_000_000  # held-out tokens the final evaluation reads at most


class TrainableView:
    """The trainable tensors of a model (a LoRA run's adapters) behind state_dict()/load_state_dict(), so a
    checkpoint holds the adapter and its optimizer state, not another copy of the frozen base."""

    def __init__(self, model: nn.Module):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def load_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        if set(sd) != set(self.params):
            raise SystemExit("error: --resume: the checkpoint holds other trainable tensors than this run builds "
                             "(different --lora-* settings?); resume with the original settings")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(sd[name])


@dataclass
class Weights:
    """Where a run's weights go: MODEL saved into FOLDER (config.json + model.safetensors), or, with ADAPTER (the
    record of its base: path, weight fingerprint), the peft adapter alone (adapter_config.json +
    adapter_model.safetensors + ADAPTER_RECORD)."""
    model: nn.Module
    folder: Path
    adapter: dict | None = None

    def write(self) -> None:
        if self.adapter is None:
            save_model(self.model, self.folder)
            return
        unwrap(self.model).save_pretrained(self.folder)
        atomic_write_json(self.folder / ADAPTER_RECORD, self.adapter)

    def restore(self) -> None:
        """Read the weights write() saved back into the model, in place."""
        if self.adapter is None:
            load_saved_weights(self.model, self.folder)
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(unwrap(self.model), load_file(self.folder / "adapter_model.safetensors"))

    def checkpoint_target(self):
        """What a checkpoint saves: the whole model, or an adapter's trainable tensors."""
        return self.model if self.adapter is None else TrainableView(self.model)


def add_lora(model: nn.Module, lora: LoraConfig, task_type: str, default_targets, example: str,
             modules_to_save: list[str] | None = None) -> nn.Module:
    """MODEL with peft LoRA adapters on LORA.targets (else DEFAULT_TARGETS), MODULES_TO_SAVE trained in full; peft's
    refusal of the targets is one line naming --lora-targets."""
    require_peft()
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.targets or default_targets
    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                         task_type=task_type, modules_to_save=modules_to_save)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        shown = ",".join(targets) if isinstance(targets, (list, tuple)) else str(targets)
        raise SystemExit(f"error: --lora-targets {shown}: {str(e).splitlines()[0]}; name linear layers of this "
                         f"model (e.g. {example})") from None


def fit_config(run: RunConfig, budget: Budget, device: str, lr: float, warmup: int, autocast_dtype,
               eval_max_steps: int | None, on_progress=None) -> FitConfig:
    """The loop's settings from the run's configuration and what the recipe resolved."""
    every = run.checkpoint_every
    return FitConfig(lr=lr, min_lr_ratio=run.min_lr_ratio, warmup_steps=warmup, grad_accum=run.grad_accum,
                     clip=run.clip, device=device, autocast_dtype=autocast_dtype, progress_bar=run.progress,
                     eval_max_steps=eval_max_steps, checkpoint_every_s=parse_duration(every) if every else math.inf,
                     on_progress=on_progress, **run.eval_schedule(budget))


@dataclass
class Session:
    """One training run in its output folder OUT (rank 0 writes; every rank trains)."""
    out: Path
    optimizer: torch.optim.Optimizer
    task: Task
    weights: Weights
    early: EarlyStop
    eval_tokens: int = 65536  # held-out tokens per periodic evaluation
    checkpoints: bool = True  # False: no checkpoint file (runs too short to resume)
    extra_state: dict = field(default_factory=dict)  # more JSON the checkpoint keeps (what --resume must check)
    state: FitState = field(default_factory=FitState)

    @property
    def model(self) -> nn.Module:
        return self.weights.model

    @property
    def keep_best(self) -> bool:
        return self.early.patience > 0 and self.task.evaluate is not None

    def start_log(self, resume: bool) -> None:
        """A fresh run starts a fresh metrics.jsonl; a resumed one appends."""
        if not resume and dist.is_main():
            (self.out / METRICS).unlink(missing_ok=True)

    def log(self, row: dict) -> None:
        if dist.is_main():
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")

    def resume(self) -> dict:
        """Model (or adapter), optimizer, RNG, data order and early stopping from OUT's checkpoint; -> its state."""
        gen, windows = self.task.generator, self.task.windows
        st = load_checkpoint(self.out / CHECKPOINT, self.weights.checkpoint_target(), self.optimizer, {"sampler": gen})
        if dist.world_size() > 1 and "sampler_states" in st:
            gen.set_state(torch.tensor(st["sampler_states"][dist.rank()], dtype=torch.uint8))
        self.state = FitState(st["step"], st["tokens"], st["train_seconds"], st.get("best_val"), {})
        if windows:
            windows.drawn = st.get("windows_drawn", 0)
        self.early.load(st)
        return st

    def evaluate(self, model: nn.Module) -> dict:
        """A periodic held-out evaluation; the folder takes the weights when the loss improves (early stopping)."""
        r = self.task.evaluate(model, self.eval_tokens)
        if self.keep_best:
            improved, r["stop"] = self.early.update(r["loss"], self.state.step)
            if improved and dist.is_main():
                self.weights.write()
        return r

    def checkpoint(self, st: FitState) -> None:
        states = dist.gather_states(self.task.generator.get_state())  # every rank's random draws, to resume each
        if not dist.is_main():
            return
        if self.checkpoints:
            extra = {"sampler_states": [s.tolist() for s in states]} if len(states) > 1 else {}
            windows = self.task.windows
            save_checkpoint(self.out / CHECKPOINT, self.weights.checkpoint_target(), self.optimizer,
                            {"sampler": self.task.generator},
                            {"step": st.step, "tokens": st.tokens, "train_seconds": st.train_seconds,
                             "best_val": st.best_val, **self.extra_state, **self.early.as_dict(), **extra,
                             "windows_drawn": windows.drawn if windows else 0})
        if not self.keep_best:  # otherwise evaluate() writes the weights when the held-out loss improves
            self.weights.write()

    def fit(self, budget: Budget, cfg: FitConfig, train_model: nn.Module | None = None, loss_fn=None) -> FitState:
        """Train until BUDGET is spent, Ctrl-C or early stopping; then the folder and the model hold the best
        weights (by held-out loss) and the checkpoint the last ones. TRAIN_MODEL: the module to step (DDP's wrapper),
        LOSS_FN: the task's, compiled."""
        self.state = fit(train_model or self.model, self.optimizer, self.task.next_batch, loss_fn or self.task.loss_fn,
                         budget, cfg, self.state, evaluate=self.evaluate if self.task.evaluate else None,
                         checkpoint=self.checkpoint, log=self.log)
        stopped_early = bool(self.state.last_eval.get("stop"))
        if self.keep_best and self.early.last_step != self.state.step:  # the last weights may be the best
            self.evaluate(self.model)
        self.checkpoint(self.state)  # after that evaluation, so a resumed run knows the best loss the folder holds
        if self.keep_best and dist.is_main() and self.early.best_step != self.state.step:
            self.weights.restore()
            print(self.early.report(stopped_early, self.state.step))
        return self.state

    def finish(self, final: dict, summary: dict, title: str) -> None:
        """Log the final held-out evaluation, plot the loss curve, write SUMMARY (rank 0)."""
        st = self.state
        self.log({"kind": "final", **final, "step": st.step, "tokens": st.tokens, "eval_tokens": final.get("tokens", 0),
                  "train_seconds": st.train_seconds})
        if dist.is_main():
            plot_loss(read_metrics(self.out / METRICS), self.out / "loss.png", title=title)
            atomic_write_json(self.out / SUMMARY, summary)

    def summary(self) -> dict:
        """The figures every recipe's summary starts with."""
        st = self.state
        return {"out": str(self.out), "step": st.step, "tokens_seen": st.tokens, "train_seconds": st.train_seconds,
                "tokens_per_s": st.tokens / max(1e-9, st.train_seconds),
                "interrupted": st.last_eval.get("interrupted", False), "best_step": self.early.best_step,
                "stopped_early": bool(st.last_eval.get("stop"))}
