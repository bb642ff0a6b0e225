"""Training programs, one module each, found by ``strategy.name`` (see ``orchestrator/program.py``).

This registry imports nothing, so the config schema can list the strategies
without loading any program.
"""

# strategy.name -> "module:Class". A new program adds its line here and its
# own module; it touches no other program's file.
PROGRAMS = {
    "ddp": "orchestrator.programs.data_parallel:DataParallelProgram",
    "zero1": "orchestrator.programs.data_parallel:DataParallelProgram",
    "zero2": "orchestrator.programs.data_parallel:DataParallelProgram",
    "zero3": "orchestrator.programs.data_parallel:DataParallelProgram",
    "pipeline": "orchestrator.programs.pipeline:PipelineProgram",
    "moe": "orchestrator.programs.moe:MoEProgram",
    "federated": "orchestrator.programs.federated:FederatedProgram",
}

# strategy.name -> a module with the program's own strategy fields: a
# dataclass ``SCHEMA`` extending ``orchestrator.schema.StrategyConfig``
# (registered as ``<name>_schema`` in the strategy group, which
# ``configs/strategy/<name>.yaml`` extends), ``check(config)``, which
# raises ``ConfigError`` naming a bad field, and ``batch_ways(config)``:
# into how many parts the global batch is split, and what sets that. Programs without own fields
# have no entry.
CONFIGS = {
    "pipeline": "orchestrator.programs.pipeline_config",
    "moe": "orchestrator.programs.moe_config",
    "federated": "orchestrator.programs.federated_config",
}
