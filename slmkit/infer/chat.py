"""Verb `chat`: an interactive conversation in the terminal, using the model's chat template where it has one."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """Messages -> prompt text: the tokenizer's chat template, or a plain 'User:/Assistant:' transcript."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def reply_stops(tokenizer) -> list[str]:
    """Where a reply to render_prompt's text ends besides end-of-text: a plain transcript's next "User:" turn."""
    return [] if getattr(tokenizer, "chat_template", None) else ["\nUser:"]


def user_turns(system: str | None) -> Iterator[tuple[list[dict], str]]:
    """The terminal side of a chat: (the conversation so far, the user's next message) until /quit, /exit or Ctrl-D;
    /reset starts a new conversation (from the --system message). The caller appends the turns it keeps to the list
    it is given."""
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    while True:
        try:
            user = input("you> ")
        except EOFError:
            print()
            return
        if user.strip() in ("/quit", "/exit"):
            return
        if user.strip() == "/reset":
            messages = list(base)
            continue
        yield messages, user


def main(model_dir: Path, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
         top_k: int = 50, top_p: float = 0.95, repetition_penalty: float = 1.1, seed: int | None = None,
         threads: int | None = None, device: str = "auto", compile: bool = False, draft: Path | None = None,
         draft_tokens: int | None = None, lookup: bool = False) -> None:
    """Chat with the model in MODEL_DIR. Type /reset to start over, /quit (or Ctrl-D) to leave."""
    from slmkit.infer.generate import NonFiniteLogits, checked_sampling, load, refuse_draft_tokens
    from slmkit.options import check_numbers

    checked_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     repetition_penalty=repetition_penalty)
    check_numbers(dict(threads=threads, draft_tokens=draft_tokens))
    refuse_draft_tokens(draft, draft_tokens, lookup)
    lm = load(model_dir, threads=threads, device=device, compile=compile)
    if draft is not None or lookup:  # speculative decoding (compose/speculative.py)
        from slmkit.compose.speculative import attach_draft

        attach_draft(lm, load(draft, device=device, compile=compile) if draft is not None else None, draft_tokens,
                     lookup)
    template = "chat template" if getattr(lm.tokenizer, "chat_template", None) else "plain transcript"
    print(f"chatting with {lm.path.name} ({template}); /reset clears, /quit leaves", file=sys.stderr)
    stop = reply_stops(lm.tokenizer)
    for messages, user in user_turns(system):
        messages.append({"role": "user", "content": user})
        prompt = render_prompt(lm.tokenizer, messages)
        print("model> ", end="", flush=True)
        pieces = []
        try:
            for piece in lm.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            pass
        except NonFiniteLogits as e:
            print()
            raise SystemExit(f"error: {model_dir}: {e}") from None
        print()
        if lm.prompt_cut:
            print(f"note: the conversation no longer fits the model's {lm.context}-token context; its oldest "
                  f"{lm.prompt_cut} tokens were left out of this reply's prompt (/reset starts over)", file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})


def add_args(p) -> None:
    p.add_argument("model_dir", type=Path, help="model folder")
    p.add_argument("--system", default=None, help="system message that opens the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default: 0.7)")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling; 0 = off (default: 50)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="penalise repeats; 1 = off (default: 1.1)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one, else cpu), cpu, cuda, cuda:1 …")
    p.add_argument("--compile", action="store_true", help="decode with torch.compile'd kernels (see slm generate "
                   "--help): a few seconds of compiling, then faster replies from ~7M parameters")
    from slmkit.infer.generate import add_draft_args

    add_draft_args(p)
