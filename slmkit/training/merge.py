"""training.merge."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from slmkit.files import check_out, replace_dir
from slmkit.model.adapters import base_dir_of, merged_model, read_adapter_record


def main(adapter_dir: Path, out: Path, base: Path | None = None, overwrite: bool = False) -> Path:
    """Merge the LoRA adapter in ADAPTER_DIR into its base model and write a plain model folder to OUT.

    The base is the one recorded by `slm finetune --lora` (or --base); other weights are refused.
    """
    from slmkit.model.tokenizer import load_tokenizer

    adapter_dir, out = Path(adapter_dir), Path(out)
    read_adapter_record(adapter_dir)
    check_out(out, overwrite, sources=[adapter_dir, base_dir_of(adapter_dir, base)])
    model = merged_model(adapter_dir, base)
    tok_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir_of(adapter_dir, base)
    tokenizer = load_tokenizer(tok_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # everything goes to a temp folder first, renamed into place at the end: nothing half-written
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {**read_adapter_record(adapter_dir), "merged_from": str(adapter_dir.resolve())}
        (tmp / "slmkit_merge.json").write_text(json.dumps(record, indent=2) + "\n")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged {adapter_dir} into {base_dir_of(adapter_dir, base)}: model folder {out}")
    return out


def add_args(p) -> None:
    p.add_argument("adapter_dir", type=Path, help="LoRA adapter folder written by `slm finetune --lora`")
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--base", type=Path, default=None, help="base model folder (default: the one the adapter "
                   "records); must hold the weights the adapter was trained on")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
