"""Deterministic, resumable micro-batch composition.

`MicroBatchSampler(pools, B, seed, method)(index)` is a pure function of (pools, seed, index): resuming means
remembering the next index, and distributed ranks simply take different indices (e.g. step * world + rank).

What a micro-batch holds is the method's (`method.draws(pools, B)` and `method.assemble(drawn)`, in each method's
module): a draw names the roles it takes rows from, in order (a pair's refusal or harmful side may be taken alone),
and how many rows it takes per micro-batch; `assemble` turns the rows drawn (each with its role) into a
`MicroBatch`. A draw whose rows are fewer than one micro-batch needs is an error at construction.

Order: every draw cycles through its own epochs. Draw d, epoch e: a permutation seeded from (seed, d, e), the tail
that does not fill a micro-batch dropped. With group_by_length, the permutation is cut into chunks of
CHUNK_BATCHES micro-batches, each chunk sorted by length and cut into micro-batches, and the order of all
micro-batches of the epoch then shuffled (same seed): rows of similar length share a micro-batch (less padding)
while the order stays random. One or two epochs per draw are cached, so any index is cheap, including a far jump on
resume.
"""
from __future__ import annotations

import zlib

import numpy as np

from repbend.loss.types import MicroBatch
from repbend.roles import Draw  # noqa: F401  (re-exported)

CHUNK_BATCHES = 64


def seeded_rng(seed: int, *keys) -> np.random.Generator:
    """A numpy Generator seeded from `seed` and `keys` (strings hashed with crc32, ints as they are):
    stable across processes and Python versions (unlike hash())."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    entropy = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(entropy)


class MicroBatchSampler:
    """See the module docstring. `method`: the method whose micro-batches to draw (a `repbend.methods.Method`, or
    a `RepBendLoss` / `LossConfig`, whose method is taken). `rows_per_batch` maps each draw to its rows."""

    def __init__(self, pools, batch_size: int, seed: int, method=None, group_by_length: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        method = _as_method(method)
        want = method.data_spec(pools.spec.empty_request_p)
        if want != pools.spec:
            raise ValueError(f"the pools were rendered as {pools.spec} but method {method.NAME} reads {want}; build "
                             "them with the method's data_spec()")
        self.pools, self.batch_size, self.seed, self.method = pools, batch_size, seed, method
        self.group_by_length = group_by_length
        self.draws: dict[str, Draw] = method.draws(pools, batch_size)
        self._items = {name: [(role, item if part is None else item[part]) for role, part in d.sources
                              for item in pools.role(role)] for name, d in self.draws.items()}
        self.rows_per_batch = {name: d.rows for name, d in self.draws.items()}
        for name, d in self.draws.items():
            have = len(self._items[name])
            if have < d.rows:
                raise ValueError(f"{d.describe()} rows: {have}, but one micro-batch of batch_size {batch_size} needs "
                                 f"{d.rows} ({method.composition(pools, batch_size)})")
        self._lengths = {name: np.array([self._length(x) for _, x in self._items[name]], dtype=np.int64)
                         for name in self.draws}
        self._cache: dict[str, dict[int, np.ndarray]] = {name: {} for name in self.draws}

    @staticmethod
    def _length(item) -> int:
        return max(len(item[0]), len(item[1])) if isinstance(item, tuple) else len(item)

    def batches_per_epoch(self, name: str) -> int:
        return len(self._items[name]) // self.rows_per_batch[name]

    def __len__(self) -> int:
        """Micro-batches per epoch of the largest draw (for progress reporting; indices go on past it)."""
        return max(self.batches_per_epoch(name) for name in self.draws)

    def _epoch(self, name: str, epoch: int) -> np.ndarray:
        """Row indices of every micro-batch of `epoch` of draw `name`: int64 [batches_per_epoch, rows]."""
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

    def drawn(self, index: int) -> dict[str, list[tuple[str, object]]]:
        """The rows of micro-batch `index`, per draw, each with its role."""
        if index < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {index}")
        return {name: [self._items[name][i] for i in self._indices(name, index)] for name in self.draws}

    def __call__(self, index: int) -> MicroBatch:
        return self.method.assemble(self.drawn(index))


def _as_method(method):
    if method is None:
        from repbend.loss import RepBendLoss
        return RepBendLoss().method
    if hasattr(method, "draws") and hasattr(method, "assemble"):
        return method
    if hasattr(method, "method") and hasattr(method.method, "draws"):  # a RepBendLoss
        return method.method
    from repbend.loss import LossConfig, RepBendLoss
    if isinstance(method, LossConfig):
        return RepBendLoss(method).method
    raise TypeError(f"MicroBatchSampler: method must be a repbend Method, RepBendLoss or LossConfig, got "
                    f"{type(method).__name__}")
