"""Times an ONNX file in DeepSparse; run by another interpreter, the one DeepSparse is installed in.

DeepSparse needs numpy<2 and onnx<1.15, which this project's environment cannot hold, so the benchmark
(`jpq_core.engine.peers.SubprocessTimer`) runs this file with the interpreter given by
`bench engine --deepsparse-python PATH`. It imports only deepsparse and numpy, never jpq_core.

    PYTHON deepsparse_timer.py MODEL.onnx SHAPES THREADS
    SHAPES: the inputs' shapes as JSON, e.g. [[1, 3, 32, 32]]

It compiles the model, then answers requests on stdin: each line holds a number of calls N; it runs N
calls back to back on fixed random inputs and prints one line, a JSON number: milliseconds per call. It
exits at the end of stdin. Keeping one process for all requests lets the benchmark interleave DeepSparse's
measurements with the others'.
"""

import json
import sys
import time


def main() -> int:
    import numpy as np
    from deepsparse import compile_model

    model_path, shapes, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    batch = shapes[0][0]
    engine = compile_model(model_path, batch_size=batch, num_cores=threads)
    rng = np.random.default_rng(0)
    inputs = [rng.random(shape, dtype=np.float32) for shape in shapes]
    for line in sys.stdin:
        calls = int(line)
        start = time.perf_counter()
        for _ in range(calls):
            engine.run(inputs)
        print(json.dumps((time.perf_counter() - start) * 1e3 / calls), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
