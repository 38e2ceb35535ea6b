"""The optimizer: which leaves it sees, AdamW or Muon, the learning-rate schedule, clipping.

Only the trainable subtree (`split`) is differentiated and given to optax, so frozen groups and
the routers' `e_score_correction_bias` get no gradient, no optimizer state, no update and no
weight decay by construction. Inside the trainable subtree, optax masks choose:

- weight decay: linear kernels and the embedding (not norm scales);
- Muon (`optimizer="muon"`): every linear kernel except lm_head, orthogonalised per matrix over
  the trailing `[in, out]` axes (stacked layers and experts are batch axes), with update RMS
  matched to AdamW's (`consistent_rms=0.2`, as Moonlight and K2 do) so one learning rate serves
  both; AdamW for the embedding, lm_head and norm scales.

The schedule is a linear warmup from 0 to `learning_rate` over `warmup_steps`, then a cosine
decay to `min_lr_ratio * learning_rate` at `cfg.schedule_steps` and constant after it (so a
resumed run with more steps continues at the final rate); gradients are clipped to `grad_clip`
global norm (over the trainable leaves) first.
"""

from __future__ import annotations

import optax
from optax import contrib

from train import qat
from train.config import TrainConfig

MUON_RMS = 0.2


def trainable_paths(params, trainable_groups) -> frozenset[tuple[str, ...]]:
    """Paths of the leaves that are trained (the router bias never is)."""
    return frozenset(p for p in qat.flat(params) if qat.path_group(p) in trainable_groups)


def split(params, paths: frozenset[tuple[str, ...]]):
    """`(trainable subtree, frozen {path: leaf})` of a parameter tree."""
    leaves = qat.flat(params)
    return (qat.unflat({p: v for p, v in leaves.items() if p in paths}),
            {p: v for p, v in leaves.items() if p not in paths})


def merge(trainable, frozen: dict):
    """Inverse of `split`."""
    return qat.unflat({**frozen, **qat.flat(trainable)})


def schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.schedule_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _decays(path) -> bool:
    return path[-1] in ("kernel", "embedding")


def _uses_muon(path) -> bool:
    return path[-1] == "kernel" and qat.path_group(path) != "lm_head"


def _tree_of(fn, params):
    return qat.unflat({p: fn(p) for p in qat.flat(params)})


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optax transformation for a trainable subtree (masks are computed from its paths)."""
    lr = schedule(cfg)
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=lambda params: _tree_of(_decays, params))
    if cfg.optimizer == "adamw":
        inner = adamw
    else:
        matrices = contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)
        muon = contrib.muon(lr, weight_decay=cfg.weight_decay, eps=cfg.eps,
                            muon_weight_dimension_numbers=lambda params: _tree_of(
                                lambda _: matrices, params),
                            consistent_rms=MUON_RMS)
        inner = optax.partition(
            {"muon": muon, "adamw": adamw},
            lambda params: _tree_of(lambda p: "muon" if _uses_muon(p) else "adamw", params))
    if cfg.grad_clip is None:
        return inner
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), inner)
