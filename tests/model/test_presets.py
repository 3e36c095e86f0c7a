import pytest
import torch

from slmkit.model.folder import base_parameter_count, build_model, count_parameters
from slmkit.model.presets import DECODERS, PRESETS, build_config, llama_params


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_with_its_exact_parameter_count(name):
    cfg = build_config(name, PRESETS[name]["vocab_size"])
    with torch.device("meta"):  # no memory, even for 125M parameters
        model = build_model(cfg)
    assert base_parameter_count(model) == PRESETS[name]["params"]  # encoders: without the masked-LM head


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_widths_are_multiples_of_32_for_gguf_quantization(name):
    cfg = DECODERS[name]
    assert cfg["hidden_size"] % 32 == 0 and cfg["intermediate_size"] % 32 == 0
    assert llama_params(**cfg) == cfg["params"]


def test_gpt_neo_125m_matches_the_published_configuration():
    from transformers import GPTNeoConfig

    cfg = build_config("gpt-neo-125m", 50257)
    assert cfg["attention_types"] == [[["global", "local"], 6]] and cfg["window_size"] == 256
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model.config, GPTNeoConfig) and model.config.num_layers == 12
    assert count_parameters(model) == 125_198_592


def test_unknown_preset_and_field_are_one_line_errors():
    with pytest.raises(SystemExit, match="unknown preset 'slm-9000'"):
        build_config("slm-9000", 100)
    with pytest.raises(SystemExit, match="unknown config field 'hiden_size'"):
        build_config("slm-tiny", 100, {"hiden_size": 64})
    with pytest.raises(SystemExit, match="not divisible"):
        build_config("slm-tiny", 100, {"hidden_size": 96, "num_attention_heads": 5})


@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", "abc", "expected a whole number"),
    ("num_hidden_layers", 0, "expected a positive number"),
    ("hidden_size", -64, "expected a positive number"),
    ("rope_theta", "abc", "expected a number"),
    ("rms_norm_eps", 0, "expected a positive number"),
    ("tie_word_embeddings", 1, "expected true or false"),
    ("vocab_size", 10, "comes from the tokenizer"),
    ("hidden_act", "gelu", 'computes hidden_act="silu" only'),
    ("attention_bias", True, "computes attention_bias=false only"),
    ("head_dim", 33, "must be even"),
])
def test_bad_override_values_are_one_line_errors(field, value, message):
    # a wrong type or value used to surface as a traceback from deep inside the model (or, for hidden_act and
    # the biases, as a folder whose config.json describes a different model than the weights were trained as)
    with pytest.raises(SystemExit, match=message) as e:
        build_config("slm-tiny", 100, {field: value})
    assert "\n" not in str(e.value) and (field in str(e.value) or field == "head_dim")


def test_override_values_are_typed_like_the_preset():
    cfg = build_config("slm-tiny", 100, {"rms_norm_eps": 1, "tie_word_embeddings": False, "num_hidden_layers": 3})
    assert cfg["rms_norm_eps"] == 1.0 and isinstance(cfg["rms_norm_eps"], float)
    assert cfg["tie_word_embeddings"] is False and cfg["num_hidden_layers"] == 3
    assert build_config("bert-tiny", 100, {"classifier_dropout": 0.2})["classifier_dropout"] == 0.2


def test_gpt_neo_depth_override_keeps_its_attention_pattern():
    # GPT-Neo's config must list one attention type per layer; --set num_layers=3 alone used to be a traceback
    cfg = build_config("gpt-neo-125m", 300, {"num_layers": 3, "hidden_size": 64, "num_heads": 2})
    assert cfg["attention_types"] == [[["global", "local"], 1], [["global"], 1]]
    assert build_model(cfg).config.attention_layers == ["global", "local", "global"]


@pytest.mark.parametrize("preset, field, value, message", [
    ("bert-tiny", "num_attention_heads", 3, "transformers rejects this bert config: The hidden size"),
    ("bert-tiny", "hidden_act", "foo", "unknown activation"),
    ("gpt-neo-125m", "attention_types", 3, "transformers rejects this gpt_neo config"),
])
def test_bad_encoder_and_gpt_neo_overrides_are_one_line_errors(preset, field, value, message):
    with pytest.raises(SystemExit, match=message) as e:
        build_config(preset, 300, {field: value})
    assert "\n" not in str(e.value)


def test_llama_params_counts_a_head_dim_override():
    cfg = build_config("slm-tiny", 100, {"head_dim": 16, "tie_word_embeddings": False})
    assert llama_params(**cfg) == count_parameters(build_model(cfg))
