"""DMC kernels: each fast path sits beside its pure-PyTorch reference and is tested against it."""
