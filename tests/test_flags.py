"""Flags generated from config dataclasses: names, parsing, defaults living once, one-line errors."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

from leafe_fast.errors import UserError
from leafe_fast.flags import (add_config_flags, config_flag_names, config_from_args, config_from_dict,
                              config_from_file)


@dataclass
class Optim:
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate", "min": 0.0})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})


@dataclass
class Demo:
    token_budget: int = field(default=4096, metadata={"help": "tokens per micro-batch", "min": 1})
    max_steps: Optional[int] = field(default=None, metadata={"help": "optimizer steps", "min": 1})
    norm_mode: str = field(default="count", metadata={"help": "normaliser", "choices": ("count", "weight")})
    split: Literal["train", "test"] = field(default="train", metadata={"help": "task split"})
    progress: bool = field(default=True, metadata={"help": "progress bar"})
    resume: bool | str = field(default=False, metadata={"help": "True: latest checkpoint; str: that one"})
    lambdas: tuple[float, ...] = field(default=(1.0, 1.0), metadata={"help": "loss multipliers"})
    ks: list[int] = field(default_factory=lambda: [1], metadata={"help": "k of pass@k"})
    shapes: Optional[tuple[str, ...]] = field(default=("a",), metadata={"help": "shape names"})
    env_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "environment options"})
    out: Path | None = field(default=None, metadata={"help": "output file"})
    optim: Optim = field(default_factory=Optim, metadata={"help": "optimizer"})
    internal: object = field(default=None, metadata={"cli": False})


def _parse(argv: list[str], cls: type = Demo, **kw: Any) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_config_flags(p, cls, **kw)
    return p, p.parse_args(argv)


def test_defaults_live_in_the_dataclass():
    _, args = _parse([])
    assert all(getattr(args, d) is None for d in config_flag_names(Demo))  # "not given"
    assert config_from_args(Demo, args) == Demo()


def test_every_kind_of_field_parses():
    _, args = _parse(["--token-budget", "128", "--max-steps", "7", "--norm-mode", "weight", "--split", "test",
                      "--no-progress", "--resume", "--lambdas", "1", "0.5", "--ks", "1", "2,4",
                      "--env-kwargs", "size=6", "--env-kwargs", "name=x", "--env-kwargs", 'l=[1,2]',
                      "--out", "o.json", "--lr", "0.1", "--betas", "0.8", "0.9"])
    cfg = config_from_args(Demo, args)
    assert cfg.token_budget == 128 and cfg.max_steps == 7 and cfg.norm_mode == "weight" and cfg.split == "test"
    assert cfg.progress is False and cfg.resume is True
    assert cfg.lambdas == (1.0, 0.5) and isinstance(cfg.lambdas, tuple) and cfg.ks == [1, 2, 4]
    assert cfg.env_kwargs == {"size": 6, "name": "x", "l": [1, 2]}
    assert cfg.out == Path("o.json") and cfg.optim == Optim(lr=0.1, betas=(0.8, 0.9))
    _, args = _parse(["--resume", "runs/x/step_4", "--progress"])
    cfg = config_from_args(Demo, args)
    assert cfg.resume == "runs/x/step_4" and cfg.progress is True


def test_flags_override_a_base_and_none_sets_optional():
    base = Demo(token_budget=64, max_steps=3, env_kwargs={"size": 5, "seed": 1}, optim=Optim(lr=0.5))
    _, args = _parse(["--max-steps", "none", "--env-kwargs", "size=7", "--shapes", "none"])
    cfg = config_from_args(Demo, args, base)
    assert cfg.token_budget == 64 and cfg.max_steps is None and cfg.shapes is None
    assert cfg.env_kwargs == {"size": 7, "seed": 1}  # merged over the base's dict
    assert cfg.optim.lr == 0.5  # nested base kept
    assert base.max_steps == 3  # the base is not mutated


@pytest.mark.parametrize("argv, words", [
    (["--token-budget", "four"], ["--token-budget", "expected an integer", "'four'"]),
    (["--token-budget", "0"], ["--token-budget", ">= 1"]),
    (["--norm-mode", "mean"], ["--norm-mode", "invalid choice"]),
    (["--split", "val"], ["--split", "invalid choice"]),
    (["--lr", "-1"], ["--lr", ">= 0.0"]),
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--env-kwargs", "size"], ["--env-kwargs", "KEY=VALUE"]),
    (["--betas", "0.9"], ["--betas", "2 arguments"]),
    (["--ks", "1,x"], ["--ks", "expected an integer", "'x'"]),
    (["--token-budget", "none"], ["--token-budget", "expected an integer"]),  # not Optional
])
def test_bad_values_are_one_line_errors_naming_the_flag(argv, words, capsys):
    p = argparse.ArgumentParser(prog="t")
    add_config_flags(p, Demo)
    with pytest.raises(SystemExit) as exc:
        p.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    for w in words:
        assert w in err, err


def test_help_shows_the_dataclass_default():
    p, _ = _parse([])
    text = p.format_help()
    assert "tokens per micro-batch (default: 4096)" in text
    assert "--progress, --no-progress" in text
    assert "loss multipliers (default: 1.0 1.0)" in text


def test_exclude_and_prefix():
    p, args = _parse(["--eval-token-budget", "5"], exclude=("env_kwargs", "optim"), prefix="eval-")
    assert not hasattr(args, "eval_env_kwargs") and not hasattr(args, "eval_lr")
    cfg = config_from_args(Demo, args, exclude=("env_kwargs", "optim"), prefix="eval-")
    assert cfg.token_budget == 5


def test_a_field_without_help_is_a_bug():
    @dataclass
    class Bad:
        documented: int = field(default=1, metadata={"help": "yes"})
        undocumented: int = 2

    with pytest.raises(TypeError, match="Bad.undocumented has no help"):
        add_config_flags(argparse.ArgumentParser(), Bad)


def test_unsupported_type_is_a_bug():
    @dataclass
    class Bad:
        nested: list[list[int]] = field(default_factory=list, metadata={"help": "x"})

    with pytest.raises(TypeError, match="cannot make a flag"):
        add_config_flags(argparse.ArgumentParser(), Bad)


def test_string_annotations_of_another_module_resolve():
    # this module uses `from __future__ import annotations`: every hint above is a string
    assert isinstance(Demo.__dataclass_fields__["max_steps"].type, str)
    _, args = _parse(["--max-steps", "2"])
    assert config_from_args(Demo, args).max_steps == 2


def test_config_from_dict_checks_types_and_names_the_field():
    cfg = config_from_dict(Demo, {"token_budget": 8, "lambdas": [1, 2], "optim": {"lr": 1}, "out": "x"})
    assert cfg.token_budget == 8 and cfg.lambdas == (1.0, 2.0) and cfg.optim.lr == 1.0 and cfg.out == Path("x")
    cases = [
        ({"token_budget": "four"}, "cfg.json: token_budget: expected an integer, got 'four'"),
        ({"token_budget": True}, "token_budget: expected an integer"),
        ({"token_budget": 0}, "token_budget: must be >= 1"),
        ({"norm_mode": "mean"}, "norm_mode: 'mean' is not one of"),
        ({"max_branches": 4}, "unknown key(s) ['max_branches']"),
        ({"optim": {"lr": "x"}}, "cfg.json: optim: lr: expected a number"),
        ({"betas": [1]}, "unknown key"),
        ({"lambdas": 1}, "lambdas: expected a list"),
        ({"token_budget": None}, "null is not allowed"),
        ({"env_kwargs": [1]}, "env_kwargs: expected a JSON object"),
        ({"optim": {"lr": float("nan")}}, "optim: lr: expected a finite number"),
    ]
    for data, words in cases:
        with pytest.raises(UserError) as exc:
            config_from_dict(Demo, data, source="cfg.json")
        assert words in str(exc.value) and "\n" not in str(exc.value), (data, str(exc.value))
    with pytest.raises(UserError, match="expected a JSON object, got list"):
        config_from_dict(Demo, [1], source="cfg.json")
    assert config_from_dict(Demo, {"max_steps": None}, base=Demo(max_steps=4)).max_steps is None


def test_config_from_file_names_the_file_and_line(tmp_path):
    good = tmp_path / "c.json"
    good.write_text('{"token_budget": 8, "optim": {"lr": 0.5}}')
    cfg = config_from_file(Demo, good)
    assert cfg.token_budget == 8 and cfg.optim.lr == 0.5
    cases = {
        "missing.json": (None, "missing.json: does not exist"),
        "dir": ("<dir>", "dir: is a directory"),
        "bad.json": ('{"token_budget": 8,\n}', "bad.json:2: not valid JSON"),
        "list.json": ("[1, 2]", "list.json: expected a JSON object, got list"),
        "type.json": ('{"tasks_x": 1}', "type.json: unknown key(s) ['tasks_x']"),
        "binary.json": (b"\xff\xfe\x00", "binary.json: is not a text file"),
    }
    for name, (content, words) in cases.items():
        path = tmp_path / name
        if content == "<dir>":
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(UserError) as exc:
            config_from_file(Demo, path)
        assert words in str(exc.value), (name, str(exc.value))
