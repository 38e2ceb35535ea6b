"""The training run: model and data set-up, the step loop, checkpoints, resume and export.

`train(cfg)` trains from a preset (random init) or a k2jax checkpoint (INT4 leaves become
float32 master weights, `train.qat.master_from_quantized`), writes `OUT/train_config.json`,
`OUT/metrics.jsonl` and Orbax checkpoints under `OUT/checkpoints/`, and with `cfg.export`
writes the trained model as a k2jax checkpoint whose QAT groups are INT4.
With `resume=True` it continues from the newest complete checkpoint of `OUT`: parameters,
optimizer state, step and data position are restored, so the losses are those an
uninterrupted run would have logged. The corpus is read through once before anything is
written or compiled, so a bad record costs seconds, not a compilation. SIGINT and SIGTERM stop
the loop at a step boundary with that step saved (`train.interrupt`).
"""

from __future__ import annotations

import os
import time

import jax

from k2jax import api, checkpoint, sharding
from k2jax.config import ModelConfig
from train import data, interrupt, metrics as metrics_lib, mesh as train_mesh, qat
from train import step as step_lib
from train.checkpointing import Checkpoints
from train.config import TrainConfig, TrainConfigError


def model_setup(cfg: TrainConfig):
    """`(config, qat_groups, model_config)`: the model as stored, the groups trained with fake
    quantization, and the config the training forward runs (nothing INT4, compute dtype)."""
    if cfg.checkpoint is not None:
        config = checkpoint.read_config(cfg.checkpoint)
    else:
        config = ModelConfig.preset(cfg.preset)
    return (config, *step_lib.training_configs(config, cfg))


def initial_state(cfg: TrainConfig, model_config: ModelConfig, tx, trainable, mesh, state_sh):
    """The step-0 state, created directly with its shardings."""
    def from_params(params):
        return step_lib.init_state(qat.master_params(params), tx, trainable)

    if cfg.checkpoint is None:
        init = jax.jit(lambda key: from_params(api.init_params(model_config, key)),
                       out_shardings=state_sh)
        return init(jax.random.key(cfg.seed))
    _, params = checkpoint.load(cfg.checkpoint, mesh)
    return jax.jit(from_params, out_shardings=state_sh)(params)


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False,
          stop: interrupt.StopRequests | None = None) -> dict:
    """Runs (or resumes) training to `cfg.steps`; returns the last metrics record (or {}).

    Raises `Interrupted` after SIGINT/SIGTERM (caught by `stop`, an active `StopRequests`, or
    by one of its own): before compiling nothing more happens; in the loop the current step is
    saved, every checkpoint write finishes and training stops without exporting (an export
    already under way finishes first: it is written whole or not at all).
    """
    if stop is None:
        with interrupt.StopRequests() as stop:
            return train(cfg, resume, quiet, stop)
    last, step = _train(cfg, resume, quiet, stop)
    if stop.received:
        raise interrupt.Interrupted(stop.received, step)
    return last


def _train(cfg: TrainConfig, resume: bool, quiet: bool, stop) -> tuple[dict, int]:
    """`(last metrics record, step reached)`."""
    if cfg.export and os.path.exists(cfg.export):
        raise TrainConfigError(f"export path {cfg.export} already exists; remove it or pass "
                               "--export with a new path")
    mesh = train_mesh.build_mesh(cfg.mesh)
    config, qat_groups, model_config = model_setup(cfg)
    tokenizer = data.load_tokenizer(cfg.tokenizer, cfg.checkpoint)
    if tokenizer.vocab_size > config.vocab_size:
        raise data.DataError(f"tokenizer has {tokenizer.vocab_size} ids, the model's vocabulary "
                             f"only {config.vocab_size}")
    corpus = data.JsonlCorpus(cfg.data, tokenizer)
    corpus.validate()  # before the run directory exists and the step compiles
    ckpts = Checkpoints(cfg.out, cfg.checkpoint_every, cfg.keep_checkpoints)
    try:
        with sharding.activate(mesh):
            program = step_lib.build(config, cfg, mesh)
            state_sh, batch_sh = program.state_shardings, program.batch_shardings
            micro_shape = (cfg.grad_accum, cfg.batch_size // cfg.grad_accum, cfg.seq_len)
            packer = data.BatchStreams(corpus, cfg.seq_len, cfg.seed, cfg.batch_size,
                                       train_mesh.local_rows(batch_sh["tokens"], micro_shape),
                                       whole_documents=cfg.whole_documents)
            step = _start_step(cfg, ckpts, resume, quiet)
            if jax.process_index() == 0:
                cfg.save(cfg.out)  # from here on, even a run stopped at step 0 can resume
            if stop.received:
                return {}, step
            if step:
                state, data_state = ckpts.restore(step, program.state)
                packer.restore(data_state)
            else:
                state = initial_state(cfg, model_config, program.tx, program.trainable, mesh,
                                      state_sh)
            log = metrics_lib.MetricsLog(cfg.out, step, quiet)
            last = {}
            try:
                # Checked before the wait for the compilation; a complete run only exports.
                if not stop.received and step < cfg.steps:
                    compiled = program.lower().compile()
                    state, last, step = _loop(cfg, compiled, state, packer, batch_sh, ckpts,
                                              log, model_config, step, stop)
            finally:
                log.close()
    finally:
        ckpts.close()
    if cfg.export and not stop.received:
        export(state["params"], config, qat_groups, cfg.export,
               data.tokenizer_files(cfg.tokenizer, cfg.checkpoint))
        if not quiet:
            print(f"exported {cfg.export} (INT4: {', '.join(qat_groups) or 'none'})", flush=True)
    return last, step


def _start_step(cfg: TrainConfig, ckpts: Checkpoints, resume: bool, quiet: bool) -> int:
    """The newest checkpoint's step when resuming (0 if there is none), else 0 in an `out`
    that holds no checkpoints."""
    latest = ckpts.latest_step()
    if not resume:
        if latest is not None:
            raise TrainConfigError(f"{cfg.out} already holds checkpoints; pass --resume to "
                                   "continue or choose another --out")
        return 0
    if latest is None:
        if not quiet:
            print(f"no checkpoint in {ckpts.directory}; starting from step 0", flush=True)
        return 0
    if latest > cfg.steps:
        raise TrainConfigError(f"{cfg.out} is at step {latest} already; pass --steps {latest} "
                               "or more")
    return latest


def _loop(cfg, compiled, state, packer, batch_sh, ckpts, log, model_config, start, stop):
    """Steps from `start` to `cfg.steps`, or until `stop.received`; `(state, last, step)`.

    The step reached always has a checkpoint: one that stops between checkpoints saves its own.
    """
    flops = metrics_lib.train_flops_per_token(model_config, cfg.seq_len)
    peak = metrics_lib.peak_flops()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last, done, saved = {}, start, start

    def data_state():
        return packer.state(train_mesh.gather_positions(packer.positions()))

    def stopping() -> bool:
        stop.received = train_mesh.max_over_processes(stop.received or 0) or None
        return stop.received is not None

    while done < cfg.steps and not stopping():
        batch = data.micro_batches(packer.next_batch(), cfg.grad_accum)
        began = time.perf_counter()
        state, step_metrics = compiled(state, train_mesh.put_batch(batch, batch_sh))
        step_metrics = jax.device_get(step_metrics)
        seconds = time.perf_counter() - began
        done += 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            last = metrics_lib.record(done, step_metrics, seconds, tokens_per_step, flops, peak,
                                      jax.device_count())
            log.write(last)
        if ckpts.save(done, state, data_state, force=done == cfg.steps):
            saved = done
    if saved != done:
        ckpts.save(done, state, data_state, force=True)
    return state, last, done


def export(master, config: ModelConfig, qat_groups, path: str, files=()) -> None:
    """Writes the trained model to `path` as a k2jax checkpoint (QAT groups INT4), with copies
    of `files` (the tokenizer's) beside its config."""
    out_config = qat.export_config(config, qat_groups, config.dtype)
    params = jax.jit(lambda m: qat.export_params(m, config, qat_groups, config.dtype)[1])(master)
    checkpoint.save(os.path.abspath(path), out_config, params, files)
