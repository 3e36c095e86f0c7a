"""A client's side of a federated round, without Flower: its silo's tokens, local training from the global weights
(training/fit.py's loop for a step budget, FedProx's proximal term when asked), its held-out loss.

client.py wires these into a Flower ClientApp; the server never sees anything but the weights they return and the
figures in `metrics` (losses, token counts, seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from slmkit.data.corpus import expand_paths, get_batch, load_tokens, split_tokens, tokenize_to_memmap
from slmkit.data.mlm import MaskInfo, evaluate_mlm, get_mlm_batch, mask_info, mlm_loss
from slmkit.hardware import eval_dtype
from slmkit.infer.evaluate import evaluate_tokens
from slmkit.model.tokenizer import token_byte_lengths
from slmkit.training.fit import Budget, FitConfig, FitState, fit
from slmkit.training.losses import causal_lm_loss
from slmkit.training.optim import make_optimizer


@dataclass
class Silo:
    """One client's text as tokens: the training part and its own held-out part (never sent anywhere)."""
    train: np.ndarray
    val: np.ndarray
    token_bytes: np.ndarray  # bytes of text per token id: bits per byte
    mask: MaskInfo | None = None  # an encoder's: its text trains and scores as a masked LM


def open_silo(paths: list[str], tokenizer, block: int, val_fraction: float = 0.1, text_col: str = "text",
              replace_errors: bool = False, encoder: bool = False) -> Silo:
    """PATHS tokenized (cached by content, as `slm train` does), the last VAL_FRACTION held out; ENCODER: masked
    LM batches and scores instead of next-token ones (data/mlm.py, as `slm train` pretrains encoders)."""
    files = expand_paths([str(p) for p in paths])
    bin_path, meta = tokenize_to_memmap(files, tokenizer, text_col=text_col, replace_errors=replace_errors)
    train, val = split_tokens(load_tokens(bin_path, meta), val_fraction, block)
    if len(train) <= block + 1 or len(val) <= block + 1:
        raise SystemExit(f"error: --data {' '.join(map(str, paths))}: {len(train) + len(val):,} tokens are too few "
                         f"for blocks of {block} tokens with a held-out part; give this client more text")
    return Silo(train, val, token_byte_lengths(tokenizer), mask_info(tokenizer) if encoder else None)


@dataclass
class RoundPlan:
    """What the server asks of a client in one round (sent in the train message's config)."""
    steps: int  # local optimizer steps
    lr: float  # constant within the round; the server anneals it across rounds
    batch: int
    block: int
    seed: int  # the round's and the client's: its batches
    weight_decay: float = 0.1
    prox_mu: float = 0.0  # FedProx: (mu/2) * ||w - w_global||^2 added to the loss
    clip: float = 1.0  # gradient clipping inside local training (not DP's update clipping)
    optimizer: str = "adamw"  # or "muon" (training/optim.py), as `slm train` picks


def proximal(loss_fn, model: nn.Module, mu: float):
    """LOSS_FN plus FedProx's (MU/2)||w - w0||^2 around the weights the round started from (Li et al. 2020): it keeps
    clients with unlike data from drifting apart between aggregations."""
    anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        params = [p for p in m.parameters() if p.requires_grad]
        drift = sum(((p.float() - a.float()) ** 2).sum() for p, a in zip(params, anchor, strict=True))
        return loss_fn(m, x, y) + 0.5 * mu * drift

    return loss


def train_round(model: nn.Module, silo: Silo, plan: RoundPlan, device: str = "cpu",
                autocast: torch.dtype | None = None, optimizer_state: dict | None = None) -> dict:
    """PLAN.steps steps of local training on SILO, in place -> {"train_loss", "tokens", "seconds",
    "optimizer_state"}. OPTIMIZER_STATE: the client's AdamW moments (and Muon's momentum) from its previous round
    (they stay on the client):
    restarting Adam every round makes its first steps sign-like jumps of size lr on every weight, which the
    average then has to undo; the first round, without moments, warms the learning rate up instead."""
    gen = torch.Generator().manual_seed(plan.seed)
    optimizer = make_optimizer(model, plan.lr, plan.weight_decay, device, plan.optimizer)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    base_loss = mlm_loss if silo.mask else causal_lm_loss
    loss_fn = proximal(base_loss, model, plan.prox_mu) if plan.prox_mu > 0 else base_loss
    next_batch = (lambda: get_mlm_batch(silo.train, plan.batch, plan.block, gen, silo.mask, device)) if silo.mask \
        else (lambda: get_batch(silo.train, plan.batch, plan.block, gen, device))
    last: dict = {}
    warmup = 0 if optimizer_state is not None else min(plan.steps, 20)
    cfg = FitConfig(lr=plan.lr, min_lr_ratio=1.0, warmup_steps=warmup, clip=plan.clip, eval_every_s=math.inf,
                    checkpoint_every_s=math.inf, log_every_s=0.0, autocast_dtype=autocast, device=device,
                    progress_bar=False)
    state = fit(model, optimizer, next_batch, loss_fn,
                Budget(steps=plan.steps), cfg, FitState(), log=last.update)
    if state.last_eval.get("interrupted"):  # Ctrl-C / SIGTERM in a simulation: stop the run, not just this round
        raise KeyboardInterrupt
    model.eval()
    return {"train_loss": float(last.get("loss", math.nan)), "tokens": state.tokens, "seconds": state.train_seconds,
            "optimizer_state": optimizer.state_dict()}


def flat_optimizer_state(sd: dict) -> dict[str, np.ndarray]:
    """An optimizer's state_dict()["state"] as flat float arrays ("3/exp_avg", "3/step", ...)."""
    return {f"{i}/{k}": v.detach().float().cpu().numpy().reshape(v.shape) for i, st in sd["state"].items()
            for k, v in st.items() if torch.is_tensor(v)}


def nested_optimizer_state(flat: dict[str, np.ndarray], template: dict) -> dict:
    """The inverse of flat_optimizer_state, with TEMPLATE's param_groups (a fresh optimizer's state_dict())."""
    state: dict = {}
    for key, arr in flat.items():
        i, name = key.split("/", 1)
        state.setdefault(int(i), {})[name] = torch.from_numpy(np.array(arr, dtype=np.float32))
    return {"state": state, "param_groups": template["param_groups"]}


def evaluate_silo(model: nn.Module, silo: Silo, block: int, max_tokens: int = 65536, device: str = "cpu",
                  autocast: torch.dtype | None = None) -> dict:
    """The model's loss on the client's held-out tokens: {"loss", "tokens", "bits_per_byte", ...}."""
    score = partial(evaluate_mlm, info=silo.mask) if silo.mask else evaluate_tokens
    return score(model, silo.val, block, silo.token_bytes, max_windows=max(1, max_tokens // block), device=device,
                 autocast_dtype=eval_dtype(autocast, device))
