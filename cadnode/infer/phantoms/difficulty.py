"""How hard the phantoms' findings are to see: one knob for the chest and breast generators.

Every field scales what the generators drew before the knob existed, so `EASY` (all 1, no
confounders) is that look exactly, pixel for pixel: the node's tests, `cadnode demo` and the
benchmarks keep their phantoms, whose findings any working engine finds. The training configs
name `default` (or `hard`) so that the shipped demo engines are judged on findings some of
which are faint, small, noisy or beside look-alikes, and their operating points mean something.

What each knob does:
- contrast: the lesion's amplitude times a factor drawn per lesion from this range (chest
  opacities, how far a pneumothorax darkens and the brightness of its pleural line; DBT
  masses). A range, not one value, so each set holds obvious and barely visible lesions.
- size: lesion radii times this (opacities, the pneumothorax's width, masses).
- noise: the quantum noise's standard deviation times this.
- confounders: the mean number of normal structures that look like lesions per film or volume
  (Poisson): chest vessels seen end on (small round densities) and skin folds (a line like a
  pleural edge); in the breast, dense glandular blobs and calcification-like dots.

The draws a knob adds come from generators of their own, so the seed's film is the same film at
every difficulty, only its findings fainter and its look-alikes added.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Annotated

import numpy as np
from pydantic import PlainSerializer, PlainValidator


@dataclass(frozen=True)
class Difficulty:
    contrast: tuple[float, float] = (1.0, 1.0)
    size: float = 1.0
    noise: float = 1.0
    confounders: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.contrast
        if not 0 < low <= high:
            raise ValueError(f"difficulty contrast must be 0 < low <= high, not {self.contrast}")
        if self.size <= 0 or self.noise < 0 or self.confounders < 0:
            raise ValueError(
                "difficulty needs size > 0, noise >= 0 and confounders >= 0 "
                f"(size {self.size}, noise {self.noise}, confounders {self.confounders})"
            )

    def contrast_factor(self, rng: np.random.Generator) -> float:
        """One lesion's contrast multiplier; exactly `low` when the range is one value."""
        return float(rng.uniform(*self.contrast))

    def confounder_count(self, rng: np.random.Generator) -> int:
        return int(rng.poisson(self.confounders)) if self.confounders > 0 else 0

    def describe(self) -> str:
        """One line for a model card or a log: the preset's name and what it sets."""
        low, high = self.contrast
        settings = (
            f"lesion contrast x{low:g}-{high:g}, size x{self.size:g}, noise x{self.noise:g}, "
            f"{self.confounders:g} look-alikes per image"
        )
        name = preset_name(self)
        return f"`{name}` ({settings})" if name else settings


EASY = Difficulty()
PRESETS: dict[str, Difficulty] = {
    "easy": EASY,
    # Chosen so that the shipped cxr-ruleout config's test AUC lands near 0.9 (its card).
    "default": Difficulty(contrast=(0.4, 0.9), size=0.85, noise=1.5, confounders=3.0),
    "hard": Difficulty(contrast=(0.08, 0.45), size=0.65, noise=3.0, confounders=4.0),
}
FIELDS = tuple(f.name for f in fields(Difficulty))


def preset_name(difficulty: Difficulty) -> str | None:
    return next((name for name, preset in PRESETS.items() if preset == difficulty), None)


def resolve_difficulty(value: object) -> Difficulty:
    """A preset's name, a mapping of Difficulty's fields (a config's `difficulty:`), or a
    Difficulty; anything else is refused with what is accepted."""
    if isinstance(value, Difficulty):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            raise ValueError(f"unknown difficulty {value!r}: one of {', '.join(PRESETS)}")
        return PRESETS[value]
    if isinstance(value, Mapping):
        unknown = set(value) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown difficulty field(s) {sorted(unknown)}: {', '.join(FIELDS)}")
        return _from_fields(value)
    raise ValueError(f"difficulty must be one of {', '.join(PRESETS)} or a mapping of {FIELDS}")


def difficulty_json(difficulty: Difficulty) -> str | dict[str, object]:
    """How a config shows it: the preset's name, else its fields."""
    return preset_name(difficulty) or {
        k: list(v) if isinstance(v, tuple) else v for k, v in asdict(difficulty).items()
    }


def _from_fields(value: Mapping[str, object]) -> Difficulty:
    """A Difficulty of the fields given, EASY's for the others."""
    try:
        return Difficulty(
            contrast=_pair(value.get("contrast", EASY.contrast)),
            size=float(value.get("size", EASY.size)),  # type: ignore[arg-type]
            noise=float(value.get("noise", EASY.noise)),  # type: ignore[arg-type]
            confounders=float(value.get("confounders", EASY.confounders)),  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"difficulty {dict(value)}: {error}") from error


def _pair(value: object) -> tuple[float, float]:
    """`contrast`: one number (no spread) or [low, high]."""
    if isinstance(value, int | float):
        return float(value), float(value)
    if isinstance(value, list | tuple) and len(value) == 2:
        return float(value[0]), float(value[1])
    raise ValueError(f"difficulty contrast must be a number or [low, high], not {value!r}")


# A config field (pydantic): `difficulty: default`, or a mapping of the fields; shown back as
# the preset's name where it is one. Absent, a config keeps the phantoms' original look.
DifficultySetting = Annotated[
    Difficulty, PlainValidator(resolve_difficulty), PlainSerializer(difficulty_json)
]
