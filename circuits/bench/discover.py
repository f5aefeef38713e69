"""Benchmark ``discover``: circuit discovery against TL 4.3, one model and one batch, ratios in one run.

``bench_discover()`` builds a 2-layer d_model 64 GPTNeoX (partial rotary, parallel
attention+MLP) in a temporary folder, boots it through ``TransformerBridge`` and times, on
32 clean/corrupted pairs of 48 tokens:

- one forward, and one forward+backward of the batch through the bridge (the unit);
- ``eap`` here versus TL 4.3 ``attribution_patch(..., EdgeAttributionConfig("edge"))`` on
  the same pairs, with the largest relative difference of the scores (conventions mapped:
  TL denoises, so it is compared with our ``eap`` on the swapped task, summed over positions);
- ``eap-ig`` for m = 5 and 30 as multiples of one forward+backward (goal <= m + 2): the
  median over repeats of (EAP-IG time / the forward+backward timed just before it);
- one faithfulness evaluation, and (``include_patching``) exact patching of every edge.

``discover_figures()`` (``circuits bench discover``) reports them as figures against their goals.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from circuits.bench.common import figure, machine, quietly

CLOCK = time.process_time  # CPU seconds of this process: stable when other jobs share the cores


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return min(times)


def _paired_ratio(fn, unit, repeats: int) -> tuple[float, float]:
    """(median over repeats of time(fn) / time(unit), least time(fn)): ``unit`` is timed right
    before each run of ``fn``, so a change of machine speed between repeats cancels out."""
    fn()  # warm-up
    ratios, times = [], []
    for _ in range(repeats):
        start = CLOCK()
        unit()
        middle = CLOCK()
        fn()
        end = CLOCK()
        ratios.append((end - middle) / (middle - start))
        times.append(end - middle)
    return float(np.median(ratios)), min(times)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Torch limited to ``threads`` threads inside the block (None: left as is)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def bench_discover(json_out: bool = False, n_pairs: int = 32, seq_len: int = 48, d_model: int = 64,
                   n_layers: int = 2, n_heads: int = 4, ig_steps: tuple[int, ...] = (5, 30), repeats: int = 5,
                   include_tl: bool = True, include_patching: bool = False, seed: int = 0,
                   threads: int | None = 1) -> dict:
    """Time the scorers side by side; prints a table (or JSON) and returns the figures.

    Times are CPU seconds of this process (``time.process_time``), the least of ``repeats``
    runs, with torch limited to ``threads`` threads (None: leave as is): on shared machines
    wall-clock time mostly measures the neighbours.
    """
    from circuits.discovery import Evaluator, FunctionalModel, score_edges
    from circuits.discovery.selection import top_n
    from circuits.graph import GraphSpec
    from circuits.loading import random_gptneox
    from circuits.tasks import Task, metric_per_example

    with _torch_threads(threads):
        vocab = 512
        model = random_gptneox(seed=seed, vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                               num_attention_heads=n_heads, intermediate_size=4 * d_model, max_position_embeddings=128,
                               rotary_pct=0.25, use_parallel_residual=True)
        gen = torch.Generator().manual_seed(seed)
        clean = torch.randint(0, vocab, (n_pairs, seq_len), generator=gen)
        corrupted = clean.clone()
        corrupted[:, : seq_len // 2] = torch.randint(0, vocab, (n_pairs, seq_len // 2), generator=gen)
        task = Task("bench", clean, corrupted, torch.full((n_pairs, 1), -1), torch.full((n_pairs, 1), 3),
                    torch.full((n_pairs, 1), 5))
        swapped = Task("bench", corrupted, clean, task.answer_pos, task.correct, task.wrong)
        spec = GraphSpec.from_model(model)
        threads = torch.get_num_threads()

        def forward():
            with torch.no_grad():
                model(clean)

        def forward_backward():
            model.zero_grad(set_to_none=True)
            metric_per_example(model(clean), task).sum().backward()

        fm = FunctionalModel(model)
        figures: dict = {
            "machine": {"cpu": machine()["cpu"], "torch_threads": threads, "torch": torch.__version__,
                        "clock": "process CPU time, least of repeats"},
            "model": {"arch": "GPTNeoX", "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
                      "n_edges": spec.n_edges},
            "batch": {"pairs": n_pairs, "tokens": seq_len},
        }
        t_fwd = _time(forward, repeats)
        t_fb = _time(forward_backward, repeats)
        model.zero_grad(set_to_none=True)
        t_eap = _time(lambda: score_edges(fm, task, "eap"), repeats)
        figures["seconds"] = {"forward": t_fwd, "forward_backward": t_fb, "eap": t_eap}
        ratios = {"eap / fwd+bwd": t_eap / t_fb}
        for m in ig_steps:
            ratio, t = _paired_ratio(lambda m=m: score_edges(fm, task, "eap-ig", ig_steps=m), forward_backward, repeats)
            figures["seconds"][f"eap-ig{m}"] = t
            ratios[f"eap-ig{m} / fwd+bwd"] = ratio
            ratios[f"eap-ig{m} goal (m+2)"] = m + 2
        if include_patching:
            t_patch = _time(lambda: score_edges(fm, task, "patching"), 1)
            figures["seconds"]["patching"] = t_patch
            ratios["patching / fwd+bwd"] = t_patch / t_fb
        scores = score_edges(fm, task, "eap")
        evaluator = Evaluator(fm, task, gap_z=0.0)
        mask = top_n(spec, scores, max(1, spec.n_edges // 10))
        ablated = torch.as_tensor(~mask, dtype=fm.dtype)[None]  # the ablated forward itself: faithfulness() memoises
        t_faith = _time(lambda: evaluator.ablator.metrics(ablated), repeats)
        figures["seconds"]["faithfulness"] = t_faith
        ratios["faithfulness / forward"] = t_faith / t_fwd
        if include_tl:
            from transformer_lens.tools.analysis.attribution_patching import (
                EdgeAttributionConfig,
                attribution_patch,
            )

            def tl_metric(logits):
                return logits[0, -1, 3] - logits[0, -1, 5]

            start = CLOCK()
            result = attribution_patch(model, clean, corrupted, tl_metric, EdgeAttributionConfig(granularity="edge"))
            t_tl = CLOCK() - start
            theirs = np.zeros(spec.shape)
            for (u, v), score in result.edge_scores.items():
                w = {"embed": "input", "attn_head_out": f"a{u.layer}.h{u.head}", "mlp_out": f"m{u.layer}"}[u.kind]
                r = (f"a{v.layer}.h{v.head}<{v.kind[0]}>" if v.kind in ("q_input", "k_input", "v_input")
                     else f"m{v.layer}" if v.kind == "mlp_in" else "logits")
                theirs[spec.forward_index(w), spec.backward_index(r)] += score
            ours = score_edges(fm, swapped, "eap")
            figures["seconds"]["tl_attribution_patch_edge"] = t_tl
            ratios["tl edge / eap (speed-up)"] = t_tl / t_eap
            ratios["tl edge / forward"] = t_tl / t_fwd
            figures["eap_vs_tl_max_rel_err"] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        figures["ratios"] = ratios
        if json_out:
            print(json.dumps(figures, indent=1))
        else:
            print(f"discover bench: {figures['model']}, {n_pairs} pairs x {seq_len} tokens, "
                  f"{figures['machine']['cpu']} ({threads} threads)")
            for key, value in figures["seconds"].items():
                print(f"  {key:<28} {value * 1e3:10.1f} ms (CPU)")
            for key, value in ratios.items():
                print(f"  {key:<28} {value:10.2f}")
            if "eap_vs_tl_max_rel_err" in figures:
                print(f"  eap vs TL max rel err       {figures['eap_vs_tl_max_rel_err']:.1e}")
        return figures



def discover_figures(device: str = "cpu") -> dict[str, Any]:
    """``bench_discover`` (CPU only, one torch thread), as figures."""
    raw = quietly(bench_discover)
    figures = {}
    for key, value in raw["ratios"].items():
        if key.endswith("goal (m+2)"):
            continue
        goal = raw["ratios"].get(key.replace("/ fwd+bwd", "goal (m+2)")) if key.startswith("eap-ig") else None
        better = "higher" if "speed-up" in key else "lower"
        figures[key] = figure(value, "x", goal=goal, better=better)
    if "eap_vs_tl_max_rel_err" in raw:
        figures["eap vs TL max rel err"] = figure(raw["eap_vs_tl_max_rel_err"], "", goal=1e-4)
    note = "" if device == "cpu" else f" (--device {device} ignored: this benchmark runs on the CPU)"
    return {"figures": figures, "model": raw["model"] | {"note": f"CPU time, 1 thread{note}"}, "batch": raw["batch"],
            "seconds_cpu": raw["seconds"]}
