"""The only place that calls `from_pretrained`: models, tokenizers and adapters.

In: a `ModelSpec` (Hub id, local folder or .gguf file; dtype; 4-bit; PEFT adapter folder; device).
Out: a `LoadedModel` (model in eval mode, tokenizer with a pad token, resolved device and dtype).

An unavailable feature (4-bit without bitsandbytes, CPU bf16 unsupported, CUDA with no GPU) is an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, ModelError
from gsmkit.fields import check_fields, setting
from gsmkit.manifest import ADAPTER_FILES

DTYPES = ("auto", "float32", "bfloat16", "float16")
# PEFT saves a LoRA module's weights under the PeftModel's attribute path: base_model (the LoraModel),
# .model (the transformers model), then the module path that `rank_pattern` keys are matched against.
PEFT_PREFIX = "base_model.model."
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class ModelSpec:
    """The model a command loads: the option group shared by every command that takes --model."""

    model: str = setting(help="Hugging Face model id, local model folder, or .gguf file.", short="-m",
                         show_default=False)
    adapter: str | None = setting(None, "PEFT adapter folder (adapter_config.json + weights) applied on top "
                                  "of --model.", cli_type=Path | None, parse=str, show_default=False,
                                  path={"exists": True, "file_okay": False, "dir_okay": True})
    dtype: str = setting("auto", "Weights dtype: auto | float32 | bfloat16 | float16.", choices=DTYPES)
    load_in_4bit: bool = setting(False, "Load the base model in 4-bit nf4 with double quantization "
                                 "(bitsandbytes).")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps.")
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ConfigError(f"unknown --device '{self.device}'", hint=f"choose one of {', '.join(DEVICES)}")

    def resolved(self) -> ModelSpec:
        """The spec as a run loads it (a new object; idempotent): a damaged adapter fails here, first."""
        if self.adapter is not None:
            check_adapter(self.adapter)
        return dataclasses.replace(self)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    spec: ModelSpec
    device: Any
    dtype: Any
    source: str  # "hub", "local" or "gguf"


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is visible", hint="use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for, but MPS is not available", hint="use --device cpu")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_arm_sve_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_dtype(dtype: str, device) -> Any:
    """`auto` is bfloat16 on a GPU that supports it, float16 on other GPUs, float32 elsewhere."""
    import torch

    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    resolved = getattr(torch, dtype)
    if resolved is torch.bfloat16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("this GPU does not support bfloat16",
                              hint="use --dtype float16 or --dtype float32")
        if device.type == "cpu" and not cpu_supports_bf16():
            raise ConfigError(
                "this CPU has no native bfloat16 support (no AVX512-BF16 or AMX)",
                hint="use --dtype float32 (or auto)",
            )
    if resolved is torch.float16 and device.type == "cpu":
        raise ConfigError("float16 on the CPU is not supported for generation here",
                          hint="use --dtype float32")
    return resolved


def locate_weights(model: str) -> tuple[str, dict[str, Any], str]:
    """(path or id for from_pretrained, extra kwargs, source kind) for a Hub id, folder or .gguf file."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{path}: a model file must be .gguf", hint="otherwise pass the model's folder")
        return str(path.parent), {"gguf_file": path.name}, "gguf"
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path), {}, "local"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0].name}, "gguf"
        if len(ggufs) > 1:
            raise ModelError(f"{path}: several .gguf files",
                             hint="pass the one you want: --model path/to/file.gguf")
        raise ModelError(f"{path}: not a model folder (no config.json, no .gguf file)",
                         hint="pass a folder written by save_pretrained, a .gguf file or a Hub id")
    if model.startswith((".", "/", "~")) or model.endswith(".gguf"):
        raise ModelError(f"{model}: no such file or folder")
    return model, {}, "hub"


def load_tokenizer(model: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    where, extra, _ = locate_weights(model)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one line for the user
        raise ModelError(f"{model}: cannot load the tokenizer ({type(err).__name__}: {str(err)[:200]})",
                         hint="without network access, pass a local folder or .gguf file") from None
    if tok.pad_token_id is None:
        # Batches are padded; the pad id never reaches the loss or the attention (masked), so EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


_RESAVE = "the adapter is damaged or incomplete: save it again (save_pretrained) or download it again"


def read_folder_json(folder: str | Path, name: str, what: str, hint: str,
                     broken_hint: str = _RESAVE) -> dict[str, Any]:
    """The JSON object in `folder/name`, `folder` being a `what` ("PEFT adapter folder", "model folder");
    a ModelError naming what is wrong, with `hint` (a missing file) or `broken_hint` (an unreadable one),
    before anything loads."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise ModelError(f"{path}: {what} not found", hint=hint)
    if not path.is_dir():
        raise ModelError(f"{path}: a {what} must be a folder", hint=hint)
    file = path / name
    if not file.exists():
        raise ModelError(f"{path}: not a {what} (no {name})", hint=hint)
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(f"{file}:{err.lineno}: not valid JSON ({err.msg})", hint=broken_hint) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{file}: cannot read it ({type(err).__name__}: {err})", hint=broken_hint) from None
    if not isinstance(obj, dict):
        raise ModelError(f"{file}: expected a JSON object, found {type(obj).__name__}", hint=broken_hint)
    return obj


def read_adapter_config(adapter: str | Path) -> dict[str, Any]:
    path = Path(adapter).expanduser()
    cfg = read_folder_json(path, "adapter_config.json", "PEFT adapter folder",
                           hint="pass the output folder of `gsmkit train` or a PEFT save_pretrained folder")
    if not any((path / n).exists() for n in ADAPTER_WEIGHTS):
        raise ModelError(f"{path}: adapter_config.json has no weights beside it (adapter_model.safetensors)")
    return cfg


def check_adapter(adapter: str | Path) -> dict[str, Any]:
    """The config of the adapter folder, once it is whole; otherwise a ModelError that names the file.

    Whole: adapter_config.json is a JSON object, a weights file is beside it, and adapter_model.safetensors
    has a header that reads and describes exactly the bytes that follow it. Reads the config and that
    header, no tensor and no model, so commands call it while they build their settings.
    """
    cfg = read_adapter_config(adapter)
    path = Path(adapter).expanduser()
    for name in ADAPTER_WEIGHTS:
        weights = path / name
        if weights.exists():
            if not weights.is_file() or weights.stat().st_size == 0:
                raise ModelError(f"{weights}: empty or not a file", hint=_RESAVE)
            if name.endswith(".safetensors"):
                _check_safetensors(weights)
            break
    return cfg


ADAPTER_WEIGHTS = ADAPTER_FILES[1:]  # the weights files PEFT writes: safetensors, else the older .bin
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors reader refuses larger headers


def _check_safetensors(weights: Path) -> None:
    """A safetensors file: an 8-byte little-endian header length, a JSON header, then the tensors' bytes."""
    size = weights.stat().st_size
    with weights.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ModelError(f"{weights}: damaged: {size} bytes, too short for a safetensors file",
                             hint=_RESAVE)
        claimed = int.from_bytes(prefix, "little")
        if claimed > min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise ModelError(f"{weights}: damaged: its safetensors header claims {claimed} bytes, but the "
                             f"file has {size} in all", hint=_RESAVE)
        raw = fh.read(claimed)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    entries = [v for k, v in header.items() if k != "__metadata__"] if isinstance(header, dict) else None
    if entries is None or not all(isinstance(e, dict) and isinstance(e.get("data_offsets"), list)
                                  and len(e["data_offsets"]) == 2 for e in entries):
        raise ModelError(f"{weights}: damaged: its safetensors header is not a JSON table of tensors",
                         hint=_RESAVE)
    needed = max((int(e["data_offsets"][1]) for e in entries), default=0)
    if needed != size - 8 - claimed:
        raise ModelError(f"{weights}: damaged: its header describes {needed} bytes of tensors, but "
                         f"{size - 8 - claimed} follow it (a truncated copy?)", hint=_RESAVE)


def _adapter_manifest(adapter: str | Path) -> dict:
    try:
        recorded = json.loads((Path(adapter) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def adapter_trained_in_4bit(adapter: str | Path) -> bool:
    """Whether gsmkit's manifest beside the adapter says `train qlora` made it (False when there is none)."""
    return _adapter_manifest(adapter).get("command") == "train qlora"


def adapter_nf4_correction(adapter: str | Path) -> str | None:
    """The `--init-lora` method (loftq, cloq) that started the adapter at a correction of the nf4 error, if
    any (from the run's settings, which a resumed run keeps too)."""
    settings = _adapter_manifest(adapter).get("settings")
    method = settings.get("init_lora") if isinstance(settings, dict) else None
    return method if isinstance(method, str) and method != "default" else None


def attach_adapter(model: Any, adapter: str, base_name: str, is_trainable: bool = False, **peft: Any):
    """`model` with the adapter on top (`peft`: more PeftModel.from_pretrained arguments); or ModelError."""
    from peft import PeftModel

    cfg = read_adapter_config(adapter)
    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=is_trainable, **peft)
    except (RuntimeError, ValueError, KeyError) as err:
        recorded = cfg.get("base_model_name_or_path") or "unknown"
        first = str(err).strip().splitlines()
        detail = next((ln.strip() for ln in first if "size mismatch" in ln), first[0] if first else "")
        raise ModelError(
            f"{adapter}: adapter does not fit base model '{base_name}' (it was trained on '{recorded}'): "
            f"{detail[:200]}",
            hint="pass the --model the adapter was trained from",
        ) from None


def load_model(spec: ModelSpec, for_training: bool = False, task: str = "causal-lm") -> LoadedModel:
    """Load model (+ adapter) and tokenizer as `spec` says; raise ModelError/ConfigError otherwise.

    `task` is "causal-lm" (AutoModelForCausalLM) or "sequence-classification"
    (AutoModelForSequenceClassification, for safeguard classifiers).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in ("causal-lm", "sequence-classification"):
        raise ValueError(f"unknown task {task!r}")
    auto_class = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification

    if spec.adapter is not None:
        read_adapter_config(spec.adapter)  # fail before the (slow) base model loads
        if not spec.load_in_4bit and adapter_trained_in_4bit(spec.adapter):
            from gsmkit.progress import stderr_console

            method = adapter_nf4_correction(spec.adapter)
            why = (f"it holds a correction of the nf4 rounding (--init-lora {method}), which full-precision "
                   "weights do not have, so there it overcorrects" if method
                   else "on full-precision weights it scores differently")
            stderr_console().print(
                f"[yellow]warning:[/yellow] {spec.adapter} was trained on a 4-bit (nf4) base by "
                f"`train qlora`; {why}. Add --load-in-4bit to use the base it was trained with.",
                highlight=False, soft_wrap=True)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    where, extra, source = locate_weights(spec.model)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code, **extra}
    if spec.load_in_4bit:
        if source == "gguf":
            raise ConfigError("--load-in-4bit cannot requantize a .gguf model",
                              hint="save it once with save_pretrained, or load it without --load-in-4bit")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as err:
            raise ConfigError(f"--load-in-4bit needs bitsandbytes ({err})",
                              hint="pip install bitsandbytes") from None
        compute = dtype if dtype != torch.float32 or device.type == "cpu" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": device}
    if source == "gguf":
        try:
            from transformers import GgufConfig
        except ImportError:  # transformers < 5 dequantizes GGUF weights to plain tensors anyway
            pass
        else:
            # Dequantize to ordinary dense weights: the model then trains, merges and saves like any other.
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    from gsmkit.progress import status_step

    name = (spec.model if source == "hub" else extra.get("gguf_file") or Path(where).name) + (
        f" + adapter {Path(spec.adapter).name}" if spec.adapter is not None else "")
    precision = "4-bit nf4" if spec.load_in_4bit else str(dtype).removeprefix("torch.")
    with status_step(f"loading model {name}", done=f"loaded model {name} ({device}, {precision})"):
        tokenizer = load_tokenizer(spec.model, spec.trust_remote_code)
        try:
            model = auto_class.from_pretrained(where, **kwargs)
        except Exception as err:  # noqa: BLE001 - any loader failure becomes one line for the user
            raise ModelError(f"{spec.model}: cannot load the model ({type(err).__name__}: {str(err)[:300]})",
                             hint="without network access, pass a local folder or .gguf file") from None
        if not spec.load_in_4bit:
            model.to(device)
        if spec.load_in_4bit and not any("4bit" in type(m).__name__ for m in model.modules()):
            raise ConfigError("4-bit loading was asked for but no layer was quantized",
                              hint="check that bitsandbytes supports this device")
        if spec.load_in_4bit:
            keep_4bit_compute_dtype(model)
        if spec.adapter is not None:
            model = attach_adapter(model, spec.adapter, spec.model, is_trainable=for_training)
    if not for_training:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, device=device, dtype=dtype, source=source)


def eos_token_ids(tokenizer: Any, model: Any | None = None) -> set[int]:
    """Token ids that end a generation: EOS, the generation config's EOS list, chat end-of-turn tokens."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    vocab = tokenizer.get_vocab()
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>"):
        if name in vocab:
            ids.add(int(vocab[name]))
    return ids


def keep_4bit_compute_dtype(model: Any) -> int:
    """Keep every bitsandbytes 4-bit layer of `model` computing in its own compute dtype on the CPU; return
    how many layers had already been repacked and were restored. bitsandbytes >= 0.49, on CPUs with
    AVX512-BF16, repacks a `Linear4bit` weight on its first inference forward pass for a bfloat16 kernel:
    activations and block scales are then rounded to bfloat16 whatever `bnb_4bit_compute_dtype` says, and the
    weight is kept in a layout `dequantize_4bit` misreads. Training never repacks, so evaluation would score a
    QLoRA adapter with other numerics than it was trained with, and a merge or an adapter initialisation after
    an inference pass would read wrong weights. bfloat16 layers keep the fast kernel (same numerics)."""
    import torch

    restored = 0
    for module in model.modules():
        if (not hasattr(module, "support_avx512bf16_for_cpu")
                or getattr(module, "compute_dtype", None) == torch.bfloat16):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
            restored += 1
    return restored


def dequantize_4bit_model(model: Any) -> Any:
    """Replace every bitsandbytes 4-bit linear layer by a float32 `nn.Linear` holding its dequantized
    weight: the exact weights a QLoRA adapter was trained against, in a form an adapter can merge into."""
    import bitsandbytes.functional as bnbf
    import torch
    from torch import nn

    keep_4bit_compute_dtype(model)  # the canonical layout that dequantize_4bit reads
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Linear4bit":
            continue
        weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(torch.float32)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=weight.device, dtype=torch.float32)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if module.bias is not None:
                dense.bias.copy_(module.bias.to(torch.float32))
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, dense)
        replaced += 1
    if replaced == 0:
        raise ModelError("no 4-bit layer to dequantize", hint="load the base with load_in_4bit=True first")
    for attr in ("is_loaded_in_4bit", "is_quantized", "quantization_method"):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, False)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
    return model


def free_memory() -> None:
    """Return a released model's memory before the next one loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
