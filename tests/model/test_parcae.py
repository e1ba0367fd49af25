"""The model is the brief's model: structure, injection, loop control, checkpointing, init, counts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model import ParcaeConfig, ParcaeLM, build_model, count_params
from model.parcae import DiagonalInjection, apply_rotary, rotary_tables

TINY = ParcaeConfig(vocab_size=200, d_model=64, n_head=2, n_prelude=1, n_core=2, n_coda=1, max_seq_len=32)


def tiny(**changes) -> ParcaeLM:
    return build_model(dataclasses.replace(TINY, **changes), seed=0)


def randomize(model: ParcaeLM, seed: int = 1) -> ParcaeLM:
    """Move every parameter away from its init (zero projections would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def ids(batch=4, seq=16, seed=0):
    return torch.randint(0, TINY.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------
# The stable injection
def test_spectral_radius_at_init_is_0447_everywhere():
    a_bar, delta = tiny().transformer.recurrence.adapter.discretize()
    assert torch.allclose(a_bar, torch.full_like(a_bar, math.sqrt(0.2)), atol=1e-6)
    assert torch.allclose(delta, torch.full_like(delta, -math.log(math.sqrt(0.2))), atol=1e-6)
    assert torch.equal(tiny().transformer.recurrence.adapter.B, torch.eye(TINY.d_model))


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 100.0])
def test_spectral_radius_below_one_for_random_parameters(scale):
    inj = DiagonalInjection(256)
    g = torch.Generator().manual_seed(int(scale * 10))
    for _ in range(20):
        with torch.no_grad():
            inj.A_log.copy_(torch.randn(256, generator=g) * scale)
            inj.dt_bias.copy_(torch.randn(256, generator=g) * scale)
        a_bar, _ = inj.discretize()
        assert torch.isfinite(a_bar).all() and (a_bar >= 0).all() and a_bar.max() < 1


def test_spectral_radius_below_one_for_adversarial_parameters():
    extremes = torch.tensor([-1e30, -1e4, -100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 1e4, 1e30])
    a_log, dt_bias = torch.meshgrid(extremes, extremes, indexing="ij")
    inj = DiagonalInjection(a_log.numel())
    with torch.no_grad():
        inj.A_log.copy_(a_log.flatten())
        inj.dt_bias.copy_(dt_bias.flatten())
    a_bar, _ = inj.discretize()
    assert torch.isfinite(a_bar).all() and (a_bar >= 0).all()
    assert a_bar.max() < 1.0


def test_injection_formulas():
    inj = randomize(tiny()).transformer.recurrence.adapter
    a_bar = torch.exp(-F.softplus(inj.dt_bias) * torch.exp(inj.A_log))
    d = TINY.d_model
    h, e = torch.randn(2, 3, d), torch.randn(2, 3, d)
    manual = a_bar * h + F.softplus(inj.dt_bias) * (e @ inj.B.T)
    assert torch.allclose(inj(h, e), manual, atol=1e-6)
    add = tiny(injection="add").transformer.recurrence.adapter
    assert torch.equal(add(h, e), h + e)
    cat = randomize(tiny(injection="concat")).transformer.recurrence.adapter
    assert torch.allclose(cat(h, e), torch.cat((h, e), -1) @ cat.weight.T, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Structure, computed by hand
def _block_by_hand(block, x, rope, ve):
    """A pre-norm block written out from the brief, independent of the module code."""
    cfg = TINY
    b, t, d = x.shape
    hd = cfg.head_dim
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * block.norm_1.weight
    a = block.attn
    q, k, v = (xn @ w.T for w in (a.c_q.weight, a.c_k.weight, a.c_v.weight))
    q, k, v = (z.view(b, t, cfg.n_head, hd) for z in (q, k, v))
    if ve is not None:
        v = v + (2 * torch.sigmoid(xn[..., :32] @ a.ve_gate.weight.T)).unsqueeze(-1) * ve.view(b, t, cfg.n_head, hd)
    cos, sin = rope
    pos = torch.arange(t, dtype=torch.float32)[:, None]
    inv = cfg.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    assert torch.allclose(cos, torch.cos(pos * inv)) and torch.allclose(sin, torch.sin(pos * inv))

    def rot(z):
        out = z.clone()
        out[..., 0::2] = z[..., 0::2] * cos[:, None] - z[..., 1::2] * sin[:, None]
        out[..., 1::2] = z[..., 0::2] * sin[:, None] + z[..., 1::2] * cos[:, None]
        return out / torch.sqrt(out.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    q, k = rot(q).transpose(1, 2), rot(k).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    y = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(b, t, d)
    x = x + y @ a.c_proj.weight.T
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * block.norm_2.weight
    return x + (0.5 * F.relu(xn @ block.mlp.fc.weight.T) ** 2) @ block.mlp.proj.weight.T


def test_one_loop_equals_the_unrolled_model_by_hand():
    model = randomize(tiny())
    x_ids = ids()
    b, t = x_ids.shape
    rope = rotary_tables(t, TINY.head_dim, TINY.rope_base, torch.device("cpu"))
    tr, rec = model.transformer, model.transformer.recurrence
    tables = {**model.value_embeds, **rec.value_embeds}
    ve = {int(k): m.weight[x_ids] for k, m in tables.items()}
    assert sorted(ve) == [1, 3]  # layers 1 and 3 of 0..3 (every other, the last included)
    x = tr.wte.weight[x_ids]
    x = _block_by_hand(tr.prelude[0], x, rope, ve.get(0))
    e = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + TINY.norm_eps) * tr.ln_prelude.weight
    h0 = torch.randn(b, t, TINY.d_model)
    a_bar, delta = rec.adapter.discretize()
    u = a_bar * h0 + delta * (e @ rec.adapter.B.T)
    u = _block_by_hand(rec.core_block[0], u, rope, ve.get(1))
    h = _block_by_hand(rec.core_block[1], u, rope, ve.get(2))
    x = _block_by_hand(tr.coda[0], h @ tr.C.weight.T, rope, ve.get(3))
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + TINY.norm_eps) * tr.ln_f.weight
    logits = x @ tr.wte.weight.T
    with torch.no_grad():
        out = model(x_ids, loops=1, h0=h0)
    assert out.shape == (b, t, TINY.padded_vocab_size) and out.dtype == torch.float32
    torch.testing.assert_close(out, logits, atol=2e-5, rtol=1e-4)


def test_rotary_rotates_interleaved_pairs():
    cos, sin = rotary_tables(4, 8, 50000.0, torch.device("cpu"))
    x = torch.randn(1, 4, 1, 8)
    out = apply_rotary(x, cos, sin)
    assert torch.allclose(out[0, 0], x[0, 0])  # position 0 is not rotated
    pair = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, None]
    assert torch.allclose(out[..., 0::2], pair.real, atol=1e-6) and torch.allclose(out[..., 1::2], pair.imag, atol=1e-6)


def test_vocab_is_padded_and_embeddings_are_tied():
    model = tiny()
    assert TINY.padded_vocab_size == 256 and model.transformer.wte.weight.shape == (256, 64)
    assert "lm_head.weight" not in model.state_dict()


# ------------------------------------------------------------------------------------------------
# Initialisation
def test_init_matches_the_brief():
    cfg = dataclasses.replace(TINY, d_model=128, n_head=1)
    model = build_model(cfg, seed=3)
    sigma = math.sqrt(2 / (5 * 128))
    tr = model.transformer
    for block in [*tr.prelude, *tr.recurrence.core_block, *tr.coda]:
        for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight, block.mlp.fc.weight):
            assert abs(w.std().item() - sigma) / sigma < 0.02
            small = w if w.shape[0] <= w.shape[1] else w.T  # orthogonal rows/columns, scaled
            gram = small @ small.T / (sigma**2 * max(w.shape))
            assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-4)
        assert not block.attn.c_proj.weight.any() and not block.mlp.proj.weight.any()
        assert torch.equal(block.norm_1.weight, torch.ones(128))
    assert abs(model.transformer.wte.weight.std().item() - sigma) / sigma < 0.02
    assert abs(model.transformer.C.weight.std().item() - sigma) / sigma < 0.02
    for table in [*model.value_embeds.values(), *model.transformer.recurrence.value_embeds.values()]:
        assert abs(table.weight.std().item() - 1.0) < 0.02
    assert torch.equal(build_model(cfg, seed=3).transformer.C.weight, model.transformer.C.weight)


def test_value_embedding_gates_keep_the_linear_default_init():
    """The reference leaves ve_gate at nn.Linear's default, U(-1/sqrt(32), 1/sqrt(32)): gates near, not at, 1."""
    model = build_model(dataclasses.replace(TINY, d_model=128, n_head=4), seed=5)
    gates = [b.attn.ve_gate.weight for b in model.modules() if hasattr(b, "attn") and b.attn.ve_gate is not None]
    assert gates
    bound = 1 / math.sqrt(32)
    values = torch.cat([g.flatten() for g in gates])
    assert values.abs().max() <= bound and values.abs().max() > 0.9 * bound
    assert abs(values.std().item() - bound / math.sqrt(3)) < 0.2 * bound / math.sqrt(3)  # uniform's std


@pytest.mark.parametrize(
    "layers, owners",
    [((2, 2, 2), [1, 3, 5]), ((4, 4, 4), [1, 3, 5, 7, 9, 11]), ((1, 1, 1), [0, 2]), ((1, 2, 2), [0, 2, 4])],
)
def test_value_embeddings_on_the_layers_with_the_last_ones_parity(layers, owners):
    """The reference's rule, layer % 2 == (n_unique - 1) % 2 (for an even count: 1, 3, 5, ...)."""
    cfg = dataclasses.replace(TINY, n_prelude=layers[0], n_core=layers[1], n_coda=layers[2])
    assert cfg.value_embedding_layers() == owners
    model = ParcaeLM(cfg)
    built = sorted(int(k) for k in [*model.value_embeds, *model.transformer.recurrence.value_embeds])
    assert built == owners
    gpt = dataclasses.replace(TINY, arch="gpt", n_layers=5)
    assert gpt.value_embedding_layers() == [0, 2, 4]


def test_concat_projection_is_a_truncated_normal():
    cfg = dataclasses.replace(TINY, d_model=128, n_head=2, injection="concat")
    w = build_model(cfg, seed=2).transformer.recurrence.adapter.weight
    sigma = cfg.sigma
    # cut at 3 sigma (an orthogonal matrix of this size has ~90 entries beyond it), std of N(0,1) cut at 3
    assert w.abs().max() <= 3 * sigma and abs(w.std().item() - 0.9866 * sigma) / sigma < 0.03


def test_h0_like_init_is_a_fresh_truncated_normal_and_zeros_is_deterministic():
    model = tiny()
    e = torch.zeros(64, 16, TINY.d_model)
    h1, h2 = model.initial_state(e), model.initial_state(e)
    sigma = TINY.sigma
    assert not torch.equal(h1, h2)
    assert (
        h1.abs().max() <= 3 * sigma and abs(h1.std().item() - 0.9866 * sigma) / sigma < 0.02
    )  # std of N(0,1) cut at 3
    zeros = tiny(h0_init="zeros")
    x_ids = ids()
    with torch.no_grad():
        assert torch.equal(zeros(x_ids, loops=3), zeros(x_ids, loops=3))


# ------------------------------------------------------------------------------------------------
# Loop control
def test_each_row_gets_the_result_of_running_it_alone():
    model = randomize(tiny())
    x_ids = ids(batch=5)
    h0 = torch.randn(5, 16, TINY.d_model)
    n_nograd, n_grad = torch.tensor([0, 3, 1, 0, 6]), torch.tensor([1, 2, 2, 4, 1])
    with torch.no_grad():
        batched = model(x_ids, loops=(n_nograd, n_grad), h0=h0)
        for i in range(5):
            alone = model(x_ids[i : i + 1], loops=int(n_nograd[i] + n_grad[i]), h0=h0[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_finished_rows_stop_changing_and_stop_costing_compute():
    model = randomize(tiny())
    x_ids = ids(batch=4)
    h0 = torch.randn(4, 16, TINY.d_model)
    loops = (torch.tensor([0, 0, 2, 0]), torch.tensor([1, 3, 2, 2]))
    seen = []
    hook = model.transformer.recurrence.adapter.register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[0])
    )
    stats: list[dict[str, float]] = []
    with torch.no_grad():
        fast = model(x_ids, loops=loops, h0=h0, loop_stats=stats)
        hook.remove()
        slow = model(x_ids, loops=loops, h0=h0, skip_finished_rows=False)
    # no-grad phase: only row 2, twice; grad phase: all rows, then rows 1-3, then row 1 alone
    assert seen == [1, 1, 4, 3, 1]
    assert [s["active_rows"] for s in stats] == [1, 1, 4, 3, 1]
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_no_grad_loops_contribute_no_gradient():
    model = randomize(tiny(h0_init="zeros"))
    x_ids = ids(batch=2)
    model(x_ids, x_ids, loops=(torch.tensor([2, 2]), torch.tensor([1, 1]))).backward()
    truncated = grads(model)
    model.zero_grad()
    # The same computation with the first two loops outside autograd altogether.
    with torch.no_grad():
        rope = rotary_tables(16, TINY.head_dim, TINY.rope_base, torch.device("cpu"))
        x = model.transformer.wte(x_ids)
        for block in model.transformer.prelude:
            x = block(x, rope, model._value_embedding(block, x_ids))
        e = model.transformer.ln_prelude(x)
        h = torch.zeros_like(e)
        for _ in range(2):
            h = model.transformer.recurrence._core(h, e, x_ids, rope)
    model(x_ids, x_ids, loops=1, h0=h.detach()).backward()
    reference = grads(model)
    assert truncated.keys() == reference.keys()
    for name in truncated:
        torch.testing.assert_close(truncated[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("injection", ["diagonal", "add", "concat"])
@pytest.mark.parametrize("draw", [0, 1, 2])
def test_checkpointing_gives_the_same_loss_and_gradients(injection, draw):
    g = torch.Generator().manual_seed(draw)
    loops = (torch.randint(0, 3, (4,), generator=g), torch.randint(1, 4, (4,), generator=g))
    x_ids = ids(seed=draw)
    h0 = torch.randn(4, 16, TINY.d_model, generator=g)
    results = []
    for ckpt in (False, True):
        model = randomize(tiny(injection=injection, activation_checkpointing=ckpt))
        loss = model(x_ids, x_ids, loops=loops, h0=h0)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert len(grads_a) == len(list(tiny(injection=injection).parameters()))
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["parcae", "gpt"])
def test_the_chunked_loss_equals_the_whole_one(arch):
    """The loss over chunks of positions (logits recomputed in the backward) against one cross-entropy over
    the whole batch's logits: the same loss and gradients, ignored targets included, with or without grad."""
    changes = {"arch": "gpt", "n_layers": 3} if arch == "gpt" else {}
    model = randomize(tiny(**changes))
    x_ids = ids(seed=4)
    targets = x_ids.roll(-1, 1)
    targets[0, :6] = -100
    kwargs = {"loops": 3, "h0": torch.zeros(*x_ids.shape, TINY.d_model)} if arch == "parcae" else {}
    logits = model(x_ids, **kwargs)
    whole = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
    whole.backward()
    expected = grads(model)
    model.zero_grad()
    model.loss_chunk_rows = 7  # 64 positions: 10 chunks, the last one short
    chunked = model(x_ids, targets, **kwargs)
    chunked.backward()
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(x_ids, targets, **kwargs), whole, atol=1e-6, rtol=1e-6)


def test_every_parameter_gets_a_gradient():
    model = randomize(tiny())
    x_ids = ids()
    model(x_ids, x_ids, loops=(torch.tensor([1, 0, 0, 2]), torch.tensor([2, 1, 3, 1]))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_more_test_time_loops_than_training_and_bad_counts():
    model = tiny()
    x_ids = ids()
    with torch.no_grad():
        assert torch.isfinite(model(x_ids, loops=3 * TINY.mean_recurrence)).all()
    with pytest.raises(ValueError, match="needs loops=T"):
        model(x_ids)
    with pytest.raises(ValueError, match="loops must be >= 1"):
        model(x_ids, loops=0)
    with pytest.raises(ValueError, match="at least one loop per row"):
        model(x_ids, loops=(torch.zeros(4, dtype=torch.long), torch.tensor([1, 0, 1, 1])))


def test_gpt_baseline_uses_the_same_block():
    cfg = dataclasses.replace(TINY, arch="gpt", n_layers=4)
    model = build_model(cfg)
    assert sorted(model.value_embeds) == ["1", "3"]
    assert {type(b).__name__ for b in model.transformer.h} == {"Block"}
    loss = model(ids(seed=1), ids(seed=2))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="not a looped model"):
        model(ids(), loops=4)


# ------------------------------------------------------------------------------------------------
# Counting
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"injection": "add"},
        {"injection": "concat"},
        {"arch": "gpt", "n_layers": 5},
        {"value_embeddings": False},
        {"n_prelude": 0, "n_core": 3, "n_coda": 2},
    ],
)
def test_count_params_matches_the_module(changes):
    cfg = dataclasses.replace(TINY, **changes)
    with torch.device("meta"):
        model = ParcaeLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)["total"]


def test_released_140m_counts_on_the_meta_device():
    with torch.device("meta"):
        model = ParcaeLM(ParcaeConfig())
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 144.3e6) / 144.3e6 < 1e-3
    ve = sum(p.numel() for n, p in model.named_parameters() if "value_embeds" in n)
    assert abs(ve - 75.5e6) / 75.5e6 < 1e-3


# ------------------------------------------------------------------------------------------------
# Generation
def test_generation_greedy_is_deterministic_and_sampling_is_seeded():
    model = randomize(tiny())
    prompt = ids(batch=2, seq=4)
    a = model.generate(prompt, 6, loops=5)
    b = model.generate(prompt, 6, loops=5)
    assert torch.equal(a, b) and a.shape == (2, 10) and torch.equal(a[:, :4], prompt)
    assert (a < TINY.vocab_size).all()  # padded vocab entries are never produced
    s1 = model.generate(prompt, 6, loops=2, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(5))
    s2 = model.generate(prompt, 6, loops=2, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2)


def test_min_iterations_run_the_core_on_no_rows_and_change_nothing():
    model = randomize(tiny())
    x_ids = ids(batch=2)
    h0 = torch.randn(2, 16, TINY.d_model)
    loops = (torch.tensor([1, 0]), torch.tensor([2, 1]))
    calls = []
    hook = model.transformer.recurrence.adapter.register_forward_hook(
        lambda m, args, out: calls.append(args[0].shape[0])
    )
    padded = model(x_ids, x_ids, loops=loops, h0=h0, min_iterations=(3, 4))
    hook.remove()
    assert calls == [1, 0, 0, 2, 1, 0, 0]  # 3 no-grad iterations, 4 grad iterations, empty ones included
    plain = model(x_ids, x_ids, loops=loops, h0=h0)
    torch.testing.assert_close(padded, plain, atol=0, rtol=0)
    padded.backward()


def test_mixed_precision_keeps_the_loop_state_in_fp32():
    """Under autocast (fp32 weights, the reference's bf16 mixed precision) matmuls run in bf16, while the
    injected signal e, the state h and the injection stay fp32 on every loop; in a bf16 model everything is
    bf16. Over 16 loops the mixed state stays closer to fp32's than the bf16 one does."""
    cfg = dataclasses.replace(TINY, h0_init="zeros")
    model = build_model(cfg, seed=1)
    x_ids = ids()
    seen: dict[str, list[torch.dtype]] = {"adapter": [], "recurrence": [], "c_q": []}
    hooks = [
        model.transformer.recurrence.adapter.register_forward_hook(lambda m, i, o: seen["adapter"].append(o.dtype)),
        model.transformer.recurrence.register_forward_hook(lambda m, i, o: seen["recurrence"].append(o.dtype)),
        model.transformer.recurrence.core_block[0].attn.c_q.register_forward_hook(
            lambda m, i, o: seen["c_q"].append(o.dtype)
        ),
    ]
    states = {}
    with torch.no_grad():
        states["fp32"] = _final_state(model, x_ids, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states["mixed"] = _final_state(model, x_ids, 16)
    assert seen["adapter"][-16:] == [torch.float32] * 16 and seen["recurrence"][-1] == torch.float32
    assert seen["c_q"][-1] == torch.bfloat16  # the matmuls themselves in bf16
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        states["bf16"] = _final_state(model.to(torch.bfloat16), x_ids, 16)
    assert states["bf16"].dtype == torch.bfloat16 and states["mixed"].dtype == torch.float32

    def drift(h: torch.Tensor) -> float:
        return float((h.float() - states["fp32"]).norm() / states["fp32"].norm())

    assert drift(states["mixed"]) < drift(states["bf16"])


def test_mixed_precision_dtypes_of_each_stage_are_the_references():
    """Under autocast each stage's input has the dtype the reference's has (measured by hooking its own
    Parcae under torch.autocast("cpu", torch.bfloat16), sandyresearch/parcae dee8363): the prelude and the
    core take fp32 (embedding lookups and fp32 residuals), the coda and ln_f take bf16 (the readout C is a
    matmul, and the coda's residual stream stays in its dtype)."""
    model = build_model(dataclasses.replace(TINY, n_coda=2), seed=1).eval()
    seen: dict[str, torch.dtype] = {}
    stages = {
        "prelude": model.transformer.prelude[0],
        "core": model.transformer.recurrence.core_block[0],
        "coda": model.transformer.coda[0],
        "coda_1": model.transformer.coda[1],
        "ln_f": model.transformer.ln_f,
    }

    def hook(name: str):
        def record(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            seen.setdefault(name, x.dtype)

        return record

    hooks = [module.register_forward_pre_hook(hook(name), with_kwargs=True) for name, module in stages.items()]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids(), loops=2, h0=torch.zeros(4, 16, TINY.d_model))
    for hook in hooks:
        hook.remove()
    fp32, bf16 = torch.float32, torch.bfloat16
    assert seen == {"prelude": fp32, "core": fp32, "coda": bf16, "coda_1": bf16, "ln_f": bf16}
    assert logits.dtype == fp32


def _final_state(model: ParcaeLM, x_ids: torch.Tensor, loops: int) -> torch.Tensor:
    captured = []
    hook = model.transformer.recurrence.register_forward_hook(lambda m, i, o: captured.append(o))
    model(x_ids, loops=loops)
    hook.remove()
    return captured[-1]
