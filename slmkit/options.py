"""options."""

from __future__ import annotations

import re


def parse_duration(text: str | float | int | None) -> float | None:
    """'180', '180s', '3m', '1.5h', '90min' -> seconds."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|secs|m|min|mins|h|hr|hrs)?\s*", str(text).lower())
    if not m:
        raise SystemExit(f"error: cannot read duration {text!r}; use e.g. 180, 180s, 3m or 1h")
    scale = {"m": 60, "min": 60, "mins": 60, "h": 3600, "hr": 3600, "hrs": 3600}.get(m.group(2) or "s", 1)
    return float(m.group(1)) * scale


def parse_count(text: str | int | None) -> int | None:
    """'5000', '2M', '1.5B', '20k' -> int."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmbg]?)\s*", str(text).lower())
    if not m:
        raise SystemExit(f"error: cannot read count {text!r}; use e.g. 5000, 20k, 2M or 1B")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2)])


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """'2G', '512M', '1.5GiB', '800MB', '1000000' -> bytes (K, M, G, T are powers of 1024); a sign is read, so a
    caller can call '-5M' not positive rather than unreadable. ValueError for anything else; each flag words its own
    one-line error (slm serve --kv-memory, slm bench --memory-cap)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([-+]?\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), re.IGNORECASE)
    if m is None:
        raise ValueError(f"{text!r} is not a size")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


# Numbers the verbs share, checked before any work: None is "the default". A verb passes its values and, for flags of
# its own, more (flag -> hint) to check_numbers.
POSITIVE = {"steps": "leave it out for the default budget", "tokens": "leave it out for the default budget",
            "time": "leave it out for the default budget", "block_size": "leave it out for the recipe's choice",
            "batch_size": "leave it out for the recipe's choice", "grad_accum": "1 = no accumulation",
            "lr": "leave it out for the recipe's choice", "lora_r": "the adapter's rank, e.g. 8",
            "lora_alpha": "the adapter's scale numerator, e.g. 16", "eval_tokens": "held-out tokens per evaluation",
            "epochs": "passes over the data", "max_length": "tokens kept per text",
            "threads": "CPU threads; leave it out for all cores",
            "vocab_size": "leave it out for one sized to the corpus"}


NON_NEGATIVE = ("warmup", "weight_decay", "clip", "dropout", "lora_dropout", "dropout_start", "patience")


def check_numbers(args: dict, positive: dict[str, str] | None = None, non_negative: tuple[str, ...] = ()) -> None:
    """One line naming the flag for a budget, size or rate that cannot work (0 steps, a negative lr...). ARGS maps
    flag names (underscored) to values; POSITIVE (flag -> hint) and NON_NEGATIVE add a verb's own flags."""
    for key, hint in {**POSITIVE, **(positive or {})}.items():
        if args.get(key) is not None and not args[key] > 0:  # `not > 0` also catches NaN
            raise SystemExit(f"error: --{key.replace('_', '-')} {args[key]} must be positive ({hint})")
    for key in (*NON_NEGATIVE, *non_negative):
        if args.get(key) is not None and not args[key] >= 0:
            raise SystemExit(f"error: --{key.replace('_', '-')} {args[key]} must be 0 or more")
    for key in ("dropout", "lora_dropout", "dropout_start"):
        if args.get(key) is not None and not args[key] < 1:
            raise SystemExit(f"error: --{key.replace('_', '-')} {args[key]} must be below 1")
    if args.get("draft_tokens") is not None and not 1 <= args["draft_tokens"] <= 64:
        raise SystemExit(f"error: --draft-tokens {args['draft_tokens']} must be 1-64 (or leave it out: adaptive)")
    if args.get("min_lr_ratio") is not None and not 0 <= args["min_lr_ratio"] <= 1:
        raise SystemExit(f"error: --min-lr-ratio {args['min_lr_ratio']} must be in [0, 1]")
    if args.get("val_fraction") is not None and not (0.0 <= args["val_fraction"] < 0.5):
        raise SystemExit(f"error: --val-fraction {args['val_fraction']} must be in [0, 0.5)")
    for key, what in (("eval_every", "steps, or a duration such as 30s"),
                      ("checkpoint_every", "a duration such as 2m")):
        every = args.get(key)
        if every is not None and not (float(every) if str(every).isdigit() else parse_duration(every)) > 0:
            raise SystemExit(f"error: --{key.replace('_', '-')} {every} must be positive ({what})")


# Options whose flag is not their name (argparse dest -> flag name)
NEGATED = {"calibrate": "no-calibrate", "progress": "no-progress", "stream": "no-stream", "as_json": "json"}


def refuse_unused(where: str, values: dict, unused: dict[str, str], defaults: dict | None = None) -> None:
    """One line for the first flag of UNUSED (option name -> what to use instead) that VALUES gives away from its
    default (DEFAULTS[name], else None/False: a flag left out): a flag the verb accepts but would drop in WHERE is
    refused before any work, never silently ignored."""
    for name, instead in unused.items():
        default = (defaults or {}).get(name)
        value = values.get(name, default)
        if value != default and not (default is None and value is False):
            flag = NEGATED.get(name, name).replace("_", "-")
            raise SystemExit(f"error: --{flag} does not apply to {where}: {instead}")


def defaults_of(fn) -> dict:
    """FN's keyword defaults (a function's or a dataclass's): what refuse_unused compares against."""
    import inspect

    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}
