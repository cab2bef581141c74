"""The Sokoban reproduction of issue 12 (``leafe-fast repro``, ``benchmarks/repro_sokoban.py``).

Modules: ``fastlm`` (batched KV decoding of a small Qwen2/Llama model), ``rollout`` (episodes in lock
step: evaluation, gate, random walk), ``bc`` (the cloned base policy's data), ``gate`` (does the policy
read its experience), ``train`` (base and arms), ``pipeline`` (cached stages, presets), ``report``
(aggregation, table, plot), ``command`` (the CLI).
"""
