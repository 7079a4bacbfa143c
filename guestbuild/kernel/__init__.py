"""The pclite guest kernel: a microVM config fragment built from Debian's linux-source-6.1, cached by content."""

from guestbuild.kernel.build import KernelArtifacts, build_kernel, cached_kernel, kernel_cache_key

__all__ = ["KernelArtifacts", "build_kernel", "cached_kernel", "kernel_cache_key"]
