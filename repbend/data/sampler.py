"""Deterministic, resumable micro-batch composition.

`MicroBatchSampler(pools, B, seed)(index)` is a pure function of (pools, seed, index): resuming means
remembering the next index, and distributed ranks simply take different indices (e.g. step * world + rank).

Composition with B rows per set (docs/method.md):
    response modes, WGM + WJ:   safe   = B WGM safe   + B WJ (request + refusal)
                                unsafe = B WGM unsafe + the same B WJ pairs' (request + harmful answer)
                                n_pairs = B: the last B rows of safe and of unsafe are the pairs, aligned
    response modes, WGM only:   safe = 2B WGM safe, unsafe = 2B WGM unsafe, n_pairs = 0
    response modes, WJ only:    safe = B refusals, unsafe = the same B pairs' harmful answers, n_pairs = B
    request-only modes:         safe = 2B WGM unharmful requests; unsafe = B WGM harmful requests + B WJ
                                requests (2B WGM harmful without WJ); n_pairs = 0. A WJ "pair" is then one
                                request twice, and pairing a request with itself carries no signal (its h'
                                and h would be compared at the same tokens): the WJ requests only widen the
                                unsafe side, and the safe side comes from WildGuardMix, which is required.
    retain = B UltraChat (or [] without UltraChat).
Circuit Breakers and RMU (`method`, the pools' own): two sets, drawn as two pools of their own
    forget       = WGM unsafe + WJ harmful answers                     -> B rows, all into `unsafe`
    retain side  = WGM safe + WJ refusals + UltraChat (in that order)  -> B rows: the WGM/WJ ones into `safe`,
                                                                          the UltraChat ones into `retain`
    n_pairs = 0 (the loss reads safe + retain as its retain set, so only B, not the split, is fixed).
A pool smaller than one micro-batch's need is an error at construction.

Order: every pool cycles through its own epochs. Pool p, epoch e: a permutation seeded from (seed, p, e),
the tail that does not fill a micro-batch dropped. With group_by_length, the permutation is cut into chunks
of CHUNK_BATCHES micro-batches, each chunk sorted by length and cut into micro-batches, and the order of all
micro-batches of the epoch then shuffled (same seed): rows of similar length share a micro-batch (less
padding) while the order stays random. One or two epochs per pool are cached, so any index is cheap,
including a far jump on resume.
"""
from __future__ import annotations

import zlib

import numpy as np

from repbend.data.examples import Pools
from repbend.loss.types import MicroBatch

CHUNK_BATCHES = 64
_POOL_NAMES = {"forget": "forget (WildGuardMix unsafe + WildJailbreak harmful answers)",
               "retain_side": "retain (WildGuardMix safe + WildJailbreak refusals + UltraChat)"}


def seeded_rng(seed: int, *keys) -> np.random.Generator:
    """A numpy Generator seeded from `seed` and `keys` (strings hashed with crc32, ints as they are):
    stable across processes and Python versions (unlike hash())."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    entropy = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(entropy)


class MicroBatchSampler:
    """See the module docstring. `rows_per_batch` maps each pool used to the rows it gives a micro-batch."""

    def __init__(self, pools: Pools, batch_size: int, seed: int, request_only: bool = False,
                 group_by_length: bool = True, method: str = "repbend"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pools.request_only != request_only:
            raise ValueError(f"the pools were built with request_only={pools.request_only} but the sampler was "
                             f"asked for request_only={request_only}; build them for the same loss mode")
        if pools.method != method:
            raise ValueError(f"the pools were built for method {pools.method} but the sampler was asked for "
                             f"{method}; build them for the same method")
        self.pools, self.batch_size, self.seed = pools, batch_size, seed
        self.request_only, self.group_by_length, self.method = request_only, group_by_length, method
        if method == "repbend":
            self._items = {"wgm_safe": pools.wgm_safe, "wgm_unsafe": pools.wgm_unsafe, "wj_pairs": pools.wj_pairs,
                           "retain": pools.retain}
        else:
            self._items = {"forget": pools.wgm_unsafe + [harmful for _, harmful in pools.wj_pairs],
                           "retain_side": pools.wgm_safe + [refusal for refusal, _ in pools.wj_pairs] + pools.retain}
            self._n_safe_side = len(pools.wgm_safe) + len(pools.wj_pairs)  # retain_side rows before UltraChat's
        self.rows_per_batch = self._composition()
        for name, need in self.rows_per_batch.items():
            have = len(self._items[name])
            if have < need:
                raise ValueError(f"pool {_POOL_NAMES.get(name, name)} has {have} rows but one micro-batch needs "
                                 f"{need} (batch_size {batch_size}{', request-only' if request_only else ''})")
        self._lengths = {name: np.array([self._length(x) for x in self._items[name]], dtype=np.int64)
                         for name in self.rows_per_batch}
        self._cache: dict[str, dict[int, np.ndarray]] = {name: {} for name in self.rows_per_batch}

    def _composition(self) -> dict[str, int]:
        B, p = self.batch_size, self.pools
        if self.method != "repbend":
            return {"forget": B, "retain_side": B}
        has_wgm, has_wj = bool(p.wgm_safe or p.wgm_unsafe), bool(p.wj_pairs)
        if self.request_only:
            if not has_wgm:
                raise ValueError("request-only modes need WildGuardMix: the safe set is its unharmful requests")
            need = {"wgm_safe": 2 * B, "wgm_unsafe": B if has_wj else 2 * B}
            if has_wj:
                need["wj_pairs"] = B
        elif has_wgm and has_wj:
            need = {"wgm_safe": B, "wgm_unsafe": B, "wj_pairs": B}
        elif has_wgm:
            need = {"wgm_safe": 2 * B, "wgm_unsafe": 2 * B}
        elif has_wj:
            need = {"wj_pairs": B}
        else:
            raise ValueError("no safe/unsafe data: give WildGuardMix and/or WildJailbreak")
        if p.retain:
            need["retain"] = B
        return need

    @staticmethod
    def _length(item) -> int:
        return max(len(item[0]), len(item[1])) if isinstance(item, tuple) else len(item)

    def batches_per_epoch(self, name: str) -> int:
        return len(self._items[name]) // self.rows_per_batch[name]

    def __len__(self) -> int:
        """Micro-batches per epoch of the largest pool (for progress reporting; indices go on past it)."""
        return max(self.batches_per_epoch(name) for name in self.rows_per_batch)

    def _epoch(self, name: str, epoch: int) -> np.ndarray:
        """Row indices of every micro-batch of `epoch` of pool `name`: int64 [batches_per_epoch, rows]."""
        cache = self._cache[name]
        if epoch in cache:
            return cache[epoch]
        k, nb = self.rows_per_batch[name], self.batches_per_epoch(name)
        rng = seeded_rng(self.seed, name, epoch)
        perm = rng.permutation(len(self._items[name]))[:nb * k]
        if self.group_by_length:
            lengths, step = self._lengths[name], CHUNK_BATCHES * k
            chunks = [c[np.argsort(lengths[c], kind="stable")] for c in
                      (perm[s:s + step] for s in range(0, nb * k, step))]
            batches = np.concatenate(chunks).reshape(nb, k)[rng.permutation(nb)]
        else:
            batches = perm.reshape(nb, k)
        if len(cache) >= 2:  # a rank reads one epoch at a time; two cover a boundary
            cache.pop(min(cache))
        cache[epoch] = batches
        return batches

    def _indices(self, name: str, index: int) -> list[int]:
        nb = self.batches_per_epoch(name)
        return self._epoch(name, index // nb)[index % nb].tolist()

    def _rows(self, name: str, index: int) -> list:
        items = self._items[name]
        return [items[i] for i in self._indices(name, index)]

    def __call__(self, index: int) -> MicroBatch:
        if index < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {index}")
        if self.method != "repbend":
            side = self._items["retain_side"]
            drawn = self._indices("retain_side", index)
            return MicroBatch(safe=[side[i] for i in drawn if i < self._n_safe_side],
                              unsafe=self._rows("forget", index),
                              retain=[side[i] for i in drawn if i >= self._n_safe_side], n_pairs=0)
        rows = {name: self._rows(name, index) for name in self.rows_per_batch}
        safe, unsafe = rows.get("wgm_safe", []), rows.get("wgm_unsafe", [])
        pairs = rows.get("wj_pairs", [])
        if self.request_only:
            unsafe = unsafe + [request for request, _ in pairs]
            n_pairs = 0
        else:
            safe = safe + [refusal for refusal, _ in pairs]
            unsafe = unsafe + [harmful for _, harmful in pairs]
            n_pairs = len(pairs)
        return MicroBatch(safe=safe, unsafe=unsafe, retain=rows.get("retain", []), n_pairs=n_pairs)
