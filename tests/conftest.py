"""Shared fixtures: paths to the real data beside the repo, and tiny random models built offline."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"

def load_script(name: str):
    """A script of scripts/ (gen_cli_docs, gen_format_docs) imported as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_loading(monkeypatch):
    """Any model, tokenizer or GSM8K load fails the test: input checks must come before all of them."""
    def refuse(what):
        def fail(*_args, **_kwargs):
            raise AssertionError(f"{what} loaded before the inputs were checked")
        return fail

    monkeypatch.setattr("gsmkit.modeling.load_model", refuse("model"))
    monkeypatch.setattr("gsmkit.modeling.load_tokenizer", refuse("tokenizer"))
    monkeypatch.setattr("gsmkit.data.gsm8k.load_gsm8k", refuse("GSM8K data"))


@pytest.fixture
def record_settings(monkeypatch):
    """`record_settings("gsmkit.x.run")` replaces that library call by a recorder: the command builds its
    settings and stops; the returned dict holds them under "settings"."""
    seen: dict = {}

    def install(target: str) -> dict:
        def fake(settings, **_):
            seen["settings"] = settings
            raise SystemExit(0)

        monkeypatch.setattr(target, fake)
        return seen

    return install


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (SHARED_GSM8K / "test.jsonl").exists():
        pytest.skip("../shared/data/gsm8k is not beside the repo")
    return SHARED_GSM8K


def build_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in a second on `texts`, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return tok


def build_tiny_model(out_dir: Path, tokenizer, arch: str = "llama", hidden: int = 64, seed: int = 0) -> Path:
    """A 2-layer random causal LM saved with save_pretrained (weights init std 0.1 for peaked logits)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = {"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 4096, "initializer_range": 0.1, "tie_word_embeddings": False,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common, use_sliding_window=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _corpus() -> list[str]:
    texts = []
    if (SHARED_GSM8K / "train.jsonl").exists():
        with (SHARED_GSM8K / "train.jsonl").open() as fh:
            for i, line in enumerate(fh):
                if i >= 300:
                    break
                row = json.loads(line)
                texts += [row["question"], row["answer"]]
    texts += ["Question: How many? Answer: 12 #### 12", "user assistant system"] * 20
    return texts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(out, _corpus())
    return build_tiny_model(out, tok, "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-qwen2")
    tok = build_tokenizer(out, _corpus())
    return build_tiny_model(out, tok, "qwen2", seed=1)


@pytest.fixture(scope="session")
def small_gsm8k(tmp_path_factory, gsm8k_dir) -> Path:
    """A folder with the first 6 test problems and 40 train problems of the real data."""
    out = tmp_path_factory.mktemp("gsm8k-small")
    for split, n in (("test", 6), ("train", 40)):
        lines = (gsm8k_dir / f"{split}.jsonl").read_text().splitlines()[:n]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="session")
def pool(tmp_path_factory, small_gsm8k) -> Path:
    """A 4-exemplar few-shot pool drawn from small_gsm8k's train split by `gsmkit fewshot` (read-only)."""
    from typer.testing import CliRunner

    from gsmkit.cli import app

    out = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    res = CliRunner().invoke(app, ["fewshot", "--data", str(small_gsm8k), "--n", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def family_model_dirs(tmp_path_factory):
    """`family_model_dirs(family)`: the folder of a tiny random model of that family (tests/family_models.py),
    built once per session, sharing one tokenizer."""
    from family_models import build_family_model

    built: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("families")
    tok = build_tokenizer(base / "tokenizer", _corpus())

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_family_model(base / family, tok, family)
        return built[family]

    return get
