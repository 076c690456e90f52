"""Phantoms as real DICOM with labels in the public datasets' formats, and the loaders of
those formats, each on a small fixture written here in exactly that format."""

from __future__ import annotations

import csv
from copy import deepcopy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.phantoms.breast import (
    make_breast_phantom,
    plan_volumes,
    render_volume,
    tomosynthesis_dataset,
)
from cadnode.infer.phantoms.chest import chest_dataset, make_chest_phantom
from cadnode.infer.preprocess import frame_window, frames_to_tensor, image_to_tensor
from tests.dicom_validation import dciodvfy_errors, dciodvfy_output, require_tool
from training import datasets
from training.cli import main
from training.froc import Prediction, froc
from training.phantom_sets import store_pixels


@pytest.fixture(scope="module")
def dbt_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dbt")
    argv = ["phantoms", "--kind", "dbt", "--count", "8", "--out", str(out), "--seed", "11"]
    assert main([*argv, "--positive-fraction", "0.5", "--slices", "12", "--size", "96"]) == 0
    return out


def test_dbt_phantoms_are_valid_breast_tomosynthesis(dbt_set: Path) -> None:
    require_tool("dciodvfy")
    files = sorted(dbt_set.glob("dbt-*.dcm"))
    assert len(files) == 8
    for path in files[:2]:
        errors = dciodvfy_errors(path)
        assert errors == [], errors
        _, lines = dciodvfy_output(path)
        assert not any("Warning" in line for line in lines), lines
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.BreastTomosynthesisImageStorage
    assert ds.pixel_array.shape == (12, 96, 96) and int(ds.NumberOfFrames) == 12
    assert frame_window(ds, 5) == (2000.0, 4000.0)  # from the shared Frame VOI LUT group
    views = {pydicom.dcmread(path).ViewCodeSequence[0].CodeMeaning for path in files}
    assert views == {"cranio-caudal", "medio-lateral oblique"}


def test_dbt_labels_in_duke_formats_match_the_volumes(dbt_set: Path) -> None:
    boxes = datasets.read_duke_boxes(dbt_set / datasets.DUKE_BOXES)
    paths = datasets.read_duke_paths(dbt_set / datasets.DUKE_PATHS, dbt_set)
    labels = datasets.read_duke_labels(dbt_set / datasets.DUKE_LABELS)
    assert len(paths) == len(labels) == 8 and boxes
    assert {box.volume for box in boxes} <= set(paths)
    assert sum(group != "normal" for group in labels.values()) == 4  # positive fraction 0.5
    with (dbt_set / datasets.DUKE_BOXES).open(newline="") as handle:
        header = next(csv.reader(handle))
    assert header == list(datasets.DUKE_BOX_HEADER)
    for box in boxes:
        volume = datasets.read_duke_volume(paths[box.volume], box.view)
        assert volume.shape[0] == box.volume_slices == 12
        assert box.view[0] == datasets.image_laterality(volume[0]).lower()  # no flip needed
        inside = volume[
            box.slice, int(box.y) : int(box.y + box.height), int(box.x) : int(box.x + box.width)
        ]
        around = volume[box.slice][volume[box.slice] > 0.05]
        assert inside.mean() > around.mean()  # the mass is denser than the breast around it


STUDY_LEVEL = ("PatientID", "AccessionNumber", "StudyDate", "StudyTime", "StudyID")


def test_dbt_volumes_of_one_study_share_its_study_attributes(dbt_set: Path) -> None:
    """A study-level C-FIND, the worklist and the SR read these from whichever volume they
    hold: the four views of a study must agree on them, and two studies must not."""
    studies: dict[str, set[tuple[str, ...]]] = {}
    for path in sorted(dbt_set.glob("dbt-*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        studies.setdefault(ds.StudyInstanceUID, set()).add(
            tuple(str(ds.get(keyword, "")) for keyword in STUDY_LEVEL)
        )
    assert len(studies) == 2  # 8 volumes, 4 views per study
    assert all(len(values) == 1 for values in studies.values()), studies
    (first,), (second,) = studies.values()
    assert first[1] != second[1] and first[3] != second[3]  # accession, study time


def test_dbt_study_attributes_are_deterministic_for_a_seed() -> None:
    cases = plan_volumes(range(11, 15), 0.5)
    first = [render_volume(case, slices=8, size=48)[0] for case in cases]
    again = [render_volume(case, slices=8, size=48)[0] for case in cases]
    for ds, same in zip(first, again, strict=True):
        assert ds.SOPInstanceUID == same.SOPInstanceUID
        assert [ds.get(k) for k in STUDY_LEVEL] == [same.get(k) for k in STUDY_LEVEL]
    assert len({ds.SeriesInstanceUID for ds in first}) == 4  # one series per view


def test_dbt_phantom_masses_span_a_few_slices() -> None:
    phantom = make_breast_phantom(3, slices=16, size=128, view="RMLO", masses=1)
    (mass,) = phantom.masses
    cx, cy = (round(c) for c in mass.centre)
    profile = phantom.volume[:, cy, cx].astype(float)
    assert int(np.argmax(profile)) == pytest.approx(mass.slice, abs=1)
    assert profile[mass.slice] > profile[0] and profile[mass.slice] > profile[-1]
    assert phantom.volume[:, :, -1].sum() > phantom.volume[:, :, 0].sum()  # right: wall on right
    again = make_breast_phantom(3, slices=16, size=128, view="RMLO", masses=1)
    assert np.array_equal(again.volume, phantom.volume)  # deterministic for a seed


def test_frames_to_tensor_windows_each_frame() -> None:
    phantom = make_breast_phantom(5, slices=4, size=64, view="LCC")
    ds = tomosynthesis_dataset(phantom, patient_id="P")
    window = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    window.WindowCenter, window.WindowWidth = 1000, 1000  # 500..1500 -> 0..1
    ds.PerFrameFunctionalGroupsSequence[2].FrameVOILUTSequence = [pydicom.Dataset()]
    ds.PerFrameFunctionalGroupsSequence[2].FrameVOILUTSequence[0].WindowCenter = 3000
    ds.PerFrameFunctionalGroupsSequence[2].FrameVOILUTSequence[0].WindowWidth = 2000
    tensors, geometry = frames_to_tensor(ds, 32, limit=DEFAULT_LIMIT)
    assert tensors.shape == (4, 1, 32, 32) and geometry.scale == 0.5
    assert geometry.pixel_spacing_mm == (0.5, 0.5)
    expected = np.clip((phantom.volume[0].astype(np.float32) - 500) / 1000, 0, 1)
    assert tensors[0, 0].mean() == pytest.approx(expected.mean(), abs=0.02)
    assert tensors[2].mean() < tensors[1].mean()  # frame 2's own window (2000..4000) is darker


def test_chest_phantoms_write_rsna_siim_and_montgomery_labels(tmp_path: Path) -> None:
    out = tmp_path / "cxr"
    argv = ["phantoms", "--kind", "cxr", "--count", "6", "--out", str(out), "--seed", "40"]
    assert main([*argv, "--size", "128"]) == 0
    rsna = datasets.read_rsna(out / datasets.RSNA_LABELS, out, out / datasets.RSNA_CLASSES)
    siim = {film.path.name: film for film in datasets.read_siim(out / datasets.SIIM_LABELS, out)}
    lungs = {film.name: film for film in _montgomery_with_images(out)}
    with (out / "labels.csv").open(newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    for film in rsna:
        row = rows[film.path.name]
        phantom = make_chest_phantom(
            int(pydicom.dcmread(film.path).PatientID[-8:]),
            size=128,
            opacity=row["opacity"] == "1",
            pneumothorax=row["pneumothorax"] == "1",
        )
        assert film.target == int(row["opacity"]) and len(film.boxes) == len(phantom.opacity_boxes)
        assert np.array_equal(siim[film.path.name].mask(), phantom.pneumothorax_mask)
        assert siim[film.path.name].positive == (row["pneumothorax"] == "1")
        left, right = lungs[film.path.stem].masks()
        assert np.array_equal(left, phantom.left_lung_mask)
        assert np.array_equal(right, phantom.right_lung_mask)
        assert left[:, 96].any() and not left[:, 32].any()  # patient's left: image right


def _montgomery_with_images(root: Path) -> list[datasets.LungMaskFilm]:
    """The phantom set has DICOM films; Montgomery pairs masks with CXR_png images."""
    for path in root.glob("*.dcm"):
        (root / "CXR_png").mkdir(exist_ok=True)
        Image.new("L", (128, 128)).save(root / "CXR_png" / f"{path.stem}.png")
    return datasets.read_montgomery(root)


# --- loaders on fixtures written here in the datasets' own formats ----------------------------


def _film(path: Path, seed: int, **findings: bool) -> pydicom.Dataset:
    phantom = make_chest_phantom(seed, size=64, **findings)
    ds = chest_dataset(phantom, patient_id=path.stem, patient_name="Fixture", seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_rsna_loader(tmp_path: Path) -> None:
    for name, seed in (("0004cfab", 1), ("00436515", 2)):
        _film(tmp_path / "stage_2_train_images" / f"{name}-14fd.dcm", seed)
    (tmp_path / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\n"
        "0004cfab-14fd,,,,,0\n"
        "00436515-14fd,264.0,152.0,213.0,379.0,1\n"
        "00436515-14fd,562.0,152.0,256.0,453.0,1\n",
        encoding="utf-8",
    )
    (tmp_path / "stage_2_detailed_class_info.csv").write_text(
        "patientId,class\n0004cfab-14fd,No Lung Opacity / Not Normal\n00436515-14fd,Lung Opacity\n",
        encoding="utf-8",
    )
    films = datasets.read_rsna(
        tmp_path / "stage_2_train_labels.csv",
        tmp_path / "stage_2_train_images",
        tmp_path / "stage_2_detailed_class_info.csv",
    )
    by_id = {film.patient_id: film for film in films}
    assert by_id["0004cfab-14fd"].target == 0 and by_id["0004cfab-14fd"].boxes == ()
    assert by_id["00436515-14fd"].boxes == ((264, 152, 213, 379), (562, 152, 256, 453))
    assert by_id["00436515-14fd"].kind == "Lung Opacity"
    assert all(film.path.exists() for film in films)


def test_siim_loader(tmp_path: Path) -> None:
    """The stage-1 header (' EncodedPixels'), '-1' for empty, two rows for two regions."""
    first = _film(tmp_path / "dicom-images-train" / "a" / "b" / "one.dcm", 3)
    second = _film(tmp_path / "dicom-images-train" / "c" / "two.dcm", 4)
    (tmp_path / "train-rle.csv").write_text(
        "ImageId, EncodedPixels\n"
        f"{first.SOPInstanceUID}, -1\n"
        f"{second.SOPInstanceUID}, 65 2 62 2\n"  # column 1, rows 1-2; column 2, rows 1-2
        f"{second.SOPInstanceUID}, 4095 1\n",  # the last pixel
        encoding="utf-8",
    )
    films = {f.image_id: f for f in datasets.read_siim(tmp_path / "train-rle.csv", tmp_path)}
    assert not films[first.SOPInstanceUID].positive
    assert not films[first.SOPInstanceUID].mask().any()
    mask = films[second.SOPInstanceUID].mask()
    expected = np.zeros((64, 64), bool)
    expected[1:3, 1:3] = True
    expected[63, 63] = True
    assert np.array_equal(mask, expected)


def test_montgomery_and_shenzhen_loaders(tmp_path: Path) -> None:
    image = np.zeros((8, 8), np.uint8)
    left, right = image.copy(), image.copy()
    left[2:6, 5:7], right[2:6, 1:3] = 255, 255
    for folder, array in (
        ("CXR_png", image),
        ("ManualMask/leftMask", left),
        ("ManualMask/rightMask", right),
    ):
        (tmp_path / "mc" / folder).mkdir(parents=True)
        Image.fromarray(array).save(tmp_path / "mc" / folder / "MCUCXR_0001_0.png")
    (film,) = datasets.read_montgomery(tmp_path / "mc")
    assert film.name == "MCUCXR_0001_0" and film.image().shape == (8, 8)
    assert film.lungs().sum() == 16 and np.array_equal(film.masks()[0], left > 0)
    (tmp_path / "sz" / "CXR_png").mkdir(parents=True)
    (tmp_path / "sz" / "mask").mkdir()
    for name in ("CHNCXR_0001_0", "CHNCXR_0002_1"):
        Image.fromarray(image).save(tmp_path / "sz" / "CXR_png" / f"{name}.png")
    Image.fromarray(left | right).save(tmp_path / "sz" / "mask" / "CHNCXR_0001_0_mask.png")
    (only,) = datasets.read_shenzhen(tmp_path / "sz")  # the unmasked film is skipped
    assert only.name == "CHNCXR_0001_0" and only.lungs().sum() == 16


def test_duke_loader_windows_and_flips_by_the_pixels(tmp_path: Path) -> None:
    """A right view whose pixels show a left breast (the unreliable tag case) is flipped."""
    phantom = make_breast_phantom(8, slices=4, size=64, view="LCC", masses=1)
    ds = tomosynthesis_dataset(phantom, patient_id="DBT-P00001")
    window = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    window.WindowCenter, window.WindowWidth = 1500, 1000
    ds.save_as(tmp_path / "1-1.dcm", enforce_file_format=True)
    (tmp_path / "paths.csv").write_text(
        "PatientID,StudyUID,View,descriptive_path,classic_path\n"
        "DBT-P00001,DBT-S00001,rcc,Breast-Cancer-Screening-DBT/x/1-1.dcm,1-1.dcm\n",
        encoding="utf-8",
    )
    (tmp_path / "boxes.csv").write_text(
        "PatientID,StudyUID,View,Subject,Slice,X,Y,Width,Height,Class,AD,VolumeSlices\n"
        "DBT-P00001,DBT-S00001,rcc,0,2,10,20,30,40,cancer,0,4\n",
        encoding="utf-8",
    )
    paths = datasets.read_duke_paths(tmp_path / "paths.csv", tmp_path)
    (box,) = datasets.read_duke_boxes(tmp_path / "boxes.csv")
    assert box.volume == ("DBT-P00001", "DBT-S00001", "rcc")
    assert (box.slice, box.x, box.width, box.label, box.volume_slices) == (2, 10, 30, "cancer", 4)
    volume = datasets.read_duke_volume(paths[box.volume], box.view)
    source = phantom.volume.astype(np.float32)
    expected = np.clip((source - 1000) / 1000, 0, 1)[:, ::-1, ::-1]
    assert np.allclose(volume, expected)
    assert datasets.image_laterality(volume[0]) == "R"


def _turned(ds: pydicom.Dataset, volume: np.ndarray) -> pydicom.Dataset:
    """A copy of `ds` storing `volume` turned 180 degrees under slope 2, intercept -1000."""
    copy = deepcopy(ds)
    store_pixels(copy, volume, turned=True, rescale=(2.0, -1000.0))
    return copy


def test_duke_reader_turns_a_turned_right_view_back_to_its_boxes(tmp_path: Path) -> None:
    """A right view stored turned 180 degrees (chest wall on the left edge, so Duke's
    `dcmread_image` flips it) and rescaled: the one reader gives back the breast's own frame,
    the frame its boxes are drawn in, with Rescale Slope/Intercept applied."""
    case = plan_volumes(range(40, 44), 1.0)[1]
    assert case.view == "RCC" and case.masses
    ds, phantom = render_volume(case, slices=6, size=64)
    turned = _turned(ds, phantom.volume)
    assert datasets.duke_flip_needed(turned, "rcc") and not datasets.duke_flip_needed(ds, "rcc")
    upright, geometry = datasets.duke_volume_tensor(ds, "rcc", 48)
    read, read_geometry = datasets.duke_volume_tensor(turned, "rcc", 48)
    assert read_geometry == geometry
    assert np.abs(read - upright).max() < 1e-3  # a stored unit of rounding: 0.5 / 4000
    turned.save_as(tmp_path / "turned.dcm", enforce_file_format=True)
    volume = datasets.read_duke_volume(tmp_path / "turned.dcm", "rcc")
    assert np.abs(volume - phantom.volume / 4000.0).max() < 1e-3  # window 0..4000, rescaled
    (mass, *_) = phantom.masses
    inside = volume[mass.slice, mass.y : mass.y + mass.height, mass.x : mass.x + mass.width]
    assert inside.mean() > volume[mass.slice][phantom.breast_mask].mean()


def test_duke_flip_keeps_the_geometry_on_a_non_square_volume() -> None:
    """Odd padding moves to the other side when the tensor turns: the geometry follows it."""
    phantom = make_breast_phantom(9, slices=3, size=64, view="RCC")
    phantom.volume = np.ascontiguousarray(phantom.volume[:, :, 22:])  # 64 x 42, wall kept
    ds = tomosynthesis_dataset(phantom, patient_id="P")
    upright, geometry = datasets.duke_volume_tensor(ds, "rcc", 32)
    read, flipped = datasets.duke_volume_tensor(_turned(ds, phantom.volume), "rcc", 32)
    assert (geometry.pad_left, flipped.pad_left) == (5, 6)  # 21 columns in 32
    assert np.abs(
        read[..., flipped.pad_left : flipped.pad_left + 21]
        - upright[..., geometry.pad_left : geometry.pad_left + 21]
    ).max() < 1e-3


def test_turned_boxes_are_mis_scored_unless_flipped() -> None:
    """Why the flip matters: perfect detections of the boxes score 1, the same detections in
    a turned volume's stored frame (what an unflipped reader reports) miss."""
    boxes = [
        datasets.DukeBox("P", "S", "rcc", 4, 10, 12, 8, 8, "cancer", 8),
        datasets.DukeBox("P", "S", "lcc", 4, 40, 30, 6, 6, "benign", 8),
    ]

    def detected(box: datasets.DukeBox, x: float, y: float) -> Prediction:
        return Prediction(*box.volume, x, y, box.slice - 1, box.width, box.height, 2, 0.9)

    found = [detected(b, b.x, b.y) for b in boxes]
    stored = [detected(b, 64 - b.x - b.width, 64 - b.y - b.height) for b in boxes[:1]]
    assert froc(boxes, found, min_distance=10).lesion[1.0] == 1.0
    assert froc(boxes, [*stored, found[1]], min_distance=10).lesion[1.0] == 0.5


def test_generic_folder_loader(tmp_path: Path) -> None:
    _film(tmp_path / "a.dcm", 1)
    _film(tmp_path / "sub" / "b.dcm", 2, opacity=True)
    (tmp_path / "labels.csv").write_text("file,abnormal\na.dcm,0\nsub/b.dcm,1\n", encoding="utf-8")
    files = datasets.read_labelled_folder(tmp_path, tmp_path / "labels.csv")
    assert [(f.path.name, f.labels) for f in files] == [
        ("a.dcm", {"abnormal": 0.0}),
        ("b.dcm", {"abnormal": 1.0}),
    ]
    tensors = [
        image_to_tensor(ds, 32, limit=DEFAULT_LIMIT)[0]
        for ds in datasets.iter_dicom(f.path for f in files)
    ]
    assert all(t.shape == (1, 32, 32) for t in tensors)
    (tmp_path / "bad.csv").write_text("file,abnormal\nmissing.dcm,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing\.dcm"):
        datasets.read_labelled_folder(tmp_path, tmp_path / "bad.csv")
