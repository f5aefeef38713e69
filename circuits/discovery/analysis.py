"""The sweep's per-step ``circuit`` analysis: scores, circuit, size, faithfulness, uncertainty.

Options read from ``ctx.options``: ``method`` (eap-ig), ``ig_steps`` (5), ``target`` (0.8),
``ablation`` (corrupt), ``max_edges`` (all), ``resamples`` (20; the bootstrap over examples,
see uncertainty.py), ``stable_share`` (0.8), ``seed`` (0), ``trust_at`` (the steps at which
to check the scores against exact patching; the sweep spreads ``trust_steps`` of its selected
steps, the last included) and ``trust_max_edges`` (2000), ``max_memory`` (the working set's budget, budget.py). Every array has the same shape at
every step.

``node_effects``: float32 [n_forward], each writer's contribution: the mean metric change when
its output is ablated for every reader (``node_effects_exact`` 1.0; ``node_effects`` option
"auto" (default) is exact up to 64 writers, see circuits.config) or the sum of its edges'
scores (0.0); ``node_effects_se`` its standard error over the examples.

``trust``: float32 [8], ``[spearman_signed, spearman_abs, topk_overlap, k, top10_overlap,
worst_rank, poor, n_edges]`` (circuits.discovery.trust.TRUST_FIELDS): the method's scores
against exact patching at this step, with k the circuit's size; all NaN where not checked
(a step not in ``trust_at``, the method is already patching, or the graph has more than
``trust_max_edges`` edges). Poor (1.0): k >= 1 and the top-k overlap is below 0.7 or a
circuit edge is ranked beyond 2k by exact patching.
"""

from __future__ import annotations

import numpy as np

from circuits.config import RESAMPLES, STABLE_SHARE, TRUST_MAX_EDGES
from circuits.discovery import discover
from circuits.discovery.functional import FunctionalModel
from circuits.discovery.trust import not_checked, trust_check
from circuits.errors import CircuitsError


def circuit_analysis(ctx) -> dict:
    """The circuit and its bootstrap: ``scores``, ``in_circuit``, ``faithfulness``, ``n_edges``,
    ``metric_clean``, ``metric_corrupted``, ``n_edges_total``, ``score_se``, ``inclusion``,
    ``resample_jaccard`` [resamples], ``stable`` (the stable circuit) and its ``stable_faithfulness``,
    ``trust`` (the scores against exact patching; NaN where not checked)."""
    options = ctx.options or {}
    fm = FunctionalModel(ctx.model, max_memory=options.get("max_memory"))
    method = options.get("method", "eap-ig")
    result = discover(
        fm,
        ctx.task,
        method=method,
        ig_steps=int(options.get("ig_steps", 5)),
        target=float(options.get("target", 0.8)),
        ablation=options.get("ablation", "corrupt"),
        max_edges=options.get("max_edges"),
        resamples=int(options.get("resamples", RESAMPLES)),
        stable_share=float(options.get("stable_share", STABLE_SHARE)),
        seed=int(options.get("seed", 0)),
        node_effects=str(options.get("node_effects", "auto")),
    )
    uncertainty = result.uncertainty
    if uncertainty is None:
        raise CircuitsError("circuit analysis: the bootstrap needs resamples >= 1")
    trust = not_checked()
    checked = ctx.step in {int(s) for s in options.get("trust_at", ())}
    if checked and method != "patching" and fm.spec.n_edges <= int(options.get("trust_max_edges", TRUST_MAX_EDGES)):
        trust = trust_check(fm, ctx.task, result.scores, result.in_circuit, ctx.step).to_array()
    return _node_arrays(result.node_effects, result.node_effects_exact) | {
        "scores": result.scores.astype(np.float32),
        "in_circuit": result.in_circuit.astype(bool),
        "faithfulness": float(result.faithfulness),
        "n_edges": int(result.n_edges),
        "metric_clean": float(result.metric_clean),
        "metric_corrupted": float(result.metric_corrupted),
        "n_edges_total": int(result.n_edges_total),
        "score_se": uncertainty.score_se,
        "inclusion": uncertainty.inclusion,
        "resample_jaccard": uncertainty.resample_jaccard,
        "stable": uncertainty.stable,
        "stable_faithfulness": uncertainty.stable_faithfulness,
        "trust": trust,
    }


def _node_arrays(effects: np.ndarray | None, exact: bool) -> dict:
    """``node_effects`` (mean over examples), ``node_effects_se`` and ``node_effects_exact``."""
    if effects is None:  # unreachable from circuit_analysis, which always asks for them
        raise CircuitsError("circuit analysis: node effects were not measured")
    n = effects.shape[0]
    se = effects.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(effects.shape[1], np.nan)
    return {"node_effects": effects.mean(0, dtype=np.float64).astype(np.float32),
            "node_effects_se": se.astype(np.float32), "node_effects_exact": float(exact)}
