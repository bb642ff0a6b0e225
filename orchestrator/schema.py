"""The typed job schema: dataclasses registered in Hydra's ConfigStore.

Hydra checks types and unknown keys while it composes the YAML in
``configs/`` with the user's overrides (``train.steps=abc`` or ``train.step=3``
fail there, naming the key); ``validate()`` then checks values and the
relations between them, again naming the field and what is allowed. Nothing
starts until both pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from orchestrator.programs import CONFIGS, PROGRAMS

STRATEGIES = tuple(PROGRAMS)
BALANCE = ("equal", "auto")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "constant")
REPLICATION_MODES = ("async", "sync")
TASK_TYPES = ("auto", "lm", "classification")
OFFLOAD_OPTIMIZER = ("none", "host", "nvme")
OFFLOAD_PARAMS = ("none", "host", "nvme")


def params_leave_worker(params: str, on_gpu: bool) -> bool:
    """Whether ``offload.params`` moves parameters: to NVMe, or to host memory off a GPU
    (a CPU worker's parameters are in host memory already)."""
    return params == "nvme" or (params == "host" and on_gpu)


OFFLOAD_STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


@dataclass
class StrategyConfig:
    """How the data-parallel ranks share the model (``strategy=<name>``)."""

    # ddp: replicated. zero1: optimizer state sharded. zero2: + gradients.
    # zero3: + parameters (gathered per block just before use).
    name: str = "ddp"
    # Gradient bucket size for the overlapped reductions; bigger buckets mean
    # fewer, larger messages but less overlap with the backward pass.
    bucket_mb: float = 25.0
    # ZeRO shard sizes: null splits evenly; a list such as [2, 1, 1] gives
    # rank r a share proportional to entry r; "auto" sizes shards by each
    # worker's own budget: free GPU memory on GPU workers, else the node's
    # available memory capped by the worker's cgroup limit.
    shard_weights: Any = None


@dataclass
class ClusterConfig:
    """Where the workers run (``cluster=local`` by default)."""

    # Workers the job aims to run (`shoal scale JOB N` changes it within
    # [min_workers, max_workers]). null min/max: exactly `workers`.
    workers: int = 2
    # Training starts (and continues after failures) with at least this many;
    # below it the job waits for capacity, asking Ray's autoscaler for it.
    min_workers: int | None = None
    max_workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # null: start an embedded local Ray instance. Otherwise an existing
    # cluster: "auto", "ray://host:10001" or "host:6379".
    address: str | None = None
    # How long to wait for Ray to place all workers before giving up.
    start_timeout_s: float = 120.0
    # true: workers return freed large buffers to the OS at once
    # (MALLOC_MMAP_THRESHOLD_=65536), so their RSS shows what sharding saves.
    # Costs about a quarter more CPU per step (measured: BENCHMARKS.md), so
    # it is for measuring memory, not for training fast.
    return_freed_memory: bool = False
    # Upper bound on any single collective (and on rendezvous); a dead peer
    # becomes an error after this long instead of a hang.
    collective_timeout_s: float = 300.0
    # Peak TFLOP/s of one worker's device (e.g. 989 for an H100 in bf16): with
    # it the progress line shows MFU; without it, the achieved TFLOP/s only.
    peak_tflops_per_worker: float | None = None


@dataclass
class GPTConfig:
    """``model=gpt_tiny``: the decoder-only transformer in ``actors/models/gpt.py``."""

    _target_: str = "actors.models.gpt.GPT"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    seq_len: int = 64
    dropout: float = 0.0


@dataclass
class GPTMoEConfig(GPTConfig):
    """``model=gpt_moe``: a GPT with mixture-of-experts MLPs (``actors/models/gpt_moe.py``)."""

    _target_: str = "actors.models.gpt_moe.GPTMoE"
    n_expert: int = 4
    top_k: int = 2
    # Hidden width of each expert (0: 4 * d_model, as the dense MLP).
    d_expert: int = 0
    # Tokens an expert takes per dispatch, as a multiple of an even share
    # (tokens * top_k / live experts); the rest are dropped. 0: no limit.
    capacity_factor: float = 2.0
    # Weight of the load-balancing loss (Switch Transformer's); 0: none.
    aux_loss_weight: float = 0.01


@dataclass
class MLPConfig:
    """``model=mlp``: a multi-layer perceptron classifier (``actors/models/mlp.py``).

    Its input size and number of classes come from the dataset.
    """

    _target_: str = "actors.models.mlp.MLP"
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    dropout: float = 0.0


@dataclass
class DigitsConfig:
    """``data=digits``: scikit-learn's bundled 8x8 digit images, 10 classes."""

    _target_: str = "actors.datasets.digits"
    # Share of the rows held out for evaluation (the same rows on every run).
    test_fraction: float = 0.2
    seed: int = 0
    # strategy=federated: label skew among clients, Dirichlet(alpha) class
    # shares each (0.1: a few classes per client; 100: nearly IID); null: IID.
    alpha: float | None = None


@dataclass
class ArraysConfig:
    """``data=arrays data.path=...``: features and labels from a .npz or .safetensors file."""

    _target_: str = "actors.datasets.arrays"
    path: str = MISSING
    x_key: str = "x"
    y_key: str = "y"
    test_fraction: float = 0.2
    # strategy=federated: label skew among clients (as data=digits); null: IID.
    alpha: float | None = None


@dataclass
class TaskConfig:
    """What the model learns from the data (``actors/task.py``)."""

    # auto: "lm" for token datasets, "classification" for labelled ones.
    type: str = "auto"
    # Your own loss: a dotted path to a function (model, batch) -> (loss_sum,
    # count), e.g. mypkg.losses.focal. null: the task's cross-entropy.
    loss: str | None = None


@dataclass
class StdlibTextConfig:
    """``data=stdlib_text``: the Python standard library's own source, as bytes."""

    _target_: str = "actors.data.stdlib_text"
    max_bytes: int = 4_000_000


@dataclass
class TextFileConfig:
    """``data=text_file data.path=...``: your own text file, as bytes or BPE tokens."""

    _target_: str = "actors.data.text_file"
    path: str = MISSING
    max_bytes: int | None = None
    # "bytes": one token per byte (vocabulary 256). "bpe": a byte-level BPE
    # trained on the file at job start, saved as <run_dir>/tokenizer.json and
    # reused on resume.
    tokenizer: str = "bytes"
    # data.tokenizer=bpe only: the BPE's vocabulary size (>= 257; fewer if the
    # text runs out of merges). The model's vocab_size follows the tokenizer.
    vocab_size: int = 4096


@dataclass
class RayDatasetConfig:
    """``data=ray_dataset data.uri=...``: text files larger than memory, streamed with Ray Data.

    Samples are consecutive windows of the rows' byte tokens, in sorted file
    order, repeated every epoch (``actors/stream.py``); the held-out split is
    ``eval_uri``'s files.
    """

    _target_: str = "actors.stream.ray_dataset"
    # A directory or file: s3://bucket/corpus/, file:///data/corpus or a local path.
    uri: str = MISSING
    # parquet or json (JSON lines): the text is in `column`; text: a row per line.
    format: str = "parquet"
    column: str = "text"
    # s3:// only: an S3-compatible server (MinIO, ...); null: AWS.
    endpoint_url: str | None = None
    # s3:// only: the bucket's region; null: the AWS configuration's.
    region: str | None = None
    # bytes only (vocabulary 256).
    tokenizer: str = "bytes"
    # The held-out split: other files of the same format (train.eval_every);
    # null: none.
    eval_uri: str | None = None


@dataclass
class TrainConfig:
    steps: int = 500
    # Samples (sequences of model.seq_len tokens) per optimizer step, summed
    # over all workers. Need not divide evenly by the number of workers.
    global_batch: int = 32
    # Gradient accumulation: each worker splits its share into this many
    # micro-batches (less activation memory, same result).
    micro_batches: int = 1
    optimizer: str = "adamw"
    # bf16: forward and backward compute in bfloat16 (torch.autocast), with
    # fp32 parameters, gradients and optimizer state (master weights).
    precision: str = "fp32"
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    momentum: float = 0.9
    grad_clip: float = 1.0
    # How the global batch is split among workers: "equal", or "auto" to give
    # each worker a share proportional to its measured throughput (re-measured
    # every balance_every steps). Gradients are weighted by sample count, so
    # the result is the global-batch gradient either way.
    balance: str = "equal"
    balance_every: int = 20
    # Read the next step's batch on a background thread while this one trains
    # (actors/prefetch.py). false: read in the step, e.g. for a dataset whose
    # batch() is not safe to run beside the model (it reseeds torch's global RNG).
    prefetch: bool = True
    seed: int = 0
    log_every: int = 10
    # Evaluate on the held-out split every this many steps (and at the end);
    # 0: never. Metrics go to metrics.jsonl, the progress line and loss.png.
    eval_every: int = 0
    # At most this many held-out batches (of train.global_batch samples) per evaluation.
    eval_batches: int = 20
    # TensorBoard event files in <run_dir>/tensorboard: every number of every
    # step record (tensorboard --logdir runs/JOB/tensorboard).
    tensorboard: bool = False
    # After training, the model continues this prompt for this many tokens.
    sample_prompt: str = "def "
    sample_tokens: int = 200


@dataclass
class CheckpointConfig:
    # null: file://<run_dir>/checkpoints
    uri: str | None = None
    # Save every this many steps (0: only at the end of the run).
    every: int = 100
    # Committed checkpoints to keep; older ones are deleted after a newer one commits.
    # Only this run's lineage counts (its own checkpoints and those it resumed from).
    keep: int = 2
    # A fresh run refuses a checkpoint.uri that holds committed checkpoints of
    # an earlier run (resume=latest continues it). true: delete them and start afresh.
    overwrite: bool = False


@dataclass
class StorageConfig:
    """Object-store options, used when ``checkpoint.uri`` is ``s3://...``."""

    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False


@dataclass
class ElasticConfig:
    """Failures, joins, leaves and stragglers (see orchestrator/controller.py)."""

    # false: the first lost worker fails the job (as a plain launcher would).
    enabled: bool = True
    # ZeRO shards are copied to a buddy worker's host memory every this many
    # steps; a lost worker is rebuilt from the copy. More steps: less
    # traffic, more steps redone after a failure.
    replicate_every: int = 1
    # async: the copy is sent while the next step computes (off the critical
    # path); a worker lost in the moment after a step, before its copy
    # landed, sends the job back that one step. sync: each step waits for
    # its copy to land, so a single failure never sends the job back.
    replication: str = "async"
    # A step that takes longer than this on some worker marks it as failed.
    step_timeout_s: float = 300.0
    # How long to wait for at least cluster.min_workers before failing the job.
    wait_timeout_s: float = 300.0
    # Give up after this many failures (a crash loop is not elasticity).
    max_failures: int = 20
    # Workers started beyond cluster.workers and kept idle (each holds its
    # cluster.cpus_per_worker / gpus_per_worker): a lost worker is replaced
    # by a spare at once instead of waiting seconds for a new process, and a
    # new spare is started behind it.
    spares: int = 0


@dataclass
class GatewayJobConfig:
    """Volunteers outside the Ray cluster, over gRPC (``actors/gateway_actor.py``)."""

    enabled: bool = False
    # Where the gateway listens; volunteers connect out to it (TLS, a token each).
    host: str = "0.0.0.0"
    port: int = 7443
    # The gateway's certificate, key and the CA volunteers verify it with;
    # null: a CA made for this run under <run_dir>/gateway (ca.pem to hand out).
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    # A volunteer silent this long is lost (its work is a dropout).
    heartbeat_timeout_s: float = 5.0
    # How long a volunteer's work item may take before it is given up on.
    work_deadline_s: float = 30.0
    # Spot checks: a share of each volunteer's results is recomputed on a
    # trusted actor; the share falls as 1 / (1 + its valid results), never
    # below spot_check_min (BOINC's adaptive replication). A mismatch bans it.
    spot_check_min: float = 0.1
    # Relative L2 difference a recomputed result may have (other hardware
    # rounds differently), past which the volunteer's result is wrong.
    spot_check_rtol: float = 1e-3
    # strategy=moe: a replica's result (outputs, input or parameter gradients)
    # with a tensor of larger L2 norm is rejected (null: no bound; federated
    # updates have strategy.max_update_norm).
    max_result_norm: float | None = None
    max_volunteers: int = 64


@dataclass
class OffloadConfig:
    """Training state kept off the training device (``collectives/offloaded_optim.py``).

    Data-parallel strategies (ddp, zero1-3) only. Before training starts the
    run prints where each kind of state lives and the bytes each tier holds.
    """

    # none: beside the parameters. host: host memory (pinned on GPU workers).
    # nvme: files under offload.nvme_path, streamed through the step in chunks.
    optimizer: str = "none"
    # zero3: the shard's parameters and gradients too. none; host: in host
    # memory (a GPU worker gathers each block onto the GPU as it is needed; on
    # CPU workers they are there already); nvme: in files, read a block ahead.
    # Needs offload.optimizer host or nvme. The model is then built one block
    # at a time (never whole in a worker's memory), each block seeded on its own.
    params: str = "none"
    # A local disk (NVMe/SSD) directory for offload to nvme; each run
    # uses <nvme_path>/<job-id>/, removed at exit (and when stale, on start).
    nvme_path: str | None = None
    # Budgets per worker, in bytes: the most each tier may hold (0: what the
    # machine has: available memory, free disk space).
    host_bytes: int = 0
    nvme_bytes: int = 0
    # State moves in chunks of this many MiB (whole pages).
    chunk_mb: float = 16.0
    # Chunks read ahead of the one being updated (0: none, every read waits).
    prefetch: int = 2


@dataclass
class JobConfig:
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Any: the model and dataset groups carry their own schemas (a user's
    # model has its own fields); their _target_ is instantiated by workers.
    model: Any = MISSING
    data: Any = MISSING
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    gateway: GatewayJobConfig = field(default_factory=GatewayJobConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    # null: ./runs/<job-id>
    run_dir: str | None = None
    # null: start fresh. "latest": the newest committed checkpoint under
    # checkpoint.uri. Or a checkpoint URI such as file:///.../checkpoints/step-100.
    resume: str | None = None


def register_schemas() -> None:
    """Register the schema nodes that ``configs/*.yaml`` extend (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    cs.store(group="strategy", name="strategy_schema", node=StrategyConfig)
    for name, module in CONFIGS.items():
        cs.store(group="strategy", name=f"{name}_schema", node=import_module(module).SCHEMA)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    cs.store(group="storage", name="storage_schema", node=StorageConfig)
    cs.store(group="model", name="gpt_schema", node=GPTConfig)
    cs.store(group="model", name="gpt_moe_schema", node=GPTMoEConfig)
    cs.store(group="model", name="mlp_schema", node=MLPConfig)
    cs.store(group="data", name="digits_schema", node=DigitsConfig)
    cs.store(group="data", name="arrays_schema", node=ArraysConfig)
    cs.store(group="data", name="stdlib_text_schema", node=StdlibTextConfig)
    cs.store(group="data", name="text_file_schema", node=TextFileConfig)
    cs.store(group="data", name="ray_dataset_schema", node=RayDatasetConfig)
