"""gsmkit/families.py on configs as the Hub stores them (config.json dicts, older and newer field forms) and
as transformers builds them: shapes under every family's field names, each layer's window and soft-cap."""

from __future__ import annotations

import pytest

from gsmkit.errors import ModelError
from gsmkit.families import LayerAttention, read_family

FULL = LayerAttention()


def _windows(config: dict) -> list[int | None]:
    return [layer.window for layer in read_family(config).layers]


def test_shape_is_read_under_each_familys_field_names():
    gpt2 = read_family({"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12})
    assert (gpt2.num_layers, gpt2.hidden_size, gpt2.num_heads, gpt2.num_kv_heads, gpt2.head_dim) == \
        (12, 768, 12, 12, 64)
    neo = read_family({"model_type": "gpt_neo", "num_layers": 4, "hidden_size": 256, "num_heads": 8,
                       "attention_types": [[["global", "local"], 2]], "window_size": 256})
    assert (neo.num_layers, neo.num_heads, neo.head_dim) == (4, 8, 32)
    qwen3 = read_family({"model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 2560,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128})
    assert (qwen3.num_kv_heads, qwen3.head_dim) == (8, 128)  # head_dim is not hidden / heads here


def test_a_config_without_a_layer_count_is_a_clear_error():
    with pytest.raises(ModelError, match="num_hidden_layers / n_layer / num_layers"):
        read_family({"model_type": "x", "hidden_size": 8, "num_attention_heads": 2})


@pytest.mark.parametrize(("config", "want"), [
    ({"model_type": "llama"}, [None] * 4),
    ({"model_type": "mistral", "sliding_window": 4096}, [4096] * 4),
    ({"model_type": "mistral", "sliding_window": None}, [None] * 4),
    # Qwen2 / Qwen3 config.json before layer_types: the window is off unless switched on, then from
    # max_window_layers on
    ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 2},
     [None] * 4),
    ({"model_type": "qwen2", "sliding_window": 64, "use_sliding_window": True, "max_window_layers": 2},
     [None, None, 64, 64]),
    ({"model_type": "qwen3", "sliding_window": 64,
      "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]},
     [None, 64, None, 64]),
    ({"model_type": "gemma2", "sliding_window": 4096}, [4096, None, 4096, None]),
    ({"model_type": "gpt_neo", "attention_types": [[["global", "local"], 2]], "window_size": 256},
     [None, 256, None, 256]),
])
def test_each_layers_window_comes_from_the_familys_own_fields(config, want):
    base = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4}
    assert _windows({**base, **config}) == want


def test_gemma3_inside_a_multimodal_config_has_five_local_layers_to_one_global():
    config = {"model_type": "gemma3", "text_config": {
        "model_type": "gemma3_text", "num_hidden_layers": 12, "hidden_size": 64, "num_attention_heads": 4,
        "sliding_window": 1024, "sliding_window_pattern": 6, "attn_logit_softcapping": None}}
    assert _windows(config) == ([1024] * 5 + [None]) * 2
    assert not read_family(config).softcapped


def test_soft_capping_and_the_described_layout():
    family = read_family({"model_type": "gemma2", "num_hidden_layers": 3, "hidden_size": 64,
                          "num_attention_heads": 4, "sliding_window": 8, "attn_logit_softcapping": 50.0})
    assert family.layers == (LayerAttention(8, 50.0), LayerAttention(None, 50.0), LayerAttention(8, 50.0))
    assert family.windows == (8,)
    assert family.describe()["attention"] == {"0": "sliding window 8, soft-capped at 50",
                                              "1": "full, soft-capped at 50",
                                              "2": "sliding window 8, soft-capped at 50"}


def test_layer_types_the_engine_cannot_mask_are_named_not_guessed():
    family = read_family({"model_type": "llama4_text", "num_hidden_layers": 2, "hidden_size": 64,
                          "num_attention_heads": 4, "layer_types": ["chunked_attention", "full_attention"]})
    assert family.unknown_layer_types == ("chunked_attention",)
    from gsmkit.errors import ConfigError
    from gsmkit.generation.layer_masks import LayerMasks

    with pytest.raises(ConfigError, match="chunked_attention"):
        LayerMasks(family)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "qwen2", "gpt_neo", "phi3", "gpt2"])
def test_transformers_configs_and_their_saved_dicts_give_the_same_layout(family):
    """The config object a loaded model has and the config.json it saves agree (steering reads the
    latter before loading)."""
    from family_models import family_config

    tok = type("Tok", (), {"eos_token_id": 1, "pad_token_id": 0, "__len__": lambda _self: 64})()
    config = family_config(family, tok)
    assert read_family(config) == read_family(config.to_dict())


def test_decoder_layers_are_the_language_models_even_after_a_vision_tower_of_as_many_blocks():
    import torch

    from gsmkit.families import decoder_layers

    class Multimodal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = {"model_type": "toy", "num_hidden_layers": 2, "hidden_size": 4,
                           "num_attention_heads": 1}
            self.vision_tower = torch.nn.Module()
            self.vision_tower.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
            self.language_model = torch.nn.Module()
            self.language_model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    model = Multimodal()
    assert decoder_layers(model) == list(model.language_model.layers)
