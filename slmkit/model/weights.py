"""Reading weights safely: every corrupt or mismatched file ends as one line naming it and what to do, never as a
traceback and never as a silently random-initialised model.

    read_weights(path)        safetensors -> tensors (truncated / corrupt header / non-finite values: one line)
    check_tensors(...)        the tensor names a config's architecture needs vs those in the file
    open_pretrained(cls, dir) transformers' from_pretrained, refused when weights are missing, mismatched or pickled

Pickles are never unpickled: a folder with only pytorch_model.bin (or *.pt / *.ckpt) is refused before transformers
could fall back to torch.load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import torch

PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.pkl")
FIX_CORRUPT = "the file is truncated or corrupt; copy it again from where the model came from"


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of E's message (its type's name when it has none), cut at LIMIT characters."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def read_weights(path: Path, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a one-line error: missing, unreadable, truncated, or holding NaN/inf
    (a flipped exponent bit usually shows up as one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; a model folder needs its weights (model.safetensors)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {path}: not a readable safetensors file ({first_line(e)}); {FIX_CORRUPT}") from None
    if check_finite:
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise SystemExit(f"error: {path}: tensor {name} holds NaN or infinite values: the run that wrote it "
                                 "diverged (retrain with a lower --lr) or the file is corrupt (copy it again)")
    return tensors


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def refuse_mismatch(path: Path, what: str, missing: list[str], unexpected: list[str] = (),
                    resized: list[str] = ()) -> None:
    """One line when the weights at PATH are not those of WHAT (the architecture config.json names)."""
    parts = [f"{label} {_some(sorted(names))}" for label, names in
             (("missing", missing), ("unexpected", unexpected), ("other shapes for", resized)) if names]
    if parts:
        raise SystemExit(f"error: {path} does not hold the weights of {what} ({'; '.join(parts)}); config.json and "
                         "the weights come from different models — restore the folder's own config.json or weights")


def check_tensors(path: Path, have: Iterable[str], need: set[str], optional: set[str], what: str) -> None:
    """One line when the file's tensor names are not the ones WHAT needs (plus OPTIONAL ones it may hold)."""
    have = set(have)
    refuse_mismatch(path, what, list(need - have), list(have - need - optional))


def refuse_pickles(model_dir: Path) -> None:
    """Refuse a folder whose weights exist only as pickles: loading one can run arbitrary code."""
    model_dir = Path(model_dir)
    if any(model_dir.glob("*.safetensors")):
        return
    pickles = sorted({p.name for pattern in PICKLES for p in model_dir.glob(pattern)})
    if pickles:
        raise SystemExit(f"error: {model_dir / pickles[0]} is a PyTorch pickle; slmkit never unpickles files (they "
                         "can run code). Get the model's safetensors files, or convert it where you trust the file: "
                         "python -c \"from transformers import AutoModel as A; A.from_pretrained('SRC', "
                         "use_safetensors=False).save_pretrained('DST')\"")


@contextlib.contextmanager
def quiet_transformers():
    """No 'newly initialized weights' warnings or loading reports (the caller decides what is wrong) and no
    per-file loading bars."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# the new heads a classifier is given on top of an encoder or decoder folder (and BERT's pooler, which a masked-LM
# folder does not hold): `slm finetune --task classify` and `slm distill` may start them from scratch
HEADS = ("classifier.", "pre_classifier.", "score.", "pooler.")


def _named(name: str, parts: tuple[str, ...]) -> bool:
    """NAME has a dotted component path starting with one of PARTS ('pooler.' matches 'bert.pooler.dense.weight')."""
    return any(f".{p}" in f".{name}" for p in parts)


def open_pretrained(auto_cls, model_dir: Path, may_miss: tuple[str, ...] = (), may_drop: bool = False,
                    may_resize: bool = False, **kw):
    """AUTO_CLS.from_pretrained(MODEL_DIR) with its loading report checked: a weight the architecture needs but the
    files lack (other than those named by a MAY_MISS part, e.g. a new head) is an error, not a random init; so is an
    unexpected one unless MAY_DROP (a base encoder read out of a classifier folder drops its head), and one of
    another shape unless MAY_RESIZE and it is a MAY_MISS one (a head for another number of labels)."""
    from safetensors import SafetensorError

    model_dir = Path(model_dir)
    refuse_pickles(model_dir)
    try:
        with quiet_transformers():
            model, info = auto_cls.from_pretrained(model_dir, local_files_only=True, output_loading_info=True,
                                                   use_safetensors=True, **kw)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {model_dir}: cannot load the model ({type(e).__name__}: {first_line(e)}); check "
                         "that config.json and the weights belong together and are complete") from None
    missing = [k for k in info.get("missing_keys", ()) if not _named(k, may_miss)]
    unexpected = [] if may_drop else list(info.get("unexpected_keys", ()))
    resized = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
    resized = [k for k in resized if not (may_resize and _named(k, may_miss))]
    what = f"a {model.config.model_type} model ({type(model).__name__}, as config.json says)"
    refuse_mismatch(model_dir / "model.safetensors", what, missing, unexpected, resized)
    return model
