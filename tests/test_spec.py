"""Config composition and validation: every bad value names its field, before anything starts."""

from __future__ import annotations

import pytest

from orchestrator.spec import ConfigError, JobSpec


def test_defaults_compose_and_resolve_paths(tmp_path):
    spec = JobSpec.from_overrides([f"run_dir={tmp_path}/r"])
    assert spec.strategy.name == "ddp"
    assert spec.cluster.workers == 2
    assert spec.model._target_ == "actors.models.gpt.GPT"
    assert spec.data._target_ == "actors.data.stdlib_text"
    assert spec.checkpoint.uri == f"file://{tmp_path}/r/checkpoints"
    assert "train:" in spec.to_yaml()


def test_overrides_are_typed(tmp_path):
    spec = JobSpec.from_overrides(["train.steps=7", "train.lr=0.01", "model.n_layer=1"])
    assert spec.train.steps == 7 and spec.train.lr == 0.01 and spec.model.n_layer == 1


@pytest.mark.parametrize(
    "overrides, must_mention",
    [
        (["train.steps=0"], "train.steps"),
        (["train.steps=abc"], "train.steps"),
        (["train.stepz=3"], "train.stepz"),
        (["train.lr=-1"], "train.lr"),
        (["train.optimizer=adam"], "adamw"),
        (["train.lr_schedule=linear"], "cosine"),
        (["cluster.workers=0"], "cluster.workers"),
        (["cluster.workers=4", "train.global_batch=3"], "train.global_batch"),
        (["train.micro_batches=20"], "train.micro_batches"),
        (["strategy=zero9"], "ddp"),
        (["model=gpt_huge"], "gpt_tiny"),
        (["model._target_=no.such.Model"], "model._target_"),
        (["data=text_file"], "data.path"),
        (["data=text_file", "data.path=/definitely/not/here.txt"], "data.path"),
        (["elastic.replication=eventually"], "elastic.replication"),
        (["checkpoint.keep=0"], "checkpoint.keep"),
        (["checkpoint.uri=ftp://x/y"], "checkpoint.uri"),
        (["resume=yesterday"], "resume"),
    ],
)
def test_bad_values_name_the_field(overrides, must_mention):
    with pytest.raises(ConfigError) as err:
        JobSpec.from_overrides(overrides)
    assert must_mention in str(err.value)


def test_text_file_that_exists(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 100)
    spec = JobSpec.from_overrides(["data=text_file", f"data.path={f}"])
    assert spec.data.path == str(f)


@pytest.mark.parametrize(
    "override, must_mention",
    [
        ("train.steps=abc", "could not be converted to Integer"),
        ("+new.key=1", "new: unknown field"),
        ("+train.foo=2", "train.foo: unknown field"),
        ("+model.foo=1", "model.foo: unknown field"),
        ("train.lr=inf", "train.lr: must be a finite number"),
        ("train.lr=nan", "train.lr: must be a finite number"),
        ("elastic.step_timeout_s=inf", "elastic.step_timeout_s: must be a finite number"),
        ("strategy.shard_weights=[1,inf]", "strategy.shard_weights[1]"),
    ],
)
def test_errors_keep_their_reason_and_nothing_is_dropped(override, must_mention):
    with pytest.raises(ConfigError) as err:
        JobSpec.from_overrides([override])
    assert must_mention in str(err.value)
    assert "To append" not in str(err.value)  # Hydra's hint to use '+', which shoal refuses


def test_a_text_too_short_for_one_sample_is_refused(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("x" * 40)
    with pytest.raises(ConfigError, match="data.path: must be a text of more than"):
        JobSpec.from_overrides(["data=text_file", f"data.path={f}", "model.seq_len=64"])
    JobSpec.from_overrides(["data=text_file", f"data.path={f}", "model.seq_len=16"])


def test_a_model_that_cannot_be_built_is_refused_before_anything_starts():
    """Built on the meta device once the data's facts are known (preflight, before Ray)."""
    from actors.data import BYTE_FACTS
    from orchestrator.preflight import model_shape

    spec = JobSpec.from_overrides(["model.n_head=5"])  # d_model 128 is not divisible by 5
    with pytest.raises(ConfigError, match="model: cannot build .*GPT"):
        model_shape(spec, BYTE_FACTS)


def test_a_replaced_target_gets_only_the_fields_it_takes():
    """``model._target_=...`` on gpt_tiny does not hand the new model the GPT's fields."""
    spec = JobSpec.from_overrides(["model._target_=actors.models.mlp.MLP", "+model.hidden=[16]"])
    assert dict(spec.model) == {"_target_": "actors.models.mlp.MLP", "dropout": 0.0, "hidden": [16]}
    assert spec.seq_len is None  # no longer a language model's context


def test_a_model_with_state_outside_its_parameters_is_refused():
    """A BatchNorm's running statistics would differ per worker and be lost on resume."""
    from actors.data import BYTE_FACTS
    from orchestrator.preflight import model_shape

    spec = JobSpec.from_overrides(["model._target_=tests.test_spec.with_batch_norm"])
    with pytest.raises(ConfigError, match="model: .*running_mean.*GroupNorm"):
        model_shape(spec, BYTE_FACTS)


def with_batch_norm(vocab_size: int):
    import torch

    return torch.nn.Sequential(torch.nn.Embedding(vocab_size, 8), torch.nn.BatchNorm1d(8))


@pytest.mark.parametrize(
    "overrides, must_mention",
    [
        (
            ["gateway.enabled=true"],  # strategy=ddp takes no volunteers
            "gateway.enabled: must be used with a strategy that takes volunteers: "
            "strategy=moe (volunteers replicate expert hosts); "
            "strategy=federated (volunteers train as federated clients), got 'ddp'",
        ),
        (["strategy=federated", "gateway.enabled=true", "gateway.port=70000"], "gateway.port"),
        (
            ["strategy=federated", "gateway.enabled=true", "gateway.spot_check_min=2"],
            "gateway.spot_check_min: must be in [0, 1]",
        ),
        (
            ["model=gpt_moe", "strategy=moe", "gateway.enabled=true", "gateway.max_result_norm=0"],
            "gateway.max_result_norm: must be > 0 or null",
        ),
    ],
)
def test_gateway_fields_name_the_field(overrides, must_mention):
    with pytest.raises(ConfigError) as e:
        JobSpec.from_overrides(overrides)
    assert must_mention in str(e.value)
