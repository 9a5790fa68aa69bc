"""Hardware-agnostic benchmarking: device detection, the machine's own matmul peak, workloads, MFU."""
