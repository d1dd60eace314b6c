"""Model hyper-parameters, one frozen value shared by the worker, the evaluator and the tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from models.events import DEFAULT_TYPE_WEIGHTS


@dataclass(frozen=True)
class ModelParams:
    """Every knob of the incremental models. Times are in hours of *event* time."""

    type_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TYPE_WEIGHTS))
    half_life_h: float = 24.0 * 90  # item-level decay: popularity and co-occurrence
    user_half_life_h: float = 24.0 * 3  # how fast a user's older history loses weight
    history_len: int = 50  # recent items kept per user
    pair_window: int = 20  # a new event pairs with this many of the user's recent items (<= history_len)
    pair_decay: float = 0.9  # a pair d steps apart in a user's sequence counts pair_decay ** (d - 1)
    neighbours: int = 1000  # co-occurrence entries kept per item row (pruned back from 2x)
    sim_list_len: int = 200  # neighbours per item taken as candidates per source
    sim_refresh: float = 0.2  # republish an item's table entry once this share of its weight is new
    dim: int = 64  # item/user vector dimension (random-indexing sketch)
    n_recs: int = 20  # length of a user's list
    epsilon: float = 0.1  # per-slot exploration probability
    explore_pool: int = 50  # exploration draws from this many non-top candidates
    # candidates a learned re-ranker (and the sample builder that trains it) sees per user: it
    # can lift items from below the served list's reach (at least n_recs + explore_pool)
    rerank_pool: int = 120
    seed: int = 0
    sources: int = 10  # recent history items that seed co-occurrence candidates
    source_decay: float = 0.8  # the k-th most recent source (from 0) also weighs source_decay ** k
    sim_beta: float = 0.3  # neighbour scores are c_ij / (pop_i ** 0.5 * pop_j ** sim_beta)
    vector_candidates: int = 50  # items taken from the user-vector search
    vector_pool: int = 20_000  # the user-vector search covers the most popular items only
    trending_len: int = 50
    w_cooc: float = 1.0
    w_vec: float = 0.0  # the user vectors are kept up to date either way
    w_pop: float = 0.01
    # long-term taste, an item regression refitted at most every ``long_refit_events`` (models.longterm)
    w_long: float = 0.5  # 0: no long-term model, no fits
    long_items: int = 2000  # the regression covers this many of the most popular items
    long_lambda: float = 200.0  # its L2 penalty
    long_refit_events: int = 20_000  # set for cost: a fit is O(long_items^3) and every worker loads its (M, M) weights
    long_users: int = 20_000  # the most recently active users whose profiles a fit learns from
    long_half_life: float = 10.0  # in items: how fast older history items lose weight in a user's score
    long_candidates: int = 100  # items per user taken from the regression's scores
    max_users: int = 1_000_000  # per partition; least recently active users are evicted beyond it
    max_seen: int = 10_000  # per user; the oldest seen items are forgotten beyond it
    dedupe_window: int = 100_000  # recent event_ids remembered per partition

    def changes_to(self, new: ModelParams, structural: tuple[str, ...], rebuild: str) -> list[str]:
        """The names of the settings ``new`` changes; ValueError if one of them is ``structural``
        (a state built with ``self`` cannot take it: ``rebuild`` says what to do instead)."""
        changed = [f.name for f in fields(ModelParams) if getattr(self, f.name) != getattr(new, f.name)]
        bad = [n for n in changed if n in structural]
        if bad:
            raise ValueError(
                f"the saved state was built with {', '.join(f'{n}={getattr(self, n)}' for n in bad)}; it cannot "
                f"continue with {', '.join(f'{n}={getattr(new, n)}' for n in bad)}. Restore those settings, "
                f"or {rebuild}."
            )
        return changed

    @property
    def look_pool(self) -> int:
        """Candidates per user that a re-ranker scores and the sample builder sees: at least
        the ``n_recs + explore_pool`` a list is drawn from."""
        return max(self.n_recs + self.explore_pool, self.rerank_pool)

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        if self.half_life_h <= 0 or self.user_half_life_h <= 0:
            raise ValueError("half-lives must be positive")
        for name in (
            "history_len",
            "pair_window",
            "neighbours",
            "dim",
            "n_recs",
            "sources",
            "long_items",
            "long_refit_events",
            "long_users",
            "long_candidates",
            "rerank_pool",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 1 <= self.max_users < (1 << 24) - 1:  # models.users.ROW_BITS
            raise ValueError("max_users must be between 1 and 16,777,214 (per partition)")
        if self.pair_window > self.history_len:
            raise ValueError(
                f"pair_window ({self.pair_window}) must be at most history_len ({self.history_len}): "
                "the pairing window is the newest part of the history"
            )
        if not (0.0 < self.pair_decay <= 1.0 and 0.0 < self.source_decay <= 1.0):
            raise ValueError("pair_decay and source_decay must be in (0, 1]")
        if self.w_long < 0 or self.long_lambda <= 0 or self.long_half_life <= 0:
            raise ValueError("w_long must be >= 0, long_lambda and long_half_life positive")
        if any(w <= 0 for w in self.type_weights.values()):
            raise ValueError("event type weights must be positive")
