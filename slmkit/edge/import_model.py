"""Verb `import`: a local Hugging Face model folder or a GGUF file -> an slmkit model folder.

    HF folder (Llama, GPT-2, GPT-Neo, Qwen2, BERT family …)  --transformers-->  config.json + model.safetensors
    GGUF file (any quantization transformers can read)      --dequantize--->  + tokenizer files + chat template

Nothing is downloaded (local files only). A decoder without a chat template gets ChatML, the template slmkit
trains with. Encoders (BERT family: masked-LM, sequence-classification or bare models) are copied through with
their own head, for `slm finetune --task classify`. A causal LM is reloaded the way `slm generate` loads it and its
logits are compared with the imported weights' before the folder is put in place.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from slmkit.files import check_out, replace_dir
from slmkit.model.weights import first_line

# Encoder families (model_type in config.json): imported with their own head, no chat template.
ENCODER_TYPES = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                 "camembert", "mpnet", "modernbert", "ernie", "megatron-bert", "mobilebert", "squeezebert"}
GGUF_MAGIC = b"GGUF"
_GGUF_SPELLING = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def auto_class_for(config: dict) -> str:
    """Which transformers Auto class opens a folder with this config.json (dispatch on architectures/model_type)."""
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "AutoModelForSequenceClassification"
    if config.get("model_type") in ENCODER_TYPES or any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs):
        return "AutoModelForMaskedLM" if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs) \
            else "AutoModel"
    return "AutoModelForCausalLM"


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file (reads the header only)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise SystemExit("error: importing GGUF needs gguf: pip install 'slmkit[finetune]'") from None
    try:
        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, IndexError) as e:
        raise SystemExit(f"error: {path} is not a readable GGUF file ({e}); pass a .gguf or a model folder") from None


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _gguf_string(path: Path, key: str) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    return bytes(field.parts[field.data[0]]).decode() if field is not None and field.data else None


def keep_gguf_pre_tokenizer(src: Path, tokenizer) -> str | None:
    """Give TOKENIZER the split rules of SRC's `tokenizer.ggml.pre` and record that name (tokenizer_config.json
    `gguf_pre`), so the folder tokenizes as llama.cpp does and `slm export --format gguf` writes the name back.

    transformers rebuilds a GGUF's tokenizer with GPT-2's split whatever the name says: for SmolLM2 (`smollm`,
    digits split one by one) that is a different tokenizer. Returns the name (None for a non-BPE GGUF)."""
    from tokenizers import Tokenizer

    from slmkit.edge.gguf_vocab import pre_tokenizer_for

    name = _gguf_string(src, "tokenizer.ggml.pre")
    if name is None or _gguf_string(src, "tokenizer.ggml.model") != "gpt2":
        return None
    pre = pre_tokenizer_for(name)
    if pre is None:
        print(f"note: {src}: llama.cpp pre-tokenizer {name!r} is not one slmkit maps; the folder keeps transformers' "
              "reading of it, and `slm export --format gguf` checks the tokenization before writing")
    else:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec["pre_tokenizer"] = pre
        tokenizer.backend_tokenizer.pre_tokenizer = Tokenizer.from_str(json.dumps(spec)).pre_tokenizer
    tokenizer.init_kwargs["gguf_pre"] = name  # saved into tokenizer_config.json, kept by finetune's save_pretrained
    return name


def _load_gguf(src: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(src)
    importable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer", "t5", "umt5"})
    # llama.cpp spells a few architectures differently from transformers
    if _GGUF_SPELLING.get(arch, arch) not in importable:
        raise SystemExit(f"error: {src} is a GGUF of architecture {arch!r}, which cannot be imported (decoders "
                         f"transformers reads from GGUF: {', '.join(importable)}); import the original Hugging Face "
                         "folder instead")
    kw = dict(gguf_file=src.name, local_files_only=True)
    try:
        from transformers import GgufConfig  # transformers >= 5 can keep GGUF blocks packed; we want plain weights

        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers always dequantize
        dense = {}
    try:
        model = AutoModelForCausalLM.from_pretrained(src.parent, dtype=torch.float32, **dense, **kw)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, **kw)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise SystemExit(f"error: cannot import {src}: {first_line(e, 300)}") from None
    keep_gguf_pre_tokenizer(src, tokenizer)
    if getattr(model, "hf_quantizer", None) is not None:  # still marked quantized: copy into a plain model
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict(), strict=True)
        model = plain
    return model, tokenizer, "AutoModelForCausalLM"


def _load_hf(src: Path):
    import transformers

    from slmkit.infer.load import read_config
    from slmkit.model.weights import open_pretrained

    config = read_config(src)  # one-line error when SRC is not a model folder
    if "model_type" not in config:
        raise SystemExit(f"error: {src}/config.json has no model_type; it is not a transformers model folder")
    if not any(src.glob("*.safetensors")) and not any(src.glob("*.bin")):
        raise SystemExit(f"error: {src} holds no weights (*.safetensors or *.bin); copy them into the folder")
    auto = auto_class_for(config)
    # Weights checked against config.json's architecture (a mismatch is refused, not imported as a random model);
    # pickles refused before transformers could unpickle them; BERT's pooler may be absent (unused for embeddings).
    model = open_pretrained(getattr(transformers, auto), src, may_miss=("pooler.",), dtype="auto")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {src} holds no usable tokenizer ({first_line(e, 300)}); copy its tokenizer files "
                         "(tokenizer.json, tokenizer_config.json) into the folder") from None
    return model, tokenizer, auto


@torch.no_grad()
def check_causal_parity(model: torch.nn.Module, folder: Path) -> float:
    """Max |logit difference| between MODEL and FOLDER loaded the way `slm generate` loads it."""
    from slmkit.infer.load import load_model
    from slmkit.model.folder import logits_of

    probe = (torch.arange(16) * 7 % model.config.vocab_size).unsqueeze(0)  # (1, 16) arbitrary ids
    expected = model.float().eval()(input_ids=probe).logits
    got = logits_of(load_model(folder), probe)
    return (got - expected).abs().max().item()


def keep_sentence_transformers(src: Path, dst: Path) -> list[str]:
    """Copy a sentence-transformers folder's pooling description (modules.json, its Pooling/Normalize module
    configs, sentence_bert_config.json) so that `slm embed` pools as the model was trained. Returns what was kept."""
    if not (src / "modules.json").is_file():
        return []
    kept = []
    for f in ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
              *(str(p.relative_to(src)) for p in src.glob("[0-9]_*/*.json"))]:
        if (src / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f, dst / f)
            kept.append(f)
    return kept


def main(src: Path, out: Path, overwrite: bool = False) -> Path:
    """Import SRC (a local Hugging Face model folder or a GGUF file) as a model folder in OUT. Returns OUT."""
    from slmkit.model.tokenizer import CHATML_TEMPLATE

    src, out = Path(src), Path(out)
    if not src.exists():
        raise SystemExit(f"error: {src} does not exist; pass a model folder or a .gguf file")
    check_out(out, overwrite, sources=[src])
    if src.is_dir() and not (src / "config.json").is_file():
        ggufs = sorted(src.glob("*.gguf"))
        if len(ggufs) == 1:  # a folder holding just a GGUF: import that file
            src = ggufs[0]
        elif len(ggufs) > 1:
            raise SystemExit(f"error: {src} holds several GGUF files; pass one of them: "
                             f"{', '.join(g.name for g in ggufs[:5])}")
    if src.is_file():
        if not _is_gguf(src):
            raise SystemExit(f"error: {src} is neither a GGUF file nor a model folder; pass a .gguf file or a folder "
                             "with config.json")
        fmt = "gguf"
        try:
            model, tokenizer, auto = _load_gguf(src)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # the GGUF readers raise whatever a corrupt header makes them hit
            raise SystemExit(f"error: {src}: not a readable GGUF file ({type(e).__name__}: {first_line(e, 300)}); the "
                             "file is truncated or corrupt — download or export it again") from None
    else:
        fmt = "huggingface"
        model, tokenizer, auto = _load_hf(src)
    causal = auto == "AutoModelForCausalLM"
    if causal and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # write into a temp folder, check it, then rename into place: an error leaves nothing half-written
        tmp.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if fmt == "huggingface":
            keep_sentence_transformers(src, tmp)
        record = {"source": str(src.resolve()), "format": fmt, "model_type": model.config.model_type,
                  "architectures": [type(model).__name__], "auto_class": auto,
                  "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}
        if tokenizer.init_kwargs.get("gguf_pre"):
            record["gguf_pre_tokenizer"] = tokenizer.init_kwargs["gguf_pre"]
        if causal:
            err = check_causal_parity(model, tmp)
            if err > 1e-3:
                raise SystemExit(f"error: the imported folder's logits differ from {src}'s by {err:.2e}; "
                                 "please report this model")
            record["parity_max_abs_logit_diff"] = err
        (tmp / "slmkit_import.json").write_text(json.dumps(record, indent=2) + "\n")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"imported {src} ({fmt}, {record['model_type']}, {record['parameters']:,} parameters) -> {out}")
    return out


def add_args(p) -> None:
    p.add_argument("src", type=Path, help="a local Hugging Face model folder or a .gguf file (never downloaded)")
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
