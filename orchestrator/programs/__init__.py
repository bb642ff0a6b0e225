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
}
