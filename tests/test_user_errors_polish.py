"""Remaining rough edges of `leafe-fast train` / `explore` / `eval` (helper P, after review R's "still open"
list): each case is one line on stderr, exit 2, and the run folder as it was."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_train_utils import random_samples, tiny  # noqa: E402

from leafe_fast.cli import main  # noqa: E402
from leafe_fast.errors import UserError  # noqa: E402


def _one_error_line(capsys, cmd: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"leafe-fast {cmd}: error: ") and "Traceback" not in err, err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes): "unchanged" means this dict is equal."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _samples_file(tmp_path: Path, n: int = 10, seed: int = 7) -> Path:
    tok, _ = tiny("qwen2")
    path = tmp_path / "samples.npz"
    random_samples(n, len(tok), seed=seed).save(path)
    return path


def _train(samples: Path, out: Path, *extra: str) -> int:
    return main(["train", "--samples", str(samples), "--model", "tiny", "--out", str(out), "--token-budget", "64",
                 "--no-progress", *extra])


# --- 1. --resume with --max-steps at or below the checkpoint's step ----------------------------------------
@pytest.mark.parametrize("max_steps", ["3", "2"])
def test_resume_with_no_steps_left_is_refused_and_changes_nothing(tmp_path, capsys, max_steps):
    """It used to train 0 steps, exit 0 and re-export final/ from the checkpoint (at the same or a later step)."""
    samples, out = _samples_file(tmp_path), tmp_path / "run"
    assert _train(samples, out, "--max-steps", "3", "--save-every", "1") == 0
    capsys.readouterr()
    before = _snapshot(out)
    assert _train(samples, out, "--max-steps", max_steps, "--resume") == 2
    line = _one_error_line(capsys, "train")
    assert "step_00000003: the checkpoint is at step 3 and this run ends at step " + max_steps in line
    assert f"(--max-steps {max_steps}): nothing is left to train; pass --max-steps above 3" in line
    assert _snapshot(out) == before
    # raising --max-steps continues the run
    assert _train(samples, out, "--max-steps", "4", "--resume") == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# --- 2. --attn a backend this run would not use -------------------------------------------------------------
@pytest.mark.parametrize("attn, needs", [("flash_attn", "CUDA and the flash-attn package"),
                                         ("torch_varlen", "CUDA and torch >= 2.10")])
def test_attn_not_available_on_this_device_is_refused(tmp_path, capsys, attn, needs):
    """`--attn flash_attn` on the CPU failed with a traceback from inside the first forward (and left a
    metrics.jsonl); it must be refused before the model loads, naming what this device offers."""
    samples, out = _samples_file(tmp_path), tmp_path / "run"
    assert _train(samples, out, "--device", "cpu", "--attn", attn, "--layout", "flat", "--max-steps", "1") == 2
    line = _one_error_line(capsys, "train")
    assert f"--attn {attn}: is not available on cpu here (it needs {needs}); available: sdpa_mask, loop; " \
           "pass --attn auto (or one of sdpa_mask, loop)" in line
    assert not out.exists()


def test_attn_on_trie_batches_is_refused_and_flat_runs(tmp_path, capsys):
    """LEAFE samples carry tree ids, so --layout auto packs tries, whose attention is the tree backend: an
    explicit --attn was silently never used."""
    samples, out = _samples_file(tmp_path), tmp_path / "run"
    assert _train(samples, out, "--device", "cpu", "--attn", "loop", "--max-steps", "1") == 2
    line = _one_error_line(capsys, "train")
    assert "--attn loop: sets the attention of flat micro-batches, and these samples pack as prefix tries " \
           "(--layout auto: they carry tree ids)" in line and "pass --layout flat to use it, or --attn auto" in line
    assert not out.exists()
    assert _train(samples, out, "--device", "cpu", "--attn", "loop", "--layout", "flat", "--max-steps", "1",
                  "--no-export") == 0
    assert _train(samples, tmp_path / "auto", "--device", "cpu", "--max-steps", "1", "--no-export") == 0


def test_flash_attn_with_fp32_compute_is_refused(monkeypatch):
    """On CUDA, --precision fp32 hands the flash kernels fp32 inputs, which they refuse deep in the forward."""
    import torch

    import leafe_fast.train.attention as attention
    from leafe_fast.train.command import ModelLoadConfig, _check_attention
    from leafe_fast.train.config import TrainConfig

    tok, _ = tiny("qwen2")
    samples = random_samples(4, len(tok), seed=1)
    monkeypatch.setattr(attention, "available_backends", lambda device: ["flash_attn", "sdpa_mask", "loop"])
    cuda = torch.device("cuda")
    flat = dict(layout="flat")
    with pytest.raises(UserError, match=r"--attn flash_attn: the flash kernels take bf16/fp16 inputs only, and "
                                        r"this run computes in fp32 \(--precision fp32\); pass --precision bf16"):
        _check_attention(TrainConfig(precision="fp32", **flat), ModelLoadConfig(attn="flash_attn"), samples, cuda)
    _check_attention(TrainConfig(**flat), ModelLoadConfig(attn="flash_attn"), samples, cuda)  # bf16-mixed: fine
    with pytest.raises(UserError, match="--attn torch_varlen: is not available on cuda here"):
        _check_attention(TrainConfig(**flat), ModelLoadConfig(attn="torch_varlen"), samples, cuda)


# --- 3. errors about the samples' contents name the samples file -------------------------------------------
@pytest.mark.parametrize("case", ["group", "vocab"])
def test_sample_content_errors_name_the_samples_file(tmp_path, capsys, case):
    """They said `samples: ...`; from the CLI they must name the file that holds the bad sample."""
    tok, _ = tiny("qwen2")
    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    samples = folder / "samples.npz"
    if case == "group":  # groups 0 and 1, but one lambda
        random_samples(6, len(tok), seed=2).save(samples)
        extra, words = ["--lambdas", "1"], ": a sample has group 1, but lambdas has 1 entries"
    else:
        random_samples(6, 10 * len(tok), seed=2).save(samples)
        extra, words = [], " is outside the model's vocabulary"
    assert _train(samples, tmp_path / "run", "--max-steps", "1", *extra) == 2
    line = _one_error_line(capsys, "train")
    assert line.startswith(f"leafe-fast train: error: {samples}: ") and words in line, line
    assert not (tmp_path / "run").exists()


def test_trainer_without_a_path_keeps_saying_samples():
    from leafe_fast.train import TrainConfig, Trainer, load_model

    tok, cfg = tiny("qwen2")
    samples = random_samples(6, len(tok), seed=2)
    model = load_model(cfg, dtype="float32", device="cpu")
    with pytest.raises(UserError, match=r"^samples: a sample has group 1, but lambdas has 1 entries"):
        Trainer(model, samples, TrainConfig(max_steps=1, lambdas=(1.0,), progress=False, peak_flops=None))
    with pytest.raises(UserError, match=r"^data/s\.npz: a sample has group 1"):
        Trainer(model, samples, TrainConfig(max_steps=1, lambdas=(1.0,), progress=False, peak_flops=None),
                samples_path="data/s.npz")


# --- 4. one list of --dtype names for train, explore and eval ----------------------------------------------
def test_train_explore_and_eval_accept_the_same_dtype_names():
    """explore took float32/bfloat16/float16, train also auto, eval had no --dtype; the Python loader also
    takes fp32/bf16/fp16. One tuple now (train.config.DTYPE_CHOICES) for all three."""
    from leafe_fast.cli import cli_surface
    from leafe_fast.train.config import DTYPE_CHOICES, DTYPE_NAMES, torch_dtype
    from leafe_fast.train.model import DTYPES

    surface = cli_surface()
    for cmd in ("train", "explore", "eval"):
        assert tuple(surface[cmd]["--dtype"]["choices"]) == DTYPE_CHOICES, cmd
    assert set(DTYPE_NAMES) == set(DTYPES)  # the names load_model resolves (train) are the same
    import torch

    for name in DTYPE_NAMES:
        assert torch_dtype(name) is DTYPES[name] and isinstance(torch_dtype(name), torch.dtype)
    assert torch_dtype("auto") is None and torch_dtype(None) is None
    with pytest.raises(UserError, match="--dtype: 'float8' is not one of"):
        torch_dtype("float8")


@pytest.mark.parametrize("cmd", ["explore", "eval"])
def test_explore_and_eval_pass_the_dtype_to_the_engine(tmp_path, monkeypatch, cmd):
    """`--dtype bf16` reaches the engine as torch.bfloat16 (explore used getattr(torch, name): no aliases)."""
    import torch

    seen = {}

    class Stop(Exception):
        pass

    def fake_engine(kind, *, dtype=None, **kw):
        seen["dtype"] = dtype
        raise Stop

    if cmd == "explore":
        import leafe_fast.engines as engines

        monkeypatch.setattr(engines, "make_engine", fake_engine)
        argv = ["explore", "--env", "sokoban", "--model", "tiny", "--tasks", "1", "--out", str(tmp_path / "t.jsonl")]
    else:
        import leafe_fast.engines.hf as hf
        from leafe_fast.tiny import tiny_model, tiny_tokenizer

        model_dir = tmp_path / "model"
        tok = tiny_tokenizer("qwen2")
        tiny_model(tok, "qwen2").save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        monkeypatch.setattr(hf, "HFEngine", lambda path, **kw: fake_engine("hf", **kw))
        argv = ["eval", "--model", str(model_dir), "--env", "sokoban", "--tasks", "1", "--n", "1"]
    with pytest.raises(Stop):
        main([*argv, "--dtype", "bf16"])
    assert seen["dtype"] is torch.bfloat16
    with pytest.raises(Stop):
        main([*argv, "--dtype", "auto"])
    assert seen["dtype"] is None


# --- 5. a full disk while writing a checkpoint or the final model ------------------------------------------
def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fail_in", ["state", "latest"])
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch, fail_in):
    """ENOSPC in the middle of step 4's state.pt (or while pointing `latest` at it): one line naming the
    checkpoint folder, no .tmp left, `latest` still at step 2, and --resume continues exactly: the losses of
    steps 3..6 are bitwise those of an uninterrupted run."""
    import errno
    import io

    import torch

    import leafe_fast.train.checkpoint as checkpoint

    samples = _samples_file(tmp_path)
    args = ("--max-steps", "6", "--save-every", "2", "--no-export", "--device", "cpu")
    assert _train(samples, tmp_path / "ref", *args) == 0
    want = _losses(tmp_path / "ref")
    assert len(want) == 6

    out, saves = tmp_path / "run", []
    real_save, real_latest = torch.save, checkpoint._write_latest

    def full_disk():
        saves.append(1)
        return len(saves) == 2  # the second checkpoint (step 4)

    class HalfFull(io.RawIOBase):
        """The file, until half the checkpoint's bytes are written: then ENOSPC, as a full disk raises it
        (torch's zip writer then fails in its own close with a RuntimeError over the OSError)."""

        def __init__(self, f, limit):
            self.f, self.limit, self.n = f, limit, 0

        def writable(self):
            return True

        def write(self, b):
            if self.n + len(b) > self.limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.n += len(b)
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    def save(obj, f, *a, **k):
        if fail_in == "state" and full_disk():
            size = io.BytesIO()
            real_save(obj, size, *a, **k)
            return real_save(obj, HalfFull(f, len(size.getvalue()) // 2), *a, **k)
        return real_save(obj, f, *a, **k)

    def latest(root, name):
        if fail_in == "latest" and full_disk():
            (root / "latest.tmp").write_text(name[:3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_latest(root, name)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(checkpoint, "_write_latest", latest)
    assert _train(samples, out, *args) == 2
    line = _one_error_line(capsys, "train")
    ck = out / "checkpoints"
    assert (f"{ck / 'step_00000004'}: the checkpoint could not be written (No space left on device); the newest "
            "complete checkpoint, step_00000002, is kept; free disk space (or pass another --out), then rerun "
            "with --resume") in line
    monkeypatch.undo()
    left = sorted(p.name for p in ck.iterdir())
    assert left == (["latest", "step_00000002"] if fail_in == "state" else ["latest", "step_00000002", "step_00000004"])
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert checkpoint.latest_checkpoint(ck) == ck / "step_00000002"
    assert _train(samples, out, *args, "--resume") == 0
    assert _losses(out) == want  # steps 1-2 of the failed run, 3-6 after the resume: bitwise the same


@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_a_full_disk_while_exporting_leaves_no_model_folder(tmp_path, capsys, monkeypatch, error):
    """On a real full disk safetensors raises SafetensorError('... I/O error: No space left on device (os
    error 28)'); it left final.tmp and a traceback."""
    import errno

    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full_disk(self, folder, **kw):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        if error == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "run"
    assert _train(_samples_file(tmp_path), out, "--max-steps", "1") == 2
    line = _one_error_line(capsys, "train")
    assert f"{out / 'final'}: the trained model could not be written (No space left on device" in line
    assert not (out / "final").exists() and not (out / "final.tmp").exists()


def test_a_full_disk_while_writing_the_summary_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    real = Path.write_text

    def write_text(self, *a, **k):
        if self.name == "summary.json.tmp":
            real(self, "{")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "run"
    assert _train(_samples_file(tmp_path), out, "--max-steps", "1", "--no-export") == 2
    assert f"{out / 'summary.json'}: could not be written (No space left on device)" in _one_error_line(capsys, "train")
    assert not (out / "summary.json").exists() and not (out / "summary.json.tmp").exists()


def test_a_full_disk_while_logging_metrics_is_one_line_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of step 3's metrics record: one line naming metrics.jsonl; --resume from the step-2
    checkpoint drops the cut record and logs steps 3..4 again, the same as an uninterrupted run."""
    import errno

    from leafe_fast.train.metrics import MetricsLog

    samples = _samples_file(tmp_path)
    args = ("--max-steps", "4", "--save-every", "2", "--no-export", "--device", "cpu")
    assert _train(samples, tmp_path / "ref", *args) == 0
    real = MetricsLog.write

    def write(self, record):
        if record["step"] == 3:
            self._fh.write(json.dumps(record)[:20])
            self._fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, record)

    monkeypatch.setattr(MetricsLog, "write", write)
    out = tmp_path / "run"
    assert _train(samples, out, *args) == 2
    line = _one_error_line(capsys, "train")
    assert f"{out / 'metrics.jsonl'}: could not be written (No space left on device); free disk space, then " \
           "rerun with --resume" in line
    monkeypatch.undo()
    assert _train(samples, out, *args, "--resume") == 0
    assert _losses(out) == _losses(tmp_path / "ref")
