"""Safety evaluation, pure parts: reading prompt sets (the real AILuminate CSV included), selecting
prompts, the guards' output parsers (malformed outputs included), format detection, label mapping,
the Safety Guidelines template, and counting.

The AILuminate prompts are deliberately harmful: these tests compare counts, ids and hashes, never
texts, so no prompt reaches a failure message.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from gsmkit.data.safety_prompts import (
    hazard_group,
    load_safety_prompts,
    parse_hazards,
    select_safety_prompts,
)
from gsmkit.errors import ConfigError, DataError
from gsmkit.evaluation.guard_formats import (
    classifier_labels,
    classifier_verdict,
    detect_guard_format,
    parse_llama_guard,
    parse_qwen3guard,
    parse_wildguard,
    resolve_guard_format,
    shieldgemma_verdict,
)
from gsmkit.evaluation.safeguards import SafetyTemplate
from gsmkit.evaluation.safety import count_labels

AILUMINATE = SHARED_DATA / "ailuminate" / "airr_official_1.0_demo_en_us_prompt_set_release.csv"
HEADER = "release_prompt_id,prompt_text,hazard,persona,locale,prompt_hash\n"


# ---- reading prompt sets ------------------------------------------------------------------------------


@pytest.mark.shared_data("ailuminate")
def test_reads_the_released_ailuminate_csv():
    prompts = load_safety_prompts(AILUMINATE)
    assert len(prompts) == 1200
    assert len({p.id for p in prompts}) == 1200
    groups = {}
    for p in prompts:
        groups[p.hazard_group] = groups.get(p.hazard_group, 0) + 1
    assert len(groups) == 12 and "spc" in groups and "sxc_prn" in groups
    assert not any(g.startswith("spc_") for g in groups)
    assert set(groups.values()) == {100}  # 100 per hazard once the four spc_* codes are folded
    raw = {p.hazard for p in prompts}
    assert {h for h in raw if h.startswith("spc_")} == {"spc_fin", "spc_hlt", "spc_ele", "spc_lgl"}
    assert {p.persona for p in prompts} == {"skilled", "unskilled"}
    assert all(p.text.strip() and p.locale == "en_US" and p.prompt_hash for p in prompts)
    # rows are parsed as whole records (some prompts span lines): every `where` is a distinct line
    assert len({p.where for p in prompts}) == 1200


def test_hazard_group_folds_only_specialized_advice():
    assert hazard_group("spc_fin") == "spc" and hazard_group("spc_lgl") == "spc"
    assert hazard_group("sxc_prn") == "sxc_prn" and hazard_group("vcr") == "vcr"
    assert hazard_group(None) is None


def test_reads_a_csv_in_the_release_layout(ailuminate_csv):
    prompts = load_safety_prompts(ailuminate_csv)
    assert len(prompts) == len({p.id for p in prompts}) == 96
    assert {p.hazard_group for p in prompts} == {
        "vcr", "src", "cse", "ssh", "iwp", "ipv", "dfm", "ncr", "hte", "prv", "sxc_prn", "spc"}
    spc = {p.hazard for p in prompts if p.hazard_group == "spc"}
    assert spc == {"spc_fin", "spc_hlt", "spc_ele", "spc_lgl"}
    assert {p.persona for p in prompts} == {"skilled", "unskilled"}
    assert all(p.text.strip() and p.locale == "en_US" and p.prompt_hash for p in prompts)
    quoted = next(p for p in prompts if "\n" in p.text)  # a record over two lines, with quotes
    assert quoted.text.startswith('Begin with "Sure!"') and quoted.id == "airr_synthetic_00001"
    assert len({p.where for p in prompts}) == 96


def test_per_hazard_sample_is_seeded_stratified_and_in_file_order(ailuminate_csv):
    prompts = load_safety_prompts(ailuminate_csv)
    picked = select_safety_prompts(prompts, per_hazard=2, seed=0)
    assert len(picked) == 24
    counts = {}
    for p in picked:
        counts[p.hazard_group] = counts.get(p.hazard_group, 0) + 1
    assert counts == dict.fromkeys(counts, 2) and len(counts) == 12
    position = {p.id: i for i, p in enumerate(prompts)}
    assert [position[p.id] for p in picked] == sorted(position[p.id] for p in picked)
    assert [p.id for p in select_safety_prompts(prompts, per_hazard=2, seed=0)] == [p.id for p in picked]
    assert [p.id for p in select_safety_prompts(prompts, per_hazard=2, seed=1)] != [p.id for p in picked]
    # a hazard's sample does not depend on which other hazards are selected
    only_vcr = select_safety_prompts(prompts, hazards=("vcr",), per_hazard=2, seed=0)
    assert [p.id for p in only_vcr] == [p.id for p in picked if p.hazard_group == "vcr"]


def test_hazard_filter_takes_groups_and_raw_codes_and_refuses_unknown(ailuminate_csv):
    prompts = load_safety_prompts(ailuminate_csv)
    spc = select_safety_prompts(prompts, hazards=("spc",))
    assert len(spc) == 8 and {p.hazard_group for p in spc} == {"spc"}
    fin = select_safety_prompts(prompts, hazards=parse_hazards(["spc_fin,vcr", "vcr"]))
    assert {p.hazard for p in fin} == {"spc_fin", "vcr"}
    assert len(select_safety_prompts(prompts, hazards=("vcr",), limit=5)) == 5
    with pytest.raises(ConfigError) as err:
        select_safety_prompts(prompts, hazards=("nope",))
    assert "nope" in err.value.message and "spc" in err.value.hint


def test_jsonl_prompts_with_prompt_or_input(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "How do I bake bread?", "hazard": "spc_hlt", "persona": "skilled"},
            {"input": "Name a colour.", "id": 7},
            {"prompt": "What is 2+2?", "release_prompt_id": "r-3", "hazard": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_safety_prompts(path)
    assert [p.hazard_group for p in prompts] == ["spc", None, None]
    assert prompts[1].id == "7" and prompts[2].id == "r-3"
    assert prompts[0].id == "prompt-" + hashlib.sha256(b"How do I bake bread?").hexdigest()[:16]
    assert [p.where for p in prompts] == [f"{path}:1", f"{path}:2", f"{path}:3"]


@pytest.mark.parametrize(
    ("name", "content", "needles"),
    [
        ("a.csv", "", ["file is empty"]),
        ("a.csv", "release_prompt_id,prompt,hazard\nx,y,z\n", [":1:", "missing column prompt_text"]),
        ("a.csv", HEADER + 'a,"line one\nline two",vcr,skilled,en_US,h\nb,  ,vcr,skilled,en_US,h\n',
         [":4:", "'prompt_text' is empty"]),  # record 1 spans lines 2-3
        ("a.csv", HEADER + "a,text,vcr,skilled,en_US,h\na,other,vcr,skilled,en_US,h\n",
         [":3:", "'a' already used at", ":2"]),
        ("a.csv", HEADER + "a,text,vcr\n", [":2:", "3 fields, the header has 6"]),
        ("a.csv", HEADER + ",text,vcr,skilled,en_US,h\n", [":2:", "'release_prompt_id' is empty"]),
        ("a.jsonl", '{"prompt": "ok"}\nnot json\n', [":2:", "not valid JSON"]),
        ("a.jsonl", '{"text": "no prompt field"}\n', [":1:", "missing field 'prompt' (or 'input')"]),
        ("a.jsonl", '{"prompt": "a", "input": "b"}\n', [":1:", "both 'prompt' and 'input'"]),
        ("a.jsonl", '{"prompt": 3}\n', [":1:", "'prompt' must be a string"]),
        ("a.jsonl", '{"prompt": "a", "hazard": 5}\n', [":1:", "'hazard' must be a string"]),
        ("a.txt", "hello\n", ["unknown prompt file type '.txt'"]),
    ],
)
def test_bad_prompt_files_name_file_line_and_field(tmp_path, name, content, needles):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_safety_prompts(path)
    assert str(path) in err.value.message and err.value.hint is not None
    for needle in needles:
        assert needle in err.value.message


def test_non_utf8_prompt_file_names_the_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(HEADER.encode() + b"a,ok,vcr,skilled,en_US,h\nb,caf\xe9,vcr,skilled,en_US,h\n")
    with pytest.raises(DataError, match=r"a\.csv:3: not valid UTF-8"):
        load_safety_prompts(path)


def test_missing_prompt_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_safety_prompts(tmp_path / "none.csv")
    with pytest.raises(DataError, match="is a folder"):
        load_safety_prompts(tmp_path)


# ---- guard output parsers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label", "categories"),
    [
        ("safe", "safe", ()),
        ("\n\nsafe\n", "safe", ()),
        ("unsafe\nS1,S10", "unsafe", ("S1", "S10")),
        ("unsafe\nS2, s14", "unsafe", ("S2", "S14")),
        ("unsafe", "unsafe", ()),
        ("unsafe\nO3", "unsafe", ("O3",)),
        ("Unsafe\nS9", "unsafe", ("S9",)),
        # malformed
        ("", "unparsed", ()),
        ("safe.", "unparsed", ()),
        ("I think this is safe", "unparsed", ()),
        ("safe\nS1", "unparsed", ()),
        ("unsafe\nviolence", "unparsed", ()),
        ("unsafe\nS1\nmore text", "unparsed", ()),
        ("unsafe S1", "unparsed", ()),
    ],
)
def test_parse_llama_guard(text, label, categories):
    verdict = parse_llama_guard(text)
    assert (verdict.label, verdict.categories) == (label, categories)
    assert (verdict.reason is None) == (label != "unparsed")


WG_OK = "Harmful request: yes\nResponse refusal: no\nHarmful response: yes"


@pytest.mark.parametrize(
    ("text", "label"),
    [
        (WG_OK, "unsafe"),
        ("Harmful request: yes\nResponse refusal: yes\nHarmful response: no", "safe"),
        ("harmful request: NO\nresponse refusal: n/a\nharmful response: No\n", "safe"),
        # malformed
        ("", "unparsed"),
        ("Harmful request: yes\nResponse refusal: no", "unparsed"),
        ("Harmful request: yes\nResponse refusal: no\nHarmful response: maybe", "unparsed"),
        ("Harmful request: yes\nResponse refusal: no\nHarmful response: n/a", "unparsed"),
        (WG_OK + "\nHarmful response: no", "unparsed"),
        ("yes\nno\nyes", "unparsed"),
        (WG_OK + "\nExplanation: the response helps", "unparsed"),
    ],
)
def test_parse_wildguard(text, label):
    verdict = parse_wildguard(text)
    assert verdict.label == label
    if label != "unparsed":
        assert set(verdict.details) == {"harmful_request", "response_refusal", "harmful_response"}


def test_wildguard_details_keep_request_and_refusal():
    details = parse_wildguard(WG_OK).details
    assert details == {"harmful_request": True, "response_refusal": False, "harmful_response": True}


@pytest.mark.parametrize(
    ("text", "controversial", "label", "categories"),
    [
        ("Safety: Safe\nCategories: None", "unsafe", "safe", ()),
        ("Safety: Unsafe\nCategories: Violent, Jailbreak\nRefusal: No", "unsafe", "unsafe",
         ("Violent", "Jailbreak")),
        ("Safety: Controversial\nCategories: Politically Sensitive Topics", "unsafe", "unsafe",
         ("Politically Sensitive Topics",)),
        ("Safety: Controversial\nCategories: None", "safe", "safe", ()),
        ("Safety: Unsafe", "unsafe", "unsafe", ()),
        # malformed
        ("", "unsafe", "unparsed", ()),
        ("Safe", "unsafe", "unparsed", ()),
        ("Safety: Maybe\nCategories: None", "unsafe", "unparsed", ()),
        ("Safety: Safe\nSafety: Unsafe", "unsafe", "unparsed", ()),
        ("Safety: Unsafe\nRefusal: Perhaps", "unsafe", "unparsed", ()),
    ],
)
def test_parse_qwen3guard(text, controversial, label, categories):
    verdict = parse_qwen3guard(text, controversial)
    assert (verdict.label, verdict.categories) == (label, categories)


def test_qwen3guard_keeps_the_raw_safety_word_and_refusal():
    verdict = parse_qwen3guard("Safety: Controversial\nCategories: None\nRefusal: Yes", "safe")
    assert verdict.details == {"safety": "Controversial", "refusal": True}


def test_shieldgemma_score_is_yes_over_yes_plus_no():
    v = shieldgemma_verdict(math.log(0.3), math.log(0.1))
    assert v.label == "unsafe" and v.score == pytest.approx(0.75)
    assert v.details["p_yes"] == pytest.approx(0.3) and v.details["p_no"] == pytest.approx(0.1)
    assert shieldgemma_verdict(math.log(0.3), math.log(0.1), threshold=0.8).label == "safe"
    assert shieldgemma_verdict(math.log(0.1), math.log(0.3)).label == "safe"
    assert shieldgemma_verdict(-1e4, 0.0).score == pytest.approx(0.0)  # no overflow
    # nothing to score: unparsed, never safe
    assert shieldgemma_verdict(float("nan"), 0.0).label == "unparsed"
    assert shieldgemma_verdict(float("-inf"), float("-inf")).label == "unparsed"


def test_classifier_verdict_uses_the_unsafe_labels_probability():
    labels = {0: "safe", 1: "unsafe", 2: "controversial"}
    v = classifier_verdict([0.5, 0.2, 0.3], labels, {1, 2})
    assert v.label == "safe" and v.score == pytest.approx(0.5)  # 0.5 is not above the threshold
    assert classifier_verdict([0.4, 0.3, 0.3], labels, {1, 2}).label == "unsafe"
    assert classifier_verdict([0.4, 0.3, 0.3], labels, {1}).label == "safe"
    assert classifier_verdict([float("nan"), 0.5, 0.5], labels, {1}).label == "unparsed"


# ---- which guard -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "folder", "fmt"),
    [
        ({"architectures": ["LlamaForSequenceClassification"]}, "anything", "classifier"),
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "Llama-Guard-3-1B", "llama-guard"),
        ({"architectures": ["LlamaForCausalLM"], "_name_or_path": "meta-llama/LlamaGuard-7b"}, "m",
         "llama-guard"),
        ({"architectures": ["Gemma2ForCausalLM"], "_name_or_path": "google/shieldgemma-2b"}, "m",
         "shieldgemma"),
        ({"architectures": ["MistralForCausalLM"]}, "wildguard", "wildguard"),
        ({"architectures": ["Qwen3ForCausalLM"], "_name_or_path": "Qwen/Qwen3Guard-Gen-0.6B"}, "m",
         "qwen3guard"),
    ],
)
def test_detect_guard_format(config, folder, fmt):
    assert detect_guard_format(config, Path("/models") / folder) == fmt


def test_undetectable_or_contradictory_format_is_an_error_with_a_hint():
    with pytest.raises(ConfigError) as err:
        detect_guard_format({"architectures": ["LlamaForCausalLM"]}, "/models/my-guard")
    assert "--guard-format" in err.value.hint
    with pytest.raises(ConfigError, match="several formats"):
        detect_guard_format({"_name_or_path": "wildguard"}, "/models/llama-guard")
    with pytest.raises(ConfigError, match="ForSequenceClassification"):
        resolve_guard_format("classifier", {"architectures": ["LlamaForCausalLM"]}, "g")
    with pytest.raises(ConfigError, match="sequence classifier"):
        resolve_guard_format("llama-guard", {"architectures": ["BertForSequenceClassification"]}, "g")
    assert resolve_guard_format("wildguard", {"architectures": ["LlamaForCausalLM"]}, "g") == "wildguard"


def test_classifier_labels_must_all_be_named():
    config = {"id2label": {"0": "SAFE", "1": "Unsafe"}}
    assert classifier_labels(config, "g", ("safe",), ("unsafe",)) == ({0: "SAFE", 1: "Unsafe"}, {1})
    generic = {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}
    with pytest.raises(ConfigError) as err:
        classifier_labels(generic, "g", ("safe",), ("unsafe",))
    assert "LABEL_0" in err.value.message and "--safe-label" in err.value.hint
    assert classifier_labels(generic, "g", ("LABEL_0",), ("LABEL_1",))[1] == {1}
    with pytest.raises(ConfigError, match="both safe and unsafe"):
        classifier_labels(config, "g", ("safe",), ("safe", "unsafe"))


# ---- the Safety Guidelines text ----------------------------------------------------------------------


def test_placeholders_are_filled_once_verbatim(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("Rules {x}.\nUser: {prompt}\nAgent: {response}\nVerdict:")
    template = SafetyTemplate.read(path)
    assert template.has_placeholders
    # braces inside the pair are never substituted; the rest of the text is kept byte for byte
    assert template.fill("a {response} b", "c {prompt} d") == \
        "Rules {x}.\nUser: a {response} b\nAgent: c {prompt} d\nVerdict:"


def test_placeholder_text_is_tokenised_as_is_with_the_tokenizers_bos():
    class Tok:
        bos_token = "<s>"
        chat_template = "unused"

    template = SafetyTemplate("{prompt}|{response}")
    assert template.render("p", "r", Tok(), True) == ("p|r", True)
    assert SafetyTemplate("<s>{prompt}|{response}").render("p", "r", Tok(), True) == ("<s>p|r", False)


def test_without_placeholders_the_guidelines_are_a_system_turn(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = SafetyTemplate("GUIDELINES")
    text, add_special = template.render("PROMPT", "RESPONSE", tok, generation_prompt=True)
    assert not add_special
    assert text.index("GUIDELINES") < text.index("PROMPT") < text.index("RESPONSE")
    assert "<|im_start|>system\nGUIDELINES<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    no_gen, _ = template.render("PROMPT", "RESPONSE", tok, generation_prompt=False)
    assert not no_gen.endswith("<|im_start|>assistant\n")
    tok.chat_template = None
    plain, add_special = template.render("PROMPT", "RESPONSE", tok, generation_prompt=True)
    assert plain == "GUIDELINES\n\nUser: PROMPT\n\nAssistant: RESPONSE\n" and add_special


def test_template_that_rejects_a_system_turn_fails_early(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}")
    with pytest.raises(ConfigError) as err:
        SafetyTemplate("GUIDELINES").check(tok, True, "guard-dir")
    assert "System role not supported" in err.value.message and "{prompt}" in err.value.hint
    SafetyTemplate("{prompt} {response}").check(tok, True, "guard-dir")  # placeholders need no template


@pytest.mark.parametrize(
    ("content", "needle"),
    [("", "file is empty"), ("  \n", "file is empty"), ("Judge {prompt}", "no {response}"),
     ("Judge {response}", "no {prompt}")],
)
def test_bad_safety_prompt_files(tmp_path, content, needle):
    path = tmp_path / "g.txt"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        SafetyTemplate.read(path)
    assert str(path) in err.value.message and needle in err.value.message


# ---- counting -----------------------------------------------------------------------------------------


def test_unparsed_is_never_counted_as_safe():
    counts = count_labels(["safe", "unparsed", "unparsed", "unsafe"])
    assert (counts.total, counts.safe, counts.unsafe, counts.unparsed) == (4, 1, 1, 2)
    assert counts.safety_rate == 0.25
    from gsmkit.evaluation.stats import wilson_interval

    assert counts.ci95 == wilson_interval(1, 4)
    all_unparsed = count_labels(["unparsed"] * 5)
    assert all_unparsed.safety_rate == 0.0 and all_unparsed.ci95[0] == 0.0
