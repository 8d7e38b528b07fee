"""The inputs of a loss: tokenized `Sequence`s grouped into the sets of one `MicroBatch`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sequence:
    """One tokenized row.

    input_ids: the token ids, unpadded; tokens [0, request_len) are the request including the chat template's
        generation prompt, tokens [request_len, len) the response (none in the request-only loss modes).
        Retain conversations have request_len = 0: every token is a retain token.
    origin: where the row came from ("file:line", "file:row i"), for reports and errors.
    """

    input_ids: tuple[int, ...]
    request_len: int
    origin: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.request_len


@dataclass
class MicroBatch:
    """The rows of one micro-step, by set.

    RepBend: safe = WildGuardMix safe rows, then the WildJailbreak refusals; unsafe = WildGuardMix unsafe rows, then
    the same WildJailbreak requests with their harmful answers (the last `n_pairs` rows of safe and of unsafe are
    the aligned pairs); retain = UltraChat conversations.
    Circuit Breakers and RMU: unsafe = the forget rows; safe + retain (in that order) = the retain rows; n_pairs = 0.
    """

    safe: list[Sequence]
    unsafe: list[Sequence]
    retain: list[Sequence]
    n_pairs: int = 0

    def __post_init__(self):
        if not 0 <= self.n_pairs <= min(len(self.safe), len(self.unsafe)):
            raise ValueError(f"MicroBatch: n_pairs = {self.n_pairs} but there are {len(self.safe)} safe and "
                             f"{len(self.unsafe)} unsafe rows")
        for name in ("safe", "unsafe", "retain"):
            for i, s in enumerate(getattr(self, name)):
                if not isinstance(s, Sequence):
                    raise TypeError(f"MicroBatch.{name}[{i}] is a {type(s).__name__}, not a Sequence")
                if len(s) and min(s.input_ids) < 0:
                    raise ValueError(f"MicroBatch.{name}[{i}] ({s.origin or 'no origin'}): input_ids holds the negative "
                                     f"id {min(s.input_ids)}")
                if len(s) == 0 or not 0 <= s.request_len <= len(s):
                    raise ValueError(f"MicroBatch.{name}[{i}] ({s.origin or 'no origin'}): {len(s)} tokens with "
                                     f"request_len {s.request_len}")
