"""glibc told to reuse freed memory in CPU training (nnunet_dmoe.trainers.seam.cpu_memory): page faults counted in a
fresh Python process, since the setting lasts for the process."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# 64 MiB blocks (above glibc's largest mmap threshold): allocated, written and freed; minor page faults of five
# such blocks after three of warm-up
BLOCKS = 5
CODE = f"""
import resource, torch
from nnunet_dmoe.trainers.seam.cpu_memory import keep_freed_memory
print(keep_freed_memory())
for _ in range(3):
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({BLOCKS}):
    torch.ones(16 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
BYTES = BLOCKS * (64 << 20)


def _fresh_block_faults() -> int:
    """Page faults of mapping and writing the blocks anew: one per 4 KiB page, or per 2 MiB page where the
    kernel gives transparent huge pages to every mapping."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            always = "[always]" in f.read()
    except OSError:
        always = False
    return BYTES // ((2 << 20) if always else 4096)


def _run(**env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "NNUNET_DMOE_KEEP_FREED_MEMORY")}
    p = subprocess.run([sys.executable, "-c", CODE], env={**clean, **env}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    line, faults = p.stdout.strip().splitlines()[-2:]
    return line, int(faults)


def test_freed_blocks_are_reused_without_page_faults():
    line, faults = _run()
    assert line.startswith("CPU memory: glibc keeps freed memory")
    # the heap's memory is reused: at most one of the five blocks lands on fresh pages (the heap's layout after the
    # warm-up may still grow it once), instead of all five
    assert faults <= 1.1 * (64 << 20) // 4096, faults


@pytest.mark.parametrize("env, says", [({"NNUNET_DMOE_KEEP_FREED_MEMORY": "0"}, "off"),
                                       ({"MALLOC_TRIM_THRESHOLD_": "131072"},
                                        "left to your settings (MALLOC_TRIM_THRESHOLD_)")])
def test_turned_off_or_left_to_the_users_settings(env, says):
    line, faults = _run(**env)
    assert says in line
    assert faults > 0.9 * _fresh_block_faults(), faults  # every block mapped and zero-filled anew
