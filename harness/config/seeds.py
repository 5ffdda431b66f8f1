"""A matrix's `seeds:`: a list of distinct seeds, or adaptive `{min, max, step}` (README, "Adaptive seeds")."""

from __future__ import annotations

from typing import Annotated

from pydantic import Discriminator, Field, Tag, model_validator

from harness.config.run import SEED_MAX, Frozen

Seed = Annotated[int, Field(strict=True, ge=0, le=SEED_MAX)]


class AdaptiveSeeds(Frozen):
    """`seeds: {min: 3, max: 12}`: every cell runs `min` seeds; after each round the sweep adds `step`
    seeds to the cells still Inconclusive (and to their baseline cell, so pairing holds), until every
    cell is decided or has `max`. Each round is a look at the data: the error rate is kept over the
    looks by testing each at confidence 1 - (1 - criteria.confidence) / looks (README, "Adaptive seeds")."""

    min: int = Field(ge=2, description="seeds every cell runs before its first verdict")
    max: int = Field(ge=2, description="seeds a cell may reach; a cell still Inconclusive then stays so")
    step: int | None = Field(None, ge=1, description="seeds added per round (default: min); the looks are at min, "
                             "min + step, ... and max")
    first: int = Field(0, ge=0, le=SEED_MAX, description="the seeds are first, first + 1, ..., first + max - 1")

    @model_validator(mode="after")
    def _ordered(self):
        if self.max < self.min:
            raise ValueError(f"max {self.max} is less than min {self.min}")
        if self.first + self.max - 1 > SEED_MAX:
            raise ValueError(f"first + max - 1 = {self.first + self.max - 1} is over the largest seed {SEED_MAX}")
        return self

    @property
    def seeds(self) -> list[int]:
        """Every seed a cell may run, in the order rounds add them."""
        return list(range(self.first, self.first + self.max))

    @property
    def looks(self) -> list[int]:
        """Seeds per cell at each look: min, min + step, ..., max."""
        return [*range(self.min, self.max, self.step or self.min), self.max]


# a list of seeds, or adaptive {min, max}; tagged so an error names `seeds.min`, not every member of the union
Seeds = Annotated[Annotated[list[Seed], Tag("list")] | Annotated[AdaptiveSeeds, Tag("adaptive")],
                  Discriminator(lambda v: "adaptive" if isinstance(v, (dict, AdaptiveSeeds)) else "list")]
