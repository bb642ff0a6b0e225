"""Tasks and datasets without Ray: batches as pure functions of (seed, step), the data's
facts given to model factories, task selection and loss checks, eval metrics, and the
driver's configuration errors (``orchestrator.api.load_data``) before anything starts."""

from __future__ import annotations

import math
from functools import cache
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actors.data import BYTE_FACTS
from actors.datasets import (
    EVAL_FRACTION,
    ArrayDataset,
    DataError,
    DataFacts,
    TokenDataset,
    arrays,
    digits,
)
from actors.models.mlp import MLP
from actors.task import (
    TaskError,
    build_model,
    classification_loss,
    eval_metrics,
    import_function,
    lm_loss,
    make_task,
)
from orchestrator.api import load_data
from orchestrator.schema import TaskConfig
from orchestrator.shard_plan import batch_shares
from orchestrator.spec import ConfigError, JobSpec

# -- helpers the tests refer to by dotted path (tests.test_tasks.<name>) ------------------


class KwargsModel(nn.Module):
    """A factory that takes ``**kwargs``: it must be given every fact."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.lin = nn.Linear(1, 1)


class ClassesOnly(nn.Module):
    """A factory that names only ``num_classes``: ``in_features`` would be a TypeError."""

    def __init__(self, num_classes: int, width: int = 4):
        super().__init__()
        self.lin = nn.Linear(width, num_classes)


def per_row_loss(model, batch):
    """Wrong on purpose: a loss per row (shape [B]) rather than a 0-d sum."""
    logits = model(batch["x"])
    return F.cross_entropy(logits, batch["y"], reduction="none"), len(batch["y"])


def bare_loss(model, batch):
    """Wrong on purpose: a loss without its count."""
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="sum")


def half_sum_loss(model, batch):
    """A valid user loss: half the summed cross-entropy."""
    loss, n = classification_loss(model, batch)
    return 0.5 * loss, n


NOT_A_FUNCTION = 3


class _Unpickled:
    """An object whose unpickling leaves a mark: a ``.npz`` holding it must not be unpickled."""

    def __init__(self, mark_path: str):
        self.mark_path = mark_path

    def __reduce__(self):
        return (_leave_mark, (self.mark_path,))


def _leave_mark(path: str):
    with open(path, "w") as f:
        f.write("unpickled")
    return path


# -- datasets -----------------------------------------------------------------------------


def _toy(n: int = 50, features: int = 3, test_fraction: float = 0.2, seed: int = 0):
    # Row i's features start with i, so a row can be recognised from its x.
    x = np.arange(n * features, dtype=np.float32).reshape(n, features) / features
    y = np.arange(n) % 4
    return ArrayDataset.split(x, y, "toy", test_fraction, seed)


@cache
def _digits() -> ArrayDataset:
    return digits()


def test_array_rows_are_a_pure_function_of_seed_and_step():
    a, b = _toy(), _toy()
    # Whatever was asked before, and on another copy of the dataset, the same rows.
    first = [a.rows(7, s, 8).copy() for s in range(12)]
    for s in reversed(range(12)):
        np.testing.assert_array_equal(b.rows(7, s, 8), first[s])
        np.testing.assert_array_equal(a.rows(7, s, 8), first[s])
    assert not np.array_equal(a.rows(8, 0, 8), first[0])  # the seed matters
    assert not np.array_equal(a.rows(7, 1, 8), first[0])  # and the step
    # A batch's rows are the rows of its features and labels.
    batch = a.batch(7, 3, 8, 0, 8)
    np.testing.assert_array_equal(batch["x"].numpy(), a.x[first[3]])
    np.testing.assert_array_equal(batch["y"].numpy(), a.y[first[3]])
    assert batch["x"].dtype == torch.float32 and batch["y"].dtype == torch.int64


@pytest.mark.parametrize("batch", [1, 5, 8, 40])
def test_array_epoch_sees_every_training_row_once(batch):
    data = _toy()  # 40 training rows
    n = len(data.train_rows)
    assert n == 40 and n % batch == 0
    per_epoch = n // batch
    for epoch in range(3):
        rows = np.concatenate(
            [data.rows(0, s, batch) for s in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
        )
        assert sorted(rows.tolist()) == sorted(data.train_rows.tolist())
    # Epochs are reshuffled: the second visits the rows in another order.
    if batch < n:
        e0 = np.concatenate([data.rows(0, s, batch) for s in range(per_epoch)])
        e1 = np.concatenate([data.rows(0, s, batch) for s in range(per_epoch, 2 * per_epoch)])
        assert not np.array_equal(e0, e1)


def test_array_batch_across_an_epoch_boundary():
    data = _toy()  # 40 training rows; a batch of 16 straddles epochs at steps 2 and 4
    rows = np.concatenate([data.rows(3, s, 16) for s in range(5)])  # 80 rows = 2 epochs
    assert sorted(rows[:40].tolist()) == sorted(data.train_rows.tolist())
    assert sorted(rows[40:].tolist()) == sorted(data.train_rows.tolist())


@pytest.mark.parametrize(
    "weights", [[1], [1, 1], [2, 1], [1, 3, 2], [1, 1, 1, 1, 1, 1, 1], [5, 1, 1, 1]]
)
def test_array_batch_split_among_workers_reassembles(weights):
    data = _toy()
    global_batch = 13
    shares = batch_shares(global_batch, weights)
    assert sum(shares) == global_batch
    bounds = np.concatenate([[0], np.cumsum(shares)])
    for step in (0, 4, 9):
        whole = data.batch(1, step, global_batch, 0, global_batch)
        parts = [
            data.batch(1, step, global_batch, lo, hi)
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        for key in ("x", "y"):
            torch.testing.assert_close(torch.cat([p[key] for p in parts]), whole[key])


@pytest.mark.parametrize("n, test_fraction", [(50, 0.2), (37, 0.3), (10, 0.0)])
def test_array_train_and_test_rows_partition_the_rows(n, test_fraction):
    data = _toy(n, test_fraction=test_fraction)
    train, test = set(data.train_rows.tolist()), set(data.test_rows.tolist())
    assert not train & test
    assert train | test == set(range(n))
    assert len(test) == round(n * test_fraction)
    assert len(train) + len(test) == n  # no duplicates either
    # The split is seeded: the same every time, another with another seed.
    np.testing.assert_array_equal(_toy(n, test_fraction=test_fraction).test_rows, data.test_rows)
    if test:
        other = _toy(n, test_fraction=test_fraction, seed=1)
        assert set(other.test_rows.tolist()) != test
    # Held-out batches are exactly the test rows, limited when asked.
    held = list(data.eval_batches(4))
    assert sorted(np.concatenate(held or [np.empty(0, np.int64)]).tolist()) == sorted(test)
    assert len(list(data.eval_batches(4, limit=1))) == min(1, len(held))


def test_arrays_reads_npz_and_safetensors(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 2, 3)).astype(np.float64)  # converted to float32
    y = rng.integers(0, 5, size=30)
    y[0] = 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    save_file({"feat": x.astype(np.float32), "lab": y.astype(np.int32)}, tmp_path / "d.safetensors")

    from_npz = arrays(str(tmp_path / "d.npz"), test_fraction=0.2)
    from_st = arrays(str(tmp_path / "d.safetensors"), x_key="feat", y_key="lab", test_fraction=0.2)
    for data in (from_npz, from_st):
        assert data.x.dtype == np.float32 and data.y.dtype == np.int64
        np.testing.assert_allclose(data.x, x.astype(np.float32))
        np.testing.assert_array_equal(data.y, y)
        assert data.num_classes == 5
        assert len(data.train_rows) == 24 and len(data.test_rows) == 6
        assert data.facts.model_kwargs() == {
            "num_classes": 5,
            "input_shape": (2, 3),
            "in_features": 6,
        }
    assert from_npz.source.endswith("d.npz")
    np.testing.assert_array_equal(from_npz.test_rows, from_st.test_rows)


def test_arrays_refuses_a_missing_key_naming_it(tmp_path):
    from safetensors.numpy import save_file

    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)), labels=np.zeros(4, np.int64))
    save_file({"x": np.zeros((4, 2), np.float32)}, tmp_path / "d.safetensors")
    with pytest.raises(DataError, match=r"no array 'y' \(has \['x', 'labels'\]\)"):
        arrays(str(tmp_path / "d.npz"))
    with pytest.raises(DataError, match=r"no array 'feats'"):
        arrays(str(tmp_path / "d.npz"), x_key="feats", y_key="labels")
    with pytest.raises(DataError, match=r"no tensor 'y' \(has \['x'\]\)"):
        arrays(str(tmp_path / "d.safetensors"))
    with pytest.raises(DataError, match="does not exist"):
        arrays(str(tmp_path / "absent.npz"))
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(DataError, match=r"neither a \.npz nor a \.safetensors"):
        arrays(str(tmp_path / "d.csv"))


def test_arrays_never_unpickles_an_object_array(tmp_path):
    mark = tmp_path / "unpickled.txt"
    x = np.empty(4, dtype=object)
    x[:] = [_Unpickled(str(mark)) for _ in range(4)]
    np.savez(tmp_path / "evil.npz", x=x, y=np.zeros(4, np.int64))  # savez pickles object arrays
    with pytest.raises(DataError, match="object .pickled. array"):
        arrays(str(tmp_path / "evil.npz"))
    assert not mark.exists()
    # Through the driver: a one-line ConfigError naming the dataset, before Ray.
    spec = JobSpec.from_overrides(
        [
            "model=mlp",
            "data=arrays",
            f"data.path={tmp_path / 'evil.npz'}",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    with pytest.raises(ConfigError) as err:
        load_data(spec)
    msg = str(err.value)
    assert msg.startswith("data: cannot load actors.datasets.arrays")
    assert "only numeric arrays are read" in msg and "\n" not in msg
    assert not mark.exists()


def test_digits():
    data = _digits()
    assert data.x.shape == (1797, 64) and data.x.dtype == np.float32
    assert data.y.shape == (1797,)
    assert data.num_classes == 10 and set(data.y.tolist()) == set(range(10))
    assert data.x.min() == 0.0 and data.x.max() == 1.0
    assert len(data.test_rows) == round(1797 * 0.2)
    assert data.facts.model_kwargs()["in_features"] == 64
    assert data.kind == "labelled"


# -- token datasets -------------------------------------------------------------------------


def _positions(n: int) -> TokenDataset:
    # Token i is i: every token of a window tells where it came from.
    return TokenDataset(np.arange(n, dtype=np.int64), n, "positions")


@pytest.mark.parametrize("n, seq_len", [(1000, 16), (2000, 7), (400, 3)])
def test_token_training_never_touches_the_held_out_tail(n, seq_len):
    data = _positions(n)
    assert data.n_eval == int(n * EVAL_FRACTION) > 0
    assert data.n_train + data.n_eval == n
    highest = 0
    for seed in range(3):
        for step in range(40):
            offsets = data.offsets(seed, step, 32, seq_len)
            assert (offsets >= 0).all()
            assert (offsets + seq_len + 1 <= data.n_train).all()
            highest = max(highest, int(offsets.max()))
            batch = data.batch(seed, step, 32, 0, 32, seq_len)
            assert batch["x"].shape == batch["y"].shape == (32, seq_len)
            assert int(batch["y"].max()) < data.n_train
            torch.testing.assert_close(batch["y"][:, :-1], batch["x"][:, 1:])  # shifted by one
    # Windows reach (nearly) the end of the training text: the bound is not too loose either.
    assert highest >= data.n_train - seq_len - 1 - n // 50
    np.testing.assert_array_equal(data.offsets(2, 5, 32, seq_len), data.offsets(2, 5, 32, seq_len))


@pytest.mark.parametrize("n, seq_len, batch, limit", [(1000, 4, 3, 100), (4000, 8, 5, 2)])
def test_token_eval_batches_lie_in_the_tail(n, seq_len, batch, limit):
    data = _positions(n)
    held = list(data.eval_batches(batch, seq_len, limit))
    assert 0 < len(held) <= limit
    offsets = np.concatenate(held)
    assert (offsets >= data.n_train).all()
    assert (offsets + seq_len + 1 <= n).all()
    assert all(len(b) <= batch for b in held)
    for rows in held:
        b = data.eval_batch(rows, seq_len)
        assert int(b["x"].min()) >= data.n_train and int(b["y"].max()) < n
    if limit == 100:  # not limited: the whole tail, window after window
        assert len(offsets) == len(range(data.n_train, n - seq_len - 1, seq_len))


# -- model factories ------------------------------------------------------------------------


def test_build_model_gives_mlp_its_input_size_and_classes():
    facts = DataFacts(num_classes=3, input_shape=(2, 5))
    torch.manual_seed(0)
    model = build_model({"_target_": "actors.models.mlp.MLP", "hidden": [8]}, facts)
    assert isinstance(model, MLP)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 8), (8, 3)]
    assert model(torch.zeros(4, 2, 5)).shape == (4, 3)
    # From a job's config too (a dataclass), built from digits' facts.
    spec = JobSpec.from_overrides(["model=mlp", "model.hidden=[16]", "data=digits"])
    model = build_model(spec.model, DataFacts(num_classes=10, input_shape=(64,)))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 16), (16, 10)]


def test_build_model_passes_only_the_facts_a_factory_takes():
    facts = DataFacts(vocab_size=11, num_classes=3, input_shape=(2, 5))
    # **kwargs: every fact.
    model = build_model({"_target_": "tests.test_tasks.KwargsModel"}, facts)
    assert model.kwargs.keys() == {"vocab_size", "num_classes", "input_shape", "in_features"}
    assert model.kwargs["vocab_size"] == 11 and model.kwargs["num_classes"] == 3
    assert model.kwargs["in_features"] == 10 and tuple(model.kwargs["input_shape"]) == (2, 5)
    # A named parameter only: the others would be TypeErrors.
    model = build_model({"_target_": "tests.test_tasks.ClassesOnly"}, facts)
    assert model.lin.out_features == 3
    # GPT takes the vocabulary.
    gpt = build_model(
        {
            "_target_": "actors.models.gpt.GPT",
            "n_layer": 1,
            "n_head": 2,
            "d_model": 16,
            "seq_len": 8,
        },
        BYTE_FACTS,
    )
    assert gpt(torch.zeros(1, 8, dtype=torch.int64)).shape == (1, 8, 256)


def test_build_model_config_value_wins_over_a_fact():
    facts = DataFacts(vocab_size=11, num_classes=3, input_shape=(2, 5))
    model = build_model({"_target_": "tests.test_tasks.KwargsModel", "num_classes": 7}, facts)
    assert model.kwargs["num_classes"] == 7 and model.kwargs["vocab_size"] == 11
    model = build_model({"_target_": "tests.test_tasks.ClassesOnly", "num_classes": 2}, facts)
    assert model.lin.out_features == 2
    mlp = build_model(
        {"_target_": "actors.models.mlp.MLP", "hidden": [], "in_features": 4},
        DataFacts(num_classes=3, input_shape=(9,)),
    )
    assert mlp(torch.zeros(2, 4)).shape == (2, 3)


# -- tasks ----------------------------------------------------------------------------------


def test_make_task_picks_the_task_from_the_dataset():
    tokens, labelled = _positions(500), _toy()
    lm = make_task(TaskConfig(), tokens, seq_len=16)
    assert (lm.type, lm.loss_fn, lm.seq_len, lm.units_per_sample) == ("lm", lm_loss, 16, 16)
    cls = make_task(TaskConfig(), labelled, seq_len=None)
    assert (cls.type, cls.loss_fn, cls.seq_len) == ("classification", classification_loss, None)
    assert cls.units_per_sample == 1
    # A classification task ignores a model's seq_len; it may be asked for explicitly.
    assert make_task(TaskConfig(type="classification"), labelled, seq_len=64).seq_len is None
    assert make_task(TaskConfig(type="lm"), tokens, seq_len=8).type == "lm"


def test_make_task_refusals_name_the_field():
    with pytest.raises(TaskError, match=r"^task\.type: 'lm' does not fit a dataset of kind"):
        make_task(TaskConfig(type="lm"), _toy(), seq_len=16)
    with pytest.raises(TaskError, match=r"^task\.type: 'classification'"):
        make_task(TaskConfig(type="classification"), _positions(500), seq_len=16)
    with pytest.raises(TaskError, match=r"^task\.type: cannot tell"):
        make_task(TaskConfig(), SimpleNamespace(), seq_len=16)
    with pytest.raises(TaskError, match=r"^model\.seq_len"):
        make_task(TaskConfig(), _positions(500), seq_len=None)
    with pytest.raises(TaskError, match=r"^task\.loss: cannot import module 'no_such_pkg_x\.l'"):
        make_task(TaskConfig(loss="no_such_pkg_x.l.focal"), _toy(), seq_len=None)
    with pytest.raises(TaskError, match=r"^task\.loss: module 'tests\.test_tasks' has no function"):
        make_task(TaskConfig(loss="tests.test_tasks.NOT_A_FUNCTION"), _toy(), seq_len=None)
    with pytest.raises(TaskError, match=r"^task\.loss: 'focal' is not a dotted path"):
        make_task(TaskConfig(loss="focal"), _toy(), seq_len=None)
    assert import_function("tests.test_tasks.half_sum_loss", "task.loss") is half_sum_loss


def _classifier_and_batch():
    data = _toy()
    torch.manual_seed(0)
    model = MLP(in_features=3, num_classes=4, hidden=[8])
    return data, model, data.batch(0, 0, 8, 0, 8)


def test_a_loss_that_is_not_a_scalar_is_refused_naming_task_loss():
    data, model, batch = _classifier_and_batch()
    task = make_task(TaskConfig(loss="tests.test_tasks.per_row_loss"), data, None)
    with pytest.raises(TaskError, match=r"^task\.loss must return a scalar .*got \(8,\)"):
        task.loss(model, batch)
    task = make_task(TaskConfig(loss="tests.test_tasks.bare_loss"), data, None)
    with pytest.raises(TaskError, match=r"^task\.loss must return \(loss_sum, count\), got Tensor"):
        task.loss(model, batch)
    task = make_task(TaskConfig(loss="tests.test_tasks.half_sum_loss"), data, None)
    loss, count = task.loss(model, batch)
    ref = F.cross_entropy(model(batch["x"]), batch["y"], reduction="sum")
    assert count == 8 and loss.dim() == 0
    torch.testing.assert_close(loss, 0.5 * ref)


# -- eval metrics ---------------------------------------------------------------------------


def _sums(task, loss_sum, count, correct, rows):
    return {"task": task, "loss_sum": loss_sum, "count": count, "correct": correct, "rows": rows}


def test_eval_metrics_from_two_ranks():
    two = [_sums("classification", 6.0, 10, 7, 10), _sums("classification", 2.0, 6, 1, 6)]
    assert eval_metrics(two) == {"eval_loss": 0.5, "accuracy": 0.5}
    lm = [_sums("lm", 30.0, 20, 0, 2), _sums("lm", 10.0, 20, 0, 2)]
    metrics = eval_metrics(lm)
    assert metrics.keys() == {"eval_loss", "perplexity"}
    assert metrics["eval_loss"] == 1.0 and math.isclose(metrics["perplexity"], math.e)
    # A diverged model's perplexity is capped rather than an overflow.
    assert eval_metrics([_sums("lm", 1e6, 10, 0, 1)])["perplexity"] == pytest.approx(math.exp(50))
    assert eval_metrics([_sums("lm", 0.0, 0, 0, 0)]) == {}


def test_task_evaluate_split_between_ranks_equals_the_whole():
    """Two ranks' ``Task.evaluate`` sums give the whole test set's loss and accuracy; a rank
    without rows of a batch runs a stand-in forward and counts nothing."""
    data = _digits()
    torch.manual_seed(0)
    model = MLP(in_features=64, num_classes=10, hidden=[16])
    task = make_task(TaskConfig(), data, None)
    held = list(data.eval_batches(50))
    bounds = [(0, 1), (1, 50)]  # rank 0 has no rows of the last (short) batch
    sums = []
    for lo, hi in bounds:
        items = []
        for rows in held:
            batch = data.eval_batch(rows)
            a, b = (lo * len(rows)) // 50, (hi * len(rows)) // 50
            items.append(({k: v[a:b] if b > a else v[:1] for k, v in batch.items()}, b > a))
        sums.append(task.evaluate(model, items))
    assert sum(s["rows"] for s in sums) == len(data.test_rows)
    with torch.no_grad():
        logits = model(torch.from_numpy(data.x[data.test_rows]))
        labels = torch.from_numpy(data.y[data.test_rows])
        loss = F.cross_entropy(logits, labels).item()
        correct = int((logits.argmax(-1) == labels).sum())
    metrics = eval_metrics(sums)
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["accuracy"] == correct / len(data.test_rows)
    assert 0 < metrics["accuracy"] < 0.5  # an untrained model: a real, non-trivial count


def test_task_evaluate_lm_perplexity():
    data = _positions(2000)
    torch.manual_seed(0)
    model = build_model(
        {
            "_target_": "actors.models.gpt.GPT",
            "n_layer": 1,
            "n_head": 2,
            "d_model": 16,
            "seq_len": 8,
        },
        data.facts,
    )
    task = make_task(TaskConfig(), data, seq_len=8)
    items = [(data.eval_batch(o, 8), True) for o in data.eval_batches(4, 8, 3)]
    metrics = eval_metrics([task.evaluate(model, items)])
    # An untrained model over 2000 tokens is close to uniform: perplexity near 2000.
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 500 < metrics["perplexity"] < 8000


# -- the driver's checks, before Ray --------------------------------------------------------


@pytest.mark.parametrize(
    "override, field, module",
    [
        ("model._target_=no_such_pkg_m.Net", "model._target_", "no_such_pkg_m"),
        ("data._target_=no_such_pkg_d.load", "data._target_", "no_such_pkg_d"),
        ("task.loss=no_such_pkg_l.focal", "task.loss", "no_such_pkg_l"),
        ("model._target_=tests.test_tasks.NoSuchNet", "model._target_", "tests.test_tasks"),
        ("task.loss=tests.test_tasks.no_such_loss", "task.loss", "tests.test_tasks"),
    ],
)
def test_an_unimportable_target_is_a_config_error(tmp_path, override, field, module):
    with pytest.raises(ConfigError) as err:
        JobSpec.from_overrides(["model=mlp", "data=digits", override, f"run_dir={tmp_path}"])
    msg = str(err.value)
    assert msg.startswith(f"{field}: ") and module in msg
    assert "\n" not in msg


def _tiny_npz(tmp_path, rows: int = 10):
    path = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(rows, 4)), y=np.arange(rows) % 3)
    return path


def test_a_dataset_smaller_than_one_batch_is_a_one_line_config_error(tmp_path):
    path = _tiny_npz(tmp_path)  # 10 rows: 8 for training
    spec = JobSpec.from_overrides(
        [
            "model=mlp",
            "data=arrays",
            f"data.path={path}",
            "train.global_batch=16",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    with pytest.raises(ConfigError) as err:
        load_data(spec)
    msg = str(err.value)
    assert msg.startswith("data: the dataset has 8 training samples")
    assert "train.global_batch=16" in msg and "\n" not in msg
    # One batch that fits is accepted.
    ok = JobSpec.from_overrides(
        [
            "model=mlp",
            "data=arrays",
            f"data.path={path}",
            "train.global_batch=8",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    data = load_data(ok)
    assert isinstance(data, ArrayDataset) and len(data.train_rows) == 8


def test_load_data_refuses_a_task_that_does_not_fit(tmp_path):
    spec = JobSpec.from_overrides(
        ["model=mlp", "data=digits", "task.type=lm", f"run_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match=r"^task\.type: 'lm' does not fit"):
        load_data(spec)


def test_shoal_run_reports_a_too_small_dataset_on_one_line(tmp_path, capsys):
    from orchestrator.cli import EXIT_CONFIG, main

    path = _tiny_npz(tmp_path)
    run_dir = tmp_path / "run"
    code = main(
        [
            "run",
            "model=mlp",
            "data=arrays",
            f"data.path={path}",
            "train.global_batch=16",
            f"run_dir={run_dir}",
        ]
    )
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    bad = [line for line in err.splitlines() if line.startswith("shoal: bad configuration:")]
    assert len(bad) == 1, err
    assert "train.global_batch=16" in bad[0] and "8 training samples" in bad[0]
    assert "Traceback" not in err
    assert not (run_dir / "config.yaml").exists()  # a refused run leaves no config behind


def test_fractional_labels_are_refused_not_truncated():
    x = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(DataError, match="class indices"):
        ArrayDataset.split(x, np.array([0.0, 1.5, 1.0, 0.0]), "t", 0.25)
    assert ArrayDataset.split(x, np.array([0.0, 1.0, 1.0, 0.0]), "t", 0.25).num_classes == 2
