"""Config loading, dotted overrides, validation and the YAML round-trip of the resolved config."""

from pathlib import Path

import pytest
import yaml

from irra_dist.config import (
    RECIPES_DIR,
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    load_config,
    save_config,
)

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def test_official_recipe_holds_the_paper_values():
    cfg = load_config(RECIPES_DIR / "irra_official.yaml")
    # IRRA_SPEC sections 4 and 6, written out by hand.
    assert cfg.train.batch_size == 64 and cfg.train.num_epochs == 60
    assert cfg.optim.optimizer == "adam" and cfg.optim.eps == 1e-3 and cfg.optim.lr == 1e-5
    assert cfg.optim.bias_lr_factor == 2.0 and cfg.optim.lr_factor == 5.0
    assert cfg.optim.weight_decay == 4e-5 and cfg.optim.weight_decay_bias == 0.0
    assert cfg.optim.betas == (0.9, 0.999)
    assert (cfg.optim.warmup_epochs, cfg.optim.warmup_factor, cfg.optim.target_lr) == (5, 0.1, 0.0)
    assert cfg.optim.scheduler == "cosine" and cfg.optim.step_per == "epoch"
    assert cfg.model.image_size == (384, 128) and cfg.model.stride_size == 16
    assert cfg.model.temperature == 0.02 and cfg.model.cmt_depth == 4
    assert sorted(cfg.loss.names) == ["id", "mlm", "sdm"]
    assert cfg.data.mask_global_text and not cfg.data.drop_last and cfg.data.image_aug
    assert cfg.eval.split == "test" and cfg.eval.eval_period == 1
    assert cfg.eval.precision == "fp16"  # the official model is pure fp16 at evaluation (IRRA_SPEC 1.7)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_and_round_trips(name, tmp_path):
    cfg = load_config(name)
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    # plain YAML: no python-specific tags, readable by any loader
    assert "!!python" not in path.read_text()
    assert yaml.safe_load(path.read_text())["name"] == cfg.name


def test_dataset_recipes_inherit_the_official_one():
    official = load_config("irra_official")
    dataset_recipes = {"irra_icfg_pedes": "shards/ICFG-PEDES-val300", "irra_rstpreid": "shards/RSTPReid",
                       "irra_official_icfg_pedes": "shards/ICFG-PEDES",
                       "irra_official_rstpreid": "shards/RSTPReid"}
    for name, shards in dataset_recipes.items():
        cfg = load_config(name)
        assert cfg.data.shards == shards
        assert cfg.optim == official.optim and cfg.model == official.model
    eight = load_config("irra_8gpu")
    assert eight.train.batch_size * 8 == official.train.batch_size


def test_only_the_official_recipes_select_on_test():
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        cfg = load_config(path)
        if path.stem.startswith("irra_official"):
            assert (cfg.eval.split, cfg.eval.track_splits) == ("test", ["val"]), path.name
        else:
            assert (cfg.eval.split, cfg.eval.final_test) == ("val", True), path.name


def test_overrides_are_typed_and_nested():
    cfg = load_config("irra_official", ["train.batch_size=32", "optim.lr=2e-5", "loss.names=[sdm,itc]",
                                        "model.image_size=[256,128]", "logging.wandb=false", "name=x"])
    assert cfg.train.batch_size == 32
    assert cfg.optim.lr == pytest.approx(2e-5)
    assert cfg.loss.names == ["sdm", "itc"]
    assert cfg.model.image_size == (256, 128)
    assert cfg.logging.wandb is False and cfg.name == "x"


def test_an_integer_is_accepted_where_a_float_is_expected():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=abc", "train.batch_size"),
    ("train.batch_size=1.5", "train.batch_size"),
    ("train.compile=maybe", "train.compile"),
    ("optim.optimizer=rmsprop", "optim.optimizer"),
    ("model.image_size=[384]", "model.image_size"),
    ("loss.names=sdm", "loss.names"),
])
def test_wrong_types_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("irra_official", [override])
    message = str(err.value)
    assert f"'{key}'" in message and "expected" in message and "\n" not in message


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=0", "train.batch_size"),
    ("optim.lr=-1", "optim.lr"),
    ("loss.names=[sdm,foo]", "loss.names"),
    ("model.temperature=0", "model.temperature"),
])
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"invalid value for '{key}'"):
        load_config("irra_official", [override])


@pytest.mark.parametrize("override, key", [
    ("train.bacth_size=3", "train.bacth_size"),
    ("trian.x=1", "trian"),
])
def test_unknown_keys_are_refused(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config("irra_official", [override])


def test_unknown_key_in_a_recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  batch_size: 8\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.epochs'"):
        load_config(path)


def test_malformed_inputs(tmp_path):
    with pytest.raises(ConfigError, match="write it as section.key=value"):
        load_config(None, ["train.batch_size"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mlm"):
        load_config(None, ["data.mlm=false"])


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


def test_defaults_equal_an_empty_recipe():
    assert config_from_dict({}) == Config()
    assert load_config(None) == Config()


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path):
    cfg = load_config("demo")
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]
    assert yaml.safe_load(dump_config(cfg)) == cfg.to_dict()


def test_recipes_dir_is_the_repository_configs_folder():
    assert RECIPES_DIR == Path(__file__).resolve().parents[1] / "configs"


def test_recipe_file_values_are_converted_to_the_annotated_types(tmp_path):
    path = tmp_path / "r.yaml"
    # 2e-5 without a dot is a string to YAML 1.1; an integer where a float is expected
    path.write_text("optim:\n  lr: 2e-5\n  betas: [0.9, 1]\nmodel:\n  image_size: [256, 128]\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 2e-5 and type(cfg.optim.lr) is float
    assert cfg.optim.betas == (0.9, 1.0) and [type(b) for b in cfg.optim.betas] == [float, float]
    assert cfg.model.image_size == (256, 128) and type(cfg.model.image_size) is tuple


def test_base_chain_merges_sections_and_replaces_lists(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("name: root\nloss:\n  names: [sdm, id, mlm]\n  id_weight: 0.5\n"
                                        "optim:\n  lr: 1.0e-4\n  eps: 1.0e-6\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nname: mid\noptim:\n  eps: 1.0e-7\n")
    (tmp_path / "sub" / "top.yaml").write_text("base: mid.yaml\nloss:\n  names: [itc]\neval:\n")
    cfg = load_config(tmp_path / "sub" / "top.yaml", ["optim.warmup_epochs=2"])
    assert cfg.name == "mid"
    assert cfg.loss.names == ["itc"] and cfg.loss.id_weight == 0.5  # list replaced, section merged
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.warmup_epochs) == (1e-4, 1e-7, 2)
    assert cfg.eval == Config().eval  # an empty section keeps its defaults


@pytest.mark.parametrize("override, message", [
    ("model.image_size=[384]", "wrong type for 'model.image_size': expected a list of 2 values"),
    ("optim.betas=[0.9, 0.99, 0.999]", "wrong type for 'optim.betas': expected a list of 2 values"),
    ("model=5", "wrong type for 'model': expected a mapping"),
    ("optim.milestones=[10, soon]", "wrong type for 'optim.milestones[1]': expected an integer"),
    ("data.sources=[{shards: a, weight: heavy}]", "wrong type for 'data.sources.weight': expected a number"),
    ("data.sources=[{shards: a, wieght: 2}]",
     "unknown config key 'data.sources.wieght' (known keys here: name, shards, weight)"),
    ("train.batch_size.x=1", "'train.batch_size' is not a section"),
    ("optim.milestones[5]=1", "set the whole list instead, e.g. optim.milestones=[...]"),
])
def test_errors_in_lists_tuples_and_sections_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_list_item_can_be_overridden_by_index():
    cfg = load_config(None, ["data.sources=[{shards: sets/a}, {shards: sets/b}]", "data.sources[1].weight=3"])
    assert [(s.name, s.weight) for s in cfg.data.sources] == [("a", 1.0), ("b", 3.0)]


def test_strings_are_kept_as_written_and_round_trip(tmp_path):
    pipe = "pipe:curl -s -u ${TOKEN} http://host/set/{name}"
    cfg = load_config(None, [f"data.shards={pipe}", "train.run_name=1e5", r"logging.group=a\${x}\b",
                             "train.output_dir=@runs"])
    assert (cfg.data.shards, cfg.train.run_name, cfg.logging.group, cfg.train.output_dir) == (
        pipe, "1e5", r"a\${x}\b", "@runs")
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
