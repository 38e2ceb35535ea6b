"""QAT fine-tuning of Kimi K2 / DeepSeek-V3 models: data, loss, optimizer, train step, checkpoints.

    train.config       TrainConfig (YAML), the parameter groups, what a resume may change
    train.data         JSONL -> tokens -> packed rows with segment ids and positions
    train.qat          fake-quantized compute params, master weights from INT4, INT4 export
    train.loss         weighted next-token cross entropy
    train.optimizer    trainable subtree, AdamW / Muon, schedule, clipping
    train.balance      aux-loss-free router bias updates
    train.qk_clip      MuonClip's QK-clip for MLA
    train.step         the jitted train step (gradient accumulation)
    train.mesh         mesh and shardings of state and batches
    train.checkpointing Orbax checkpoints of state and data position
    train.interrupt    SIGINT / SIGTERM as a stop request at the next step
    train.metrics      metrics log, FLOPs and MFU
    train.trainer      the run: set-up, loop, resume, export
    train.cli          `k2jax train`
"""
