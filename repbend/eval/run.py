"""`repbend eval`: benchmarks -> attacks -> generations.jsonl -> judges -> summary.

Phases, each resumable from `OUTPUT/generations.jsonl`:
0. check: option values (EvalConfig), then every input path (model, adapter, judge directories; benchmark, transfer
   and target files, read in full), that the adapter fits the model (`adapter_fit.py`), before the model is loaded,
   so a typo fails at once (`check_inputs`).
1. generate: every job without a matching row in the file is generated (the input-embedding attack first
   optimises its soft prompts); rows are appended after each batch, so a killed run loses one batch at most.
2. judge: the rule judges (keywords, demo) label every row afresh; each classifier judges the rows that lack its
   verdict from this classifier (one classifier in memory at a time, after the evaluated model is released), and
   the file is rewritten atomically.
3. summary.json / summary.md over the rows of the requested jobs (see `summary.py`), with every verdict those rows
   carry, each next to its judge; summary.json's meta records the model, adapter and classifiers with their
   fingerprints and the generation settings.

What a row is keyed by (resume reuses a row only when all of it matches): (benchmark, id, attack, source), where
`source` is a digest of everything that determines the generation: the model's and the adapter's fingerprints
(`fingerprint.py`: paths and a digest of their files), the resolved dtype, max_new_tokens, the exact conversation
and prefill sent, and for input_embed its target and soft-prompt settings. A rerun into the same --eval.output with
another model, adapter, dtype, generation setting or benchmark text generates anew; the other rows stay in the file
(counted in one log line) and never enter this run's summary. A classifier verdict is kept only while the
classifier's fingerprint (`judge_ids`) matches. Batch sizes and the device are not part of the key.

A row: benchmark, id, attack, source, behavior_id, subset, prompt (the user message exactly as sent, context
included), behavior, context, answer (an expected answer, where the benchmark file gives one), prefill (prefill
attack), attack_info (input_embed: steps, loss), generation, n_new_tokens, verdicts {judge: label}, judge_raw
{judge: the classifier's raw output}, judge_ids {judge: classifier digest}.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ..progress import progress_bar

from repbend.data.errors import DataError
from repbend.data.sources import check_file, read_text

from . import attacks as atk
from . import generation as gen
from .benchmarks import Item, read_harmbench, read_transfer, read_xstest
from .adapter_fit import check_adapter_fits
from .cli import UsageError
from .fingerprint import fingerprint
from .inputs import check_device, check_dtype, check_model_location, check_positive
from .judges import JUDGE_INFO, RULE_JUDGES, ClassifierJudge, judge_applies
from .summary import summarize, write_summary

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    model_path: str
    output: str
    adapter: str | None = None
    harmbench: str | None = None
    harmbench_targets: str | None = None  # JSON BehaviorID -> target, for the HarmBench CSV
    xstest: str | None = None
    attacks: list[str] = field(default_factory=lambda: ["direct"])
    transfer: str | None = None
    judges: list[tuple[str, str | None]] = field(default_factory=lambda: [("keywords", None)])
    max_new_tokens: int = 512
    batch_size: int = 16
    limit: int | None = None  # the first N items of each benchmark (smoke runs)
    dtype: str = "auto"
    device: str = "auto"
    embed_tokens: int = 20
    embed_steps: int = 500
    embed_lr: float = 1e-3
    embed_stop_loss: float = 0.05
    embed_batch_size: int = 8
    judge_batch_size: int = 8

    def __post_init__(self):
        """Option values only (UsageError); the paths are checked by `check_inputs`."""
        if not self.harmbench and not self.xstest:
            raise UsageError("nothing to evaluate: give --eval.harmbench and/or --eval.xstest")
        if self.harmbench_targets and not self.harmbench:
            raise UsageError("--eval.harmbench_targets needs --eval.harmbench")
        if not self.attacks:
            raise UsageError("--eval.attacks: no attack given")
        unknown = [a for a in self.attacks if a not in atk.ATTACKS]
        if unknown:
            raise UsageError(f"--eval.attacks: unknown attack(s) {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(atk.ATTACKS)}")
        if len(set(self.attacks)) < len(self.attacks):
            raise UsageError(f"--eval.attacks {','.join(self.attacks)}: an attack is given twice")
        if "transfer" in self.attacks and not self.transfer:
            raise UsageError("the transfer attack needs --eval.transfer FILE")
        if self.transfer and "transfer" not in self.attacks:
            raise UsageError("--eval.transfer is given but --eval.attacks does not include transfer")
        names = [name for name, _ in self.judges]
        for name, path in self.judges:
            if name not in JUDGE_INFO:
                raise UsageError(f"--eval.judges: unknown judge {name!r}; known: {', '.join(JUDGE_INFO)}")
            if JUDGE_INFO[name].classifier and not path:
                raise UsageError(f"--eval.judges: {name} needs its classifier: {name}=DIR")
        if not names or len(set(names)) < len(names):
            raise UsageError("--eval.judges: no judge given, or a judge given twice")
        for option, value in (("--gen.max_new_tokens", self.max_new_tokens), ("--gen.batch_size", self.batch_size),
                              ("--input_embed.tokens", self.embed_tokens), ("--input_embed.steps", self.embed_steps),
                              ("--input_embed.batch_size", self.embed_batch_size),
                              ("--judge.batch_size", self.judge_batch_size)):
            check_positive(value, option)
        if self.limit is not None:
            check_positive(self.limit, "--eval.limit")
        if not self.embed_lr > 0:
            raise UsageError(f"--input_embed.lr {self.embed_lr}: must be > 0")
        check_dtype(self.dtype)
        check_device(self.device)


def check_inputs(cfg: EvalConfig) -> None:
    """Every path the run will read, before anything is loaded (module docstring, phase 0). The benchmark files are
    only checked for existence here; `run_eval` reads them in full right after, still before the model loads."""
    check_model_location(cfg.model_path, "--model.path", chat_template=True)
    if cfg.adapter:
        check_model_location(cfg.adapter, "--model.adapter", kind="adapter")
        check_adapter_fits(cfg.model_path, cfg.adapter)
    for name, path in cfg.judges:
        if path:
            check_model_location(path, f"--eval.judges {name}=")
    for what, path in (("HarmBench file", cfg.harmbench), ("HarmBench targets file", cfg.harmbench_targets),
                       ("XSTest file", cfg.xstest), ("transfer file", cfg.transfer)):
        if path:
            check_file(os.path.expanduser(path), what)
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--eval.output {cfg.output}: exists and is not a directory")


def load_model(path, adapter=None, dtype="auto", device="auto"):
    """The model (adapter on top, not merged) and tokenizer, frozen and in eval mode."""
    from repbend.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, adapter=adapter, dtype=dtype, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer


def load_classifier(path, dtype="auto", device="auto"):
    """A judge model and its tokenizer. Unlike `load_model`, no chat template is required: the classifiers are
    prompted with their own fixed text formats (the HarmBench Llama-2 classifier ships without a template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from repbend.model import resolve_attention, resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dt, attn_implementation=resolve_attention("auto", dev, dt)).to(dev)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked; it only fills the left of short rows
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer


def _free_memory():
    """Return the memory of a model the caller has just dropped (the next model loads into it)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- generations.jsonl -------------------------------------------------------------------------------------------
def row_key(row: dict) -> tuple[str, str, str, str | None]:
    """(benchmark, id, attack, source): rows of older repbend versions have no source and never match a job."""
    return (row["benchmark"], row["id"], row["attack"], row.get("source"))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def generation_source(cfg: "EvalConfig") -> dict:
    """What determines every generation of this run apart from the job itself (module docstring)."""
    from repbend.model import resolve_device, resolve_dtype

    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    return {"model": fingerprint(cfg.model_path), "adapter": fingerprint(cfg.adapter), "dtype": str(dtype),
            "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy"}


def job_source(job: atk.Job, run_source: dict, cfg: "EvalConfig") -> str:
    """The digest that, with (benchmark, id, attack), keys the job's row (module docstring)."""
    what = {"run": run_source, "messages": job.messages, "prefill": job.prefill}
    if job.attack == "input_embed":
        what["input_embed"] = {"target": job.item.target, "tokens": cfg.embed_tokens, "steps": cfg.embed_steps,
                               "lr": cfg.embed_lr, "stop_loss": cfg.embed_stop_loss}
    return _digest(what)


def read_rows(path: Path) -> dict[tuple, dict]:
    """Rows by key (a later row replaces an earlier one); a torn last line (killed mid-write) is dropped. Lines are
    split at "\\n" only: generations may hold U+2028 and other characters str.splitlines breaks at, and the rows
    are written with ensure_ascii=False."""
    rows: dict[tuple, dict] = {}
    if not path.exists():
        return rows
    lines = read_text(path, "generations file").split("\n")
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == last:
                log.warning("%s: dropping a truncated last line", path)
                continue
            raise DataError(f"{path}:{n}", "not valid JSON; remove the line or the file to regenerate",
                            reason="malformed JSON") from None
        missing = [k for k in ("benchmark", "id", "attack") if not isinstance(row, dict) or k not in row]
        if missing:
            raise DataError(f"{path}:{n}", "missing (not a row of repbend eval; use a new --output directory)",
                            field=missing[0], reason="missing field")
        rows[row_key(row)] = row
    return rows


def write_rows(path: Path, rows) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _new_row(job: atk.Job) -> dict:
    item = job.item
    row = {"benchmark": item.benchmark, "id": job.id, "attack": job.attack, "source": job.source,
           "behavior_id": item.id, "subset": item.subset, "prompt": job.prompt, "behavior": item.behavior,
           "context": item.context}
    if item.answer:
        row["answer"] = item.answer
    if job.prefill:
        row["prefill"] = job.prefill
    if job.info:
        row["attack_info"] = dict(job.info)
    return row


# --- phases ------------------------------------------------------------------------------------------------------
def load_items(cfg: EvalConfig) -> list[Item]:
    items = []
    if cfg.harmbench:
        items += read_harmbench(cfg.harmbench, cfg.harmbench_targets)[:cfg.limit]
    if cfg.xstest:
        items += read_xstest(cfg.xstest)[:cfg.limit]
    return items


def generate_jobs(model, tokenizer, jobs: list[atk.Job], cfg: EvalConfig, sink) -> None:
    """Generate every job, calling `sink(row)` for each finished row."""
    stop_ids = gen.stop_token_ids(tokenizer, model)
    plain = [j for j in jobs if j.attack != "input_embed"]
    soft = [j for j in jobs if j.attack == "input_embed"]
    bar = progress_bar(len(jobs), "generate", unit="prompt")
    requests = [atk.job_request(tokenizer, j) for j in plain]
    for idx, texts, counts in gen.iter_generate(model, tokenizer, requests, max_new_tokens=cfg.max_new_tokens,
                                                batch_size=cfg.batch_size, stop_ids=stop_ids):
        for i, text, n in zip(idx, texts, counts):
            sink({**_new_row(plain[i]), "generation": text, "n_new_tokens": n})
        bar.update(len(idx))
    for start in range(0, len(soft), cfg.embed_batch_size):
        chunk = soft[start:start + cfg.embed_batch_size]
        requests = [atk.soft_slot_request(tokenizer, j) for j in chunk]
        bar.set_postfix_str("optimising soft prompts")
        prompts, losses, steps = atk.optimize_soft_prompts(
            model, tokenizer, requests, [j.item.target for j in chunk], n_tokens=cfg.embed_tokens,
            steps=cfg.embed_steps, lr=cfg.embed_lr, stop_loss=cfg.embed_stop_loss)
        for r, p in zip(requests, prompts):
            r.soft = p
        for j, loss in zip(chunk, losses):
            j.info = {"steps": steps, "loss": loss, "n_soft_tokens": cfg.embed_tokens}
        for idx, texts, counts in gen.iter_generate(model, tokenizer, requests, max_new_tokens=cfg.max_new_tokens,
                                                    batch_size=cfg.batch_size, stop_ids=stop_ids):
            for i, text, n in zip(idx, texts, counts):
                sink({**_new_row(chunk[i]), "generation": text, "n_new_tokens": n})
            bar.update(len(idx))
    bar.close()


def judge_rows(rows: list[dict], judges: list[tuple[str, str | None]], cfg: EvalConfig, save,
               judge_ids: dict[str, str | None] | None = None) -> None:
    """Label the rows: rule judges every row, each classifier the rows lacking a verdict from this classifier
    (`judge_ids`: judge name -> classifier digest; a verdict with another digest is judged again); `save()` after
    each judge."""
    judge_ids = judge_ids or {}
    for name, path in judges:
        if name in RULE_JUDGES:
            for row in rows:
                row.setdefault("verdicts", {})[name] = RULE_JUDGES[name](row)
            save()
            continue
        verdict_names = JUDGE_INFO[name].verdicts
        stale = [r for r in rows if judge_applies(name, r) and name in r.get("verdicts", {})
                 and (r.get("judge_ids") or {}).get(name) != judge_ids.get(name)]
        if stale:
            log.warning("judge %s: %d verdict(s) in generations.jsonl came from another classifier; judging them "
                        "again with %s", name, len(stale), path)
            for r in stale:
                for v in verdict_names:
                    r["verdicts"].pop(v, None)
        todo = [r for r in rows if judge_applies(name, r) and name not in r.get("verdicts", {})]
        if not todo:
            continue
        model, tokenizer = load_classifier(path, dtype=cfg.dtype, device=cfg.device)
        judge = ClassifierJudge(name, model, tokenizer, batch_size=cfg.judge_batch_size)
        with progress_bar(len(todo), f"judge {name}", unit="row") as bar:
            for row, (verdicts, raw) in zip(todo, judge(todo, progress=bar.update)):
                row.setdefault("verdicts", {}).update(verdicts)
                row.setdefault("judge_raw", {})[name] = raw
                row.setdefault("judge_ids", {})[name] = judge_ids.get(name)
        del judge, model, tokenizer
        _free_memory()
        save()


def run_eval(cfg: EvalConfig) -> list[dict]:
    """Run (or resume) an evaluation; returns the summary results."""
    check_inputs(cfg)
    items = load_items(cfg)
    transfer = read_transfer(cfg.transfer) if cfg.transfer else None
    out = Path(cfg.output)
    path = out / "generations.jsonl"
    if transfer:
        known = {i.id for i in items if i.benchmark == "harmbench"}
        missing = [b for b in transfer if b not in known]
        if missing:
            log.warning("transfer file: %d behaviour id(s) match no HarmBench item (e.g. %s)", len(missing), missing[0])
    jobs, skipped = atk.build_jobs(items, cfg.attacks, transfer)
    for (bench, attack), n in skipped.items():
        log.warning("%s: %d item(s) have no target string; attack %s skipped for them", bench, n, attack)
    source = generation_source(cfg)
    for job in jobs:
        job.source = job_source(job, source, cfg)
    judge_models = {name: fingerprint(p) for name, p in cfg.judges if p}
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(path)
    if rows:  # compact: drop duplicate keys and a torn line before appending
        write_rows(path, rows.values())
    keys = {job.row_key for job in jobs}
    names = {k[:3] for k in keys}
    other = sum(1 for k in rows if k not in keys and k[:3] in names)
    if other:
        log.warning("%s: %d row(s) for these prompts were generated with another model, adapter, dtype, generation "
                    "setting or prompt text; they are not reused (they stay in the file)", path, other)
    pending = [j for j in jobs if j.row_key not in rows or "generation" not in rows[j.row_key]]
    log.info("%d jobs, %d already generated, %d to generate", len(jobs), len(jobs) - len(pending), len(pending))
    if pending:
        model, tokenizer = load_model(cfg.model_path, cfg.adapter, cfg.dtype, cfg.device)
        with path.open("a", encoding="utf-8") as f:
            def sink(row):
                rows[row_key(row)] = row
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
            generate_jobs(model, tokenizer, pending, cfg, sink)
        del model, tokenizer
        _free_memory()
    wanted = [rows[j.row_key] for j in jobs]
    judge_rows(wanted, cfg.judges, cfg, save=lambda: write_rows(path, rows.values()),
               judge_ids={name: (fp or {}).get("digest") or (fp or {}).get("path") for name, fp in
                          judge_models.items()})
    results = summarize(wanted)
    meta = {"model": source["model"], "adapter": source["adapter"], "dtype": source["dtype"],
            "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy", "attacks": cfg.attacks,
            "judges": [n for n, _ in cfg.judges], "judge_models": judge_models,
            "skipped_without_target": {f"{b}/{a}": n for (b, a), n in skipped.items()}}
    table = write_summary(out, results, meta)
    print(f"repbend eval: {cfg.model_path}" + (f" + adapter {cfg.adapter}" if cfg.adapter else "") + "\n")
    print(table)
    return results
