"""Agreement of a shadow engine version with the live one (cadnode/watch/agreement.py): the
figures on cases worked out by hand here, the rows read from the database as infer leaves
them, `cadnode engines compare`, the dashboard's page and the metrics."""

from __future__ import annotations

import argparse
import datetime as dt
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session

from cadnode.admin.app import create_app
from cadnode.admin.context import AdminContext, EngineInfo
from cadnode.cli import main
from cadnode.core.config import Settings
from cadnode.core.db import Database, Result, utcnow
from cadnode.infer.answers import (
    Answer,
    Box,
    ClassifyAnswer,
    DetectFinding,
    LabelFinding,
    PointReached,
    SegmentAnswer,
    SegmentFinding,
    dump_answer,
    save_masks,
)
from cadnode.infer.bundle import Code, Label, discover
from cadnode.route import load_rules
from cadnode.watch import agreement
from cadnode.watch.agreement import (
    PairedAnswer,
    PairFigures,
    Table,
    by_day,
    cached_comparisons,
    comparison_text,
    comparisons,
    dice,
    difference_histogram,
    match_boxes,
    pair_figures,
    window,
)
from tests.rows import new_job
from tests.test_admin import ENGINES, PASSWORD_HASH, TOKEN, TOKEN_HASH, log_in

ENGINE = "cxr-ruleout"
ABNORMAL = Label(name="abnormal", code=Code(value="263654008", scheme="SCT", meaning="Abnormal"))
LUNG = Label(name="lung", code=Code(value="39607008", scheme="SCT", meaning="Lung"))
PNEUMOTHORAX = Label(name="pneumothorax", code=Code(value="36118008", scheme="SCT", meaning="PTX"))
MASS = Label(name="mass", code=Code(value="4147007", scheme="SCT", meaning="Mass"))

# Ten images, live then shadow: rule_out reached, urgent reached. rule_out: both 3 (0-2),
# live only 2 (3-4), shadow only 1 (5), neither 4 (6-9). urgent: both on image 0 only.
RULE_OUT = [(True, True)] * 3 + [(True, False)] * 2 + [(False, True)] + [(False, False)] * 4
URGENT = [(True, True)] + [(False, False)] * 9
# The live version says 0.5 everywhere; the shadow 0.5 plus these.
DIFFERENCES = [0.1, -0.1, 0.2, 0.0, 0.0, 0.05, -0.05, 0.1, 0.0, -0.3]


def classify(probability: float, rule_out: bool, urgent: bool) -> ClassifyAnswer:
    return ClassifyAnswer(
        label=ABNORMAL,
        probability=probability,
        operating_points={
            "rule_out": PointReached(threshold=0.2, reached=rule_out),
            "urgent": PointReached(threshold=0.8, reached=urgent),
        },
    )


def answered(
    session: Session,
    job_id: int,
    image: str,
    version: str,
    answer: Answer,
    *,
    shadow: bool,
    at: dt.datetime,
    engine: str = ENGINE,
) -> None:
    session.add(
        Result(
            job_id=job_id,
            engine=engine,
            engine_version=version,
            model_sha256="0" * 64,
            sop_instance_uid=image,
            shadow=shadow,
            answer=dump_answer(answer),
            created_at=at,
        )
    )


def seed_classify(database: Database, now: dt.datetime) -> None:
    """The ten images answered live by 1.0 and in shadow by 1.1 (the last four yesterday);
    1.2 in shadow on the first two; a shadow answer with no live one; one a month old."""
    with database.session() as session:
        for index, ((live_ro, shadow_ro), (live_u, shadow_u), difference) in enumerate(
            zip(RULE_OUT, URGENT, DIFFERENCES, strict=True)
        ):
            job = new_job(session, f"1.2.3.{index}")
            assert job.id is not None
            at = now - dt.timedelta(hours=1 if index < 6 else 25)
            image = f"1.2.3.{index}.1"
            answered(
                session, job.id, image, "1.0", classify(0.5, live_ro, live_u), shadow=False, at=at
            )
            shadow = classify(0.5 + difference, shadow_ro, shadow_u)
            answered(session, job.id, image, "1.1", shadow, shadow=True, at=at)
            if index < 2:
                answered(session, job.id, image, "1.2", shadow, shadow=True, at=at)
        lone = new_job(session, "1.2.3.99")
        old = new_job(session, "1.2.3.98")
        assert lone.id is not None and old.id is not None
        answered(
            session, lone.id, "1.2.3.99.1", "1.1", classify(0.9, True, True), shadow=True, at=now
        )
        month = now - dt.timedelta(days=30)
        for version, hidden in (("1.0", False), ("1.1", True)):
            answer = classify(0.9, hidden, hidden)
            answered(session, old.id, "1.2.3.98.1", version, answer, shadow=hidden, at=month)
        session.commit()


def test_agreement_and_kappa_on_a_table_worked_by_hand() -> None:
    table = Table.of(RULE_OUT)
    assert (table.both, table.live_only, table.shadow_only, table.neither) == (3, 2, 1, 4)
    p_o = (3 + 4) / 10
    p_e = (5 / 10) * (4 / 10) + (5 / 10) * (6 / 10)  # live says yes 5 times, shadow 4
    assert table.agreement == pytest.approx(p_o) == 0.7
    assert table.kappa == pytest.approx((p_o - p_e) / (1 - p_e)) == pytest.approx(0.4)
    urgent = Table.of(URGENT)
    assert urgent.agreement == 1 and urgent.kappa == pytest.approx(1.0)  # p_e = 0.82
    constant = Table.of([(False, False)] * 5)  # chance agrees fully: kappa undefined
    assert constant.agreement == 1 and constant.kappa is None
    assert Table.of([]).agreement is None


def test_the_database_pairs_each_shadow_version_with_the_live_one(database: Database) -> None:
    now = utcnow()
    seed_classify(database, now)
    found = comparisons(database, ENGINE, now - dt.timedelta(days=7))
    assert [(c.live_version, c.shadow_version) for c in found.pairs] == [
        ("1.0", "1.1"),
        ("1.0", "1.2"),
    ]
    assert found.unpaired == 1 and not found.truncated  # the month-old pair is outside
    summary = found.pairs[0].summary
    assert summary.images == 10
    assert summary.points["rule_out"].kappa == pytest.approx(0.4)
    assert summary.points["urgent"].agreement == 1
    difference = summary.probability
    assert difference is not None
    sd = math.sqrt(sum(d * d for d in DIFFERENCES) / 9)  # the mean is 0: sum of squares 0.165
    assert difference.mean == pytest.approx(0.0, abs=1e-12)
    assert difference.mean_absolute == pytest.approx(0.9 / 10)
    assert difference.max_absolute == pytest.approx(0.3)
    assert difference.limits == pytest.approx((-1.96 * sd, 1.96 * sd))
    assert found.pairs[1].summary.images == 2
    days = by_day(found.pairs[0].figures)
    assert [day.images for _, day in days] == [4, 6]  # yesterday's four, then today's six
    assert comparisons(database, ENGINE, now - dt.timedelta(days=7), limit=3).truncated


def test_dice_per_label_from_two_small_masks(tmp_path: Path) -> None:
    """Image 1: lung 4 px live, 6 px shadow, 4 shared: 2*4/10 = 0.8; no pneumothorax in
    either. Image 2: lung alike (1.0); pneumothorax 1 px live, none shadow (0). Image 3's
    masks are gone."""
    live_1, shadow_1 = np.zeros((1, 2, 4, 4), bool), np.zeros((1, 2, 4, 4), bool)
    live_1[0, 0, 0:2, 0:2] = True
    shadow_1[0, 0, 0:2, 0:3] = True
    live_2, shadow_2 = np.zeros((1, 2, 4, 4), bool), np.zeros((1, 2, 4, 4), bool)
    live_2[0, 0, 1:3, 1:3] = shadow_2[0, 0, 1:3, 1:3] = True
    live_2[0, 1, 3, 3] = True
    for name, masks in (("l1", live_1), ("s1", shadow_1), ("l2", live_2), ("s2", shadow_2)):
        save_masks(tmp_path / f"{name}.npz", masks)
    assert dice(live_1[0, 0], shadow_1[0, 0]) == pytest.approx(0.8)
    assert dice(live_1[0, 1], shadow_1[0, 1]) is None
    read = agreement.mask_reader(tmp_path)
    at = utcnow()
    pairs = [
        PairedAnswer(segmented("l1.npz"), segmented("s1.npz"), at),
        PairedAnswer(segmented("l2.npz"), segmented("s2.npz"), at),
        PairedAnswer(segmented("gone.npz"), segmented("s2.npz"), at),
    ]
    summary = agreement.summarise([pair_figures(pair, read) for pair in pairs])
    lung, pneumothorax = summary.dice["lung"], summary.dice["pneumothorax"]
    assert (lung.images, lung.both_empty) == (2, 0)
    assert lung.mean == pytest.approx(0.9) and lung.mean_drawn == pytest.approx(0.9)
    assert (pneumothorax.images, pneumothorax.both_empty) == (2, 1)
    assert pneumothorax.mean == pytest.approx(0.5) and pneumothorax.mean_drawn == 0
    assert summary.masks_unread == 1


def segmented(mask_file: str) -> SegmentAnswer:
    present = {"present": PointReached(threshold=0.5, reached=True)}
    return SegmentAnswer(
        mask_file=mask_file,
        frames=1,
        rows=4,
        columns=4,
        findings=[
            SegmentFinding(label=LUNG, segment_number=1, probability=0.9, operating_points=present),
            SegmentFinding(
                label=PNEUMOTHORAX, segment_number=2, probability=0.9, operating_points=present
            ),
        ],
    )


def finding(
    x: float, y: float, first_frame: int, depth: int = 5, label: Label = MASS
) -> DetectFinding:
    box = Box(
        x=x, y=y, width=20, height=20, frame=first_frame, first_frame=first_frame, depth=depth
    )
    report = {"report": PointReached(threshold=0.5, reached=True)}
    return DetectFinding(label=label, probability=0.9, operating_points=report, box=box)


def test_boxes_are_matched_one_to_one_by_the_froc_rule() -> None:
    """40 frames: slices within 10. Live A centred (110, 110), B (1010, 1010). Shadow: 100 px
    right of A (a hit: the bound is inclusive), 50 px left of A (a nearer hit: A is matched
    to it, so the first is only-shadow), far away, B's place 15 slices off, and A's place
    under another label: matched 1, only live 1 (B), only shadow 4."""
    live = [finding(100, 100, 10), finding(1000, 1000, 10)]
    shadow = [
        finding(200, 100, 10),
        finding(50, 100, 10),
        finding(3000, 3000, 10),
        finding(1000, 1000, 25),
        finding(100, 100, 10, label=ABNORMAL),
    ]
    counts = match_boxes(live, shadow, frames=40)
    assert (counts.live, counts.shadow, counts.matched) == (2, 5, 1)
    assert (counts.only_live, counts.only_shadow) == (1, 4)
    assert match_boxes(live[:1], [finding(200.5, 100, 10)], frames=40).matched == 0  # past 100 px
    assert match_boxes(live[:1], [finding(100, 100, 20)], frames=40).matched == 1  # 10 slices
    assert match_boxes(live[:1], [finding(100, 100, 21)], frames=40).matched == 0


def test_a_multi_label_classifier_is_compared_per_finding() -> None:
    def findings(reported: bool) -> ClassifyAnswer:
        point = {"report": PointReached(threshold=0.5, reached=reported)}
        other = {"report": PointReached(threshold=0.5, reached=True)}
        return classify(0.5, True, False).model_copy(
            update={
                "findings": [
                    LabelFinding(label=PNEUMOTHORAX, probability=0.6, operating_points=point),
                    LabelFinding(label=MASS, probability=0.6, operating_points=other),
                ]
            }
        )

    figures = pair_figures(PairedAnswer(findings(True), findings(False), utcnow()), dice_free)
    assert figures.decisions == {"rule_out": (True, True), "urgent": (False, False)}
    assert figures.finding_decisions == {
        "pneumothorax report": (True, False),
        "mass report": (True, True),
    }
    summary = agreement.summarise([figures])
    assert list(summary.all_points) == ["rule_out", "urgent", "mass report", "pneumothorax report"]
    assert summary.finding_points["pneumothorax report"].agreement == 0


def dice_free(_: SegmentAnswer) -> None:
    return None


def test_the_histogram_keeps_every_difference() -> None:
    at = utcnow()
    tenth = (0.5 + 0.1) - 0.5  # 0.09999...: still in the bin from 0.10
    differences = (-0.9, -0.5, 0.0, 0.049, 0.05, tenth, 0.7)
    bins = dict(difference_histogram([PairFigures(at, difference=d) for d in differences]))
    assert sum(bins.values()) == 7 and bins["+0.10"] == 1
    assert bins["-0.50"] == 2 and bins["+0.00"] == 2 and bins["+0.05"] == 1 and bins["+0.45"] == 1


def test_durations_are_read_with_their_unit() -> None:
    assert window("7d") == dt.timedelta(days=7)
    assert window("12h") == dt.timedelta(hours=12)
    assert window("30m") == dt.timedelta(minutes=30)
    for bad in ("7", "7x", "-1d", "0d", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a duration"):
            window(bad)


def test_cadnode_engines_compare_prints_a_table_per_shadow_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_classify(Database(tmp_path / "cadnode.db"), utcnow())
    monkeypatch.setenv("CADNODE_DATA_DIR", str(tmp_path))
    assert main(["engines", "compare", ENGINE, "--since", "7d"]) == 0
    out = capsys.readouterr().out
    assert "cxr-ruleout: live 1.0 vs shadow 1.1, last 7d: 10 image(s) answered by both" in out
    assert "cxr-ruleout: live 1.0 vs shadow 1.2, last 7d: 2 image(s)" in out
    rule_out = next(line for line in out.splitlines() if line.startswith("rule_out"))
    assert rule_out.split() == ["rule_out", "10", "0.700", "0.400", "3", "2", "1", "4"]
    assert "mean |d| 0.090, max |d| 0.300" in out
    assert "(1 shadow answer(s) without a live answer on the same image)" in out
    assert main(["engines", "compare", ENGINE, "--since", "12h"]) == 0
    assert "last 12h: 6 image(s)" in capsys.readouterr().out
    assert main(["engines", "compare", "dbt-detector"]) == 0
    assert "no shadow answer beside a live one in the last 7d" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["engines", "compare", ENGINE, "--since", "week"])
    assert refused.value.code == 2
    assert "expected a duration with its unit (7d, 12h, 30m), got 'week'" in capsys.readouterr().err


def test_comparison_text_says_how_masks_and_boxes_agree(tmp_path: Path) -> None:
    database = Database(tmp_path / "cadnode.db")
    now = utcnow()
    masks = np.zeros((1, 2, 4, 4), bool)
    masks[0, 0, :2, :2] = True
    save_masks(tmp_path / "l1.npz", masks)
    save_masks(tmp_path / "s1.npz", masks)
    with database.session() as session:
        job = new_job(session, "1.2.9")
        assert job.id is not None
        for shadow, file in ((False, "l1.npz"), (True, "s1.npz")):
            version = "2" if shadow else "1"
            answered(
                session,
                job.id,
                "1.2.9.1",
                version,
                segmented(file),
                shadow=shadow,
                at=now,
                engine="cxr-segmenter",
            )
        session.commit()
    text = comparison_text(database, "cxr-segmenter", dt.timedelta(days=1), answers=tmp_path)
    lung = next(line for line in text.splitlines() if line.startswith("lung"))
    assert lung.split() == ["lung", "1", "1.000", "0", "1.000"]
    blind = comparison_text(database, "cxr-segmenter", dt.timedelta(days=1))
    assert "(1 image(s) without Dice: no answers folder given)" in blind


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[tuple[AdminContext, TestClient]]:
    context = admin_context(tmp_path / "var")
    seed_classify(context.database, utcnow())
    with TestClient(create_app(context), follow_redirects=False) as client:
        yield context, client


def admin_context(data_dir: Path) -> AdminContext:
    """The admin port's context, the rules read only if a page asks (these pages do not)."""
    settings = Settings.model_validate(
        {
            "storage": {"data_dir": str(data_dir), "min_free_mb": 1},
            "engines": {"dir": str(ENGINES)},
            "http": {"admin_password_hash": PASSWORD_HASH, "admin_token_hash": TOKEN_HASH},
        }
    )
    settings.storage.spool.mkdir(parents=True, exist_ok=True)
    bundles = discover(ENGINES)
    return AdminContext(
        settings=settings,
        database=Database(settings.storage.database),
        configured_engines=sorted(bundles),
        engines=[EngineInfo.of(bundle, "onnxruntime") for bundle in bundles.values()],
        rules=lambda: load_rules(settings.rules, bundles),
    )


def test_the_agreement_page_needs_a_login_then_shows_tables_and_charts(
    admin: tuple[AdminContext, TestClient],
) -> None:
    _, client = admin
    assert client.get("/agreement/cxr-ruleout").status_code == 303
    log_in(client)
    page = client.get("/agreement/cxr-ruleout")
    assert page.status_code == 200
    assert "Live 1.0 vs shadow 1.1" in page.text and "Live 1.0 vs shadow 1.2" in page.text
    assert '<td>rule_out</td><td class="num">10</td><td class="num">0.700</td>' in page.text
    assert '<td class="num">0.400</td>' in page.text
    # Per day agreement and kappa, and the histogram, for each shadow version.
    assert page.text.count("<svg") == 6 and "Cohen&#39;s kappa per day (UTC)" in page.text
    assert "1 shadow answer(s) without a live answer" in page.text
    assert 'href="/agreement/cxr-ruleout"' in client.get("/engines").text
    assert client.get("/agreement/cxr-ruleout?since=soon").status_code == 400
    assert "No shadow answer" in client.get("/agreement/dbt-detector").text


def test_the_metrics_report_agreement_and_kappa(admin: tuple[AdminContext, TestClient]) -> None:
    context, client = admin
    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    versions = {"engine": ENGINE, "live": "1.0", "shadow": "1.1"}
    rule_out = {**versions, "operating_point": "rule_out"}
    assert gauge(scraped, "cadnode_engine_compared_images", versions) == 10
    assert gauge(scraped, "cadnode_engine_agreement", rule_out) == pytest.approx(0.7)
    assert gauge(scraped, "cadnode_engine_kappa", rule_out) == pytest.approx(0.4)
    maximum = {**versions, "statistic": "max_absolute"}
    assert gauge(scraped, "cadnode_engine_probability_difference", maximum) == pytest.approx(0.3)
    shadow_2 = {**versions, "shadow": "1.2"}
    assert gauge(scraped, "cadnode_engine_compared_images", shadow_2) == 2
    # Cached: a shadow answer given since is not read again until METRICS_CACHE_S has passed.
    before = cached_comparisons(context.database, ENGINE, context.settings.storage.answers)
    with context.database.session() as session:
        job = new_job(session, "1.2.3.77")
        assert job.id is not None
        answered(
            session,
            job.id,
            "1.2.3.77.1",
            "1.1",
            classify(0.1, False, False),
            shadow=True,
            at=utcnow(),
        )
        session.commit()
    assert cached_comparisons(context.database, ENGINE, context.settings.storage.answers) is before


def gauge(scraped: str, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(scraped):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None
