"""Public files -> examples -> micro-batches.

    sources.py       read records from .jsonl / .json / .parquet or the Hub, as (origin, row)
    wildguardmix.py  wildjailbreak.py  ultrachat.py   one reader per public format: validation, label rules
    chat.py          rendering with the tokenizer's chat template, exact request/response split, truncation
    examples.py      Sequence, Pools, DataReport
    pools.py         build_pools: read, select, cap, render
    sampler.py       MicroBatchSampler: deterministic, resumable composition of the five sets
"""
from repbend.data.chat import Limits, render_conversation, render_request_response
from repbend.data.errors import DataError, SkipLog
from repbend.data.examples import DataReport, Pools, Sequence, SourceReport
from repbend.data.pools import build_pools
from repbend.data.sampler import MicroBatch, MicroBatchSampler

__all__ = [
    "DataError", "DataReport", "Limits", "MicroBatch", "MicroBatchSampler", "Pools", "Sequence", "SkipLog",
    "SourceReport", "build_pools", "render_conversation", "render_request_response",
]
