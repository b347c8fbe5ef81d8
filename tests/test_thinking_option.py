"""`--thinking on|off|auto` (issue 28, check 1): a Qwen3-style chat template on a tiny random Qwen3 model.

The template here behaves as Qwen3's does where it matters: the generation prompt gets an empty
`<think>\\n\\n</think>\\n\\n` when `enable_thinking` is false, the last assistant turn is written with its
(possibly empty) reasoning section, and earlier assistant turns lose their `<think>...</think>` reasoning.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import assert_clean_failure
from typer.testing import CliRunner

from gsmkit.cli import app

runner = CliRunner()

QWEN3_STYLE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content"
    " + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
EMPTY_THINK = "<think>\n\n</think>\n\n"
COMMANDS = (("eval", "gsm8k"), ("eval", "safety"), ("generate-traces",), ("train", "sft"), ("train", "qlora"),
            ("train", "grpo"), ("steer", "vectors"), ("steer", "search"))


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory, family_model_dirs) -> Path:
    """The tiny Qwen3 model's folder, copied, with the Qwen3-style template."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("qwen3-thinking") / "model"
    shutil.copytree(family_model_dirs("qwen3"), out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = QWEN3_STYLE
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(thinking_model):
    from gsmkit.modeling import load_tokenizer

    return load_tokenizer(str(thinking_model))


def _eval_args(model, data, out, *extra):
    return ["eval", "gsm8k", "--model", str(model), "--data", str(data), "--style", "chat", "--limit", "3",
            "--max-new-tokens", "3", "--batch-size", "2", "--out", str(out), *extra]


def _out(tmp_path, command):
    return tmp_path / ("o.jsonl" if command == ("generate-traces",) else "o")


def _render(tok, thinking, question="What is 2 + 3?", exemplars=()):
    from gsmkit.prompts import render_prompt, resolve_style

    return render_prompt(resolve_style("chat", tok, thinking), question, exemplars, tok, None, thinking)


def test_off_and_on_render_the_templates_two_states(tok):
    from gsmkit.prompts import Exemplar

    shot = [Exemplar("How many legs do 2 ducks have?", "<think>\nducks: 2 legs, 7 legs?\n</think>\n#### 4")]
    off, on, auto = (_render(tok, t, exemplars=shot) for t in ("off", "on", "auto"))
    assert off.endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    assert on.endswith("<|im_start|>assistant\n") and EMPTY_THINK not in on
    assert auto == on  # auto passes nothing: this template's default is thinking
    for text in (off, on):  # the earlier turn's reasoning is dropped, as Qwen3's template does
        assert "7 legs" not in text and "<|im_start|>assistant\n#### 4<|im_end|>" in text


def test_eval_gsm8k_renders_records_and_refuses_a_resume_with_the_other_value(tmp_path, thinking_model, tok,
                                                                             small_gsm8k):
    from gsmkit.evaluation.gsm8k import EvalSettings, evaluate_gsm8k
    from gsmkit.modeling import ModelSpec

    questions = [json.loads(x)["question"] for x in (small_gsm8k / "test.jsonl").read_text().splitlines()[:3]]
    for thinking in ("off", "on"):
        out = tmp_path / thinking
        res = runner.invoke(app, _eval_args(thinking_model, small_gsm8k, out, "--thinking", thinking))
        assert res.exit_code == 0, res.output
        rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        want = [hashlib.sha256(_render(tok, thinking, q).encode()).hexdigest() for q in questions]
        assert [r["prompt_sha256"] for r in rows] == want
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["settings"]["thinking"] == thinking

    settings = EvalSettings(model=ModelSpec(str(thinking_model)), out=tmp_path / "r", data=str(small_gsm8k),
                            style="chat", limit=3, max_new_tokens=3, batch_size=2, thinking="off")

    def stop(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_gsm8k(settings, on_progress=stop)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["thinking"] == "off"
    res = runner.invoke(app, _eval_args(thinking_model, small_gsm8k, tmp_path / "r", "--thinking", "on"))
    assert_clean_failure(res, None, 1, "different settings")
    res = runner.invoke(app, _eval_args(thinking_model, small_gsm8k, tmp_path / "r", "--thinking", "off"))
    assert res.exit_code == 0 and "resuming" in res.output, res.output


def test_generate_traces_records_the_switch(tmp_path, thinking_model, small_gsm8k):
    out = tmp_path / "traces.jsonl"
    res = runner.invoke(app, ["generate-traces", "--model", str(thinking_model), "--data", str(small_gsm8k),
                              "--split", "test", "--style", "chat", "--num-samples", "2",
                              "--max-attempts", "1", "--max-new-tokens", "3", "--thinking", "off",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads(out.with_name("traces.manifest.json").read_text())
    assert manifest["settings"]["thinking"] == "off"


@pytest.mark.parametrize("thinking", ["off", "on"])
def test_training_masks_the_prompt_the_switch_renders(thinking, tok):
    from gsmkit.tokenization import IGNORE_INDEX
    from gsmkit.training.data import TrainExample
    from gsmkit.training.masking import encode_example

    ex = TrainExample(where="row 1", question="What is 2 + 3?", answer="2 + 3 = 5\n#### 5")
    enc = encode_example(ex, tok, "chat", 512, None, thinking)
    prompt_ids = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label == IGNORE_INDEX]
    trained = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE_INDEX]
    prompt, response = tok.decode(prompt_ids), tok.decode(trained)
    assert prompt == _render(tok, thinking)  # the prompt eval sends, token for token
    assert response.endswith(("#### 5<|im_end|>\n", "#### 5<|im_end|>"))
    assert (EMPTY_THINK in response) == (thinking == "on")  # off: the template's empty section is prompt


def test_a_reply_with_its_own_reasoning_is_trained_whole_and_the_prompt_never(tok):
    """Issue 28, check 4: thinking on, a reply that carries `<think>reasoning</think>` then the answer: every
    reasoning and answer token is trained, no prompt token is. With off the template writes an empty section
    before the reply, which a reply with reasoning contradicts: that row is refused by name, never
    mis-masked."""
    from gsmkit.errors import ConfigError
    from gsmkit.tokenization import IGNORE_INDEX
    from gsmkit.training.data import TrainExample
    from gsmkit.training.masking import encode_example

    reply = "<think>\nI add 2 and 3.\n</think>\n\n2 + 3 = 5\n#### 5"
    ex = TrainExample(where="row 1", question="What is 2 + 3?", answer=reply)
    enc = encode_example(ex, tok, "chat", 512, None, "on")
    prompt_ids = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label == IGNORE_INDEX]
    trained = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE_INDEX]
    assert tok.decode(prompt_ids) == _render(tok, "on")
    assert tok.decode(trained).removesuffix("\n") == reply + "<|im_end|>"
    with pytest.raises(ConfigError, match="row 1: the reply has its own <think> reasoning") as refused:
        encode_example(ex, tok, "chat", 512, None, "off")
    assert "--thinking on" in refused.value.hint


def test_show_masking_passes_the_switch(tmp_path, thinking_model, small_gsm8k, pool):
    """`train sft --show-masking`: the same rows, the empty section trained with on, masked with off."""
    counts = {}
    for thinking in ("on", "off"):
        res = runner.invoke(app, ["train", "sft", "--model", str(thinking_model), "--data", str(small_gsm8k),
                                  "--pool", str(pool), "--style", "chat", "--thinking", thinking,
                                  "--show-masking", "1", "--out", str(tmp_path / "t")], terminal_width=200)
        assert res.exit_code == 0, res.output
        found = re.search(r"(\d+)\s+tokens,\s+(\d+)\s+trained", res.output)
        assert found, res.output
        counts[thinking] = [int(n) for n in found.groups()]
    assert counts["off"][0] == counts["on"][0] and counts["off"][1] < counts["on"][1]


@pytest.mark.parametrize("command", [("eval", "gsm8k"), ("generate-traces",), ("train", "sft"),
                                     ("train", "grpo"), ("steer", "vectors")])
@pytest.mark.usefixtures("no_loading")
@pytest.mark.loading_allowed("tokenizer", "data")  # the switch is looked for in the tokenizer's template
def test_on_without_a_thinking_switch_is_one_line_exit_2_before_the_model_loads(
        command, tmp_path, family_model_dirs, small_gsm8k):
    model = family_model_dirs("qwen3")  # plain ChatML: no enable_thinking
    res = runner.invoke(app, [*command, "--model", str(model), "--data", str(small_gsm8k), "--style", "chat",
                              "--thinking", "on", "--out", str(_out(tmp_path, command))])
    assert_clean_failure(res, _out(tmp_path, command), 2, "no thinking switch")
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no thinking switch" in lines[0], res.output


@pytest.mark.parametrize("command", [("eval", "gsm8k"), ("generate-traces",), ("train", "sft"),
                                     ("train", "grpo"), ("steer", "vectors")])
def test_on_with_the_plain_style_is_a_usage_error(command, tmp_path, tiny_model_dir, small_gsm8k):
    res = runner.invoke(app, [*command, "--model", str(tiny_model_dir), "--data", str(small_gsm8k),
                              "--style", "plain", "--thinking", "off", "--out", str(_out(tmp_path, command))])
    assert res.exit_code == 2 and "--style plain" in res.output, res.output


def test_library_refuses_where_the_flag_changes_nothing(tiny_model_dir):
    from gsmkit.errors import UsageError
    from gsmkit.modeling import load_tokenizer
    from gsmkit.prompts import chat_template_kwargs, resolve_style

    plain_tok = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(UsageError, match="no thinking switch"):
        resolve_style("chat", plain_tok, "on")
    with pytest.raises(UsageError, match="plain"):
        resolve_style("plain", plain_tok, "off")
    assert resolve_style("auto", plain_tok, "auto") == "chat"
    assert chat_template_kwargs("auto") == {}
    assert chat_template_kwargs("on") == {"enable_thinking": True}
    assert chat_template_kwargs("off") == {"enable_thinking": False}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_thinking(command):
    res = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert res.exit_code == 0 and "--thinking" in res.output


@pytest.mark.parametrize("thinking", ["off", "on"])
def test_grpo_prompts_get_the_switch_as_trl_and_the_engine_render_them(thinking, tok):
    """train grpo: TRL applies the template itself with GRPOConfig.chat_template_kwargs, the engine rollouts
    with theirs; both must give eval's prompt."""
    from trl import GRPOConfig
    from trl.data_utils import apply_chat_template

    from gsmkit.prompts import chat_template_kwargs, encode_prompt
    from gsmkit.training.grpo import grpo_prompt
    from gsmkit.training.rollouts import prompt_token_ids

    kwargs = chat_template_kwargs(thinking)
    messages = grpo_prompt("chat", "What is 2 + 3?", (), tok, None)
    text, ids = encode_prompt("chat", "What is 2 + 3?", (), tok, None, thinking)
    assert apply_chat_template({"prompt": messages}, tok, **kwargs)["prompt"] == text
    assert prompt_token_ids(messages, tok, kwargs) == list(ids)
    assert "chat_template_kwargs" in GRPOConfig.__dataclass_fields__
