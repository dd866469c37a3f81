"""The identity of one unit of a grid: sweep variant × model × training size × seed, and its id."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    label: str
    samples: int
    index: int  # position of the model in [[models]]
    seed: int = 42
    variant: str = ""  # the sweep variant's name; "" without [sweep]
    tag_seed: bool = False  # several seeds: the id names the seed

    @property
    def id(self) -> str:
        """`A-300`, `A-300-s43` with several seeds, `lr-0.1-A-300` in a sweep. A single-seed run keeps
        the plain id, so run directories written before seeds existed still resume."""
        base = f"{self.variant}-{self.label}-{self.samples}" if self.variant else f"{self.label}-{self.samples}"
        return f"{base}-s{self.seed}" if self.tag_seed else base

    @property
    def key(self) -> tuple[str, str, int, int]:
        return self.variant, self.label, self.samples, self.seed
