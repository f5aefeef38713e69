"""The sweep's per-step ``circuit`` analysis: scores, circuit, size, faithfulness, uncertainty.

Options read from ``ctx.options``: ``method`` (eap-ig), ``ig_steps`` (5), ``target`` (0.8),
``ablation`` (corrupt), ``max_edges`` (all), ``resamples`` (20; the bootstrap over examples,
see uncertainty.py), ``stable_share`` (0.8), ``seed`` (0). Every array has the same shape at
every step.
"""

from __future__ import annotations

import numpy as np

from circuits.config import RESAMPLES, STABLE_SHARE
from circuits.discovery import discover
from circuits.errors import CircuitsError


def circuit_analysis(ctx) -> dict:
    """The circuit and its bootstrap: ``scores``, ``in_circuit``, ``faithfulness``, ``n_edges``,
    ``metric_clean``, ``metric_corrupted``, ``n_edges_total``, ``score_se``, ``inclusion``,
    ``resample_jaccard`` [resamples], ``stable`` (the stable circuit) and its ``stable_faithfulness``."""
    options = ctx.options or {}
    result = discover(
        ctx.model,
        ctx.task,
        method=options.get("method", "eap-ig"),
        ig_steps=int(options.get("ig_steps", 5)),
        target=float(options.get("target", 0.8)),
        ablation=options.get("ablation", "corrupt"),
        max_edges=options.get("max_edges"),
        resamples=int(options.get("resamples", RESAMPLES)),
        stable_share=float(options.get("stable_share", STABLE_SHARE)),
        seed=int(options.get("seed", 0)),
    )
    uncertainty = result.uncertainty
    if uncertainty is None:
        raise CircuitsError("circuit analysis: the bootstrap needs resamples >= 1")
    return {
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
    }
