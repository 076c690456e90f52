"""The three shipped engines through the daemon's engine call and post-processing: masks back
on the source image and measured, DBT boxes in source pixels on 1-based frames, and the
seed-001 cascade (rule-out, then the segmenter only on films not ruled out) in the stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cadnode.core.config import EngineOptions
from cadnode.core.db import Database, JobState
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer import postprocess
from cadnode.infer.answers import (
    ClassifyAnswer,
    DetectAnswer,
    SegmentAnswer,
    load_masks,
    parse_answer,
)
from cadnode.infer.bundle import Bundle
from cadnode.infer.phantoms.breast import make_breast_phantom, tomosynthesis_dataset
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.infer.preprocess import Geometry
from cadnode.infer.runtime import Engine
from cadnode.infer.stage import Inference
from tests.infer_jobs import CASCADE, routed_job, run_until
from tests.peers import REPO
from tests.rows import job_of, results_of
from training import detector

SEGMENTER = Bundle(REPO / "engines" / "cxr-segmenter")
SPACING = (0.5, 0.25)


def engine(name: str, max_batch: int = 8) -> Engine:
    return Engine(
        Bundle(REPO / "engines" / name),
        EngineOptions(max_batch=max_batch),
        max_decoded_bytes=DEFAULT_LIMIT,
    )


# --- segment post-processing on a hand-made probability map -----------------------------------


GEOMETRY = Geometry(200, 100, 0.32, 0, 16, SPACING)  # a tall film: padded left and right
# Blocks in model space (64 x 64; the image is columns 16..47): rows, columns, probability.
BLOCKS = {
    "right_lung": (slice(12, 52), slice(19, 30), 0.9),
    "left_lung": (slice(12, 52), slice(34, 45), 0.9),
    "pneumothorax": (slice(12, 25), slice(19, 30), 0.99),  # the upper right hemithorax
}


def hand_made_maps() -> tuple[np.ndarray, np.ndarray]:
    """Model-space probability maps (3, 64, 64) with a speck of 'right lung' far from it and
    a block in the padding; and the source-space masks (3, 200, 100) the blocks cover."""
    maps = np.zeros((3, 64, 64), dtype=np.float32)
    rows, columns = np.mgrid[0:200, 0:100]
    # Where each source pixel's centre falls in model space.
    model_rows = (rows + 0.5) * GEOMETRY.scale + GEOMETRY.pad_top
    model_columns = (columns + 0.5) * GEOMETRY.scale + GEOMETRY.pad_left
    truth = np.zeros((3, 200, 100), dtype=bool)
    for index, (row, column, probability) in enumerate(BLOCKS.values()):
        maps[index, row, column] = probability
        truth[index] = (
            (row.start <= model_rows)
            & (model_rows < row.stop)
            & (column.start <= model_columns)
            & (model_columns < column.stop)
        )
    maps[0, 58:60, 36:38] = 0.9  # the speck: 4 pixels against the lung's 440
    maps[0, 20:40, 2:14] = 0.9  # in the padding, outside the image
    return maps, truth


def test_segment_keeps_the_largest_component_back_on_the_source_image_and_measures_it() -> None:
    maps, truth = hand_made_maps()
    manifest = SEGMENTER.manifest
    assert [label.name for label in manifest.labels] == list(BLOCKS)
    found = postprocess.segment(manifest, maps, GEOMETRY)
    right, _, pneumothorax = found.masks
    assert found.masks.shape == (3, 200, 100)
    assert not right[178:190, :].any()  # the speck is gone, the lung is kept
    for mask, expected in zip(found.masks, truth, strict=True):
        overlap = (mask & expected).sum() / (mask | expected).sum()
        assert overlap > 0.95, overlap  # scale and padding undone
    answer = postprocess.segment_answer(manifest, found, GEOMETRY, "a/b.npz")
    assert (answer.rows, answer.columns, answer.frames) == (200, 100, 1)
    by_name = {finding.label.name: finding for finding in answer.findings}
    assert [f.segment_number for f in answer.findings] == [1, 2, 3]
    ptx = by_name["pneumothorax"]
    area = float(pneumothorax.sum())
    assert ptx.measurements["area_px"] == area
    assert ptx.measurements["area_mm2"] == pytest.approx(area * 0.5 * 0.25)
    # The right lung label covers the whole right hemithorax, the pneumothorax within it.
    expected_percent = 100 * area / float((pneumothorax | right).sum())
    assert ptx.measurements["percent_of_hemithorax"] == pytest.approx(expected_percent)
    assert 100 * 13 / 40 - 3 < expected_percent < 100 * 13 / 40 + 3  # 13 of its 40 rows
    assert ptx.operating_points["present"].reached
    assert (
        ptx.operating_points["present"].threshold
        == manifest.operating_points["pneumothorax"].threshold
    )
    assert ptx.probability >= 0.97
    assert "percent_of_hemithorax" not in by_name["right_lung"].measurements


def test_a_pneumothorax_below_its_threshold_is_absent_and_not_measured() -> None:
    maps, _ = hand_made_maps()
    maps[2] = np.minimum(maps[2], 0.9)  # under the pneumothorax's 0.97 operating point
    found = postprocess.segment(SEGMENTER.manifest, maps, GEOMETRY)
    answer = postprocess.segment_answer(SEGMENTER.manifest, found, GEOMETRY, "a/b.npz")
    ptx = answer.findings[2]
    assert not found.masks[2].any() and not ptx.operating_points["present"].reached
    assert ptx.measurements["area_px"] == 0 and "percent_of_hemithorax" not in ptx.measurements


def test_a_pneumothorax_outside_both_lung_fields_goes_to_the_nearer_one() -> None:
    right = np.zeros((100, 100), bool)
    left = np.zeros((100, 100), bool)
    right[20:80, 10:40], left[20:80, 60:90] = True, True
    pneumothorax = np.zeros((100, 100), bool)
    pneumothorax[20:40, 91:98] = True  # lateral to the left lung, touching neither
    percent = postprocess.hemithorax_percent(
        {"right_lung": right, "left_lung": left, "pneumothorax": pneumothorax}
    )
    assert percent == pytest.approx(100 * 140 / (140 + 1800))


# --- the real engines --------------------------------------------------------------------


def test_chest_films_batched_give_the_answers_of_one_at_a_time(tmp_path: Path) -> None:
    films = [
        write_chest_radiograph(tmp_path / f"{seed}.dcm", seed=seed, size=128, opacity=seed % 2 == 1)
        for seed in range(3)
    ]
    one_by_one = engine("cxr-ruleout", max_batch=1).answer(films)
    batched = engine("cxr-ruleout", max_batch=2).answer(films)
    assert all(isinstance(answer, ClassifyAnswer) for answer in batched)
    for single, batch in zip(one_by_one, batched, strict=True):
        assert isinstance(single, ClassifyAnswer) and isinstance(batch, ClassifyAnswer)
        assert batch.probability == pytest.approx(single.probability, abs=1e-5)
        assert batch.ruled_out == single.ruled_out


def test_the_dbt_detector_finds_the_planted_mass_in_source_pixels_and_frames(
    tmp_path: Path,
) -> None:
    phantom = make_breast_phantom(28, view="LMLO", masses=1)
    volume = tomosynthesis_dataset(phantom, patient_id="DBT", seed=28)
    [mass] = phantom.masses
    # 16 slices, 5 a call: the volume goes through the model in four calls.
    [answer] = engine("dbt-detector", max_batch=5).answer([volume])
    assert isinstance(answer, DetectAnswer)
    assert (answer.frames, answer.rows, answer.columns) == (16, 128, 128)
    assert answer.pixel_spacing_mm == (0.5, 0.5)
    assert answer.findings and answer.operating_points["report"].reached
    for finding in answer.findings:
        box = finding.box
        assert 1 <= box.first_frame <= box.frame <= box.first_frame + box.depth - 1 <= 16
        assert box.x >= 0 and box.x + box.width <= 128 and box.y >= 0
        assert box.y + box.height <= 128
        assert finding.probability >= answer.operating_points["report"].threshold
        assert finding.measurements["width_mm"] == pytest.approx(box.width * 0.5)
    centre_x, centre_y = mass.centre
    near = [
        f
        for f in answer.findings
        if np.hypot(f.box.x + f.box.width / 2 - centre_x, f.box.y + f.box.height / 2 - centre_y)
        < 10
        and abs(f.box.frame - (mass.slice + 1)) <= 4  # Duke: within 25 % of the slices
    ]
    assert near, (mass, answer.findings)
    # Training's Duke predictions (cadnode-train detect) are the same fused boxes.
    path = tmp_path / "volume.dcm"
    volume.save_as(path, enforce_file_format=True)
    duke = detector.detect_files(Bundle(REPO / "engines" / "dbt-detector"), [path])
    reported = {(round(f.box.x, 1), f.box.first_frame - 1, f.box.depth) for f in answer.findings}
    assert reported <= {(p.x, p.z, p.depth) for p in duke}
    [all_at_once] = engine("dbt-detector", max_batch=16).answer([volume])
    assert all_at_once == answer


def test_the_cascade_runs_the_segmenter_only_on_films_not_ruled_out(
    database: Database, tmp_path: Path
) -> None:
    spool, answers = tmp_path / "spool", tmp_path / "answers"
    normal_path, ptx_path = spool / "normal.dcm", spool / "ptx.dcm"
    normal = write_chest_radiograph(normal_path, seed=1, size=256)
    ptx = write_chest_radiograph(ptx_path, seed=2, size=256, pneumothorax=True)
    normal_job = routed_job(database, spool, normal, normal_path, pipeline=CASCADE)
    ptx_job = routed_job(database, spool, ptx, ptx_path, pipeline=CASCADE)
    engines = {name: engine(name) for name in ("cxr-ruleout", "cxr-segmenter")}
    stage = Inference(database, spool, engines, answers=answers)
    run_until(
        stage,
        lambda: all(job_of(database, j).state is JobState.inferred for j in (normal_job, ptx_job)),
        60,
        "both films inferred",
    )

    [ruled_out] = results_of(database, normal_job)
    answer = parse_answer(ruled_out.answer)
    assert isinstance(answer, ClassifyAnswer) and answer.ruled_out is True
    assert ruled_out.engine == "cxr-ruleout"

    first, second = results_of(database, ptx_job)
    classified, segmented = parse_answer(first.answer), parse_answer(second.answer)
    assert isinstance(classified, ClassifyAnswer) and classified.ruled_out is False
    assert isinstance(segmented, SegmentAnswer) and second.engine == "cxr-segmenter"
    assert second.model_sha256 == engines["cxr-segmenter"].bundle.sha256
    expected = f"{ptx.StudyInstanceUID}/{ptx_job}/cxr-segmenter/{ptx.SOPInstanceUID}.npz"
    assert segmented.mask_file == expected
    masks = load_masks(answers / segmented.mask_file)
    assert masks.shape == (1, 3, 256, 256)
    assert (segmented.rows, segmented.columns) == (256, 256)
    pneumothorax = segmented.findings[2]
    assert pneumothorax.label.name == "pneumothorax" and masks[0, 2].any()
    assert pneumothorax.measurements["area_px"] == masks[0, 2].sum()
    assert 0 < pneumothorax.measurements["percent_of_hemithorax"] < 100
    assert pneumothorax.measurements["area_mm2"] > 0
