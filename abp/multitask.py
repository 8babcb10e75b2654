"""One base model, many tasks, one batch: serve any number of task-mask files over one copy of the weights.

``MultiTaskModel(backbone, {"sst2": "sst2.safetensors", "stsb": "stsb.safetensors"})`` reads every mask file
with :func:`abp.read_mask_file` and checks it against the base weights as :func:`abp.load_mask` does (module
names and shapes, the 64-probe fingerprint of each masked weight, the head), every file before anything
changes, so a refused file leaves the backbone as it was. It then swaps, in place, each module that any file
masks for a multi-task module that keeps the frozen weight once (shared, not copied) and the N tasks' packed
bits as one ``[N, ⌈d/8⌉]`` uint8 buffer:

- ``nn.Linear`` / GPT-2 ``Conv1D`` → :class:`MultiTaskLinear`: :func:`abp.multi_bitmask_linear` with one task id
  per token row; a masked bias is added per row from the ``[N, out]`` masked biases.
- ``nn.Embedding`` → :class:`MultiTaskEmbedding`: the bits of each looked-up row are gathered from its row's task
  mask (``D/8`` bytes per row when 8 divides the width ``D``, single bits otherwise), unpacked and applied to the
  gathered rows: no table is ever masked or copied per task. Position and token-type ids that the model passes
  with batch size 1 (broadcast against the batch) are expanded to the batch, since each row needs its own task.
- ``nn.LayerNorm`` (masked when a file was trained with ``mask_layernorm``) → :class:`MultiTaskLayerNorm`: an
  affine-free ``layer_norm``, then each row's task's masked weight and bias.

A task whose file does not mask a module sees that module unmasked (all-ones bits), which is what loading that
file alone leaves there. Each batch row (a sequence) names its task; :meth:`MultiTaskModel.route` hands the row
task ids to every multi-task layer for one forward. So the batch must be the first dim of every masked module's
input, as in BERT, RoBERTa, DistilBERT, GPT-2 and LLaMA; a layer that finds otherwise raises instead of guessing.

Memory (:meth:`MultiTaskModel.memory_bytes`): the base weights once, ``N·d/8`` bytes of packed masks (``d``: the
weights masked by any file) and the heads. The embedded all-MiniLM-L6-v2 with its linear layers and embedding
tables masked (22.68 M weights): 90.9 MB of fp32 base weights once, then 2.84 MB of bits + 0.59 MB of paper head
per task, where a fine-tuned dense copy per task costs 90.9 MB each: 16 tasks take 146 MB instead of 1.46 GB.
Speed is the other side of it on CPU, where the reference :func:`abp.multi_bitmask_linear` materialises ``W⊙M``
for every task present in every layer of every batch: 16 requests of 32 tokens over 16 tasks, MiniLM fp32, one
thread: 7.7 requests/s against 31.3 for 16 dense copies (1 task: 47.9 against 67.9; ``bench/bench_multitask.py``).

Heads: a head given in ``heads=`` is loaded with the file's head state (its names and shapes must fit); otherwise
it is built as :mod:`abp.train` wrote it (metadata ``head``, ``head_pool``, ``num_labels``; the defaults of
:func:`abp.train.evaluate.evaluate_mask_file` otherwise). A head is called like
:class:`abp.train.heads.Classifier` calls it, ``head(hidden_states, attention_mask)`` on its task's rows.

Inference only: layers run under ``torch.no_grad`` in eval mode; one batch at a time per model (the row task
ids live on the model for the duration of one forward).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from abp import backends
from abp.functional import check_task_id_range, multi_bitmask_linear, pack_mask
from abp.maskio import MaskFile, MaskFileError, base_weight, check_fingerprint, check_head, read_mask_file
from abp.nn import MaskedModule, _frozen

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]
MaskSource = Union[PathLike, MaskFile]

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


# --------------------------------------------------------------------------- bits

def _unpack_rows(packed: Tensor, n: int) -> Tensor:
    """``[R, nbytes]`` uint8 rows (each :func:`abp.pack_mask` of ``n`` bits) → bool ``[R, n]``."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :n].bool()


def _table_row_bits(packed: Tensor, tasks: Tensor, rows: Tensor, width: int) -> Tensor:
    """Bits of row ``rows[i]`` of a ``[V, width]`` table under mask ``packed[tasks[i]]`` (``packed``:
    ``[N, ⌈V·width/8⌉]`` uint8, row-major bits) → bool ``[M, width]``; reads ``width/8`` bytes per row when 8
    divides ``width``."""
    if width % 8 == 0:
        b = packed.view(packed.shape[0], -1, width // 8)[tasks, rows]  # [M, width/8]
        return _unpack_rows(b, width)
    pos = rows.unsqueeze(1) * width + torch.arange(width, device=rows.device)  # flat bit positions [M, width]
    b = packed[tasks.unsqueeze(1), pos >> 3]
    return ((b >> (pos & 7).to(torch.uint8)) & 1).bool()


def _ones_packed(numel: int, device=None) -> Tensor:
    """The packed all-ones mask of ``numel`` weights (what a task that does not mask a module sees)."""
    return pack_mask(torch.ones(numel, dtype=torch.bool, device=device))


def _kept(packed: Tensor) -> int:
    """Set bits in a packed mask (:func:`abp.pack_mask` zero-pads the last byte, so this is the kept count)."""
    return int(_POPCOUNT.to(packed.device)[packed.long()].sum())


# --------------------------------------------------------------------------- routing rows to tasks

class _Router:
    """The task id of each batch row for the forward in progress, shared by every multi-task layer."""

    def __init__(self) -> None:
        self.ids: Optional[Tensor] = None
        self._expanded: dict[tuple, Tensor] = {}

    def batch(self, module: nn.Module) -> Tensor:
        if self.ids is None:
            raise RuntimeError(f"{getattr(module, 'name', type(module).__name__)}: a multi-task layer ran outside "
                               "MultiTaskModel.route(tasks) (call the MultiTaskModel, or run the backbone inside "
                               "`with model.route(tasks):`): every row needs its task")
        return self.ids

    def rows(self, lead: torch.Size, module: nn.Module) -> Tensor:
        """Task id of every element of leading shape ``lead`` (batch first), flattened: one per token row."""
        ids = self.batch(module)
        if len(lead) == 0 or lead[0] != ids.shape[0]:
            raise RuntimeError(f"{getattr(module, 'name', type(module).__name__)}: input with leading dims "
                               f"{tuple(lead)} does not start with the batch of {ids.shape[0]} rows; MultiTaskModel "
                               "needs the batch as the first dim of every masked module's input")
        key = tuple(lead)
        out = self._expanded.get(key)
        if out is None:
            out = ids.view(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)
            self._expanded[key] = out
        return out


# --------------------------------------------------------------------------- multi-task modules

class MultiTaskLinear(nn.Module):
    """``nn.Linear`` (or GPT-2 ``Conv1D``) over one frozen weight and N packed task masks; row ``i`` uses its task's."""

    def __init__(self, base: nn.Module, packed: Tensor, bias_packed: Optional[Tensor], router: _Router, *,
                 name: str = "", backend: Optional[str] = None):
        super().__init__()
        if type(base).__name__ == "Conv1D":  # weight [in, out]: transposed once, as MaskedLinear.from_conv1d does
            self.weight = nn.Parameter(base.weight.detach().t().contiguous(), requires_grad=False)
        else:
            self.weight = _frozen(base.weight)
        self.bias = _frozen(base.bias) if base.bias is not None else None
        self.out_features, self.in_features = self.weight.shape
        self.register_buffer("packed", packed, persistent=False)  # [N, ⌈out·in/8⌉]
        self.register_buffer("bias_packed", bias_packed, persistent=False)  # [N, ⌈out/8⌉] or None
        self._router, self.name, self.backend = router, name, backend

    def forward(self, x: Tensor) -> Tensor:
        ids = self._router.rows(x.shape[:-1], self)
        masked_bias = self.bias_packed is not None
        y = multi_bitmask_linear(x.reshape(-1, x.shape[-1]), self.weight, self.packed, ids,  # ids checked by route()
                                 None if masked_bias else self.bias, backend=backends.prefer(self.backend),
                                 check_ids=False)
        if masked_bias:
            table = self.bias * _unpack_rows(self.bias_packed, self.out_features).to(self.bias.dtype)  # [N, out]
            y = y + table.to(y.dtype)[ids]
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tasks={self.packed.shape[0]}, "
                f"bias={self.bias is not None}, mask_bias={self.bias_packed is not None}")


class MultiTaskEmbedding(nn.Module):
    """``nn.Embedding`` over one frozen table and N packed task masks: gathered rows times their row-task's bits."""

    def __init__(self, base: nn.Embedding, packed: Tensor, router: _Router, *, name: str = ""):
        super().__init__()
        if base.max_norm is not None or base.sparse:
            raise ValueError(f"{name}: embeddings with max_norm or sparse=True are not supported "
                             "(nor by abp.mask_model)")
        self.weight = _frozen(base.weight)
        self.num_embeddings, self.embedding_dim = self.weight.shape
        self.padding_idx = base.padding_idx
        self.register_buffer("packed", packed, persistent=False)  # [N, ⌈V·D/8⌉]
        self._router, self.name = router, name

    def forward(self, ids: Tensor) -> Tensor:
        batch = self._router.batch(self)
        if ids.dim() >= 1 and ids.shape[0] == 1 and batch.shape[0] != 1:
            ids = ids.expand(batch.shape[0], *ids.shape[1:])  # position / token-type ids shared by the batch
        tasks = self._router.rows(ids.shape, self)
        flat = ids.reshape(-1)
        bits = _table_row_bits(self.packed, tasks, flat, self.embedding_dim)
        return (self.weight[flat] * bits.to(self.weight.dtype)).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tasks={self.packed.shape[0]}, "
                f"padding_idx={self.padding_idx}")


class MultiTaskLayerNorm(nn.Module):
    """``nn.LayerNorm`` whose affine weight and bias are masked per row by the row's task."""

    def __init__(self, base: nn.LayerNorm, packed: Tensor, bias_packed: Optional[Tensor], router: _Router, *,
                 name: str = ""):
        super().__init__()
        self.normalized_shape, self.eps = tuple(base.normalized_shape), base.eps
        self.weight = _frozen(base.weight)
        self.bias = _frozen(base.bias) if base.bias is not None else None
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("bias_packed", bias_packed, persistent=False)
        self._router, self.name = router, name

    def _per_row(self, param: Tensor, packed: Optional[Tensor], ids: Tensor, shape: tuple) -> Tensor:
        if packed is None:  # an unmasked bias (no task masks it)
            return param
        table = param.reshape(-1) * _unpack_rows(packed, param.numel()).to(param.dtype)  # [N, numel]
        return table[ids].view(shape)

    def forward(self, x: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        ids = self._router.batch(self)
        self._router.rows(x.shape[:-k], self)  # checks that the batch comes first
        shape = (ids.shape[0],) + (1,) * (x.dim() - k - 1) + self.normalized_shape
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        y = y * self._per_row(self.weight, self.packed, ids, shape).to(y.dtype)
        if self.bias is not None:
            y = y + self._per_row(self.bias, self.bias_packed, ids, shape).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, tasks={self.packed.shape[0]}"


MULTI_TASK_MODULES = (MultiTaskLinear, MultiTaskEmbedding, MultiTaskLayerNorm)


# --------------------------------------------------------------------------- checking a file against the base

def _kind(module: nn.Module) -> Optional[str]:
    """What :func:`abp.mask_model` would make of ``module`` (None: it masks no such module)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D":
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        return "layernorm"
    return None


def _check_file(mf: MaskFile, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Refuse (``MaskFileError`` naming the file) what :func:`abp.load_mask` refuses on a plain model; returns the
    file's modules and their kinds. Stricter in one place: a bias mask for a module without a bias is refused
    (``load_mask`` ignores it)."""
    names = sorted({k.rsplit(".", 1)[0] for k in mf.masks})
    missing = [n for n in names if n not in modules]
    if missing:
        raise MaskFileError(f"mask file {mf.path} (base model {mf.metadata.get('base_model')!r}) names modules this "
                            f"model lacks: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    kinds = {}
    for n in names:
        m = modules[n]
        kind = _kind(m)
        if kind is None:
            raise MaskFileError(f"mask file {mf.path} does not fit this model: modules only in the file [{n!r}] "
                                f"(a {type(m).__name__}, which abp does not mask)")
        if kind == "embedding" and (m.max_norm is not None or m.sparse):
            raise MaskFileError(f"mask file {mf.path} names modules this model cannot mask ({n}: embeddings with "
                                "max_norm or sparse=True are not supported)")
        base = base_weight(m)
        check_fingerprint(mf, n, base)
        want = {"weight": list(base.shape)}
        if kind in ("linear", "conv1d", "layernorm") and m.bias is not None:
            want["bias"] = list(m.bias.shape)
        for which in ("weight", "bias"):
            key = f"{n}.{which}"
            if key in mf.masks and which not in want:
                raise MaskFileError(f"mask file {mf.path}: {key} is masked in the file, the model's {n} has no {which}")
            must = which == "weight" or (kind == "layernorm" and which in want)  # MaskedLayerNorm masks both
            if (key in mf.masks or must) and mf.shapes.get(key) != want[which]:
                raise MaskFileError(f"mask file {mf.path}: {key} has shape {mf.shapes.get(key)}, "
                                    f"the model's is {want[which]}")
        kinds[n] = kind
    return kinds


def _num_labels(mf: MaskFile) -> int:
    n = mf.extra.get("num_labels")
    if n is not None:
        return int(n)
    from abp.train.tasks import get_task

    try:
        return get_task(mf.metadata.get("task") or "").num_labels
    except ValueError:
        raise MaskFileError(f"mask file {mf.path} records neither its head's number of labels (metadata num_labels) "
                            "nor a known task: pass heads={name: module}") from None


def _build_head(mf: MaskFile, config, given: Optional[nn.Module]) -> nn.Module:
    """The task head for ``mf`` (checked, not loaded yet): ``given``, or built from the file's metadata."""
    if not mf.head:
        raise MaskFileError(f"mask file {mf.path} holds no task head; MultiTaskModel serves each task through its "
                            "head (save the mask with head=...)")
    if given is None:
        from abp.train.heads import make_head

        if config is None:
            raise MaskFileError(f"mask file {mf.path}: the backbone has no config to build the head from: pass heads=")
        extra = mf.extra
        given = make_head(extra.get("head", "paper"), config.hidden_size, config.num_hidden_layers + 1,
                          _num_labels(mf), pool=extra.get("head_pool", "cls"))
    check_head(mf, given)
    return given


def _named(masks: Union[Mapping[str, MaskSource], Sequence[MaskSource]]) -> list[tuple[str, MaskFile]]:
    """``(task name, MaskFile)`` pairs; unnamed files are named by the task they record, else their file stem."""
    if isinstance(masks, (str, os.PathLike, MaskFile)):
        masks = [masks]
    pairs = list(masks.items()) if isinstance(masks, Mapping) else [(None, m) for m in masks]
    if not pairs:
        raise ValueError("MultiTaskModel needs at least one task-mask file")
    out = []
    for name, src in pairs:
        mf = src if isinstance(src, MaskFile) else read_mask_file(src)
        if name is None:
            name = mf.metadata.get("task") or os.path.splitext(os.path.basename(mf.path))[0]
        out.append((str(name), mf))
    seen: dict[str, str] = {}
    for name, mf in out:
        if name in seen:
            raise ValueError(f"two mask files are named {name!r} ({seen[name]} and {mf.path}): name the tasks, "
                             "MultiTaskModel(backbone, {name: path, ...})")
        seen[name] = mf.path
    return out


# --------------------------------------------------------------------------- the model

@dataclass
class TaskOutput:
    """One task's share of a batch: the batch rows it served and its head's outputs for them."""

    rows: Tensor  # int64 [n]: positions in the batch
    logits: Tensor  # [n, num_labels], or [n] for a one-output (regression) head, as Classifier returns


@dataclass
class MultiTaskOutput:
    """A mixed batch's outputs, by task (``out["sst2"].logits``, one tensor per task: post-process per task) and
    per row in batch order (:meth:`per_row`: one response per request)."""

    tasks: dict[str, TaskOutput]
    batch_size: int

    def __getitem__(self, task: str) -> TaskOutput:
        return self.tasks[task]

    def per_row(self) -> list[Tensor]:
        """Row ``i``'s head output: ``[num_labels]``, or a 0-d value for a regression head."""
        out: list[Optional[Tensor]] = [None] * self.batch_size
        for t in self.tasks.values():
            for r, y in zip(t.rows.tolist(), t.logits):
                out[r] = y
        return out  # type: ignore[return-value]


class MultiTaskModel(nn.Module):
    """One frozen backbone, N task masks and heads; a batch mixes tasks row by row.

    ``masks``: ``{task name: mask file}`` (a path or a :class:`abp.MaskFile`), or a list of files named by the task
    each records. ``heads``: optional ``{task name: module}`` for heads the file's metadata does not describe.
    ``backbone`` must be plain (not :func:`abp.mask_model`-ed); it is changed in place (its masked modules become
    multi-task modules) only after every file passed the checks. ``backend``: a preference for
    :func:`abp.multi_bitmask_linear` (:mod:`abp.backends`).
    """

    def __init__(self, backbone: nn.Module, masks: Union[Mapping[str, MaskSource], Sequence[MaskSource]], *,
                 heads: Optional[Mapping[str, nn.Module]] = None, backend: Optional[str] = None):
        super().__init__()
        named = _named(masks)
        if any(isinstance(m, (MaskedModule,) + MULTI_TASK_MODULES) for m in backbone.modules()):
            raise ValueError("MultiTaskModel needs the plain base model: this one is already masked "
                             "(abp.mask_model / abp.load_mask / a MultiTaskModel changed it)")
        given = dict(heads or {})
        unknown = sorted(set(given) - {n for n, _ in named})
        if unknown:
            raise ValueError(f"heads given for tasks without a mask file: {unknown}")
        modules = dict(backbone.named_modules())
        config = getattr(backbone, "config", None)
        kinds: dict[str, str] = {}
        task_heads = []
        for name, mf in named:  # check every file (and head) before changing anything
            kinds.update(_check_file(mf, modules))
            task_heads.append(_build_head(mf, config, given.get(name)))
        files = [mf for _, mf in named]
        self._router = _Router()
        self.backend = backend
        swaps = {}  # built first, swapped in once the heads loaded: nothing changes before everything is ready
        for n in sorted(kinds):  # union of the files' modules: one multi-task module each
            base = modules[n]
            w = base_weight(base)

            def stack(which: str, numel: int, need: bool) -> Optional[Tensor]:
                if not need:
                    return None
                rows = [mf.masks.get(f"{n}.{which}") for mf in files]
                rows = [r if r is not None else _ones_packed(numel) for r in rows]
                return torch.stack(rows).to(w.device)

            kind = kinds[n]
            bias_numel = base.bias.numel() if getattr(base, "bias", None) is not None else 0
            any_bias = any(f"{n}.bias" in mf.masks for mf in files)
            packed = stack("weight", w.numel(), True)
            if kind in ("linear", "conv1d"):
                new = MultiTaskLinear(base, packed, stack("bias", bias_numel, any_bias), self._router, name=n,
                                      backend=backend)
            elif kind == "embedding":
                new = MultiTaskEmbedding(base, packed, self._router, name=n)
            else:
                new = MultiTaskLayerNorm(base, packed, stack("bias", bias_numel, bias_numel > 0), self._router, name=n)
            swaps[n] = new
        restore = []
        try:
            for head, mf in zip(task_heads, files):
                restore.append((head, {k: v.detach().clone() for k, v in head.state_dict().items()}))
                head.load_state_dict(mf.head)
        except (RuntimeError, TypeError, ValueError) as e:
            for head, state in restore:
                head.load_state_dict(state)
            raise MaskFileError(f"mask file {mf.path}: its task head does not fit the head given ({e})") from e
        for n, new in swaps.items():
            parent, _, child = n.rpartition(".")
            setattr(backbone.get_submodule(parent) if parent else backbone, child, new)

        self.backbone = backbone
        device = next(iter(backbone.parameters())).device
        self.heads = nn.ModuleList([h.to(device) for h in task_heads])
        self.task_names: list[str] = [n for n, _ in named]
        self._index = {n: i for i, n in enumerate(self.task_names)}
        self.mask_files: dict[str, str] = {n: mf.path for n, mf in named}
        self.metadata: dict[str, dict[str, str]] = {n: dict(mf.metadata) for n, mf in named}
        self.sparsities: dict[str, float] = {}  # over each file's own masked tensors, as abp.sparsity after load_mask
        for n, mf in named:
            total = sum(torch.Size(s).numel() for s in mf.shapes.values())
            self.sparsities[n] = 1.0 - sum(_kept(p) for p in mf.masks.values()) / total
        self.tokenizer = None  # set by load()
        self.eval()

    # ---------------------------------------------------------------- building

    @classmethod
    def load(cls, masks: Union[Mapping[str, MaskSource], Sequence[MaskSource]], *, model: Optional[str] = None,
             dtype: Optional[torch.dtype] = None, device: Optional[Union[str, torch.device]] = None,
             heads: Optional[Mapping[str, nn.Module]] = None, backend: Optional[str] = None) -> "MultiTaskModel":
        """Load the base model once (``model``, default: the one the files record, else the embedded MiniLM) and
        the mask files onto it; ``.tokenizer`` is the base model's tokenizer."""
        from abp.models import load_backbone

        named = _named(masks)
        if model is None:
            recorded = {mf.extra.get("config", {}).get("model") for _, mf in named}
            if len(recorded) > 1:
                raise ValueError(f"the mask files were trained on different base models "
                                 f"({sorted(map(str, recorded))}); one MultiTaskModel serves one base model: "
                                 "pass model=")
            model = recorded.pop()
        backbone, tok = load_backbone(model, dtype=dtype)
        out = cls(backbone, dict(named), heads=heads, backend=backend)
        out.tokenizer = tok
        return out.to(device) if device is not None else out

    # ---------------------------------------------------------------- routing

    @property
    def device(self) -> torch.device:
        return next(iter(self.backbone.parameters())).device

    def task_ids(self, tasks: Union[Tensor, Sequence[str], Sequence[int]]) -> Tensor:
        """Row task ids (int64, on the model's device) from task names, indices, or an index tensor."""
        n = len(self.task_names)
        if isinstance(tasks, Tensor):
            if tasks.dtype not in (torch.int32, torch.int64) or tasks.dim() != 1:
                raise TypeError(f"task ids must be a 1-D int32/int64 tensor, got {tasks.dtype} {tuple(tasks.shape)}")
            ids = tasks.to(self.device, torch.int64)
        else:
            tasks = list(tasks)
            if all(isinstance(t, str) for t in tasks):
                bad = sorted({t for t in tasks if t not in self._index})
                if bad:
                    raise ValueError(f"unknown task(s) {bad}; this model serves {self.task_names}")
                ids = torch.tensor([self._index[t] for t in tasks], dtype=torch.int64, device=self.device)
            elif all(isinstance(t, int) and not isinstance(t, bool) for t in tasks):
                ids = torch.tensor(tasks, dtype=torch.int64, device=self.device)
            else:
                raise TypeError("tasks must be all task names or all task indices")
        check_task_id_range(ids, n, f"tasks {self.task_names}")
        return ids

    @contextlib.contextmanager
    def route(self, tasks: Union[Tensor, Sequence[str], Sequence[int]]) -> Iterator[Tensor]:
        """Inside the block every multi-task layer serves batch row ``i`` with task ``tasks[i]``; yields the ids."""
        ids = self.task_ids(tasks)
        if self._router.ids is not None:
            raise RuntimeError("MultiTaskModel.route is already active: one batch at a time per model")
        self._router.ids, self._router._expanded = ids, {}
        try:
            yield ids
        finally:
            self._router.ids, self._router._expanded = None, {}

    # ---------------------------------------------------------------- serving

    @torch.no_grad()
    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               token_type_ids: Optional[Tensor] = None, *, tasks, **kw):
        """The backbone's output for a mixed batch (each row through its task's mask), without the heads."""
        with self.route(tasks) as ids:
            return self._backbone(ids, input_ids, attention_mask, token_type_ids, **kw)

    def _backbone(self, ids: Tensor, input_ids: Tensor, attention_mask: Optional[Tensor],
                  token_type_ids: Optional[Tensor], **kw):
        """The backbone on a batch routed (inside :meth:`route`) to ``ids``."""
        if ids.shape != (input_ids.shape[0],):
            raise ValueError(f"{ids.numel()} task ids for a batch of {input_ids.shape[0]} rows: one task per row")
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None, *,
                tasks) -> MultiTaskOutput:
        """Run a batch whose row ``i`` belongs to task ``tasks[i]`` (a name, an index, or a tensor of indices):
        one backbone pass, then each task's head on its rows. ``segment_ids`` (which sentence of a pair each token
        is in, for pair heads) default to ``token_type_ids``."""
        with self.route(tasks) as ids:  # the one check of the ids' range (a host sync)
            out = self._backbone(ids, input_ids, attention_mask, token_type_ids, output_hidden_states=True)
        results = {}
        segments = segment_ids if segment_ids is not None else token_type_ids
        for t in torch.unique(ids).tolist():
            rows = (ids == t).nonzero().squeeze(1)
            hidden = tuple(h.index_select(0, rows) for h in out.hidden_states)
            mask = attention_mask.index_select(0, rows) if attention_mask is not None else None
            logits = self.heads[t](hidden, mask, segments.index_select(0, rows) if segments is not None else None)
            results[self.task_names[t]] = TaskOutput(rows, logits.squeeze(-1) if logits.shape[-1] == 1 else logits)
        return MultiTaskOutput(results, int(input_ids.shape[0]))

    # ---------------------------------------------------------------- accounting

    def memory_bytes(self) -> dict[str, int]:
        """Resident bytes: ``base`` (the backbone's weights and buffers, once), ``masks`` (every packed task
        mask: ``N·d/8``), ``heads``, ``total``. Tensors shared by several modules count once."""
        seen: set[int] = set()

        def size(tensors) -> int:
            total = 0
            for t in tensors:
                if t is None or t.data_ptr() in seen:
                    continue
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
            return total

        multi = [m for m in self.backbone.modules() if isinstance(m, MULTI_TASK_MODULES)]
        masks = size(b for m in multi for b in (m.packed, getattr(m, "bias_packed", None)))
        base = size(list(self.backbone.parameters()) + list(self.backbone.buffers()))
        heads = size(list(self.heads.parameters()) + list(self.heads.buffers()))
        return {"base": base, "masks": masks, "heads": heads, "total": base + masks + heads}

    def extra_repr(self) -> str:
        return f"tasks={self.task_names}"


# --------------------------------------------------------------------------- abp eval with several masks

def _pad_cat(batches: list[dict[str, Tensor]], tokenizer) -> dict[str, Tensor]:
    """Concatenate tokenised batches along the rows, padding each to the longest (the tokenizer's side and pads)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    pads = {"input_ids": tokenizer.pad_token_id, "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0),
            "segment_ids": 0, "attention_mask": 0}
    out = {}
    for key in batches[0]:
        if key == "labels":
            continue
        parts = []
        for b in batches:
            extra = width - b[key].shape[1]
            parts.append(F.pad(b[key], (extra, 0) if left else (0, extra), value=pads[key]))
        out[key] = torch.cat(parts)
    return out


def evaluate_masks(mask_paths: Sequence[PathLike], *, model: Optional[str] = None, glue_dir: Optional[str] = None,
                   batch_size: int = 64, max_length: Optional[int] = None, device: str = "auto") -> list[dict]:
    """``abp eval`` with several masks: one base model, every mask's dev set(s) served together.

    Each batch holds ``batch_size // streams`` examples of every dev split still running (a stream per mask and
    dev split), so every forward mixes the tasks, each row through its own mask and head. Returns one dict per
    mask, in order, as :func:`abp.train.evaluate.evaluate_mask_file` returns for one (``task``, ``sparsity``,
    ``metrics``, ``mask_file``). ``model`` and each mask's ``max_length`` default to what the files record.
    """
    from contextlib import nullcontext

    from abp.models import load_backbone
    from abp.train.data import Batcher, load_split
    from abp.train.devices import pick_device
    from abp.train.metrics import evaluate_splits
    from abp.train.tasks import get_task

    paths = [str(p) for p in mask_paths]
    if not paths:
        raise ValueError("evaluate_masks: no mask files given")
    if len(set(paths)) != len(paths):
        raise ValueError(f"evaluate_masks: a mask file is named twice: {paths}")
    files = [read_mask_file(p) for p in paths]
    specs, lengths, recorded = [], [], set()
    for p, mf in zip(paths, files):
        task = mf.metadata.get("task") or None
        if not task:
            raise ValueError(f"{p} records no task: evaluate it alone with --task")
        if task == "custom":
            raise ValueError(f"{p} was trained on custom data files (see its config: abp info {p}); "
                             "evaluate it alone with --task to score it on a GLUE task")
        specs.append(get_task(task))
        trained = mf.extra.get("config", {})
        recorded.add(trained.get("model"))
        lengths.append(max_length or trained.get("max_length", 128))
    if model is None:
        if len(recorded) > 1:
            raise ValueError(f"the masks were trained on different base models ({sorted(map(str, recorded))}); "
                             "masks evaluated together share one base model: pass --model")
        model = recorded.pop()
    backbone, tok = load_backbone(model)
    mt = MultiTaskModel(backbone, dict(zip(paths, files))).to(pick_device(device))
    streams = [(i, split) for i, spec in enumerate(specs) for split in spec.dev_splits]
    per = max(1, batch_size // len(streams))
    iters = {s: Batcher(load_split(specs[s[0]].name, s[1], glue_dir), tok, batch_size=per, max_length=lengths[s[0]],
                        shuffle=False).iter_batches(0) for s in streams}
    preds: dict[tuple, list] = {s: [] for s in streams}
    labels: dict[tuple, list] = {s: [] for s in streams}
    dev = mt.device
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    while iters:
        pieces = [(s, b) for s, it in list(iters.items()) if (b := next(it, None)) is not None]
        iters = {s: iters[s] for s, _ in pieces}
        if not pieces:
            break
        merged = {k: v.to(dev) for k, v in _pad_cat([b for _, b in pieces], tok).items()}
        tasks = [paths[s[0]] for s, b in pieces for _ in range(len(b["labels"]))]
        with amp:
            rows = mt(**merged, tasks=tasks).per_row()
        start = 0
        for s, b in pieces:
            n = len(b["labels"])
            preds[s].append(torch.stack(rows[start:start + n]).float().cpu())
            labels[s].append(b["labels"])
            start += n
    results = []
    for i, (p, spec) in enumerate(zip(paths, specs)):
        outputs = {split: (torch.cat(preds[(i, split)]), torch.cat(labels[(i, split)])) for split in spec.dev_splits}
        results.append({"task": spec.name, "sparsity": mt.sparsities[p],
                        "metrics": evaluate_splits(spec.name, outputs), "mask_file": p})
    return results
