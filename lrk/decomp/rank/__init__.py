"""Rank selection: the shared rank policy (rank | ratio | energy), its strategies, and the hardware-aware rank
search (``rank_search: latency``, accelerating_lrd_paper Algorithm 1)."""

from lrk.decomp.rank.latency import (
    RANK_SEARCH_KEYS,
    SHAPE_BUILDERS,
    SLOWER_KIND,
    LatencyCache,
    LatencySearch,
    RankSearch,
    SearchResult,
    Selection,
    candidate_ranks,
    candidate_scalars,
    register_shape_builder,
    select_rank,
)
from lrk.decomp.rank.policy import (
    POLICY_KEYS,
    EnergyRank,
    FixedRank,
    RankPolicy,
    RankProblem,
    Ranks,
    RankSelector,
    RatioRank,
)

__all__ = [
    "POLICY_KEYS",
    "RANK_SEARCH_KEYS",
    "SHAPE_BUILDERS",
    "SLOWER_KIND",
    "EnergyRank",
    "FixedRank",
    "LatencyCache",
    "LatencySearch",
    "RankPolicy",
    "RankProblem",
    "RankSearch",
    "RankSelector",
    "Ranks",
    "RatioRank",
    "SearchResult",
    "Selection",
    "candidate_ranks",
    "candidate_scalars",
    "register_shape_builder",
    "select_rank",
]
