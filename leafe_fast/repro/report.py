"""Aggregation of a reproduction run: per arm and k the mean pass@k over seeds with a 95% interval,
levels gained and lost against the base at the same seed, the table, and the plot."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

from leafe_fast.repro.pipeline import VARIANT_ARMS

# two-sided 97.5% Student t quantiles by degrees of freedom (1..30); normal beyond
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean and the half-width of its 95% t-interval over seeds (None with a single seed)."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return {"mean": mean, "ci95": t * sd / math.sqrt(n), "n": n, "values": values}


def gained_lost(arm_eval: dict[str, Any], base_eval: dict[str, Any]) -> dict[str, int]:
    """Levels solved at least once in n by the arm but never by the base (gained), and the reverse."""
    a, b = arm_eval["successes"], base_eval["successes"]
    return {"gained": sum(1 for t in a if a[t] > 0 and b.get(t, 0) == 0),
            "lost": sum(1 for t in a if a[t] == 0 and b.get(t, 0) > 0)}


def _spent(arm_run: dict[str, Any], key: str) -> int | None:
    return ((arm_run.get("explore") or {}).get("spent") or {}).get(key)


def aggregate(r: Any, rw: dict[str, Any], base: dict[str, Any], gate: dict[str, Any],
              arms: dict[str, list[dict[str, Any]]], seconds: float) -> dict[str, Any]:
    from leafe_fast.repro.pipeline import environment_info, preset_dict

    base_by_seed = {x["seed"]: x["eval"] for x in arms.get("base", [])}
    table: dict[str, Any] = {}
    for arm, runs in arms.items():
        if not runs:
            continue
        ks = list(runs[0]["eval"]["pass@k"])
        row = {k: mean_ci([x["eval"]["pass@k"][k] for x in runs]) for k in ks}
        gl = [gained_lost(x["eval"], base_by_seed[x["seed"]]) for x in runs if x["seed"] in base_by_seed]
        table[arm] = {
            "pass@k": row,
            "gained_vs_base": mean_ci([g["gained"] for g in gl]) if gl and arm != "base" else None,
            "lost_vs_base": mean_ci([g["lost"] for g in gl]) if gl and arm != "base" else None,
            "seeds": [x["seed"] for x in runs],
            "ablation": bool(runs[0].get("ablation")),
            "variant": arm in VARIANT_ARMS,
            # from the whole trees file ("spent"; a resumed exploration's summary counts only its own part)
            "env_steps_explore": [_spent(x, "env_steps") for x in runs],
            "generated_tokens_explore": [_spent(x, "generated_tokens") for x in runs],
            "samples": [(x.get("samples") or {}).get("samples") for x in runs],
            "train_steps": [(x.get("train") or {}).get("steps", 0) for x in runs],
            "epochs": [(x.get("train") or {}).get("epochs") for x in runs],
            # seeds whose exploration found no success: that arm is the base model there, not a trained one
            "untrained_seeds": [x["seed"] for x in runs if arm != "base" and not (x.get("train") or {}).get("steps")],
        }
    return {
        "schema": "leafe.repro_sokoban/1",
        "preset": preset_dict(r.p),
        "levels": {"difficulty": r.p.difficulty, "clone": r.p.clone_levels, "explore": len(r.explore_tasks),
                   "gate": len(r.gate_tasks), "test": len(r.test_tasks), "episodes_per_test_level": r.p.eval_episodes,
                   "max_steps": r.max_turns},
        "level_overlap": r.level_overlap(),
        "prompt": {"env_kwargs": r.env_kwargs, "instructions": r.env.instructions()},
        "gate_ignored": bool(gate) and not gate.get("passed") and any(arms.values()),
        "random_walk": rw,
        "base_policy": base,
        "gate": gate,
        "table": table,
        "arms": arms,
        "seconds_total_this_invocation": round(seconds, 1),
        "versions": {**environment_info(), "commit": _commit()},
    }


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git: no commit recorded
        return None


def format_table(result: dict[str, Any]) -> str:
    """A markdown table: pass@k mean +- 95% half-width per arm, the random walk first."""
    table = result["table"]
    if not table:
        return "(no arm finished)"
    ks = list(next(iter(table.values()))["pass@k"])
    head = "| arm | " + " | ".join(f"pass@{k}" for k in ks) + " | gained / lost vs base |"
    lines = [head, "|" + "---|" * (len(ks) + 2)]
    rw = result["random_walk"].get("pass@k", {})
    lines.append("| random walk | " + " | ".join(f"{rw.get(k, float('nan')):.3f}" for k in ks) + " | |")
    for arm, row in table.items():
        cells = []
        for k in ks:
            m = row["pass@k"][k]
            cells.append(f"{m['mean']:.3f}" + (f" ± {m['ci95']:.3f}" if m["ci95"] is not None else ""))
        gl = ""
        if row["gained_vs_base"] is not None:
            gl = f"{row['gained_vs_base']['mean']:.1f} / {row['lost_vs_base']['mean']:.1f}"
        name = arm + (" (ablation)" if row["ablation"] else "") + (" (variant)" if row.get("variant") else "")
        if row.get("untrained_seeds"):
            name += f" (untrained in seed {','.join(map(str, row['untrained_seeds']))})"
        lines.append(f"| {name} (seeds {len(row['seeds'])}) | " + " | ".join(cells) + f" | {gl} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """pass@k against k (log2 axis) per arm with 95% intervals; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rw = result["random_walk"].get("pass@k", {})
    ks = [int(k) for k in rw]
    if ks:
        ax.plot(ks, [rw[str(k)] for k in ks], "k:", label="random walk")
    for arm, row in result["table"].items():
        kk = [int(k) for k in row["pass@k"]]
        means = [row["pass@k"][str(k)]["mean"] for k in kk]
        errs = [row["pass@k"][str(k)]["ci95"] or 0.0 for k in kk]
        ax.errorbar(kk, means, yerr=errs, marker="o", ms=3, capsize=3,
                    label=arm + (" (ablation)" if row["ablation"] else "") + (" (variant)" if row.get("variant") else "")
                    + f" ({len(row['seeds'])} seeds)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    lv = result["levels"]
    ax.set_title(f"Sokoban {lv['difficulty']}: {lv['test']} held-out levels x {lv['episodes_per_test_level']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
