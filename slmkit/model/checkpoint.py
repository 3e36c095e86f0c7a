"""Training checkpoints: one safetensors file holding model, optimizer and RNG state, written atomically.

No pickle anywhere: tensors go into safetensors, everything else (step, clocks, hyper-parameters, the run's
arguments) into the file's JSON metadata. A crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slmkit.files import atomic_write_bytes

CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generators: dict[str, torch.Generator], state: dict) -> None:
    """Write model + optimizer + RNG tensors and the STATE dict (JSON-serialisable) to PATH atomically."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"optim.{idx}.{name}"] = t.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    for name, g in generators.items():
        tensors[f"rng.{name}"] = g.get_state()
    meta = {"state": json.dumps(state), "param_groups": json.dumps(opt["param_groups"])}
    # Tied weights share storage; safetensors refuses aliases, so clone them apart.
    seen: dict[int, str] = {}
    for k, v in list(tensors.items()):
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen and ptr != -1:
            tensors[k] = v.clone()
        seen[ptr] = k
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))


def read_checkpoint_state(path: Path) -> dict:
    """Only the JSON state (cheap: no tensors are read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generators: dict[str, torch.Generator]) -> dict:
    """Restore model, optimizer and RNG state from PATH; return the saved STATE dict."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    groups = json.loads(meta["param_groups"])
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    for name, g in generators.items():
        g.set_state(tensors[f"rng.{name}"])
    return json.loads(meta["state"])
