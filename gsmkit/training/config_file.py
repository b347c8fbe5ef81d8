"""The settings of a training run from their four sources: the fields' defaults, a preset, a `--config` YAML
file and the flags given on the command line, each overriding the one before (`train sft|qlora|grpo`).

In: a settings class with its `presets` (`TrainSettings`, `GrpoSettings`), the flags given, a YAML file, a
preset name. Out: one settings object (`layered_settings`), or an error naming where the bad value came from:
a fault of the file (not UTF-8 text, not YAML, not a mapping, an unknown key, a value of the wrong type or out
of bounds) is a `ConfigFileError` naming the file and the key (the CLI prints it as one line, exit 1); a
value the preset set is named with the preset; contradictory flags stay usage errors. The file's keys, and
the type each is converted to, are read from the fields: a field's name or any of its option names.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.fields import field_of, field_types, flag_of

NOT_IN_CONFIG = ("model", "out", "mode")  # the command line names these
KEYS_HINT = "keys are the long option names, e.g. learning_rate, lora_r, max_steps"


class ConfigFileError(ConfigError):
    """A `--config` file that cannot be used as it is: the message names the file (and the key)."""


def config_keys(cls: type) -> dict[str, str]:
    """Config-file key -> field name: each field's name and its option names (`lr`, `fewshot_pool`)."""
    keys: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name in NOT_IN_CONFIG:
            continue
        keys[f.name] = f.name
        if f.metadata:
            for flag in (flag_of(f).split("/")[0], *f.metadata.get("aliases", ()),
                         *f.metadata.get("hidden_aliases", ())):
                if flag.startswith("--"):
                    keys.setdefault(flag[2:].replace("-", "_"), f.name)
    return keys


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", Path: "a path (text)"}


def _coerce(name: str, value: Any, field: dataclasses.Field, field_type: Any, where: str | None) -> Any:
    """A value as the field's type: YAML 1.1 reads `2e-4` as a string, a list is a tuple here, and a field
    with its own option form (`--reward-weights a=1,b=0`) takes that form (or a mapping). From a file
    (`where`), a value of another type is a ConfigFileError naming the file and the key; the flags
    (`where` None) come typed from the command line and pass as they are."""
    optional = type(None) in typing.get_args(field_type)
    args = [a for a in typing.get_args(field_type) if a is not type(None)]
    base = args[0] if optional and len(args) == 1 else field_type
    if value is None:
        if optional or where is None:
            return None
        raise ConfigFileError(f"{where}: key '{name}' needs a value (it cannot be null)")
    parse = field.metadata.get("parse")
    if parse is not None and isinstance(value, str | dict):
        text = value if isinstance(value, str) else ",".join(f"{k}={v}" for k, v in value.items())
        try:
            return parse(text)
        except ConfigError as err:
            raise ConfigFileError(f"{where or 'flags'}: key '{name}': {err.message}", hint=err.hint) from None
    if parse is not None or where is None and not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    if typing.get_origin(base) is tuple:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list | tuple) and all(isinstance(v, str) for v in items):
            return tuple(items)
        raise ConfigFileError(f"{where}: key '{name}' must be a list of names, got {_kind(value)}")
    try:
        if base is float and isinstance(value, str | int) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, str):
            return int(value)
    except ValueError:
        raise ConfigFileError(f"{where or 'flags'}: key '{name}' must be a number, got {value!r}") from None
    if base is Path and isinstance(value, str):
        return Path(value)
    if where is None or base not in _KINDS or isinstance(value, base) and (base is bool
                                                                            or not isinstance(value, bool)):
        return value
    raise ConfigFileError(f"{where}: key '{name}' must be {_KINDS[base]}, got {_kind(value)}")


def _kind(value: Any) -> str:
    """A YAML value's kind, as the user wrote it."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


def read_config(config_file: Path, cls: type) -> dict[str, Any]:
    """The settings a `--config` YAML file sets, as field name -> value of the field's type; a
    ConfigFileError naming the file (and the key) for a file that is not UTF-8 YAML mapping option names to
    values of their type. `preset: NAME` is kept as the field `preset`."""
    import yaml

    try:
        text = Path(config_file).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigFileError(f"{config_file}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                              f"{err.start})", hint="a --config file is a YAML text file") from None
    except OSError as err:
        raise ConfigFileError(f"{config_file}: cannot read it ({err.strerror or err})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigFileError(f"{config_file}{line}: not valid YAML ({getattr(err, 'problem', None) or err})",
                              hint="a --config file is a YAML mapping of option names to values") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        got = _kind(loaded) if isinstance(loaded, list | tuple) else type(loaded).__name__
        raise ConfigFileError(f"{config_file}: expected a mapping of option names to values, got {got}",
                              hint="write one `key: value` per line, e.g. learning_rate: 1.0e-4")
    keys = config_keys(cls)
    types = field_types(cls)
    values: dict[str, Any] = {}
    for key, value in loaded.items():
        name = keys.get(str(key).replace("-", "_"))
        if name is None:
            raise ConfigFileError(f"{config_file}: unknown key '{key}'", hint=KEYS_HINT)
        values[name] = _coerce(str(key), value, field_of(cls, name), types[name], str(config_file))
    return values


def layered_settings(cls: type, flags: dict[str, Any], config_file: Path | None = None,
                     preset: str | None = None) -> Any:
    """A `cls` from: defaults < preset (`cls.presets`) < --config file < flags given on the command line (None
    means not given).

    A `preset:` key in the config file applies that preset under the file's other keys; --preset wins.
    An error caused by a value the preset or the file set says so (the user never typed those flags)."""
    types = field_types(cls)
    from_file = read_config(config_file, cls) if config_file is not None else {}
    preset = preset or from_file.pop("preset", None)
    from_file.pop("preset", None)
    presets: dict[str, dict[str, Any]] = cls.presets
    from_preset: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"unknown preset '{preset}'", hint=f"choose one of {', '.join(presets)}")
        from_preset = dict(presets[preset])
    given = {k: _coerce(k, v, field_of(cls, k), types[k], None) if k in types else v
             for k, v in flags.items() if v is not None}
    values = {**from_preset, **from_file, **given, "preset": preset}
    try:
        return cls(**values)
    except ConfigError as err:
        kept = {k: v for k, v in from_preset.items() if k not in from_file and k not in given}
        filed = {k: v for k, v in from_file.items() if k not in given}
        raise _blame(err, cls, preset, kept, config_file, filed) from None
    except TypeError as err:
        raise ConfigError(f"invalid settings: {err}") from None


def _named(err: ConfigError, cls: type, values: dict[str, Any]) -> list[str]:
    """The fields among `values` whose flag the error's message names."""
    return [name for name in values
            if re.search(re.escape(flag_of(field_of(cls, name))) + r"(?![\w-])", err.message)]


def _blame(err: ConfigError, cls: type, preset: str | None, kept: dict[str, Any], config_file: Path | None,
           filed: dict[str, Any]) -> ConfigError:
    """The error, saying which of the file's or the preset's values it is about."""
    in_file = _named(err, cls, filed)
    if in_file:
        return ConfigFileError(f"{config_file}: key '{in_file[0]}': {err.message}", hint=err.hint)
    in_preset = _named(err, cls, kept)
    if not in_preset:
        return err
    named = [f"{flag_of(field_of(cls, name))} {kept[name]}" for name in in_preset]
    return ConfigError(f"--preset {preset} sets {', '.join(named)}: {err.message}", hint=err.hint)
