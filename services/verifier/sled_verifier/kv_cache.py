"""The paged KV tensors: writes by slot, reads by block table."""

from __future__ import annotations

import os

import torch

from .weights import ModelSpec


class KVCache:
    """K and V of every layer in fixed-size blocks; slot = block * block_size + offset."""

    def __init__(
        self,
        spec: ModelSpec,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # [layers, 2 (k, v), num_blocks, block_size, kv_heads, head_dim]
        self.data = torch.zeros(
            spec.num_layers,
            2,
            num_blocks,
            block_size,
            spec.num_kv_heads,
            spec.head_dim,
            dtype=dtype,
            device=device,
        )
        # [layers, 2, num_blocks * block_size, kv_heads, head_dim]: a view, for slot writes
        self._slots = self.data.view(spec.num_layers, 2, -1, spec.num_kv_heads, spec.head_dim)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [n, kv_heads, head_dim] at slots [n] (int64)."""
        self._slots[layer, 0].index_copy_(0, slots, k)
        self._slots[layer, 1].index_copy_(0, slots, v)

    def gather(
        self, layer: int, block_table: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [length, kv_heads, head_dim] of the first `length` tokens of a session."""
        # [2, n_blocks, block_size, kv_heads, head_dim] in one indexing op for both k and v
        kv = self.data[layer].index_select(1, block_table)
        kv = kv.flatten(1, 2)[:, :length]
        return kv[0], kv[1]


def block_bytes(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return spec.num_layers * 2 * block_size * spec.num_kv_heads * spec.head_dim * elem


def auto_num_blocks(
    spec: ModelSpec,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    memory_fraction: float,
    max_useful_blocks: int,
) -> int:
    """Blocks that fit in a fraction of the free memory, never more than can be used."""
    on_cuda = device.type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] if on_cuda else _host_available_bytes()
    n = int(free * memory_fraction) // block_bytes(spec, block_size, dtype)
    if n <= 0:
        raise ValueError(
            f"no KV block fits in {memory_fraction:.0%} of {free / 2**20:.0f} MiB free memory"
        )
    return min(n, max_useful_blocks)


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
