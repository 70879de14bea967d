"""LLM-Pruner baseline: Taylor importance vs autograd, lossless pruning of dead structures, pruned sizes against
closed-form parameter counts, training through the Method interface, save/load, and the pruner run on the paper's
LLaMA-1B / 7B shapes (meta device) against Table 1."""

import copy
import math
from dataclasses import replace

import pytest
import torch
from llama_shapes import LLAMA_1B, LLAMA_7B, TINY_LLAMA
from tiny_models import calib, tiny_model
from transformers import AutoModelForCausalLM

from dsmoe.baselines import llm_pruner as lp
from dsmoe.stats import count_params

ARCHS = [("llama", False), ("qwen2", True)]  # qwen2: q/k/v biases; tied embeddings; both GQA (4 heads, 2 KV)


def tiny_shape(arch: str, tied: bool, layers: int = 2):
    return replace(TINY_LLAMA, layers=layers, tied=tied, qkv_bias=arch == "qwen2")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_saliences(model, batches) -> dict[str, torch.Tensor]:
    """|w · ∂L/∂w| by torch.autograd.grad on a copy, L the LM loss averaged over the batches."""
    model = copy.deepcopy(model).eval()
    named = dict(model.named_parameters())
    loss = sum(model(input_ids=b, labels=b).loss for b in batches) / len(batches)
    grads = torch.autograd.grad(loss, list(named.values()))
    return {k: (p.detach() * g).abs() for (k, p), g in zip(named.items(), grads, strict=True)}


@pytest.mark.parametrize("arch,tied", ARCHS)
def test_importance_equals_autograd_taylor(arch, tied):
    model = tiny_model(arch, tie_word_embeddings=tied)
    with torch.no_grad():  # HF initialises biases to zero: give them a salience to count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    batches = calib()
    s = reference_saliences(model, batches)
    hidden = s["model.embed_tokens.weight"].sum(0) + s["model.norm.weight"]
    if not tied:
        hidden = hidden + s["lm_head.weight"].sum(0)
    assert ("lm_head.weight" in s) != tied
    with lp.taylor_gradients(model, batches):
        got_hidden = lp.hidden_importance(model)
        got = [(lp.ffn_importance(layer), lp.kv_group_importance(layer)) for layer in model.model.layers]
    for i, (ffn, kv) in enumerate(got):
        p = f"model.layers.{i}."
        hidden = hidden + s[p + "input_layernorm.weight"] + s[p + "post_attention_layernorm.weight"]
        hidden = hidden + sum(s[p + n].sum(0) for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"))
        hidden = hidden + sum(s[p + n].sum(0) for n in ("self_attn.v_proj.weight", "mlp.gate_proj.weight"))
        hidden = hidden + s[p + "mlp.up_proj.weight"].sum(0)
        hidden = hidden + s[p + "self_attn.o_proj.weight"].sum(1) + s[p + "mlp.down_proj.weight"].sum(1)
        expected_ffn = (
            s[p + "mlp.gate_proj.weight"].sum(1)
            + s[p + "mlp.up_proj.weight"].sum(1)
            + s[p + "mlp.down_proj.weight"].sum(0)
        )
        torch.testing.assert_close(ffn, expected_ffn, rtol=1e-5, atol=1e-9)
        # KV group g: k/v head g, query heads h with h // (heads / kv_heads) == g (HF repeat_kv), their o columns
        hd, heads, groups = 16, 4, 2
        expected_kv = torch.zeros(groups)
        for h in range(heads):
            g, rows = h // (heads // groups), slice(h * hd, (h + 1) * hd)
            expected_kv[g] += (
                s[p + "self_attn.q_proj.weight"][rows].sum() + s[p + "self_attn.o_proj.weight"][:, rows].sum()
            )
            expected_kv[g] += s[p + "self_attn.q_proj.bias"][rows].sum() if arch == "qwen2" else 0
        for g in range(groups):
            rows = slice(g * hd, (g + 1) * hd)
            for n in ("k_proj", "v_proj"):
                expected_kv[g] += s[p + f"self_attn.{n}.weight"][rows].sum()
                expected_kv[g] += s[p + f"self_attn.{n}.bias"][rows].sum() if arch == "qwen2" else 0
        torch.testing.assert_close(kv, expected_kv, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got_hidden, hidden, rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # gradients cleared afterwards


@pytest.mark.parametrize("arch,tied", ARCHS)
def test_gradients_summed_in_host_memory_give_the_same_importance(arch, tied):
    """on_host (the default on a GPU) keeps no gradient in p.grad after each backward, and its sums over several
    batches give bit-for-bit the importances of gradients accumulated in p.grad."""
    model = tiny_model(arch, tie_word_embeddings=tied)
    model.model.norm.weight.requires_grad_(False)  # a frozen parameter gets its gradient too, and stays frozen
    batches = calib(n=3)

    def importances(on_host: bool):
        with lp.taylor_gradients(model, batches, on_host=on_host):
            assert all((p.grad is None) == on_host for p in model.parameters())
            return [lp.hidden_importance(model)] + [
                imp for layer in model.model.layers for imp in (lp.ffn_importance(layer), lp.kv_group_importance(layer))
            ]

    in_grad, on_host = importances(False), importances(True)
    for a, b in zip(in_grad, on_host, strict=True):
        assert torch.equal(a, b)
    assert all(p.grad is None and not hasattr(p, lp.HOST_GRAD) for p in model.parameters())  # nothing left
    assert not model.model.norm.weight.requires_grad
    with pytest.raises(RuntimeError, match="inside taylor_gradients"):
        lp.hidden_importance(model)


@pytest.mark.parametrize("arch,tied", ARCHS)
def test_block_pruning_of_dead_channels_and_heads_is_lossless(arch, tied):
    model = tiny_model(arch, num_hidden_layers=3, tie_word_embeddings=tied).eval()
    dead = {0: torch.tensor([3, 7, 50, 127]), 1: torch.randperm(128, generator=torch.Generator().manual_seed(0))[:40]}
    with torch.no_grad():
        for i, channels in dead.items():
            model.model.layers[i].mlp.down_proj.weight[:, channels] = 0  # these FFN channels never reach the output
        model.model.layers[1].self_attn.o_proj.weight[:, 32:64] = 0  # query heads 2, 3 = KV group 1: dead
    ids = calib(1, seed=5)[0]
    before = model(ids).logits
    down_before = model.model.layers[1].mlp.down_proj.weight.clone()
    lp.prune_block(model, [124, 88, 128], [2, 1, 2], calib())
    layers = model.model.layers
    assert [m.mlp.down_proj.in_features for m in layers] == [124, 88, 128]
    assert [m.self_attn.k_proj.out_features for m in layers] == [32, 16, 32]
    assert [m.self_attn.q_proj.out_features for m in layers] == [64, 32, 64]
    assert layers[1].self_attn.o_proj.weight.shape == (64, 32)
    alive = torch.tensor(sorted(set(range(128)) - set(dead[1].tolist())))
    torch.testing.assert_close(layers[1].mlp.down_proj.weight, down_before[:, alive], rtol=0, atol=0)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert model.config.llm_pruner["intermediate_sizes"] == [124, 88, 128]
    assert model.config.llm_pruner["num_key_value_heads"] == [2, 1, 2]


@pytest.mark.parametrize("arch,tied", ARCHS)
def test_channel_pruning_of_dead_dims_is_lossless_up_to_rmsnorm_scale(arch, tied):
    """Hidden dims that are zero everywhere carry nothing, but RMSNorm over d' < d channels divides by
    sqrt(Σx²/d') instead of sqrt(Σx²/d): every norm output grows by sqrt(d/d'). Undoing that factor
    (eps = 0) must give back the dense logits exactly."""
    model = tiny_model(arch, tie_word_embeddings=tied, rms_norm_eps=0.0).eval()
    dead = torch.tensor([0, 5, 9, 10, 33, 40, 41, 63, 20, 21, 22, 2])
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    ids = calib(1, seed=5)[0]
    before = model(ids).logits
    lp.prune_channel(model, 64 - len(dead), calib())
    assert model.config.hidden_size == 52 and model.model.embed_tokens.weight.shape == (256, 52)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 52)  # heads and head_dim unchanged
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (32, 52)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert not torch.allclose(model(ids).logits, before, atol=1e-3)  # the RMSNorm rescaling is real
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight *= math.sqrt(64 / 52)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,tied", ARCHS)
@pytest.mark.parametrize("mode,fraction", [("channel", 0.63), ("block", 0.8), ("block", 0.7)])
def test_prune_to_target_lands_on_the_nearest_closed_form_count(arch, tied, mode, fraction):
    """The pruned model's parameters equal the closed-form count of its shapes, and no other d' (channel) or common
    FFN width of the pruned layers (block) would come nearer the target."""
    shape = tiny_shape(arch, tied, layers=4)
    model = tiny_model(arch, num_hidden_layers=4, tie_word_embeddings=tied)
    target = fraction * shape.params()
    lp.prune_to_target(model, target, mode, calib(), keep_first=1, keep_last=1)
    achieved = count_params(model)
    if mode == "channel":  # one hidden channel of this tiny model is ~1.6% of its params
        nearest = min(range(1, 65), key=lambda d: abs(shape.params(hidden=d) - target))
        assert model.config.hidden_size == nearest and achieved == shape.params(hidden=nearest)
        assert lp.intermediate_sizes(model) == [128] * 4 and lp.kv_heads(model) == [2] * 4
    else:
        sizes, heads = lp.intermediate_sizes(model), lp.kv_heads(model)
        assert sizes[0] == sizes[3] == 128 and heads[0] == heads[3] == 2  # first/last layers kept whole
        assert sizes[1] == sizes[2] < 128 and heads[1] == heads[2] == 1  # r > 1/2 drops one of two KV groups
        assert achieved == shape.params(intermediate=sizes, kv_heads=heads)

        def miss(f: int) -> float:
            return abs(shape.params(intermediate=[128, f, f, 128], kv_heads=heads) - target)

        assert miss(sizes[1]) <= min(miss(sizes[1] - 1), miss(sizes[1] + 1))
    assert abs(achieved / target - 1) <= 0.01
    ids = calib(1)[0]
    assert torch.isfinite(model(ids, labels=ids).loss)
    assert model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("method", [lp.LLM_PRUNER_CHANNEL, lp.LLM_PRUNER_BLOCK])
def test_method_trains_and_round_trips(method, tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    shape = tiny_shape("llama", tied=False, layers=4)
    dense = shape.params()
    options = {"target_fraction": 0.75, "num_calib_batches": 1}
    if method is lp.LLM_PRUNER_BLOCK:
        options |= {"keep_first": 1, "keep_last": 1}
    assert method.needs_calibration and method.aux_losses(model) == {} and method.after_optimizer_step is None
    model = method.apply(model, options, iter(calib(3)))
    pruned = shape.params(model.config.hidden_size, lp.intermediate_sizes(model), lp.kv_heads(model))
    assert method.activated_params(model) == pruned and abs(pruned / (0.75 * dense) - 1) <= 0.01
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = calib(1, seed=9)[0]
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    model.eval()
    method.save(model, tmp_path / "pruned", None)
    loaded = method.load(tmp_path / "pruned")
    assert loaded.config.llm_pruner == model.config.llm_pruner
    assert [tuple(p.shape) for p in loaded.parameters()] == [tuple(p.shape) for p in model.parameters()]
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_tied_channel_model_round_trips(tmp_path):
    model = tiny_model("qwen2", tie_word_embeddings=True)
    model = lp.prune_to_target(model, 0.6 * count_params(model), "channel", calib())
    hidden = model.config.hidden_size  # the tied embedding / lm_head matrix is counted once
    assert lp.LLM_PRUNER_CHANNEL.activated_params(model) == tiny_shape("qwen2", tied=True).params(hidden)
    lp.save_llm_pruner(model, tmp_path / "m")
    loaded = lp.load_llm_pruner(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = calib(1)[0]
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_block_model_needs_load_llm_pruner(tmp_path):
    model = lp.prune_block(tiny_model("llama"), [100, 128], [1, 2], calib())
    lp.save_llm_pruner(model, tmp_path / "m")
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # never silently the dense shapes
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert lp.intermediate_sizes(lp.load_llm_pruner(tmp_path / "m")) == [100, 128]


def test_paper_table1_llama_1b_shapes():
    """LLaMA-1B = Llama-3.2-1B (d=2048, D=8192, 16 layers, 32 heads / 8 KV, tied vocab 128256) at DSMoE's 735M;
    block pruning run (on the meta device) at the ratio giving Table 1's average D = 3896.4."""
    model = LLAMA_1B.meta_model()
    assert count_params(model) == LLAMA_1B.params() == 1_235_814_400  # Table 1: 1.24B
    kv = [8] * 4 + [2] * 10 + [8] * 2
    block = lp.plan(model, "block", target_params=735e6)  # layers 4..13 pruned (keep_first=4, keep_last=2)
    assert block["intermediate_sizes"] == [8192] * 4 + [1321] * 10 + [8192] * 2 and block["num_key_value_heads"] == kv
    assert block["params"] == LLAMA_1B.params(intermediate=block["intermediate_sizes"], kv_heads=kv)
    assert abs(block["params"] / 735e6 - 1) < 1e-3
    # Table 1's D = 3896.4 (average) is LLM-Pruner's rule at the ratio keeping 1319 of 8192 channels: 735M
    at_ratio = lp.plan(model, "block", pruning_ratio=1 - 1319.5 / 8192)
    ffn = [8192] * 4 + [1319] * 10 + [8192] * 2
    assert at_ratio["intermediate_sizes"] == ffn and at_ratio["num_key_value_heads"] == kv
    assert round(sum(ffn) / 16, 1) == 3896.4
    lp.prune_with_plan(model, at_ratio, calib(1))
    pruned = count_params(model)
    assert pruned == LLAMA_1B.params(intermediate=ffn, kv_heads=kv) and round(pruned / 1e6) == 735
    # channel mode matched to 735M: d' = 1218, the nearest of the closed form (Table 1 lists d' = 1215, see below)
    nearest = min(range(1, 2049), key=lambda d: abs(LLAMA_1B.params(hidden=d) - 735e6))
    assert lp.plan(LLAMA_1B.meta_model(), "channel", target_params=735e6)["hidden_size"] == nearest == 1218


@pytest.mark.parametrize("untie,params", [(False, 733_161_375), (True, 888_992_415)])
def test_channel_pruning_llama_1b_to_table1_width(untie, params):
    """Table 1's LLM-Pruner-channel row: d' = 1215, 889M. A hidden channel of Llama-3.2-1B holds V + 1 + 16·(2 +
    q 2048 + k 512 + v 512 + o 2048 + 3·8192) = 603,425 params with lm_head tied to the embedding, 128,256 more
    untied. By default the suite keeps the lm_head tied: 1215 × 603,425 = 733.2M. With untie_lm_head (the original
    pruner's behaviour, used at the paper scales): 1215 × (603,425 + 128,256) = 889.0M, Table 1's count."""
    model = LLAMA_1B.meta_model()
    if untie:
        lp.untie_lm_head(model)
    lp.prune_channel(model, 1215, calib(1))  # the pruner itself, on the meta device: real shapes, no memory
    per_channel = 128256 * (2 if untie else 1) + 1 + 16 * (2 + 2048 + 512 + 512 + 2048 + 3 * 8192)
    assert count_params(model) == 1215 * per_channel == replace(LLAMA_1B, tied=not untie).params(1215) == params
    assert (model.lm_head.weight is model.model.embed_tokens.weight) != untie
    assert model.lm_head.weight.shape == (128256, 1215) and model.config.llm_pruner["hidden_size"] == 1215


def test_paper_table1_llama_7b_shapes():
    """LLaMA-7B (d=4096, D=11008, 32 layers, 32 heads, untied vocab 32000), both pruners run on the meta device:
    block D = 6256.5 (average), 3.94B; channel d = 2401, 3.95B. LLM-Pruner's own script prunes layers 4..29,
    as keep_first=4, keep_last=2 does."""
    model = LLAMA_7B.meta_model()
    assert count_params(model) == LLAMA_7B.params() == 6_738_415_616  # Table 1: 6.74B
    block = lp.plan(model, "block", pruning_ratio=1 - 5160.5 / 11008)
    ffn, kv = [11008] * 4 + [5160] * 26 + [11008] * 2, [32] * 4 + [15] * 26 + [32] * 2
    assert block["pruned_layers"] == [4, 30] and sum(ffn) / 32 == 6256.5
    assert block["intermediate_sizes"] == ffn and block["num_key_value_heads"] == kv
    lp.prune_with_plan(model, block, calib(1))
    pruned = count_params(model)
    assert pruned == LLAMA_7B.params(intermediate=ffn, kv_heads=kv) and round(pruned / 1e7) == 394
    model = LLAMA_7B.meta_model()
    lp.prune_channel(model, 2401, calib(1))
    per_channel = 2 * 32000 + 1 + 32 * (2 + 4 * 4096 + 3 * 11008)  # untied embedding and lm_head
    assert count_params(model) == 2401 * per_channel and round(count_params(model) / 1e7) == 395
    nearest = min(range(1, 4097), key=lambda d: abs(LLAMA_7B.params(hidden=d) - 3.95e9))
    assert lp.plan(LLAMA_7B.meta_model(), "channel", target_params=3.95e9)["hidden_size"] == nearest == 2401


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("llama")
    apply = lp.LLM_PRUNER_BLOCK.apply
    with pytest.raises(ValueError, match="unknown option.*'ratio'"):
        apply(model, {"target_fraction": 0.5, "ratio": 0.2}, calib())
    with pytest.raises(ValueError, match="exactly one of target_fraction"):
        apply(model, {"keep_first": 0}, calib())
    with pytest.raises(ValueError, match="exactly one of target_fraction"):
        apply(model, {"target_fraction": 0.5, "pruning_ratio": 0.2}, calib())
    with pytest.raises(ValueError, match="pruning_ratio must be in"):
        apply(model, {"pruning_ratio": 1.0, "keep_first": 0, "keep_last": 0}, calib())
    with pytest.raises(ValueError, match="needs calibration batches"):
        apply(model, {"target_fraction": 0.9}, None)
    with pytest.raises(ValueError, match="keep_first=4 and keep_last=2 leave no layer of 2"):
        apply(model, {"target_fraction": 0.9}, calib())
    with pytest.raises(ValueError, match="target_fraction must be in"):
        lp.LLM_PRUNER_CHANNEL.apply(model, {"target_fraction": 1.5}, calib())
    with pytest.raises(ValueError, match="outside"):
        lp.prune_to_target(model, 10, "block", calib(), keep_first=0, keep_last=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        lp.plan(model, "layer", target_params=1e5)
    with pytest.raises(TypeError, match="input_ids"):
        lp.prune_channel(model, 32, [torch.randn(2, 5)])
    with pytest.raises(ValueError, match="at least one calibration batch"):
        lp.prune_channel(model, 32, [])
    with pytest.raises(ValueError, match="one size in"):
        lp.prune_block(model, [200, 128], [2, 2], calib())


@pytest.mark.parametrize("mode", lp.MODES)
def test_full_budget_prunes_nothing(mode):
    model = tiny_model("llama", num_hidden_layers=4)
    shapes = lp.plan(model, mode, target_params=count_params(model), keep_first=1, keep_last=1)
    assert shapes["params"] == count_params(model) and shapes["intermediate_sizes"] == [128] * 4


def test_native_pruning_ratio_option():
    block = lp.LLM_PRUNER_BLOCK.apply(
        tiny_model("llama", num_hidden_layers=4), {"pruning_ratio": 0.5, "keep_first": 1, "keep_last": 1}, calib()
    )
    assert lp.intermediate_sizes(block) == [128, 64, 64, 128] and lp.kv_heads(block) == [2, 1, 1, 2]
    assert block.config.llm_pruner["pruning_ratio"] == 0.5
    channel = lp.LLM_PRUNER_CHANNEL.apply(tiny_model("qwen2"), {"pruning_ratio": 0.3, "round_to": 8}, calib())
    assert channel.config.hidden_size == 64 - 16  # removes 64 - int(64·0.7) = 20, rounded down to 8s


@pytest.mark.slow
def test_embedded_smollm2_block_prune_and_round_trip(tmp_path):
    from dsmoe.models import load_model

    try:
        model, tokenizer = load_model()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids[:, :64]
    dense = count_params(model)
    model = lp.LLM_PRUNER_BLOCK.apply(model, {"target_fraction": 0.6}, [ids])
    assert abs(count_params(model) / (0.6 * dense) - 1) <= 0.01
    assert lp.intermediate_sizes(model)[:4] == [1536] * 4 and lp.intermediate_sizes(model)[-2:] == [1536] * 2
    lp.save_llm_pruner(model, tmp_path / "m", tokenizer)
    loaded = lp.load_llm_pruner(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_calibration_sample_takes_llm_pruners_own_setting():
    from dsmoe.baselines.llm_pruner import calibration_sample

    batches = [torch.arange(4 * 100).view(4, 100), 1000 + torch.arange(4 * 100).view(4, 100)]
    (sample,) = calibration_sample(batches, 6, 64)
    assert sample.shape == (6, 64) and torch.equal(sample[4], batches[1][0, :64])
    assert calibration_sample(batches, None, None) == batches
    with pytest.raises(ValueError, match="calibration_samples=9 but the calibration batches hold 8 sequences"):
        calibration_sample(batches, 9, 64)


def test_untie_lm_head_prunes_like_the_original_and_counts_both_matrices():
    """The original LLM-Pruner unties lm_head before channel pruning; its count then holds vocab × d' twice."""
    from dsmoe.baselines.llm_pruner import LLM_PRUNER_CHANNEL
    from dsmoe.stats import count_params

    ids = [torch.randint(0, 256, (2, 16)) for _ in range(2)]
    tied = tiny_model("llama", tie_word_embeddings=True)
    pruned = LLM_PRUNER_CHANNEL.apply(tied, {"pruning_ratio": 0.25, "untie_lm_head": True}, ids)
    d = pruned.config.llm_pruner["hidden_size"]
    assert pruned.lm_head.weight is not pruned.model.embed_tokens.weight and not pruned.config.tie_word_embeddings
    assert pruned.lm_head.weight.shape == pruned.model.embed_tokens.weight.shape == (256, d)
    same = LLM_PRUNER_CHANNEL.apply(tiny_model("llama", tie_word_embeddings=True), {"pruning_ratio": 0.25}, ids)
    assert same.config.llm_pruner["hidden_size"] == d
    assert count_params(pruned) == replace(TINY_LLAMA, tied=False).params(d)  # V·d' twice
    assert count_params(same) == replace(TINY_LLAMA, tied=True).params(d)


def test_untie_lm_head_keeps_the_width_matched_on_the_tied_count():
    """Table 1's channel row at 1B, d' = 1215 and 889M: the width whose count with the embedding counted once is
    DSMoE's 735M (733.2M), reported untied (889M). Matching the untied count instead would give d' = 1001. Planned,
    pruned and counted the same way: the plan's structure, the pruned model and Table 1's count agree."""
    options = {"target_params": 735e6, "untie_lm_head": True}
    params, setting = lp.LLM_PRUNER_CHANNEL.planned_structure(LLAMA_1B.meta_model(), options)
    assert setting == "d=1218" and params == replace(LLAMA_1B, tied=False).params(1218)
    assert round(params / 1e6) == 891  # the paper's d' = 1215 gives 889M
    target = 0.5 * count_params(tiny_model("llama", tie_word_embeddings=True))
    options = {"target_params": target, "untie_lm_head": True}
    tied = lp.LLM_PRUNER_CHANNEL.apply(
        tiny_model("llama", tie_word_embeddings=True), {"target_params": target}, calib()
    )
    untied = lp.LLM_PRUNER_CHANNEL.apply(tiny_model("llama", tie_word_embeddings=True), options, calib())
    d = tied.config.llm_pruner["hidden_size"]
    assert untied.config.llm_pruner["hidden_size"] == d and abs(count_params(tied) - target) / target < 0.05
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    planned, _ = lp.LLM_PRUNER_CHANNEL.planned_structure(tiny_model("llama", tie_word_embeddings=True), options)
    assert count_params(untied) == planned == replace(TINY_LLAMA, tied=False).params(d)
