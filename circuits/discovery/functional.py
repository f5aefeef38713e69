"""A functional forward over a TransformerBridge's TL-format weights, edge by edge.

Every reader port (the q, k and v input of each head, each MLP input, the logits) reads the
sum of the writer outputs before it (plus the constant attention output biases ``b_O``,
which belong to no node). That makes every edge a switch: ``ablate[u, v] = 1`` gives reader
``v`` the reference run's output of writer ``u`` (corrupted or mean) instead of the current
one, and an additive zero at each port gives ``d metric / d input of v`` in one backward.

What it implements (``support.py`` lists every TL config field as honoured, refused or
irrelevant; docs/discovery.md "Which models discovery supports"):

- positions: learned (``W_pos``) or rotary, partial or full, in halves (Llama, Qwen2, OLMo,
  GPTNeoX: the model's own ``inv_freq`` and attention scaling, rope types default, linear,
  llama3, yarn, proportional) or adjacent pairs (GPT-J, native models, ``rotary_adjacent_pairs``);
- norms: LayerNorm, RMSNorm, weightless forms, none; OLMo-2's post-sublayer RMSNorms (a head's
  write is its output scaled by the norm of the layer's whole attention output, so the
  writes still sum to the block's output); QK-norm per head or across heads (OLMo-2);
- attention: causal or bidirectional, any scale, score soft-capping, grouped-query attention.
  With GQA each *query* head keeps its own k and v port: the port reads its own residual and
  projects it with its kv group's ``W_K`` / ``W_V``, so the graph's shape does not depend on
  ``n_key_value_heads`` and, unablated, the forward is the model's;
- MLPs: plain (relu, gelu, gelu_new, silu, ...) or gated (SwiGLU / GeGLU, ``W_gate``);
  sequential or parallel attention+MLP; output logit soft-capping.

Anything else is refused with a one-line :class:`CircuitsError` naming the field, and every
new model is checked against the bridge's own forward on a probe batch (:func:`self_check`).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import einops
import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuits.discovery.budget import make_budget
from circuits.discovery.support import check_config
from circuits.errors import CircuitsError
from circuits.graph import GraphSpec

_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


@dataclass
class _Norm:
    kind: str  # "LN", "RMS" or "none"
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    def __call__(self, x: Tensor) -> Tensor:
        # torch's fused kernels: one pass instead of six over every port's copy of the
        # residual (an ablated forward normalises [batch, pos, 3 x heads, d_model]); ~2.5x
        # faster for LayerNorm on CPU, the same values to float rounding.
        if self.kind == "none":
            return x
        if self.kind == "LN":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x = F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return x + self.bias if self.bias is not None else x

    def vjp(self, x: Tensor, grad: Tensor) -> Tensor:
        """``d/dx`` of ``(self(x) * grad).sum()`` for ``grad`` [..., n, d] and ``x`` [..., d] (shared input)."""
        if self.kind == "none":
            return grad
        x = x.unsqueeze(-2)
        if self.kind == "LN":
            x = x - x.mean(-1, keepdim=True)
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        xhat = x * inv
        g = grad * self.weight if self.weight is not None else grad
        out = g - xhat * (g * xhat).mean(-1, keepdim=True)
        if self.kind == "LN":
            out = out - g.mean(-1, keepdim=True)
        return out * inv


    def split(self, parts: Float[Tensor, "n batch pos d"], total: Float[Tensor, "batch pos d"]) -> Tensor:
        """Each part scaled as ``total`` is normalised: the parts' results sum to ``self(total)``.

        For a post-sublayer RMSNorm (OLMo-2): head ``h`` writes ``w * o_h / rms(sum_h o_h)``.
        """
        if self.kind != "RMS" or self.bias is not None:
            raise CircuitsError(f"a post-sublayer {self.kind} norm is not supported by circuit discovery (RMSNorm only)")
        inv = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + self.eps)
        out = parts * inv
        return out * self.weight if self.weight is not None else out


def _norm_of(module, cfg) -> _Norm:
    kind = getattr(cfg, "normalization_type", None)
    if module is None or kind is None:
        return _Norm("none", None, None, 0.0)
    inner = getattr(module, "original_component", module)
    weight = getattr(inner, "weight", None)
    bias = getattr(inner, "bias", None)
    eps = float(getattr(inner, "eps", getattr(inner, "variance_epsilon", getattr(cfg, "eps", 1e-5))))
    if kind in ("LN", "LNPre"):
        return _Norm("LN", _detach(weight), _detach(bias), eps)
    if kind in ("RMS", "RMSPre"):
        return _Norm("RMS", _detach(weight), None, eps)
    raise CircuitsError(f"normalization_type {kind!r} is not supported by circuit discovery (LN, RMS or none)")


def _rms_of(module) -> _Norm:
    """An RMSNorm module of HF (``weight``, ``variance_epsilon`` or ``eps``), e.g. OLMo-2's post-norms and QK-norm."""
    inner = getattr(module, "original_component", module)
    eps = float(getattr(inner, "variance_epsilon", getattr(inner, "eps", 1e-6)))
    return _Norm("RMS", _detach(getattr(inner, "weight", None)), None, eps)


def _detach(t):
    return None if t is None else t.detach()


def _weight(model, name: str) -> Tensor | None:
    """``model.<name>`` detached, or None where the bridge has no such weight (bias-free models)."""
    try:
        value = getattr(model, name)
    except (AttributeError, ValueError, RuntimeError):
        return None
    return None if value is None else value.detach()


def _replaced(out: Float[Tensor, "kb pos d"], ref: Float[Tensor, "b pos d"], weight: Float[Tensor, " k"]) -> Tensor:
    """Copy ``i`` of ``out`` (its rows ``i*b..(i+1)*b``) moved ``weight[i]`` of the way to ``ref``."""
    k = weight.shape[0]
    copies = out.view(k, -1, *out.shape[1:])
    return (copies + weight[:, None, None, None] * (ref[None] - copies)).view_as(out)


class _Ablation:
    """An ablated run's switches and, per writer as it is produced, ``output - reference``.

    Keeping the differences (written once per writer into one buffer) instead of the outputs
    means a reader's ablation term is one product over the writers so far: no stack of every
    earlier output and no subtraction per layer.
    """

    def __init__(self, mask: Float[Tensor, "k n_forward n_backward"], reference: Float[Tensor, "n_forward b pos d"],
                 n_copies: int) -> None:
        self.mask, self.reference, self.n_copies = mask, reference, n_copies
        self.diffs = reference.new_empty((reference.shape[0], n_copies, *reference.shape[1:]))

    def add(self, writer: int, out: Float[Tensor, "kb pos d"]) -> None:
        diff = out.view(self.n_copies, *self.reference.shape[1:]) - self.reference[writer][None]
        if diff.requires_grad:  # per-port gradients through an ablated run (tests): differentiable, no buffer
            self.diffs = diff[None] if writer == 0 else torch.cat([self.diffs[:writer], diff[None]])
        else:
            self.diffs[writer] = diff

    def ported(self, n_written: int, first: int, count: int) -> Bool[Tensor, "k count"]:
        """Which of these ports each copy ablates (an edge from a writer so far)."""
        return self.mask[:, :n_written, first : first + count].any(1)

    def term(self, n_written: int, first: int, count: int) -> Float[Tensor, "kb pos count d"] | None:
        """``sum_u mask[u, port] * (output_u - reference_u)`` for these ports, or None if none is ablated."""
        mask = self.mask[:, :n_written, first : first + count]
        if not bool(mask.any()):
            return None
        k, (b, p, d) = self.n_copies, self.reference.shape[1:]
        diffs = self.diffs[:n_written].view(n_written, k, b * p * d)
        # per copy, [count, w] @ [w, b*p*d]: reads the buffer in place
        term = torch.stack([mask[i].T @ diffs[:, i] for i in range(k)])  # [k, count, b*p*d]
        return term.view(k, count, b, p, d).permute(0, 2, 3, 1, 4).reshape(k * b, p, count, d)


@dataclass
class Run:
    """One functional forward: logits, every writer's output, and the port perturbations."""

    logits: Float[Tensor, "batch pos vocab"]
    writers: Float[Tensor, "n_forward batch pos d_model"]  # detached: no gradient flows through them
    ports: list[Tensor] | None  # what port_grads differentiates: per-port zeros, or each layer's qkv (fast path)
    port_inputs: list[Tensor] | None = None  # fast path: the residual each layer's attention ports read


class FunctionalModel:
    """TL-format weights of a bridge, and a forward whose edges can be switched one by one.

    Construction refuses by name what the forward does not implement (``support.check_config``
    and the module checks below), then checks the forward against the bridge's own on a probe
    batch (:func:`self_check`, once per model and weights). ``check=False`` skips that check:
    only for measuring its cost; discovery never passes it.
    """

    def __init__(self, model, check: bool = True, max_memory: int | str | None = None) -> None:
        cfg = model.cfg
        check_config(cfg)
        self.cfg = cfg
        self.spec = GraphSpec.from_model(model)
        self.n_layers, self.n_heads = int(cfg.n_layers), int(cfg.n_heads)
        self.d_head = int(cfg.d_head)
        self.has_mlp = self.spec.has_mlp
        self.parallel = self.spec.parallel_attn_mlp
        self.gated = bool(getattr(cfg, "gated_mlp", False))
        self.causal = getattr(cfg, "attention_dir", "causal") == "causal"
        if self.has_mlp:
            act = getattr(cfg, "act_fn", None)
            if act not in _ACTS:
                raise CircuitsError(f"activation {act!r} is not supported by circuit discovery ({', '.join(_ACTS)})")
            self.act = _ACTS[act]
        pos_type = getattr(cfg, "positional_embedding_type", "standard")
        if pos_type not in ("standard", "rotary"):
            raise CircuitsError(f"positional_embedding_type {pos_type!r} is not supported (standard or rotary)")
        self.rotary = pos_type == "rotary"
        with torch.no_grad():
            self._read_weights(model, pos_type)
        self._read_norms(model)
        self.attn_scale = _attention_scale(model)
        self.attn_cap = float(getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0)
        self.clip_qkv = _clip_qkv(model)
        self.logits_cap = float(getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0)
        self.device = self.W_E.device
        self.dtype = self.W_E.dtype
        self.rotary_table: tuple[Tensor, Tensor] | None = _rotary_table(model, self.d_head) if self.rotary else None
        self.adjacent_pairs = self.rotary and _adjacent_pairs(model)
        self.budget = make_budget(max_memory, self.device)
        if check:
            self_check(self, model)

    def _read_weights(self, model, pos_type: str) -> None:
        cfg = self.cfg
        H, n_kv = self.n_heads, int(getattr(cfg, "n_key_value_heads", None) or self.n_heads)
        if H % n_kv:
            raise CircuitsError(f"n_heads {H} is not a multiple of n_key_value_heads {n_kv}")
        self.n_kv = n_kv
        self.W_E = model.W_E.detach()
        self.W_pos = model.W_pos.detach() if pos_type == "standard" else None
        self.W_O = model.W_O.detach()
        self.b_O = _zeros_if_none(_weight(model, "b_O"), (self.n_layers, self.W_O.shape[-1]), self.W_O)
        # q, k and v of every *query* head as one projection: [layer, 3*head, d_model, d_head].
        # With GQA each query head's k/v uses its group's weights (repeat_interleave, as HF's repeat_kv).
        W_K, W_V = (_per_query_head(model.W_K.detach(), H), _per_query_head(model.W_V.detach(), H))
        self.W_QKV = torch.cat([model.W_Q.detach(), W_K, W_V], dim=1)
        bias_shape = (self.n_layers, H, self.d_head)
        b_Q = _zeros_if_none(_weight(model, "b_Q"), bias_shape, self.W_QKV)
        b_K = _per_query_head(_zeros_if_none(_weight(model, "b_K"), (self.n_layers, n_kv, self.d_head), self.W_QKV), H)
        b_V = _per_query_head(_zeros_if_none(_weight(model, "b_V"), (self.n_layers, n_kv, self.d_head), self.W_QKV), H)
        self.b_QKV = torch.cat([b_Q, b_K, b_V], dim=1)
        if self.has_mlp:
            # per layer, views of the bridge's own weights: a stacked copy would add d_model x
            # d_mlp x 2 floats per layer (0.8 GB at Pythia-410m) to every step
            self.W_in, self.W_out = _layer_weights(model, "W_in"), _layer_weights(model, "W_out")
            d_mlp, d_model = self.W_in[0].shape[-1], self.W_out[0].shape[-1]
            self.b_in = _zeros_if_none(_weight(model, "b_in"), (self.n_layers, d_mlp), self.W_in[0])
            self.b_out = _zeros_if_none(_weight(model, "b_out"), (self.n_layers, d_model), self.W_in[0])
            if self.gated:
                if _weight_of_block(model.blocks[0], "W_gate") is None and _weight(model, "W_gate") is None:
                    raise CircuitsError("cfg.gated_mlp is True but the bridge has no W_gate")
                self.W_gate = _layer_weights(model, "W_gate")
                self.b_gate = _zeros_if_none(_weight(model, "b_gate"), (self.n_layers, d_mlp), self.W_in[0])
        self.W_U = model.W_U.detach()
        self.b_U = _zeros_if_none(_weight(model, "b_U"), (self.W_U.shape[-1],), self.W_U)

    def _read_norms(self, model) -> None:
        cfg = self.cfg
        blocks = [model.blocks[layer] for layer in range(self.n_layers)]
        self.ln1 = [_norm_of(getattr(block, "ln1", None), cfg) for block in blocks]
        # GPT-J's parallel block has one norm that attention and MLP share
        self.ln2 = [_norm_of(_mlp_norm(block, self.parallel), cfg) for block in blocks]
        self.ln_final = _norm_of(getattr(model, "ln_final", None), cfg)
        # OLMo-2: RMSNorm after attention and after the MLP instead of before
        self.ln1_post = [_rms_of(b.ln1_post) if getattr(b, "ln1_post", None) is not None else None for b in blocks]
        self.ln2_post = [_rms_of(b.ln2_post) if getattr(b, "ln2_post", None) is not None else None for b in blocks]
        self.q_norm = [_qk_norm(block, "q_norm", self.d_head) for block in blocks]
        self.k_norm = [_qk_norm(block, "k_norm", self.d_head) for block in blocks]
        # QK-norm across all heads (OLMo-2: weight [head * d_head]) or per head (weight [d_head])
        self.qk_across = [q is not None and q.weight is not None and q.weight.numel() == self.n_heads * self.d_head > self.d_head
                          for q in self.q_norm]
        for layer, norm in enumerate(self.k_norm):
            if norm is not None and norm.weight is not None and self.qk_across[layer] and self.n_kv < self.n_heads:
                # k ports are per query head: expand the weight by group (a repeated group keeps its RMS)
                w = _per_query_head(norm.weight.view(1, self.n_kv, self.d_head), self.n_heads).reshape(-1)
                self.k_norm[layer] = _Norm("RMS", w, None, norm.eps)

    # ------------------------------------------------------------------ rotary

    def _rotate(self, x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor) -> Tensor:
        dim = cos.shape[-1]
        rot, rest = x[..., :dim], x[..., dim:]
        if self.adjacent_pairs:  # GPT-J / native: (x0, x1) -> (-x1, x0) for each adjacent pair
            rotated = torch.stack([-rot[..., 1::2], rot[..., 0::2]], dim=-1).flatten(-2)
        else:  # halves (Llama, GPTNeoX): (x_a, x_b) -> (-x_b, x_a)
            half = dim // 2
            rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        rot = rot * cos[None, :, None, :] + rotated * sin[None, :, None, :]
        return torch.cat([rot, rest], dim=-1)

    # ------------------------------------------------------------------ forward

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        x = self.W_E[tokens]
        if self.W_pos is not None:
            x = x + self.W_pos[: tokens.shape[1]][None]
        return x

    def run(
        self,
        tokens: Int[Tensor, "batch pos"],
        *,
        ablate: Tensor | None = None,
        reference: Float[Tensor, "n_forward batch pos d_model"] | None = None,
        input_embeds: Float[Tensor, "batch pos d_model"] | None = None,
        grad_ports: bool = False,
        logit_positions: Tensor | None = None,
        keep_writers: bool = True,
        trace: dict[str, Tensor] | None = None,
        replace: Float[Tensor, "k n_forward"] | None = None,
    ) -> Run:
        """Forward ``tokens``; with ``ablate`` [k, n_forward, n_backward] (or 2-D), run k copies.

        Copy ``i`` (batch rows ``i*B..(i+1)*B``) gives reader ``v`` the ``reference`` output of
        writer ``u`` wherever ``ablate[i, u, v]`` is 1 (values in between interpolate).
        ``input_embeds`` replaces the ``input`` writer's output (for integrated gradients).
        ``grad_ports`` adds a zero tensor requiring grad at every port (see :meth:`port_grads`).
        ``logit_positions`` (sorted positions) unembeds only there: ``logits`` is then
        [batch, len(logit_positions), vocab]. ``keep_writers=False`` (no ablation only) skips
        collecting per-writer outputs (``writers`` is then empty). ``trace`` (a dict) receives
        each layer's pattern, attention and MLP output under the bridge's hook names (the
        self-check's diagnosis). ``replace`` [k, n_forward] runs k copies in which every reader
        gets writer ``u``'s ``reference`` output where ``replace[i, u]`` is 1: the same as
        ablating all of ``u``'s edges, without a residual per port (node effects).
        """
        spec = self.spec
        if input_embeds is None:
            input_embeds = self.embed(tokens)
        n_copies = 1
        if replace is not None:
            if ablate is not None or reference is None or tuple(replace.shape[1:]) != (spec.n_forward,):
                raise CircuitsError(f"replacing writers needs a [k, {spec.n_forward}] mask and the reference outputs, "
                                    "without an edge ablation")
            replace = replace.to(self.dtype)
            n_copies = replace.shape[0]
            input_embeds = _replaced(input_embeds.repeat(n_copies, 1, 1), reference[0], replace[:, 0])
        state: _Ablation | None = None
        if ablate is not None:
            if reference is None:
                raise CircuitsError("ablating edges needs the reference writer outputs (corrupted or mean run)")
            if ablate.ndim == 2:
                ablate = ablate[None]
            if tuple(ablate.shape[1:]) != spec.shape:
                raise CircuitsError(f"ablation mask has shape {tuple(ablate.shape)}, expected [k, {spec.n_forward}, {spec.n_backward}]")
            valid = torch.tensor(spec.valid, device=ablate.device)  # a copy: spec.valid is read-only
            ablate = (ablate * valid).to(self.dtype)
            n_copies = ablate.shape[0]
            input_embeds = input_embeds.repeat(n_copies, 1, 1)
            state = _Ablation(ablate, reference, n_copies)
        if grad_ports and ablate is None:
            # the fast path differentiates q/k/v themselves: they must be part of the graph
            input_embeds = input_embeds + torch.zeros((), dtype=input_embeds.dtype, device=input_embeds.device,
                                                      requires_grad=True)
        batch, n_pos, _ = input_embeds.shape
        H = self.n_heads
        cos_sin = (self.rotary_table[0][:n_pos], self.rotary_table[1][:n_pos]) if self.rotary_table is not None else None
        # bidirectional models attend everywhere: no mask
        mask = torch.ones(n_pos, n_pos, dtype=torch.bool, device=self.device).tril() if self.causal else None
        # written in place (detached) with keep_writers: no list of outputs to stack at the end;
        # an ablated run keeps (output - reference) instead
        writers = (input_embeds.new_empty((spec.n_forward, *input_embeds.shape)) if keep_writers
                   else input_embeds.new_zeros(0))
        ports: list[Tensor] = []  # filled only with grad_ports
        n_written = 0

        def emit(*outs: Tensor) -> None:
            nonlocal n_written
            for out in outs:
                if keep_writers:
                    writers[n_written] = out.detach()
                if state is not None:
                    state.add(n_written, out)
                n_written += 1

        emit(input_embeds)
        resid = input_embeds
        reader = 0  # index of the first port of the current layer in backward order

        def port_input(base: Tensor, first: int, count: int) -> Tensor:
            x = base[:, :, None, :].expand(-1, -1, count, -1)
            term = state.term(n_written, first, count) if state is not None else None
            if term is not None:
                x = x - term
            if grad_ports:
                zero = torch.zeros_like(x, requires_grad=True)
                ports.append(zero)
                x = x + zero
            return x

        port_inputs: list[Tensor] = []

        for layer in range(self.n_layers):
            ported = state.ported(n_written, reader, 3 * H) if state is not None else None
            if ported is None or not (grad_ports or bool(ported.any())):
                # Every port of the layer reads the same residual (also in an ablated run whose
                # ablations are all in later layers): normalise once. Gradients per port come
                # from d/dq, d/dk, d/dv through the norm's vjp (see port_grads).
                normed = self.ln1[layer](resid)
                qkv = einops.einsum(normed, self.W_QKV[layer], "b p d, h d e -> b p h e") + self.b_QKV[layer]
                if grad_ports:
                    ports.append(qkv)
                    port_inputs.append(resid.detach())
            elif grad_ports or bool(ported.all()):
                # each q, k, v port reads its own (partly ablated) residual
                normed = self.ln1[layer](port_input(resid, reader, 3 * H))
                qkv = einops.einsum(normed, self.W_QKV[layer], "b p h d, h d e -> b p h e") + self.b_QKV[layer]
            else:  # a few ports per copy are ablated (exact patching): the others share one residual
                term = state.term(n_written, reader, 3 * H) if state is not None else None
                qkv = self._sparse_port_qkv(layer, resid, ported, term, n_copies)
            q, k, v = self._qk_normed(layer, qkv)
            if cos_sin is not None:
                q, k = self._rotate(q, *cos_sin), self._rotate(k, *cos_sin)
            pattern = self._pattern(q, k, mask)
            z = einops.einsum(pattern, v, "b h q k, b k h e -> b q h e")
            post = self.ln1_post[layer]
            if keep_writers or ablate is not None or replace is not None:
                heads = einops.einsum(z, self.W_O[layer], "b p h e, h e d -> h b p d")
                if post is not None:  # a head writes its share of the normalised attention output
                    total = heads.sum(0) + self.b_O[layer]
                    heads, bias = post.split(heads, total), post.split(self.b_O[layer].expand_as(total)[None], total)[0]
                else:
                    bias = self.b_O[layer]
                if replace is not None and reference is not None:
                    heads = torch.stack([_replaced(heads[h], reference[n_written + h], replace[:, n_written + h])
                                         for h in range(H)])
                emit(*heads.unbind(0))
                attn_out = heads.sum(0) + bias
            else:
                attn_out = einops.einsum(z, self.W_O[layer], "b p h e, h e d -> b p d") + self.b_O[layer]
                attn_out = post(attn_out) if post is not None else attn_out
            if trace is not None:
                trace[f"blocks.{layer}.attn.hook_pattern"] = pattern
                trace[f"blocks.{layer}.hook_attn_out"] = attn_out
            reader += 3 * H
            if self.has_mlp:
                base = resid if self.parallel else resid + attn_out
                mlp_in = port_input(base, reader, 1)[:, :, 0]
                mlp_out = self._mlp(layer, mlp_in)
                if replace is not None and reference is not None:
                    mlp_out = _replaced(mlp_out, reference[n_written], replace[:, n_written])
                if trace is not None:
                    trace[f"blocks.{layer}.hook_mlp_out"] = mlp_out
                emit(mlp_out)
                reader += 1
                resid = resid + attn_out + mlp_out
            else:
                resid = resid + attn_out
        final = port_input(resid, reader, 1)[:, :, 0]
        if logit_positions is not None:
            final = final[:, logit_positions]
        logits = self.ln_final(final) @ self.W_U + self.b_U
        if self.logits_cap > 0:
            logits = self.logits_cap * torch.tanh(logits / self.logits_cap)
        return Run(logits, writers, ports if grad_ports else None, port_inputs if ablate is None and grad_ports else None)

    def _sparse_port_qkv(self, layer: int, resid: Float[Tensor, "kb pos d_model"], ported: Tensor,
                         term: Tensor | None, n_copies: int) -> Float[Tensor, "kb pos three_head d_head"]:
        """q/k/v of every port, each ablated (copy, port) pair from its own residual and every
        other port from the copy's shared one: the same values as a residual per port, with
        the per-port work only where ``ported`` [k, 3H] says a port is ablated."""
        normed = self.ln1[layer](resid)
        qkv = einops.einsum(normed, self.W_QKV[layer], "b p d, h d e -> b p h e") + self.b_QKV[layer]
        if term is None:
            return qkv
        batch, n_pos = resid.shape[0] // n_copies, resid.shape[1]
        copies, ports = torch.nonzero(ported, as_tuple=True)
        by_copy = (resid.view(n_copies, batch, n_pos, -1), term.view(n_copies, batch, n_pos, term.shape[2], -1))
        x = by_copy[0][copies] - by_copy[1][copies, :, :, ports]  # [pairs, b, p, d]
        own = einops.einsum(self.ln1[layer](x), self.W_QKV[layer][ports], "n b p d, n d e -> n b p e")
        qkv = qkv.view(n_copies, batch, n_pos, *qkv.shape[2:]).clone()
        qkv[copies, :, :, ports] = own + self.b_QKV[layer][ports][:, None, None]
        return qkv.view(n_copies * batch, n_pos, *qkv.shape[3:])

    def _qk_normed(self, layer: int, qkv: Float[Tensor, "batch pos three_head d_head"]) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [batch pos head d_head], with QK-norm where the model has it.

        Across heads (OLMo-2) the norm sees the concatenation of every head's projection, each
        from its own port's input (as TL's split-qkv path does); per head it sees one head's.
        """
        H = self.n_heads
        q, k, v = qkv[:, :, :H], qkv[:, :, H : 2 * H], qkv[:, :, 2 * H :]
        q_norm, k_norm = self.q_norm[layer], self.k_norm[layer]
        if self.qk_across[layer]:
            if q_norm is not None:
                q = q_norm(q.flatten(-2)).view_as(q)
            if k_norm is not None:
                k = k_norm(k.flatten(-2)).view_as(k)
        else:
            q = q_norm(q) if q_norm is not None else q
            k = k_norm(k) if k_norm is not None else k
        if self.clip_qkv is not None:  # OLMo / OLMoE: after the QK-norm, before the rotary (as HF and TL)
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        return q, k, v

    def _pattern(self, q: Float[Tensor, "batch pos head d_head"], k: Float[Tensor, "batch pos head d_head"],
                 mask: Tensor | None) -> Float[Tensor, "batch head query key"]:
        scores = einops.einsum(q, k, "b q h e, b k h e -> b h q k") / self.attn_scale
        if self.attn_cap > 0:  # soft cap before the mask, as Gemma-2 and TL's native model do
            scores = self.attn_cap * torch.tanh(scores / self.attn_cap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1)

    def _mlp(self, layer: int, mlp_in: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        x = self.ln2[layer](mlp_in)
        pre = x @ self.W_in[layer] + self.b_in[layer]
        if self.gated:  # SwiGLU / GeGLU: the activation gates the linear "in" projection
            hidden = self.act(x @ self.W_gate[layer] + self.b_gate[layer]) * pre
        else:
            hidden = self.act(pre)
        out = hidden @ self.W_out[layer] + self.b_out[layer]
        post = self.ln2_post[layer]
        return post(out) if post is not None else out

    def port_groups(self) -> list[tuple[int, int, int]]:
        """The reader ports by group, as :meth:`port_grads_by_group` returns their gradients:
        (first port, end, number of writers before the group), in backward order: each layer's
        q/k/v ports, its MLP port, then the logits."""
        return self._groups

    @functools.cached_property
    def _groups(self) -> list[tuple[int, int, int]]:
        valid, groups, first = self.spec.valid, [], 0
        sizes = [size for _ in range(self.n_layers) for size in ([3 * self.n_heads, 1] if self.has_mlp
                                                                  else [3 * self.n_heads])] + [1]
        for size in sizes:
            rows = np.nonzero(valid[:, first : first + size].any(1))[0]
            groups.append((first, first + size, int(rows.max()) + 1 if len(rows) else 0))
            first += size
        return groups

    def cost(self, task, kind: str) -> float:
        """Bytes one example of ``task`` needs in one copy of a computation of ``kind``: ``run``
        (a forward keeping its writer outputs), ``grad`` (a forward with per-port gradients and
        its backward, the products with the deltas), ``ablated`` (an edge-ablated copy),
        ``replaced`` (a node-replaced copy) or ``kept`` (what a chunk holds per example
        whatever its copies: deltas or reference outputs and gradient sums).

        Estimates from the tensors each one makes (float size, residuals per writer and per
        port, attention patterns, MLP activations, logits at the answer positions), with a
        margin: the test of ``tests/test_budget.py`` checks a step's peak RSS against them.
        """
        size = self.W_E.element_size()
        n_pos, d = task.seq_len, self.W_E.shape[-1]
        n_at = int(torch.unique(task.answer_pos % n_pos).numel())
        vocab, d_mlp = self.W_U.shape[-1], (self.W_in[0].shape[-1] if self.has_mlp else 0)
        resid = size * n_pos * d  # one example's residual
        n_f, n_b, ports = self.spec.n_forward, self.spec.n_backward, 3 * self.n_heads + 1
        layer = size * n_pos * (8 * d + 3 * self.n_heads * n_pos + 3 * d_mlp)  # one layer's activations
        logits = size * n_at * vocab
        per_kind = {
            "run": 2 * n_f * resid + 2 * logits + layer,
            "grad": self.n_layers * layer + (n_b + n_f + 4 * ports) * resid + 3 * logits,
            "ablated": (n_f + 5 * ports) * resid + 2 * logits + layer,
            "replaced": (3 * self.n_heads + 8) * resid + 2 * logits + layer,
            "kept": (2 * n_f + n_b) * resid,
        }
        return 1.25 * per_kind[kind]

    def port_grads_by_group(self, run: Run, value: Tensor) -> list[Float[Tensor, "batch pos ports d_model"]]:
        """``d value / d input of each reader port``, one tensor per group of :meth:`port_groups`."""
        if run.ports is None:
            raise CircuitsError("port_grads needs a run made with grad_ports=True")
        grads = torch.autograd.grad(value, run.ports)
        out: list[Tensor] = []
        it = iter(grads)
        for layer in range(self.n_layers):
            if run.port_inputs is not None:
                g_normed = einops.einsum(next(it), self.W_QKV[layer], "b p h e, h d e -> b p h d")
                out.append(self.ln1[layer].vjp(run.port_inputs[layer], g_normed))
            else:
                out.append(next(it))  # [b p 3H d]
            if self.has_mlp:
                out.append(next(it))
        out.append(next(it))
        return out

    def port_grads(self, run: Run, value: Tensor) -> Float[Tensor, "n_backward batch pos d_model"]:
        """``d value / d input of each reader port``, stacked in ``spec.backward_names`` order."""
        return torch.cat(self.port_grads_by_group(run, value), dim=2).permute(2, 0, 1, 3)


# ---------------------------------------------------------------------- reading the model


def _per_query_head(weight: Tensor, n_heads: int) -> Tensor:
    """[layer, kv_head, ...] -> [layer, head, ...]: query head h uses kv group h // (n_heads / kv_heads)."""
    n_kv = weight.shape[1]
    return weight if n_kv == n_heads else weight.repeat_interleave(n_heads // n_kv, dim=1)


def _weight_of_block(block, name: str) -> Tensor | None:
    """``block.mlp.<name>`` detached (a view of the block's weight), or None where it has none."""
    try:
        value = getattr(block.mlp, name)
    except (AttributeError, ValueError, RuntimeError):
        return None
    return None if value is None else value.detach()


def _layer_weights(model, name: str) -> list[Tensor]:
    """Each block's MLP weight ``name`` as a list (views, no copy); the stacked ``model.<name>``
    where a block does not expose it (the self-check then compares the forward either way)."""
    per_block = [_weight_of_block(block, name) for block in model.blocks]
    if all(w is not None for w in per_block):
        return [w for w in per_block if w is not None]
    stacked = _weight(model, name)
    if stacked is None:
        raise CircuitsError(f"the bridge has no MLP weight {name}")
    return list(stacked.unbind(0))


def _zeros_if_none(bias: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device) if bias is None else bias


def _qk_norm(block, name: str, d_head: int) -> _Norm | None:
    """The attention's ``q_norm`` / ``k_norm`` (RMSNorm), or None; other QK-norms are refused."""
    module = getattr(block.attn, name, None)
    if module is None:
        return None
    inner = getattr(module, "original_component", module)
    if "RMS" not in type(inner).__name__:
        raise CircuitsError(f"QK-norm {type(inner).__name__} ({name}) is not supported by circuit discovery (RMSNorm only)")
    return _rms_of(module)


def _mlp_norm(block, parallel: bool):
    """The norm before the MLP: ``ln2``, or in a parallel block without one (GPT-J) the shared ``ln1``."""
    ln2 = getattr(block, "ln2", None)
    return getattr(block, "ln1", None) if ln2 is None and parallel else ln2


def _hf_attention(model):
    attn = model.blocks[0].attn
    return getattr(attn, "original_component", None)


def _clip_qkv(model) -> float | None:
    """OLMo's ``clip_qkv``: q, k and v clamped to [-c, c], read where TL's attention reads it."""
    clip = getattr(getattr(_hf_attention(model), "config", None), "clip_qkv", None)
    return None if clip is None else float(clip)


def _attention_scale(model) -> float:
    """What scores are divided by: the HF attention's own ``scaling``, else as TL's native model."""
    cfg = model.cfg
    scaling = getattr(_hf_attention(model), "scaling", None)
    if isinstance(scaling, int | float) and scaling > 0:
        return 1.0 / float(scaling)
    scale = float(getattr(cfg, "attn_scale", -1.0) or -1.0)
    # NativeAttention: attn_scale when use_attn_scale and attn_scale > 0, else sqrt(d_head)
    return scale if getattr(cfg, "use_attn_scale", True) and scale > 0 else math.sqrt(int(cfg.d_head))


_STATIC_ROPE = ("default", "linear", "llama3", "yarn", "proportional")


def _adjacent_pairs(model) -> bool:
    """GPT-J, TL's native model and ``rotary_adjacent_pairs`` rotate adjacent pairs; the rest halves."""
    architecture = getattr(model.cfg, "architecture", None)
    return bool(getattr(model.cfg, "rotary_adjacent_pairs", False)) or architecture in ("GPTJForCausalLM",
                                                                                          "TransformerLensNative")


def _rotary_table(model, d_head: int) -> tuple[Tensor, Tensor]:
    """cos, sin [n_ctx, rotary_dim] in the layout the model rotates (halves or adjacent pairs)."""
    cfg, original = model.cfg, getattr(model, "original_model", None)
    n_ctx = int(cfg.n_ctx)
    native = getattr(original, "rotary", None)
    if native is not None and hasattr(native, "cos_cached"):  # TL native: tables already interleaved
        return native.cos_cached[:n_ctx].detach(), native.sin_cached[:n_ctx].detach()
    dtype = model.W_E.dtype
    if getattr(cfg, "architecture", None) == "GPTJForCausalLM":
        table = next((m for m in original.modules() if hasattr(m, "embed_positions")), None) if original is not None else None
        sincos = getattr(table, "embed_positions", None)
        if sincos is None:
            raise CircuitsError("GPT-J has no embed_positions table: cannot read its rotary positions")
        sin, cos = sincos[:n_ctx].detach().float().chunk(2, dim=-1)
        return cos.repeat_interleave(2, -1).to(dtype), sin.repeat_interleave(2, -1).to(dtype)
    rope = next((m for m in original.modules() if hasattr(m, "inv_freq") and hasattr(m, "attention_scaling")), None) \
        if original is not None else None
    if rope is None:
        raise CircuitsError(f"rotary model {cfg.architecture!r} has no rotary module with inv_freq: not supported by "
                            "circuit discovery")
    rope_type = getattr(rope, "rope_type", "default")
    if rope_type not in _STATIC_ROPE:
        raise CircuitsError(f"circuit discovery does not support rope_type {rope_type!r}: its frequencies depend on the "
                            f"sequence length (supported: {', '.join(_STATIC_ROPE)})")
    inv_freq = rope.inv_freq.detach().float()
    angles = torch.arange(n_ctx, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq[None]
    scaling = float(rope.attention_scaling)
    if _adjacent_pairs(model):
        emb = angles.repeat_interleave(2, -1)
    else:
        emb = torch.cat([angles, angles], dim=-1)
    if emb.shape[-1] > d_head:
        raise CircuitsError(f"rotary dimension {emb.shape[-1]} exceeds d_head {d_head}")
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


# ---------------------------------------------------------------------- the self-check

SELF_CHECK_RTOL = 1e-4  # relative max error of the probe's logits
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> fingerprint it passed with


def probe_tokens(cfg) -> Int[Tensor, "2 pos"]:
    """2 x min(n_ctx, 16) deterministic tokens spread over the vocabulary."""
    n = min(int(cfg.n_ctx), 16)
    vocab = int(cfg.d_vocab)
    return (torch.arange(2 * n) * 7919 + 3).remainder(vocab).view(2, n)


def _fingerprint(model) -> tuple:
    """Which weights (storage and in-place version) and config values a check passed with."""
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    config = tuple(sorted((k, repr(v)) for k, v in vars(model.cfg).items() if not k.startswith("_")))
    return weights, config


def self_check(fm: FunctionalModel, model) -> None:
    """The functional forward's logits equal the bridge's on :func:`probe_tokens`, else one-line CircuitsError.

    Cached per model object: a model whose weights (storage or in-place version) and config
    are those of an earlier passing check is not probed again.
    """
    fingerprint = _fingerprint(model)
    if _CHECKED.get(model) == fingerprint:
        return
    tokens = probe_tokens(model.cfg).to(fm.device)
    was_training = model.training
    model.eval()  # dropout would make the bridge's probe differ by chance
    try:
        with torch.no_grad():
            expected = model(tokens)
            got = fm.run(tokens, keep_writers=False).logits
        error = _relative_error(got, expected)
        if not error <= SELF_CHECK_RTOL:  # also catches NaN
            raise CircuitsError(_diagnose(fm, model, tokens, error))
    finally:
        model.train(was_training)
    _CHECKED[model] = fingerprint


def _relative_error(got: Tensor, expected: Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-12)
    return float(((got - expected).abs().max() / scale).item())


_FEATURES = {
    "hook_pattern": "the attention pattern (mask / attention_dir, attention scale, rotary positions, QK-norm or soft cap)",
    "hook_attn_out": "the attention output (values, grouped-query heads, W_O or a post-attention norm)",
    "hook_mlp_out": "the MLP output (activation, gate or a post-MLP norm)",
}


def _diagnose(fm: FunctionalModel, model, tokens: Tensor, error: float) -> str:
    """One line: where the functional forward first departs from the bridge's, and what that points at."""
    head = (f"circuit discovery's functional forward does not reproduce this {getattr(model.cfg, 'architecture', '')} "
            f"model (probe logits differ by {error:.1e} relative, above {SELF_CHECK_RTOL:g})")
    trace: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            fm.run(tokens, keep_writers=False, trace=trace)
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in trace)
    except Exception:  # the diagnosis is best effort: the error size is still reported
        return head
    for layer in range(fm.n_layers):
        for hook in ("hook_pattern", "hook_attn_out", "hook_mlp_out"):
            name = f"blocks.{layer}.attn.{hook}" if hook == "hook_pattern" else f"blocks.{layer}.{hook}"
            if name in trace and name in cache and _relative_error(trace[name], cache[name]) > SELF_CHECK_RTOL:
                return f"{head}: first at {name}, {_FEATURES[hook]}"
    return f"{head}: every layer agrees, so the final norm or unembedding (ln_final, output soft cap) differs"
