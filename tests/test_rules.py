from __future__ import annotations

from pathlib import Path

import pytest

from cadnode.config import EMBEDDED_CONFIG
from cadnode.route import Action, load_rules
from cadnode.yamlfile import ConfigError
from training.phantoms import chest_dataset, make_chest_phantom

SHIPPED_RULES = EMBEDDED_CONFIG.parent / "rules.yaml"


def header(**changes: str):  # type: ignore[no-untyped-def]
    ds = chest_dataset(make_chest_phantom(1, size=64), patient_id="P", patient_name="N^N")
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({}, "chest-radiograph"),
        ({"Modality": "CR", "ViewPosition": "AP"}, "chest-radiograph"),
        ({"ViewPosition": "LL"}, "everything-else"),
        ({"BodyPartExamined": "HAND"}, "everything-else"),
        ({"Modality": "CT"}, "everything-else"),
    ],
)
def test_shipped_rules_send_frontal_chest_films_to_the_rule_out_engine(
    changes: dict[str, str], rule: str
) -> None:
    rules = load_rules(SHIPPED_RULES, ["cxr-ruleout"])
    chosen, matching = rules.first_match([header(**changes)])
    assert chosen is not None and chosen.name == rule
    assert len(matching) == 1
    if rule == "chest-radiograph":
        assert chosen.action is Action.infer and chosen.pipeline == ["cxr-ruleout"]


def test_a_missing_attribute_does_not_match() -> None:
    rules = load_rules(SHIPPED_RULES, ["cxr-ruleout"])
    ds = header()
    del ds.ViewPosition
    chosen, _ = rules.first_match([ds])
    assert chosen is not None and chosen.name == "everything-else"


def test_only_the_matching_images_of_a_study_are_inputs() -> None:
    rules = load_rules(SHIPPED_RULES, ["cxr-ruleout"])
    frontal, lateral = header(), header(ViewPosition="LL")
    chosen, matching = rules.first_match([lateral, frontal])
    assert chosen is not None and chosen.name == "chest-radiograph"
    assert matching == [frontal]


def test_the_version_is_the_content_hash(tmp_path: Path) -> None:
    copy = tmp_path / "rules.yaml"
    copy.write_text(SHIPPED_RULES.read_text())
    first = load_rules(copy, ["cxr-ruleout"]).version
    copy.write_text(SHIPPED_RULES.read_text() + "\n# changed\n")
    assert load_rules(copy, ["cxr-ruleout"]).version != first


def rule_problems(tmp_path: Path, text: str, engines: list[str] | None = None) -> list[str]:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_rules(path, engines or ["cxr-ruleout"])
    return caught.value.problems


def test_an_unknown_engine_is_named_with_its_line(tmp_path: Path) -> None:
    text = "rules:\n  - name: a\n    action: infer\n    pipeline: [cxr-ruleout, nope]\n"
    [problem] = rule_problems(tmp_path, text)
    assert ":4:" in problem and "unknown engine 'nope'" in problem


def test_an_unknown_dicom_keyword_is_an_error_at_its_line(tmp_path: Path) -> None:
    text = "rules:\n  - name: a\n    match:\n      Modalty: DX\n    action: ignore\n"
    [problem] = rule_problems(tmp_path, text)
    assert ":3:5: rules.0.match:" in problem and "'Modalty' is not a DICOM keyword" in problem


def test_infer_needs_a_pipeline_and_ignore_takes_none(tmp_path: Path) -> None:
    text = (
        "rules:\n  - name: a\n    action: infer\n"
        "  - name: b\n    action: ignore\n    pipeline: [cxr-ruleout]\n"
    )
    found = rule_problems(tmp_path, text)
    assert any("rules.0" in p and "needs a pipeline" in p for p in found)
    assert any("rules.1" in p and "takes no pipeline" in p for p in found)


def test_an_unknown_action_is_refused(tmp_path: Path) -> None:
    [problem] = rule_problems(tmp_path, "rules:\n  - name: a\n    action: forward\n")
    assert ":3:5: rules.0.action:" in problem and "'forward'" in problem
