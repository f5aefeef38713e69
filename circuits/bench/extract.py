"""Benchmark ``extract``: the sweep's extraction of one step (cache, compression, write) against
a bare forward of the same batches; stored bytes; the time to read one head back."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

from circuits.bench.common import figure

SERIAL_ROUNDS = 3  # the serial variant is context, not a goal: time it in the first rounds only
EXTRACT_MODEL = {
    "d_model": 128, "n_layers": 2, "n_heads": 4, "d_head": 32, "d_mlp": 512, "n_ctx": 128, "d_vocab": 1024,
    "attn_only": False, "normalization_type": "LN", "act_fn": "gelu", "positional_embedding_type": "standard",
    "seed": 0,
}


class GPTNeoXShape(TypedDict):
    """The ``GPTNeoXConfig`` fields the benchmark sets, passed on to ``random_gptneox``."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rotary_pct: float
    rotary_emb_base: int
    use_parallel_residual: bool
    hidden_act: str


# Pythia-70m's architecture (EleutherAI/pythia-70m config.json), random weights.
PYTHIA_70M_SHAPE: GPTNeoXShape = {"vocab_size": 50304, "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
                    "intermediate_size": 2048, "max_position_embeddings": 2048, "rotary_pct": 0.25,
                    "rotary_emb_base": 10000, "use_parallel_residual": True, "hidden_act": "gelu"}


def _extract_model(manifest: str | None, step: int | None, device: str, shape: str = "tiny"):
    """The benchmark's checkpoint: a user's (manifest, step), a 2-layer d128 native model
    (``shape="tiny"``) or a Pythia-70m-shaped GPTNeoX (``shape="pythia-70m"``)."""
    if shape == "pythia-70m":
        from circuits.loading import random_gptneox

        return random_gptneox(device, **PYTHIA_70M_SHAPE), "GPTNeoX shaped as Pythia-70m (random init, local folder)"
    if manifest is not None:
        from circuits.loading import load
        from circuits.manifest import load_manifest

        m = load_manifest(manifest)
        step = m.steps[-1] if step is None else step
        return load(m, step, device), f"{m.name}@{step}"
    from circuits.checkpoint import bridge_native_module, new_native_model

    module = new_native_model(EXTRACT_MODEL).to(device).eval()
    return bridge_native_module(module, EXTRACT_MODEL, name="bench-extract"), "native 2-layer d128 (random init)"


def bench_extract(batch: int = 64, seq: int = 128, n_batches: int = 4, rounds: int = 9, dtype: str = "float16",
                  manifest: str | None = None, step: int | None = None, device: str = "cpu",
                  hooks: str | None = None, shape: str = "tiny") -> dict[str, Any]:
    """Per round, on the same checkpoint and batches: the bare forward of every batch, the
    sweep's extraction of them (patterns and hooks cached, logits only at the answer position
    as the sweep does, float16, chunks compressed on a thread pool and written on the writer
    thread while the next batch runs, shard landed), and in the first
    rounds the same extraction writing serially (each batch's write awaited before the next
    forward). Each figure is the median over rounds of that round's ratio, in wall-clock and in
    process CPU time (CPU time is the honest cost when other processes share the cores;
    wall-clock shows the overlap). Then the stored/raw bytes of patterns and activations, and
    the time to read one head's pattern at one step from ``index.h5`` with h5py."""
    import h5py
    import numpy as np
    import torch

    from circuits import store
    from circuits.visit import TORCH_DTYPES, cache_batch, resolve_hooks

    model, label = _extract_model(manifest, step, device, shape)
    cfg = model.cfg
    seq = min(seq, cfg.n_ctx)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.d_vocab, (batch, seq), generator=gen).to(device) for _ in range(n_batches)]
    hook_names = resolve_hooks(model, hooks)
    torch_dtype = TORCH_DTYPES[dtype]
    # As in the sweep, logits are unembedded only where a task reads them: here the last token.
    answer_position = torch.tensor([seq - 1], device=device)
    n_examples = batch * n_batches

    def bare() -> None:
        with torch.no_grad():
            for tokens in batches:
                model(tokens)

    def extract(final: Path, writer: store.BackgroundWriter, serial: bool = False) -> Path:
        shard = store.ShardWriter(final, n_examples, batch, writer)
        for i, tokens in enumerate(batches):
            with torch.no_grad():
                _, _, arrays = cache_batch(model, tokens, hook_names, torch_dtype, answer_position)
            shard.write_batch(i * batch, arrays)
            if serial:
                writer.wait()
        shard.finish({"step": 0, "tokens_seen": 0})
        writer.wait()
        return final

    times: dict[str, list[float]] = {"bare": [], "extract": [], "serial": []}
    cpu: dict[str, list[float]] = {"bare": [], "extract": [], "serial": []}
    with tempfile.TemporaryDirectory(prefix="circuits-bench-") as tmp, store.BackgroundWriter() as writer:
        root = Path(tmp)
        (root / store.SHARD_DIR).mkdir()
        shard_path = root / store.SHARD_DIR / store.shard_name(0)
        # Timed shards land under a name not yet taken, as in the sweep: replacing a file already
        # there would time the file system freeing it (~20 ms for 30 MB on ext4).
        landing = shard_path.with_name("landing.h5")
        bare()  # warm-up: first calls allocate and pick kernels
        extract(shard_path, writer)
        for r in range(rounds):
            # Each round times every kind back to back, in an order that alternates between
            # rounds, and the figures are medians of per-round ratios: a change of machine
            # speed (frequency, neighbours) then hits the numerator and denominator alike.
            kinds = ["bare", "extract"] + (["serial"] if r < SERIAL_ROUNDS else [])
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                t0, c0 = time.perf_counter(), time.process_time()
                if kind == "bare":
                    bare()
                else:
                    extract(landing, writer, serial=kind == "serial")
                times[kind].append(time.perf_counter() - t0)
                cpu[kind].append(time.process_time() - c0)
                landing.unlink(missing_ok=True)
        with h5py.File(shard_path, "r") as f:
            # Raw = what the cache holds in float32: each pattern as its whole [q, k] square,
            # although only the causal lower triangle is stored.
            stored = {name: f[name].id.get_storage_size()
                      for name in [store.PATTERNS] + [f"activations/{h}" for h in hook_names]}
            raw = {name: (f[name].size // f[name].shape[-1] * seq * seq if name == store.PATTERNS else f[name].size) * 4
                   for name in stored}
            file_bytes = shard_path.stat().st_size
        layouts, tokens, _ = store.shard_layouts([(0, shard_path)])
        store.write_index(root, layouts, tokens, {"bench": "extract"})
        rng = np.random.default_rng(0)
        picks = [(int(rng.integers(cfg.n_layers)), int(rng.integers(cfg.n_heads)), int(rng.integers(n_examples)))
                 for _ in range(200)]
        with h5py.File(root / store.INDEX_FILE, "r") as index:
            patterns = index[store.PATTERNS]
            patterns[0, 0, 0, 0]  # opens the shard behind the virtual dataset
            reads = []
            for layer, head, example in picks:
                t0 = time.perf_counter()
                patterns[0, example, layer, head].astype(np.float32)
                reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with h5py.File(root / store.INDEX_FILE, "r") as index:
            index[store.PATTERNS][0, 1, 1, 1]
        cold = time.perf_counter() - t0

    def ratio(of: str, clock: dict[str, list[float]]) -> float:
        return statistics.median(t / b for t, b in zip(clock[of], clock["bare"], strict=False))

    return {
        "figures": {
            "extract_over_forward": figure(ratio("extract", times), "x", goal=1.3),
            "stored_over_raw_f32": figure(sum(stored.values()) / sum(raw.values()), "", goal=0.3),
            "patterns_stored_over_raw_f32": figure(stored[store.PATTERNS] / raw[store.PATTERNS], ""),
            "read_one_head_ms": figure(statistics.median(reads) * 1e3, "ms", goal=5.0),
            "read_one_head_cold_ms": figure(cold * 1e3, "ms"),
            "serial_write_over_forward": figure(ratio("serial", times), "x"),
            "extract_cpu_over_forward_cpu": figure(ratio("extract", cpu), "x"),
            "bare_forward_s": figure(statistics.median(times["bare"]), "s"),
            "extract_s": figure(statistics.median(times["extract"]), "s"),
        },
        "model": {"checkpoint": label, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model,
                  "n_ctx": cfg.n_ctx, "d_vocab": cfg.d_vocab},
        "batch": {"batch": batch, "seq": seq, "n_batches": n_batches, "rounds": rounds, "dtype": dtype,
                  "hooks": hook_names, "compression": store.COMPRESSION_NAME, "stored_bytes": sum(stored.values()),
                  "raw_f32_bytes": sum(raw.values()), "shard_file_bytes": int(file_bytes)},
        "times_s": {k: [round(v, 4) for v in vals] for k, vals in times.items()},
        "cpu_s": {k: [round(v, 4) for v in vals] for k, vals in cpu.items()},
    }



def bench_extract_70m(device: str = "cpu") -> dict[str, Any]:
    """``extract`` where the forward is the size users sweep (Pythia-70m), 2 x 16 x 128 tokens."""
    return bench_extract(batch=16, n_batches=2, rounds=5, device=device, shape="pythia-70m")

