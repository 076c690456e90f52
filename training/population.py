"""The training population a bundle's manifest records (`Manifest.population`), against which
the node's drift checks compare what each sender sends (cadnode/watch/drift.py): the input
attributes of the training images, and the held-out probabilities of the exported model.

A dataset folder's DICOM images are read for their headers (at most MAX_HEADERS, evenly
spread over the split; PNG and JPEG images have none and add nothing); phantoms carry what
the phantom generator writes, the same header for every film, so one is rendered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from pydicom import Dataset

from cadnode.infer.bundle import Population
from cadnode.infer.phantoms.chest import chest_dataset, make_chest_phantom
from cadnode.infer.profile import InputFacts, facts_of, population_of, read_facts
from training.records import Record

MAX_HEADERS = 500  # training images whose headers are read, at most


def chest_phantom_header(phantom_size: int) -> Callable[[], Dataset]:
    """What the chest phantom generator writes at this size (its pixels aside)."""

    def header() -> Dataset:
        phantom = make_chest_phantom(0, size=phantom_size)
        return chest_dataset(phantom, patient_id="PHANTOM", patient_name="Phantom^Chest")

    return header


def records_facts(records: Sequence[Record], phantom: Callable[[], Dataset]) -> list[InputFacts]:
    """The attributes of the records' images: each phantom counts as the generator's header
    (rendered once), each DICOM image (of at most MAX_HEADERS, spread) as its own."""
    phantoms = sum(record.image is None for record in records)
    facts = [facts_of(phantom())] * phantoms if phantoms else []
    files = [r.image for r in records if r.image is not None and r.image.suffix.lower() == ".dcm"]
    if files:
        chosen = np.linspace(0, len(files) - 1, min(len(files), MAX_HEADERS)).round().astype(int)
        read = (read_facts(files[i]) for i in sorted(set(chosen.tolist())))
        facts.extend(fact for fact in read if fact is not None)
    return facts


def ruleout_population(
    train: Sequence[Record],
    test_scores: np.ndarray,
    thresholds: Sequence[float],
    phantom_size: int,
) -> Population | None:
    """The rule-out bundle's population: its training films' attributes and its held-out
    test probabilities, positive at its lowest operating point. None when the training
    images have no header to read (PNG datasets)."""
    facts = records_facts(train, chest_phantom_header(phantom_size))
    if not facts or test_scores.size == 0:
        return None
    return population_of(facts, test_scores.tolist(), min(thresholds, default=0.5))
