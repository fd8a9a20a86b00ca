"""AdapterFusion over any adapter kind, the two-stage multi-task recipe, per-example routing."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import output_of, randomize, tiny_inputs, tiny_model, train_by_the_recipe

import peftlab
from peftlab.layer import AdaptedLayer, WeightCache, _nonzero, cached_weights
from peftlab.methods.fusion import Fusion
from peftlab.multitask import MultiTaskModel, train_adapter, train_fusion
from peftlab.sites import find_sites

# The tiny models are 32 wide: reduction 8 gives bottlenecks of 4 (divisible by phm_dim 4).
PFEIFFER = peftlab.BottleneckConfig.pfeiffer(reduction=8)
COMPACTER_PP = peftlab.CompacterConfig.plus_plus(reduction=8)
LORA_FFN = peftlab.LoRAConfig(r=2, targets=("ffn_down",))
IA3 = peftlab.IA3Config()
EXACT_V = peftlab.FusionConfig(value_noise=0.0)


def _with_members(model, **configs):
    adapters = peftlab.attach(model)
    for name, config in configs.items():
        adapters.add(name, config)
        randomize(adapters.parameters(name), seed=len(adapters.names))
    return adapters


def _snapshot(adapters, *names):
    return {(n, i): p.detach().clone() for n in names for i, p in enumerate(adapters.parameters(n))}


def _mixed(family):
    model = tiny_model(family)
    return model, _with_members(model, pfeiffer=PFEIFFER, compacter=COMPACTER_PP, lora=LORA_FFN)


# ---- the mechanism ----------------------------------------------------------------------------
@pytest.mark.parametrize("config", [PFEIFFER, COMPACTER_PP, LORA_FFN, IA3], ids=lambda c: c.method)
def test_a_one_member_fusion_with_identity_value_is_that_member_exactly(bert, config):
    inputs = tiny_inputs("bert")
    adapters = _with_members(bert, member=config)
    adapters.activate("member")
    alone = output_of(bert, inputs)
    adapters.add_fusion("fusion", ["member"], EXACT_V)
    adapters.activate("fusion")
    assert torch.equal(output_of(bert, inputs), alone)  # softmax over one member is exactly 1
    assert torch.equal(adapters.fusion_weights("fusion"), torch.ones(len(adapters["fusion"].sites), 1))


def test_a_one_member_ia3_fusion_is_that_member_exactly_also_for_large_scales(bert):
    inputs = tiny_inputs("bert")
    adapters = _with_members(bert, member=IA3)
    with torch.no_grad():
        for p in adapters.parameters("member"):
            p.uniform_(2.0, 7.0)  # far from 1: h + (scaled - h) would round differently from scaled
    adapters.activate("member")
    alone = output_of(bert, inputs)
    adapters.add_fusion("fusion", ["member"], EXACT_V)
    adapters.activate("fusion")
    assert torch.equal(output_of(bert, inputs), alone)


def test_a_fusion_layer_equals_the_papers_formula(bert):
    adapters = _with_members(bert, houlsby=peftlab.BottleneckConfig.houlsby(reduction=8),
                             pfeiffer=PFEIFFER, lora=LORA_FFN)
    adapters.add_fusion("f", ["houlsby", "pfeiffer", "lora"], peftlab.FusionConfig(temperature=2.0))
    randomize(adapters.parameters("f"), seed=7)
    adapters.activate("f")
    layer = bert.get_submodule("encoder.layer.0.output.dense")
    fusion, members = layer.adapters["f"], [layer.adapters[n] for n in ("houlsby", "pfeiffer", "lora")]
    for x in (torch.randn(3, 5, layer.in_features), torch.randn(4, layer.in_features)):  # [B, T, d], [B, d]
        h = layer.base(x)
        z = torch.stack([members[0](h), members[1](h), members[2].add_delta(h, x)])  # [N, ..., d]
        q = fusion.query(h)
        s = torch.softmax((q * fusion.key(z)).sum(-1) / 2.0, dim=0)  # (hᵀQ)·(z_nᵀK) / T over n
        expected = (s.unsqueeze(-1) * fusion.value(z)).sum(0)  # Σ s_n·(z_nᵀV)
        assert torch.allclose(layer(x), expected, atol=1e-5)


def _literal_fusion(fusion, h, z):
    """The paper's formula as written, nothing reordered: ``s_n = softmax_n((Q·h + b_Q)ᵀ(K·z_n) / T)``,
    ``o = Σ_n s_n·V·z_n``, for ``z [N, ..., d]``."""
    q = h @ fusion.query.weight.t() + fusion.query.bias
    keys = z @ fusion.key.weight.t()
    s = torch.softmax((q * keys).sum(-1) / fusion.temperature, dim=0)
    return (s.unsqueeze(-1) * (z @ fusion.value.weight.t())).sum(0)


@pytest.mark.parametrize("module", ["encoder.layer.0.output.dense", "encoder.layer.1.attention.output.dense"])
def test_bottleneck_members_run_batched_and_equal_the_literal_formula_with_gradients(bert, module):
    """With bottleneck members (Houlsby, Pfeiffer, Compacter++, three activations) the fusion never
    forms the members' outputs (the module docstring's rewrite); in float64 its output and every
    gradient (input, fusion, members) equal the literal formula's. At the attention output only
    Houlsby acts: the others count as ``z_n = h``."""
    adapters = _with_members(bert, houlsby=peftlab.BottleneckConfig.houlsby(reduction=8),
                             pfeiffer=PFEIFFER, compacter=COMPACTER_PP)
    adapters.add_fusion("f", ["houlsby", "pfeiffer", "compacter"], peftlab.FusionConfig(temperature=2.0))
    randomize(adapters.parameters("f"), scale=0.5, seed=7)
    adapters.activate("f")
    layer = bert.get_submodule(module).double()
    fusion = layer.adapters["f"]
    members = [layer.adapters[n] if n in layer.adapters else None for n in fusion.members]
    params = [p for n in ("f", "houlsby", "pfeiffer", "compacter") for p in adapters.parameters(n)
              if p.dtype == torch.float64]
    for p in params:
        p.requires_grad_(True)  # the members' gradients must be exact too
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64, requires_grad=True)
    h = layer.base(x)
    assert fusion.over_bottlenecks(h, tuple(members)) is not None  # the batched form ran
    z = torch.stack([h if m is None else m(h) for m in members])
    expected = _literal_fusion(fusion, h, z)
    got = layer(x)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fusion.last_weights, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-2)
    grad_out = torch.randn_like(got)
    want = torch.autograd.grad(expected, [x, *params], grad_out, allow_unused=True)
    have = torch.autograd.grad(got, [x, *params], grad_out, allow_unused=True)
    assert sum(g is not None and g.abs().max() > 0 for g in want) >= 5  # x, Q, b_Q, K, V at least
    for p, w, g in zip([x, *params], want, have):
        zero = torch.zeros_like(p)  # unused on one side: must be no gradient on the other too
        assert torch.allclose(zero if g is None else g, zero if w is None else w, rtol=1e-10, atol=1e-12)


def test_members_build_on_the_other_active_adapters_at_their_module(bert):
    """With other adapters active at the module, ``h`` already holds them: an (IA)³ member's
    ``z`` is ``h`` plus what its vectors change, a LoRA member sees the (IA)³-scaled input."""
    adapters = _with_members(bert, ia3_in=IA3, lora_other=LORA_FFN, lora=LORA_FFN,
                             ia3_out=peftlab.IA3Config(targets=("ffn_down",), scale_input=()))
    adapters.add_fusion("f", ["lora", "ia3_out"])
    randomize(adapters.parameters("f"), seed=7)
    adapters.activate("ia3_in", "lora_other", "f")
    layer = bert.get_submodule("encoder.layer.0.output.dense")
    p = {n: layer.adapters[n] for n in ("ia3_in", "lora_other", "lora", "ia3_out", "f")}
    l_in, l_out = p["ia3_in"].ia3_l, p["ia3_out"].ia3_l
    x = torch.randn(2, 4, layer.in_features)
    base = layer.base(l_in * x)
    h = p["lora_other"].add_delta(base, l_in * x)
    z_lora = p["lora"].add_delta(h, l_in * x)
    z_ia3 = h + (l_out * base - base)
    with torch.no_grad():
        assert torch.allclose(layer(x), p["f"](h, torch.stack([z_lora, z_ia3], dim=-2)), atol=1e-5)


def test_a_fusion_beside_a_lora_on_a_frozen_base(bert):
    """Frozen base, one LoRA active beside a fusion at the module: h = W·x + b + LoRA, then the fusion."""
    adapters = _with_members(bert, a=PFEIFFER, b=PFEIFFER, lora=LORA_FFN)
    adapters.add_fusion("f", ["a", "b"])
    randomize(adapters.parameters("f"), seed=7)
    adapters.activate("lora", "f")
    adapters.train("f")
    layer = bert.get_submodule("encoder.layer.0.output.dense")
    x = torch.randn(2, 4, layer.in_features)
    h = layer.adapters["lora"].add_delta(layer.base(x), x)
    z = torch.stack([layer.adapters["a"](h), layer.adapters["b"](h)], dim=-2)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.adapters["f"](h, z), atol=1e-5)


def test_an_absent_member_counts_as_the_unchanged_output(bert):
    # Houlsby acts at attn_out and ffn_down, Pfeiffer at ffn_down only: at attn_out the fusion
    # chooses between Houlsby's output and the plain one.
    adapters = _with_members(bert, houlsby=peftlab.BottleneckConfig.houlsby(reduction=8), pfeiffer=PFEIFFER)
    adapters.add_fusion("f", ["houlsby", "pfeiffer"])
    randomize(adapters.parameters("f"), seed=7)
    adapters.activate("f")
    layer = bert.get_submodule("encoder.layer.0.attention.output.dense")
    x = torch.randn(2, 4, layer.in_features)
    h = layer.base(x)
    z = torch.stack([layer.adapters["houlsby"](h), h], dim=-2)
    assert torch.allclose(layer(x), layer.adapters["f"](h, z))
    assert len(adapters["f"].sites) == 4  # 2 blocks × (attn_out, ffn_down)


def test_members_run_only_inside_an_active_fusion(bert):
    inputs = tiny_inputs("bert")
    adapters = _with_members(bert, a=PFEIFFER, b=LORA_FFN)
    adapters.add_fusion("f", ["a", "b"])
    adapters.activate("f")
    fused = output_of(bert, inputs)
    adapters.activate("a", "f", "b")
    assert torch.equal(output_of(bert, inputs), fused)


def test_fusion_weights_are_the_mean_attention_per_module_and_member(bert):
    adapters = _with_members(bert, a=PFEIFFER, b=COMPACTER_PP, c=LORA_FFN)
    adapters.add_fusion("f", ["a", "b", "c"])
    randomize(adapters.parameters("f"), scale=0.5, seed=3)
    adapters.activate("f")
    output_of(bert, tiny_inputs("bert"))
    weights = adapters.fusion_weights("f")
    assert weights.shape == (2, 3)  # ffn_down of the 2 blocks × 3 members
    assert torch.allclose(weights.sum(1), torch.ones(2))
    assert not torch.allclose(weights, torch.full((2, 3), 1 / 3), atol=1e-3)


def test_the_value_penalty_pulls_toward_the_identity(bert):
    adapters = _with_members(bert, a=PFEIFFER, b=LORA_FFN)
    adapters.add_fusion("f", ["a", "b"], peftlab.FusionConfig(value_noise=0.0, value_identity_penalty=0.5))
    assert adapters.fusion_penalty("f").item() == 0.0
    values = [p.value.weight for p in adapters["f"].pieces.values()]
    with torch.no_grad():
        values[0][0, 1] += 2.0
    assert adapters.fusion_penalty("f").item() == pytest.approx(0.5 * 4.0)


def test_fusion_params_per_module_are_three_squares_plus_the_query_bias(bert):
    adapters = _with_members(bert, a=PFEIFFER, b=LORA_FFN)
    adapters.add_fusion("f", ["a", "b"])
    assert adapters.summary()["f"].parameters == 2 * (3 * 32**2 + 32)


# ---- any kind, any family ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_a_mixed_kind_fusion_trains_only_itself(family):
    model, adapters = _mixed(family)
    inputs = tiny_inputs(family)
    adapters.add_fusion("mixed", ["pfeiffer", "compacter", "lora"])
    adapters.activate("mixed")
    trainable = adapters.train("mixed")
    assert {id(p) for p in trainable} == {id(p) for p in adapters.parameters("mixed")}
    (output_of(model, inputs).pow(2).mean() + adapters.fusion_penalty("mixed")).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    for member in ("pfeiffer", "compacter", "lora"):
        assert all(p.grad is None and not p.requires_grad for p in adapters.parameters(member))


def test_members_are_bit_identical_after_stage_two(bert):
    model = MultiTaskModel(bert, {"a": 2, "b": 3})
    adapters = _with_members(model, a=PFEIFFER, b=LORA_FFN)  # stage 1 done (already attached)
    before = _snapshot(adapters, "a", "b")
    heads = {k: v.clone() for k, v in model.heads.state_dict().items()}
    batches = [{**tiny_inputs("bert", batch=4, seed=s), "labels": torch.tensor([0, 1, 1, 0])}
               for s in range(3)]
    result = train_fusion(model, {"a": batches, "b": batches}, target="a", fusion_lr=1e-2)
    assert result.fusion == "fusion-a" and list(result.losses) == ["fusion-a"]
    after = _snapshot(adapters, "a", "b")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(heads[k], model.heads.state_dict()[k]) for k in heads)  # stage-1 heads
    assert not torch.equal(model.heads["fusion-a"].weight, model.heads["a"].weight)
    assert adapters.active == ("fusion-a",)


def test_stage_two_trains_by_the_recipe_compare_uses_too(bert):
    # peftlab.loop.fit trains compare's fusion stage and train_fusion's; test_compare checks the
    # same recipe against compare's fusion runs.
    batches = [{**tiny_inputs("bert", batch=4, seed=s), "labels": torch.tensor([0, 1, 1, 0])}
               for s in range(5)]

    def stage_one_done():
        torch.manual_seed(0)
        model = MultiTaskModel(tiny_model("bert"), {"a": 2, "b": 2})
        return model, _with_members(model, a=PFEIFFER, b=LORA_FFN)

    model, adapters = stage_one_done()
    torch.manual_seed(1)
    train_fusion(model, {"a": batches, "b": batches}, target="a", fusion_lr=1e-2, fusion_epochs=2)

    by_hand, by_hand_adapters = stage_one_done()
    torch.manual_seed(1)
    by_hand.add_head("fusion-a", like="a")
    by_hand_adapters.add_fusion("fusion-a", ["a", "b"])
    train_by_the_recipe(by_hand, "fusion-a", batches * 2, lr=1e-2, extras=("heads.fusion-a",),
                        head="fusion-a")

    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in by_hand.named_parameters())
    assert not torch.equal(trained["heads.fusion-a.weight"], trained["heads.a.weight"])  # it learned


def test_both_stages_from_scratch_with_a_head_per_task():
    backbone = tiny_model("bert")
    model = MultiTaskModel(backbone, {"sst2": 2, "rte": 2, "stsb": 1}, pooling="first")
    batch = {**tiny_inputs("bert", batch=4)}
    tasks = {"sst2": [{**batch, "labels": torch.tensor([0, 1, 0, 1])}] * 4,
             "rte": [{**batch, "labels": torch.tensor([1, 1, 0, 0])}] * 4,
             "stsb": [{**batch, "labels": torch.tensor([0.5, 2.0, 4.0, 1.0])}] * 4}
    configs = {"sst2": PFEIFFER, "rte": LORA_FFN, "stsb": COMPACTER_PP}
    result = train_fusion(model, tasks, target="rte", adapter_config=configs, lr=1e-2, fusion_lr=1e-2)
    assert list(result.losses) == ["sst2", "rte", "stsb", "fusion-rte"]
    for losses in result.losses.values():
        assert losses[-1] < losses[0]
    out = model(**batch)
    assert out.logits["stsb"].shape == (4, 1) and out.logits["fusion-rte"].shape == (4, 2)


# ---- files ------------------------------------------------------------------------------------
def test_a_fusion_saves_its_own_weights_and_records_its_members(tmp_path):
    model, adapters = _mixed("bert")
    inputs = tiny_inputs("bert")
    adapters.add_fusion("mixed", ["pfeiffer", "compacter", "lora"])
    randomize(adapters.parameters("mixed"), seed=9)
    adapters.activate("mixed")
    expected = output_of(model, inputs)
    for name in ("pfeiffer", "compacter", "lora", "mixed"):
        adapters.save(name, tmp_path / name)
    saved = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert saved["method"] == "fusion" and saved["members"] == ["pfeiffer", "compacter", "lora"]

    fresh = tiny_model("bert")
    loaded = peftlab.attach(fresh)
    with pytest.raises(peftlab.AdapterLoadError, match="load its members"):
        loaded.load(tmp_path / "mixed")
    for name in ("pfeiffer", "compacter", "lora", "mixed"):
        loaded.load(tmp_path / name)
    loaded.activate("mixed")
    assert torch.equal(output_of(fresh, inputs), expected)


# ---- per-example routing ----------------------------------------------------------------------
ROUTE = ["lora", "ia3", None, "pfeiffer", "fusion", "lora", ("lora", "ia3")]


def _routable(family):
    model = tiny_model(family)
    adapters = _with_members(model, lora=peftlab.LoRAConfig(r=2, targets=("query", "value", "ffn_down")),
                             ia3=IA3, pfeiffer=PFEIFFER)
    adapters.add_fusion("fusion", ["lora", "ia3", "pfeiffer"])
    randomize(adapters.parameters("fusion"), seed=5)
    return model, adapters


def _one_by_one(model, adapters, inputs, route):
    rows = []
    for i, entry in enumerate(route):
        adapters.activate(*(() if entry is None else (entry,) if isinstance(entry, str) else entry))
        rows.append(output_of(model, {k: v[i:i + 1] for k, v in inputs.items()}))
    return torch.cat(rows)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_routing_equals_running_each_example_with_its_adapter(family):
    model, adapters = _routable(family)
    inputs = tiny_inputs(family, batch=len(ROUTE))
    adapters.activate("pfeiffer")
    plain = output_of(model, inputs)
    with torch.no_grad(), adapters.route(ROUTE):
        routed = output_of(model, inputs)
    assert torch.equal(output_of(model, inputs), plain)  # after the block, activate() rules again
    assert not torch.allclose(routed, plain, atol=1e-3)
    assert torch.allclose(routed, _one_by_one(model, adapters, inputs, ROUTE), atol=1e-5, rtol=0)


def test_routing_under_autocast_keeps_the_dtype_each_example_gets_alone():
    """Under bfloat16 autocast an (IA)³ output vector (float32) promotes its rows to float32, as
    it does unrouted; a routed layer returns the whole batch in the promoted dtype."""
    model, adapters = _routable("bert")
    value = model.encoder.layer[0].attention.self.value  # LoRA, (IA)³ and the fusion act here
    x = torch.randn(len(ROUTE), 5, value.in_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with adapters.route(ROUTE):
            routed = value(x)
        alone = []
        for i, entry in enumerate(ROUTE):
            adapters.activate(*(() if entry is None else (entry,) if isinstance(entry, str) else entry))
            alone.append(value(x[i:i + 1]))
    assert {a.dtype for a in alone} == {torch.bfloat16, torch.float32} and routed.dtype == torch.float32
    assert torch.allclose(routed, torch.cat([a.float() for a in alone]), atol=0.02, rtol=0.02)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_routed_batch_trains_each_adapter_on_its_own_examples(family):
    """Gradients through a mixed batch (one shared base product, each group's pieces on its rows)
    equal the sum of each example's backward with its adapters alone."""
    model, adapters = _routable(family)
    inputs = tiny_inputs(family, batch=len(ROUTE))
    params = [p for n in ("lora", "ia3", "pfeiffer", "fusion") for p in adapters.parameters(n)]
    with adapters.route(ROUTE):
        output_of(model, inputs).square().sum().backward()
    routed = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    _one_by_one(model, adapters, inputs, ROUTE).square().sum().backward()
    assert all(g.abs().sum() > 0 for g in routed)
    for g, p in zip(routed, params):
        assert torch.allclose(g, p.grad, atol=1e-5, rtol=1e-4)


def test_routing_is_per_thread():
    model, adapters = _routable("bert")
    inputs = tiny_inputs("bert", batch=4)
    routes = [["lora", None, "fusion", "ia3"], ["fusion", "pfeiffer", "lora", None]]
    with torch.no_grad():
        sequential = []
        for route in routes:
            with adapters.route(route):
                sequential.append(output_of(model, inputs))
        adapters.activate()
        plain = output_of(model, inputs)
        results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
        start = threading.Barrier(2)

        def worker(i):
            start.wait()
            for _ in range(8):
                with adapters.route(routes[i]):
                    results[i].append(output_of(model, inputs))

        threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert torch.equal(output_of(model, inputs), plain)  # the main thread was never routed
        fresh: list[torch.Tensor] = []  # nor was a new thread: it runs the active adapters
        thread = threading.Thread(target=lambda: fresh.append(output_of(model, inputs)))
        thread.start()
        thread.join()
        assert len(fresh) == 1 and torch.equal(fresh[0], plain)
    for i in (0, 1):
        assert len(results[i]) == 8
        assert all(torch.allclose(r, sequential[i], atol=1e-6, rtol=0) for r in results[i])


def test_routing_with_one_or_two_groups_at_a_layer(bert):
    """Where every example runs the same pieces (a layer the routed adapters do not touch, or one
    adapter for all), the layer runs the whole batch at once; two groups split it in two."""
    adapters = _with_members(bert, lora=peftlab.LoRAConfig(r=2), ia3=IA3)
    inputs = tiny_inputs("bert", batch=3)
    with torch.no_grad():
        for route in (["lora", "lora", "lora"], [None, None, None], ["lora", None, "lora"]):
            with adapters.route(route):
                routed = output_of(bert, inputs)
            assert torch.allclose(routed, _one_by_one(bert, adapters, inputs, route), atol=1e-5, rtol=0)
    query = bert.encoder.layer[0].attention.self.query
    plan = query.plan_route([("lora",), (), ("lora",)], torch.device("cpu"))
    assert [ix.tolist() for ix, _ in plan.groups] == [[0, 2], [1]] and plan.rows.tolist() == [0, 1, 0]
    plan = query.plan_route([("lora",), (), ("lora",)], torch.device("meta"))
    assert all(ix.device.type == "meta" for ix, _ in plan.groups)  # on the device it is asked for


def test_a_kept_fusion_product_follows_its_members_and_its_own_weights(bert):
    """Under a weight cache, the fusion's query-key products over bottleneck members are kept
    from one forward to the next, and made again once a member's or the fusion's weight moves."""
    adapters = _with_members(bert, a=PFEIFFER, b=COMPACTER_PP)
    adapters.add_fusion("f", ["a", "b"])
    randomize(adapters.parameters("f"), seed=9)
    adapters.activate("f")
    inputs = tiny_inputs("bert")
    layer = next(m for m in bert.modules() if isinstance(m, AdaptedLayer) and "f" in m.adapters)
    cache = WeightCache()
    with torch.no_grad(), cached_weights(cache):
        first = output_of(bert, inputs)
        kept = len(cache)
        assert kept > 0 and torch.equal(output_of(bert, inputs), first) and len(cache) == kept
        changed = []
        for param in (layer.adapters["a"].up.weight, layer.adapters["f"].key.weight):
            param.mul_(1.5)  # a member's up projection, then the fusion's key
            changed.append(output_of(bert, inputs))
    with torch.no_grad():
        assert torch.allclose(changed[-1], output_of(bert, inputs), atol=1e-6, rtol=0)  # as uncached
        layer.adapters["f"].key.weight.div_(1.5)
        assert torch.allclose(changed[0], output_of(bert, inputs), atol=1e-6, rtol=0)
    assert not torch.allclose(changed[0], first, atol=1e-4)
    assert not torch.allclose(changed[1], changed[0], atol=1e-4)


def test_a_zero_scale_gets_a_finite_gradient_and_every_other_scale_its_own():
    tiny = torch.finfo(torch.float32).tiny
    assert _nonzero(torch.tensor([0.0, -tiny, tiny, -0.5])).tolist() == [tiny, -tiny, tiny, -0.5]


def test_fusion_init_and_penalty():
    """Q, K ~ N(0, 0.02²), b_Q = 0, V = I + N(0, value_noise²) entry by entry; the penalty is
    ‖V − I‖² in V's own dtype and on V's device."""
    torch.manual_seed(0)
    site = find_sites(tiny_model("bert"), ("ffn_down",), peftlab.ROLE_MAPS["bert"])[0]
    f = Fusion(peftlab.FusionConfig(value_noise=0.1), site)
    assert 0.015 < f.query.weight.std() < 0.025 and 0.015 < f.key.weight.std() < 0.025
    assert f.key.bias is None and f.value.bias is None and torch.equal(f.query.bias, torch.zeros(32))
    noise = f.value.weight - torch.eye(32)
    assert 0.08 < noise.std() < 0.12 and noise.abs().max() < 1.0
    assert not torch.allclose(noise[0], noise[1]) and not torch.allclose(noise[:, 0], noise[:, 1])
    assert torch.allclose(f.penalty(), noise.pow(2).sum())
    assert f.to(torch.bfloat16).penalty().dtype == torch.bfloat16
    assert f.to("meta").penalty().device.type == "meta"


@pytest.mark.parametrize("field, good, bad, message", [
    ("temperature", [1e-3, 1e3], [9e-4, 1000.5], "temperature must be between 0.001 and 1000"),
    ("value_identity_penalty", [0.0], [-0.1], "value_identity_penalty must be >= 0"),
    ("value_noise", [0.0, 1.0], [-0.1, 1.01], "value_noise must be between 0 and 1"),
])
def test_fusion_config_bounds_are_inclusive(field, good, bad, message):
    for value in good:
        assert getattr(peftlab.FusionConfig(**{field: value}), field) == value
    for value in bad:
        with pytest.raises(peftlab.ConfigError, match=f"{message}, got {value}"):
            peftlab.FusionConfig(**{field: value})


# ---- errors -----------------------------------------------------------------------------------
def test_fusion_errors_are_clear(bert, tmp_path):
    adapters = _with_members(bert, q=peftlab.LoRAConfig(targets=("query",)), a=PFEIFFER, b=LORA_FFN)
    with pytest.raises(peftlab.TargetError, match="no common module, so there is nothing to fuse; place"):
        adapters.add_fusion("f", ["q", "a"])
    with pytest.raises(peftlab.AdapterNameError, match="no adapter named"):
        adapters.add_fusion("f", ["a", "missing"])
    with pytest.raises(peftlab.AdapterNameError, match="named twice"):
        adapters.add_fusion("f", ["a", "a"])
    with pytest.raises(peftlab.ConfigError, match="list of adapter names"):
        adapters.add_fusion("f", "a")
    with pytest.raises(peftlab.ConfigError, match="add_fusion"):
        adapters.add("f", peftlab.FusionConfig())
    with pytest.raises(peftlab.ConfigError, match="temperature"):
        peftlab.FusionConfig(temperature=0.0)
    adapters.add_fusion("f", ["a", "b"])
    with pytest.raises(peftlab.AdapterStateError, match="has not run yet"):
        adapters.fusion_weights("f")
    with pytest.raises(peftlab.AdapterNameError, match="not a fusion"):
        adapters.fusion_weights("a")
    with pytest.raises(peftlab.ConfigError, match="plain adapters"):
        adapters.add_fusion("g", ["f", "a"])
    with pytest.raises(peftlab.AdapterStateError, match="member of fusion"):
        adapters.remove("b")
    adapters.activate("b")
    with pytest.raises(peftlab.AdapterStateError, match="member of fusion"):
        adapters.merge("b")
    adapters.activate("f")
    with pytest.raises(peftlab.AdapterStateError, match="cannot be merged"):
        adapters.merge("f")
    adapters.remove("f")
    adapters.remove("b")  # free once its fusion is gone


def test_fusion_refusals_say_what_is_wrong(bert):
    adapters = _with_members(bert, a=PFEIFFER, b=LORA_FFN)
    with pytest.raises(peftlab.AdapterNameError, match="^an adapter named 'a' exists; remove it or pick an"):
        adapters.add_fusion("a", ["b"])
    with pytest.raises(peftlab.ConfigError, match="^add_fusion needs a FusionConfig, got LoRAConfig$"):
        adapters.add_fusion("f", ["a", "b"], LORA_FFN)
    adapters.activate("b")
    adapters.merge("b")
    with pytest.raises(peftlab.AdapterStateError, match="^adapter 'b' is merged; unmerge it before fusing"):
        adapters.add_fusion("f", ["a", "b"])


def test_routing_errors_are_clear(bert):
    adapters = _with_members(bert, a=LORA_FFN)
    with pytest.raises(peftlab.AdapterNameError, match="no adapter named"), adapters.route(["a", "nope"]):
        pass
    with pytest.raises(peftlab.AdapterStateError, match="one adapter name"), adapters.route("a"):
        pass
    too_few = tiny_inputs("bert", batch=2)
    with pytest.raises(peftlab.AdapterStateError, match="set for 3 examples, but a layer got a batch of 2"), \
            adapters.route(["a", None, "a"]):
        output_of(bert, too_few)
    adapters.activate("a")
    adapters.merge("a")
    with pytest.raises(peftlab.AdapterStateError, match="merged"), adapters.route(["a", None]):
        pass


def test_a_head_for_labels_must_be_named(bert):
    model = MultiTaskModel(bert, {"a": 2})
    _with_members(model, a=PFEIFFER)
    with pytest.raises(peftlab.AdapterNameError, match="head="):
        model(**tiny_inputs("bert"), labels=torch.tensor([0, 1]))
    with pytest.raises(peftlab.ConfigError, match="no head"):
        train_fusion(model, {"a": [], "b": []}, target="a")
    assert train_adapter(model, "a", []) == []
