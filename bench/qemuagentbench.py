# SPDX-License-Identifier: GPL-2.0-or-later
"""dirtyrep + QEMU: the replication runs of bench/replbench.py with the VM under QEMU with
the dirtyrep-agent device (vmm/qemu/, scripts/build-qemu) instead of dirtyrep-vmm (bench/report.py's
qemu_agent section). The failover and redis figures of that section come from
bench/failover-bench.py --qemu and bench/redis-bench.py --qemu.
"""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))
import qemuvm  # noqa: E402

import replbench  # noqa: E402


def find_qemu():
    """$DR_QEMU, or what scripts/build-qemu prints (instant when cached)."""
    return qemuvm.find_qemu()


def pause(qemu, rate=25000, epoch_ms=20, window=6.0, memory="1G", ws="64M", cpus=1):
    """The dirtier at `rate` pages/s under QEMU with the agent, replicated by a primary and a standby
    dirtyrepd on loopback (ring tracking: the agent needs QEMU's dirty ring); the figures of
    replbench.run_one() for it: the pause as the agent saw it (PAUSE arrival to vCPU release,
    ResumeReply.paused_ns) over `window` seconds after `reset-pauses`."""
    with tempfile.TemporaryDirectory(prefix="dr-bench-qemu-") as tmp:
        vm = qemuvm.Qemu(tmp, qemu, "dirtier", f"ws={ws} pattern=random rate={rate} report_ms=1000", cpus=cpus,
                         tag="qemu", ram=memory)
        vm.wait_socket()
        # Attach once the guest runs, as test-qemu.py does: the firmware's boot reprograms memory
        # slots, which ends a session (docs/qemu.md, "Limits").
        vm.wait_line(r"^dirtier: ")
        r = replbench.pause_window(tmp, vm, memory=memory, tracking="ring", rate=rate, epoch_ms=epoch_ms,
                                   window=window)
    r.update(vmm="qemu+agent", cpus=cpus)
    return r
