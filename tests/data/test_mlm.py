import pytest
from tiny_models import bpe_tokenizer

from slmkit.data.mlm import mask_info


def test_a_tokenizer_that_cannot_mask_gets_advice_the_verb_can_follow(tmp_path):
    """`slm eval` (and distill) on such a folder advised --tokenizer/--tokenizer-from, flags only `slm train` has."""
    from tiny_encoders import tiny_bert_config
    from transformers import BertForMaskedLM

    from slmkit.infer.evaluate import main as evaluate

    tok = bpe_tokenizer()  # byte-level BPE: no [MASK]
    with pytest.raises(SystemExit, match="no \\[MASK\\] token.*; use --tokenizer wordpiece or --tokenizer-from"):
        mask_info(tok)  # slm train's advice
    BertForMaskedLM(tiny_bert_config(tok)).save_pretrained(tmp_path / "enc")
    tok.save_pretrained(tmp_path / "enc")
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 30)
    with pytest.raises(SystemExit) as e:
        evaluate(tmp_path / "enc", [str(tmp_path / "t.txt")])
    assert "no [MASK] token" in str(e.value) and "--tokenizer" not in str(e.value)
