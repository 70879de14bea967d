"""Loading a model: every failure names the model, the file and what is wrong (issue: faults and bad input)."""

import pytest
from tiny_models import tiny_model

import dsmoe
from dsmoe.models import load_model


@pytest.fixture
def saved(tmp_path):
    model = dsmoe.convert(tiny_model("llama"), dsmoe.DSMoEConfig(num_experts=4))
    dsmoe.save(model, tmp_path / "m")
    tok_dir = tmp_path / "m"
    return tok_dir


def test_missing_or_non_model_paths_are_named(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, not from the env
    with pytest.raises(FileNotFoundError, match=r"model '/nonexistent/dir': no such directory, and not a hub id"):
        load_model("/nonexistent/dir")
    with pytest.raises(FileNotFoundError, match=r"the directory holds no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(
        ValueError, match=r"model 'nobody/no-such-model' could not be loaded from the hub: .*hf download"
    ):
        load_model("nobody/no-such-model")


def test_training_refuses_a_missing_model_before_it_starts_and_takes_every_embedded_alias(tmp_path, assets):
    from test_train import make_cfg

    from dsmoe.models import EMBEDDED_ALIASES, check_model_location
    from dsmoe.train import train

    for model, message in [("/nonexistent/dir", "no such directory, and not a hub id"), (str(tmp_path), "no config")]:
        with pytest.raises(FileNotFoundError, match=f"model '{model}': .*{message}"):
            train(make_cfg(assets, tmp_path, model=model))
        assert not (tmp_path / "run").exists()
    for alias in EMBEDDED_ALIASES:  # the training check refused 'smollm2-135m', which load_model takes
        check_model_location(alias)
    check_model_location("meta-llama/Llama-3.2-1B")  # a hub id: looked up when loaded
    for path in ("./missing-model", "~/missing-model", "data/models/missing", "missing-model"):  # none a hub id
        with pytest.raises(FileNotFoundError, match="no such directory, and not a hub id"):
            check_model_location(path)


def test_damaged_config_and_weights_name_the_file(saved):
    config = saved / "config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"m/config.json is not valid JSON .* the model directory is damaged"):
        load_model(str(saved))
    config.write_text(text)
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"damaged weight file\(s\) in .*: model.safetensors \("):
        load_model(str(saved))
