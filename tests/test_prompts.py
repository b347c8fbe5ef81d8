"""gsmkit.prompts: lm-eval's plain gsm8k format, style resolution, chat rendering with a local tokenizer."""

from __future__ import annotations

import pytest
from conftest import CHATML

from gsmkit.errors import ConfigError
from gsmkit.prompts import (
    PLAIN_STOP,
    STYLES,
    Exemplar,
    add_special_tokens_for,
    build_messages,
    render_prompt,
    render_target,
    resolve_style,
    stop_strings,
)

EXEMPLARS = [Exemplar("q1", "a1"), Exemplar("q2", "a2")]


def _tokenizer(chat_template: str | None):
    """A tiny word-level fast tokenizer built in memory: no downloads, no files."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + ["q", "a", "user", "assistant", "system"])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def chat_tok():
    return _tokenizer(CHATML)


@pytest.fixture(scope="module")
def plain_tok():
    return _tokenizer(None)


# --- plain: lm-eval's gsm8k task ------------------------------------------------------------------


def test_plain_two_shot_is_lm_eval_format():
    assert render_prompt("plain", "q", EXEMPLARS) == (
        "Question: q1\nAnswer: a1\n\nQuestion: q2\nAnswer: a2\n\nQuestion: q\nAnswer:"
    )


def test_plain_zero_shot():
    assert render_prompt("plain", "How many?") == "Question: How many?\nAnswer:"


@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_plain_k_shot_matches_lm_eval_construction(k):
    """lm-eval: doc_to_text + target_delimiter " " + doc_to_target, joined by fewshot_delimiter "\\n\\n"."""
    shots = [Exemplar(f"Q{i} has 2 apples?", f"2 + {i} = {2 + i}\n#### {2 + i}") for i in range(k)]
    doc_to_text = "Question: {}\nAnswer:".format
    expected = ("".join(doc_to_text(ex.question) + " " + ex.answer + "\n\n" for ex in shots)
                + doc_to_text("Q?"))
    assert render_prompt("plain", "Q?", shots) == expected


def test_plain_keeps_text_verbatim():
    ex = [Exemplar("  spaced\nquestion ", "line1\nline2\n#### 3")]
    assert render_prompt("plain", "x", ex) == ("Question:   spaced\nquestion \nAnswer: line1\nline2\n#### 3"
                                               "\n\nQuestion: x\nAnswer:")


def test_plain_system_prompt_comes_first():
    assert render_prompt("plain", "q", EXEMPLARS[:1], system_prompt="Be brief.") == (
        "Be brief.\n\nQuestion: q1\nAnswer: a1\n\nQuestion: q\nAnswer:"
    )


def test_plain_target_and_stops():
    prompt = render_prompt("plain", "q")
    assert prompt + render_target("plain", "a #### 1") == "Question: q\nAnswer: a #### 1"
    assert stop_strings("plain") == PLAIN_STOP
    assert "Question:" in stop_strings("plain")
    assert add_special_tokens_for("plain") is True
    assert add_special_tokens_for("chat") is False
    assert stop_strings("chat") == ()
    assert render_target("chat", "a") == "a"


def test_unresolved_style_is_rejected():
    with pytest.raises(ConfigError, match="not resolved"):
        render_prompt("auto", "q")


# --- resolve_style ------------------------------------------------------------------------------


def test_auto_picks_chat_with_a_template(chat_tok):
    assert resolve_style("auto", chat_tok) == "chat"


def test_auto_picks_plain_without_a_template(plain_tok):
    assert resolve_style("auto", plain_tok) == "plain"
    assert resolve_style("auto", None) == "plain"


def test_explicit_styles(chat_tok, plain_tok):
    assert resolve_style("plain", chat_tok) == "plain"
    assert resolve_style("plain", plain_tok) == "plain"
    assert resolve_style("chat", chat_tok) == "chat"


def test_chat_without_template_is_a_config_error(plain_tok):
    with pytest.raises(ConfigError) as info:
        resolve_style("chat", plain_tok)
    assert "chat template" in str(info.value)
    assert info.value.hint == "use --style plain"


def test_unknown_style(plain_tok):
    with pytest.raises(ConfigError, match="unknown prompt style 'fancy'") as info:
        resolve_style("fancy", plain_tok)
    assert all(s in info.value.hint for s in STYLES)


# --- chat ---------------------------------------------------------------------------------------


def test_build_messages_puts_exemplars_as_earlier_turns():
    assert build_messages("q", EXEMPLARS, "sys") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q"},
    ]
    assert build_messages("q", []) == [{"role": "user", "content": "q"}]


def test_chat_renders_exemplars_as_user_assistant_turns(chat_tok):
    assert render_prompt("chat", "q", EXEMPLARS, chat_tok) == (
        "<|im_start|>user\nq1<|im_end|>\n"
        "<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n"
        "<|im_start|>assistant\na2<|im_end|>\n"
        "<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_system_prompt_and_zero_shot(chat_tok):
    assert render_prompt("chat", "q", (), chat_tok, system_prompt="sys") == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_prompt_tokenizes_with_the_local_tokenizer(chat_tok):
    text = render_prompt("chat", "q", EXEMPLARS[:1], chat_tok)
    ids = chat_tok(text, add_special_tokens=add_special_tokens_for("chat")).input_ids
    assert ids[0] == chat_tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(chat_tok.convert_tokens_to_ids("<|im_end|>")) == 3  # q1, a1, q


def test_chat_render_without_template_is_a_config_error(plain_tok):
    with pytest.raises(ConfigError, match="chat template"):
        render_prompt("chat", "q", EXEMPLARS, plain_tok)
    with pytest.raises(ConfigError, match="chat template"):
        render_prompt("chat", "q", EXEMPLARS, None)
