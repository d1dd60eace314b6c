from pathlib import Path

from stream_app.datasets import read_log, read_ml100k, synthetic_events


def test_synthetic_stream_is_seeded() -> None:
    assert synthetic_events(n_events=500, seed=3) == synthetic_events(n_events=500, seed=3)
    assert synthetic_events(n_events=500, seed=3) != synthetic_events(n_events=500, seed=4)


def test_logs_are_sorted_by_event_time_stably(tmp_path: Path) -> None:
    f = tmp_path / "log.csv"
    f.write_text("user_id,item_id,type,ts\nu1,a,view,2000\nu2,b,click,1000\nu3,c,view,1000\n")
    assert [e["user_id"] for e in read_log(f, "csv")] == ["u2", "u3", "u1"]
    j = tmp_path / "log.jsonl"
    j.write_text(
        '{"user_id": "u", "item_id": "a", "type": "view", "ts": "2023-11-14T22:13:21Z"}\n'
        '{"user_id": "v", "item_id": "a", "type": "view", "ts": 1700000000000}\n'
    )
    assert [e["user_id"] for e in read_log(j, "jsonl")] == ["v", "u"]


def test_ml100k_rating_mapping(tmp_path: Path) -> None:
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t100\n1\t11\t4\t101\n2\t10\t2\t102\n"
    )
    (tmp_path / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tX\t1995\tAction Comedy\n"
    )
    ev = list(read_ml100k(tmp_path))
    assert [e["type"] for e in ev] == ["purchase", "click", "view"]
    assert ev[0] == {
        "user_id": "1",
        "item_id": "10",
        "type": "purchase",
        "ts": 100_000,
        "event_id": "ml100k-1-10",
        "props": {"category": "Action"},
    }
