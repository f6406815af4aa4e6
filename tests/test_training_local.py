"""One client's local update: only LoRA moves, the loss falls, runs are reproducible."""

import torch
from tiny import byte_tokenizer, tiny_model

from devft.config import LoraSettings, TrainConfig
from devft.data import IGNORE_INDEX, Record, collate, encode
from devft.models.families import family_of
from devft.models.lora import attach_lora, get_lora_state, seeded_lora_init, set_lora_state
from devft.training.accounting import attention_flops, estimate_train_flops
from devft.training.evaluation import heldout_loss
from devft.training.local import train_local

RECORDS = [
    Record("What is 2+2?", "", "4", "m"),
    Record("Name the capital.", "France", "Paris", "g"),
    Record("Say a color.", "", "blue", "c"),
]


def make_batch(records):
    tok = byte_tokenizer()
    return collate([encode(r, tok, 96) for r in records], tok.pad_token_id)


def lora_model(dropout=0.0):
    """A frozen tiny 4-layer LLaMA with LoRA (r=4) on all seven projections."""
    model = tiny_model("llama", num_layers=4).requires_grad_(False)
    family = family_of(model)
    peft = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=dropout), family)
    set_lora_state(peft, seeded_lora_init(peft, 0))
    return peft, family.layers(peft.base_model.model), peft.base_model.model.lm_head


def train(peft, layers, head, batches, seed=0, lr=1e-2):
    cfg = TrainConfig(local_steps=len(batches), lr=lr)
    return train_local(peft, batches, cfg, layers, head, seed=seed)


def frozen_state(peft):
    return {n: p.detach().clone() for n, p in peft.named_parameters() if not p.requires_grad}


def test_only_lora_moves_and_the_loss_falls():
    peft, layers, head = lora_model()
    # the tied embeddings' init (std 0.02) caps logits near +-0.3, so LoRA alone can barely
    # lower the loss below log(258); larger embeddings give it room to learn
    with torch.no_grad():
        peft.base_model.model.model.embed_tokens.weight.mul_(10)
    batch = make_batch(RECORDS)
    frozen = frozen_state(peft)
    lora_before = get_lora_state(peft)
    loss_before = heldout_loss(peft, [batch])

    result = train(peft, layers, head, [batch] * 20)

    loss_after = heldout_loss(peft, [batch])
    assert loss_after < 0.8 * loss_before
    assert result.steps == 20 and result.mean_loss < loss_before
    after = dict(peft.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    lora_after = get_lora_state(peft)
    for key in lora_before:
        if ".lora_B." in key:  # B starts at zero and must move (A may barely move at first)
            assert not torch.equal(lora_after[key], lora_before[key]), key
    assert not peft.training  # left in eval mode


def test_training_is_deterministic_for_a_seed():
    peft, layers, head = lora_model(dropout=0.2)  # dropout makes the seed matter
    start = get_lora_state(peft)
    batches = [make_batch(RECORDS)] * 4
    global_rng = torch.random.get_rng_state()

    train(peft, layers, head, batches, seed=5)
    first = get_lora_state(peft)
    set_lora_state(peft, start)
    train(peft, layers, head, batches, seed=5)
    again = get_lora_state(peft)
    set_lora_state(peft, start)
    train(peft, layers, head, batches, seed=6)
    other = get_lora_state(peft)

    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert torch.equal(torch.random.get_rng_state(), global_rng)  # global RNG untouched


def test_counts_cover_the_batches_and_skip_batches_without_responses():
    peft, layers, head = lora_model()
    big, small = make_batch(RECORDS), make_batch(RECORDS[1:2])
    empty = make_batch(RECORDS[:2])
    empty["labels"] = torch.full_like(empty["labels"], IGNORE_INDEX)
    batches = [big, empty, small]

    result = train(peft, layers, head, batches)

    assert result.steps == 2 and result.examples == 3 + 1
    assert result.tokens == int(big["attention_mask"].sum() + small["attention_mask"].sum())
    assert big["attention_mask"].sum() < big["attention_mask"].numel()  # padding not counted
    responses = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in (big, small)]
    assert result.response_tokens == sum(responses) > 0
    assert result.train_time_s > 0 and result.peak_mem_bytes > 0


def test_flops_estimate_for_one_batch_by_hand():
    peft, layers, head = lora_model()
    batch = make_batch(RECORDS[:2])
    b, t = batch["input_ids"].shape
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    result = train(peft, layers, head, [batch])

    # per layer (hidden 16, kv 8, mlp 32): q 16x16, k 8x16, v 8x16, o 16x16, gate/up 32x16,
    # down 16x32; LoRA r=4: A (4, in) + B (out, 4) per projection; tied head 258x16
    layer = 256 + 128 + 128 + 256 + 512 + 512 + 512
    lora = 128 + 96 + 96 + 128 + 192 + 192 + 192
    head_params = 258 * 16
    attn = 12 * b * t * t * 16 * 4
    assert attention_flops(b, t, 16, 4) == attn
    expected = 4 * 4 * layer * b * t + 6 * 4 * lora * b * t + 4 * head_params * n + attn
    assert (
        result.flops_est
        == expected
        == estimate_train_flops(4 * layer, 4 * lora, head_params, b * t, n, attn)
    )
