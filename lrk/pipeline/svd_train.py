"""The schedule ``svd_train`` of ``decomp=svd_train`` (seeds/svd_training_abstract.txt, Yang et al. 2020).

``stage=post``: train (or load ``decomp.ckpt_path``) the dense model and test it (``dense/test/*``); then, for both
stages:

1. compress: every target layer becomes its full-rank SVD form U diag(s) V^T (``method.apply``);
2. regularised fit: :class:`~lrk.lit.regularizers.OrthogonalityRegularizer` (``orth_weight``) and
   :class:`~lrk.lit.regularizers.SparsityRegularizer` (``sparsity_weight``, ``sparsity``) attached to
   ``lit.loss_terms`` (logged ``train/reg_orth``, ``train/reg_sparse``), trained ``decomp.train_epochs`` epochs
   (null: ``trainer.max_epochs``) with the run's loggers and callbacks;
3. prune: the singular values of the model at the *end* of that fit (not its best checkpoint: sparsity grows over
   the fit) by ``prune_energy`` / ``prune_ratio`` (``method.prune``); the report (summary.json ``decomp_layers``,
   ``decomp/*``) is replaced by the pruned model's, with ``rank_full`` and ``rank`` per layer;
4. fine-tune: the regularisers removed, :func:`~lrk.pipeline.stages.fit_phase` ``"finetune"`` for
   ``decomp.finetune_epochs`` (checkpoints under ``checkpoints/finetune/``; logs continue the fit's);
5. test: the best checkpoint of the fine-tuning; with ``finetune_epochs=0`` the pruned model as it is, saved as
   ``checkpoints/pruned.ckpt`` (summary.json ``extra.tested_checkpoint``, so ``lrk.load_model(run_dir)`` gives it).

The brief of issue 11 fine-tunes the two-factor layers without regularisers; as we read the full paper
(arXiv:2004.09031, not in the seeds) it keeps the orthogonality term while fine-tuning the pruned SVD form.
"""

from __future__ import annotations

from lrk.decomp.weight.svd_train import SCHEDULE, SVDTrainMethod
from lrk.errors import LrkConfigError
from lrk.lit.callbacks import ModelStats, log_to_loggers
from lrk.lit.regularizers import OrthogonalityRegularizer, SparsityRegularizer
from lrk.pipeline.registry import register_schedule
from lrk.pipeline.stages import (
    RunState,
    compress,
    dense_weights,
    evaluate_dense,
    fit,
    fit_phase,
    flatten,
    make_trainer,
    record_report,
    test,
)


def regularizers(method: SVDTrainMethod) -> list[OrthogonalityRegularizer | SparsityRegularizer]:
    """The two loss terms of the regularised fit, from the method's keys."""
    return [
        OrthogonalityRegularizer(method.orth_weight),
        SparsityRegularizer(method.sparsity_weight, method.sparsity),
    ]


def regularised_trainer(state: RunState, epochs: int) -> None:
    """The main trainer (the run's loggers and callbacks) for ``epochs`` epochs of regularised training; its
    loggers get the config and the report of the SVD form, as :meth:`RunState.main_trainer` does."""
    state.trainer = make_trainer(state.cfg, state.run_dir, state.loggers, state.callbacks, max_epochs=epochs)
    for logger in state.loggers:
        logger.log_hyperparams(flatten(state.summary.config))
    if state.report is not None:
        log_to_loggers(state.trainer, state.report.metrics())


@register_schedule(SCHEDULE)
def svd_train(state: RunState) -> None:
    """SVD training: [dense, evaluate dense,] SVD form, regularised fit, pruning, fine-tuning, test."""
    method = state.method
    if not isinstance(method, SVDTrainMethod):
        raise LrkConfigError(
            f"decomp.schedule={SCHEDULE!r} is invalid for decomp={method.name}: it is the schedule of "
            "decomp=svd_train only"
        )
    if method.stage == "post":
        dense_weights(state)
        evaluate_dense(state)
    compress(state)
    terms = regularizers(method)
    epochs = method.train_epochs if method.train_epochs is not None else int(state.cfg.trainer.max_epochs)
    regularised_trainer(state, epochs)
    state.lit.loss_terms.extend(terms)
    try:
        fit(state)
    finally:
        for term in terms:
            state.lit.loss_terms.remove(term)
    trained = state.fitted
    record_report(state, method.prune(state.model, state.report))
    state.ckpt_path = None
    state.fitted = False  # the regularised fit's checkpoints hold the SVD form, not the pruned model
    for callback in state.trainer.callbacks:
        if isinstance(
            callback, ModelStats
        ):  # re-measured on the pruned model at test when nothing fine-tunes
            callback.metrics.clear()
    log_to_loggers(state.trainer, state.report.metrics())
    fit_phase(state, "finetune", method.finetune_epochs)
    pruned = None
    if trained and not state.fitted:  # nothing fine-tuned: keep the pruned model (lrk.load_model finds it)
        pruned = state.run_dir / "checkpoints" / "pruned.ckpt"
        state.trainer.save_checkpoint(pruned)
    test(state)
    if pruned is not None and state.cfg.test:
        state.summary.extra["tested_checkpoint"] = str(pruned)  # the model tested is the one saved there
