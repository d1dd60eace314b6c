import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from models.events import Event, EventSchema, InvalidEvent, parse_ts

S = EventSchema()


def test_valid_event_with_integer_ids_and_iso_ts() -> None:
    ev = S.decode(
        b'{"user_id": 7, "item_id": "i1", "type": "click", "ts": "2023-11-14T22:13:20+00:00",'
        b' "event_id": "e1", "props": {"price": 42.0}}'
    )
    assert ev == Event("7", "i1", "click", 1_700_000_000_000, "e1", {"price": 42.0})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe\x00garbage", "not valid UTF-8 JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"user_id": "u1"}', "missing field: item_id"),
        (b'{"user_id": 5, "item_id": "x", "type": "teleport", "ts": 1}', "unknown event type"),
        (b'{"user_id": "", "item_id": "i", "type": "view", "ts": 1}', "user_id must be 1-128 chars"),
        (b'{"user_id": "u", "item_id": "i", "type": "view", "ts": "yesterday"}', "ISO-8601"),
        (b'{"user_id": {"nested": 1}, "item_id": "i", "type": "click", "ts": 1}', "user_id must be a string"),
        (b'{"user_id": true, "item_id": "i", "type": "click", "ts": 1}', "user_id must be a string"),
        (b'{"user_id": "u", "item_id": "i", "type": "click", "ts": 1.5}', "ts must be integer"),
        (b'{"user_id": "u", "item_id": "i", "type": "click", "ts": -5}', "out of range"),
        (b'{"user_id": "u", "item_id": "i", "type": "click", "ts": 1, "props": [1]}', "props must be an object"),
        (('{"user_id": "' + "x" * 100000 + '", "item_id": "i", "type": "view", "ts": 1}').encode(), "oversize"),
    ],
)
def test_each_contract_violation_has_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as e:
        S.decode(raw)
    assert reason in e.value.reason


def test_reasons_never_echo_the_payload() -> None:
    with pytest.raises(InvalidEvent) as e:
        S.decode(b'{"user_id": "alice@example.com", "item_id": "i", "type": "secret-type-with-pii", "ts": 1}')
    assert "alice" not in e.value.reason


def test_configured_types() -> None:
    s = EventSchema(types=frozenset({"like"}))
    assert s.decode(b'{"user_id": "u", "item_id": "i", "type": "like", "ts": 1}').type == "like"
    with pytest.raises(InvalidEvent):
        s.decode(b'{"user_id": "u", "item_id": "i", "type": "view", "ts": 1}')


def test_naive_iso_is_utc() -> None:
    assert parse_ts("2023-11-14T22:13:20") == 1_700_000_000_000


@given(st.binary(max_size=300))
def test_arbitrary_bytes_either_decode_or_raise_invalid_event(raw: bytes) -> None:
    try:
        ev = S.decode(raw)
    except InvalidEvent:
        return
    assert isinstance(ev, Event)


@given(
    st.dictionaries(
        st.sampled_from(["user_id", "item_id", "type", "ts", "event_id", "props"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**63 - 1),
            st.floats(),
            st.text(max_size=5),
            st.lists(st.integers(0, 9), max_size=2),
            st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
        ),
    )
)
def test_arbitrary_objects_never_escape_validation(obj: dict) -> None:
    try:
        ev = S.decode(orjson.dumps(obj))
    except InvalidEvent:
        return
    assert ev.type in S.types and 1 <= len(ev.user_id) <= 128


_FIELDS = ["user_id", "item_id", "type", "ts"]
_VALID = {"user_id": "u", "item_id": "i", "type": "view", "ts": 1_700_000_000_000}
_FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(1_600_000_000_000, 1_800_000_000_000),
    st.text(max_size=3),
    st.text(min_size=127, max_size=130),
    st.sampled_from(["click", "view", "purchase", "2023-11-14T22:13:20Z"]),
    st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
    st.sampled_from([{"k": "x" * 4088}, {"k": "x" * 4089}]),  # props of 4,096 and 4,097 bytes
)


@given(
    st.fixed_dictionaries(
        {
            "user_id": st.text(min_size=1, max_size=4),
            "item_id": st.text(min_size=1, max_size=4),
            "type": st.sampled_from(["click", "view", "purchase"]),
            "ts": st.integers(1_600_000_000_000, 1_800_000_000_000),
        },
        optional={"event_id": st.text(min_size=1, max_size=4)},
    ),
    st.dictionaries(st.sampled_from([*_FIELDS, "event_id", "props"]), _FIELD_VALUES, max_size=2),
    st.sets(st.sampled_from(_FIELDS), max_size=1),
)
@example(_VALID, {"props": {"k": "x" * 4088}}, set())  # props of 4,096 bytes: the limit
@example(_VALID, {"props": {"k": "x" * 4089}}, set())
@example(_VALID, {"event_id": "e" * 129}, set())
def test_the_inline_check_accepts_what_the_full_check_accepts(base: dict, changed: dict, dropped: set) -> None:
    """``from_obj`` checks the usual event inline and builds it without the dataclass
    ``__init__``: the same events, and the same reason for a bad one (a
    valid event with up to two fields changed and one dropped)."""
    obj = {k: v for k, v in {**base, **changed}.items() if k not in dropped}
    try:
        want = S._checked(obj)
    except InvalidEvent as e:
        with pytest.raises(InvalidEvent) as got:
            S.from_obj(obj)
        assert got.value.reason == e.reason
        return
    ev = S.from_obj(obj)
    assert ev == want and ev.to_dict() == want.to_dict()
    assert want.props is not None or hash(ev) == hash(want)  # props (a dict) make an event unhashable
