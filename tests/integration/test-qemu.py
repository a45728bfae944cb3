#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""dirtyrepd with QEMU: Debian's QEMU with the dirtyrep-agent object
(scripts/build-qemu, vmm/qemu/), a guest, a primary and a standby dirtyrepd,
real sockets, real KVM.

  test-qemu.py consistency --guest dirtier|memtouch --cpus N [--epochs N]
  test-qemu.py badinput   (no share=on, no dirty ring, SMM, two agents, a
                           client gone mid-pause: clear errors, VM never left paused)
  test-qemu.py checks     (no KVM needed: the built QEMU has the device, and
                           refuses a second one, a missing path=, a ready-fd=
                           without restore=, and an accelerator other than KVM)
  test-qemu.py restore    (a replica's RAM memfd and saved state started in a
                           new QEMU with restore=: the guest goes on, no reboot)
  test-qemu.py held-output (COM1 through the agent's output commit with a
                           4 KiB limit and no standby: the limit is reached and
                           the transmitter waits without spinning QEMU's main
                           loop; a standby's commits release it, nothing lost)
  test-qemu.py failover [--trials N]
                          (test-failover.py's kill trials with QEMU: network
                           namespaces, the kv guest behind the service address,
                           output commit on COM2; the primary host SIGKILLed,
                           the standby starts QEMU on its replica (VmmType=qemu);
                           no acknowledged INCR lost, then fail back)

The patched QEMU is $DR_QEMU, or what scripts/build-qemu prints (instant
when cached; scripts/test builds it before the tests).
Exit 0 pass, 1 fail, 77 skip (no /dev/kvm).
"""
import argparse
import os
import random
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
import loopback as tr  # noqa: E402
from qemuvm import RAM, Qemu, drain_service_line, failover_keys, find_qemu, kv_starter  # noqa: E402

log, fail, ENV = tr.log, tr.fail, tr.ENV


def writes_of(q, after=0):
    """The dirtier's last progress line: (pass, writes)."""
    m = q.wait_line(r"^dirtier: cpu=0 pass=(\d+) writes=(\d+) rate=\d+$", after=after)
    return int(m.group(1)), int(m.group(2))


def progressing(q, what, timeout=30):
    """The guest makes progress: a later progress line with more writes."""
    n = len(q.lines())
    _, w0 = writes_of(q)
    end = time.time() + timeout
    while time.time() < end:
        _, w1 = writes_of(q, after=n)
        if w1 > w0:
            return w1
        time.sleep(0.1)
    fail(f"{what}: the guest made no progress in {timeout}s (writes stay at {w0})")


def expect_refusal(tmp, qemu, tag, words, **kw):
    """QEMU must exit non-zero at start-up with an error naming all of `words`."""
    q = Qemu(tmp, qemu, "dirtier", "ws=8M rate=5000 report_ms=200", tag=tag, **kw)
    try:
        rc = q.proc.wait(60)
    except subprocess.TimeoutExpired:
        fail(f"{tag}: QEMU did not refuse to start")
    q.kill()
    text = q.text()
    # A word, or a tuple of alternatives of which one must appear.
    missing = [w for w in words if not any(x in text for x in (w if isinstance(w, tuple) else (w,)))]
    if rc == 0 or missing:
        fail(f"{tag}: exit {rc}, error does not mention {missing}: {text.strip()[-500:]!r}")
    log(f"{tag}: refused (exit {rc}): {text.strip().splitlines()[-1]}")


def test_consistency(tmp, a, qemu):
    append = ("ws=32M pattern=random rate=25000 report_ms=500" if a.guest == "dirtier"
              else "ws=16M report_ms=500")
    vmm = Qemu(tmp, qemu, a.guest, append, cpus=a.cpus)
    vmm.wait_socket()
    # Attach to a guest that runs, as an operator attaches to a VM in service: the
    # firmware's boot reprograms memory slots (PAM) and makes bulk kernel-mode stores
    # that jam this host's dirty rings (docs/kvm-host.md, docs/qemu.md).
    vmm.wait_line(r"^(dirtier|memtouch): ")
    primary, standby = tr.pair(tmp, vmm, "ring")
    primary.wait(lambda s: s["state"] == "protected", "the primary to be protected", timeout=90)
    rng = random.Random(a.seed)
    checks = sorted(rng.sample(range(20, a.epochs), 4))
    log(f"checking at epochs ~{checks} of {a.epochs}")
    for k, target in enumerate(checks):
        primary.wait(lambda s: s["last_committed"] >= target, f"epoch {target}", timeout=a.epochs * 0.2 + 60)
        tr.compare_at_freeze(tmp, primary, standby, a.guest, k)
    st = primary.wait(lambda s: s["last_committed"] >= a.epochs, f"{a.epochs} epochs",
                      timeout=a.epochs * 0.2 + 60)
    if a.guest == "dirtier":
        progressing(vmm, "after the checks")
    log(f"primary: {st}")
    log(f"standby: {standby.status()}")
    tr.stop_clean(primary, standby, vmm)
    log(f"PASS: QEMU, {a.guest}, {a.cpus} vCPU(s), {st['last_committed']} epochs, "
        f"pause p50 {st['pause_ns_p50'] / 1e6:.2f} ms p99 {st['pause_ns_p99'] / 1e6:.2f} ms")


def test_badinput(tmp, a, qemu):
    expect_refusal(tmp, qemu, "no-share", ["share=on", "memory-backend"],
                   memory=f"memory-backend-memfd,id=m0,size={RAM},share=off")
    expect_refusal(tmp, qemu, "no-ring", ["dirty-ring-size"], accel="kvm")
    # smm=on: with "auto" a host KVM without SMM would quietly give none. Such a
    # host makes QEMU itself refuse smm=on, which is fine too.
    expect_refusal(tmp, qemu, "smm", [("smm=off", "SMM", "System Management Mode")],
                   machine="pc,memory-backend=m0,smm=on")
    expect_refusal(tmp, qemu, "no-backend", ["memory-backend"], machine="pc,smm=off",
                   memory="memory-backend-ram,id=m0,size=16M")
    other = os.path.join(tmp, "second.sock")
    expect_refusal(tmp, qemu, "two-agents", ["only one"],
                   extra=["-device", f"dirtyrep-agent,path={other},name=u"])

    # A client that pauses the VM and vanishes (dr-harvester snapshot without
    # --resume exits with the VM paused): the agent resumes it.
    q = Qemu(tmp, qemu, "dirtier", "ws=8M rate=5000 report_ms=200")
    q.wait_socket()
    progressing(q, "before the client")
    for i in range(3):
        r = subprocess.run([ENV["DR_HARVESTER"], "snapshot", "--control", q.control,
                            "--state", os.path.join(tmp, "st"), "--ram", os.path.join(tmp, "ram")],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0 or "resumed=0" not in r.stdout:
            fail(f"dr-harvester snapshot: {r.returncode} {r.stdout} {r.stderr}")
        w = progressing(q, f"after client {i + 1} left mid-pause")
        log(f"client {i + 1} paused the VM and left: the guest goes on (writes={w})")
    if "gone" not in q.text():
        fail("QEMU did not log that the control client went away")
    # A second client while one is attached is refused; the first keeps the VM.
    q.stop()
    log("PASS: bad configurations refused with clear errors; the VM never stays paused")


def test_checks(tmp, a, qemu):
    base = [qemu, "-machine", "pc,memory-backend=m0,smm=off", "-object",
            f"memory-backend-memfd,id=m0,size=64M,share=on", "-m", "64M", "-display", "none", "-nodefaults",
            "-no-user-config", "-L", "/usr/share/seabios", "-L", "/usr/share/qemu", "-accel", "qtest"]
    r = subprocess.run([qemu, "-device", "help"], capture_output=True, text=True, timeout=60)
    if 'name "dirtyrep-agent"' not in r.stdout + r.stderr:
        fail(f"{qemu} has no dirtyrep-agent device")
    sock = os.path.join(tmp, "a.sock")
    cases = [
        ("qtest accelerator", ["-device", f"dirtyrep-agent,path={sock},name=t"], "needs KVM: -accel kvm"),
        ("two agents", ["-device", f"dirtyrep-agent,path={sock},name=t",
                        "-device", f"dirtyrep-agent,path={sock}2,name=u"], "only one per QEMU"),
        ("no path", ["-device", "dirtyrep-agent,name=t"], "path= (the control socket) is required"),
        ("no name", ["-device", f"dirtyrep-agent,path={sock}"], "name= (the VM's name in dirtyrepd) is required"),
        ("ready-fd alone", ["-device", f"dirtyrep-agent,path={sock},name=t,ready-fd=2"],
         "ready-fd= is only for restore="),
    ]
    for what, extra, expect in cases:
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=60)
        out = (r.stdout + r.stderr).strip()
        if r.returncode == 0 or expect not in out:
            fail(f"{what}: exit {r.returncode}, expected an error with {expect!r}, got {out[-400:]!r}")
        log(f"{what}: refused: {out.splitlines()[-1]}")
    if os.path.exists(sock):
        fail("a refused agent left its control socket behind")
    log("PASS: the device exists and refuses bad configurations")


def test_restore(tmp, a, qemu):
    """The failover path of QEMU: RAM as a replica holds it (each region at its
    memfd offset) plus the saved state, started with restore= on a
    memory-backend-file of that RAM; the guest continues."""
    q = Qemu(tmp, qemu, "dirtier", "ws=8M rate=5000 report_ms=200")
    q.wait_socket()
    progressing(q, "the primary")
    # The last progress line before the snapshot: the snapshot's guest wrote at least that much.
    _, w_before = writes_of(q)
    ram, state = os.path.join(tmp, "replica.ram"), os.path.join(tmp, "replica.state")
    r = subprocess.run([ENV["DR_HARVESTER"], "snapshot", "--control", q.control, "--state", state, "--ram", ram],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        fail(f"dr-harvester snapshot: {r.returncode} {r.stdout} {r.stderr}")
    log(r.stdout.strip())
    q.kill()  # the primary dies (the snapshot was its last committed epoch)
    os.truncate(ram, 256 << 20)
    n = Qemu(tmp, qemu, "dirtier", "ws=8M rate=5000 report_ms=200", tag="restored",
             memory=f"memory-backend-file,id=m0,size={RAM},mem-path={ram},share=on",
             agent_extra=f",restore={state}", extra=["-S"])
    n.wait_socket()
    n.wait_line(r"^dirtier: cpu=0 pass=\d+ writes=\d+ rate=\d+$", timeout=60)
    _, w_after = writes_of(n)
    if any(l.startswith("dirtier: cpu=0 ws_base") for l in n.lines()):
        fail("the restored guest booted again (start line on COM1)")
    if w_after <= w_before:
        fail(f"restored guest's writes {w_after} not above the primary's {w_before} before the snapshot")
    w2 = progressing(n, "the restored guest")
    if "device state restored" not in n.text():
        fail("QEMU did not report the restore")
    n.stop()
    log(f"PASS: restored from the snapshot: writes {w_before} -> {w_after} -> {w2}, no reboot")


def test_failover(tmp, a, qemu):
    import shutil
    if os.geteuid() != 0 or not shutil.which("redis-cli") or not shutil.which("ip"):
        log("SKIP: needs root, iproute2 and redis-cli")
        sys.exit(77)
    import drtest as dt

    dt.start_kv = kv_starter(qemu)  # setup_pair() starts the first primary's VM with it
    # Both hosts' standbys start QEMU on the replica; the template is the same for both.
    extra = failover_keys(qemu, tmp)
    dt.install_sigterm()
    try:
        dt.net_up()
        dt.write_fence(tmp)
        A, B = dt.setup_pair(tmp, extra)
        P, S = A, B
        times = []
        for k in range(a.trials):
            t = time.time()
            dt.failover_trial(tmp, k, P, S, f"k{k}", drain=drain_service_line)
            times.append(time.time() - t)
            # The promoted QEMU's output is in the log its dirtyrepd names ("output to
            # STATE_DIRECTORY/t.vmm.log"): it restored, it did not boot.
            logs = re.findall(r"output to (\S+\.vmm\.log)", S.daemon.text())
            if not logs:
                fail(f"trial {k}: the standby's dirtyrepd did not say where its QEMU's output goes")
            with open(logs[-1], errors="replace") as f:
                vmm_text = f.read()
            if "device state restored" not in vmm_text:
                fail(f"trial {k}: no 'device state restored' from the QEMU the standby started")
            dt.rejoin(tmp, P, S, extra)
            P, S = S, P
        log(f"{a.trials} failovers with QEMU, no acknowledged write lost; trial time mean "
            f"{sum(times) / len(times):.2f} s")
        dt.page_hash_check(tmp, P, S)
        dt.stop_all()
    except dt.Fail as e:
        for p in dt.LIVE:
            p.dump()
        dt.kill_all()  # with the process groups (fail() kills by PID only): a daemon's holds its QEMU
        fail(str(e))
    finally:
        dt.kill_all()
        dt.net_down()
    log("PASS: QEMU failed over and back with no acknowledged write lost")


def thread_cpu_s(pid, tid):
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_held_output(tmp, a, qemu):
    """Held output at its limit: the serial transmitter stays busy and QEMU offers the byte again on a
    timer. (A chardev watch, used before, fires at once on a writable backend: the main loop spun at a
    full CPU for as long as the limit held.)"""
    q = Qemu(tmp, qemu, "dirtier", "ws=4M rate=2000 report_ms=5", agent_extra=",chardev=serial0,output-limit=4K")
    q.wait_socket()
    q.wait_line(r"^dirtier: cpu=0 pass=")
    port = tr.free_port()
    primary = tr.Daemon(tmp, "primary", {"t": {"Role": "primary", "ControlSocket": q.control,
                                                "Peer": f"127.0.0.1:{port}", "EpochMs": "20", "Tracking": "ring"}})
    primary.wait(lambda s: s["state"] == "connecting", "the primary to attach (no standby yet)", timeout=60)
    # Output is held under epoch 1 until a standby commits: the console stops growing at the limit.
    end = time.time() + 20
    size = -1
    while time.time() < end:
        time.sleep(0.5)
        now = os.path.getsize(q.console)
        if now == size:
            break
        size = now
    else:
        fail("COM1 kept growing with no standby: its output is not held")
    held = q.lines()
    cpu0, t0 = thread_cpu_s(q.proc.pid, q.proc.pid), time.time()
    time.sleep(3.0)
    cpu1, t1 = thread_cpu_s(q.proc.pid, q.proc.pid), time.time()
    share = (cpu1 - cpu0) / (t1 - t0)
    log(f"held at the limit: COM1 stays at {size} bytes; QEMU's main thread used {share * 100:.1f}% of a CPU")
    if os.path.getsize(q.console) != size:
        fail("COM1 grew while its output was held at the limit")
    if share > 0.25:
        fail(f"QEMU's main loop spins while the output is held: {share * 100:.0f}% of a CPU")
    # A standby: its commits release the held output, and the guest's lines go on, whole.
    standby = tr.Daemon(tmp, "standby", {"t": {"Role": "standby", "Listen": f"127.0.0.1:{port}"}})
    primary.wait(lambda s: s["state"] == "protected", "the primary to be protected", timeout=90)
    _, w0 = writes_of(q, after=len(held))
    progressing(q, "after the standby released the held output")
    # (The last line may still be arriving.)
    bad = [line for line in q.lines()[:-1] if line and not re.match(r"^(dirtier: |\[|SeaBIOS|Booting|iPXE)", line)]
    if bad:
        fail(f"COM1 lines garbled across the limit: {bad[:3]}")
    tr.stop_clean(primary, standby, q)
    log(f"PASS: held output waited at its 4 KiB limit without spinning ({share * 100:.1f}% of a CPU), "
        f"and went on once a standby committed (writes={w0} after)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["consistency", "badinput", "restore", "failover", "checks", "held-output"])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--guest", default="dirtier", choices=["dirtier", "memtouch"])
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=500)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    a = ap.parse_args()
    if a.what != "checks" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        log("SKIP: no /dev/kvm")
        return 77
    log(f"seed {a.seed}")
    qemu = find_qemu()
    log(f"QEMU: {qemu}")
    return tr.in_tmp("dr-qemu-", globals()["test_" + a.what.replace("-", "_")], a, qemu)


if __name__ == "__main__":
    sys.exit(main())
