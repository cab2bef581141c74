"""The installed package imports, and its native and Triton halves answer for real."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import leafe_fast


def test_native_extension_computes_offsets():
    from leafe_fast import _C

    assert _C.abi_version() >= 1
    offsets = _C.lengths_to_offsets(np.array([3, 0, 5], dtype=np.int64))
    assert offsets.tolist() == [0, 3, 3, 8]


def _python_elsewhere(tmp_path, code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` with this interpreter from an empty folder, so neither the checkout nor the current
    directory is on ``sys.path``: only what is installed is importable."""
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


KERNELS_CHECK = """
import importlib.util, pathlib, leafe_fast.kernels as k, leafe_fast.kernels.leafe_ce_triton
spec = importlib.util.find_spec("kernels")
ours = pathlib.Path(k.__file__).resolve()
assert k.__name__ == "leafe_fast.kernels"
# a top-level `kernels` must not exist, or at least not be this project's folder (a PyPI package of
# that name exists and transformers probes for it)
assert spec is None or pathlib.Path(spec.origin).resolve() != ours, spec.origin
print("ok", ours)
"""


def test_kernels_namespace_is_not_top_level(tmp_path):
    res = _python_elsewhere(tmp_path, KERNELS_CHECK, PYTHONPATH="")
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-2000:]
    # the check itself can fail: with the folder that holds our kernels/ on sys.path, a top-level
    # `kernels` is this project's folder
    import leafe_fast.kernels

    root = str(Path(leafe_fast.kernels.__file__).resolve().parents[1])
    res = _python_elsewhere(tmp_path, KERNELS_CHECK, PYTHONPATH=root)
    assert res.returncode != 0 and "AssertionError" in res.stderr


def test_cli_help_lists_every_stage(capsys):
    from leafe_fast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    listed = set(re.findall(r"^    ([a-z][a-z-]+)\s", text, flags=re.M))
    # the stages of the pipeline as the README names them, written out (not read from COMMANDS)
    assert listed == {"explore", "build-data", "train", "eval", "demo", "bench", "repro"}, text
    assert leafe_fast.__version__


@pytest.mark.parametrize("name", ["explore", "build-data", "train", "eval", "demo", "bench", "repro"])
def test_cli_subcommand_loads_and_prints_its_help(name, capsys):
    """Every stage's module exists and builds its flags: a missing module raises (not a silent skip)."""
    from leafe_fast.cli import main

    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: leafe-fast {name}") and "--" in out


def test_every_stage_has_the_same_command_layout():
    from leafe_fast.cli import COMMANDS

    exceptions = {"demo": "leafe_fast.demo"}  # the demo module is the command (one file, the whole pipeline)
    for name, (module, _) in COMMANDS.items():
        if name in exceptions:
            assert module == exceptions[name]
            continue
        package, _, leaf = module.rpartition(".")
        assert leaf == "command" and package.count(".") == 1, f"{name}: {module} is not leafe_fast.<stage>.command"


def test_cli_subcommand_help_fails_when_its_module_is_missing(monkeypatch):
    import leafe_fast.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "eval", ("leafe_fast.no_such_stage", "x"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["eval", "--help"])


@pytest.mark.parametrize("package", ["leafe_fast", "leafe_fast.data", "leafe_fast.engines", "leafe_fast.integrations"])
def test_lazy_exports_resolve_and_unknown_names_raise(package):
    import importlib

    mod = importlib.import_module(package)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
        assert name in vars(mod), f"{package}.{name} is not cached after the first access"
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'no_such_name'"):
        getattr(mod, "no_such_name")


def test_top_level_help_imports_no_stage(tmp_path):
    code = ("import contextlib, io, sys\nfrom leafe_fast.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
            "print(sorted(m for m in sys.modules if m in {'torch', 'transformers'} or m.endswith('.command')))")
    res = _python_elsewhere(tmp_path, code)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr[-2000:]


def test_importing_the_package_is_cheap(tmp_path):
    res = _python_elsewhere(tmp_path, "import sys, leafe_fast, leafe_fast.data, leafe_fast.engines, "
                                      "leafe_fast.integrations; print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr[-2000:]


def test_triton_kernel_runs_for_real(triton_interpret):
    import torch

    if not (torch.cuda.is_available() or triton_interpret):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1 (make test sets it)")
    from leafe_fast.kernels.leafe_ce_triton import smoke_test

    assert smoke_test() < 1e-4  # max error of the real forward kernel vs torch on a tiny shape
