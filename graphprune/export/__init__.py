"""After pruning: ONNX export checked against onnxruntime (``onnx_export``), latency / size
benchmarks (``bench``) and plots (``report``)."""
