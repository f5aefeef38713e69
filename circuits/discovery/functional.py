"""A functional forward over a TransformerBridge's TL-format weights, edge by edge.

Every reader port (the q, k and v input of each head, each MLP input, the logits) reads the
sum of the writer outputs before it (plus the constant attention output biases ``b_O``,
which belong to no node). That makes every edge a switch: ``ablate[u, v] = 1`` gives reader
``v`` the reference run's output of writer ``u`` (corrupted or mean) instead of the current
one, and an additive zero at each port gives ``d metric / d input of v`` in one backward.

It reproduces the bridge's logits (tests: 1e-4) for the architectures the project loads:
learned or rotary positions (GPTNeoX partial rotary), LayerNorm / RMSNorm / none, attention
only or a plain MLP (relu, gelu, gelu_new, silu), sequential or parallel attention+MLP.
Anything else (gated MLPs, grouped-query attention, post-norm) is refused with a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

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


def _detach(t):
    return None if t is None else t.detach()


@dataclass
class Run:
    """One functional forward: logits, every writer's output, and the port perturbations."""

    logits: Float[Tensor, "batch pos vocab"]
    writers: Float[Tensor, "n_forward batch pos d_model"]
    ports: list[Tensor] | None  # what port_grads differentiates: per-port zeros, or each layer's qkv (fast path)
    port_inputs: list[Tensor] | None = None  # fast path: the residual each layer's attention ports read


class FunctionalModel:
    """TL-format weights of a bridge, and a forward whose edges can be switched one by one."""

    def __init__(self, model) -> None:
        cfg = model.cfg
        self.cfg = cfg
        self.spec = GraphSpec.from_model(model)
        self.n_layers, self.n_heads = int(cfg.n_layers), int(cfg.n_heads)
        self.d_head = int(cfg.d_head)
        if getattr(cfg, "gated_mlp", False):
            raise CircuitsError("circuit discovery does not support gated MLPs yet (cfg.gated_mlp is True)")
        n_kv = getattr(cfg, "n_key_value_heads", None)
        if n_kv not in (None, cfg.n_heads):
            raise CircuitsError(f"circuit discovery needs as many key/value heads as query heads, got {n_kv} vs {cfg.n_heads}")
        self.has_mlp = self.spec.has_mlp
        self.parallel = self.spec.parallel_attn_mlp
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
            self.W_E = model.W_E.detach()
            self.W_pos = model.W_pos.detach() if pos_type == "standard" else None
            self.W_O, self.b_O = model.W_O.detach(), model.b_O.detach()
            # q, k and v of every head as one projection: [layer, 3*head, d_model, d_head]
            self.W_QKV = torch.cat([model.W_Q, model.W_K, model.W_V], dim=1).detach()
            self.b_QKV = torch.cat([model.b_Q, model.b_K, model.b_V], dim=1).detach()
            if self.has_mlp:
                self.W_in, self.b_in = model.W_in.detach(), model.b_in.detach()
                self.W_out, self.b_out = model.W_out.detach(), model.b_out.detach()
            self.W_U = model.W_U.detach()
            try:
                self.b_U = model.b_U.detach()
            except (AttributeError, ValueError, RuntimeError):
                self.b_U = torch.zeros(self.W_U.shape[-1], dtype=self.W_U.dtype, device=self.W_U.device)
        self.ln1 = [_norm_of(getattr(model.blocks[layer], "ln1", None), cfg) for layer in range(self.n_layers)]
        self.ln2 = [_norm_of(getattr(model.blocks[layer], "ln2", None), cfg) for layer in range(self.n_layers)]
        self.ln_final = _norm_of(getattr(model, "ln_final", None), cfg)
        scale = float(getattr(cfg, "attn_scale", -1.0) or -1.0)
        self.attn_scale = scale if scale > 0 else (math.sqrt(self.d_head) if getattr(cfg, "use_attn_scale", True) else 1.0)
        self._rotary_module = None
        if self.rotary:
            self._setup_rotary(model)
        self.device = self.W_E.device
        self.dtype = self.W_E.dtype

    # ------------------------------------------------------------------ rotary

    def _setup_rotary(self, model) -> None:
        cfg = self.cfg
        hf_config = getattr(getattr(model, "original_model", None), "config", None)
        rotary_dim = getattr(cfg, "rotary_dim", None)
        if rotary_dim is None and hf_config is not None:
            params = getattr(hf_config, "rope_parameters", None) or {}
            pct = params.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", getattr(hf_config, "partial_rotary_factor", 1.0)))
            rotary_dim = int(self.d_head * pct)
        self.rotary_dim = int(rotary_dim or self.d_head)
        base = None
        if hf_config is not None:
            params = getattr(hf_config, "rope_parameters", None) or {}
            base = params.get("rope_theta", getattr(hf_config, "rotary_emb_base", None))
            rope_type = params.get("rope_type", "default")
            if rope_type != "default":
                raise CircuitsError(f"rope_type {rope_type!r} is not supported by circuit discovery (default only)")
        self.rotary_base = float(base if base is not None else getattr(cfg, "rotary_base", 10000))
        if getattr(cfg, "rotary_adjacent_pairs", False):
            raise CircuitsError("rotary with adjacent pairs (GPT-J style) is not supported by circuit discovery")

    def _rotary_cos_sin(self, n_pos: int) -> tuple[Tensor, Tensor]:
        dim = self.rotary_dim
        inv_freq = 1.0 / (self.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=self.device) / dim))
        angles = torch.arange(n_pos, dtype=torch.float32, device=self.device)[:, None] * inv_freq[None]
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _rotate(self, x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor) -> Tensor:
        dim = self.rotary_dim
        rot, rest = x[..., :dim], x[..., dim:]
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
    ) -> Run:
        """Forward ``tokens``; with ``ablate`` [k, n_forward, n_backward] (or 2-D), run k copies.

        Copy ``i`` (batch rows ``i*B..(i+1)*B``) gives reader ``v`` the ``reference`` output of
        writer ``u`` wherever ``ablate[i, u, v]`` is 1 (values in between interpolate).
        ``input_embeds`` replaces the ``input`` writer's output (for integrated gradients).
        ``grad_ports`` adds a zero tensor requiring grad at every port (see :meth:`port_grads`).
        ``logit_positions`` (sorted positions) unembeds only there: ``logits`` is then
        [batch, len(logit_positions), vocab]. ``keep_writers=False`` (no ablation only) skips
        collecting per-writer outputs (``writers`` is then empty).
        """
        spec = self.spec
        if input_embeds is None:
            input_embeds = self.embed(tokens)
        n_copies = 1
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
        if grad_ports and ablate is None:
            # the fast path differentiates q/k/v themselves: they must be part of the graph
            input_embeds = input_embeds + torch.zeros((), dtype=input_embeds.dtype, device=input_embeds.device,
                                                      requires_grad=True)
        batch, n_pos, _ = input_embeds.shape
        H = self.n_heads
        cos_sin = self._rotary_cos_sin(n_pos) if self.rotary else None
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=self.device).tril()
        writers: list[Tensor] = [input_embeds]
        ports: list[Tensor] = []  # filled only with grad_ports
        resid = input_embeds
        reader = 0  # index of the first port of the current layer in backward order

        def ablation_term(first: int, count: int) -> Tensor | None:
            """[batch pos count d_model]: sum_u ablate[u, port] * (writer_u - reference_u)."""
            if ablate is None or reference is None:  # reference is set whenever ablate is (checked above)
                return None
            n_w = len(writers)
            mask = ablate[:, :n_w, first : first + count]
            if not bool(mask.any()):
                return None
            ref = reference[:n_w]
            diff = torch.stack(writers).view(n_w, n_copies, -1, n_pos, resid.shape[-1]) - ref[:, None]
            term = einops.einsum(diff, mask, "w k b p d, k w r -> k b p r d")
            return term.reshape(batch, n_pos, count, -1)

        def port_input(base: Tensor, first: int, count: int) -> Tensor:
            x = base[:, :, None, :].expand(-1, -1, count, -1)
            term = ablation_term(first, count)
            if term is not None:
                x = x - term
            if grad_ports:
                zero = torch.zeros_like(x, requires_grad=True)
                ports.append(zero)
                x = x + zero
            return x

        port_inputs: list[Tensor] = []
        for layer in range(self.n_layers):
            if ablate is None:
                # Every port of the layer reads the same residual: normalise once. Gradients per
                # port come from d/dq, d/dk, d/dv through the norm's vjp (see port_grads).
                normed = self.ln1[layer](resid)
                qkv = einops.einsum(normed, self.W_QKV[layer], "b p d, h d e -> b p h e") + self.b_QKV[layer]
                if grad_ports:
                    ports.append(qkv)
                    port_inputs.append(resid.detach())
            else:  # each q, k, v port reads its own (partly ablated) residual
                normed = self.ln1[layer](port_input(resid, reader, 3 * H))
                qkv = einops.einsum(normed, self.W_QKV[layer], "b p h d, h d e -> b p h e") + self.b_QKV[layer]
            q, k, v = qkv[:, :, :H], qkv[:, :, H : 2 * H], qkv[:, :, 2 * H :]
            if cos_sin is not None:
                q, k = self._rotate(q, *cos_sin), self._rotate(k, *cos_sin)
            scores = einops.einsum(q, k, "b q h e, b k h e -> b h q k") / self.attn_scale
            scores = scores.masked_fill(~causal, float("-inf"))
            pattern = scores.softmax(-1)
            z = einops.einsum(pattern, v, "b h q k, b k h e -> b q h e")
            if keep_writers or ablate is not None:
                heads = einops.einsum(z, self.W_O[layer], "b p h e, h e d -> h b p d")
                writers.extend(heads.unbind(0))
                attn_out = heads.sum(0) + self.b_O[layer]
            else:
                attn_out = einops.einsum(z, self.W_O[layer], "b p h e, h e d -> b p d") + self.b_O[layer]
            reader += 3 * H
            if self.has_mlp:
                base = resid if self.parallel else resid + attn_out
                mlp_in = port_input(base, reader, 1)[:, :, 0]
                hidden = self.act(self.ln2[layer](mlp_in) @ self.W_in[layer] + self.b_in[layer])
                mlp_out = hidden @ self.W_out[layer] + self.b_out[layer]
                writers.append(mlp_out)
                reader += 1
                resid = resid + attn_out + mlp_out
            else:
                resid = resid + attn_out
        final = port_input(resid, reader, 1)[:, :, 0]
        if logit_positions is not None:
            final = final[:, logit_positions]
        logits = self.ln_final(final) @ self.W_U + self.b_U
        stacked = torch.stack(writers) if keep_writers or ablate is not None else input_embeds.new_zeros(0)
        return Run(logits, stacked, ports if grad_ports else None, port_inputs if ablate is None and grad_ports else None)

    def port_grads(self, run: Run, value: Tensor) -> Float[Tensor, "n_backward batch pos d_model"]:
        """``d value / d input of each reader port``, stacked in ``spec.backward_names`` order."""
        if run.ports is None:
            raise CircuitsError("port_grads needs a run made with grad_ports=True")
        grads = torch.autograd.grad(value, run.ports)
        out: list[Tensor] = []
        it = iter(grads)
        for layer in range(self.n_layers):
            if run.port_inputs is not None:
                g_normed = einops.einsum(next(it), self.W_QKV[layer], "b p h e, h d e -> b p h d")
                g = self.ln1[layer].vjp(run.port_inputs[layer], g_normed)
            else:
                g = next(it)  # [b p 3H d]
            out.extend(g.unbind(2))
            if self.has_mlp:
                out.append(self._single_port(next(it)))
        out.append(self._single_port(next(it)))
        return torch.stack(out)

    @staticmethod
    def _single_port(grad: Tensor) -> Tensor:
        return grad[:, :, 0]
