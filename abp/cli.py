"""``abp prune | eval | info | experiment``: the command line over :mod:`abp.train`.

``prune`` takes every :class:`~abp.train.config.ABPConfig` field as ``--field-name`` (generated from the
dataclass, so the CLI and the Python API never drift apart).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from typing import Optional, Sequence

from abp.train.config import PRESETS, ABPConfig

_ALIASES = {"target_sparsity": ["--sparsity"], "score_lr": ["--alpha"], "head_lr": ["--beta"]}


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _optional_float(v: str) -> Optional[float]:
    return None if v.lower() in ("none", "auto", "hard") else float(v)


def config_field_help() -> dict[str, tuple[str, str]]:
    """Each ABPConfig field's ``(group, help)``: its comment in ``abp/train/config.py`` (one source for the code
    and the CLI), continuation lines (``#   …``) included; the group is the section comment above it."""
    import inspect
    import re

    out, last, group = {}, None, "options"
    for line in inspect.getsource(ABPConfig).splitlines():
        field = re.match(r"\s+(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line)
        more = re.match(r"\s+#\s{2,}(.*)$", line)
        section = re.match(r"\s+# (\S.*)$", line)
        if field:
            last = field.group(1)
            out[last] = (group, (field.group(2) or "").strip())
        elif more and last is not None:
            out[last] = (group, (out[last][1] + " " + more.group(1).strip()).strip())
        elif section:
            group, last = section.group(1), None
        else:
            last = None
    return out


def _add_config_args(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(ABPConfig)
    helps = config_field_help()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(ABPConfig):
        group_name, help_text = helps.get(f.name, ("options", ""))
        if group_name not in groups:
            groups[group_name] = p.add_argument_group(group_name)
        flags = ["--" + f.name.replace("_", "-")] + _ALIASES.get(f.name, [])
        hint, kw = hints[f.name], {"dest": f.name, "default": argparse.SUPPRESS}
        args = typing.get_args(hint)
        if hint is bool:
            kw["type"] = _bool
        elif hint in (int, float, str):
            kw["type"] = hint
        elif args and set(args) == {float, type(None)}:
            kw["type"] = _optional_float
        elif args == (str, Ellipsis):  # tuple[str, ...]: before Optional[str], which `str in args` also matches
            kw["type"], kw["nargs"] = str, "*"
        elif args and int in args:
            kw["type"] = lambda v: None if v.lower() == "none" else int(v)
        elif args and str in args:
            kw["type"] = lambda v: None if v.lower() == "none" else v
        kw["help"] = f"{help_text} (default: {f.default!r})".lstrip().replace("%", "%%")
        groups[group_name].add_argument(*flags, **kw)
    p.add_argument("--no-recovery", dest="recovery", action="store_false", default=argparse.SUPPRESS,
                   help="ablation: pruned connections never come back")


def _cmd_prune(a: argparse.Namespace) -> int:
    from abp.train import distributed
    from abp.train.trainer import run_abp

    fields = {f.name for f in dataclasses.fields(ABPConfig)}
    given = {k: v for k, v in vars(a).items() if k in fields}
    if a.preset is not None:  # the preset's values, then every flag given explicitly on top
        given = {**PRESETS[a.preset](given.get("task", ABPConfig.task)), **given}
    cfg = ABPConfig.from_dict(given)  # lists → tuples, as in checkpoints
    try:  # under torchrun every rank runs this; the trainer joins the process group
        result = run_abp(cfg, a.output, resume=a.resume, progress=not a.quiet)
    finally:
        distributed.shutdown()
    if distributed.env_rank() == 0:  # one summary, not one per rank
        print(json.dumps({k: result[k] for k in ("task", "metric_name", "dev_metric", "sparsity", "mask_file")}, indent=1))
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    if len(a.mask) == 1:
        from abp.train.evaluate import evaluate_mask_file

        metrics = evaluate_mask_file(a.mask[0], model=a.model, task=a.task, glue_dir=a.glue_dir,
                                     batch_size=a.batch_size, max_length=a.max_length, device=a.device)
        print(json.dumps(metrics, indent=1))
        return 0
    if a.task is not None:
        raise ValueError("--task names the task of a single mask; several masks are each evaluated on the task "
                         "they record")
    from abp.multitask import evaluate_masks

    results = evaluate_masks(a.mask, model=a.model, glue_dir=a.glue_dir, batch_size=a.batch_size,
                             max_length=a.max_length, device=a.device)
    print(json.dumps(results, indent=1))
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    if a.mask is None:
        print(_describe_install())
        return 0
    from abp.maskio import describe_mask_file

    print(describe_mask_file(a.mask))
    return 0


def _describe_install() -> str:
    """abp, torch, Triton, the compiled extension, and which backend each op would take here."""
    import torch

    import abp
    from abp import _ext, _triton_bridge, backends

    lines = [f"abp {abp.__version__}, torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
        from .kernels.bitmask_matmul import masked_operand

        try:
            operand = masked_operand()
        except ValueError as e:
            operand = f"invalid: {e}"
        lines.append(f"1-bit kernels' masked operand: {operand} (ABP_BITMASK_OPERAND; b: the MMA's right operand, "
                     "a: its left, which Hopper's wgmma reads from registers)")
    except ImportError as e:
        lines.append(f"triton: not importable ({e})")
    lines.append(_ext.describe())
    lines.append(f"kernels for hard-mask training on Triton: {backends.kernels_version()} (ABP_KERNELS; v2 reads the mask "
                 "as packed bits, v1 the fp32 scores)")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        ok, why = _triton_bridge.available(dev)
        lines.append(f"triton kernels on {dev}: {'yes' if ok else 'no (' + why + ')'}")
        for op in backends.OPS:
            try:
                choice = backends.select(op, dev, "auto")
            except backends.BackendUnavailableError as e:
                choice = f"none ({e})"
            lines.append(f"  {dev} {op}: {choice}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="abp", description="Adapt pre-trained transformers by pruning (Gao et al. 2021).")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prune", help="learn a task mask (Algorithm 1) and write OUTPUT/mask.safetensors + metrics.json")
    _add_config_args(pr)
    pr.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="paper: Algorithm 1 as published (batch 8, α = β = 2e-5, γ = 2e-7 fixed, θ0 ~ N(0.01, var 0.001), "
                         "plain SGD, 2/3/5 epochs for MNLI/SST-2/STS-B); flags given explicitly override it")
    pr.add_argument("--output", "-o", required=True, help="output folder")
    pr.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.safetensors")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=_cmd_prune)

    ev = sub.add_parser("eval", help="evaluate task-mask files on their tasks' dev sets; several are served "
                                     "together over one base model, each batch mixing their tasks")
    ev.add_argument("--mask", required=True, nargs="+", help="one or more task-mask files")
    ev.add_argument("--model", default=None, help="base model (default: the one recorded in the mask, else the embedded MiniLM)")
    ev.add_argument("--task", default=None, help="task (default: the one recorded in the mask)")
    ev.add_argument("--glue-dir", default=None)
    ev.add_argument("--batch-size", type=int, default=64,
                    help="rows per forward (several masks: shared among their dev splits)")
    ev.add_argument("--max-length", type=int, default=None, help="default: the one the mask was trained with")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=_cmd_eval)

    info = sub.add_parser("info", help="what a task-mask file holds; without a file: the install and its backends")
    info.add_argument("mask", nargs="?", default=None)
    info.set_defaults(func=_cmd_info)

    from abp.experiments.cli import add_experiment_parser

    add_experiment_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # torchrun: info lines from rank 0 only, warnings from all
    logging.basicConfig(level=logging.INFO if a.verbose and rank == 0 else logging.WARNING,
                        format="%(message)s" if rank == 0 else f"[rank {rank}] %(message)s")
    try:
        return a.func(a)
    except KeyboardInterrupt:
        print("abp: interrupted (a checkpoint, if any, is intact: rerun with --resume)", file=sys.stderr)
        return 130
    except Exception as e:
        if a.verbose:
            raise
        print(explain_error(e), file=sys.stderr)
        return 2


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def raised_by_abp(e: BaseException) -> bool:
    """Whether abp's own code raised ``e`` with a ``raise`` statement (a check of the user's input or of a run's
    state), not torch, Triton or a library below it (CUDA out of memory, a compile error, NCCL)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE):
        return False
    import linecache

    return linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise")


def explain_error(e: BaseException) -> str:
    """One line for an error abp raised on bad input; the type, the message and a hint for any other."""
    if raised_by_abp(e):
        return f"abp: error: {e}"
    kind = type(e)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    module = kind.__module__
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        hint = "out of memory: lower --batch-size or --max-length (--grad-accum keeps the effective batch)"
    elif module.startswith("triton"):
        hint = "a Triton kernel failed: --backend reference runs without them; `abp info` shows the install"
    elif module.startswith("torch.distributed") or "NCCL" in str(e):
        hint = "a collective failed: the other ranks' logs name the first failure"
    else:
        hint = "not a check of abp's; `abp info` shows the install"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"abp: error: {name}: {first}\nabp: hint: {hint}; -v shows the traceback"


if __name__ == "__main__":
    sys.exit(main())
