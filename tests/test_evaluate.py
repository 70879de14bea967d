"""Our PPL (Table 1) against lm-eval's loglikelihood_rolling, on a DSMoE model with routing active."""

import math

import pytest
import torch
from tiny_models import tiny_model

import dsmoe
from dsmoe.evaluate import perplexity
from dsmoe.models import load_tokenizer

TEXT = (
    "The straight-through estimator lets gradients flow through a thresholded gate as if the threshold "
    "were the identity. In the forward pass the expert is switched off; in the backward pass its gate "
    "still learns whether switching it on would have reduced the loss."
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_ppl_matches_lm_eval_loglikelihood_rolling(tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = dsmoe.convert(tiny_model("llama", vocab_size=len(tokenizer)), dsmoe.DSMoEConfig(num_experts=4)).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=128)
    (loglik,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (TEXT,), 0)], disable_tqdm=True)
    tokens = lm.tok_encode(TEXT)
    lm_eval_ppl = math.exp(-loglik / len(tokens))
    window = torch.tensor([lm.prefix_token_id, *tokens])
    ours = perplexity(model, [window])
    assert ours.tokens == len(tokens)
    assert ours.ppl == pytest.approx(lm_eval_ppl, rel=0.01)


def test_ppl_is_exp_mean_nll_and_counts_activation(tokenizer):
    model = dsmoe.convert(tiny_model("llama", vocab_size=len(tokenizer)), dsmoe.DSMoEConfig(num_experts=4)).eval()
    ids = torch.tensor(tokenizer(TEXT + " " + TEXT).input_ids)
    assert ids.numel() >= 60
    windows = [ids[:20], ids[20:40], ids[40:60]]
    result = perplexity(model, windows, batch_size=2)
    stats = dsmoe.activation_stats(model)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert result.tokens == 57
    assert result.ppl == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    assert stats.tokens == 60 and 0 < stats.mean_active < 4


def test_a_copied_checkout_takes_its_commit_from_the_environment(monkeypatch):
    import subprocess

    from dsmoe.results import git_commit

    monkeypatch.delenv("DSMOE_GIT_COMMIT", raising=False)
    here = git_commit()
    monkeypatch.setenv("DSMOE_GIT_COMMIT", "375b260f0000")
    assert git_commit() == "375b260f0000" != here  # also inside another repository, whose HEAD git would give

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert git_commit() == "375b260f0000"
    monkeypatch.delenv("DSMOE_GIT_COMMIT")
    assert git_commit() == "unknown"


def test_provenance_names_commit_and_ignores_results_outputs(tmp_path):
    from dsmoe.results import PROVENANCE, provenance, read_csv, write_csv

    row = provenance(model="m", method="dsmoe", tokens=10, steps=1, tau=0.5, seed=0)
    assert list(row) == PROVENANCE and row["hardware"] and row["date"].endswith("Z")
    assert row["git_commit"] == "unknown" or len(row["git_commit"].split("+")[0]) == 12
    path = write_csv(tmp_path / "t.csv", [{"a": 1.5, **row}], ["a", *PROVENANCE])
    assert read_csv(path)[0]["a"] == "1.5" and (path.stat().st_mode & 0o777) == 0o644
    with pytest.raises(ValueError, match="not in the table's columns"):
        write_csv(tmp_path / "u.csv", [{"b": 1}], ["a"])
    assert not (tmp_path / "u.csv").exists()


def test_data_parallel_replicas_give_the_single_model_result(tokenizer):
    """Evaluation with a replica per device (here two CPU replicas in threads) equals one model: same PPL to the
    last bit, activation counts summed over the replicas."""
    from dsmoe.experiment import evaluate_model, replicas

    model = dsmoe.convert(tiny_model("llama", vocab_size=len(tokenizer)), dsmoe.DSMoEConfig(num_experts=4)).eval()
    ids = torch.tensor(tokenizer(TEXT + " " + TEXT + " " + TEXT).input_ids)
    windows = {"a": ids[:80].view(5, 16), "b": ids[80:128].view(3, 16)}
    one = evaluate_model(model, windows, batch_size=2)
    two = evaluate_model(replicas(model, [torch.device("cpu")] * 2), windows, batch_size=2)
    assert two["ppl"] == one["ppl"] and two["ppl_per_source"] == one["ppl_per_source"]
    assert two["active_per_layer"] == one["active_per_layer"] and two["activated_params"] == one["activated_params"]
    assert 0 < one["mean_active"] < 4


def test_each_replica_thread_makes_its_gpu_the_current_device(tokenizer, monkeypatch):
    """A thread starts on cuda:0: each replica's thread enters its own device (what allocates on "cuda" without an
    index or syncs the current device then uses the replica's GPU), and a GPU model maps to torch.cuda.device."""
    import threading

    import dsmoe.evaluate as evaluate

    entered = []
    real = evaluate.on_device_of

    def recording(model):
        entered.append((id(model), threading.get_ident()))
        return real(model)

    monkeypatch.setattr(evaluate, "on_device_of", recording)
    models = [tiny_model("llama", vocab_size=len(tokenizer)) for _ in range(2)]
    windows = torch.tensor(tokenizer(TEXT).input_ids)[:48].view(4, 12)
    perplexity(models, windows, batch_size=1)
    assert sorted(m for m, _ in entered) == sorted(id(m) for m in models)
    assert threading.get_ident() not in {t for _, t in entered}  # entered in the workers, not the caller

    fake = torch.nn.Linear(1, 1)
    monkeypatch.setattr(fake, "parameters", lambda: iter([type("P", (), {"device": torch.device("cuda", 3)})()]))
    context = real(fake)
    assert isinstance(context, torch.cuda.device) and context.idx == 3
    assert not isinstance(real(models[0]), torch.cuda.device)


@pytest.mark.parametrize("impl", ["sparse", "masked"])
def test_activation_statistics_count_real_tokens_not_padding(tokenizer, impl):
    """Documents of unequal length are padded to the batch's longest: the activation counts are those of each
    document alone (a hand count from the layers' gates), whatever the batch size."""
    from dsmoe.experiment import evaluate_model
    from dsmoe.losses import dsmoe_layers

    model = dsmoe.convert(tiny_model("llama", vocab_size=len(tokenizer)), dsmoe.DSMoEConfig(num_experts=4)).eval()
    for layer in dsmoe_layers(model):
        layer.inference_impl = impl
    ids = torch.tensor(tokenizer(TEXT + " " + TEXT).input_ids)
    docs = [ids[a:b] for a, b in ((0, 2), (2, 11), (11, 28), (28, 33), (33, 63), (63, 66))]
    expected = torch.zeros(len(dsmoe_layers(model)), 4)
    with torch.no_grad():
        for doc in docs:
            model(doc[None])
            expected += torch.stack([layer.last_active.sum(0) for layer in dsmoe_layers(model)])
    per_layer = (expected / 66).sum(1).tolist()
    for batch_size in (1, 4, 6):
        result = evaluate_model(model, {"docs": docs}, batch_size=batch_size)
        assert result["mean_active_per_layer"] == pytest.approx(per_layer, rel=1e-6), batch_size
        assert dsmoe.activation_stats(model).tokens == 66
    # two sources: the overall mean is over all 66 routed positions (a ratio of sums), each source weighted by its
    # positions (11 and 55), not by its predicted tokens (9 and 51: a document's first token predicts nothing)
    result = evaluate_model(model, {"a": docs[:2], "b": docs[2:]}, batch_size=4)
    assert result["mean_active_per_layer"] == pytest.approx(per_layer, rel=1e-6)


def test_documents_are_batched_longest_first(tokenizer):
    """Documents of unequal length go to the model longest first, so that similar lengths share a batch: the
    fewest padded positions (2·(30+28+3) here instead of 2·(30+29+28) in the given order), the same PPL as each
    document scored alone."""
    model = tiny_model("llama", vocab_size=len(tokenizer)).eval()
    ids = torch.tensor(tokenizer(TEXT + " " + TEXT).input_ids)
    docs = [ids[:n] for n in (2, 30, 3, 29, 4, 28)]
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(kw["input_ids"].shape), with_kwargs=True)
    result = perplexity(model, docs, batch_size=2)
    hook.remove()
    assert [tuple(s) for s in shapes] == [(2, 30), (2, 28), (2, 3)]
    with torch.no_grad():
        nll = sum(model(d[None], labels=d[None]).loss.item() * (d.numel() - 1) for d in docs)
    assert result.tokens == sum(d.numel() - 1 for d in docs)
    assert result.ppl == pytest.approx(math.exp(nll / result.tokens), rel=1e-5)


def test_overflowing_logits_are_an_error_not_a_nan_ppl():
    """Evaluated in float16 (DSMOE_EVAL_DTYPE on GPUs without bf16) a model may overflow: PPL must not come out NaN."""
    model = tiny_model("llama").half()
    with torch.no_grad():
        model.lm_head.weight.fill_(60000.0)  # each logit a sum of 60000·h: beyond float16's 65504
    windows = [torch.arange(1, 9)]
    with pytest.raises(ValueError, match=r"ppl: .* not finite .* torch.float16 \(float16 overflows .*bfloat16"):
        perplexity(model, windows)
    assert math.isfinite(perplexity(tiny_model("llama"), windows).ppl)


def test_the_command_line_scores_local_files_as_perplexity_does(tokenizer, tmp_path, capsys):
    """python -m dsmoe.ppl: PPL per file equal to perplexity() on the same sequences of the saved model, in both
    protocols; JSON printed; --tau re-thresholds; bad values and a dense model's --tau are named."""
    import json

    from dsmoe.data.tokens import document_eval_sequences, packed_eval_windows
    from dsmoe.ppl import main

    model = dsmoe.convert(tiny_model("llama", vocab_size=len(tokenizer)), dsmoe.DSMoEConfig(num_experts=4))
    dsmoe.save(model, tmp_path / "m", tokenizer=tokenizer)
    words = TEXT.split()
    docs = [" ".join(words[i : i + 9 + 3 * i]) for i in range(6)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in ["", *docs]))
    saved = dsmoe.load(tmp_path / "m").eval()
    for protocol, score in (("documents", document_eval_sequences), ("windows", packed_eval_windows)):
        argv = ["--model", str(tmp_path / "m"), "--data", str(tmp_path / "a.jsonl"), "--text-field", "body"]
        result = main([*argv, "--docs", "5", "--seq-len", "16", "--protocol", protocol, "--batch-size", "2"])
        expected = perplexity(saved, list(score(tokenizer, docs[:5], 16)), batch_size=2).ppl
        assert result["ppl_per_source"] == {str(tmp_path / "a.jsonl"): pytest.approx(expected, rel=1e-6)}
        assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(expected, rel=1e-6)
    at_05 = main([*argv, "--docs", "5", "--seq-len", "16"])
    at_09 = main([*argv, "--docs", "5", "--seq-len", "16", "--tau", "0.9"])
    assert at_09["activated_params"] < at_05["activated_params"] and at_09["ppl"] != at_05["ppl"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text())  # same name, another folder
    both = main([*argv[:3], str(tmp_path / "*" / "a.jsonl"), str(tmp_path / "a.jsonl"), *argv[4:], "--docs", "5"])
    assert sorted(both["tokens_per_source"]) == sorted([str(tmp_path / "a.jsonl"), str(tmp_path / "b" / "a.jsonl")])
    assert both["eval_tokens"] == 2 * both["tokens_per_source"][str(tmp_path / "a.jsonl")]
    with pytest.raises(ValueError, match=r"--data names \['.*a.jsonl'\] more than once"):
        main([*argv[:4], str(tmp_path / "a.jsonl"), *argv[4:]])
    with pytest.raises(FileNotFoundError, match=r"--data '.*nothing\*.jsonl' matches no file"):
        main([*argv[:3], str(tmp_path / "nothing*.jsonl")])
    with pytest.raises(ValueError, match="--docs must be a positive integer, got 0"):
        main([*argv, "--docs", "0"])
    with pytest.raises(ValueError, match=r"a.jsonl' has no text field 'text'; its columns are \['body'\]"):
        main(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "a.jsonl")])
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="--tau 0.5: model .* has no dynamic activation"):
        main(["--model", str(tmp_path / "dense"), *argv[2:], "--tau", "0.5"])
