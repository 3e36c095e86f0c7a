import json

import pytest
import torch
from tiny_models import one_thread, tiny_llama_folder, write_chats  # noqa: F401 (fixture)

from slmkit.training.finetune import main as finetune
from slmkit.training.merge import main as merge

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tiny_llama_folder(root / "base")
    chats = write_chats(root / "chats.jsonl")
    finetune(base, [str(chats)], root / "adapter", task="sft", lora=True, lora_r=4, steps=10, batch_size=4,
             block_size=64, lr=1e-2, warmup=0, eval_every="1000", progress=False)
    return base, root / "adapter"


def test_merged_model_matches_base_plus_adapter(trained_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slmkit.infer.load import load_model
    from slmkit.model.folder import logits_of

    base, adapter = trained_adapter
    record = json.loads((adapter / "slmkit_adapter.json").read_text())
    assert record["base_model"] == str(base.resolve()) and len(record["base_fingerprint"]) == 32
    out = merge(adapter, tmp_path / "merged")
    ids = torch.tensor([[3, 40, 41, 120, 7, 9, 250]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(
            input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits  # opens in transformers
        on_the_fly = logits_of(load_model(adapter), ids)  # what slm generate / chat / eval do with an adapter
    assert (expected - plain).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(on_the_fly, expected, atol=1e-4, rtol=1e-4)
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()


def test_adapter_folder_generates_and_evaluates(trained_adapter):
    from slmkit.infer.evaluate import main as evaluate
    from slmkit.infer.generate import load

    base, adapter = trained_adapter
    assert isinstance(load(adapter).generate("the cat", max_new_tokens=4, temperature=0), str)
    chats = adapter.parent / "chats.jsonl"
    assert evaluate(adapter, [str(chats)])["loss"] < evaluate(base, [str(chats)])["loss"]


def test_merging_into_another_base_is_refused(trained_adapter, tmp_path):
    _, adapter = trained_adapter
    other = tiny_llama_folder(tmp_path / "other", seed=1)
    with pytest.raises(SystemExit, match="was trained on other weights than"):
        merge(adapter, tmp_path / "merged", base=other)
    assert not (tmp_path / "merged").exists()
    with pytest.raises(SystemExit, match="not a LoRA adapter folder"):
        merge(other, tmp_path / "merged")
