"""Freed tensors go back to the system (lib.allocator): without it glibc's malloc keeps a
tensor of a few MiB resident after it is freed, once a larger block was freed before it.
Run in fresh interpreters: a long-lived one's heap may already hold resident free space."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = """
import sys
from pathlib import Path
import torch
{setup}
def rss():
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
big = torch.ones(16 << 20, dtype=torch.uint8)  # freed: glibc alone raises its mmap threshold to 16 MiB
del big
before = rss()
x = torch.ones(8 << 20, dtype=torch.uint8)
grew = rss() - before
del x
print(grew >> 20, (rss() - before) >> 20)
"""


def kept_after_free(setup: str) -> tuple[int, int]:
    """(MiB resident growth of an 8 MiB tensor, MiB still resident once it is freed)."""
    done = subprocess.run([sys.executable, "-c", SCENARIO.format(setup=setup)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    grew, kept = map(int, done.stdout.split())
    return grew, kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc on Linux only")
def test_a_freed_tensor_of_a_few_mib_leaves_the_process():
    from lib.allocator import return_freed_memory

    if not return_freed_memory():
        pytest.skip("not glibc, or MALLOC_MMAP_THRESHOLD_ set by the user")
    grew, kept = kept_after_free("import lib")
    assert grew >= 7 and kept <= 1  # the tensor's pages came and went (glibc 2.36 alone keeps 7 of the 8 MiB)
