"""One optimizer step, jitted over the mesh with explicit input and output shardings.

The state is a dict `{"step": int32 [], "params": float32 master tree, "opt_state": optax state
of the trainable subtree}`. A batch is the `train.data` fields as `[A, B/A, T]` (A micro-batches).

A step:
  1. per micro-batch (`lax.scan`), the loss and its gradient with respect to the trainable
     master leaves, through `compute_params` (fake quantization and bf16 casts, identity
     Jacobian) and the model; gradients, loss sums and expert load accumulate in float32 / int32.
     Each micro-batch's loss is divided by the token weight of the whole step, so the sum is
     exactly the full batch's mean loss (plus `aux_loss_coef` times the mean balance loss);
  2. the optax update of the trainable leaves;
  3. the router bias update from the step's expert load (`train.balance`);
  4. QK-clip from the step's largest attention logits (`train.qk_clip`), when enabled.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from k2jax import api
from k2jax.config import ModelConfig
from k2jax.model import Transformer
from train import balance, data, mesh as train_mesh, optimizer, qat, qk_clip
from train.checkpointing import abstract_with_shardings
from train.config import TrainConfig
from train.loss import weighted_loss_sum


def init_state(master, tx: optax.GradientTransformation, trainable: frozenset):
    """The step-0 state for float32 master `params`."""
    params, _ = optimizer.split(master, trainable)
    return {"step": jnp.zeros((), jnp.int32), "params": master, "opt_state": tx.init(params)}


def make_step(model_config: ModelConfig, cfg: TrainConfig, qat_groups, trainable: frozenset,
              tx: optax.GradientTransformation):
    """`(state, batch) -> (state, metrics)`, not yet jitted (see `jit_step`).

    Metrics: loss (mean token cross entropy), balance_loss, grad_norm (before clipping),
    learning_rate, tokens (trained target tokens), expert_load `[L_moe, E]`, and with QK-clip
    max_logit (largest over heads and layers) and clipped_heads.
    """
    want_balance, want_logits = cfg.aux_loss_coef > 0, cfg.qk_clip_threshold is not None
    lr = optimizer.schedule(cfg)
    model = Transformer(model_config, remat_policy=cfg.remat_policy, max_logits=want_logits,
                        balance_loss=want_balance)

    def step(state, batch):
        trainable_params, frozen = optimizer.split(state["params"], trainable)
        total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        num_micro = batch["tokens"].shape[0]

        def micro_loss(params, micro):
            master = optimizer.merge(params, frozen)
            compute = qat.compute_params(master, model_config, qat_groups,
                                         model_config.quant_group_size)
            logits, _, stats = model.apply({"params": compute}, micro["tokens"],
                                           micro["positions"], micro["segment_ids"])
            loss_sum = weighted_loss_sum(logits, micro["targets"], micro["weights"])
            objective = loss_sum / total_weight
            if want_balance:
                objective += cfg.aux_loss_coef * stats.balance_loss / num_micro
            return objective, (loss_sum, stats)

        def accumulate(carry, micro):
            grads, loss_sum, balance_sum, load, logit_max = carry
            (_, (micro_sum, stats)), micro_grads = jax.value_and_grad(
                micro_loss, has_aux=True)(trainable_params, micro)
            grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads, micro_grads)
            if want_balance:
                balance_sum = balance_sum + stats.balance_loss
            if want_logits:
                logit_max = jax.tree.map(jnp.maximum, logit_max, stats.max_logits)
            return (grads, loss_sum + micro_sum, balance_sum, load + stats.expert_load,
                    logit_max), None

        carry = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable_params),
                 jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                 jnp.zeros((model_config.num_moe_layers, model_config.n_routed_experts),
                           jnp.int32),
                 _initial_logit_max(model_config) if want_logits else None)
        (grads, loss_sum, balance_sum, load, logit_max), _ = jax.lax.scan(accumulate, carry, batch)

        updates, opt_state = tx.update(grads, state["opt_state"], trainable_params)
        params = optimizer.merge(optax.apply_updates(trainable_params, updates), frozen)
        params = balance.balance_params(params, load, cfg.bias_update_rate)
        metrics = {"loss": loss_sum / total_weight, "balance_loss": balance_sum / num_micro,
                   "grad_norm": optax.tree.norm(grads), "learning_rate": lr(state["step"]),
                   "tokens": jnp.sum(batch["weights"]), "expert_load": load}
        if want_logits:
            params = qk_clip.apply_qk_clip(params, model_config, logit_max,
                                           cfg.qk_clip_threshold)
            maxima = jnp.concatenate([m.reshape(-1) for m in logit_max.values()])
            metrics["max_logit"] = jnp.max(maxima)
            metrics["clipped_heads"] = jnp.sum(maxima > cfg.qk_clip_threshold)
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics

    return step


def _initial_logit_max(config: ModelConfig):
    return {name: jnp.full((count, config.num_attention_heads), -jnp.inf, jnp.float32)
            for name, count, _ in config.layer_stacks}


def jit_step(step, state, batch, model_config: ModelConfig, mesh):
    """`step` jitted with the state and batch shardings of `mesh` (state donated).

    `state` and `batch` may be abstract (`ShapeDtypeStruct`s); returns the jitted function and
    the state shardings. Call it inside `k2jax.sharding.activate(mesh)`.
    """
    state_sh = train_mesh.state_shardings(state, model_config, mesh)
    batch_sh = train_mesh.batch_shardings(batch, mesh)
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, train_mesh.replicated(mesh)), donate_argnums=0)
    return jitted, state_sh, batch_sh



def training_configs(config: ModelConfig, cfg: TrainConfig) -> tuple[tuple[str, ...], ModelConfig]:
    """`(qat_groups, model_config)` for the stored model `config`: the groups trained with fake
    quantization, and the config the training forward runs (nothing INT4, compute dtype)."""
    qat_groups = config.quantized_linears if cfg.qat_groups is None else cfg.qat_groups
    model_config = config.replace(quantized_linears=(), dtype=cfg.compute_dtype)
    # Re-validates the group sizes: a QAT group must be quantizable in this model.
    config.replace(quantized_linears=tuple(qat_groups))
    return tuple(qat_groups), model_config


class StepProgram(NamedTuple):
    """The jitted training step of a run and everything its inputs are made from."""
    jitted: object  # (state, batch) -> (state, metrics), state donated
    state: dict  # abstract state, each leaf with its sharding
    batch: dict  # abstract batch `[A, B/A, T]` per field, with shardings
    state_shardings: dict
    batch_shardings: dict
    model_config: ModelConfig
    qat_groups: tuple[str, ...]
    tx: optax.GradientTransformation
    trainable: frozenset

    def lower(self):
        return self.jitted.lower(self.state, self.batch)


def build(config: ModelConfig, cfg: TrainConfig, mesh) -> StepProgram:
    """The step `k2jax train` runs for the stored model `config` under `cfg` on `mesh`, with
    abstract state and batch. Call inside `k2jax.sharding.activate(mesh)`."""
    qat_groups, model_config = training_configs(config, cfg)
    tx = optimizer.make_optimizer(cfg)
    abstract_params = jax.eval_shape(qat.master_params, api.param_shapes(model_config))
    trainable = optimizer.trainable_paths(abstract_params, cfg.trainable)
    state = jax.eval_shape(lambda p: init_state(p, tx, trainable), abstract_params)
    rows = cfg.batch_size // cfg.grad_accum
    batch = {k: jax.ShapeDtypeStruct((cfg.grad_accum, rows, cfg.seq_len),
                                     jnp.float32 if k == "weights" else jnp.int32)
             for k in data.BATCH_FIELDS}
    step = make_step(model_config, cfg, qat_groups, trainable, tx)
    jitted, state_sh, batch_sh = jit_step(step, state, batch, model_config, mesh)
    return StepProgram(jitted, abstract_with_shardings(state, state_sh),
                       abstract_with_shardings(batch, batch_sh), state_sh, batch_sh,
                       model_config, qat_groups, tx, trainable)
