"""Task-mask files: 1 bit per masked weight, the task head, and what they were made for (safetensors).

Layout of a ``.safetensors`` task-mask file:
- ``mask/<module>.<weight|bias>``: uint8 packed bits (:func:`abp.pack_mask` order: row-major,
  little-endian within a byte);
- ``probe/<module>``: 64 fp32 values sampled from the base weight at fixed positions, the
  fingerprint that refuses loading onto other base weights;
- ``head/<param>``: the task head's state dict;
- metadata: format, abp version, base model id, task, sparsity, shapes, mask settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from abp._atomic import atomic_path
from abp.functional import pack_mask, unpack_mask
from abp.nn import MaskedLinear
from abp.patch import MaskConfig, mask_model, masked_modules, sparsity

FORMAT = "abp-mask"
FORMAT_VERSION = "2"  # the probe positions in exact integer arithmetic (format 1's fp32 linspace was wrong past 2**24)
READABLE_VERSIONS = ("2",)
_PROBES = 64
# Unit roundoff of each weight dtype: probes of the same weights agree once rounded to the coarser dtype.
_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


class MaskFileError(ValueError):
    """A task-mask file is unreadable, corrupt, or does not fit the model."""


def _probe_positions(n: int) -> torch.Tensor:
    """Flat positions of the ``_PROBES`` fingerprint values of an ``n``-element weight (exact integer arithmetic)."""
    return torch.arange(_PROBES, dtype=torch.int64) * (n - 1) // (_PROBES - 1)


def _probe(weight: torch.Tensor) -> torch.Tensor:
    """The weight's fingerprint values."""
    flat = weight.detach().reshape(-1)
    idx = _probe_positions(flat.numel())
    return flat[idx.to(flat.device)].float().cpu()


def base_weight(module: nn.Module) -> torch.Tensor:
    """A module's weight in ``[out, in]`` layout (GPT-2's ``Conv1D`` stores it transposed)."""
    conv1d = type(module).__name__ == "Conv1D"
    return module.weight.t() if conv1d else module.weight


def _digest(probes: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(probes):
        h.update(name.encode())
        h.update(probes[name].to(torch.bfloat16).float().numpy().tobytes())  # dtype-robust display digest
    return h.hexdigest()[:16]


def _tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of a tensor's dtype, shape and bytes: a changed bit on disk is caught."""
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_mask(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    head: Optional[nn.Module | dict[str, torch.Tensor]] = None,
    base_model: Optional[str] = None,
    task: Optional[str] = None,
    metadata: Optional[dict[str, Any]] = None,
) -> dict[str, str]:
    """Write the model's hard masks (and the task head) to ``path`` atomically; returns the metadata."""
    from safetensors.torch import save_file

    import abp

    tensors: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}
    shapes, kinds, settings = {}, {}, {}
    mods = list(masked_modules(model))
    if not mods:
        raise ValueError("save_mask: the model has no masked modules (call abp.mask_model first)")
    for name, m in mods:
        for which, tensor, scores in m.score_pairs():
            key = f"{name}.{which}"
            if not torch.isfinite(scores).all():
                raise FloatingPointError(f"save_mask: scores of {key} hold NaN/inf; refusing to save a broken mask")
            tensors[f"mask/{key}"] = pack_mask(scores.detach() > 0).cpu()
            shapes[key] = list(scores.shape)
        probes[name] = _probe(m.weight)
        tensors[f"probe/{name}"] = probes[name]
        kinds[name] = type(m).__name__ + (":conv1d" if getattr(m, "source_type", "") == "conv1d" else "")
        settings[name] = {"t_l": m.t_l, "t_s": m.t_s}
    if head is not None:
        state = head.state_dict() if isinstance(head, nn.Module) else head
        for k, v in state.items():
            tensors[f"head/{k}"] = v.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "abp_version": abp.__version__,
        "base_model": str(base_model or getattr(getattr(model, "config", None), "_name_or_path", "") or "unknown"),
        "task": str(task or ""),
        "sparsity": f"{sparsity(model):.6f}",
        "fingerprint": _digest(probes),
        "weight_dtype": str(mods[0][1].weight.dtype).replace("torch.", ""),
        "shapes": json.dumps(shapes),
        "modules": json.dumps(kinds),
        "settings": json.dumps(settings),
        "bit_order": "row-major, little-endian within a byte",
        "extra": json.dumps(metadata or {}),
        "tensor_digests": json.dumps({k: _tensor_digest(v) for k, v in sorted(tensors.items())}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return meta


@dataclass
class MaskFile:
    """A task-mask file read into memory (tensors on CPU)."""

    path: str
    metadata: dict[str, str]
    masks: dict[str, torch.Tensor]  # "<module>.<weight|bias>" -> packed uint8
    probes: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]

    @property
    def shapes(self) -> dict[str, list[int]]:
        return json.loads(self.metadata["shapes"])

    @property
    def sparsity(self) -> float:
        return float(self.metadata["sparsity"])

    @property
    def extra(self) -> dict[str, Any]:
        return json.loads(self.metadata.get("extra", "{}"))


def _json(path: str, meta: dict[str, str], key: str, kind: type, default: Any = None) -> Any:
    """Metadata entry ``key`` parsed as JSON of type ``kind`` (``default`` if absent and given)."""
    if key not in meta and default is not None:
        return default
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise MaskFileError(f"mask file {path} has corrupt metadata: {key} is missing") from None
    except (ValueError, TypeError, RecursionError) as e:  # not JSON, too deep, a number past Python's limits
        raise MaskFileError(f"mask file {path} has corrupt metadata ({key}: {type(e).__name__}: {e})") from e
    if not isinstance(value, kind):
        raise MaskFileError(f"mask file {path} has corrupt metadata: {key} is a {type(value).__name__}, "
                            f"not a {kind.__name__}")
    return value


def _shape_numel(shape: Any) -> Optional[int]:
    """Elements of a JSON shape (a list of non-negative ints torch can hold), or None if it is not one."""
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**62 for d in shape):
        return None
    n = 1
    for d in shape:
        n *= d
    return n


def read_mask_file(path: str | os.PathLike) -> MaskFile:
    """Read and validate a task-mask file without touching a model."""
    from safetensors import safe_open

    path = str(path)
    if os.path.isdir(path):
        raise MaskFileError(f"mask file {path} is a directory, not a mask file")
    if not os.path.isfile(path):
        raise MaskFileError(f"mask file {path} does not exist" if not os.path.exists(path) else
                            f"mask file {path} is not a regular file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise MaskFileError(f"mask file {path} is corrupt or not a safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT:
        raise MaskFileError(f"{path} is a safetensors file but not an abp task mask (format={meta.get('format')!r})")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise MaskFileError(f"{path} has mask format version {meta.get('format_version')}; this abp reads "
                            f"{', '.join(READABLE_VERSIONS)}: load it with the abp version that wrote it")
    shapes = _json(path, meta, "shapes", dict)
    digests = _json(path, meta, "tensor_digests", dict)
    if set(digests) != set(tensors):
        raise MaskFileError(f"mask file {path} is inconsistent: tensors {sorted(set(digests) ^ set(tensors))[:5]} "
                            "are missing or were added after it was written")
    bad = [k for k in sorted(tensors) if _tensor_digest(tensors[k]) != digests[k]]
    if bad:
        raise MaskFileError(f"mask file {path} is corrupt: {', '.join(bad[:5])} changed on disk since it was "
                            "written (digest mismatch)")
    masks = {k[5:]: v for k, v in tensors.items() if k.startswith("mask/")}
    if set(masks) != set(shapes):
        raise MaskFileError(f"mask file {path} is inconsistent: masks {sorted(set(masks) ^ set(shapes))[:5]} lack shapes or data")
    for key, packed in masks.items():
        n = _shape_numel(shapes[key])
        if n is None:
            raise MaskFileError(f"mask file {path} has corrupt metadata: the shape of {key} is {shapes[key]!r}")
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
            raise MaskFileError(f"mask file {path} is corrupt: {key} holds {packed.numel()} bytes for {n} weights")
    probes = {k[6:]: v for k, v in tensors.items() if k.startswith("probe/")}
    for name, p in probes.items():
        if not p.is_floating_point() or tuple(p.shape) != (_PROBES,):
            raise MaskFileError(f"mask file {path} is corrupt: the fingerprint of {name} is {p.dtype} "
                                f"{list(p.shape)}, not {_PROBES} floats")
    try:
        sp = float(meta["sparsity"])
    except (KeyError, ValueError) as e:
        raise MaskFileError(f"mask file {path} has corrupt metadata (sparsity: {type(e).__name__}: {e})") from e
    if not 0.0 <= sp <= 1.0:
        raise MaskFileError(f"mask file {path} has corrupt metadata: sparsity {meta['sparsity']!r} is not in [0, 1]")
    wd = getattr(torch, meta.get("weight_dtype", "float32"), None)
    if not (isinstance(wd, torch.dtype) and wd.is_floating_point):
        raise MaskFileError(f"mask file {path} has corrupt metadata: weight_dtype {meta.get('weight_dtype')!r} "
                            "is not a floating-point torch dtype")
    _json(path, meta, "extra", dict, default={})
    return MaskFile(
        path=path,
        metadata=meta,
        masks=masks,
        probes=probes,
        head={k[5:]: v for k, v in tensors.items() if k.startswith("head/")},
    )


def _same_weights(got: torch.Tensor, expected: torch.Tensor, file_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Probes of the same base weights, possibly stored in another dtype (an fp16 copy of fp32 weights, say)?

    Both sides are rounded to the coarser of the two dtypes and must then agree: exactly for fp32, within
    one ulp for fp16/bf16 (a bf16 copy of an fp16 copy may round once more than a bf16 copy of fp32).
    Fine-tuning drift moves the small probes by many ulps, so it is refused.
    """
    eps = {d: _EPS.get(d, _EPS[torch.bfloat16]) for d in (file_dtype, dtype)}
    coarse = max(eps, key=eps.get)
    target = coarse if coarse in _EPS else torch.bfloat16
    a, b = got.to(target).float(), expected.to(target).float()
    if eps[coarse] == _EPS[torch.float32]:
        return torch.equal(a, b)
    # fp16 rounds tiny weights to subnormals (absolute step 2**-24): one such step is allowed too
    atol = 2.0**-24 if torch.float16 in (file_dtype, dtype) else 0.0
    return bool(((a - b).abs() <= 2 * eps[coarse] * torch.maximum(a.abs(), b.abs()) + atol).all())


def check_fingerprint(mf: MaskFile, name: str, weight: torch.Tensor) -> None:
    """The file's probes of module ``name`` match ``weight`` (the base weights the mask was learnt on)."""
    expected = mf.probes.get(name)
    if expected is None:
        raise MaskFileError(f"mask file {mf.path} has no fingerprint for {name}")
    file_dtype = getattr(torch, mf.metadata.get("weight_dtype", "float32"), torch.float32)
    if not _same_weights(_probe(weight), expected, file_dtype, weight.dtype):
        raise MaskFileError(
            f"mask file {mf.path} was made for other base weights: module {name} differs "
            f"(file base model {mf.metadata.get('base_model')!r}, fingerprint {mf.metadata.get('fingerprint')}); "
            f"load the base model the mask was trained on")


def check_head(mf: MaskFile, head: nn.Module) -> None:
    """The file's head state fits ``head``: same parameter and buffer names, same shapes."""
    if not mf.head:
        raise MaskFileError(f"mask file {mf.path} holds no task head")
    want = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in mf.head.items()}
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise MaskFileError(f"mask file {mf.path}: its task head does not fit the head given "
                            f"({', '.join(f'{k}: file {have.get(k)}, head {want.get(k)}' for k in diff[:4])})")


def load_mask(model: nn.Module, path: str | os.PathLike, *, head: Optional[nn.Module] = None) -> MaskFile:
    """Apply a task-mask file to ``model`` (masking it first if needed) and load the head into ``head``.

    Refuses, with :class:`MaskFileError` and nothing changed, a file made for other base weights or
    another architecture.
    """
    mf = read_mask_file(path)
    modules = sorted({k.rsplit(".", 1)[0] for k in mf.masks})
    if head is not None:
        check_head(mf, head)
    present = dict(masked_modules(model))
    undo = None
    if not present:  # check the plain model fully first: masking it is the first change
        names = dict(model.named_modules())
        missing = [n for n in modules if n not in names]
        if missing:
            raise MaskFileError(f"mask file {mf.path} (base model {mf.metadata.get('base_model')!r}) names modules this "
                                f"model lacks: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for n in modules:
            if not isinstance(getattr(names[n], "weight", None), torch.Tensor):
                raise MaskFileError(f"mask file {mf.path} names module {n!r}, a {type(names[n]).__name__} "
                                    "without a weight to mask")
            base = base_weight(names[n])
            check_fingerprint(mf, n, base)
            if f"{n}.weight" in mf.shapes and list(base.shape) != mf.shapes[f"{n}.weight"]:
                raise MaskFileError(f"mask file {mf.path}: {n}.weight has shape {mf.shapes[f'{n}.weight']}, "
                                    f"the model's is {list(base.shape)}")
        grads = {k: p.requires_grad for k, p in model.named_parameters()}
        undo = lambda: _restore_plain(model, names, grads)  # noqa: E731  a refused file changes nothing
        try:
            mask_model(model, MaskConfig(include=[f"^{re.escape(n)}$" for n in modules], mask_heads=True,
                                         layernorm=True, mask_bias=any(k.endswith(".bias") for k in mf.masks)))
        except ValueError as e:
            undo()
            raise MaskFileError(f"mask file {mf.path} names modules this model cannot mask ({e})") from e
        present = dict(masked_modules(model))
        for n, m in present.items():  # bias scores only where the file masks that module's bias
            if isinstance(m, MaskedLinear) and m.bias_scores is not None and f"{n}.bias" not in mf.masks:
                m.bias_scores = None
    try:
        _check_fit(mf, modules, present)
        if head is not None:  # the head first, restored if it does not load: a refused file changes nothing
            before = {k: v.detach().clone() for k, v in head.state_dict().items()}
            try:
                head.load_state_dict(mf.head)
            except (RuntimeError, TypeError, ValueError) as e:
                head.load_state_dict(before)
                raise MaskFileError(f"mask file {mf.path}: its task head does not fit the head given ({e})") from e
    except Exception:
        if undo is not None:
            undo()
        raise
    for n in modules:
        m = present[n]
        masks = [unpack_mask(mf.masks[f"{n}.{w}"], mf.shapes[f"{n}.{w}"]) for w, _, _ in m.score_pairs()]
        m.set_mask(*masks)
    return mf


def _check_fit(mf: MaskFile, modules: list[str], present: dict[str, nn.Module]) -> None:
    """The file masks exactly the model's masked modules, made for these base weights, with these shapes."""
    missing = [n for n in modules if n not in present]
    extra = [n for n in present if n not in modules]
    if missing or extra:
        raise MaskFileError(f"mask file {mf.path} does not fit this model: modules only in the file {missing[:5]}, "
                            f"masked modules without a mask in the file {extra[:5]}")
    for n in modules:  # check everything before changing anything
        m = present[n]
        check_fingerprint(mf, n, m.weight)
        for which, _, scores in m.score_pairs():
            key = f"{n}.{which}"
            if key not in mf.masks or list(scores.shape) != mf.shapes[key]:
                raise MaskFileError(f"mask file {mf.path}: {key} has shape {mf.shapes.get(key)}, the model's is {list(scores.shape)}")


def _restore_plain(model: nn.Module, originals: dict[str, nn.Module], requires_grad: dict[str, bool]) -> None:
    """Undo a refused load's masking: the original modules back in place, ``requires_grad`` as it was."""
    for name, _ in list(masked_modules(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, originals[name])
    for k, p in model.named_parameters():
        if k in requires_grad:
            p.requires_grad_(requires_grad[k])


def describe_mask_file(path: str | os.PathLike) -> str:
    """A human-readable summary of a task-mask file (``abp info``)."""
    mf = read_mask_file(path)
    meta = mf.metadata
    lines = [f"{mf.path}: abp task mask (format {meta['format_version']}, abp {meta.get('abp_version')})",
             f"  base model : {meta.get('base_model')}  fingerprint {meta.get('fingerprint')}",
             f"  task       : {meta.get('task') or '-'}",
             f"  sparsity   : {float(meta['sparsity']):.4f} over {sum(torch.Size(s).numel() for s in mf.shapes.values()):,} masked weights",
             f"  file size  : {os.path.getsize(mf.path):,} bytes",
             f"  integrity  : {len(json.loads(meta['tensor_digests'])) if 'tensor_digests' in meta else 'no'} "
             "tensor digests verified",
             f"  head       : {len(mf.head)} tensors, {sum(t.numel() for t in mf.head.values()):,} parameters",
             "  modules    :"]
    for key, shape in mf.shapes.items():
        n = torch.Size(shape).numel()
        kept = int(unpack_mask(mf.masks[key], shape).sum())
        lines.append(f"    {key:<60} {str(tuple(shape)):>14}  kept {kept / n:6.1%}")
    return "\n".join(lines)
