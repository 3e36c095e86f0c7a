"""slmkit: build, specialize, shrink, serve and federate small language models on commodity hardware.

Python API (each verb of the `slm` command is a function):

    import slmkit
    slmkit.train(data=["corpus.txt"], out="my-model", time="3m")
    model = slmkit.load("my-model")
    print(model.generate("Once upon a time", max_new_tokens=50))
"""

from __future__ import annotations

__version__ = "0.1.0"


def train(data, out, **options):
    """Train a tokenizer and a model from scratch; see `slm train --help` for every option."""
    from slmkit.training.train import main

    return main(data=[str(d) for d in (data if isinstance(data, (list, tuple)) else [data])], out=out, **options)


def load(model_dir, **options):
    """Load a model folder for generation: returns a `slmkit.infer.generate.LoadedModel`."""
    from slmkit.infer.generate import load

    return load(model_dir, **options)


def evaluate(model_dir, data, **options):
    """Loss, perplexity, bits per byte of a model on DATA (a path or list of paths)."""
    from slmkit.infer.evaluate import main

    return main(model_dir, [str(d) for d in (data if isinstance(data, (list, tuple)) else [data])], **options)


def synth(teacher, prompts, out, **options):
    """Chat training data from a teacher; see `slm synth --help` for every option. Returns the report."""
    from slmkit.synth.cli import main

    return main(teacher=str(teacher), prompts=[str(p) for p in (prompts if isinstance(prompts, (list, tuple))
                                                                else [prompts])], out=out, **options)


__all__ = ["__version__", "evaluate", "load", "synth", "train"]
