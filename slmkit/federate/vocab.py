"""A tokenizer built from statistics the clients send (`--tokenizer-from-clients`), before the first round.

The server asks every client for its word counts (a "query.words" message); each client splits the training part of
its text (the held-out part stays out) into the pre-tokens the tokenizer's trainer works on (model/tokenizer.
count_words: byte-level BPE's 'Ġthe', 'Ġpatient', ',' for decoders; WordPiece's 'the', 'patient' for encoders) and
answers with

    words   its --vocab-words most frequent pre-tokens that occur at least --vocab-min-count times in its text
    counts  how often each occurs
    bytes   how many bytes of text it holds (the vocabulary's default size follows the corpus's, as `slm train`'s)

and nothing else: no sentence, no order of words, no rare word (a name mentioned a few times never leaves). The
server sums the counts and trains the tokenizer on them (train_from_counts: the same tokenizer `slm train`
would build from the union of the texts, less the words each client kept back); every client then uses it.
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from collections import Counter
from pathlib import Path

QUERY = "query.words"
SETUP = "slm-setup"  # in a deployment: the run's final settings and tokenizer, in every message to a client


def client_words(paths: list[str], text_col: str, replace_errors: bool, val_fraction: float, min_count: int,
                 max_words: int, kind: str = "bpe") -> dict:
    """This client's answer: {"words", "counts", "bytes"} (see the module docstring)."""
    from slmkit.data.corpus import expand_paths, iter_documents
    from slmkit.model.tokenizer import count_words

    texts = list(iter_documents(expand_paths(paths), text_col, replace_errors))
    keep = int(sum(map(len, texts)) * (1 - val_fraction))  # the held-out tail, as the token split cuts it
    train, n = [], 0
    for t in texts:
        train.append(t[:max(0, keep - n)])
        n += len(t)
    top = [(w, c) for w, c in count_words(train, kind).most_common(max_words) if c >= min_count]
    return {"words": [w for w, _ in top], "counts": [int(c) for _, c in top],
            "bytes": sum(len(t.encode()) for t in train)}


def words_handler(text_col: str, replace_errors: bool, val_fraction: float):
    """The ClientApp query handler for QUERY: node_config's data path, the server's thresholds."""
    from flwr.app import ConfigRecord, Message, RecordDict

    def handle(msg, context):
        ask = msg.content["config"]
        answer = client_words(str(context.node_config["data-path"]).split(","), text_col, replace_errors,
                              val_fraction, int(ask["min-count"]), int(ask["max-words"]), str(ask["kind"]))
        return Message(RecordDict({"words": ConfigRecord(answer)}), reply_to=msg)

    return handle


def gather_tokenizer(grid, min_count: int, max_words: int, vocab_size: int | None, hidden_size: int,
                     kind: str = "bpe", timeout: float | None = None):
    """Ask every client on GRID for its counts, sum them, train the tokenizer (KIND "bpe" for decoders,
    "wordpiece" for encoders) -> (tokenizer, figures)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from slmkit.model.tokenizer import train_from_counts
    from slmkit.training.recipe import auto_vocab_size

    ask = RecordDict({"config": ConfigRecord({"min-count": min_count, "max-words": max_words, "kind": kind})})
    replies = grid.send_and_receive([Message(ask, dst_node_id=n, message_type=QUERY) for n in grid.get_node_ids()],
                                    timeout=timeout)
    answers = [r.content["words"] for r in replies if not r.has_error()]
    if not answers:
        why = next((r.error.reason for r in replies if r.has_error()), "no client answered")
        raise SystemExit(f"error: --tokenizer-from-clients: no client sent its word counts ({why.strip()})")
    counts: Counter = Counter()
    for a in answers:
        counts.update(dict(zip(a["words"], a["counts"], strict=True)))
    n_bytes = sum(int(a["bytes"]) for a in answers)
    vocab = vocab_size or auto_vocab_size(n_bytes, hidden_size)
    tok = train_from_counts(counts, vocab, kind)
    figures = {"clients": len(answers), "words_received": sum(len(a["words"]) for a in answers),
               "distinct_words": len(counts), "text_bytes": n_bytes, "vocab_size": len(tok)}
    return tok, figures


def wait_for_nodes(grid, n: int, timeout: float) -> None:
    """Until N clients are connected to GRID (a deployment's SuperNodes come and go on their own)."""
    t0 = time.time()
    while len(grid.get_node_ids()) < n:
        if time.time() - t0 > timeout:
            raise SystemExit(f"error: --tokenizer-from-clients: {len(grid.get_node_ids())} of --min-clients {n} "
                             f"clients connected within --timeout {timeout:g} s")
        time.sleep(1.0)


def pack_folder(folder: Path) -> str:
    """A tokenizer folder's files as one compressed string (to travel in a message's config)."""
    files = {p.name: p.read_text() for p in sorted(Path(folder).iterdir()) if p.is_file() and p.suffix in
             (".json", ".jinja", ".txt")}
    return base64.b64encode(zlib.compress(json.dumps(files).encode(), 9)).decode()


def unpack_folder(packed: str, root: Path) -> Path:
    """pack_folder's string as a folder under ROOT named by its content (written once per process tree)."""
    import hashlib

    folder = Path(root) / f"slm-federate-tokenizer-{hashlib.sha256(packed.encode()).hexdigest()[:16]}"
    if not (folder / "tokenizer.json").is_file():
        tmp = folder.with_name(folder.name + f".tmp{time.time_ns()}")
        tmp.mkdir(parents=True)
        for name, text in json.loads(zlib.decompress(base64.b64decode(packed))).items():
            (tmp / Path(name).name).write_text(text)
        try:
            tmp.rename(folder)
        except OSError:  # another process wrote it first: theirs is the same
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder
