"""The typed stage layer: configs become typed specs once, at the adapter, and the specs check
themselves; the workdir records a spec in the layout of its config file."""
import dataclasses

import pytest

from configs import merge as merge_cfg
from mdt_jax import evaluate as ev
from mdt_jax.pipelines import MergeSpec
from mdt_jax.run import config_dict, merge_spec


def _config(**fields):
    c = merge_cfg.get_config()
    c.checkpoints = "a/model,b/model"
    for k, v in fields.items():
        c[k] = v
    return c


@pytest.mark.parametrize("fields", [{}, {"pipeline": "p3", "base": "mt/model", "select_seed": 5,
                                        "lerp_ps": (0, 0.5, 1), "ties_ks": (0.2,)},
                                    {"method": "fisher", "fishers": "fa,fb", "floor": 0.0}])
def test_the_spec_records_the_config_files_layout(fields):
    c = _config(**fields)
    spec = merge_spec(c)
    assert spec.run_config() == config_dict(c)  # a workdir made by either path resumes with the other
    assert spec.checkpoints == ("a/model", "b/model") and isinstance(spec.eval, ev.EvalSpec)


@pytest.mark.parametrize("fields, match", [
    ({"pipeline": "p4"}, "config.pipeline"),
    ({"method": "ties"}, "config.method"),
    ({"pipeline": "p1", "method": "emr"}, "config.method"),
    ({"pipeline": "p2", "method": "emr"}, "config.base"),
    ({"pipeline": "p2", "align": True}, "config.align"),
    ({"method": "fisher", "fishers": "only_one"}, "config.fishers"),
    ({"method": "regmean"}, "config.grams"),
    ({"checkpoints": "one"}, "config.checkpoints"),
    ({"pipeline": "p3"}, "config.base"),
    ({"pipeline": "p3", "base": "mt", "select_seed": 0}, "config.select_seed"),
    ({"lerp_ps": (0, "x")}, "config.lerp_ps"),
])
def test_bad_specs_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        merge_spec(_config(**fields))


def test_typed_fields_are_not_strings():
    with pytest.raises(TypeError, match="MergeSpec.checkpoints"):
        MergeSpec(checkpoints="a,b")
    spec = MergeSpec(checkpoints=("a", "b"))
    with pytest.raises(ValueError, match="eval.episodes"):
        dataclasses.replace(spec, eval=ev.EvalSpec(episodes=0))


def test_rows_keep_the_results_schema():
    row = ev.Row("p3_lerp", {"task": "hopper", "normalized": 1.0}, "last", None, {"p": 0.5})
    assert row.to_dict() == {"task": "hopper", "normalized": 1.0, "checkpoint_mode": "last", "model": "p3_lerp",
                             "coefficients": {"p": 0.5}}
    assert list(ev.Row("x", {"task": "t"}, checkpoint="c").to_dict()) == ["task", "checkpoint_mode", "model",
                                                                          "checkpoint"]


def test_train_fisher_and_gram_runs_record_their_config_files_layout():
    from configs import fisher as fisher_cfg, gram as gram_cfg, train as train_cfg
    from mdt_jax.fisher_stage import FisherRun
    from mdt_jax.regmean import GramRun
    from mdt_jax.run import train_run_spec
    from mdt_jax.training import TrainRun

    c = train_cfg.get_config()
    c.task, c.dataset, c.train.freeze = "hopper,walker2d", "a.hdf5,b.hdf5", "attn,mlp"
    spec = train_run_spec(c)
    assert spec.task == ("hopper", "walker2d") and spec.run_config() == config_dict(c)
    tuned = spec.replace(seed=3, train={"batch_size": 8}, model={"n_layer": 1})
    assert tuned.train["batch_size"] == 8 and tuned.train["freeze"] == "attn,mlp" and tuned.model["n_layer"] == 1
    assert spec.train["batch_size"] == 64  # the original is unchanged
    with pytest.raises(TypeError, match="TrainRun.task"):
        TrainRun(task="hopper")
    f = fisher_cfg.get_config()
    f.checkpoint, f.dataset = "m", "a.hdf5,b.hdf5"
    assert FisherRun(**(config_dict(f) | {"dataset": ("a.hdf5", "b.hdf5")})).run_config() == config_dict(f)
    g = gram_cfg.get_config()
    assert set(config_dict(g)) == {fl.name for fl in dataclasses.fields(GramRun)}


def test_search_spec_records_the_config_files_layout():
    from configs import search as search_cfg
    from mdt_jax.run import config_dict
    from mdt_jax.search import SearchEval, SearchSpec

    c = search_cfg.get_config()
    c.checkpoints, c.fishers = "a,b", "fa,fb"
    d = config_dict(c)
    spec = SearchSpec(**(d | {"checkpoints": ("a", "b"), "fishers": ("fa", "fb"), "eval": SearchEval(**d["eval"])}))
    assert spec.run_config() == d
