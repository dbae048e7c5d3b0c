"""Sparse integer inference engine: compressed networks compiled into packed programs run by numba kernels.

    from jpq_core.engine import compile_network, load_program
    program = compile_network(net, example_inputs)   # example_inputs optional (cost-model comparison)
    out = program.run(*inputs)                        # numpy float32
    program.profile(*inputs)                          # {layer: ms}
    program.save(path); load_program(path)
    memory_report(program)                            # packed bytes vs the cost model's weight memory
    jpq_core.engine.bench.benchmark(network=...)      # the latency table of `python -m jpq_core bench engine`

Design, formulas and measured figures: docs/engine.md.
"""

from jpq_core.engine.program import Program, compile_network, load_program, memory_report

__all__ = ["Program", "compile_network", "load_program", "memory_report"]
