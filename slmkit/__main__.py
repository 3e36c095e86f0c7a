"""`slm VERB ...`: maps verb names to the modules that implement them (imported only when used, so --help is fast)."""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module, one-line summary). Each module has add_args(parser) and main(**options).
VERBS: dict[str, tuple[str, str]] = {
    "quickstart": ("slmkit.training.quickstart",
                   "train a small model on the embedded corpus, evaluate it, show samples"),
    "train": ("slmkit.training.train", "train a tokenizer and a model from scratch on your text"),
    "generate": ("slmkit.infer.generate", "generate text from a prompt"),
    "chat": ("slmkit.infer.chat", "chat with a model interactively"),
    "eval": ("slmkit.infer.evaluate", "loss, perplexity and bits per byte on held-out text"),
    "info": ("slmkit.infer.info", "architecture and exact parameter count of a model folder or preset"),
    "classify": ("slmkit.infer.classify", "top-k labels with probabilities from a classifier folder"),
    "embed": ("slmkit.infer.embed", "sentence embeddings from an encoder folder, pooled as the folder declares"),
    "import": ("slmkit.edge.import_model", "a local Hugging Face folder or GGUF file -> a model folder"),
    "finetune": ("slmkit.training.finetune",
                 "fine-tune a model folder: continued pretraining or chat SFT, full or LoRA"),
    "distill": ("slmkit.distill.run",
                "a smaller student trained on a teacher's distributions (KD, DistilBERT, drafts)"),
    "synth": ("slmkit.synth.cli",
              "chat training data from a teacher (folder, GGUF or URL): strategies, prompt erasure, filters"),
    "federate": ("slmkit.federate.cli", "train one model across data silos with Flower (FedAvg/FedProx/FedAdam, DP)"),
    "merge": ("slmkit.training.merge", "fold a LoRA adapter into its base model"),
    "cascade": ("slmkit.compose.cascade_cli",
                "a small model that hands unsure requests to a large one (folder or URL), calibrated on held-out data"),
    "route": ("slmkit.compose.route_cli", "fit a router (text -> which model answers) on labelled prompts"),
    "serve": ("slmkit.serve", "OpenAI-compatible HTTP server with batching, keys, metrics and a web chat page"),
    "export": ("slmkit.edge.export", "a model folder -> GGUF (llama.cpp/Ollama), ONNX or Hugging Face, parity-checked"),
    "quantize": ("slmkit.edge.quantize", "a model folder -> an int8 model folder for in-process PyTorch inference"),
    "bench": ("slmkit.edge.bench", "edge profile: size, load time, peak RSS, tokens/s, latency per backend"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        width = max(map(len, VERBS))
        lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in VERBS.items()]
        print("usage: slm VERB [options]   (slm VERB --help for a verb's options)\n\nsmall language models: build, "
              "specialize, export, serve\n\nverbs:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown verb {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module_name, summary = VERBS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"slm {argv[0]}", description=(module.main.__doc__ or summary).strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_args(parser)
    options = vars(parser.parse_args(argv[1:]))
    run = module.main
    if argv[0] in ("classify", "eval", "generate", "chat"):  # a cascade folder answers these verbs itself
        from slmkit.compose.cascade_verbs import for_cascade

        run = for_cascade(argv[0], options.get("model_dir")) or run
    try:
        run(**options)
    except SystemExit as e:  # expected mistakes: one line, no traceback, non-zero exit
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return e.code or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
