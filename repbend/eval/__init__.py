"""Evaluation and analysis: `repbend eval` (attack success rate and over-refusal), `repbend logit-lens` and
`repbend rep-shift`.

benchmarks.py  readers for HarmBench (JSON/CSV), XSTest, transfer-attack and prompt files
attacks.py     direct, prefill, input-embedding (soft prompt) and transfer attacks
generation.py  batched greedy generation (model.generate) with the chat template and stop tokens
judges.py      refusal keywords, the demo's pattern judge, the HarmBench classifier, WildGuard; what each measures
run.py         the eval pipeline: generations.jsonl (resumable, keyed by what determines each row) -> verdicts ->
               summary
fingerprint.py digests of model, adapter and classifier directories (the resume key)
adapter_fit.py does an adapter belong to the base model (meta-device check before anything loads)
summary.py     ASR / refusal-rate / accuracy tables, each figure with its judge, and run comparison
lens.py        logit lens heatmap, base vs tuned, and the difference view
rep_shift.py   per-layer representation shift, base vs tuned
inputs.py      checks of model/adapter/judge locations and option values, before anything loads
cli.py         argparse entry points used by `repbend.cli`; UsageError (a bad option value)
"""
