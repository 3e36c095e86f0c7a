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
