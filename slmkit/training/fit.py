"""`fit`, the one training loop every recipe uses (train, finetune, classify, distillation), and its budget.

Budgets: --steps, --tokens, --time (training time; evaluation and checkpoint writes are not counted). The learning
rate warms up, then follows a cosine to 10% of its peak over whichever budget runs out first, so a time-limited run
still ends on a fully decayed schedule. Checkpoints are atomic and hold optimizer, RNG and data-sampler state, so
`--resume` continues the same trajectory.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slmkit.distributed import any_rank, is_main, world_size
from slmkit.model.folder import unwrap


def get_lr(step: int, progress: float, lr: float, warmup_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup over WARMUP_STEPS, then cosine from LR to LR*MIN_LR_RATIO as PROGRESS goes 0 -> 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps  # +1: step 0 must not train at lr=0
    p = min(max(progress, 0.0), 1.0)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


@dataclass
class Budget:
    steps: int | None = None
    tokens: int | None = None
    seconds: float | None = None

    def progress(self, step: int, tokens: int, seconds: float) -> float:
        parts = [step / self.steps if self.steps else 0.0, tokens / self.tokens if self.tokens else 0.0,
                 seconds / self.seconds if self.seconds else 0.0]
        return max(parts)


@dataclass
class FitState:
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    best_val: float | None = None
    last_eval: dict = field(default_factory=dict)


# Early stopping counts an evaluation against the patience only when its held-out loss is this much (relative) above
# the best: overfitting climbs well past it, while a plateau's evaluation-to-evaluation noise stays below.
WORSE_BY = 0.01


@dataclass
class EarlyStop:
    """Held-out early stopping for every recipe: the best loss so far, and how many evaluations since scored over
    WORSE_BY worse than it (a classifier's recipe counts every evaluation that is not better: worse_by 0), stopping
    at PATIENCE of them once MIN_STEP steps are done. The caller writes its folder when update() says the loss
    improved, so the folder always holds the best weights; `as_dict()` travels in checkpoints so a resumed run keeps
    counting."""
    patience: int
    worse_by: float = WORSE_BY
    min_step: int = 0
    best_loss: float | None = None
    best_step: int | None = None
    bad: int = 0
    last_step: int | None = None

    def update(self, loss: float, step: int) -> tuple[bool, bool]:
        """Record an evaluation at STEP -> (improved, stop)."""
        self.last_step = step
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step, self.bad = loss, step, 0
            return True, False
        if loss > self.best_loss * (1 + self.worse_by):
            self.bad += 1
        return False, self.bad >= self.patience and step >= self.min_step

    def as_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad": self.bad}

    def load(self, saved: dict) -> None:
        self.best_loss, self.best_step, self.bad = saved.get("best_loss"), saved.get("best_step"), saved.get("bad", 0)

    def report(self, stopped_early: bool, step: int) -> str:
        why = (f"stopped early at step {step:,}: {self.patience} evaluations over {self.worse_by:.0%} worse than the "
               "best; more training would overfit this data (add data; --patience 0 runs the whole budget). "
               if stopped_early else "")
        return (f"{why}The held-out loss was best at step {self.best_step:,} ({self.best_loss:.4f}): the output "
                "folder keeps those weights.")


@dataclass
class FitConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    grad_accum: int = 1
    clip: float = 1.0
    eval_every_s: float = 30.0
    eval_every_steps: int | None = None
    eval_max_steps: int | None = None  # also evaluate at every multiple of this many steps (resumes keep the grid)
    checkpoint_every_s: float = 120.0
    log_every_s: float = 1.0
    autocast_dtype: torch.dtype | None = None
    device: str = "cpu"
    progress_bar: bool = True
    on_progress: Callable[[float], None] | None = None  # called before each step with the schedule's progress (0-1)


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, next_batch, loss_fn, budget: Budget,
        cfg: FitConfig, state: FitState, evaluate=None, checkpoint=None, log=None) -> FitState:
    """Train MODEL until BUDGET is spent or a stop is requested (Ctrl-C / SIGTERM).

    next_batch() -> (x, y); loss_fn(model, x, y) -> scalar loss; evaluate(model) -> dict with 'loss' ('stop': True
    ends training early);
    checkpoint(state) writes a resumable checkpoint; log(dict) appends to metrics.jsonl. Returns the final state.
    """
    stop = {"requested": False}

    def request_stop(signum, frame):  # first signal: finish this step, save, exit cleanly; second: abort now
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        if is_main():
            print("\nstopping: finishing the step and saving a checkpoint (again to abort)", file=sys.stderr)

    # signal handlers can only be set from the main thread; a run in another (a federated client inside Flower's
    # simulation) leaves Ctrl-C to whoever owns that thread
    in_main = threading.current_thread() is threading.main_thread()
    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    bar = _progress_bar(budget, state, cfg.progress_bar and is_main())
    # fp16's narrow range underflows small gradients to zero: scale the loss up, unscale before clipping, skip steps
    # whose gradients overflowed (bf16 has fp32's range and needs none of this)
    scaler = torch.amp.GradScaler(cfg.device.split(":")[0]) if cfg.autocast_dtype == torch.float16 else None
    model.train()
    last_log = last_eval = last_ckpt = time.perf_counter()
    window_tokens, window_t0 = 0, time.perf_counter()
    try:
        while True:
            progress = budget.progress(state.step, state.tokens, state.train_seconds)
            if any_rank(progress >= 1.0 or stop["requested"] or bool(state.last_eval.get("stop"))):
                break
            t0 = time.perf_counter()
            if cfg.on_progress:
                cfg.on_progress(progress)
            lr = get_lr(state.step, progress, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, step_tokens = _step(model, optimizer, next_batch, loss_fn, cfg, scaler)
            state.step += 1
            state.tokens += step_tokens
            state.train_seconds += time.perf_counter() - t0
            window_tokens += step_tokens
            if not math.isfinite(loss_sum):
                raise SystemExit(f"error: loss became {loss_sum} at step {state.step}; lower --lr or use --dtype fp32")
            now = time.perf_counter()
            last_step = budget.progress(state.step, state.tokens, state.train_seconds) >= 1.0
            if now - last_log >= cfg.log_every_s or state.step == 1 or last_step:  # the curve ends where training did
                tps = window_tokens / max(1e-9, now - window_t0)
                if log:
                    log({"kind": "train", "step": state.step, "tokens": state.tokens, "loss": loss_sum, "lr": lr,
                         "tokens_per_s": tps, "train_seconds": state.train_seconds})
                if bar is not None:
                    bar.set_postfix_str(f"loss {loss_sum:.3f} | {tps:,.0f} tok/s | lr {lr:.1e}", refresh=False)
                window_tokens, window_t0, last_log = 0, now, now
            if bar is not None:
                _advance(bar, budget, state)
            due_eval = (cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0) or (
                not cfg.eval_every_steps and now - last_eval >= cfg.eval_every_s) or (
                cfg.eval_max_steps and state.step % cfg.eval_max_steps == 0)
            if evaluate is not None and any_rank(bool(due_eval)):
                _run_eval(model, evaluate, state, log)
                last_eval = time.perf_counter()
            if checkpoint is not None and any_rank(now - last_ckpt >= cfg.checkpoint_every_s):
                checkpoint(state)
                last_ckpt = time.perf_counter()
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()
    state.last_eval["interrupted"] = stop["requested"]
    return state


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, next_batch, loss_fn,
          cfg: FitConfig, scaler: torch.amp.GradScaler | None = None) -> tuple[float, int]:
    """One optimizer step over GRAD_ACCUM micro-batches -> (the step's loss, the tokens it trained on, all ranks)."""
    loss_sum, step_tokens = 0.0, 0
    for micro in range(cfg.grad_accum):
        x, y = next_batch()
        sync = micro == cfg.grad_accum - 1  # DDP: all-reduce the gradients on the last micro-batch only
        ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else _null()
        amp = torch.autocast(device_type=cfg.device.split(":")[0], dtype=cfg.autocast_dtype or torch.float32,
                             enabled=cfg.autocast_dtype is not None)
        with ctx, amp:
            loss = loss_fn(model, x, y) / cfg.grad_accum
        (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.item()
        step_tokens += x.numel() * world_size()
    if scaler:
        scaler.unscale_(optimizer)  # the clip threshold is in true gradient units
    if cfg.clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    if scaler:
        scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then halves
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    return loss_sum, step_tokens


def _run_eval(model, evaluate, state: FitState, log) -> None:
    result = evaluate(unwrap(model))
    state.last_eval = result
    state.best_val = result["loss"] if state.best_val is None else min(state.best_val, result["loss"])
    if log:
        log({"kind": "eval", **result, "step": state.step, "tokens": state.tokens, "eval_tokens": result["tokens"],
             "train_seconds": state.train_seconds})


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress_bar(budget: Budget, state: FitState, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    total, unit, n = _bar_position(budget, state)
    count = "" if unit == "%" else "{n_fmt}/{total_fmt} {unit} "  # a percent bar: its left part says it already
    return tqdm(total=total, initial=n, unit=unit, dynamic_ncols=True, mininterval=0.5, file=sys.stderr,
                bar_format="{l_bar}{bar}| " + count + "[{elapsed}<{remaining}]{postfix}")  # tqdm adds ", "


def _bar_position(budget: Budget, state: FitState) -> tuple[int, str, int]:
    """(total, unit, position) of the progress bar: the budget's own unit, so a --time bar's ETA is the budget's;
    with two budgets (--time and the pass cap, or --steps and --time), percent of the schedule's progress, which
    follows whichever ends first."""
    if sum(1 for b in (budget.steps, budget.tokens, budget.seconds) if b) > 1:
        return 100, "%", min(100, int(100 * budget.progress(state.step, state.tokens, state.train_seconds)))
    if budget.seconds:
        return int(budget.seconds), "s", int(state.train_seconds)
    if budget.steps:
        return budget.steps, "step", state.step
    return budget.tokens, "tok", state.tokens


def _advance(bar, budget: Budget, state: FitState) -> None:
    target = _bar_position(budget, state)[2]
    if target > bar.n:
        bar.update(min(target, bar.total) - bar.n)
