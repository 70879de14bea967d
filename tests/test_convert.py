"""convert / save / load / activation accounting on tiny Llama, Qwen2, Mistral and the embedded SmolLM2."""

import pytest
import torch
from tiny_models import tiny_model, word_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

import dsmoe
from dsmoe.hf_remote.partitioned_swiglu import swiglu_parts
from dsmoe.models import load_model


@pytest.fixture
def ids():
    torch.manual_seed(0)
    return torch.randint(0, 256, (2, 11))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_convert_keeps_weights_and_all_on_equals_dense(arch, ids, monkeypatch):
    model = tiny_model(arch).eval()
    dense = model(ids).logits
    dsmoe.convert(model, dsmoe.DSMoEConfig(num_experts=4))
    layers = dsmoe.dsmoe_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert all(layer.router.weight.shape == (4, 64) for layer in layers)
    # every expert on with unit weight: the partitioned model is the dense model (eq. 6)
    monkeypatch.setattr(
        dsmoe.DSMoEMLP, "expert_weights", lambda self, g: (torch.ones_like(g), torch.ones_like(g, dtype=torch.bool))
    )
    for impl in ("sparse", "masked"):
        for layer in layers:
            layer.inference_impl = impl
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-5, atol=1e-5)


def test_smollm2_layer_partition_equals_hf_mlp():
    model, _ = load_model()
    mlp = model.model.layers[3].mlp
    x = torch.randn(6, model.config.hidden_size)
    dense = mlp(x)
    layer = dsmoe.DSMoEMLP(swiglu_parts(mlp), dsmoe.DSMoEConfig(num_experts=8))
    assert layer.expert_size == 1536 // 8
    torch.testing.assert_close(layer.masked_forward(x, torch.ones(6, 8)), dense, rtol=1e-5, atol=1e-5)


def test_convert_errors():
    with pytest.raises(ValueError, match="no SwiGLU FFN.*'gpt2'"):
        dsmoe.convert(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)), dsmoe.DSMoEConfig())
    with pytest.raises(ValueError, match="D=128 is not divisible by num_experts=3"):
        dsmoe.convert(tiny_model(), dsmoe.DSMoEConfig(num_experts=3))
    model = dsmoe.convert(tiny_model(), dsmoe.DSMoEConfig(num_experts=4))
    with pytest.raises(ValueError, match="already converted"):
        dsmoe.convert(model, dsmoe.DSMoEConfig(num_experts=4))


def test_router_init_is_random_normal():
    model = dsmoe.convert(tiny_model(), dsmoe.DSMoEConfig(num_experts=4, router_init_std=0.5))
    w = torch.cat([layer.router.weight.flatten() for layer in dsmoe.dsmoe_layers(model)])
    assert abs(w.std().item() - 0.5) < 0.05 and abs(w.mean().item()) < 0.05


@pytest.mark.parametrize("variant", ["dsmoe", "no_gate"])
def test_save_load_round_trip(tmp_path, ids, variant):
    model = dsmoe.convert(tiny_model("qwen2"), dsmoe.DSMoEConfig(num_experts=4, tau=0.45, variant=variant)).eval()
    logits = model(ids).logits
    dsmoe.save(model, tmp_path / "m")
    loaded = dsmoe.load(tmp_path / "m")
    assert dsmoe.dsmoe_config_of(loaded) == dsmoe.DSMoEConfig(num_experts=4, tau=0.45, variant=variant)
    for a, b in zip(dsmoe.dsmoe_layers(model), dsmoe.dsmoe_layers(loaded), strict=True):
        assert torch.equal(a.router.weight, b.router.weight) and b.tau == 0.45 and b.variant == variant
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)


def test_save_replaces_only_model_files_and_a_failed_save_leaves_the_last_one(tmp_path, ids, monkeypatch):
    model = dsmoe.convert(tiny_model("llama"), dsmoe.DSMoEConfig(num_experts=4)).eval()
    out = tmp_path / "m"
    out.mkdir()
    (tmp_path / ".m.saving.k90slwiy").mkdir()  # what a save killed by SIGKILL leaves: removed by the next one
    (tmp_path / ".m.saving.k90slwiy" / "model.safetensors").write_text("weights")
    (tmp_path / ".mine.saving.keep").mkdir()  # another directory's
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    (out / "model.safetensors.index.json").write_text("{}")
    dsmoe.save(model, out)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert not (out / "model.safetensors.index.json").exists()
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        dsmoe.save(model, out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.saving.keep", "m"]  # no temporary directory left
    torch.testing.assert_close(dsmoe.load(out)(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_load_rejects_dense_dir(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'dsmoe' entry"):
        dsmoe.load(tmp_path)


def test_activated_params_table1_accounting(ids):
    model = dsmoe.convert(tiny_model(), dsmoe.DSMoEConfig(num_experts=4)).eval()
    total = sum(p.numel() for p in model.parameters())
    model(ids)
    stats = dsmoe.activation_stats(model)
    ffn = 3 * 64 * 128  # gate, up, down of one layer
    expected = total - sum(ffn * (1 - a / 4) for a in stats.mean_active_per_layer)
    assert stats.total_params == total
    assert stats.activated_params == pytest.approx(expected)
    assert stats.tokens == ids.numel()
    # mean active experts per layer = mean over tokens of #(g > τ)
    x_counts = [(layer.last_active.sum(1).double().mean().item()) for layer in dsmoe.dsmoe_layers(model)]
    assert stats.mean_active_per_layer == pytest.approx(x_counts)
    dsmoe.set_tau(model, 0.9)
    dsmoe.reset_activation_stats(model)
    model(ids)
    assert dsmoe.activation_stats(model).activated_params < stats.activated_params
    assert model.config.dsmoe["tau"] == 0.9
    with pytest.raises(ValueError, match="LlamaForCausalLM has no DSMoE layer to set τ in: convert it first"):
        dsmoe.set_tau(tiny_model(), 0.5)  # a dense model: nothing silently left at its old τ


def test_a_model_that_is_a_mixture_of_experts_already_is_refused():
    """Qwen2-MoE's shared expert is a SwiGLU FFN: without the check only it was converted, the routed experts left
    as they were, and the failure came only at save time."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"'qwen2_moe' model is a mixture of experts already \(config.num_experts=4\)"):
        dsmoe.convert(model, dsmoe.DSMoEConfig(num_experts=4))


def test_activation_stats_accumulate_every_layer_and_last_uses_the_last_forward():
    model = dsmoe.convert(tiny_model(num_hidden_layers=3), dsmoe.DSMoEConfig(num_experts=4)).eval()
    counts = {i: [] for i in range(3)}
    for i, layer in enumerate(dsmoe.dsmoe_layers(model)):
        layer.register_forward_hook(lambda m, args, out, i=i: counts[i].append(m.last_active.sum(1).double()))
    torch.manual_seed(1)
    a, b = torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        model(a)
        model(b)
    accumulated = dsmoe.activation_stats(model).mean_active_per_layer
    last = dsmoe.activation_stats(model, last=True).mean_active_per_layer
    for i in range(3):
        assert accumulated[i] == pytest.approx(torch.cat(counts[i]).mean().item())
        assert last[i] == pytest.approx(counts[i][1].mean().item())
    assert accumulated != last


@pytest.mark.parametrize("method", ["dsmoe", "llm_pruner_block"])
def test_transformed_model_loads_in_bf16_with_ropes_buffer_fp32_as_a_dense_one(tmp_path, method):
    """GPU evaluation loads in bf16 (dsmoe.experiment.load_for_eval): the parameters in bf16, RoPE's inv_freq in
    fp32 as from_pretrained keeps it for the dense model (rounded to bf16 the rotary angles drift with position)."""
    from tiny_models import calib, word_tokenizer

    from dsmoe.baselines import llm_pruner as lp

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "dense")
    word_tokenizer(["a", "b"]).save_pretrained(tmp_path / "dense")
    if method == "dsmoe":
        dsmoe.save(dsmoe.convert(model, dsmoe.DSMoEConfig(num_experts=4)), tmp_path / "m", word_tokenizer(["a", "b"]))
    else:
        lp.save_llm_pruner(lp.prune_block(model, [96, 64], [1, 2], calib()), tmp_path / "m", word_tokenizer(["a", "b"]))
    dense, _ = load_model(str(tmp_path / "dense"), dtype=torch.bfloat16)
    loaded, _ = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    buffers = {name: b.dtype for name, b in loaded.named_buffers()}
    assert buffers == {name: b.dtype for name, b in dense.named_buffers()}
    assert buffers["model.rotary_emb.inv_freq"] == torch.float32


def test_tied_embeddings_stay_tied_through_save_and_a_bf16_load(tmp_path):
    from tiny_models import word_tokenizer

    model = tiny_model("llama", tie_word_embeddings=True)
    dsmoe.save(dsmoe.convert(model, dsmoe.DSMoEConfig(num_experts=4)), tmp_path / "m", word_tokenizer(["a", "b"]))
    loaded, _ = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)  # parameters cast one by one
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and loaded.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.lm_head.weight.float(), model.lm_head.weight.bfloat16().float())


def test_the_readmes_method_example_runs(tmp_path, monkeypatch):
    """README "Use the method in your own code", as written (a tiny Llama stands in for the hub model), and the
    calls its text names (dsmoe.set_rescale)."""
    import re
    from pathlib import Path

    import transformers

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use the method in your own code", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(name, *args, **kwargs):
        model = tiny_model("llama").eval()  # as from_pretrained returns it
        return model if str(name).startswith("meta-llama/") else real(name, *args, **kwargs)

    def tokenizer(name, *args, **kwargs):  # words within the tiny Llama's vocabulary
        return word_tokenizer(["Hello", "world"]) if str(name).startswith("meta-llama/") else real_tok(name, **kwargs)

    real_tok = transformers.AutoTokenizer.from_pretrained
    trained_in = []
    real_loss = dsmoe.sparsity_loss
    monkeypatch.setattr(dsmoe, "sparsity_loss", lambda m: trained_in.append(m.training) or real_loss(m))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["model"].model.layers[0].mlp.tau == pytest.approx(0.6)
    assert trained_in == [True]  # the loss of a training step, in train mode (S(x)), not eval mode's G(x)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").tokenize("Hello world") == ["Hello", "world"]
    assert re.search(r"`dsmoe\.set_rescale\(model, False\)`", section)
    dsmoe.set_rescale(scope["model"], False)
