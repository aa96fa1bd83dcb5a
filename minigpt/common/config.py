"""Typed configuration: dataclasses with defaults, a TOML/YAML/JSON file, and command-line overrides.

Every stage owns one dataclass (`ModelConfig` in model/gpt.py, `TrainConfig` in train/train.py, ...). This module
turns any of them into argparse flags and back, so a value is resolved in one order everywhere:

    dataclass default  <  the file given with --config  <  a flag on the command line

Nested dataclasses become dotted flags and TOML tables: `--model.n-layer 6` is `[model] n_layer = 6`.
Fields carry their help text in `metadata["help"]` (see `opt`). Unknown keys are refused, never ignored.

`--config` takes a file path or the name of a recipe shipped with the package (`minigpt/recipes/NAME.toml`, e.g.
`minigpt train --config gpt2-124m`); `list_recipes()` names them with the first line of each file's comment.
A run's own config.json is a settings file too (`minigpt train --config runs/x/config.json` repeats run x): its
`stage` must be the command's, and its `resolved` block, what the settings became on that machine, is left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from minigpt.common import UserError

T = TypeVar("T")
RECIPES_DIR = Path(__file__).parents[1] / "recipes"


def opt(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with a default and a help string (lists and dicts are copied per instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


# ----------------------------------------------------------------------------------------------------------------
# dataclass <-> dict


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:  # noqa: C901 (docs/code.md)
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where} may not be empty")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise UserError(f"{where} must be one of {choices}, not {value!r}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, not {value!r}")
        return [_coerce(v, item_tp, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where} must be true or false, not {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"{where} must be an integer, not {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{where} must be an integer, not {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where} must be a number, not {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be a number, not {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise UserError(f"{where} must be a string, not {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):  # a table given as a plain value, e.g. `model = "tiny"`
        hint = f' (e.g. {where}.preset = "{value}")' if "preset" in {f.name for f in dataclasses.fields(tp)} else ""
        raise UserError(f"{where} must be a table of settings{hint}, not {value!r}")
    if tp is dict or typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table, not {value!r}")
        return dict(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build `cls` from a (possibly partial, possibly nested) dict; missing keys keep their defaults.

    A class may define `expand_dict(data) -> data` to rewrite its explicit values first (ModelConfig uses it to
    start from a preset).
    """
    if not isinstance(data, dict):
        raise UserError(f"{where or cls.__name__} must be a table of settings, not {data!r}")
    if hasattr(cls, "expand_dict"):
        data = cls.expand_dict(dict(data))
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        known = ", ".join(sorted(names))
        raise UserError(f"unknown setting {prefix}{unknown[0]} (known: {known})")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        inner, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            kwargs[name] = from_dict(inner, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"invalid {where or cls.__name__} settings: {exc}") from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def recipe_path(name: str) -> Path | None:
    """The shipped recipe called `name` (a file name without .toml), or None."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = RECIPES_DIR / f"{name}.toml"
    return path if path.is_file() else None


def list_recipes(stage: str | None = None) -> list[tuple[str, str, str]]:
    """(name, stage, first comment line) of every shipped recipe, for `--list-configs`.

    A recipe's first line is `# STAGE: one line of description`; `stage` keeps only that stage's recipes.
    """
    out = []
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        recipe_stage, _, text = first.lstrip("# ").partition(":")
        if stage is None or recipe_stage.strip() == stage:
            out.append((path.stem, recipe_stage.strip(), text.strip()))
    return out


def recipe_expectation(name: str | None) -> str | None:
    """The `# Expected: ...` paragraph of a shipped recipe's header (continued on lines starting `#   `), as one
    line: what a run should reach and where the numbers come from, for --dry-run. None for other files."""
    path = recipe_path(name or "")
    if path is None:
        return None
    found: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("# Expected:"):
            found.append(line.removeprefix("# Expected:").strip())
        elif found and line.startswith("#   "):
            found.append(line.strip("# ").strip())
        elif found:
            break
    return " ".join(found) or None


def format_recipes(stage: str) -> str:
    """`--list-configs`: the shipped recipes of a stage, one per line, name and what it is."""
    rows = list_recipes(stage)
    width = max((len(name) for name, _, _ in rows), default=0)
    return "".join(f"{name:<{width}}  {text}\n" for name, _, text in rows)


def load_file(path: str | Path, stage: str | None = None) -> dict[str, Any]:
    """Read settings from a .toml, .yaml/.yml or .json file, or a shipped recipe named without its suffix (one made
    for `stage`, when given: the names offered are that stage's, as its --list-configs shows them)."""
    path = Path(path)
    if not path.is_file():
        recipe = recipe_path(str(path))
        recipes = {name: made_for for name, made_for, _ in list_recipes()}
        if recipe is None:
            names = ", ".join(name for name, made_for in recipes.items() if stage in (None, made_for)) or "none"
            raise UserError(f"config file {path} does not exist (and is not a shipped {stage + ' ' if stage else ''}"
                            f"recipe: {names})")
        if stage is not None and recipes.get(recipe.stem) != stage:
            raise UserError(f"{recipe.stem} is a recipe for minigpt {recipes.get(recipe.stem)}, not {stage}: run "
                            f"minigpt {recipes.get(recipe.stem)} --config {recipe.stem}")
        path = recipe
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except UserError:
        raise
    except Exception as exc:  # parse errors of three libraries, all the user's to fix
        raise UserError(f"cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a table of settings")
    return data


def run_settings(data: dict[str, Any], path: str | Path, stage: str | None) -> dict[str, Any]:
    """The settings in a file; from a run's config.json (it names its "stage"), those without "stage" and "resolved".

    The resolved block (precision, sequence length, accumulation, world size, the model's full shape) is what the
    settings became on the machine that ran them: it is derived again here, so it is ignored, not checked (on
    another machine `precision auto` may rightly resolve to something else)."""
    if "stage" not in data:
        return data
    made_by = data["stage"]
    if made_by != stage:
        again = f": repeat it with minigpt {made_by} --config {path}" if made_by in ("train", "sft") else ""
        taker = f"minigpt {stage}" if stage else "this command"
        raise UserError(f"{path} holds the settings of a minigpt {made_by} run, which {taker} does not take{again}")
    return {key: value for key, value in data.items() if key not in ("stage", "resolved")}


def resolve(cls: type[T], file: str | Path | None = None, overrides: dict[str, Any] | None = None,
            stage: str | None = None) -> T:
    """Defaults < file < overrides, then validated by the dataclass itself. `stage`: the command a run's saved
    config.json must come from to be accepted."""
    data = run_settings(load_file(file, stage), file, stage) if file else {}
    return from_dict(cls, deep_merge(data, overrides or {}))


# ----------------------------------------------------------------------------------------------------------------
# dataclass <-> argparse


def _flag(prefix: str, name: str) -> str:
    return "--" + (f"{prefix}." if prefix else "") + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                  skip: typing.Collection[str] = ()) -> None:
    """One flag per field (dotted for nested dataclasses); unset flags stay absent from the namespace."""
    hints = _field_types(cls)
    group = parser.add_argument_group(f"{prefix} settings" if prefix else f"{cls.__name__} settings")
    for field in dataclasses.fields(cls):
        if not field.init or field.name in skip:
            continue
        tp, _ = _unwrap_optional(hints[field.name])
        if dataclasses.is_dataclass(tp):
            add_arguments(parser, tp, prefix=f"{prefix}.{field.name}" if prefix else field.name)
            continue
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        if help_text and default not in (None, "", []):
            help_text += f" (default: {default})"
        dest = (f"{prefix}." if prefix else "") + field.name
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif origin in (list, tuple):
            kwargs["nargs"] = "*"
        elif tp in (int, float):
            kwargs["type"] = tp
            kwargs["metavar"] = tp.__name__.upper()
        group.add_argument(_flag(prefix, field.name), **kwargs)


def overrides_from_args(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The values given on the command line for `cls`'s fields, as a nested dict (absent flags omitted)."""
    out: dict[str, Any] = {}
    hints = _field_types(cls)
    for field in dataclasses.fields(cls):
        dest = (f"{prefix}." if prefix else "") + field.name
        tp, _ = _unwrap_optional(hints[field.name])
        if dataclasses.is_dataclass(tp):
            nested = overrides_from_args(args, tp, dest)
            if nested:
                out[field.name] = nested
        elif hasattr(args, dest):
            out[field.name] = getattr(args, dest)
    return out


def config_from_args(cls: type[T], args: argparse.Namespace, stage: str | None = None) -> T:
    """Resolve `cls` from `--config FILE` (if the parser has it) and the flags given; `stage` as in `resolve`."""
    return resolve(cls, getattr(args, "config", None), overrides_from_args(args, cls), stage)
