"""Rank selection: the shared rank policy (rank | ratio | energy) and its strategies."""

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
    "EnergyRank",
    "FixedRank",
    "RankPolicy",
    "RankProblem",
    "RankSelector",
    "Ranks",
    "RatioRank",
]
