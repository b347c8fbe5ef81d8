"""gsmkit.training.masking: the loss sees the response (and its end of turn) only, for real template
shapes."""

from __future__ import annotations

import copy

import pytest
from conftest import CHATML, build_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gsmkit.errors import ConfigError, DataError
from gsmkit.prompts import render_prompt
from gsmkit.tokenization import IGNORE_INDEX, Encoded
from gsmkit.training.data import TrainExample
from gsmkit.training.masking import MASKED_STYLE, TRAINED_STYLE, encode_example, masking_preview

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")
ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
          "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
SYSTEM = "You are a careful math tutor."
CORPUS = [QUESTION, ANSWER, "Question: How many? Answer: 12 #### 12", "user assistant system tutor careful",
          "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting."] * 20

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOL_DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("chatml"), CORPUS)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    tok = build_tokenizer(tmp_path_factory.mktemp("llama3"), CORPUS)
    tok.add_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   special_tokens=True)
    tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = LLAMA3
    return tok


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    tok = build_tokenizer(tmp_path_factory.mktemp("smollm"), CORPUS)
    tok.chat_template = SMOLLM
    return tok


@pytest.fixture(scope="module")
def with_bos(tmp_path_factory):
    """A tokenizer that adds a BOS when asked for special tokens, as Llama and Mistral tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    tok = build_tokenizer(tmp_path_factory.mktemp("bos"), CORPUS)
    tok.add_tokens(["<s>"], special_tokens=True)
    tok.bos_token = "<s>"
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A",
                                                              special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("a").input_ids[0] == tok.bos_token_id
    return tok


def qa(question: str = QUESTION, answer: str = ANSWER) -> TrainExample:
    return TrainExample(where="data.jsonl:7", question=question, answer=answer)


def split(enc: Encoded) -> int:
    """Index of the first trained token, after checking the labels are [-100]*k + input_ids[k:]."""
    k = next((i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX), len(enc.labels))
    assert enc.labels == [IGNORE_INDEX] * k + enc.input_ids[k:]
    assert enc.num_trainable == len(enc.input_ids) - k
    return k


def parts(enc: Encoded, tok) -> tuple[str, str]:
    """(masked text, trained text), decoded with special tokens shown."""
    k = split(enc)
    return tok.decode(enc.input_ids[:k]), tok.decode(enc.input_ids[k:])


# --- chat templates ------------------------------------------------------------------------------


@pytest.mark.parametrize("system_prompt", [None, SYSTEM])
def test_chatml_trains_the_answer_and_end_of_turn_only(chatml, system_prompt):
    enc = encode_example(qa(), chatml, "chat", 1024, system_prompt=system_prompt)
    prompt = render_prompt("chat", QUESTION, (), chatml, system_prompt)
    masked, trained = parts(enc, chatml)
    assert trained == ANSWER + "<|im_end|>\n"
    assert masked == prompt
    # The masked tokens are exactly what `eval gsm8k` feeds the model for this question.
    assert enc.input_ids[:split(enc)] == chatml(prompt, add_special_tokens=False).input_ids
    assert (SYSTEM in masked) == (system_prompt is not None)
    assert not enc.truncated and enc.where == "data.jsonl:7"


@pytest.mark.parametrize("system_prompt", [None, SYSTEM])
def test_llama3_template_trains_answer_and_eot(llama3, system_prompt):
    # The template trims contents, so the trained text is what the template renders, not the raw row.
    enc = encode_example(qa(answer=ANSWER + "\n"), llama3, "chat", 1024, system_prompt=system_prompt)
    masked, trained = parts(enc, llama3)
    assert trained == ANSWER + "<|eot_id|>"
    assert enc.labels[-1] == enc.input_ids[-1] == llama3.convert_tokens_to_ids("<|eot_id|>")
    assert enc.input_ids[0] == llama3.bos_token_id and enc.labels[0] == IGNORE_INDEX
    system = f"<|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>" if system_prompt else ""
    assert masked == (f"<|begin_of_text|>{system}<|start_header_id|>user<|end_header_id|>\n\n"
                      f"{QUESTION}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_default_system_prompt_of_the_template_is_masked(smollm):
    masked, trained = parts(encode_example(qa(), smollm, "chat", 1024), smollm)
    assert masked.startswith(f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n")
    assert trained == ANSWER + "<|im_end|>\n"


def test_given_system_prompt_replaces_the_template_default(smollm):
    masked, trained = parts(encode_example(qa(), smollm, "chat", 1024, system_prompt=SYSTEM), smollm)
    assert masked.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    assert SMOL_DEFAULT_SYSTEM not in masked
    assert trained == ANSWER + "<|im_end|>\n"


def test_prompt_response_row_in_chat_style_is_one_user_turn(chatml):
    ex = TrainExample(where="pr.jsonl:1", prompt="What is 2 + 2?", response="2 + 2 = 4\n#### 4")
    masked, trained = parts(encode_example(ex, chatml, "chat", 1024), chatml)
    assert masked == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert trained == "2 + 2 = 4\n#### 4<|im_end|>\n"


def test_messages_row_trains_the_last_assistant_message_only(chatml):
    messages = ({"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": ANSWER})
    ex = TrainExample(where="chat.jsonl:3", messages=messages)
    masked, trained = parts(encode_example(ex, chatml, "chat", 1024), chatml)
    assert trained == ANSWER + "<|im_end|>\n"
    assert "It is 4.<|im_end|>" in masked  # earlier assistant turns are context, not targets
    assert masked == chatml.apply_chat_template(list(messages[:-1]), tokenize=False,
                                                add_generation_prompt=True)


def test_messages_row_gets_the_system_prompt_unless_it_has_one(chatml):
    user_only = TrainExample(where="c:1", messages=({"role": "user", "content": "Hi?"},
                                                     {"role": "assistant", "content": "Hello."}))
    masked, trained = parts(encode_example(user_only, chatml, "chat", 64, system_prompt=SYSTEM), chatml)
    assert masked.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and trained == "Hello.<|im_end|>\n"
    own = TrainExample(where="c:2",
                       messages=({"role": "system", "content": "Be brief."},) + user_only.messages)
    with pytest.raises(ConfigError, match="c:2: the row has its own system message"):
        encode_example(own, chatml, "chat", 64, system_prompt=SYSTEM)


# --- plain style ---------------------------------------------------------------------------------


def test_plain_style_trains_answer_and_eos_not_the_prompt(with_bos):
    enc = encode_example(qa(), with_bos, "plain", 1024)
    masked, trained = parts(enc, with_bos)
    assert masked == f"<s>Question: {QUESTION}\nAnswer:"
    assert trained == " " + ANSWER + "<|im_end|>"
    assert enc.input_ids[-1] == enc.labels[-1] == with_bos.eos_token_id
    assert enc.input_ids[0] == with_bos.bos_token_id and enc.labels[0] == IGNORE_INDEX
    # The masked part is the prompt `eval gsm8k` tokenises, BOS included.
    prompt = render_prompt("plain", QUESTION)
    assert enc.input_ids[:split(enc)] == with_bos(prompt, add_special_tokens=True).input_ids


def test_plain_style_without_bos_and_with_system_prompt(chatml):
    masked, trained = parts(encode_example(qa(), chatml, "plain", 1024, system_prompt=SYSTEM), chatml)
    assert masked == f"{SYSTEM}\n\nQuestion: {QUESTION}\nAnswer:"
    assert trained == " " + ANSWER + "<|im_end|>"


def test_plain_prompt_response_row_is_used_verbatim(with_bos):
    ex = TrainExample(where="pr:1", prompt="Q: What is 2 + 2?\nA:", response=" 4")
    masked, trained = parts(encode_example(ex, with_bos, "plain", 1024), with_bos)
    assert (masked, trained) == ("<s>Q: What is 2 + 2?\nA:", " 4<|im_end|>")


def test_token_straddling_the_boundary_is_not_trained(chatml):
    # The prompt's trailing space and the response's first word merge into one token ("Ġclips"):
    # it holds prompt text, so it is masked, and only what starts after the prompt is trained.
    ex = TrainExample(where="pr:2", prompt="How many clips? Answer: ", response="clips")
    enc = encode_example(ex, chatml, "plain", 1024)
    assert chatml.convert_ids_to_tokens(enc.input_ids[-2]) == "Ġclips"
    assert enc.labels[-2] == IGNORE_INDEX
    assert enc.input_ids[split(enc):] == [chatml.eos_token_id]


def test_plain_style_rejects_messages_and_system_prompt_on_rendered_prompts(chatml):
    ex = TrainExample(where="m:4",
                      messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}))
    with pytest.raises(ConfigError, match="m:4: messages rows need the chat style") as err:
        encode_example(ex, chatml, "plain", 64)
    assert "--style chat" in err.value.hint
    pr = TrainExample(where="pr:3", prompt="Q: x\nA:", response=" y")
    with pytest.raises(ConfigError, match="pr:3: a system prompt cannot be added"):
        encode_example(pr, chatml, "plain", 64, system_prompt=SYSTEM)


# --- truncation ----------------------------------------------------------------------------------


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_answer(chatml):
    full = encode_example(qa(), chatml, "chat", 10_000)
    k, n = split(full), full.num_trainable
    assert k > 10
    enc = encode_example(qa(), chatml, "chat", n + 5)
    assert enc.truncated
    assert enc.input_ids == full.input_ids[-(n + 5):] and enc.labels == full.labels[-(n + 5):]
    assert enc.num_trainable == n and split(enc) == 5
    assert chatml.decode(enc.input_ids[5:]) == ANSWER + "<|im_end|>\n"


def test_answer_longer_than_max_length_keeps_its_start_and_still_trains(chatml):
    full = encode_example(qa(), chatml, "plain", 10_000)
    k = split(full)
    enc = encode_example(qa(), chatml, "plain", 6)
    assert enc.truncated and enc.input_ids == full.input_ids[k:k + 6]
    assert enc.labels == enc.input_ids and enc.num_trainable == 6


def test_example_that_fits_exactly_is_not_truncated(chatml):
    full = encode_example(qa(), chatml, "chat", 10_000)
    enc = encode_example(qa(), chatml, "chat", len(full.input_ids))
    assert enc == full and not enc.truncated


def test_max_length_below_one_is_a_config_error(chatml):
    with pytest.raises(ConfigError, match="at least 1"):
        encode_example(qa(), chatml, "chat", 0)


# --- templates that cannot be masked -------------------------------------------------------------


def _with_template(tok, template):
    tok = copy.deepcopy(tok)  # the module's tokenizer is shared by other tests
    tok.chat_template = template
    return tok


def test_empty_trainable_span_names_the_example(chatml):
    # A template that drops assistant messages renders nothing after the generation prompt.
    silent = _with_template(chatml, "{% for m in messages %}{% if m['role'] != 'assistant' %}"
                                    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                                    "{% endif %}{% endfor %}{{ '<|im_start|>assistant\n' }}")
    with pytest.raises(DataError, match=r"^data\.jsonl:7: no trainable token") as err:
        encode_example(qa(), silent, "chat", 1024)
    assert err.value.hint


def test_template_that_is_not_prefix_stable_is_rejected(chatml):
    renamed = _with_template(chatml, CHATML.replace("message['role']",
                                                    "(message['role'] | replace('assistant', 'bot'))"))
    assert "<|im_start|>bot\n" in renamed.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tokenize=False)
    with pytest.raises(ConfigError, match="data.jsonl:7: .*not a prefix") as err:
        encode_example(qa(), renamed, "chat", 1024)
    assert "--style plain" in err.value.hint


def test_chat_style_needs_a_template(chatml):
    with pytest.raises(ConfigError, match="chat template"):
        encode_example(qa(), _with_template(chatml, None), "chat", 1024)


def test_unresolved_style_is_rejected(chatml):
    with pytest.raises(ConfigError, match="not resolved"):
        encode_example(qa(), chatml, "auto", 1024)


# --- properties and preview ----------------------------------------------------------------------


_answers = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda s: not s[0].isspace() and s.strip())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=st.text(min_size=1, max_size=40).filter(str.strip), answer=_answers)
def test_any_answer_is_trained_exactly(chatml, question, answer):
    chat = encode_example(qa(question, answer), chatml, "chat", 4096)
    assert parts(chat, chatml) == (render_prompt("chat", question, (), chatml), answer + "<|im_end|>\n")
    plain = encode_example(qa(question, answer), chatml, "plain", 4096)
    assert parts(plain, chatml) == (render_prompt("plain", question), " " + answer + "<|im_end|>")


def test_masking_preview_highlights_exactly_the_trained_text(chatml):
    question = "What does [bold]x[/bold] mean?"  # markup-like text is shown as written
    enc = encode_example(qa(question=question), chatml, "chat", 1024)
    text = masking_preview(enc, chatml)
    trained = "".join(text.plain[s.start:s.end] for s in text.spans if s.style == TRAINED_STYLE)
    masked = "".join(text.plain[s.start:s.end] for s in text.spans if s.style == MASKED_STYLE)
    assert trained == ANSWER + "<|im_end|>\n"
    assert masked == render_prompt("chat", question, (), chatml)
    header = text.plain.split("\n", 1)[0]
    assert header.startswith("data.jsonl:7:") and f"{enc.num_trainable} trained" in header
    short = masking_preview(encode_example(qa(), chatml, "chat", 8), chatml)
    assert "truncated" in short.plain.split("\n", 1)[0]
