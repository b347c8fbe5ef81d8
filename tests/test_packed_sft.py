"""Packed SFT batches (issue 29, check 2): `train sft --packing` lays a batch's rows out as one sequence with
restarting positions (`collate.PackCollator`), and that gives the padded batch's loss and every LoRA gradient
within 1e-5 (float32; tiny Llama and Qwen2, rows of unequal length, gradient accumulation 2, the chunked
response loss and the model's own); no token attends across a row boundary (changing one row leaves the other
rows' logits as they were), on every family the suite builds, sliding windows included; a model that would
let rows see each other is refused (padded, said once, recorded in the manifest); the --show-masking view
shows the boundaries."""

from __future__ import annotations

import json

import pytest
import torch
from family_models import FAMILIES, WINDOW
from rich.console import Console

from gsmkit.tokenization import IGNORE_INDEX
from gsmkit.training.collate import PackCollator, PadCollator
from gsmkit.training.packing import packing_refusal

# lengths straddling the families' 32-position window; the third row starts with a trained token (a response
# cut to --max-length keeps no prompt), which the packed layout would otherwise predict from the row before
LENGTHS = (45, 12, 38, 27, 50)
NO_SDPA = {"gemma2", "gpt_neo"}  # transformers 5.25 gives these eager attention only


def _rows(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[dict]:
    """Rows of token ids with response-only labels: a prompt of a third of the row, then the response (the
    third row all response)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        prompt = 0 if i == 2 else n // 3
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def _model(path, attn: str | None = None, lora: bool = False, four_bit: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"attn_implementation": attn} if attn else {}
    if four_bit:  # as `train qlora` loads it, computing in float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                            init_lora_weights=False)  # B != 0: every gradient non-zero
        model = get_peft_model(model, config)
    return model


def _packed_logits(model, rows: list[dict]) -> list[torch.Tensor]:
    """Each row's logits from one forward pass of the packed batch."""
    batch = PackCollator()(rows)
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits[0]
    return list(logits.split([len(r["input_ids"]) for r in rows]))


def _alone_logits(model, row: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]


CASES = [(f, a) for f in FAMILIES for a in ("sdpa", "eager") if not (a == "sdpa" and f in NO_SDPA)]


@pytest.mark.parametrize(("family", "attn"), CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_every_family_keeps_packed_rows_apart(family_model_dirs, family, attn):
    """Packed, each row's logits are its logits alone (within 1e-5), windows (32 positions, rows up to 50)
    included; the run's own check agrees."""
    model = _model(family_model_dirs(family), attn).eval()
    rows = _rows(model.get_input_embeddings().num_embeddings)
    assert max(LENGTHS) > WINDOW
    for packed, row in zip(_packed_logits(model, rows), rows, strict=True):
        assert (packed - _alone_logits(model, row)).abs().max() < 1e-5
    assert packing_refusal(model) is None


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_changing_one_row_leaves_the_other_rows_logits(request, fixture):
    model = _model(request.getfixturevalue(fixture)).eval()
    vocab = model.get_input_embeddings().num_embeddings
    rows = _rows(vocab)
    changed = list(rows)
    changed[1] = _rows(vocab, (20,), seed=7)[0]  # other tokens, and longer: the rows after it move
    before, after = _packed_logits(model, rows), _packed_logits(model, changed)
    assert (before[1][:12] - after[1][:12]).abs().max() > 1e-2  # the changed row did change
    for i in (0, 2, 3, 4):
        assert (before[i] - after[i]).abs().max() < 1e-5, i  # matmul noise of another shape only


def _loss_and_grads(model, trainer, batches: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimizer step's loss and gradients as the Trainer computes them under gradient accumulation:
    `num_items_in_batch` counted over all the step's batches, each batch's loss divided by it, summed."""
    model.zero_grad()
    n = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    total = 0.0
    for batch in batches:
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
        loss.backward()
        total += float(loss.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return total, grads


GRADIENT_CASES = [("tiny_model_dir", 16, False), ("tiny_qwen_dir", 16, False), ("tiny_model_dir", 0, False),
                  ("tiny_qwen_dir", 0, False), ("tiny_model_dir", 16, True)]


@pytest.mark.parametrize(("fixture", "loss_chunk", "four_bit"), GRADIENT_CASES,
                         ids=[f"{f}-chunk{c}{'-4bit' if q else ''}" for f, c, q in GRADIENT_CASES])
def test_packed_loss_and_every_lora_gradient_equal_the_padded_batch(request, tmp_path, fixture, loss_chunk,
                                                                      four_bit):
    """Gradient accumulation 2 (micro-batches of 3 and 2 rows of unequal length), --loss-chunk 16 (the
    response loss) and 0 (the model's own), LoRA and QLoRA: the step's loss and every LoRA gradient within
    1e-5."""
    from transformers import Trainer, TrainingArguments

    from gsmkit.training.loss import response_loss

    model = _model(request.getfixturevalue(fixture), lora=True, four_bit=four_bit)
    model.train()
    # the run's check passes, restores the mode, and leaves 4-bit weights as they were (bitsandbytes converts
    # them to an inference layout on a CPU forward in eval mode that needs no gradient: the losses would move)
    assert packing_refusal(model) is None and model.training
    loss = response_loss(model, loss_chunk)
    assert (loss is None) == (loss_chunk == 0)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             gradient_accumulation_steps=2, per_device_train_batch_size=3)
    trainer = Trainer(model=model, args=args, compute_loss_func=loss)
    rows = _rows(model.get_input_embeddings().num_embeddings)
    pad_id = model.config.pad_token_id
    padded = _loss_and_grads(model, trainer, [PadCollator(pad_id)(rows[:3]), PadCollator(pad_id)(rows[3:])])
    packed = _loss_and_grads(model, trainer, [PackCollator()(rows[:3]), PackCollator()(rows[3:])])
    assert abs(padded[0] - packed[0]) < 1e-5 and padded[0] > 0
    assert padded[1].keys() == packed[1].keys() and len(padded[1]) == 2 * 2 * 7  # A and B of 14 modules
    for name, grad in padded[1].items():
        assert grad.abs().max() > 0, name
        assert (grad - packed[1][name]).abs().max() < 1e-5, name
    if loss is not None:
        loss.remove()


def test_a_model_that_lets_rows_see_each_other_is_refused(tiny_model_dir):
    """A forward that drops the position ids (as a model adding absolute positions by slot would): the
    second row attends to the first, and the check says so."""

    class DropsPositions(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def get_input_embeddings(self):
            return self.lm.get_input_embeddings()

        def forward(self, position_ids=None, **kwargs):
            del position_ids  # dropped: every token at its slot's position, seeing every slot before it
            return self.lm(**kwargs)

    model = DropsPositions(_model(tiny_model_dir))
    assert packing_refusal(model) == ("a packed row's logits change with the row before it (its attention "
                                      "crosses the row boundary)")
    assert packing_refusal(model.lm) is None


def _settings(model, data, pool, out, **kw):
    from gsmkit.training.config import TrainSettings

    base = {"model": str(model), "out": out, "data": str(data), "pool": pool, "batch_size": 3,
            "grad_accum": 2, "max_length": 400, "max_steps": 2, "logging_steps": 1, "learning_rate": 5e-3,
            "warmup_ratio": 0.0, "lr_scheduler": "constant", "lora_r": 4, "lora_alpha": 8,
            "lora_dropout": 0.0, "group_by_length": False, "loss_chunk": 16}
    return TrainSettings(**{**base, **kw})


def test_train_sft_packed_equals_padded(tmp_path, tiny_model_dir, small_gsm8k, pool, monkeypatch):
    """Two optimizer steps (grad accumulation 2) of `train sft`, packed and padded, over the same rows: the
    same logged losses and adapter within 1e-5; the packed run's batches are one sequence each; the
    manifest's resolved.batches says which layout ran."""
    from safetensors.torch import load_file

    from gsmkit.training.sft import train

    shapes: list[tuple] = []
    real = PackCollator.__call__

    def spy(self, rows):
        batch = real(self, rows)
        shapes.append((len(rows), tuple(batch["input_ids"].shape)))
        return batch

    monkeypatch.setattr(PackCollator, "__call__", spy)
    runs = {}
    for packing in (True, False):
        out = tmp_path / str(packing)
        result = train(_settings(tiny_model_dir, small_gsm8k, pool, out, packing=packing))
        assert result.steps == 2
        log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        runs[packing] = {
            "losses": [r["loss"] for r in log if "loss" in r],
            "adapter": load_file(out / "adapter_model.safetensors"),
            "resolved": json.loads((out / "manifest.json").read_text())["resolved"],
            "tokens_per_s": result.tokens_per_s}
    # 2 steps x 2 batches of 3 rows (the data loader may build one ahead), each one sequence, of unequal rows
    assert len(shapes) >= 4 and all(n == 3 and shape[0] == 1 for n, shape in shapes)
    assert len({shape[1] for _, shape in shapes}) > 1
    packed, padded = runs[True], runs[False]
    assert packed["resolved"]["batches"] == {"layout": "packed", "grouped_by_length": False,
                                             "packing_refused": None}
    assert padded["resolved"]["batches"] == {"layout": "padded", "grouped_by_length": False,
                                             "packing_refused": None}
    assert len(packed["losses"]) == 2
    assert all(abs(a - b) < 1e-5 for a, b in zip(packed["losses"], padded["losses"], strict=True))
    assert packed["adapter"].keys() == padded["adapter"].keys()
    for name, weight in packed["adapter"].items():
        assert (weight - padded["adapter"][name]).abs().max() < 1e-5, name
    assert packed["tokens_per_s"] > 0


def test_refused_packing_pads_says_so_once_and_records_why(tmp_path, tiny_model_dir, small_gsm8k, pool,
                                                           monkeypatch, capsys):
    from gsmkit.training import packing
    from gsmkit.training.sft import train

    monkeypatch.setattr(packing, "probe", lambda _model: "a test's reason")
    out = tmp_path / "r"
    train(_settings(tiny_model_dir, small_gsm8k, pool, out, packing=True, group_by_length=True, max_steps=1))
    err = capsys.readouterr().err
    assert err.count("--packing is off for this model") == 1 and "a test's reason" in err
    batches = json.loads((out / "manifest.json").read_text())["resolved"]["batches"]
    assert batches == {"layout": "padded", "grouped_by_length": True, "packing_refused": "a test's reason"}


def test_packed_preview_shows_each_row_boundary(tiny_model_dir):
    from transformers import AutoTokenizer

    from gsmkit.tokenization import Encoded
    from gsmkit.training.masking import BOUNDARY, packed_preview

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [Encoded(r["input_ids"], r["labels"], where=f"train.jsonl:{i + 1}", truncated=False)
            for i, r in enumerate(_rows(len(tok), (6, 9, 4)))]
    console = Console(width=400, record=True, color_system=None)
    console.print(packed_preview(rows, tok, batch_size=2))
    text = console.export_text()
    assert "packed sequence 1: rows 1-2, 15 tokens" in text
    assert "packed sequence 2: rows 3-3, 4 tokens" in text
    assert f"{BOUNDARY} row 1 (train.jsonl:1): tokens 0-5, positions 0-5, 4 trained" in text
    assert f"{BOUNDARY} row 2 (train.jsonl:2): tokens 6-14, positions 0-8, 6 trained" in text
    # the third row is all response, but packed its first token is masked (the row before would predict it)
    assert f"{BOUNDARY} row 3 (train.jsonl:3): tokens 0-3, positions 0-3, 3 trained" in text
    assert text.count(BOUNDARY) == 3 + 2  # one per row, one per sequence header


def test_show_masking_with_packing_shows_the_packed_layout(tmp_path, tiny_model_dir, small_gsm8k, pool):
    from typer.testing import CliRunner

    from gsmkit.cli import app
    from gsmkit.training.masking import BOUNDARY

    res = CliRunner().invoke(app, ["train", "sft", "--model", str(tiny_model_dir), "--data", str(small_gsm8k),
                                   "--pool", str(pool), "--out", str(tmp_path / "none"), "--packing",
                                   "--batch-size", "2", "--show-masking", "3"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "packed sequence 1: rows 1-2" in res.output and "packed sequence 2: rows 3-3" in res.output
    assert res.output.count(f"{BOUNDARY} row ") == 3
    assert not (tmp_path / "none").exists()
