"""The router: `slm route train` on tiny data, its rules and fallback, `slm eval` on a router folder, and `slm serve
--router` (model `auto` through the openai client, remote routes that do not answer)."""

import json
import random

import pytest
from tiny_encoders import tiny_mlm_folder, wordpiece, write_jsonl

from slmkit.compose.router import is_router, load_router, parse_rule

WORDS = {"poem": ["thou", "thee", "doth", "love", "heart", "sweet", "night", "moon"],
         "code": ["def", "return", "import", "class", "list", "print", "self", "loop"],
         "news": ["congress", "nation", "economy", "tax", "jobs", "america", "budget", "law"]}
FILLER = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "this"]


def route_rows(n: int, seed: int = 0) -> list[dict]:
    """{"text", "label"} rows: filler words plus two or three words of the route's own vocabulary."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(WORDS)[i % 3]
        words = rng.choices(FILLER, k=rng.randint(2, 5)) + rng.choices(WORDS[label], k=rng.randint(2, 3))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("route")
    rows = route_rows(210, seed=1)
    tok = wordpiece(extra=[r["text"] for r in rows])
    return {"dir": d, "encoder": tiny_mlm_folder(d / "enc", tok), "train": write_jsonl(d / "train.jsonl", rows[:150]),
            "test": write_jsonl(d / "test.jsonl", rows[150:])}


@pytest.fixture(scope="module")
def router_dir(toy):
    from slmkit.compose.route_cli import train

    out = toy["dir"] / "router"
    summary = train([toy["train"]], out, encoder=toy["encoder"], rule=[r"code=\bdef\s+\w+\("], fallback="general",
                    min_confidence=0.4, epochs=20, lr=1e-3, progress=False)
    return out, summary


def test_router_folder_is_a_classifier_with_its_routes(router_dir):
    from slmkit.infer.classify import predict

    out, summary = router_dir
    spec = json.loads((out / "router.json").read_text())
    assert is_router(out) and not is_router(out.parent)
    assert spec["labels"] == ["code", "news", "poem"] and spec["routes"] == ["code", "news", "poem", "general"]
    assert spec["fallback"] == "general" and spec["min_confidence"] == 0.4
    assert [row["min_confidence"] for row in spec["calibration"]] == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    assert summary["routing"]["accuracy"] >= 0.9  # the held-out split, routed with rules and fallback
    assert predict(out, ["thou doth love the moon"])[0][0][0] == "poem"  # slm classify reads the folder as it is


def test_route_applies_rules_then_classifier_then_fallback(router_dir):
    router = load_router(router_dir[0])
    texts = ["please DEF parse(x): thou love", "the nation and the economy budget", "thou sweet heart of the moon"]
    picks = router.route(texts)
    assert picks[0] == ("code", 1.0, "rule")  # the rule wins over the poem words; case-insensitive
    assert [p[0] for p in picks[1:]] == ["news", "poem"] and all(p[2] == "router" for p in picks[1:])
    router.min_confidence = 0.999  # nothing is that sure: everything not ruled goes to the fallback
    picks = router.route(texts)
    assert picks[0][0] == "code" and [(p[0], p[2]) for p in picks[1:]] == [("general", "fallback")] * 2
    assert all(p[1] < 0.999 for p in picks[1:])  # the fallback carries the classifier's own confidence


def test_eval_reports_routing_accuracy_and_confusion(router_dir, toy, capsys):
    from slmkit.infer.evaluate import main as evaluate

    result = evaluate(router_dir[0], [str(toy["test"])], as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed["labels"] == ["code", "news", "poem", "general"]
    cm = printed["confusion_matrix"]
    assert sum(map(sum, cm)) == 60 and [sum(r) for r in cm] == [20, 20, 20, 0]
    assert printed["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(4)) / 60) and printed["accuracy"] >= 0.9
    assert result["decided_by"]["rule"] == 0 and sum(result["decided_by"].values()) == 60


def test_bad_input_is_one_clear_line(router_dir, toy, tmp_path):
    from slmkit.compose.route_cli import train
    from slmkit.infer.evaluate import main as evaluate

    with pytest.raises(SystemExit, match="--encoder DIR is required"):
        train([toy["train"]], tmp_path / "r")
    with pytest.raises(SystemExit, match="ROUTE=REGEX"):
        parse_rule("no-equals-sign")
    with pytest.raises(SystemExit, match="not a regular expression"):
        parse_rule("code=(unclosed")
    with pytest.raises(SystemExit, match="needs --fallback"):
        train([toy["train"]], tmp_path / "r", encoder=toy["encoder"], min_confidence=0.5)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hello", "label": "sports"}])
    with pytest.raises(SystemExit, match="'sports' is not one of the router's routes"):
        evaluate(router_dir[0], [str(bad)])
    with pytest.raises(SystemExit, match="already|overwrite"):  # nothing is replaced without --overwrite
        train([toy["train"]], router_dir[0], encoder=toy["encoder"], epochs=1)
    assert is_router(router_dir[0])


def test_cli_train_and_pick(toy, tmp_path, capsys):
    from slmkit.__main__ import main

    out = tmp_path / "cli-router"
    assert main(["route", "train", "--data", str(toy["train"]), "--encoder", str(toy["encoder"]), "--out", str(out),
                 "--steps", "2", "--rule", "poem=\\bthou\\b", "--no-progress"]) == 0
    assert "routing accuracy" in capsys.readouterr().out
    assert main(["route", "pick", str(out), "--text", "Thou", "--text", "the tax law of the nation", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (rows[0]["route"], rows[0]["confidence"], rows[0]["reason"]) == ("poem", 1.0, "rule")
    assert rows[1]["reason"] == "router" and rows[1]["route"] in ("code", "news", "poem")  # two steps: any route
    assert main(["route", "pick", str(out)]) == 1  # neither --text nor --data: one line, exit 1
    assert "give --text TEXT or --data FILE" in capsys.readouterr().err
