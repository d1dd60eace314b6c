"""Hypothesis strategies for event logs."""

from hypothesis import strategies as st

from models.events import Event

TYPES = ["view", "click", "purchase"]


@st.composite
def event_logs(draw: st.DrawFn, max_events: int = 120) -> list[Event]:
    n_users = draw(st.integers(1, 8))
    n_items = draw(st.integers(1, 15))
    n = draw(st.integers(0, max_events))
    ts = 1_700_000_000_000
    out = []
    for k in range(n):
        ts += draw(st.integers(0, 3_600_000 * 24))
        eid = draw(st.one_of(st.none(), st.sampled_from([f"e{k}", "dup-1", "dup-2"])))
        out.append(
            Event(
                f"u{draw(st.integers(0, n_users - 1))}",
                f"i{draw(st.integers(0, n_items - 1))}",
                draw(st.sampled_from(TYPES)),
                ts,
                eid,
            )
        )
    return out
