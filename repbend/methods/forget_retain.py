"""What Circuit Breakers, RMU and NPO share: two sets, forget and retain, each drawn as one pool of rows.

    forget       = the unsafe rows + the harmful side of each pair          -> B rows, all into `unsafe`
    retain side  = the safe rows + the refusal side of each pair + retain   -> B rows: the safe / refusal ones into
                                                                               `safe`, the retain ones into `retain`
n_pairs = 0 (the loss reads safe + retain as its retain set, so only B, not the split, is fixed).

Token sets (`ForgetRetainBatch`): `forget` = every token of the unsafe rows, `retain` = every token of the safe and
retain rows, each ascending; with the number of rows of each set and its longest row (the padded length a per-set
layout would have, which RMU's denominators count).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import TrainingError
from ..loss.batch import StepBatch, every_token, laid_apart, sequences, set_ranges, useful_tokens
from ..loss.layout import lay_out
from ..loss.types import MicroBatch
from ..roles import DataSpec, Draw
from .base import Method

FORGET = (("unsafe", None), ("pair", 1))
RETAIN_SIDE = (("safe", None), ("pair", 0), ("retain", None))


@dataclass
class ForgetRetainBatch(StepBatch):
    forget_rows: int = 0
    retain_rows: int = 0
    forget_longest: int = 0
    retain_longest: int = 0
    reference_rows: int = 0      # laid apart: the retain set's rows come first, and number this many


class ForgetRetain(Method):
    """Draws, assembly, data checks and token sets of the forget/retain methods (module docstring)."""

    def marked_up_spec(self, empty_request_p: float = 0.5) -> DataSpec:
        """Circuit Breakers' and RMU's rows: every assistant turn with the template's end-of-turn markup, an empty
        instruction drawn with p `empty_request_p` (data.empty_request_p) for every row but the harmful answers, the
        unsafe rows not capped, and every retain-side row cut as a whole at data.max_retain_tokens."""
        return DataSpec(response_markup=True, empty_request_p=empty_request_p, uncapped=("unsafe",),
                        whole_retain_side=True,
                        description=f"{self.NAME} rows (assistant turns with their end-of-turn markup)")

    def draws(self, pools, batch_size: int) -> dict[str, Draw]:
        return {"forget": Draw(FORGET, batch_size), "retain_side": Draw(RETAIN_SIDE, batch_size)}

    def assemble(self, drawn) -> MicroBatch:
        side = drawn["retain_side"]
        return MicroBatch(safe=[item for role, item in side if role != "retain"],
                          unsafe=[item for _, item in drawn["forget"]],
                          retain=[item for role, item in side if role == "retain"], n_pairs=0)

    def composition(self, pools, batch_size: int) -> str:
        return (f"batch_size {batch_size}: {batch_size} forget rows (unsafe + harmful answers) and {batch_size} "
                "retain-side rows (safe + refusals + retain, drawn from one pool)")

    def check_data(self, pools, describe) -> None:
        if not (pools.unsafe or pools.pair):
            raise TrainingError(f"{self.NAME} needs forget rows (WildGuardMix unsafe rows or WildJailbreak harmful "
                                f"answers) and there are none: {describe('unsafe')}; {describe('pair')}")
        if not (pools.safe or pools.pair or pools.retain):
            raise TrainingError(f"{self.NAME} needs retain rows (WildGuardMix safe rows, WildJailbreak refusals or "
                                f"UltraChat chats) and there are none: {describe('safe')}; {describe('pair')}; "
                                f"{describe('retain')}")

    @staticmethod
    def retain_side(pools) -> list:
        return list(pools.safe) + [refusal for refusal, _ in pools.pair] + list(pools.retain)

    def collate_sets(self, micro: MicroBatch, pad_id: int, pack_length: int | None,
                     apart: bool = False) -> ForgetRetainBatch:
        """The two sets' token sets. `apart`: the retain set laid out in the leading rows (a reference pass that
        reads only them runs on those rows alone)."""
        seqs = sequences(micro)
        safe, unsafe, retain = set_ranges(micro)
        forget, keep = list(unsafe), [*safe, *retain]
        if apart:
            rows, leading = laid_apart(seqs, keep, forget, pad_id, pack_length)
        else:
            rows, leading = lay_out(seqs, pad_id, pack_length), 0
        P = rows.placements
        return ForgetRetainBatch(
            rows, {"forget": every_token(rows, forget), "retain": every_token(rows, keep)},
            useful_tokens=useful_tokens(seqs), forget_rows=len(forget), retain_rows=len(keep),
            forget_longest=max((P[k].length for k in forget), default=0),
            retain_longest=max((P[k].length for k in keep), default=0), reference_rows=leading)
