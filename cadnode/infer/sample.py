"""Built-in sample studies for `cadnode engines verify`: no patient data, nothing to download.

They come from the same phantom generators the demo engines were trained on
(cadnode/infer/phantoms/: numpy and pydicom only), so a verify run feeds an engine the kind
of DICOM object the daemon will: a Digital X-Ray chest film for CR/DX engines, an enhanced
multi-frame Breast Tomosynthesis Image for MG engines.
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.uid import BreastTomosynthesisImageStorage

from cadnode.infer.bundle import Manifest
from cadnode.infer.phantoms.breast import make_breast_phantom, tomosynthesis_dataset
from cadnode.infer.phantoms.chest import chest_dataset, make_chest_phantom

SEED = 20260101  # fixed: the same samples on every run
CHEST_MODALITIES = ("DX", "CR")


class NoSample(Exception):
    """No built-in sample fits the engine's declared inputs."""


def sample_images(manifest: Manifest) -> list[Dataset]:
    """Images an engine accepts, by its manifest's inputs: two chest films (a normal one and
    one with an opacity and a pneumothorax: a batch of two) or one small DBT volume."""
    inputs = manifest.inputs
    if BreastTomosynthesisImageStorage in inputs.sop_classes or "MG" in inputs.modalities:
        phantom = make_breast_phantom(SEED, slices=8, size=128, view="LCC", masses=1)
        return [tomosynthesis_dataset(phantom, patient_id="SAMPLE-DBT", seed=SEED)]
    # The sample is a Digital X-Ray object: DX where the engine takes it, else CR.
    modality = next((m for m in CHEST_MODALITIES if m in inputs.modalities), None)
    if modality is None:
        raise NoSample(f"no built-in sample for modalities {', '.join(inputs.modalities)}")
    view = inputs.views[0] if inputs.views else "PA"
    return [
        chest_dataset(
            make_chest_phantom(SEED + index, size=256, opacity=abnormal, pneumothorax=abnormal),
            patient_id="SAMPLE-CXR",
            patient_name="Sample^Chest",
            seed=SEED + index,
            view=view,
            modality=modality,
        )
        for index, abnormal in enumerate((False, True))
    ]
