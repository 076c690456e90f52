"""Drift (cadnode/watch/drift.py, drift_check.py, cadnode/infer/profile.py): PSI and KS on
cases computed by hand, the attributes read from phantom headers, the profiles infer records,
the training population, and the watch stage raising (once), holding and clearing a drift
alert through the alert channel (a real webhook receiver on loopback), with its figures in
/metrics. The node end to end: tests/test_drift_node.py."""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlmodel import select

from cadnode.admin.context import AdminContext
from cadnode.admin.metrics import render
from cadnode.core.config import Settings
from cadnode.core.db import Alert, AlertKind, Database, DriftStat, InputProfile, Result
from cadnode.core.yamlfile import load_model
from cadnode.infer.bundle import MANIFEST, Manifest
from cadnode.infer.phantoms.breast import plan_volumes, render_volume
from cadnode.infer.phantoms.chest import chest_dataset, make_chest_phantom
from cadnode.infer.profile import facts_of, population_of, probability_bin, record_profiles
from cadnode.route import RuleSet
from cadnode.watch import Watchdog
from cadnode.watch.drift import ks_against_percentiles, ks_two_samples, psi
from cadnode.watch.drift_check import assess, populations
from cadnode.watch.drift_listing import drift_table
from tests.alerting import Hooked, webhook_receiver
from tests.peers import REPO
from tests.rows import instance_row, new_job
from training.population import ruleout_population
from training.records import Record

NOW = dt.datetime(2026, 12, 2, 10, 30, tzinfo=dt.UTC)
PHANTOM: dict[str, Any] = {"manufacturer": "cadnode synthetic phantom", "pixel_spacing": 0.139}
OTHER: dict[str, Any] = {"manufacturer": "Other Vendor", "pixel_spacing": 0.2}


# --- the statistics, by hand --------------------------------------------------------------


def test_psi_on_a_hand_computed_case() -> None:
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5) = 0.25 ln 2 + 0.25 ln 1.5
    assert psi({"A": 0.5, "B": 0.5}, {"A": 0.25, "B": 0.75}) == pytest.approx(
        0.25 * math.log(2) + 0.25 * math.log(1.5)
    )
    assert psi({"A": 0.5, "B": 0.5}, {"B": 0.5, "A": 0.5}) == 0.0
    # A category on one side only counts at the 1e-4 floor: 2 x 0.9999 ln(1e4).
    assert psi({"A": 1.0}, {"B": 1.0}) == pytest.approx(2 * 0.9999 * math.log(1e4))


def test_ks_on_hand_computed_cases() -> None:
    # Three against three, wholly apart: D = 1, and of the C(6, 3) = 20 orderings only the
    # two wholly apart ones are as extreme: p = 2 / 20.
    d, p = ks_two_samples([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert d == pytest.approx(1.0) and p == pytest.approx(0.1)
    # Against a uniform population (percentiles 0, 0.05, ..., 1): the sample's CDF steps by
    # 0.2 at 0.1, 0.3, ...: 0.1 off the diagonal on either side of each step.
    d, _ = ks_against_percentiles([0.1, 0.3, 0.5, 0.7, 0.9], np.linspace(0, 1, 21).tolist())
    assert d == pytest.approx(0.1)
    assert ks_against_percentiles([0.95] * 50, np.linspace(0, 1, 21).tolist())[1] < 1e-9


# --- the attributes -----------------------------------------------------------------------


def test_the_attributes_come_from_a_radiograph_and_a_tomosynthesis_header() -> None:
    film = chest_dataset(make_chest_phantom(1, size=64), patient_id="P", patient_name="P^Q")
    film.KVP = "117"
    assert facts_of(film).categories() == {
        "manufacturer": "cadnode synthetic phantom",
        "model": "none",
        "pixel_spacing": f"{float(film.ImagerPixelSpacing[0]):.2f}",  # no PixelSpacing
        "kvp": "115",  # to 5 kV
        "body_part": "CHEST",
        "photometric": "MONOCHROME2",
        "image_size": "64x64",
    }
    volume, _ = render_volume(plan_volumes(range(1), 0.0)[0], slices=2, size=32)
    facts = facts_of(volume)
    assert facts.pixel_spacing is not None  # from the shared functional groups
    assert facts.body_part == "BREAST" and facts.kvp is None
    assert [probability_bin(p) for p in (0.0, 0.05, 0.1, 0.99, 1.0)] == [
        "0.0",
        "0.0",
        "0.1",
        "0.9",
        "0.9",
    ]


# --- the watchdog on profile rows ---------------------------------------------------------


@pytest.fixture(scope="module")
def empty_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "cadnode.db"
    Database(path).engine.dispose()
    return path


@pytest.fixture
def db(tmp_path: Path, empty_database: Path) -> Database:
    shutil.copyfile(empty_database, tmp_path / "cadnode.db")
    return Database(tmp_path / "cadnode.db")


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[Hooked]]]:
    with webhook_receiver() as found:
        yield found


def settings_for(tmp_path: Path, hook_url: str | None = None, **drift: Any) -> Settings:
    return Settings.model_validate(
        {
            "storage": {"data_dir": str(tmp_path), "min_free_mb": 1},
            "engines": {"dir": str(tmp_path / "engines")},
            "alerts": {"webhook_url": hook_url} if hook_url else {},
            "drift": {"min_images": 10, "reference_images": 10, "window_images": 10, **drift},
        }
    )


def profiles(
    db: Database,
    sender: str,
    count: int,
    at: dt.datetime,
    *,
    probabilities: list[float] | None = None,
    **attributes: Any,
) -> None:
    """`count` answers of cxr-ruleout 1.0.0 on images from `sender`, the phantom's
    attributes unless `attributes` say otherwise."""
    scores = probabilities or [(i % 10) / 10 + 0.05 for i in range(count)]
    with db.session() as session:
        for i in range(count):
            row = {**PHANTOM, **attributes}
            session.add(
                InputProfile(
                    job_id=i + 1,
                    sender=sender,
                    engine="cxr-ruleout",
                    engine_version="1.0.0",
                    body_part="CHEST",
                    photometric="MONOCHROME2",
                    rows=512,
                    columns=512,
                    probability=scores[i],
                    positive=scores[i] >= 0.5,
                    created_at=at,
                    **row,
                )
            )
        session.commit()


def watchdog(db: Database, settings: Settings, clock: list[dt.datetime]) -> Watchdog:
    return Watchdog(db, settings, clock=lambda: clock[0], free_bytes=lambda _path: 2**40)


def drift_alerts(db: Database) -> list[Alert]:
    with db.session() as session:
        return list(session.exec(select(Alert).where(Alert.kind == AlertKind.engine_drift)))


def told(hooked: type[Hooked]) -> list[tuple[str, str]]:
    return [(body["event"], body["subject"]) for _, body in hooked.received]


def test_a_sender_whose_films_change_vendor_and_spacing_raises_one_alert_until_it_ends(
    db: Database, tmp_path: Path, receiver: tuple[str, type[Hooked]]
) -> None:
    url, hooked = receiver
    settings = settings_for(tmp_path, url)
    clock = [NOW]
    dog = watchdog(db, settings, clock)
    reference_time = NOW - dt.timedelta(days=2)
    profiles(db, "CR-EAST", 10, reference_time)
    profiles(db, "CR-EAST", 10, NOW - dt.timedelta(hours=1), **OTHER)
    profiles(db, "CR-WEST", 20, reference_time)  # the same count, unchanged: quiet

    dog.check(clock[0])
    [alert] = drift_alerts(db)
    assert alert.subject == "CR-EAST/cxr-ruleout" and alert.raised_at is not None
    assert alert.detail.startswith("cxr-ruleout 1.0.0 on images from CR-EAST, the last 10")
    assert "against the first 10 images of cxr-ruleout 1.0.0 (10 images)" in alert.detail
    assert "manufacturer PSI 18.4" in alert.detail and "pixel_spacing PSI 18.4" in alert.detail
    assert "probability" not in alert.detail  # the answers did not change
    assert "Other Vendor" not in alert.detail  # attributes and figures, not values
    assert told(hooked) == [("alert.raised", "CR-EAST/cxr-ruleout")]

    clock[0] += dt.timedelta(minutes=1)  # before drift.check_every: the finding holds
    dog.check(clock[0])
    clock[0] += dt.timedelta(hours=2)  # due again, the condition unchanged: no repeat
    dog.check(clock[0])
    assert [a.id for a in drift_alerts(db)] == [alert.id]
    assert drift_alerts(db)[0].cleared_at is None
    assert told(hooked) == [("alert.raised", "CR-EAST/cxr-ruleout")]

    profiles(db, "CR-EAST", 10, clock[0])  # back to the phantom's: the window is these
    clock[0] += dt.timedelta(hours=2)
    dog.check(clock[0])
    [cleared] = drift_alerts(db)
    assert cleared.cleared_at is not None
    assert told(hooked)[-1] == ("alert.cleared", "CR-EAST/cxr-ruleout")


def test_the_figures_are_in_the_table_and_the_metrics(db: Database, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    profiles(db, "CR-EAST", 10, NOW - dt.timedelta(days=2))
    profiles(db, "CR-EAST", 10, NOW - dt.timedelta(hours=1), **OTHER)
    watchdog(db, settings, [NOW]).check(NOW)
    with db.session() as session:
        shown, ok = drift_table(session)
        stats = session.exec(select(DriftStat)).all()
    assert {(s.attribute, s.level) for s in shown} == {
        ("manufacturer", "alert"),
        ("pixel_spacing", "alert"),
    }
    assert ok == len(stats) - 2 and ok > 0
    settings.storage.spool.mkdir(parents=True, exist_ok=True)
    context = AdminContext(
        settings=settings,
        database=db,
        configured_engines=[],
        engines=[],
        rules=lambda: RuleSet(rules=(), version="test"),
    )
    text = render(context).decode()
    east = 'engine="cxr-ruleout",sender="CR-EAST"'  # labels in Prometheus's order
    psi_of = f'cadnode_drift_psi{{against="reference",attribute="manufacturer",{east}}}'
    assert f"{psi_of} 18.4" in text
    ks_of = f'against="reference",attribute="probability",{east}'
    assert f"cadnode_drift_ks{{{ks_of}}} 0.0" in text
    assert f"cadnode_drift_ks_pvalue{{{ks_of}}} 1.0" in text


def test_too_few_images_or_none_changed_raise_nothing(db: Database, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    profiles(db, "CR-EAST", 10, NOW - dt.timedelta(days=2))
    profiles(db, "CR-EAST", 9, NOW - dt.timedelta(hours=1), **OTHER)  # under min_images
    profiles(db, "CR-WEST", 20, NOW - dt.timedelta(hours=1))
    watchdog(db, settings, [NOW]).check(NOW)
    assert drift_alerts(db) == []
    with db.session() as session:
        [west] = assess(session, settings.drift, {}, NOW)
    assert west.sender == "CR-WEST"
    assert {f.level for f in west.figures} == {"ok"}


def install_population(tmp_path: Path, **population: Any) -> None:
    """The shipped rule-out manifest, version 1.0.0, with a training population."""
    shipped = load_model(REPO / "engines" / "cxr-ruleout" / MANIFEST, Manifest)
    manifest = shipped.model_dump(mode="json")
    manifest["version"] = "1.0.0"
    manifest["population"] = population
    folder = tmp_path / "engines" / "cxr-ruleout"
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps(manifest))  # JSON is YAML


def test_answers_unlike_the_training_population_alert_against_it(
    db: Database, tmp_path: Path
) -> None:
    phantom = chest_dataset(make_chest_phantom(1, size=64), patient_id="P", patient_name="P^Q")
    training = population_of([facts_of(phantom)] * 40, [0.1] * 30 + [0.9] * 10, 0.5)
    install_population(tmp_path, **training.model_dump(mode="json"))
    assert load_model(tmp_path / "engines" / "cxr-ruleout" / MANIFEST, Manifest).population
    assert training.positive_rate == 0.25 and training.probability_histogram[1] == 0.75
    # The node sees the phantom's vendor, but 512 px films (at 0.139 mm, not 64 px at 1.1 mm)
    # and every answer near 0.95.
    profiles(db, "CR-EAST", 10, NOW, probabilities=[0.95] * 10)
    settings = settings_for(tmp_path, reference_images=50)  # no reference yet: training only
    with db.session() as session:
        [found] = assess(session, settings.drift, populations(settings.engines.dir), NOW)
    figures = {(f.attribute, f.statistic): f for f in found.figures}
    assert {f.against for f in found.figures} == {"training"}
    assert figures[("manufacturer", "psi")].value == 0.0
    assert figures[("image_size", "psi")].level == "alert"  # 64x64 trained, 512x512 seen
    assert figures[("positive", "psi")].level == "alert"  # 25 % trained, 100 % seen
    assert figures[("probability", "ks")].p_value is not None
    assert figures[("probability", "ks")].level == "alert"
    watchdog(db, settings, [NOW]).check(NOW)
    [alert] = drift_alerts(db)
    assert "against the training population (40 images): pixel_spacing PSI" in alert.detail
    assert "image_size PSI 18.4" in alert.detail and "probability KS 1 (p 0)" in alert.detail


def test_infer_profiles_each_answer_with_its_sender_and_header(
    db: Database, tmp_path: Path
) -> None:
    film = chest_dataset(make_chest_phantom(1, size=64), patient_id="P", patient_name="P^Q")
    film.PixelSpacing = [0.2, 0.2]
    (tmp_path / "spool").mkdir()
    film.save_as(tmp_path / "spool" / "film.dcm", enforce_file_format=True)
    answer = {
        "task": "classify",
        "label": {"name": "abnormal", "code": {"value": "1", "scheme": "S", "meaning": "m"}},
        "probability": 0.8,
        "operating_points": {"urgent": {"threshold": 0.5, "reached": True}},
    }
    with db.session() as session:
        job = new_job(session, str(film.StudyInstanceUID))
        session.add(instance_row(film, "film.dcm", job, calling_ae="CR-EAST"))
        assert job.id is not None
        result = Result(
            job_id=job.id,
            engine="cxr-ruleout",
            engine_version="1.0.0",
            model_sha256="0" * 64,
            sop_instance_uid=str(film.SOPInstanceUID),
            answer=answer,
        )
        record_profiles(session, job, [result], tmp_path / "spool")
        session.commit()
        [row] = session.exec(select(InputProfile)).all()
    assert (row.sender, row.engine, row.engine_version) == ("CR-EAST", "cxr-ruleout", "1.0.0")
    assert (row.manufacturer, row.pixel_spacing, row.rows) == (PHANTOM["manufacturer"], 0.2, 64)
    assert (row.probability, row.positive, row.shadow) == (0.8, True, False)


def test_drift_settings_are_checked_at_load() -> None:
    with pytest.raises(ValueError, match="psi_alert must be at least psi_watch"):
        Settings.model_validate({"drift": {"psi_watch": 0.3, "psi_alert": 0.2}})
    with pytest.raises(ValueError, match="end must come after start"):
        Settings.model_validate(
            {"drift": {"reference": {"start": "2026-02-01T00:00Z", "end": "2026-01-01T00:00Z"}}}
        )
    fixed = Settings.model_validate(
        {"drift": {"reference": {"start": "2026-01-01T00:00Z", "end": "2026-02-01T00:00Z"}}}
    )
    assert fixed.drift.check_every == 3600.0 and fixed.drift.psi_alert == 0.25


def test_training_records_the_population_of_its_films(tmp_path: Path) -> None:
    phantoms = [Record(key=f"p{i}", patient=f"p{i}", image=None, seed=i) for i in range(6)]
    vendor = chest_dataset(make_chest_phantom(2, size=64), patient_id="V", patient_name="V^W")
    vendor.Manufacturer, vendor.KVP = "Other Vendor", 120
    vendor.save_as(tmp_path / "vendor.dcm", enforce_file_format=True)
    folder = [Record(key="v", patient="v", image=tmp_path / "vendor.dcm")]
    scores = np.array([0.1, 0.2, 0.35, 0.9])
    population = ruleout_population([*phantoms, *folder], scores, [0.3, 0.8], phantom_size=64)
    assert population is not None and population.images == 7
    assert population.metadata["manufacturer"] == {
        "Other Vendor": round(1 / 7, 6),
        "cadnode synthetic phantom": round(6 / 7, 6),
    }
    assert population.metadata["kvp"] == {"120": round(1 / 7, 6), "none": round(6 / 7, 6)}
    assert "model" not in population.metadata  # no image has one: unknown, not compared
    assert population.positive_rate == 0.5  # at the lowest operating point, 0.3
    # Bins by lower edge: 0.1 in [0.1, 0.2), 0.2 in [0.2, 0.3), 0.35 in [0.3, 0.4), 0.9 last.
    assert population.probability_histogram == [0.0, 0.25, 0.25, 0.25, 0, 0, 0, 0, 0, 0.25]
    assert (
        population.probability_quantiles[0] == 0.1 and population.probability_quantiles[-1] == 0.9
    )
