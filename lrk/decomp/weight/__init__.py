"""Weight methods: Linear/Conv layers replaced by factorized ones (lrk.layers)."""

from lrk.decomp.weight import cp, svd, svd_train, trawl, tt, tucker  # noqa: F401  (register the methods)
