"""The tests every registered decomposition method gets, parametrised over ``sorted(METHODS)`` (no hand-kept list):
each method's ``generic_cases`` (class attribute, tests/generic_fixtures.py documents it) gives the config keys
under which it must reproduce the dense tiny model, those under which it must change it, and those it must refuse.

- (a) ``exact``: the logits of the decomposed model equal the dense model's to EXACT_RTOL (relative Frobenius
  distance, float32), and the method did replace modules (an exact "no-op" would prove nothing); a method without
  an exact setting says why (``exact_reason``); one that is exact only on a special model names the condition
  (``exact_model``: Cholesky attention on a ViT whose W_Q W_K^T is symmetric positive definite);
- (b) ``lossy``: the logits move by more than LOSSY_MIN;
- (c) ``invalid``: each key set is refused with one LrkConfigError naming a key of the set, at ``build_method``
  or at ``apply``; after a refusal at ``apply`` the model is unchanged (state dict tensors, module classes);
- (d) a method whose ``generic_cases`` is empty (or incomplete) fails every one of these tests.

The tiny models (a ViT for attention methods; a ViT and a small ResNet for weight methods) follow from the method's
base class (:func:`generic_fixtures.models_for`). Measured: the 108 tests take ~2 s on one thread.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from generic_fixtures import (
    EXACT_RTOL,
    LOSSY_MIN,
    MODEL_CONDITIONS,
    MODELS,
    assert_unchanged,
    calibration,
    declared_cases,
    images,
    invalid_count,
    logits,
    models_for,
    rel_diff,
    snapshot,
)

from lrk.decomp import METHODS, build_method
from lrk.decomp.attention.base import AttentionSwapMethod
from lrk.decomp.base import DecompMethod
from lrk.decomp.weight.base import WeightMethod
from lrk.errors import LrkConfigError

X = images(4)


def method_models() -> list[tuple[str, str]]:
    return [(name, kind) for name in sorted(METHODS) for kind in models_for(METHODS[name])]


def invalid_cases() -> list[tuple[str, str, int]]:
    return [(n, k, i) for n, k in method_models() for i in range(invalid_count(METHODS[n]))]


def _id(value: Any) -> str:
    return str(value)


# --- (d) the declaration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_its_generic_cases(name: str) -> None:
    cases = declared_cases(METHODS[name])
    assert cases["exact"] is not None or cases["exact_reason"]


def test_the_declaration_check_fails_an_undeclared_or_incomplete_method() -> None:
    """What keeps a new method from being forgotten: declared_cases fails the test of a method that declares
    nothing (inheriting a parent's cases does not count) or only part of its cases."""

    class Undeclared(DecompMethod):
        pass

    class Child(WeightMethod):  # WeightMethod itself declares nothing; neither does the child
        pass

    class Partial(AttentionSwapMethod):
        generic_cases: ClassVar[dict[str, Any]] = {"exact": None, "lossy": {"rank": 1}, "invalid": []}

    for cls, match in (
        (Undeclared, "is empty"),
        (Child, "is empty"),
        (Partial, r"exact=None needs a reason \(exact_reason\); invalid must be a non-empty list"),
    ):
        with pytest.raises(pytest.fail.Exception, match=match):
            declared_cases(cls)
    svd = METHODS["svd"]
    inheriting = type("Inheriting", (svd,), {})
    assert svd.__dict__.get("generic_cases")  # the parent declares its cases ...
    with pytest.raises(pytest.fail.Exception, match="is empty"):
        declared_cases(inheriting)  # ... a subclass must declare its own


# --- (a) exact -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kind"), method_models(), ids=_id)
def test_exact_keys_reproduce_the_dense_model(name: str, kind: str) -> None:
    cases = declared_cases(METHODS[name])
    if cases["exact"] is None:
        assert cases["exact_reason"].strip()  # declared_cases checked it is there; nothing to run
        return
    model = MODELS[kind]()
    condition = cases.get("exact_model")
    if condition is not None:
        MODEL_CONDITIONS[condition](model)
    dense = logits(model, X)
    classes_before = [type(m) for m in model.modules()]
    report = build_method({"name": name, **cases["exact"]}).apply(model, calibration())
    out = logits(model, X)
    assert out.shape == dense.shape
    assert rel_diff(out, dense) <= EXACT_RTOL, f"decomp={name} {cases['exact']} on {kind}"
    if cases["lossy"] is not None:  # a method that can change the model did change it here
        assert report.rows, f"decomp={name} replaced nothing"
        assert [type(m) for m in model.modules()] != classes_before


# --- (b) lossy -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kind"), method_models(), ids=_id)
def test_lossy_keys_change_the_output(name: str, kind: str) -> None:
    cases = declared_cases(METHODS[name])
    if cases["lossy"] is None:
        assert cases["lossy_reason"].strip()
        return
    model = MODELS[kind]()
    dense = logits(model, X)
    report = build_method({"name": name, **cases["lossy"]}).apply(model, calibration())
    assert report.rows
    diff = rel_diff(logits(model, X), dense)
    assert diff > LOSSY_MIN, f"decomp={name} {cases['lossy']} on {kind}: the logits moved by {diff:.2e} only"


# --- (c) invalid -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kind", "index"), invalid_cases(), ids=_id)
def test_invalid_keys_are_refused_before_the_model_changes(name: str, kind: str, index: int) -> None:
    cases = declared_cases(METHODS[name])
    keys = cases["invalid"][index]
    cfg = {"name": name, **keys}
    model = MODELS[kind]()
    before = snapshot(model)
    try:
        method = build_method(cfg)
    except LrkConfigError as exc:
        error = str(exc)
    else:
        with pytest.raises(LrkConfigError) as info:
            method.apply(model, calibration())
        error = str(info.value)
        assert_unchanged(model, before)
    named = [k for k in keys if f"decomp.{k}" in error or f"{k}=" in error or repr(k) in error]
    assert named, f"the error does not name any of {sorted(keys)}: {error}"
