"""The Sokoban reproduction (issue 12): fast decoding vs transformers, prompt parity with the trajectory
builder and ``leafe_fast.eval``, counter-based sampling, cloning data, aggregation, and a miniature of
the whole benchmark through the CLI (resumable)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from leafe_fast.data.chat import ChatFormat
from leafe_fast.envs.sokoban import SokobanEnv, sokoban_tasks
from leafe_fast.repro import tokenizer as bpe
from leafe_fast.repro.fastlm import FastLM, gumbel_noise, pad_rows, sample_tokens
from leafe_fast.repro.rollout import Episode, MemoChat, episode_key, play
from leafe_fast.tiny import tiny_model
from leafe_fast.trajectory import experience_message, open_trajectory


@pytest.fixture(scope="module")
def env():
    return SokobanEnv(prompt="compact", end_on_deadlock=True)


@pytest.fixture(scope="module")
def tok(env):
    return bpe.train_tokenizer(bpe.sokoban_corpus(env, sokoban_tasks("train", 12, seed=7, difficulty="hard")), 512)


@pytest.fixture(scope="module")
def chat(tok):
    return ChatFormat.from_tokenizer(tok)


def _model(tok, **kw):
    size = dict(hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
    return tiny_model(tok, "qwen2", seed=3, **{**size, **kw})


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_fastlm_matches_transformers_when_fed_in_ragged_pieces(tok, kv_heads):
    model = _model(tok, num_kv_heads=kv_heads)
    fast = FastLM.from_hf(model)
    rng = random.Random(kv_heads)
    seqs = [[rng.randrange(len(tok)) for _ in range(n)] for n in (1, 7, 13, 30)]
    with torch.no_grad():
        want = [model(torch.tensor([s])).logits[0] for s in seqs]
    cache = fast.new_cache(len(seqs), 40)
    lengths = torch.zeros(len(seqs), dtype=torch.int64)
    done = [0] * len(seqs)
    while any(d < len(s) for d, s in zip(done, seqs)):
        pieces = []
        for i, s in enumerate(seqs):  # each row takes its own number of tokens (>= 1) per call
            n = min(len(s) - done[i], rng.randint(1, 6)) if done[i] < len(s) else 0
            pieces.append(s[done[i]:done[i] + n] if n else [0])
        ids, counts = pad_rows(pieces)
        logits = fast.forward_step(ids, counts, lengths, cache)
        for i, s in enumerate(seqs):
            if done[i] < len(s):
                done[i] += len(pieces[i])
                torch.testing.assert_close(logits[i], want[i][done[i] - 1], atol=2e-5, rtol=1e-4)
                lengths[i] += len(pieces[i])


def test_sampling_noise_is_per_episode_and_matches_softmax():
    keys = torch.tensor([5, 9, 11])
    alone = gumbel_noise(1, keys[1:2], 3, 0, 16)
    together = gumbel_noise(1, keys, torch.tensor([7, 3, 4]), 0, 16)
    assert torch.equal(alone[0], together[1])  # a row's noise ignores the rest of the batch
    assert not torch.equal(together[0], together[2])
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[None].repeat(20000, 1)
    draws = sample_tokens(logits, 1.0, 0, torch.arange(20000), 0, 0)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    assert torch.equal(sample_tokens(logits[:3], 0.0, 0, keys, 0, 0), logits[:3].argmax(-1))


def test_play_builds_the_trajectory_builders_tokens_and_is_batch_independent(env, tok, chat):
    memo = MemoChat(chat)
    fast = FastLM.from_hf(_model(tok))
    tasks = sokoban_tasks("test", 3, seed=4, difficulty="hard")
    eps = [Episode(t, episode_key(t.task_id, j)) for t in tasks for j in range(2)]
    play(fast, memo, env, eps, seed=2, max_turns=6, max_new_tokens=2, chunk=4, keep_ids=True, keep_history=True)
    for e in eps:
        traj = open_trajectory(chat, env.instructions(), env.reset(e.task))
        for action in e.action_ids:
            traj.add_step(action, env.step(chat.decode_action(action)))
        assert traj.ids == e.ids and len(e.history) == e.steps == len(e.action_ids)
    # the same episode alone gives the same actions (noise keyed by episode, not by batch slot)
    alone = [Episode(eps[3].task, eps[3].key)]
    play(fast, memo, env, alone, seed=2, max_turns=6, max_new_tokens=2, keep_ids=True)
    assert alone[0].ids == eps[3].ids


def test_play_agrees_with_leafe_fast_eval_under_greedy_decoding(env, tok, chat):
    from leafe_fast.engines.base import SamplingParams
    from leafe_fast.engines.hf import HFEngine
    from leafe_fast.eval import evaluate
    from leafe_fast.repro.rollout import evaluate_policy

    model = _model(tok)
    tasks = sokoban_tasks("test", 3, seed=5, difficulty="hard")
    engine = HFEngine(model, tok, max_batch_size=8, seed=0)
    ref = evaluate(engine, chat, env, tasks, n=1, ks=[1], sampling=SamplingParams(temperature=0.0, max_new_tokens=2),
                   max_turns=8, progress=False)
    ours = evaluate_policy(FastLM.from_hf(model), MemoChat(chat), env, tasks, 1, seed=0, max_turns=8,
                           temperature=0.0, max_new_tokens=2)
    for r in ref["tasks"]:
        assert ours["successes"][r["task_id"]] == r["successes"]
    assert ours["steps"] == sum(sum(r["steps"]) for r in ref["tasks"])


def test_clone_samples_read_experience_and_target_only_the_continuation(env, tok, chat):
    from leafe_fast.repro.bc import CloneConfig, build_clone_samples

    tasks = sokoban_tasks("train", 30, seed=9, difficulty="hard")
    cfg = CloneConfig(noise=0.2, experience_share=1.0, stall_share=0.3, dense=False)
    samples, stats = build_clone_samples(env, chat, tasks, cfg, seed=0)
    assert stats["deadlock_experience"] >= 5 and stats["plain"] + stats["deadlock_experience"] + \
        stats["stall_experience"] == len(samples)
    for s in samples:
        text = tok.decode(s.input_ids.tolist())
        if not s.meta["experience"]:
            continue
        assert "Avoid: " in text
        start = text.index("Experience from an earlier attempt")
        first_target = int(np.argmax(s.target_mask))
        assert len(tok.decode(s.input_ids[:first_target].tolist())) > start  # no target before the experience
        avoided = text[text.index("Avoid: ", start) + 7]
        after = text[text.index("Use it for your next action.", start):]
        first_move = after.split("assistant\n", 1)[1][0]
        assert first_move in "udlr" and first_move != avoided
    dense, _ = build_clone_samples(env, chat, tasks[:5], CloneConfig(experience_share=0.0, dense=True), seed=0)
    sparse, _ = build_clone_samples(env, chat, tasks[:5], CloneConfig(experience_share=0.0, dense=False), seed=0)
    assert all(d.num_targets > 3 * s.num_targets for d, s in zip(dense, sparse))


def test_experience_ids_are_the_trajectory_modules_message(chat):
    memo = MemoChat(chat)
    assert memo.experience_ids("Avoid: u.") == list(chat.message_ids(experience_message("Avoid: u.")))


def test_mean_ci_and_levels_gained_lost():
    from leafe_fast.repro.report import gained_lost, mean_ci

    m = mean_ci([0.2, 0.4, 0.6])
    assert m["mean"] == pytest.approx(0.4) and m["ci95"] == pytest.approx(4.303 * 0.2 / 3 ** 0.5)
    assert mean_ci([0.5])["ci95"] is None
    gl = gained_lost({"successes": {"a": 1, "b": 0, "c": 2}}, {"successes": {"a": 0, "b": 3, "c": 1}})
    assert gl == {"gained": 1, "lost": 1}


def test_tiny_benchmark_runs_end_to_end_and_resumes(tmp_path):
    from leafe_fast.repro.command import main

    out, res = tmp_path / "run", tmp_path / "results"
    argv = ["--preset", "tiny", "--out", str(out), "--results-dir", str(res), "--no-progress", "--ignore-gate",
            "--arms", "base", "rs-sft", "rehearsal-only", "leafe", "no-summary", "leafe-all-steps"]
    assert main(argv) == 0
    result = json.loads((res / "repro_sokoban_tiny.json").read_text())
    assert set(result["table"]) == {"base", "rs-sft", "rehearsal-only", "leafe", "no-summary", "leafe-all-steps"}
    assert result["table"]["leafe-all-steps"]["variant"] and not result["table"]["leafe"]["variant"]
    arm = {a: json.loads((out / "arms" / a / "seed0" / "arm.json").read_text()) for a in ("leafe", "leafe-all-steps")}
    assert arm["leafe-all-steps"]["explore"]["spent"] == arm["leafe"]["explore"]["spent"]  # the same trees
    cf = {a: arm[a]["samples"]["target_tokens"]["counterfactual"] for a in arm}
    assert cf["leafe-all-steps"] >= cf["leafe"]
    for arm, row in result["table"].items():
        assert list(row["pass@k"]) == ["1", "2"] and row["seeds"] == [0]
    assert {"success_with", "success_without", "gain", "passed"} <= set(result["gate"])
    assert result["random_walk"]["n"] == 2 and result["versions"]["torch"]
    assert result["gate_ignored"] is (not result["gate"]["passed"])
    assert set(result["level_overlap"]) >= {"test_in_clone", "test_in_explore", "test_in_gate"}
    assert result["table"]["rehearsal-only"]["env_steps_explore"] == result["table"]["leafe"]["env_steps_explore"]
    leafe_spent = result["table"]["leafe"]["env_steps_explore"][0]
    assert 0 < leafe_spent and result["table"]["rs-sft"]["env_steps_explore"][0] <= leafe_spent
    assert (res / "repro_sokoban_tiny.png").exists()
    stamp = (out / "arms" / "leafe" / "seed0" / "arm.json").stat().st_mtime
    assert main(argv) == 0  # a rerun reuses every cached stage
    assert main(argv[:8] + ["--arms", "nope"]) == 2  # a user mistake: one line, exit 2
    (res / "repro_sokoban_tiny.json").unlink()
    assert main(argv + ["--report-only"]) == 0  # aggregates what finished, runs nothing
    again = json.loads((res / "repro_sokoban_tiny.json").read_text())
    assert again["table"]["leafe"]["pass@k"] == result["table"]["leafe"]["pass@k"]
    assert (out / "arms" / "leafe" / "seed0" / "arm.json").stat().st_mtime == stamp


def test_local_model_replaces_the_cloned_policy(tmp_path):
    """``--model DIR``: a user's (here tiny, random) Qwen2 model with its own tokenizer, the full prompt and
    the LLM reflector; no cloning stage, the arms trained from that model."""
    from dataclasses import replace

    from leafe_fast.repro.command import main
    from leafe_fast.repro.pipeline import PRESETS, Repro
    from leafe_fast.tiny import tiny_tokenizer

    tok = tiny_tokenizer("qwen2")
    model_dir = tmp_path / "model"
    tiny_model(tok, "qwen2", seed=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
               intermediate_size=64).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    small = replace(PRESETS["tiny"], arms=("base", "leafe"), gate_levels=2, gate_continuations=1, explore_levels=1,
                    explore_max_steps=12, eval_levels=2, eval_episodes=1)
    r = Repro(small, out, model_dir=model_dir, log=lambda _: None, ignore_gate=True)
    assert not r.env.compact
    assert r.p.max_new_tokens >= 32 and r.reflector == "llm"
    with pytest.warns(RuntimeWarning, match="max_new_tokens"):  # a random model rarely ends its turn
        result = r.run()
    assert result["base_policy"]["external_model"] == str(model_dir)
    assert not (out / "base").exists() and not (out / "tokenizer.json").exists()
    assert result["prompt"]["env_kwargs"]["prompt"] == "full" and set(result["table"]) == {"base", "leafe"}
    explored = json.loads((out / "arms" / "leafe" / "seed0" / "explore.json").read_text())
    assert explored["config"]["reflector"] == "llm"
    # a model family the lock-step decoder does not implement is one line, exit 2, before anything runs
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert main(["--preset", "tiny", "--out", str(tmp_path / "x"), "--model", str(model_dir)]) == 2
    assert not (tmp_path / "x").exists()


def test_failed_gate_stops_before_the_arms_and_settings_are_pinned_to_out(tmp_path):
    from dataclasses import replace

    from leafe_fast.errors import UserError
    from leafe_fast.repro.pipeline import PRESETS, Repro

    small = replace(PRESETS["tiny"], gate_levels=2, eval_levels=2, eval_episodes=1, gate_min_gain=2.0)  # unreachable
    logs: list[str] = []
    result = Repro(small, tmp_path / "run", log=logs.append).run()
    assert result["gate"]["passed"] is False and result["table"] == {} and result["gate_ignored"] is False
    assert not (tmp_path / "run" / "arms").exists() and any("--ignore-gate" in line for line in logs)
    # the cached base and gate belong to these settings: another preset on the same --out is refused
    with pytest.raises(UserError, match="other settings.*clone_steps"):
        Repro(replace(small, clone_steps=small.clone_steps + 1), tmp_path / "run", log=logs.append)
    Repro(replace(small, seeds=(0, 1), threads=2), tmp_path / "run", log=logs.append)  # seeds may change
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(UserError, match="records no settings"):
        Repro(small, tmp_path / "other", log=logs.append)
