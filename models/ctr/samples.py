"""Labelled samples from the event stream, with features as they were at event time.

* A click or purchase is a positive.
* A view is an impression: it becomes a negative if no click or purchase of the same item by the
  same user follows within ``window_ms`` of event time. The joiner tolerates late and early
  clicks (a click that arrives before its view, within the window, still cancels it) and never
  waits forever: a view is settled once the stream's event time has passed its deadline by
  ``lateness_ms``, and the oldest pending views are settled early when more than
  ``max_pending`` are open.
* When a stream has no impressions (ml-100k), each positive also gets ``sampled_negatives``
  items drawn in proportion to recent popularity (uniform draws from a ring buffer of recent
  events' items), seeded from (seed, user, event count) so the same log gives the same samples.
* A served list is an impression too. The worker shows the builder every user's ranked
  candidates with their ranking context (``observe``); when the user's next event (of
  ``list_types``: by default any) is on one of them, that item and ``list_negatives`` of the
  other candidates (seeded draws) form a list sample: rows sharing a ``group``, with the dense
  inputs they were ranked with, which train the model as a re-ranker (softmax over the list).
  This asks which candidate the user takes next, the question the ranking answers; the single
  samples ask whether a user clicks an item.

Every sample carries the user's history *before* its event, so no feature comes from the future.

A ``Forget`` in the stream (``streamrec forget``) drops what the builder keeps of its user: their
history, their open views (pending samples, which would otherwise be published as negatives
later), the clicks remembered for early ones, and the candidates last served to them. Samples
settled before it were already returned (and published).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from models.ctr.features import Sample, rerank_dense
from models.events import Event, Forget
from models.hashing import stable_hash
from models.ranking import Candidates
from models.users import HEAD, UserPartition, events_of

POSITIVE_TYPES = frozenset({"click", "purchase"})
IMPRESSION_TYPES = frozenset({"view"})


@dataclass(frozen=True)
class SampleParams:
    hist_len: int = 20
    window_ms: int = 30 * 60_000  # a view not clicked within this is a negative
    lateness_ms: int = 60_000  # how far behind the newest event time a click may still arrive
    max_pending: int = 200_000  # open views; beyond it the oldest are settled as negatives
    sampled_negatives: int = 4  # popularity-sampled negatives per positive (0: none)
    pop_buffer: int = 100_000  # recent events whose items the negatives are drawn from
    max_users: int = 1_000_000
    list_negatives: int = 20  # candidates per list sample besides the item taken (0: no list samples)
    served_users: int = 20_000  # users whose last served list is kept (the least recently served go)
    # events that take an item from the list served; None: every type. Every type is what the
    # ranking aims at (a viewed item is an interaction it counts, and never listed again).
    list_types: frozenset[str] | None = None
    seed: int = 0


@dataclass
class _User:
    history: deque[str]
    n: int = 0


class SampleBuilder:
    """Turns events, in order, into samples; a plain picklable value (it is snapshotted with the
    partition state it runs next to)."""

    def __init__(self, params: SampleParams) -> None:
        self.p = params
        self.users: OrderedDict[str, _User] = OrderedDict()
        self.categories: dict[str, str] = {}
        # (user, item) -> (deadline, view sample); insertion order is event order
        self.pending: OrderedDict[tuple[str, str], tuple[int, Sample]] = OrderedDict()
        self.recent_clicks: OrderedDict[tuple[str, str], int] = OrderedDict()  # clicks seen, for early ones
        self.ring: list[str] = []
        self.ring_at = 0
        self.watermark = 0
        # user -> (candidates of the last list served, their dense inputs (n, N_DENSE))
        self.served: OrderedDict[str, tuple[list[str], np.ndarray]] = OrderedDict()

    def observe(self, c: Candidates) -> None:
        """Remember each user's newly ranked candidates (``ranking.Observer``)."""
        if not self.p.list_negatives:
            return
        served = self.served
        dense = rerank_dense(c, self.categories)
        for r, (u, cs) in enumerate(zip(c.user_ids, c.lists(), strict=True)):
            served[u] = (cs, dense[r, : len(cs)].copy())
            served.move_to_end(u)
        while len(served) > self.p.served_users:
            served.popitem(last=False)

    def seed_from(self, state: UserPartition) -> None:
        """Continue from a restored partition state: user histories and the popularity buffer
        are rebuilt from its per-user histories (least recently active users first)."""
        ids = state.item_ids
        for uid, rec in state.users.items():
            items = [ids[i] for i in rec[HEAD::2]]
            self.users[uid] = _User(deque(items[-self.p.hist_len :], maxlen=self.p.hist_len), events_of(rec))
            for it in items:
                self._remember(it)
        self.watermark = state.max_ts

    def feed(self, events: Iterable[Event | Forget]) -> list[Sample]:
        """Samples settled by these events (positives at once, view negatives once due); a
        ``Forget`` drops its user (``forget``) where it stands."""
        p = self.p
        out: list[Sample] = []
        for ev in events:
            if isinstance(ev, Forget):
                self.forget(ev.user_id)
                continue
            u = self.users.get(ev.user_id)
            if u is None:
                u = self.users[ev.user_id] = _User(deque(maxlen=p.hist_len))
                if len(self.users) > p.max_users:
                    self.users.popitem(last=False)
            else:
                self.users.move_to_end(ev.user_id)
            cat = (ev.props or {}).get("category")
            if isinstance(cat, str):
                self.categories[ev.item_id] = cat
            category = self.categories.get(ev.item_id)
            hist = tuple(u.history)
            key = (ev.user_id, ev.item_id)
            if ev.type in POSITIVE_TYPES:
                self.pending.pop(key, None)  # the view was clicked: not a negative
                self.recent_clicks[key] = ev.ts
                self.recent_clicks.move_to_end(key)
                out.append(Sample(ev.user_id, ev.item_id, category, hist, 1.0, ev.ts))
                if p.sampled_negatives and self.ring:
                    out.extend(self._negatives(ev, u, hist))
            elif ev.type in IMPRESSION_TYPES:
                clicked = self.recent_clicks.get(key)
                if clicked is None or abs(clicked - ev.ts) > p.window_ms:
                    self.pending[key] = (
                        ev.ts + p.window_ms,
                        Sample(ev.user_id, ev.item_id, category, hist, 0.0, ev.ts),
                    )
                    self.pending.move_to_end(key)
            if p.list_types is None or ev.type in p.list_types:
                got = self.served.pop(ev.user_id, None)
                if got is not None and ev.item_id in got[0]:
                    out.extend(self._list_sample(ev, u, hist, *got))
            u.history.append(ev.item_id)
            u.n += 1
            self._remember(ev.item_id)
            if ev.ts > self.watermark:
                self.watermark = ev.ts
            out.extend(self._settle())
        return out

    def forget(self, user_id: str) -> None:
        """Drop everything kept about ``user_id``; idempotent. Scans the open views and recent
        clicks (bounded by ``max_pending``): forgets are rare."""
        self.users.pop(user_id, None)
        self.served.pop(user_id, None)
        for d in (self.pending, self.recent_clicks):
            for key in [k for k in d if k[0] == user_id]:
                del d[key]

    def _negatives(self, ev: Event, u: _User, hist: tuple[str, ...]) -> list[Sample]:
        had = set(hist)
        out = []
        n = len(self.ring)
        for k in range(self.p.sampled_negatives):
            item = self.ring[stable_hash(self.p.seed, "neg", ev.user_id, u.n, k) % n]
            if item != ev.item_id and item not in had:
                out.append(Sample(ev.user_id, item, self.categories.get(item), hist, 0.0, ev.ts))
        return out

    def _list_sample(
        self, ev: Event, u: _User, hist: tuple[str, ...], cands: list[str], dense: np.ndarray
    ) -> list[Sample]:
        """The item taken and up to ``list_negatives`` other candidates (seeded, without
        replacement), with the dense inputs they were ranked with, as one group."""
        k = cands.index(ev.item_id)
        others = [j for j in range(len(cands)) if j != k]
        m = min(self.p.list_negatives, len(others))
        rng = np.random.default_rng(stable_hash(self.p.seed, "list", ev.user_id, u.n))
        pick = [k] + [others[j] for j in sorted(rng.choice(len(others), size=m, replace=False).tolist())]
        g = f"{ev.user_id}:{u.n}"
        cats = self.categories
        return [
            Sample(
                ev.user_id,
                cands[j],
                cats.get(cands[j]),
                hist,
                1.0 if j == k else 0.0,
                ev.ts,
                tuple(dense[j].tolist()),
                g,
            )
            for j in pick
        ]

    def _remember(self, item: str) -> None:
        if len(self.ring) < self.p.pop_buffer:
            self.ring.append(item)
        else:
            self.ring[self.ring_at] = item
            self.ring_at = (self.ring_at + 1) % self.p.pop_buffer

    def _settle(self) -> list[Sample]:
        """Views whose deadline the stream has passed (by ``lateness_ms``), oldest first."""
        out = []
        limit = self.watermark - self.p.lateness_ms
        pend = self.pending
        while pend:
            key, (deadline, s) = next(iter(pend.items()))
            if deadline > limit and len(pend) <= self.p.max_pending:
                break
            del pend[key]
            out.append(s)
        clicks = self.recent_clicks
        while clicks:
            key, ts = next(iter(clicks.items()))
            if ts >= limit - self.p.window_ms and len(clicks) <= self.p.max_pending:
                break
            del clicks[key]
        return out

    def flush(self) -> list[Sample]:
        """Settle every open view now (end of a finite log)."""
        out = [s for _, s in self.pending.values()]
        self.pending.clear()
        return out
