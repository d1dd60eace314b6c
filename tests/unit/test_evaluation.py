import json
from pathlib import Path

import pytest

from models.baselines import ISGD, ItemCF, Popularity, RiverFunkMF, Streamrec
from models.evaluation import prequential
from models.events import Event
from models.params import ModelParams
from stream_app.config import Settings
from stream_app.datasets import synthetic_events
from stream_app.evaluate import run_evaluation


def ev(u: str, i: str, t: int) -> Event:
    return Event(u, i, "view", t)


def test_hit_rate_and_ndcg_worked_out_by_hand() -> None:
    # K=2, popularity: e1 miss (empty catalogue); e2 hit at rank 0; e3 miss (only 'a', excluded);
    # e4 'b' at rank 1 behind 'a'; e5 hit at rank 0; e6 not evaluated (u1 already had 'a').
    log = [ev("u1", "a", 1), ev("u2", "a", 2), ev("u2", "b", 3), ev("u3", "b", 4), ev("u3", "a", 5), ev("u1", "a", 6)]
    r = prequential(log, [Popularity()], k=2).as_dict()
    m = r["models"]["pop"]
    assert r["events"] == 6 and m["evaluated"] == 5
    assert m["hr@2"] == pytest.approx(3 / 5)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / 1.5849625007211563 + 1) / 5)
    assert m["coverage"] == pytest.approx(1.0)
    halves = prequential(log, [Popularity()], k=2).as_dict(split=0.5)["split"]["models"]["pop"]
    # events 0-2 (miss, hit, miss) and 3-5 (hit at rank 1, hit, not evaluated)
    assert halves["first"] == {"hr@2": pytest.approx(1 / 3), "ndcg@2": pytest.approx(1 / 3), "evaluated": 3}
    assert halves["rest"]["evaluated"] == 2 and halves["rest"]["hr@2"] == pytest.approx(1.0)


def test_models_never_recommend_excluded_items() -> None:
    log = [
        Event(e["user_id"], e["item_id"], e["type"], e["ts"])
        for e in synthetic_events(n_users=30, n_items=60, n_events=1500, seed=2)
    ]
    models = [Popularity(), ItemCF(), ISGD(), RiverFunkMF(), Streamrec(ModelParams(n_recs=5, epsilon=0.0))]
    seen: dict[str, set[str]] = {}
    for e in log:
        had = seen.setdefault(e.user_id, set())
        for m in models:
            top = m.recommend(e.user_id, 5, had)
            assert not set(top) & had and len(top) == len(set(top)) <= 5
            m.learn(e)
        had.add(e.item_id)


def _log(tmp_path: Path) -> Path:
    f = tmp_path / "log.jsonl"
    f.write_text("".join(json.dumps(e) + "\n" for e in synthetic_events(n_users=40, n_items=80, n_events=2000)))
    return f


def test_evaluation_is_deterministic_and_has_the_documented_schema(tmp_path: Path) -> None:
    f = _log(tmp_path)
    a = run_evaluation(Settings(), f, "jsonl", 10, ["pop", "itemcf", "isgd", "funkmf"], seed=1)
    b = run_evaluation(Settings(), f, "jsonl", 10, ["pop", "itemcf", "isgd", "funkmf"], seed=1)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert a["events"] == 2000 and set(a["models"]) == {"streamrec", "pop", "itemcf", "isgd", "funkmf"}
    assert a["split"]["at_event"] == 1000 and set(a["split"]["models"]) == set(a["models"])
    for m in a["models"].values():
        assert set(m) == {"hr@10", "ndcg@10", "evaluated", "coverage"}
        assert 0 <= m["ndcg@10"] <= m["hr@10"] <= 1


def test_unknown_baseline_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown baseline"):
        run_evaluation(Settings(), _log(tmp_path), "jsonl", 10, ["bogus"], seed=0)


def test_report_has_the_table_and_a_plot(tmp_path: Path) -> None:
    run_evaluation(Settings(), _log(tmp_path), "jsonl", 10, ["pop"], seed=0, report_dir=tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| streamrec |" in text and "| pop |" in text and "![HR@10 over event time](hr_over_time.png)" in text
    png = (tmp_path / "rep" / "hr_over_time.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_rolling_hit_rate() -> None:
    from stream_app.report import rolling_hr

    ts, hr = rolling_hr([(0, 10, 1.0), (1, 20, 0.0), (2, 30, 0.5), (3, 40, 0.0)], window=2)
    assert ts.tolist() == [20, 30, 40] and hr.tolist() == [0.5, 0.5, 0.5]


def test_evaluate_command_passes_its_options_through(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stream_app.cli import app

    out = tmp_path / "res.json"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(_log(tmp_path)),
            "--baselines",
            "pop",
            "--k",
            "5",
            "--split",
            "0.25",
            "--json",
            str(out),
            "--report",
            str(tmp_path / "rep"),
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["k"] == 5 and doc["split"]["at_event"] == 500 and set(doc["models"]) == {"streamrec", "pop"}
    assert (tmp_path / "rep" / "report.md").exists()


def test_two_stage_accuracy_does_not_depend_on_the_number_of_user_partitions() -> None:
    """Users split over 1, 4 or 16 partitions rank from the same global item state: the same
    lists, event for event, when the table is current; a table that lags costs hits."""
    log = [
        Event(e["user_id"], e["item_id"], e["type"], e["ts"])
        for e in synthetic_events(n_users=80, n_items=120, n_events=3000, seed=4)
    ]
    p = ModelParams(n_recs=10, epsilon=0.0, long_refit_events=500)
    runs = {n: prequential(log, [Streamrec(p, n)], k=10).scores["streamrec"] for n in (1, 4, 16)}
    assert runs[1].curve == runs[4].curve == runs[16].curve
    lagged = prequential(log, [Streamrec(p, 4, lag=300)], k=10).scores["streamrec"]
    assert lagged.hits < runs[1].hits
