"""Scale files against their schema (dsmoe.scales): the shipped scales load unchanged with eval's defaults filled in;
a misspelt key, a value of the wrong type or out of range, or a missing eval setting is an error naming it."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from dsmoe.experiment import SCALES, SCALES_DIR, parse_scale, results_dir, runs_root, scale_config
from dsmoe.scales import EvalConfig, load_scale


@pytest.mark.parametrize("scale", SCALES)
def test_shipped_scales_load_as_written_with_the_eval_defaults(scale):
    written = OmegaConf.to_container(OmegaConf.load(SCALES_DIR / f"{scale}.yaml"))
    loaded = OmegaConf.to_container(scale_config(scale))
    assert loaded["base"] == written["base"] and loaded["methods"] == written["methods"]
    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig) if f.default is not dataclasses.MISSING}
    assert loaded["eval"] == {**defaults, **written["eval"]}


def test_defaults_are_the_ones_the_drivers_used(write_scale):
    scale = load_scale(write_scale(["dsmoe"]) / "scales" / "tiny.yaml")  # its eval gives no protocol or seeds
    assert (scale.eval.protocol, scale.eval.seeds) == ("windows", 1)
    assert scale_config("tiny").eval.get("protocol") == "windows"


def edited(path: Path, edit) -> Path:
    scale = yaml.safe_load(path.read_text())
    edit(scale)
    path.write_text(yaml.safe_dump(scale))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s["eval"].update(sedes=3),
            r"unknown key\(s\) \['sedes'\] in scale 'tiny' eval; allowed: \[.*'seeds'",
        ),
        (  # a misspelled run would be left out of every table
            lambda s: s["methods"].update(llm_prunr_block=s["methods"]["dsmoe"]),
            r"unknown run\(s\) \['llm_prunr_block'\] in scale 'tiny' methods; allowed: \[.*'llm_pruner_block'",
        ),
        (
            lambda s: s.update(evals={}),
            r"unknown key\(s\) \['evals'\] in scale 'tiny'; allowed: \['base', 'eval', 'methods'\]",
        ),
        (
            lambda s: s["base"]["trainer"].update(max_stepz=3),
            r"unknown key\(s\) \['trainer.max_stepz'\] in scale 'tiny' base; allowed in trainer: \[.*'max_steps'",
        ),
        (
            lambda s: s["methods"]["dsmoe"].update(optim={"learning_rate": 1}),
            r"unknown key\(s\) \['optim.learning_rate'\] in scale 'tiny' methods.dsmoe; allowed in optim: \[.*'lr'",
        ),
        (
            lambda s: s["base"]["data"].update(seqlen=8),
            r"scale 'tiny' base.data: unknown data config key\(s\) \['seqlen'\]; allowed: \[.*'seq_len'",
        ),
        (  # a run's own data block is checked as the base's is
            lambda s: s["methods"]["dsmoe"].update(data={"seqlen": 8}),
            r"scale 'tiny' methods.dsmoe.data: unknown data config key\(s\) \['seqlen'\]",
        ),
        (lambda s: s["base"]["trainer"].update(max_steps="many"), r"scale 'tiny' base: .*'many'.*trainer.max_steps"),
        (lambda s: s["eval"].pop("batch_size"), r"scale 'tiny' eval has no \['batch_size'\]"),
        (lambda s: s.pop("methods"), r"scale 'tiny': methods must be a mapping, got None"),
        (lambda s: s["eval"].update(batch_size=0), r"scale 'tiny' eval.batch_size is 0; allowed: an integer >= 1"),
        (
            lambda s: s["eval"].update(max_gen_toks=-1),
            r"scale 'tiny' eval.max_gen_toks is -1; allowed: an integer >= 1",
        ),
        (lambda s: s["eval"].update(seeds=0), r"scale 'tiny' eval.seeds is 0; allowed: an integer >= 1"),
        (lambda s: s["eval"].update(val_windows=0), r"scale 'tiny' eval.val_windows is 0; allowed: null \(all\) or an"),
        (lambda s: s["eval"].update(benchmark_limit=0), r"scale 'tiny' eval.benchmark_limit is 0; allowed: null"),
        (
            lambda s: s["eval"].update(protocol="document"),
            r"scale 'tiny' eval.protocol is 'document'; choose one of \['windows', 'documents'\]",
        ),
    ],
)
def test_a_bad_scale_is_an_error_naming_the_key(write_scale, edit, message):
    path = edited(write_scale(["dsmoe"]) / "scales" / "tiny.yaml", edit)
    with pytest.raises(ValueError, match=message):
        load_scale(path)
    with pytest.raises(ValueError, match=message):
        scale_config("tiny")


def test_a_scale_that_is_not_valid_yaml_is_an_error_naming_the_file(write_scale):
    path = write_scale(["dsmoe"]) / "scales" / "tiny.yaml"
    path.write_text("base: [\n")
    with pytest.raises(ValueError, match=r"scale 'tiny' \(.*tiny.yaml\) is not valid YAML: while parsing .* line 2"):
        scale_config("tiny")


@pytest.mark.parametrize("scale", ["../scales/demo", "demo/..", "/tmp/demo", "..", ".", "", "sub\\demo"])
def test_a_scale_is_a_plain_name(scale):
    message = (
        re.escape(f"scale {scale!r}") + r" is not a plain name \(no path separators or '..'\); choose one of \[.*'demo'"
    )
    for where in (scale_config, runs_root, results_dir):
        with pytest.raises(ValueError, match=message):
            where(scale)
    with pytest.raises(ValueError, match=message):
        parse_scale("", ["--scale", scale])


def test_own_scales_dir_adds_to_the_shipped_scales(write_scale):
    own = write_scale(["dsmoe"]) / "scales"  # DSMOE_SCALES_DIR holds only 'tiny'
    assert scale_config("tiny").eval.val_windows == 2
    assert scale_config("demo") == OmegaConf.create(load_scale(SCALES_DIR / "demo.yaml").to_dict())
    (own / "demo.yaml").write_text((own / "tiny.yaml").read_text())  # an own copy overrides the shipped one
    assert scale_config("demo").base.model == scale_config("tiny").base.model
    with pytest.raises(ValueError, match=rf"unknown scale 'huge'; choose one of \[.*'llama7b'.*'tiny'\] .*{own} and "):
        scale_config("huge")
