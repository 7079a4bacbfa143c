"""virtio-rng (device id 4): the guest's hwrng, fed from the host's os.urandom."""

from __future__ import annotations

import os

from hypervisor.virtio.device import VirtioDevice

# Bounds the time one request keeps the vCPU thread busy; the guest simply asks again for more.
MAX_BYTES_PER_REQUEST = 1 << 20


class RngDevice(VirtioDevice):
    device_id = 4
    num_queues = 1

    def process_queue(self, index: int) -> None:
        queue = self.queues[index]
        while (chain := queue.pop()) is not None:
            wanted = min(chain.writable_len, MAX_BYTES_PER_REQUEST)
            written = chain.write_all(os.urandom(wanted)) if wanted else 0
            queue.push_used(chain.head, written)
