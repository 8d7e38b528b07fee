"""Evaluation and analysis: `repbend eval` (attack success rate and over-refusal), `repbend logit-lens` and
`repbend rep-shift`.

benchmarks.py  readers for HarmBench (JSON/CSV), XSTest, transfer-attack and prompt files
attacks.py     direct, prefill, input-embedding (soft prompt) and transfer attacks
generation.py  batched greedy generation with the chat template and stop tokens
judges.py      refusal keywords, the HarmBench classifier, WildGuard; verdict parsers
run.py         the eval pipeline: generations.jsonl (resumable) -> verdicts -> summary
summary.py     ASR / refusal-rate tables (unparseable verdicts counted apart) and run comparison
lens.py        logit lens heatmap, base vs tuned
rep_shift.py   per-layer representation shift, base vs tuned
inputs.py      checks of model/adapter/judge locations and option values, before anything loads
cli.py         argparse entry points used by `repbend.cli`; UsageError (a bad option value)
"""
