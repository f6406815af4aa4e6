"""The ClientApp: builds the stage submodel, trains LoRA on its own partition, replies.

The client receives the stage plan (groups, β, fusion) and the tensors its rule sends; it
fuses the frozen base layers itself from its own copy of the base model, so dense weights
never cross the wire. Its data partition is `partition-id` of its node config. What the rule
keeps between rounds (FedSA-LoRA's B, FFA-LoRA's A) lives in the node's `context.state`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from devft.config import RunConfig, from_run_config
from devft.data import collate, encode, federated_data
from devft.errors import ConfigError
from devft.federation.wire import from_array_record, plan_from_config, to_array_record
from devft.models.lora import get_lora_state, set_lora_state, set_trainable
from devft.models.submodel import StagePlan, stage_model
from devft.rules import ClientEnv, ClientStore, Rule, make_rule
from devft.training.evaluation import heldout_batches, heldout_loss
from devft.training.local import train_local


def _env(cfg: RunConfig, rule: Rule, plan: StagePlan, msg: Message,
         context: Context) -> tuple[ClientEnv, Any]:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    partitions = int(context.node_config.get("num-partitions", cfg.federation.num_clients))
    if partitions != cfg.federation.num_clients:
        raise ConfigError("num-partitions (node config)", partitions,
                          f"federation.num_clients={cfg.federation.num_clients} of the run: "
                          "every client must split the data the same way")
    base = rule.base_model()
    config = dict(msg.content["config"])
    env = ClientEnv(cfg=cfg, plan=plan, prefix=base.family.lora_prefix(),
                    partition=int(context.node_config["partition-id"]),
                    round=int(config["global-round"]), config=config,
                    store=ClientStore(context.state), extra={"depth": base.num_layers})
    return env, base


def client_train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """One round of local training on this node's partition."""
    rule = make_rule(cfg)
    plan = plan_from_config(msg.content["config"])
    env, base = _env(cfg, rule, plan, msg, context)
    received = from_array_record(msg.content["arrays"])
    rule.prepare(received, env, base)
    model = stage_model(base, plan, rule.lora_settings(env))
    set_lora_state(model, rule.begin(received, env, get_lora_state(model)))
    set_trainable(model, rule.trainable)
    data = federated_data(cfg.data, cfg.federation.num_clients, cfg.seed)
    tok = base.tokenizer
    batches = [
        collate([encode(r, tok, cfg.data.max_seq_len) for r in records], tok.pad_token_id)
        for records in data.client_batches(env.partition, env.round, cfg.train.local_steps,
                                           cfg.train.batch_size, cfg.seed)
    ]
    inner = model.base_model.model

    def default_update():
        seq = np.random.SeedSequence([cfg.seed, env.partition, env.round])
        seed = int(seq.generate_state(1)[0])
        return train_local(model, batches, cfg.train, layers=base.family.layers(inner),
                           head=inner.get_output_embeddings(), seed=seed,
                           progress=cfg.output.progress,
                           desc=f"client {env.partition} stage {plan.stage}")

    result = rule.local_update(model, batches, env, default_update)
    metrics = MetricRecord({
        "num-examples": result.examples, "train-loss": result.mean_loss, "steps": result.steps,
        "tokens": result.tokens, "flops": result.flops_est, "train-time-s": result.train_time_s,
        "peak-mem-bytes": result.peak_mem_bytes, "mem-delta-bytes": result.mem_delta_bytes,
    })
    upload = rule.end(get_lora_state(model), env)
    return Message(RecordDict({"arrays": to_array_record(upload), "metrics": metrics}),
                   reply_to=msg)


def client_evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Personalized evaluation: the full model with the server's tensors + this client's own."""
    rule = make_rule(cfg)
    env, base = _env(cfg, rule, StagePlan.full(0), msg, context)
    env.plan = StagePlan.full(base.num_layers)
    model = stage_model(base, env.plan, cfg.lora)
    lora = rule.personal_lora(from_array_record(msg.content["arrays"]), env,
                              get_lora_state(model))
    set_lora_state(model, lora)
    data = federated_data(cfg.data, cfg.federation.num_clients, cfg.seed)
    loss = heldout_loss(model, heldout_batches(data, base.tokenizer, cfg.data),
                        cfg.train.precision)
    metrics = MetricRecord({"eval-loss": loss, "num-examples": len(data.eval_indices)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp bound to `cfg` (None: read the config from the run's run_config)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return client_train(msg, context, cfg or from_run_config(context.run_config))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return client_evaluate(msg, context, cfg or from_run_config(context.run_config))

    return app


app = make_client_app()
