"""MicroBatchSampler on synthetic pools: determinism, purity, composition, pair alignment, epochs, padding."""
import numpy as np
import pytest

from repbend.data import DataReport, Limits, MicroBatchSampler, Pools, Sequence
from repbend.data.examples import DataSpec
from repbend.loss import LossConfig

REQUEST_ONLY = LossConfig(mode="request_all")


def seq(tag, i, length, request_len):
    # ids: (tag, i, filler...) so every row is recognisable; a pair shares its request ids
    return Sequence(tuple([tag, i] + [7] * (length - 2)), request_len, f"{tag}:{i}")


def pair(i, request_len, refusal_len, harmful_len):
    request = [3, i] + [5] * (request_len - 2)
    return (Sequence(tuple(request + [1] * refusal_len), request_len, f"wj:{i}"),
            Sequence(tuple(request + [2] * harmful_len), request_len, f"wj:{i}"))


def make_pools(n_safe=20, n_unsafe=14, n_pairs=12, n_retain=9, request_only=False, seed=0):
    rng = np.random.default_rng(seed)
    lens = lambda: int(rng.integers(4, 60))  # noqa: E731
    if request_only:
        wj = [(r, r) for r in (Sequence((3, i) + (5,) * lens(), 0, f"wj:{i}") for i in range(n_pairs))]
        wj = [(Sequence(r.input_ids, len(r), r.origin),) * 2 for r, _ in wj]
        mk = lambda tag, i: (lambda n: Sequence(seq(tag, i, n, 0).input_ids, n, f"{tag}:{i}"))(lens())  # noqa: E731
    else:
        wj = [pair(i, lens(), lens(), lens()) for i in range(n_pairs)]
        mk = lambda tag, i: (lambda n: seq(tag, i, n + 2, n))(lens())  # noqa: E731
    spec = DataSpec(request_only=True, description="request-only (requests with the generation prompt)") \
        if request_only else DataSpec()
    return Pools(safe=[mk(1, i) for i in range(n_safe)], unsafe=[mk(2, i) for i in range(n_unsafe)],
                 pair=wj, retain=[seq(4, i, lens(), 0) for i in range(n_retain)],
                 report=DataReport(spec, Limits().to_dict(), None, 0), spec=spec)


def key(batch):
    return ([s.origin for s in batch.safe], [s.origin for s in batch.unsafe], [s.origin for s in batch.retain],
            batch.n_pairs)


@pytest.mark.parametrize("group", [True, False])
def test_deterministic_and_pure(group):
    pools = make_pools()
    a, b = MicroBatchSampler(pools, 2, seed=3, group_by_length=group), MicroBatchSampler(pools, 2, seed=3, group_by_length=group)
    assert [key(a(i)) for i in range(40)] == [key(b(i)) for i in range(40)]
    c = MicroBatchSampler(pools, 2, seed=3, group_by_length=group)
    c(5)
    assert key(c(2)) == key(MicroBatchSampler(pools, 2, seed=3, group_by_length=group)(2))
    # a far jump (resume) is cheap and equals the same index reached by another instance
    assert key(MicroBatchSampler(pools, 2, seed=3, group_by_length=group)(1_000_003)) == key(a(1_000_003))
    other = MicroBatchSampler(pools, 2, seed=4, group_by_length=group)
    assert [key(a(i)) for i in range(10)] != [key(other(i)) for i in range(10)]


def test_composition_with_all_sources_and_pair_alignment():
    pools, B = make_pools(), 3
    s = MicroBatchSampler(pools, B, seed=0)
    assert s.rows_per_batch == {"safe": B, "unsafe": B, "pair": B, "retain": B}
    for i in range(12):
        mb = s(i)
        assert (len(mb.safe), len(mb.unsafe), len(mb.retain), mb.n_pairs) == (2 * B, 2 * B, B, B)
        assert all(x.origin.startswith("1:") for x in mb.safe[:B]) and all(x.origin.startswith("2:") for x in mb.unsafe[:B])
        for refusal, harmful in zip(mb.safe[B:], mb.unsafe[B:]):
            assert refusal.origin == harmful.origin and refusal.origin.startswith("wj:")
            assert refusal.input_ids[:refusal.request_len] == harmful.input_ids[:harmful.request_len]
            assert set(refusal.input_ids[refusal.request_len:]) == {1} and set(harmful.input_ids[harmful.request_len:]) == {2}
        assert all(x.origin.startswith("4:") for x in mb.retain)


def test_composition_without_some_sources():
    B = 2
    no_wj = make_pools(n_pairs=0)
    mb = MicroBatchSampler(no_wj, B, seed=0)(0)
    assert (len(mb.safe), len(mb.unsafe), mb.n_pairs) == (2 * B, 2 * B, 0)
    no_wgm = make_pools(n_safe=0, n_unsafe=0)
    mb = MicroBatchSampler(no_wgm, B, seed=0)(0)
    assert (len(mb.safe), len(mb.unsafe), mb.n_pairs) == (B, B, B)
    assert [x.origin for x in mb.safe] == [x.origin for x in mb.unsafe]
    no_retain = make_pools(n_retain=0)
    assert MicroBatchSampler(no_retain, B, seed=0)(0).retain == []


def test_request_only_composition():
    # as the reference: B unharmful requests on the safe side (not 2B), B harmful + B WildJailbreak requests unsafe
    B, pools = 2, make_pools(request_only=True)
    mb = MicroBatchSampler(pools, B, seed=0, method=REQUEST_ONLY)(0)
    assert mb.n_pairs == 0 and len(mb.safe) == B and len(mb.unsafe) == 2 * B
    assert all(x.origin.startswith("1:") for x in mb.safe)
    assert [x.origin[:2] for x in mb.unsafe] == ["2:"] * B + ["wj"] * B
    assert all(x.request_len == len(x) for x in mb.safe + mb.unsafe)
    no_wj = make_pools(n_pairs=0, request_only=True)
    assert [x.origin[:2] for x in MicroBatchSampler(no_wj, B, seed=0, method=REQUEST_ONLY)(0).unsafe] == ["2:"] * 2 * B
    with pytest.raises(ValueError, match="request-only modes need WildGuardMix"):
        MicroBatchSampler(make_pools(n_safe=0, n_unsafe=0, request_only=True), B, seed=0, method=REQUEST_ONLY)
    with pytest.raises(ValueError, match="rendered as .*request_only=True.* but method repbend reads"):
        MicroBatchSampler(pools, B, seed=0)


def test_too_small_pool_is_an_error():
    with pytest.raises(ValueError, match=r"unsafe rows: 3, but one micro-batch of batch_size 4 needs 4 "
                                         r"\(batch_size 4: 8 safe, 8 unsafe, 4 retain rows"):
        MicroBatchSampler(make_pools(n_unsafe=3), 4, seed=0)
    with pytest.raises(ValueError, match=r"unsafe rows: 0"):
        MicroBatchSampler(make_pools(n_unsafe=0), 1, seed=0)
    with pytest.raises(ValueError, match="no safe/unsafe data"):
        MicroBatchSampler(make_pools(n_safe=0, n_unsafe=0, n_pairs=0), 1, seed=0)


def test_epochs_cycle_independently():
    pools, B = make_pools(n_safe=10, n_unsafe=7, n_pairs=12, n_retain=9), 2
    s = MicroBatchSampler(pools, B, seed=1)
    assert s.batches_per_epoch("safe") == 5 and s.batches_per_epoch("unsafe") == 3 and len(s) == 6
    epochs = [[x.origin for i in range(5 * e, 5 * e + 5) for x in s(i).safe[:B]] for e in range(4)]
    for e in epochs:  # every row exactly once per epoch of its pool
        assert sorted(e) == sorted(x.origin for x in pools.safe)
    assert len({tuple(e) for e in epochs}) > 1  # a new permutation each epoch
    unsafe = [x.origin for i in range(3) for x in s(i).unsafe[:B]]  # 7 rows, 3 batches: one row dropped per epoch
    assert len(set(unsafe)) == 6


def _padding(sampler, name, n_batches):
    total = 0
    for i in range(n_batches):
        rows = [item for _, item in sampler.drawn(i)[name]]
        lengths = [len(r) for r in rows]
        total += max(lengths) * len(lengths) - sum(lengths)
    return total


def test_length_grouping_reduces_padding():
    rng = np.random.default_rng(0)
    n, B = 4096, 4
    safe = [seq(1, i, int(rng.integers(8, 1000)), 4) for i in range(n)]
    pools = Pools(safe, [seq(2, i, 10, 4) for i in range(2 * B)], [], [], DataReport(DataSpec(), {}, None, 0))
    grouped = MicroBatchSampler(pools, B, seed=0, group_by_length=True)
    plain = MicroBatchSampler(pools, B, seed=0, group_by_length=False)
    nb = grouped.batches_per_epoch("safe")
    assert nb == n // (2 * B)
    assert _padding(grouped, "safe", nb) < 0.2 * _padding(plain, "safe", nb)
    # still one pass over the pool per epoch, and the batch order is not sorted by length
    rows = [r.origin for i in range(nb) for r in grouped(i).safe]
    assert sorted(rows) == sorted(r.origin for r in safe)
    maxima = [max(len(r) for r in grouped(i).safe) for i in range(nb)]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
