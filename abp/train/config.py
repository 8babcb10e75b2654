"""The configuration of one ABP run (Algorithm 1), with the paper's symbols in the comments."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass
class ABPConfig:
    """Everything that defines an ABP run; saved in checkpoints so ``--resume`` can check it."""

    # what
    model: Optional[str] = None  # HF id or path; None = the embedded all-MiniLM-L6-v2
    task: str = "sst2"  # GLUE task: sst2, stsb, mnli, qnli, rte, mrpc, cola, qqp, wnli
    glue_dir: Optional[str] = None  # local GLUE folder (else ABP_GLUE_DIR, else the hub)
    train_file: Optional[str] = None  # custom CSV/JSON data instead of GLUE
    dev_file: Optional[str] = None  # custom dev data (scores the mask); needed with train_file
    text_columns: tuple[str, ...] = ("sentence",)  # custom data: the text column(s), a pair for two
    label_column: str = "label"  # custom data: the label column
    num_labels: int = 2  # custom data: classes (1 = regression)
    train_subsample: Optional[int] = None  # train examples kept (dev is never subsampled)
    # the mask
    target_sparsity: float = 0.5  # s: pruning stops once this share of the masked weights has θ ≤ 0
    score_lr: Optional[float] = None  # α, the scores' learning rate; None = calibrated (see score_lr_ratio)
    score_lr_ratio: float = 1.5  # auto α: a steady gradient moves a score this many × its init over the pruning window
    gamma: Optional[float] = None  # γ; None = automatic schedule reaching s after prune_fraction of the steps
    warmup_fraction: float = 0.2  # share of the steps that train the head alone first: early score
    #   gradients through a random head are noise, and plain SGD would prune on that noise
    prune_fraction: float = 0.5  # share of the steps over which auto-γ ramps to the target, after the warm-up
    schedule: str = "cubic"  # target ramp of the auto-γ controller: cubic (Zhu & Gupta's s·(1−(1−t)³): most pruning
    #   early, the last weights chosen at nearly the final sparsity) | quadratic | linear. Cubic gains +0.9 to +4.9 points over
    #   linear at 70–99 % sparsity on the grid (3 seeds) and costs 0.3–0.6 there at 50 %, 1.4 on the README's SST-2 job
    #   (600 steps, 0.821 vs 0.835, 3 seeds): at 50 % and below linear is the better pick (bench/results/paper/notes.md)
    t_l: Optional[float] = None  # forward mask: None = the hard mask 1[θ>0] (the paper's output, the limit of its
    #   σ(t_l·θ) at t_l = 1e5; same dev scores on the grid, and what the 1-bit v2 kernels read); a float = σ(t_l·θ)
    t_s: float = 1.0  # surrogate temperature of the backward: ∇θ = ∂L/∂m · t_s·σ'(t_s·θ)
    score_init: float = 0.01  # the initial scores' mean
    score_init_mode: str = "magnitude"  # magnitude: init·|w|/mean|w| per tensor | uniform: init·U(1 ± spread) |
    #   normal: N(init, std²). magnitude makes the first pruning order each tensor's magnitude order
    #   (bench/results/paper/notes.md: a random order collapses STS-B at every sparsity)
    score_init_spread: float = 1.0  # uniform: θ0 ~ init·U(0, 2), positive, so the pruning order is never a tie
    score_init_std: float = 0.001 ** 0.5  # normal: the paper's N(0.01, variance 0.001)
    unused_token_scale: float = 1.0  # input-embedding rows of tokens no training example contains start at
    #   θ0 × this (< 1: pruned first; 1: no data prior). They get no gradient, so only their θ0 orders them
    score_optimizer: str = "adam_mix"  # adam_mix: Adam with each score's second moment v^(1-s)·mean(v)^s, s the target
    #   sparsity (per-score Adam where most weights stay, per-tensor Adam where few do; bench/results/paper/notes.md) |
    #   adam: θ ← θ − α·adam(∇) − γ | sgd: θ ← θ − α∇ − γ (the paper; the only one the fused in-backward update runs) |
    #   adam_tensor: Adam with one second moment per tensor | adam_floor / adam_ceiling: Adam with each score's second
    #   moment floored / capped at its tensor's mean. Adam's step does not scale with the gradient, whose size spans
    #   orders of magnitude between tensors
    allocation: str = "global"  # how the target sparsity is shared among the masked tensors: global (Algorithm 1: one
    #   count over all scores, each tensor keeps what its scores earn) | tensor (each score tensor pruned to s on its own,
    #   with its own γ controller and stop rule, as magnitude pruning and Wanda do; refuses the fused update)
    recovery: bool = True  # connection recovery: pruned scores may turn positive again
    mask_embeddings: bool = True  # mask the embedding tables too (word, position, type)
    mask_layernorm: bool = False  # mask LayerNorm weights and biases
    mask_bias: bool = False  # mask the linear layers' biases
    exclude: tuple[str, ...] = ("pooler",)  # module-name patterns never masked (besides task heads)
    # the head p
    head: str = "paper"  # paper: learnt weighted average of every layer's pooled token → MLP | pooled: mean of the last layer → linear
    head_pool: str = "auto"  # cls | mean | pair (two sentences: each one's mean u, v and |u - v|, u * v) | auto (the model's own: [CLS] for BERT; for sentence-transformers such as the embedded MiniLM the mean, pair on sentence pairs)
    head_lr: float = 1e-3  # β, the head's learning rate
    head_optimizer: str = "adamw"  # adamw | sgd
    head_refit_steps: Optional[int] = None  # after the run, its head trained this many more steps on the final mask,
    #   the mask fixed (OUTPUT/head_refit/); that head and its dev metric become the run's. None: as many as the run's
    #   steps (max_steps, or what epochs came to) | 0: the head as the run ends (the paper). The head trained while the
    #   mask changed sees the final mask only after the stop rule; each refit step is a forward through the frozen,
    #   masked backbone and the head's backward. On the grid (400 steps, 3 seeds; 6 at STS-B 99 %) it adds 1.4 (SST-2)
    #   and 2.0 (STS-B) points at 99 % and 0.3 at 50 % (bench/results/paper/notes.md, bench/results/pair-head/notes.md)
    # the loop
    batch_size: int = 32  # the global batch: under torchrun all ranks together (each takes its slice)
    max_length: int = 128  # tokens per example (longer ones are truncated)
    max_steps: int = 1000  # training steps (one batch each)
    epochs: Optional[float] = None  # set: max_steps = ceil(epochs × train examples / batch_size) (the paper's budget)
    grad_accum: int = 1  # micro-batches per step (the batch is split; turns the fused update off)
    eval_every: int = 200  # steps between dev evaluations (the best pruned mask is kept)
    log_every: int = 50  # steps between loss/sparsity log points
    checkpoint_every: Optional[int] = None  # default: eval_every
    keep_best: bool = True  # keep the mask of the best dev evaluation after the target (else the last)
    seed: int = 0  # data order, score init, dropout
    # the machine
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    backbone_dtype: str = "auto"  # frozen weights: bf16 on CUDA (they need no fp32 master), fp32 on CPU
    autocast: bool = True  # bf16 autocast on CUDA
    fused_update: str = "auto"  # auto | on | off: score step inside the backward epilogue
    backend: Optional[str] = None  # preferred abp backend (an op it lacks or cannot run takes auto; None = ABP_BACKEND / auto)
    distributed: str = "auto"  # under torchrun (WORLD_SIZE > 1): auto (= ddp) | ddp | fsdp (FULL_SHARD, FSDP2)

    def mask_config(self):
        """The :class:`abp.MaskConfig` this run masks the backbone with (baselines use it too, so they prune
        exactly the tensors ABP learns masks for)."""
        from abp.patch import MaskConfig

        return MaskConfig(embeddings=self.mask_embeddings, layernorm=self.mask_layernorm, mask_bias=self.mask_bias,
                          exclude=list(self.exclude), score_init=self.score_init,
                          score_init_spread=self.score_init_spread, score_init_mode=self.score_init_mode,
                          score_init_std=self.score_init_std, t_l=self.t_l, t_s=self.t_s)

    @property
    def refit_steps(self) -> int:
        """The head refit's steps: ``head_refit_steps``, None resolved to the run's ``max_steps`` (set from ``epochs``
        once the trainer has counted the training set)."""
        return self.max_steps if self.head_refit_steps is None else self.head_refit_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ABPConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ABP config fields: {sorted(unknown)}")
        d = dict(d)
        for k in ("text_columns", "exclude"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def validate(self) -> None:
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"target sparsity must be in [0, 1), got {self.target_sparsity}")
        if not 0 < self.prune_fraction <= 1 or not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"need 0 < prune_fraction <= 1 and 0 <= warmup_fraction < 1, got {self.prune_fraction}, {self.warmup_fraction}")
        if self.warmup_fraction + self.prune_fraction > 1:
            raise ValueError(f"warmup_fraction + prune_fraction must be <= 1 (the ramp must end within max_steps), "
                             f"got {self.warmup_fraction} + {self.prune_fraction}")
        if self.head_refit_steps is not None and self.head_refit_steps < 0:
            raise ValueError(f"head_refit_steps must be >= 0 (0: keep the jointly trained head; None: as many as the "
                             f"run's steps), got {self.head_refit_steps}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "log_every", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.train_file is None) != (self.dev_file is None):
            raise ValueError("custom data needs both --train-file and --dev-file (the dev set scores the mask); "
                             f"got train_file={self.train_file!r}, dev_file={self.dev_file!r}")
        if self.fused_update not in ("auto", "on", "off"):
            raise ValueError(f"fused_update must be auto, on or off, got {self.fused_update!r}")
        if self.distributed not in ("auto", "ddp", "fsdp"):
            raise ValueError(f"distributed must be auto, ddp or fsdp, got {self.distributed!r}")
        from abp.nn import SCORE_INIT_MODES
        from abp.train.heads import POOLS
        from abp.train.score_optim import ALLOCATIONS, OPTIMIZERS, SCHEDULES

        if self.head_pool not in ("auto", *POOLS):
            raise ValueError(f"head_pool must be auto, {', '.join(POOLS)}, got {self.head_pool!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.score_init_mode not in SCORE_INIT_MODES:
            raise ValueError(f"score_init_mode must be one of {', '.join(SCORE_INIT_MODES)}, got {self.score_init_mode!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.score_optimizer not in OPTIMIZERS:
            raise ValueError(f"score_optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.score_optimizer!r}")
        if not 0 <= self.unused_token_scale <= 1:
            raise ValueError(f"unused_token_scale must be in [0, 1], got {self.unused_token_scale}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 (or None to use max_steps), got {self.epochs}")
        if self.head_optimizer not in ("adamw", "sgd"):
            raise ValueError(f"head_optimizer must be adamw or sgd, got {self.head_optimizer!r}")


# Fields that may differ between a run and its resumption (they do not change the result; head_refit_steps only
# sets what runs after the training loop, in its own folder with its own checkpoint).
# The world size is not in the config and the strategy may change too: checkpoints hold only global state.
RESUMABLE_CHANGES = frozenset({"log_every", "device", "backend", "glue_dir", "distributed", "head_refit_steps"})


# ``--preset paper``: Algorithm 1 as Gao, Colombo & Wang (2021) ran it (§4). α and γ fixed (no calibration,
# no γ controller), no head warm-up, the stop rule as written, the layer-weighted [CLS] head; 2 / 3 / 5 epochs
# for MNLI / SST-2 / STS-B.
PAPER_EPOCHS = {"mnli": 2, "sst2": 3, "stsb": 5}


def paper_preset(task: str) -> dict:
    """The ABPConfig fields ``--preset paper`` sets for ``task`` (explicit flags still override them)."""
    return {"batch_size": 8, "score_lr": 2e-5, "head_lr": 2e-5, "gamma": 2e-7, "t_l": 1e5, "t_s": 1.0,
            "schedule": "linear",  # unused with a fixed γ; pinned so that the paper's runs keep one budget
            "score_init": 0.01, "score_init_mode": "normal", "score_init_std": 0.001 ** 0.5,
            "score_optimizer": "sgd", "warmup_fraction": 0.0, "prune_fraction": 1.0, "recovery": True,
            "head": "paper", "head_pool": "cls", "head_refit_steps": 0, "epochs": PAPER_EPOCHS.get(task, 3)}


PRESETS = {"paper": paper_preset}
