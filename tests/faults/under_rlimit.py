"""`python under_rlimit.py MARGIN_MB WARMUP.json ARGS...`: `prefalign ARGS...` under a real address-space
limit (RLIMIT_AS), set MARGIN_MB above this process's own peak once a warm-up run (the config in
WARMUP.json, one small step) has loaded torch, transformers and prefalign and made the threads and
allocator arenas a run needs. So the limit sits where the next run can load its model and data but
not hold a step that needs far more than MARGIN_MB, on any machine: the failure is an allocation that
the kernel refuses (mmap or brk ENOMEM), as on a host out of memory, not a crash at import.

Prints `rlimit_as=BYTES vm_peak=BYTES` on stderr first; exits as the CLI does."""

import json
import resource
import sys

from prefalign.api import train
from prefalign.cli import main


def status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


if __name__ == "__main__":
    margin_mb, warmup, args = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
    with open(warmup, encoding="utf-8") as f:
        train(json.load(f), log=lambda _: None, progress=False, card=False)
    peak = status("VmPeak")
    limit = peak + int(margin_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    print(f"rlimit_as={limit} vm_peak={peak}", file=sys.stderr, flush=True)
    sys.argv = ["prefalign", *args]
    main()
