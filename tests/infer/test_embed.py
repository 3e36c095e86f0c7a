"""Sentence embeddings (`slm embed`): mean pooling over real tokens, unit length, on any encoder folder."""

import numpy as np
import pytest
from tiny_encoders import tiny_base_folder, tiny_mlm_folder, wordpiece

from slmkit.infer.embed import embed, main

SENTENCES = ["the cat sat on the mat", "the cat sat on a mat", "stock markets fell sharply this morning"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A random BertModel folder in the layout of an imported sentence encoder (all-MiniLM-L6-v2)."""
    d = tmp_path_factory.mktemp("enc")
    return tiny_base_folder(d / "minilm-like", wordpiece(extra=SENTENCES * 5))


def test_embeddings_are_unit_length_and_similar_texts_score_higher(encoder):
    v = embed(encoder, SENTENCES)
    assert v.shape == (3, 32) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] and v[0] @ v[1] > v[1] @ v[2]


def test_padding_does_not_change_an_embedding(encoder):
    alone = embed(encoder, [SENTENCES[0]])
    batched = embed(encoder, [SENTENCES[0], " ".join(SENTENCES * 3)])
    np.testing.assert_allclose(alone[0], batched[0], atol=1e-5)


def test_embed_verb_writes_npy_and_parquet(encoder, tmp_path):
    import pyarrow.parquet as pq

    data = tmp_path / "texts.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    vectors = np.load(main(encoder, data, tmp_path / "v.npy"))
    np.testing.assert_allclose(vectors, embed(encoder, SENTENCES), atol=1e-6)
    table = pq.read_table(main(encoder, data, tmp_path / "v.parquet"))
    assert table.column("text").to_pylist() == SENTENCES
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), vectors, atol=1e-6)
    with pytest.raises(SystemExit, match="must end in .npy or .parquet"):
        main(encoder, data, tmp_path / "v.csv")


def test_masked_lm_folders_embed_with_their_encoder(tmp_path):
    folder = tiny_mlm_folder(tmp_path / "mlm", wordpiece(extra=SENTENCES))
    v = embed(folder, SENTENCES)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("setting", [dict(batch_size=0), dict(max_length=-1)])
def test_embed_names_a_size_below_one(setting, tmp_path):
    flag, value = next(iter(setting.items()))
    with pytest.raises(SystemExit, match=f"^error: --{flag.replace('_', '-')} {value} must be positive"):
        main(tmp_path / "no-model", tmp_path / "texts.txt", tmp_path / "v.npy", **setting)


def sentence_transformers_layout(folder, mode: str, normalize: bool, max_seq_length: int = 8):
    """Give FOLDER the files a sentence-transformers model declares its pooling with."""
    import json

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    flags = {f"pooling_mode_{m}": m == mode for m in ("cls_token", "mean_tokens", "max_tokens",
                                                       "mean_sqrt_len_tokens")}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))


@pytest.mark.parametrize("mode", ["cls_token", "max_tokens", "mean_tokens"])
def test_embed_follows_the_pooling_a_sentence_transformers_folder_declares(mode, tmp_path):
    import shutil

    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = tiny_base_folder(tmp_path / "st", wordpiece(extra=SENTENCES * 5))
    sentence_transformers_layout(folder, mode, normalize=False, max_seq_length=5)
    v = embed(folder, SENTENCES)
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():  # each text alone, cut at the folder's max_seq_length: no padding to mask
        hidden = [model(**tok(s, truncation=True, max_length=5, return_tensors="pt")).last_hidden_state[0]
                  for s in SENTENCES]
    expected = {"cls_token": [h[0] for h in hidden], "max_tokens": [h.amax(0) for h in hidden],
                "mean_tokens": [h.mean(0) for h in hidden]}[mode]
    np.testing.assert_allclose(v, torch.stack(expected).numpy(), atol=1e-5)
    assert abs(np.linalg.norm(v[0]) - 1.0) > 1e-3  # no Normalize module declared: not normalized
    imported = tmp_path / "imported"  # slm import keeps the declaration, so the embeddings stay the same
    from slmkit.edge.import_model import main as import_model

    import_model(folder, imported)
    np.testing.assert_allclose(embed(imported, SENTENCES), v, atol=1e-5)
    shutil.rmtree(imported / "1_Pooling")
    with pytest.raises(SystemExit, match="1_Pooling/config.json: unreadable"):
        embed(imported, SENTENCES)


def test_embed_refuses_a_pooling_config_with_several_modes_and_flags_override_it(tmp_path):
    import json

    folder = tiny_base_folder(tmp_path / "st", wordpiece(extra=SENTENCES * 5))
    sentence_transformers_layout(folder, "cls_token", normalize=True)
    cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({**cfg, "pooling_mode_max_tokens": True}))
    with pytest.raises(SystemExit, match="2 pooling modes set.*or pass --pooling"):
        embed(folder, SENTENCES)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    cls = np.load(main(folder, data, tmp_path / "cls.npy"))
    mean = np.load(main(folder, data, tmp_path / "mean.npy", pooling="mean", normalize=False))
    assert not np.allclose(cls, mean, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1.0, atol=1e-5)
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        main(folder, data, tmp_path / "cls.npy")
