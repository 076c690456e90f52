"""The phantoms' difficulty knob: `easy` is the original look pixel for pixel (the node's tests
and demo rely on it), harder presets change only the findings and add look-alikes, and the
training configs take it validated."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cadnode.core.yamlfile import ConfigError
from cadnode.infer.phantoms.breast import make_breast_phantom
from cadnode.infer.phantoms.chest import make_chest_phantom
from cadnode.infer.phantoms.difficulty import (
    EASY,
    PRESETS,
    Difficulty,
    difficulty_json,
    resolve_difficulty,
)

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"

# sha256 (first 16 hex digits) of phantoms drawn before the knob existed: `easy` must keep them.
CHEST_BEFORE = {
    (11, False, False): "d880f31f83be5225",
    (12, True, False): "4e1b8c6ecab83326",
    (13, False, True): "66179b152b9adc4b",
    (14, True, True): "d849798fb2399065",
}
BREAST_BEFORE = {(21, 0, "LCC"): "1f7dcaef38726bdc", (22, 2, "RMLO"): "a846e91b7ba00dfc"}


def digest(*arrays: np.ndarray) -> str:
    return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()[:16]


@pytest.mark.parametrize(("seed", "opacity", "pneumothorax"), list(CHEST_BEFORE))
def test_easy_chest_films_are_the_original_pixels(
    seed: int, opacity: bool, pneumothorax: bool
) -> None:
    for difficulty in (EASY, PRESETS["easy"]):
        phantom = make_chest_phantom(
            seed, size=96, opacity=opacity, pneumothorax=pneumothorax, difficulty=difficulty
        )
        found = digest(phantom.pixels, phantom.pneumothorax_mask)
        assert found == CHEST_BEFORE[(seed, opacity, pneumothorax)]


@pytest.mark.parametrize(("seed", "masses", "view"), list(BREAST_BEFORE))
def test_easy_breast_volumes_are_the_original_pixels(seed: int, masses: int, view: str) -> None:
    phantom = make_breast_phantom(seed, slices=8, size=64, view=view, masses=masses)
    assert digest(phantom.volume) == BREAST_BEFORE[(seed, masses, view)]


def test_contrast_and_size_change_only_the_findings() -> None:
    """A normal film is the same film at any lesion contrast or size (no look-alikes, same
    noise); an opacity gets fainter and its box smaller."""
    fainter = Difficulty(contrast=(0.3, 0.3), size=0.6)
    assert np.array_equal(
        make_chest_phantom(31, size=96).pixels,
        make_chest_phantom(31, size=96, difficulty=fainter).pixels,
    )
    easy = make_chest_phantom(32, size=128, opacity=True)
    faint = make_chest_phantom(32, size=128, opacity=True, difficulty=fainter)
    normal = make_chest_phantom(32, size=128).pixels.astype(float)
    x, y, w, h = faint.opacity_boxes[0]  # the same centre in both, the faint one smaller
    excess = [
        float((p.pixels[y : y + h, x : x + w] - normal[y : y + h, x : x + w]).mean())
        for p in (easy, faint)
    ]
    assert 0 < excess[1] < 0.5 * excess[0]
    widths = [[box[2] for box in p.opacity_boxes] for p in (easy, faint)]
    assert len(widths[0]) == len(widths[1]) and all(f < e for e, f in zip(*widths, strict=True))


def test_pneumothorax_gets_thinner_and_keeps_its_truth() -> None:
    easy = make_chest_phantom(33, size=128, pneumothorax=True)
    subtle = make_chest_phantom(33, size=128, pneumothorax=True, difficulty=PRESETS["hard"])
    assert 0 < subtle.pneumothorax_mask.sum() < easy.pneumothorax_mask.sum()
    assert subtle.abnormal


def test_look_alikes_leave_a_normal_film_normal() -> None:
    """Confounders draw on the film, never in its truth: no boxes, no pneumothorax mask."""
    crowded = Difficulty(confounders=6.0)
    plain = make_chest_phantom(34, size=96)
    busy = make_chest_phantom(34, size=96, difficulty=crowded)
    assert not np.array_equal(plain.pixels, busy.pixels)
    assert not busy.abnormal and not busy.pneumothorax_mask.any()
    volume = make_breast_phantom(35, slices=8, size=64, difficulty=crowded)
    assert volume.masses == []
    assert not np.array_equal(volume.volume, make_breast_phantom(35, slices=8, size=64).volume)


def test_breast_masses_keep_their_boxes_at_any_contrast() -> None:
    easy = make_breast_phantom(36, slices=8, size=64, masses=2)
    faint = make_breast_phantom(36, slices=8, size=64, masses=2, difficulty=Difficulty((0.2, 0.2)))
    assert easy.masses == faint.masses
    assert faint.volume.sum() < easy.volume.sum()


def test_difficulty_is_deterministic_for_a_seed() -> None:
    first = make_chest_phantom(37, size=96, opacity=True, difficulty=PRESETS["default"])
    again = make_chest_phantom(37, size=96, opacity=True, difficulty=PRESETS["default"])
    assert np.array_equal(first.pixels, again.pixels)


def test_settings_resolve_from_names_and_mappings() -> None:
    assert resolve_difficulty("default") is PRESETS["default"]
    custom = resolve_difficulty({"contrast": [0.2, 0.5], "noise": 2, "confounders": 1})
    assert custom == Difficulty(contrast=(0.2, 0.5), noise=2.0, confounders=1.0)
    assert resolve_difficulty({"contrast": 0.4}).contrast == (0.4, 0.4)
    assert difficulty_json(PRESETS["hard"]) == "hard"
    assert difficulty_json(custom) == {
        "contrast": [0.2, 0.5],
        "size": 1.0,
        "noise": 2.0,
        "confounders": 1.0,
    }
    assert "`default`" in PRESETS["default"].describe()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("brutal", "unknown difficulty 'brutal'"),
        ({"blur": 1}, "unknown difficulty field(s) ['blur']"),
        ({"contrast": [0.8, 0.2]}, "0 < low <= high"),
        ({"contrast": [0.1, 0.2, 0.3]}, "a number or [low, high]"),
        ({"size": 0}, "size > 0"),
        ({"noise": "loud"}, "difficulty {'noise': 'loud'}"),
        (3, "one of easy, default, hard"),
    ],
)
def test_bad_settings_are_refused_with_what_is_accepted(value: object, says: str) -> None:
    with pytest.raises(ValueError) as raised:
        resolve_difficulty(value)
    assert says in str(raised.value)


def test_shipped_configs_name_their_difficulty() -> None:
    """The chest engines' configs name the `default` preset; the DBT detector's stays at
    `easy` (off saturation there already; at `default` it learned little on 2 cores)."""
    pytest.importorskip("torch", reason="needs the `train` extra")
    from training import detector, ruleout, segmenter

    loaders = {"ruleout": ruleout, "segmenter": segmenter, "dbt": detector}
    presets = {"ruleout": "default", "segmenter": "default", "dbt": "easy"}
    for name, module in loaders.items():
        config = module.load_config(CONFIGS / f"{name}.yaml")
        assert config.difficulty == PRESETS[presets[name]], name
        assert config.model_dump(mode="json")["difficulty"] == presets[name]


def test_a_bad_config_difficulty_names_file_and_line(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="needs the `train` extra")
    from training import ruleout

    text = (CONFIGS / "ruleout-tiny.yaml").read_text(encoding="utf-8")
    path = tmp_path / "ruleout.yaml"
    path.write_text(text + "difficulty: brutal\n", encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        ruleout.load_config(path)
    problems = "\n".join(raised.value.problems)
    assert "unknown difficulty 'brutal'" in problems and str(path) in problems


def test_phantoms_command_draws_at_the_difficulty_asked(tmp_path: Path) -> None:
    from training.cli import main

    out = tmp_path / "cxr"
    argv = ["phantoms", "--kind", "cxr", "--count", "2", "--out", str(out), "--seed", "50"]
    assert main([*argv, "--size", "64", "--positive-fraction", "1", "--difficulty", "hard"]) == 0
    film = pydicom.dcmread(out / "cxr-00000.dcm")
    flags = {"opacity": True, "pneumothorax": False}  # the first abnormal film of a set
    expected = make_chest_phantom(50, size=64, difficulty=PRESETS["hard"], **flags)
    assert np.array_equal(film.pixel_array, expected.pixels)
