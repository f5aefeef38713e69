"""Checkpoints that are not a safetensors folder, read safely and converted once to one.

Loading boots a folder holding ``config.json`` + safetensors weights (ours, or a Hugging Face
``save_pretrained`` folder). Everything else a run may hold is turned into such a folder in
``RUN/.circuits-converted/step{N}/``, written atomically and reused while its sources are
unchanged (same size and modification time, recorded in its ``converted.json``):

- a ``NAME_{N}.safetensors`` file with ``config.json`` beside it: a folder linking to it;
- PyTorch ``.pt`` / ``.bin`` / ``.pth`` state dicts: read only through
  ``torch.load(weights_only=True)``, which rebuilds tensors and plain values and refuses any
  other pickled object without running it; written as ``model.safetensors``;
- nanoGPT's ``ckpt.pt`` (``model_args``, ``model``, ``iter_num``, ``config``): converted to a
  Hugging Face GPT-2 folder (the safer path: TransformerLens marks its nanoGPT adapter
  internal), weights mapped as nanoGPT's own ``GPT.from_pretrained`` does, in reverse.

Nothing here unpickles anything else, and nothing is written outside the run's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circuits.errors import CircuitsError, first_line
from circuits.layouts import CONVERTED_DIR, WEIGHT_SUFFIXES

PICKLED_SUFFIXES = (".pt", ".bin", ".pth")
CONVERTED_FORMAT = "circuits-converted/1"
# Files of a Hugging Face folder worth carrying into its converted copy (config and tokenizer).
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
# nanoGPT's Linear weights are (out, in); GPT-2's Conv1D weights are (in, out).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def safe_torch_load(path: Path) -> Any:
    """A PyTorch file's contents, tensors and plain values only: nothing in it runs."""
    import pickle
    import zipfile

    import torch

    # torch.save's zip archives map lazily (reading a big checkpoint's config reads no weights);
    # the legacy format cannot be mapped.
    mmap = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():  # torch warns of the pickle it refuses: the error says it in one line
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except pickle.UnpicklingError:
        raise CircuitsError(f"{path}: holds a pickled object other than tensors and plain values; refused "
                            "(PyTorch files are read with torch.load(weights_only=True), which runs nothing)") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError, IndexError) as err:
        raise CircuitsError(f"{path}: not a readable PyTorch file ({first_line(err, 160)})") from None


def state_dict_of(obj: Any, path: Path) -> dict[str, Any]:
    """``obj`` (read from ``path``) when it is a state dict, names -> tensors; else one line naming the file."""
    import torch

    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "a mapping that is not all names -> tensors"
        raise CircuitsError(f"{path}: not a state dict (got {kind}); expected a mapping of parameter names to tensors")
    return obj


# ---------------------------------------------------------------- nanoGPT


@dataclass(frozen=True)
class NanoGPT:
    """A nanoGPT ``ckpt.pt``: model arguments, weights, the iteration and the training config."""

    path: Path
    model_args: dict[str, Any]
    state: dict[str, Any]
    iter_num: int | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int | None:
        """Tokens per iteration, as nanoGPT's train.py counts them: gradient accumulation x batch x block.

        nanoGPT stores ``gradient_accumulation_steps`` before dividing it among processes, so
        this product already covers every device."""
        values = [self.config.get("gradient_accumulation_steps"), self.config.get("batch_size"),
                  self.config.get("block_size", self.model_args.get("block_size"))]
        counts = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
        return counts[0] * counts[1] * counts[2] if len(counts) == 3 else None


def nanogpt_file(path: Path) -> Path | None:
    """The file that would hold a nanoGPT checkpoint at ``path``: ``ckpt.pt`` in a folder, or a
    PyTorch file with no ``config.json`` beside it (which only nanoGPT's own arguments can describe)."""
    if path.is_dir():
        return path / "ckpt.pt" if (path / "ckpt.pt").is_file() and not (path / "config.json").exists() else None
    if path.suffix in PICKLED_SUFFIXES and not (path.parent / "config.json").exists():
        return path
    return None


def read_nanogpt(path: Path) -> NanoGPT:
    data = safe_torch_load(path)
    if not isinstance(data, dict) or not isinstance(data.get("model_args"), dict) or "model" not in data:
        raise CircuitsError(f"{path}: not a nanoGPT checkpoint (no 'model_args' and 'model'), and no config.json "
                            "beside it to read a state dict with")
    iter_num = data.get("iter_num")
    config = data.get("config")
    return NanoGPT(path, data["model_args"], state_dict_of(data["model"], path),
                   iter_num if isinstance(iter_num, int) else None, config if isinstance(config, dict) else {})


def gpt2_config(ckpt: NanoGPT):
    """The Hugging Face GPT-2 config of a nanoGPT model (exact GELU, LayerNorm eps 1e-5, no dropout)."""
    from transformers import GPT2Config

    args = ckpt.model_args
    need = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    missing = [k for k in need if not isinstance(args.get(k), int)]
    if missing:
        raise CircuitsError(f"{ckpt.path}: model_args lacks {', '.join(missing)} (expected integers for {', '.join(need)})")
    vocab = int(args["vocab_size"])
    special = 50256 if vocab > 50256 else None  # GPT-2's <|endoftext|>, when the vocabulary has it
    return GPT2Config(n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                      n_positions=args["block_size"], vocab_size=vocab, activation_function="gelu",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                      bos_token_id=special, eos_token_id=special, architectures=["GPT2LMHeadModel"])


def gpt2_state_dict(ckpt: NanoGPT, expected: dict[str, Any]) -> dict[str, Any]:
    """nanoGPT weights under GPT-2's names and shapes; ``expected``: the GPT-2 model's own state dict.

    Reverses nanoGPT's ``from_pretrained``: strip ``torch.compile``'s ``_orig_mod.`` prefix, drop
    the causal-mask buffers, transpose the Conv1D weights; ``bias=False`` models get zero biases."""
    import torch

    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt.state.items()}
    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    state = {k: v.t().contiguous() if k.endswith(CONV1D_WEIGHTS) else v for k, v in state.items()}
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise CircuitsError(f"{ckpt.path}: weight {unknown[0]!r} is not part of nanoGPT's GPT "
                            f"({len(unknown)} such); a modified model cannot be converted to GPT-2")
    if ckpt.model_args.get("bias", True) is False:
        for name, tensor in expected.items():
            if name.endswith(".bias") and name not in state:
                state[name] = torch.zeros(tensor.shape, dtype=tensor.dtype)  # ``expected`` is on the meta device
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    missing = sorted(k for k in expected if state.get(k) is None)
    if missing:
        raise CircuitsError(f"{ckpt.path}: no weight {missing[0]!r} ({len(missing)} missing) for GPT-2 "
                            f"with these model_args")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CircuitsError(f"{ckpt.path}: weight {name!r} has shape {tuple(tensor.shape)}, expected "
                                f"{tuple(expected[name].shape)} from model_args")
    return state


def write_gpt2_folder(ckpt: NanoGPT, out: Path) -> None:
    """A Hugging Face GPT-2 folder (config.json + model.safetensors) equal to the nanoGPT model."""
    import contextlib
    import io

    import torch
    from transformers import GPT2LMHeadModel

    config = gpt2_config(ckpt)
    untied = "lm_head.weight" in ckpt.state and "transformer.wte.weight" in ckpt.state and not torch.equal(
        ckpt.state["lm_head.weight"], ckpt.state["transformer.wte.weight"])
    config.tie_word_embeddings = not untied  # nanoGPT ties them; a modified copy may not
    with torch.device("meta"):
        shapes = GPT2LMHeadModel(config).state_dict()
    state = gpt2_state_dict(ckpt, shapes)
    model = GPT2LMHeadModel(config)
    model.load_state_dict({k: v.to(shapes[k].dtype) for k, v in state.items()}, strict=True)
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' progress bars
        model.eval().save_pretrained(out)


# ---------------------------------------------------------------- the conversion cache


def bootable_folder(path: Path, root: Path, step: int) -> Path:
    """A folder that loads as step ``step``: ``path`` itself when it already is one, else its
    conversion under ``root/.circuits-converted/step{step}/`` (made once, reused while fresh)."""
    if path.is_dir():
        config = _read_json(path / "config.json")
        if config is None:
            nano = nanogpt_file(path)
            return _cached(root, step, [nano], lambda out: write_gpt2_folder(read_nanogpt(nano), out)) if nano else path
        pickled = _pickled_weights(path)
        if _is_hf_config(config) and pickled and not any(path.glob("*.safetensors")):
            sides = [path / n for n in HF_SIDE_FILES if (path / n).is_file()]
            return _cached(root, step, pickled + sides, lambda out: _write_state_dict(pickled, sides, out))
        return path  # our own folder, or one the loader will explain (never a pickle: see _pickled_weights)
    nano = nanogpt_file(path)
    if nano is not None:
        return _cached(root, step, [nano], lambda out: write_gpt2_folder(read_nanogpt(nano), out))
    config_file = path.parent / "config.json"
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CircuitsError(f"{path}: not a checkpoint (expected a folder, or a {'/'.join(WEIGHT_SUFFIXES)} file)")
    sides = [config_file] + [path.parent / n for n in HF_SIDE_FILES[1:] if (path.parent / n).is_file()]
    if path.suffix == ".safetensors":
        return _cached(root, step, [path, *sides], lambda out: _link_safetensors(path, sides, out))
    return _cached(root, step, [path, *sides], lambda out: _write_state_dict([path], sides, out))


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # the loader names the file and the fault
    return data if isinstance(data, dict) else {}


def _is_hf_config(config: dict[str, Any]) -> bool:
    return "architectures" in config or "model_type" in config


def _pickled_weights(folder: Path) -> list[Path]:
    """A Hugging Face folder's PyTorch weights (``pytorch_model*.bin``, ``model.pt``): never a
    Trainer's ``training_args.bin``, ``optimizer.pt`` or ``rng_state.pth``, which are not weights."""
    names = sorted(p for p in folder.iterdir() if p.is_file() and (
        (p.name.startswith("pytorch_model") and p.suffix == ".bin") or p.name in ("model.pt", "model.bin", "model.pth")))
    return names


def _write_state_dict(weights: list[Path], sides: list[Path], out: Path) -> None:
    from safetensors.torch import save_file

    state: dict[str, Any] = {}
    for path in weights:  # a sharded checkpoint: the shards' names are disjoint
        state |= state_dict_of(safe_torch_load(path), path)
    # safetensors refuses tensors sharing memory (tied weights): store each once, contiguous.
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for side in sides:
        shutil.copyfile(side, out / side.name)


def _link_safetensors(weights: Path, sides: list[Path], out: Path) -> None:
    # A relative link, not a copy: the weights stay where they are, and the run folder can move.
    # ``out`` is renamed within its parent folder afterwards, so the link stays right.
    (out / "model.safetensors").symlink_to(os.path.relpath(weights, out))
    for side in sides:
        shutil.copyfile(side, out / side.name)


def _signature(sources: list[Path]) -> list[list[Any]]:
    signature = []
    for path in sources:
        stat = path.stat()
        signature.append([path.name, stat.st_size, stat.st_mtime_ns])
    return signature


def _cached(root: Path, step: int, sources: list[Path], write) -> Path:
    """``root/.circuits-converted/step{step}/``, written by ``write(folder)`` unless fresh already."""
    cache = root / CONVERTED_DIR
    final = cache / f"step{step}"
    signature = _signature(sources)
    if _fresh(final, signature):
        return final
    try:
        cache.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".step{step}.", dir=cache))
    except OSError as err:
        raise CircuitsError(f"{cache}: cannot write the conversion of step {step} ({err.strerror}); "
                            "make the run folder writable, or convert its checkpoints to safetensors") from None
    try:
        write(tmp)
        record = {"format": CONVERTED_FORMAT, "step": step, "sources": signature}
        (tmp / "converted.json").write_text(json.dumps(record, indent=1))
        _replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not _fresh(final, signature):
        raise CircuitsError(f"{final}: its sources changed while it was being converted; load it again")
    return final


def _fresh(folder: Path, signature: list[list[Any]]) -> bool:
    record = _read_json(folder / "converted.json")
    return record is not None and record.get("format") == CONVERTED_FORMAT and record.get("sources") == signature


def _replace(tmp: Path, final: Path) -> None:
    """Put ``tmp`` in place of ``final``, atomically for readers; a stale ``final`` is moved aside first."""
    if final.exists():
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():  # another process placed its own conversion meanwhile: keep that one
            raise
