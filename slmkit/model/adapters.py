"""Verb `merge`: fold a LoRA adapter into its base model and write a plain model folder.

    adapter folder (adapter_config.json + adapter_model.safetensors + slmkit_adapter.json) + its base folder
      -> base loaded in float32 (dequantized) -> peft merge_and_unload -> parity check -> model folder

`slm finetune --lora` records which base an adapter was trained on: the base folder's path and a fingerprint of its
weights (`slmkit_adapter.json`). Merging into any other weights would silently produce a different model, so it is
refused. `slm generate` / `slm chat` / `slm eval` open an adapter folder by merging it in memory (`load_merged`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

ADAPTER_RECORD = "slmkit_adapter.json"


def require_peft():
    try:
        import peft
    except ImportError:
        raise SystemExit("error: LoRA needs peft: pip install 'slmkit[finetune]'") from None
    return peft


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: the identity of a set of weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()[:32]


def is_adapter_folder(path: Path) -> bool:
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def read_adapter_record(adapter_dir: Path) -> dict:
    """The base an adapter was trained on: {"base_model": path, "base_fingerprint": sha, ...}."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SystemExit(f"error: {adapter_dir} is not a LoRA adapter folder (no adapter_config.json); "
                         "point at the --out of `slm finetune --lora`")
    record_path = adapter_dir / ADAPTER_RECORD
    if record_path.is_file():
        return json.loads(record_path.read_text())
    # An adapter from another tool: peft's own note of the base is all there is.
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {"base_model": cfg.get("base_model_name_or_path"), "base_fingerprint": None}


def base_dir_of(adapter_dir: Path, base: Path | None = None) -> Path:
    """The base model folder of ADAPTER_DIR (BASE overrides the recorded one)."""
    recorded = read_adapter_record(adapter_dir).get("base_model")
    path = Path(base or recorded or "")
    if not str(path) or not (path / "config.json").is_file():
        raise SystemExit(f"error: the base model of adapter {adapter_dir} ({path}) is not a model folder; "
                         "pass the base folder with --base")
    return path


def merged_model(adapter_dir: Path, base: Path | None = None, check: bool = True) -> torch.nn.Module:
    """Base (float32) + adapter -> a transformers model with the adapter folded into its weights.

    Refuses a base whose weights differ from the ones the adapter was trained on. With CHECK, compares the merged
    model's logits with base+adapter's on a probe sequence.
    """
    require_peft()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slmkit.model.weights import open_pretrained

    adapter_dir = Path(adapter_dir)
    record = read_adapter_record(adapter_dir)
    base_dir = base_dir_of(adapter_dir, base)
    model = open_pretrained(AutoModelForCausalLM, base_dir, dtype=torch.float32)
    want = record.get("base_fingerprint")
    if want and weights_fingerprint(model) != want:
        raise SystemExit(f"error: adapter {adapter_dir} was trained on other weights than {base_dir} (fingerprint "
                         f"{want} in {ADAPTER_RECORD}); merge it into the base it was trained on")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names that are not this base's
        raise SystemExit(f"error: adapter {adapter_dir} does not fit base {base_dir} "
                         f"({str(e).splitlines()[0][:200]}); merge it into the base it was trained on") from None
    peft_model.eval()
    probe = torch.arange(min(16, model.config.vocab_size)).unsqueeze(0) % model.config.vocab_size  # (1, 16)
    with torch.no_grad():
        expected = peft_model(input_ids=probe).logits if check else None
        merged = peft_model.merge_and_unload()
        if check:
            got = merged(input_ids=probe).logits
            err = (got - expected).abs().max().item()
            if err > 1e-3 * max(1.0, expected.abs().max().item()):
                raise SystemExit(f"error: merged logits differ from base+adapter by {err:.2e}; the merge failed")
    return merged.eval()


def load_merged(adapter_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An adapter folder as a ready model (merged in memory): slmkit's fast module for plain Llama bases."""
    from slmkit.model.block import rope_theta
    from slmkit.model.folder import from_hf_state_dict, supports_fast_path
    from slmkit.model.llama import Llama

    model = merged_model(adapter_dir, check=False)
    cfg = model.config.to_dict()
    if supports_fast_path(cfg):
        cfg["rope_theta"] = rope_theta(cfg)
        cfg.setdefault("rms_norm_eps", 1e-6)
        model = from_hf_state_dict(Llama(cfg), model.state_dict())
    return model.to(dtype).eval()
