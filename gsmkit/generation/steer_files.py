"""The vector folder `gsmkit steer vectors` writes and steered generation reads, and what it was made for.

In: a folder with `vectors.safetensors` (float32 tensors `layer.<L>`: [H] for CAA, [T, H] for DAC) and
`steer.json` (a `SteerMeta`); a model as `--model` names it. Out: `read_steer` / `read_steer_meta` (checked),
`write_steer`, `check_steer_for` (refuses vectors made for another model, shape or adapter), `parse_layers`,
and what a model's files say without loading its weights: `model_fingerprint` (config.json and
generation_config.json, each weight file's name, size, first and last MiB), `tokenizer_fingerprint`,
`model_shape`, `adapter_sha256`. A .gguf file is read as far as its metadata (a small parser of its
key/value section); a Hub id is looked up in the local Hugging Face cache, else fingerprinted by name.
"""

from __future__ import annotations

import hashlib
import json
import struct
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, DataError, ModelError
from gsmkit.fields import Record, field_types
from gsmkit.jsonl import write_json
from gsmkit.manifest import adapter_sha256, to_jsonable

VECTORS_FILE = "vectors.safetensors"
STEER_FILE = "steer.json"
FORMAT = "gsmkit-steer"
VERSION = 1
METHODS = ("caa", "dac")
HOOKS = {"caa": "residual", "dac": "o_proj_input"}
POSITIONS = {"caa": ("mean", "last"), "dac": ("step",)}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja")
_SAMPLE = 1 << 20  # bytes read from each end of a weight file


@dataclass
class SteerMeta(Record):
    """`steer.json` of a vector folder: what the vectors are, and the model, prompts and problems behind them.

    Attributes:
        format: `"gsmkit-steer"`
        version: 1
        method: `"caa"` (contrastive activation addition) or `"dac"` (dynamic activation composition)
        hook: where a vector is added: `"residual"` (CAA: the output of decoder layer L) or `"o_proj_input"`
            (DAC: the input of layer L's attention output projection: `self_attn.o_proj`, GPT-2's
            `attn.c_proj`, ...)
        layers: the 0-based decoder layers that have a vector (tensor `layer.<L>` in vectors.safetensors)
        num_layers: decoder layers of the model
        hidden_size: the model's hidden size
        vector_size: the length of each vector: `hidden_size` for CAA, attention heads x head size (the
            input of the attention output projection) for DAC
        steps: DAC: T, the generation steps with a vector (row t of `layer.<L>` is step t's); null for CAA
        position: CAA: `"mean"` (h averaged over the completion's tokens) or `"last"` (its last token);
            DAC: `"step"`
        norms: `"<L>"`: the vector's L2 norm (CAA), or one norm per step (DAC)
        model: `--model` as given
        model_fingerprint: sha256 over the model's config and the name, size, first and last MiB of each
            weight file
        adapter: `--adapter` as given, or null
        adapter_sha256: sha256 over the adapter's adapter_config.json and weights, or null
        tokenizer_fingerprint: sha256 over the tokenizer files (for a .gguf file: its `tokenizer.*` metadata)
        style: the prompt style (`auto` resolved)
        prompt_version: the prompt renderings' version (`PROMPT_VERSION`)
        k: few-shot exemplars in the prompts (DAC: in the k-shot prompt; its other prompt is zero-shot)
        ids: the problem ids the vectors were averaged over, in order
        pairs: how many contrast pairs (CAA) or problems (DAC) were averaged
        negatives: CAA's negatives: `"corrupted"`, `"sampled"` or `"file"` (from a `{prompt, positive,
            negative}` file); null for DAC
        data: where the problems came from: the GSM8K source, or the `--pairs-from` file
        split: the GSM8K split, or null for a pairs file
        cache: the activation cache: `hits`, `misses` (problems read from it / computed) and `dir` (null with
            `--no-cache`)
        details: method-specific counts (see the README's steering section)
        sha256: SHA-256 (hex) of each problem's whitespace-normalised question, in the order of `ids`
    """

    format: str
    version: int
    method: str
    hook: str
    layers: list[int]
    num_layers: int
    hidden_size: int
    vector_size: int
    steps: int | None
    position: str
    norms: dict[str, Any]
    model: str
    model_fingerprint: str
    adapter: str | None
    adapter_sha256: str | None
    tokenizer_fingerprint: str
    style: str
    prompt_version: int
    k: int
    ids: list[str]
    pairs: int
    negatives: str | None
    data: str
    split: str | None
    cache: dict[str, Any]
    details: dict[str, Any]
    sha256: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> SteerMeta:
        hint = "the folder was not written by `gsmkit steer vectors` (or was edited): make the vectors again"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}", hint=hint)
        if obj.get("format") != FORMAT:
            raise DataError(f"{where}: field 'format' is not '{FORMAT}'", hint=hint)
        if obj.get("version") != VERSION:
            raise DataError(f"{where}: field 'version' is {obj.get('version')!r}; this gsmkit reads "
                            f"{VERSION}", hint="make the vectors again with this gsmkit")
        types_ = field_types(cls)
        for f in fields(cls):
            if f.name not in obj:
                raise DataError(f"{where}: missing field '{f.name}'", hint=hint)
            if not _is_a(obj[f.name], types_[f.name]):
                raise DataError(f"{where}: field '{f.name}' has the wrong type "
                                f"({type(obj[f.name]).__name__})", hint=hint)
        m = cls(**{f.name: obj[f.name] for f in fields(cls)})
        known = m.method in METHODS
        wrong = [(not known, "method", f"is '{m.method}', not one of {', '.join(METHODS)}"),
                 (known and m.hook != HOOKS.get(m.method), "hook", f"'{m.hook}' does not fit {m.method}"),
                 (known and m.position not in POSITIONS[m.method], "position", f"'{m.position}' is wrong"),
                 (m.method == "dac" and (m.steps or 0) < 1, "steps", "must be >= 1 for dac vectors"),
                 (not m.layers or len(set(m.layers)) != len(m.layers), "layers", "is empty or repeats one"),
                 (any(not 0 <= x < m.num_layers for x in m.layers), "layers", "is out of 'num_layers'")]
        for bad, name, why in wrong:
            if bad:
                raise DataError(f"{where}: field '{name}' {why}", hint=hint)
        return m


def _is_a(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a field annotation (str, int, list[int], dict[...], X | None)."""
    if isinstance(annotation, types.UnionType):
        return any(_is_a(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation) or annotation
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(item is Any or _is_a(v, item) for v in value)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)


# -- what the files of a model say -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What a vector must fit: `num_layers` decoder layers, `hidden_size` (CAA vectors), `o_proj_in` (the
    input size of the attention output projection, attention heads x head size: DAC vectors)."""

    num_layers: int
    hidden_size: int
    o_proj_in: int

    def vector_size(self, method: str) -> int:
        return self.o_proj_in if method == "dac" else self.hidden_size


def _model_files(model: str) -> tuple[Path | None, Path | None]:
    """(the folder with config.json or the .gguf file, the .gguf file or None); (None, None) for a Hub id
    that is not in the local cache."""
    from gsmkit.modeling import locate_weights

    where, extra, source = locate_weights(model)
    if source != "hub":
        return Path(where), (Path(where) / extra["gguf_file"] if source == "gguf" else None)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id or an unreadable cache: treat as not cached
        found = None
    return (Path(found).parent, None) if isinstance(found, str) else (None, None)


def model_fingerprint(model: str) -> str:
    """sha256 over config.json, generation_config.json and, per weight file (sorted), its name, size, first
    and last MiB; never loads the weights. An uncached Hub id is fingerprinted by its name."""
    folder, gguf = _model_files(model)
    h = hashlib.sha256(b"gsmkit-model-v1\0")
    if folder is None:
        h.update(b"hub\0" + model.encode())
        return h.hexdigest()
    for name in ("config.json", "generation_config.json") if gguf is None else ():
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    weights = [gguf] if gguf is not None else sorted(
        p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    for path in weights:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as fh:
            h.update(fh.read(_SAMPLE))
            if size > 2 * _SAMPLE:
                fh.seek(size - _SAMPLE)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def tokenizer_fingerprint(model: str) -> str:
    """sha256 over the tokenizer files present (a .gguf file: its `tokenizer.*` metadata); never loads it."""
    folder, gguf = _model_files(model)
    h = hashlib.sha256(b"gsmkit-tokenizer-v1\0")
    if folder is None:
        h.update(b"hub\0" + model.encode())
    elif gguf is not None:
        h.update(_gguf_metadata(gguf)[1])
    else:
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                h.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return h.hexdigest()


def model_shape(model: str) -> ModelShape:
    """Decoder layers, hidden size and o_proj input size from config.json (its text config when nested) or
    a .gguf file's metadata, without loading weights."""
    folder, gguf = _model_files(model)
    if folder is None:
        raise ModelError(f"{model}: not in the local Hugging Face cache, so its shape cannot be read before "
                         "loading", hint="download it once, or pass a local model folder or .gguf file")
    if gguf is not None:
        kv = _gguf_metadata(gguf)[0]
        arch = kv.get("general.architecture")
        try:
            layers, hidden = int(kv[f"{arch}.block_count"]), int(kv[f"{arch}.embedding_length"])
            heads = int(kv[f"{arch}.attention.head_count"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{gguf}: its metadata has no {arch}.block_count, embedding_length or "
                             "attention.head_count", hint="pass a model folder instead") from None
        head_dim = int(kv.get(f"{arch}.attention.key_length") or hidden // heads)
        return ModelShape(layers, hidden, heads * head_dim)
    from gsmkit.families import read_family
    from gsmkit.modeling import read_folder_json

    config = read_folder_json(folder, "config.json", "model folder",
                              hint="pass a folder written by save_pretrained",
                              broken_hint="repair config.json")
    try:
        family = read_family(config)
    except ModelError as err:
        raise ModelError(f"{folder / 'config.json'}: {err.message}", hint=err.hint) from None
    return ModelShape(family.num_layers, family.hidden_size, family.num_heads * family.head_dim)


# GGUF value types: fixed sizes (struct format), 8 = string, 9 = array
_GGUF_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
               12: "<d"}


def _gguf_metadata(path: Path) -> tuple[dict[str, Any], bytes]:
    """(scalar metadata values, sha256 of the raw `tokenizer.*` entries) of a GGUF file (v2, v3).

    Not `gguf.GGUFReader`: opening SmolLM2's file with it takes about 4 s on this CPU (it reads every
    tensor's info), more than a whole cached `steer vectors` run; this reads the key/value section only."""
    import mmap

    def value(data: Any, kind: int, at: int) -> tuple[Any, int]:  # (value or None for an array, end)
        if kind in _GGUF_FIXED:
            return struct.unpack_from(_GGUF_FIXED[kind], data, at)[0], at + struct.calcsize(_GGUF_FIXED[kind])
        if kind == 8:
            (n,) = struct.unpack_from("<Q", data, at)
            return bytes(data[at + 8:at + 8 + n]).decode("utf-8", "replace"), at + 8 + n
        if kind != 9:
            raise ModelError(f"{path}: unknown GGUF metadata type {kind}", hint="pass a model folder instead")
        item, n = struct.unpack_from("<IQ", data, at)
        at += 12
        if item in _GGUF_FIXED:
            return None, at + n * struct.calcsize(_GGUF_FIXED[item])
        for _ in range(n):
            at = value(data, item, at)[1]
        return None, at

    scalars: dict[str, Any] = {}
    tokenizer = hashlib.sha256()
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF" or len(data) < 24 or struct.unpack_from("<I", data, 4)[0] < 2:
            raise ModelError(f"{path}: not a GGUF file (v2 or later)", hint="pass a model folder instead")
        pos = 24
        try:
            for _ in range(struct.unpack_from("<Q", data, 16)[0]):
                start = pos
                key, pos = value(data, 8, pos)
                scalars[key], pos = value(data, struct.unpack_from("<I", data, pos)[0], pos + 4)
                if key.startswith("tokenizer."):
                    tokenizer.update(data[start:pos])
        except struct.error:
            raise ModelError(f"{path}: its GGUF metadata is truncated",
                             hint="download the file again") from None
    return scalars, tokenizer.digest()


# -- layers ----------------------------------------------------------------------------------------------


def parse_layers(spec: str | None, available: Sequence[int], flag: str = "--layers") -> tuple[int, ...]:
    """`all` (or None): every available layer; `3`, `3,5`, `2-4`, `2-4,7`: those, sorted and unique. A
    layer that is not available is a ConfigError naming the flag, the layer and what is available."""
    have = sorted(set(available))
    shown = _ranges(have)
    if spec is None or spec.strip().lower() == "all":
        return tuple(have)
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if dash else (int(part), int(part))
        except ValueError:
            raise ConfigError(f"{flag} '{spec}': '{part}' is not a layer (L) or a range (L-L)",
                              hint=f"for example {flag} all, {flag} 3, {flag} 2-4,7 (layers: {shown})"
                              ) from None
        if first < 0 or last < first:
            raise ConfigError(f"{flag} '{spec}': '{part}' is not a range from low to high",
                              hint=f"layers: {shown}")
        chosen.update(range(first, last + 1))
    missing = sorted(chosen - set(have))
    if missing:
        raise ConfigError(f"{flag} {spec}: layer {missing[0]} is out of range",
                          hint=f"layers available: {shown}")
    return tuple(sorted(chosen))


def _ranges(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and runs[-1][1] == layer - 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


# -- the folder -------------------------------------------------------------------------------------------


def read_steer_meta(folder: str | Path) -> SteerMeta:
    """The `steer.json` of a vector folder, checked (no tensor read, no torch)."""
    folder, again = Path(folder).expanduser(), "make the vectors again"
    path = folder / STEER_FILE
    if not path.is_file():
        raise DataError(f"{folder}: not a vector folder (no {STEER_FILE})" if folder.is_dir() else
                        f"{folder}: no such vector folder", hint="pass a `gsmkit steer vectors` folder")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})", hint=again) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read it ({type(err).__name__})", hint=again) from None
    return SteerMeta.from_dict(obj, str(path))


def read_steer(folder: str | Path) -> tuple[SteerMeta, dict[int, Any]]:
    """The meta and the vectors of a folder: {layer: float32 tensor [S, H]} (S = 1 for CAA, T for DAC),
    checked against steer.json (layers, shapes). DataError naming the file and field otherwise."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_steer_meta(folder)
    path = Path(folder).expanduser() / VECTORS_FILE
    hint = "make the vectors again with `gsmkit steer vectors`"
    if not path.is_file():
        raise DataError(f"{Path(folder)}: not a vector folder (no {VECTORS_FILE})", hint=hint)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable safetensors file ({str(err)[:120]})", hint=hint) from None
    expected = {f"layer.{layer}" for layer in meta.layers}
    if set(tensors) != expected:
        extra = sorted(set(tensors) - expected) or sorted(expected - set(tensors))
        raise DataError(f"{path}: tensor '{extra[0]}' does not match field 'layers' of {STEER_FILE} "
                        f"({_ranges(sorted(meta.layers))})", hint=hint)
    shape = [meta.vector_size] if meta.method == "caa" else [meta.steps, meta.vector_size]
    vectors = {}
    for layer in meta.layers:
        t = tensors[f"layer.{layer}"]
        if list(t.shape) != shape or not t.dtype.is_floating_point:
            raise DataError(f"{path}: tensor 'layer.{layer}' has shape {list(t.shape)}, {STEER_FILE} says "
                            f"{shape}", hint=hint)
        vectors[layer] = t.to(torch.float32).reshape(-1, meta.vector_size)
    return meta, vectors


def write_steer(folder: Path, meta: SteerMeta, vectors: dict[int, Any]) -> None:
    """Write `vectors.safetensors` ({layer: float32 numpy array}) and `steer.json` into `folder`."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({f"layer.{layer}": np.ascontiguousarray(v, dtype=np.float32) for layer, v in vectors.items()},
              str(folder / VECTORS_FILE))  # no metadata: its order in the header varies, the bytes must not
    write_json(folder / STEER_FILE, to_jsonable(meta.to_dict()))


def check_steer_for(meta: SteerMeta, folder: str | Path, spec: Any) -> None:
    """ConfigError (with a hint) when the vectors in `folder` were made for another model than `spec`
    (a `ModelSpec`) names: another layer count or size, other model files, another adapter. Never loads
    weights."""
    hint = f"make vectors for this model: gsmkit steer vectors --model {spec.model} ..."
    shape = model_shape(spec.model)
    if (meta.num_layers, meta.hidden_size) != (shape.num_layers, shape.hidden_size):
        raise ConfigError(f"{folder}: the vectors were made for {meta.model} ({meta.num_layers} layers, "
                          f"hidden size {meta.hidden_size}); --model {spec.model} has {shape.num_layers} "
                          f"layers, hidden size {shape.hidden_size}", hint=hint)
    if meta.vector_size != shape.vector_size(meta.method):
        raise ConfigError(f"{folder}: the {meta.method} vectors have size {meta.vector_size}; --model "
                          f"{spec.model} needs {shape.vector_size(meta.method)} at the {meta.hook} hook",
                          hint=hint)
    if model_fingerprint(spec.model) != meta.model_fingerprint:
        raise ConfigError(f"{folder}: the vectors were made for model {meta.model}, not --model {spec.model} "
                          "(the model files differ)", hint=hint)
    adapter = getattr(spec, "adapter", None)
    digest = adapter_sha256(adapter)
    if digest != meta.adapter_sha256:
        made = f"with adapter {meta.adapter}" if meta.adapter_sha256 else "without an adapter"
        differ = " (the files differ)" if meta.adapter_sha256 else ""
        used = f"not with --adapter {adapter}{differ}" if digest else "and --adapter is not given"
        raise ConfigError(f"{folder}: the vectors were made {made}, {used}",
                          hint="pass the adapter the vectors were made with, or make vectors with this one")
