"""Command-line flags generated from documented config dataclasses, so every default lives once.

A config is a dataclass whose user-facing fields are declared with help text::

    @dataclass
    class OptimConfig:
        lr: float = field(default=1e-5, metadata={"help": "peak learning rate (AdamW)", "min": 0.0})
        norm_mode: str = field(default="count", metadata={"help": "...", "choices": ("count", "weight")})

    add_config_flags(parser, OptimConfig)          # --lr, --norm-mode
    cfg = config_from_args(OptimConfig, args)      # flags given on the command line, defaults otherwise

Conventions (``leafe_fast.cli --dump-surface`` lists the result for every subcommand):

- flag = ``--`` + ``prefix`` + field name with ``_`` -> ``-``; its ``dest`` is the same with ``_``.
- Every flag's argparse default is ``None`` ("not given"), so a JSON config or a ``base`` instance can
  supply the value and the dataclass default is the only default. The help shows that default.
- ``bool`` -> ``--x`` / ``--no-x``; ``bool | str`` -> ``--x`` (True) or ``--x VALUE``;
  ``tuple[T, ...]`` / ``list[T]`` -> ``nargs="*"``, commas also separate (``--k 1,2,4``);
  ``tuple[T, T]`` -> ``nargs=2``;
  ``dict[str, T]`` -> repeatable ``--x KEY=VALUE`` (VALUE parsed as JSON when it is JSON, merged over
  the base's dict); ``Optional[T]`` also accepts ``none``; ``Literal[...]`` gives choices;
  a nested dataclass field contributes its own fields' flags (same prefix).
- metadata keys: ``help`` (required: a field without it is a bug, raised as ``TypeError``),
  ``choices``, ``min``/``max`` (inclusive bounds, checked at parse time), ``metavar``,
  ``cli: False`` (a field that is not a flag, e.g. set by the program).

A bad value is an argparse error naming the flag (one line, exit 2). The same checks apply to a
JSON config through :func:`config_from_dict` / :func:`config_from_file`, which raise :class:`~leafe_fast.errors.UserError`
naming the file and the field. Limits: no Enum types, no nested containers (``list[list[int]]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, TypeVar, Union

from leafe_fast.errors import UserError

__all__ = ["add_config_flags", "config_from_args", "config_from_dict", "config_flag_names", "config_from_file",
           "key_value", "read_json_object", "NONE_WORDS"]

C = TypeVar("C")
NONE_WORDS = ("none", "null")  # how a user sets an Optional field to None on the command line
_SCALARS = (int, float, str, Path)


class _ExplicitNone:
    """The parsed value of ``--x none``: distinct from ``None`` (= flag not given)."""

    def __repr__(self) -> str:
        return "none"


_NONE = _ExplicitNone()


# --- type analysis ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Kind:
    """What a field's type hint means for parsing: ``shape`` is scalar/bool/bool_or_str/seq/fixed/dict/config."""

    shape: str
    elem: Any = None  # element type (scalar) or value type (dict) or the dataclass (config)
    optional: bool = False
    length: int | None = None  # fixed-length tuples
    container: type | None = None  # tuple or list
    choices: tuple | None = None  # from Literal[...]


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        rest = tuple(a for a in args if a is not type(None))
        if len(rest) < len(args):
            return (rest[0] if len(rest) == 1 else Union[rest]), True
    return tp, False


def _scalar(tp: Any) -> tuple[Any, tuple | None] | None:
    """(python type, choices) of a scalar hint, or None if it is not one."""
    if tp in _SCALARS:
        return tp, None
    if typing.get_origin(tp) is Literal:
        values = typing.get_args(tp)
        kinds = {type(v) for v in values}
        if len(kinds) == 1 and next(iter(kinds)) in (int, str):
            return next(iter(kinds)), tuple(values)
    return None


def _kind(cls: type, f: dataclasses.Field, hint: Any) -> _Kind:
    tp, optional = _strip_optional(hint)
    if dataclasses.is_dataclass(tp):
        return _Kind("config", tp)
    if tp is bool:
        return _Kind("bool", bool, optional)
    if typing.get_origin(tp) in (Union, types.UnionType) and set(typing.get_args(tp)) == {bool, str}:
        return _Kind("bool_or_str", str, optional)
    sc = _scalar(tp)
    if sc is not None:
        return _Kind("scalar", sc[0], optional, choices=sc[1])
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (tuple, list):
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = args[:1]
            length = None
        else:
            length = len(args) if origin is tuple else None
        elems = {a for a in args}
        if len(elems) == 1 and _scalar(next(iter(elems))) is not None:
            elem, choices = _scalar(next(iter(elems)))
            return _Kind("fixed" if length else "seq", elem, optional, length, origin, choices)
    if origin is dict and len(args) == 2 and args[0] is str:
        return _Kind("dict", args[1], optional)
    raise TypeError(f"{cls.__name__}.{f.name}: leafe_fast.flags cannot make a flag of type {hint!r}; "
                    "use a scalar, bool, Literal, tuple/list of scalars, dict[str, T] or a nested config, "
                    "or mark the field metadata={'cli': False}")


def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves `from __future__ import annotations` strings in the class's module
    return typing.get_type_hints(cls)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _flag_fields(cls: type, exclude: Iterable[str]) -> Iterable[tuple[dataclasses.Field, _Kind]]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = _hints(cls)
    skip = set(exclude)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init or f.metadata.get("cli", True) is False:
            continue
        yield f, _kind(cls, f, hints[f.name])


def _type_word(elem: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", Path: "a path", bool: "true or false"}.get(
        elem, getattr(elem, "__name__", str(elem)))


# --- parsing of one value ---------------------------------------------------------------------------
def _check_range(value: Any, meta: Mapping[str, Any]) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ValueError(f"must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"must be <= {hi}, got {value!r}")


def _convert(text: str, elem: Any) -> Any:
    if elem is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if elem is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        return value
    return elem(text)


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``, VALUE parsed as JSON when it is JSON (``size=6`` -> 6,
    ``name=x`` -> "x"). An argparse ``type=`` for repeatable dict flags (``--env-arg``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw  # a bare word is a string


def _converter(kind: _Kind, meta: Mapping[str, Any]) -> Callable[[str], Any]:
    """An argparse ``type=``: str -> value, or ArgumentTypeError (argparse names the flag)."""

    def parse(text: str) -> Any:
        try:
            if kind.optional and text.lower() in NONE_WORDS:
                return _NONE
            if kind.shape == "bool_or_str":
                low = text.lower()
                return True if low == "true" else False if low == "false" else text
            if kind.shape == "dict":
                return key_value(text)
            if kind.shape == "seq":  # `--k 1,2,4` and `--k 1 2 4` both work
                values = [_convert(t.strip(), kind.elem) for t in text.split(",") if t.strip()]
                for v in values:
                    _check_range(v, meta)
                return _Many(values)
            value = _convert(text, kind.elem)
            _check_range(value, meta)
            return value
        except ValueError as e:  # ArgumentTypeError passes through as is
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = _type_word(kind.elem)  # argparse's fallback wording
    return parse


# --- public API -------------------------------------------------------------------------------------
def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: Iterable[str] = (),
    prefix: str = "",
) -> list[str]:
    """Add one documented flag per field of the dataclass ``cls`` (see the module docstring).

    Returns the flags added. ``exclude`` names fields left out (e.g. ones the command sets itself);
    ``prefix`` (``"eval-"``) keeps two configs with the same field names apart. Raises ``TypeError``
    for a field without help or of an unsupported type: that is a bug in the config, not user input.
    """
    exclude = tuple(exclude)
    added: list[str] = []
    for f, kind in _flag_fields(cls, exclude):
        if kind.shape == "config":
            added += add_config_flags(parser, kind.elem, exclude=exclude, prefix=prefix)
            continue
        meta = f.metadata
        help_text = meta.get("help")
        if not help_text:
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it as "
                            "field(default=..., metadata={'help': '...'})")
        flag = "--" + (prefix + f.name).replace("_", "-")
        dest = (prefix + f.name).replace("-", "_")
        default = _default(f)
        choices = meta.get("choices", kind.choices)
        shown = "none" if default is None else default
        if isinstance(shown, (tuple, list)):
            shown = " ".join(map(str, shown)) or "empty"
        elif isinstance(shown, dict):
            shown = ",".join(f"{k}={v}" for k, v in shown.items()) or "empty"
        text = f"{help_text} (default: {shown})"
        kw: dict[str, Any] = dict(dest=dest, default=None, help=text.replace("%", "%%"))
        if kind.shape == "bool":
            action = parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            kw["type"] = _converter(kind, meta)
            if "metavar" in meta:
                kw["metavar"] = meta["metavar"]
            if kind.shape == "bool_or_str":
                kw.update(nargs="?", const=True)
            elif kind.shape == "seq":
                kw["nargs"] = "*"
            elif kind.shape == "fixed":
                kw["nargs"] = kind.length
            elif kind.shape == "dict":
                kw.update(action="append", metavar=kw.get("metavar", "KEY=VALUE"))
            if choices is not None and kind.shape != "dict":
                # argparse checks choices after conversion; `none` of an Optional field passes too
                kw["choices"] = _Choices(choices, allow_none=kind.optional,
                                         allow_bool=kind.shape == "bool_or_str")
                kw.setdefault("metavar", "{" + ",".join(map(str, choices)) + "}")
            action = parser.add_argument(flag, **kw)
        action.config_default = default  # for the frozen CLI surface (the argparse default is None)
        action.config_field = f"{cls.__name__}.{f.name}"
        added.append(flag)
    return added


class _Many(list):
    """Values of one comma-separated token of a sequence flag (flattened by config_from_args)."""


class _Choices(tuple):
    """argparse ``choices`` that also admits the explicit-None sentinel of an Optional field."""

    def __new__(cls, values: Iterable[Any], allow_none: bool, allow_bool: bool = False) -> "_Choices":
        obj = super().__new__(cls, values)
        obj.allow_none, obj.allow_bool = allow_none, allow_bool
        return obj

    def __contains__(self, item: object) -> bool:
        if isinstance(item, _Many):
            return all(tuple.__contains__(self, v) for v in item)
        return ((self.allow_none and item is _NONE) or (self.allow_bool and isinstance(item, bool))
                or tuple.__contains__(self, item))


def config_flag_names(cls: type, *, exclude: Iterable[str] = (), prefix: str = "") -> list[str]:
    """The ``dest`` names :func:`add_config_flags` would add (nested configs included)."""
    out: list[str] = []
    for f, kind in _flag_fields(cls, exclude):
        if kind.shape == "config":
            out += config_flag_names(kind.elem, exclude=exclude, prefix=prefix)
        else:
            out.append((prefix + f.name).replace("-", "_"))
    return out


def config_from_args(cls: type[C], args: argparse.Namespace, base: C | None = None, *,
                     exclude: Iterable[str] = (), prefix: str = "") -> C:
    """``base`` (or the dataclass defaults) with every flag that was given on the command line applied.

    A flag left out (``None`` in ``args``) keeps the base value; ``--x none`` sets an Optional field to
    None; ``dict`` flags are merged over the base's dict. Fields not turned into flags (``exclude``,
    ``cli: False``) keep the base value.
    """
    exclude = tuple(exclude)
    changes: dict[str, Any] = {}
    for f, kind in _flag_fields(cls, exclude):
        current = getattr(base, f.name) if base is not None else _default(f)
        if kind.shape == "config":
            sub_base = current if dataclasses.is_dataclass(current) else None
            changes[f.name] = config_from_args(kind.elem, args, sub_base, exclude=exclude, prefix=prefix)
            continue
        value = getattr(args, (prefix + f.name).replace("-", "_"), None)
        if value is None:
            continue
        if value is _NONE or (isinstance(value, list) and any(v is _NONE for v in value)):
            value = None  # `--x none` of an Optional list or scalar
        elif kind.shape == "dict":
            value = {**(current if isinstance(current, dict) else {}), **dict(value)}
        elif kind.shape == "seq":
            value = kind.container(v for item in value for v in (item if isinstance(item, _Many) else [item]))
        elif kind.shape == "fixed":
            value = kind.container(value)
        changes[f.name] = value
    if base is None:
        return cls(**changes)
    return dataclasses.replace(base, **changes)


def config_from_dict(cls: type[C], data: Any, *, source: str = "config", base: C | None = None) -> C:
    """Build ``cls`` from a JSON object, checking keys, types, choices and ``min``/``max``.

    Mistakes raise :class:`UserError` naming ``source`` (e.g. the config file) and the field, e.g.
    ``explore.json: max_branches: expected an integer, got 'four'; ...``. Keys absent from ``data``
    keep the ``base`` value (or the default). Fields with ``cli: False`` may appear in the file too.
    """
    if not isinstance(data, Mapping):
        raise UserError(source, f"expected a JSON object, got {type(data).__name__}",
                        f"write {{\"field\": value, ...}} with fields of {cls.__name__}")
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(source, f"unknown key(s) {unknown}", f"use only {sorted(known)}")
    changes: dict[str, Any] = {}
    for name, raw in data.items():
        f = known[name]
        try:
            kind = _kind(cls, f, hints[name])
        except TypeError:  # not a flag-able type: accept it as given, the config's own checks apply
            changes[name] = raw
            continue
        where = f"{source}: {name}"
        if kind.shape == "config":
            sub_base = getattr(base, name) if base is not None else None
            changes[name] = config_from_dict(kind.elem, raw, source=where, base=sub_base)
            continue
        changes[name] = _check_json_value(raw, kind, f, where)
    if base is None:
        return cls(**changes)
    return dataclasses.replace(base, **changes)


def read_json_object(path: str | Path, *, what: str = "config") -> dict[str, Any]:
    """The JSON object in ``path``; a missing file, a directory, bad JSON (with its line) or a
    non-object raise :class:`UserError` naming the file."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(str(path), problem, f"pass the path of a JSON {what} file")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise UserError(str(path), "is not a text file", f"pass a JSON {what} file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}", f"not valid JSON ({e.msg})", "fix the JSON syntax") from None
    if not isinstance(data, dict):
        raise UserError(str(path), f"expected a JSON object, got {type(data).__name__}", 'write {"field": value, ...}')
    return data


def config_from_file(cls: type[C], path: str | Path, *, base: C | None = None) -> C:
    """:func:`config_from_dict` of the JSON object in ``path`` (errors name the file and the field)."""
    return config_from_dict(cls, read_json_object(path), source=str(path), base=base)


def _check_json_value(raw: Any, kind: _Kind, f: dataclasses.Field, where: str) -> Any:
    help_text = f.metadata.get("help", "")
    fix = f"set it to {_describe(kind)}" + (f" ({help_text})" if help_text else "")
    if raw is None:
        if kind.optional:
            return None
        raise UserError(where, "null is not allowed", fix)

    def one(value: Any, elem: Any) -> Any:
        ok = (
            (elem is int and isinstance(value, int) and not isinstance(value, bool))
            or (elem is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (elem in (str, Path) and isinstance(value, str))
            or (elem is bool and isinstance(value, bool))
        )
        if not ok:
            raise UserError(where, f"expected {_type_word(elem)}, got {value!r}", fix)
        value = float(value) if elem is float else Path(value) if elem is Path else value
        if elem is float and not math.isfinite(value):  # json.loads accepts NaN and Infinity
            raise UserError(where, f"expected a finite number, got {value!r}", fix)
        choices = f.metadata.get("choices", kind.choices)
        if choices is not None and value not in choices:
            raise UserError(where, f"{value!r} is not one of {list(choices)}", fix)
        try:
            _check_range(value, f.metadata)
        except ValueError as e:
            raise UserError(where, str(e), fix) from None
        return value

    if kind.shape == "bool":
        return one(raw, bool)
    if kind.shape == "bool_or_str":
        if isinstance(raw, (bool, str)):
            return raw
        raise UserError(where, f"expected true, false or a string, got {raw!r}", fix)
    if kind.shape == "scalar":
        return one(raw, kind.elem)
    if kind.shape in ("seq", "fixed"):
        if not isinstance(raw, list):
            raise UserError(where, f"expected a list, got {raw!r}", fix)
        if kind.length is not None and len(raw) != kind.length:
            raise UserError(where, f"expected {kind.length} values, got {len(raw)}", fix)
        return kind.container(one(v, kind.elem) for v in raw)
    if kind.shape == "dict":
        if not isinstance(raw, dict):
            raise UserError(where, f"expected a JSON object, got {raw!r}", fix)
        return dict(raw)
    raise AssertionError(kind)  # every shape is handled above


def _describe(kind: _Kind) -> str:
    word = {"bool": "true or false", "bool_or_str": "true, false or a string", "dict": "a JSON object"}.get(
        kind.shape)
    if word is None:
        word = _type_word(kind.elem)
        if kind.shape == "seq":
            word = f"a list of {word.split(' ', 1)[1]}s"
        elif kind.shape == "fixed":
            word = f"a list of {kind.length} {word.split(' ', 1)[1]}s"
    return word + (" or null" if kind.optional else "")
