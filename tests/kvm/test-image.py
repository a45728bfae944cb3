#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Checkpoint images of a running dirtyrep-vmm (issue 6).

  chain  memtouch: a full image and three incrementals taken by dr-imager
         while the guest runs; image verify/show; the checker passes on
         every image's RAM; dirtyrep-vmm --restore-image on the last one
         continues past the recorded generation and its RAM passes the
         checker; a flipped byte in any file of the chain is named by
         `image verify` and by the restore; a missing parent is a clear
         error.
  size   dirtier with a 64 MiB hot set in a 1 GiB guest: an incremental
         image stores at most the hot set plus metadata.
  kill   dr-imager SIGKILLed in the middle of writing an image: no image
         is left at the target, the VM runs on.

Exit 0 pass, 1 fail, 77 skip (no /dev/kvm).
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ENV = os.environ
LIVE = []


def log(*a):
    print(*a, flush=True)


def fail(msg):
    log("FAIL:", msg)
    for v in LIVE:
        v.kill()
    sys.exit(1)


class Vmm:
    """One dirtyrep-vmm process we started (and only we stop, by PID)."""

    def __init__(self, tmp, tag, args):
        self.console = os.path.join(tmp, f"console-{tag}.log")
        self.errlog = os.path.join(tmp, f"vmm-{tag}.err")
        self.control = os.path.join(tmp, f"ctl-{tag}.sock")
        cmd = [ENV["DR_VMM"], "--name", "imgvm", "--control", self.control, "--console", self.console] + args
        log("+", " ".join(cmd))
        self.err = open(self.errlog, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err)
        LIVE.append(self)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def text(self):
        try:
            with open(self.console, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stderr(self):
        with open(self.errlog, errors="replace") as f:
            return f.read()

    def wait_for(self, pattern, timeout=60.0, count=1, after=0):
        rx = re.compile(pattern, re.M)
        end = time.time() + timeout
        while time.time() < end:
            ms = list(rx.finditer(self.text(), after))
            if len(ms) >= count:
                return ms
            if self.proc.poll() is not None:
                fail(f"VMM exited with {self.proc.returncode} while waiting for /{pattern}/:\n"
                     f"{self.stderr()[-2000:]}\nconsole:\n{self.text()[-2000:]}")
            time.sleep(0.05)
        fail(f"timed out waiting for /{pattern}/ x{count}; console:\n{self.text()[-2000:]}")

    def wait_socket(self, timeout=20.0):
        end = time.time() + timeout
        while time.time() < end:
            if os.path.exists(self.control):
                return
            if self.proc.poll() is not None:
                fail(f"VMM exited early: {self.stderr()[-2000:]}")
            time.sleep(0.05)
        fail("control socket never appeared")

    def stop(self):
        if self in LIVE:
            LIVE.remove(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                fail("VMM did not stop on SIGTERM")
        self.err.close()
        return self.proc.returncode


def run(cmd, timeout=180, check=True):
    log("+", " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    sys.stdout.write(p.stdout)
    sys.stdout.write(p.stderr)
    if check and p.returncode != 0:
        fail(f"{cmd[0]} exited {p.returncode}")
    return p


def imagectl(*args, check=True):
    return run([ENV["DR_IMAGECTL"], "image"] + list(args), check=check)


def imager(*args, check=True):
    return run([ENV["DR_IMAGER"]] + list(args), check=check)


def image_lines(out):
    res = {}
    for m in re.finditer(r"^imager: image=(\S+) (.*)$", out, re.M):
        res[os.path.basename(m.group(1))] = {k: (int(v) if v.isdigit() else v)
                                             for k, v in (kv.split("=") for kv in m.group(2).split())}
    return res


def memcheck(ram):
    c = run([ENV["DR_MEMCHECK"], ram], check=False)
    if c.returncode != 0:
        fail(f"memtouch checker failed on {ram}")
    return [int(g) for g in re.search(r"gens=([\d,]+)", c.stdout).group(1).split(",")]


def du(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def flip(path, off):
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x01]))


def test_chain(tmp):
    vmm = Vmm(tmp, "m", ["--kernel", ENV["DR_GUEST_MEMTOUCH"], "--cpus", "2", "--memory", "256M",
                         "--append", "ws=16M report_ms=200"])
    vmm.wait_for(r"^memtouch: cpu=1 gen=\d+", count=2)
    vmm.wait_socket()
    imgs = os.path.join(tmp, "images")
    os.mkdir(imgs)
    p = imager("run", "--control", vmm.control, "--name", "imgvm", "--dir", imgs, "--images", "4",
               "--interval-ms", "700", "--compress")
    st = image_lines(p.stdout)
    if sorted(st) != ["img0", "img1", "img2", "img3"]:
        fail(f"expected four images, got {sorted(st)}")
    if st["img0"]["kind"] != "full" or any(st[f"img{i}"]["kind"] != "incremental" for i in (1, 2, 3)):
        fail("img0 must be full and img1..3 incremental")
    for i in (1, 2, 3):
        if st[f"img{i}"]["parent"] == 0 or st[f"img{i}"]["present"] == 0:
            fail(f"img{i} should store the pages memtouch dirtied and refer to its parent for the rest")
    log("pause per image (us):", [st[f"img{i}"]["pause_us"] for i in range(4)])
    last = os.path.join(imgs, "img3")

    v = imagectl("verify", last)
    if "4 image(s)" not in v.stdout:
        fail("verify did not check the whole chain of 4")
    js = json.loads(imagectl("show", "--json", "--runs", last).stdout)
    if js["kind"] != "incremental" or js["depth"] != 3 or len(js["chain"]) != 4 or js["vcpus"] != 2:
        fail(f"image show --json: unexpected {js['kind']} depth {js['depth']} chain {len(js['chain'])}")
    if js["parent"]["path"] != "../img2" or js["chain_error"] is not None:
        fail(f"parent reference: {js['parent']}")
    if sum(r["pages"] for r in js["pagemap"]["list"]) != js["total_pages"]:
        fail("page map runs do not cover the RAM")
    text = imagectl("show", os.path.join(imgs, "img0")).stdout
    for want in ("kind:      full (depth 0)", "VM:        imgvm", "Page map:", "vCPU 1:", "Chain:"):
        if want not in text:
            fail(f"image show lacks '{want}'")

    # The RAM of every image is a consistent memtouch snapshot, and generations only grow.
    prev = None
    for i in range(4):
        ram = os.path.join(tmp, f"ram{i}")
        imager("materialize", os.path.join(imgs, f"img{i}"), ram)
        gens = memcheck(ram)
        log(f"img{i}: gens={gens}")
        if prev and any(g < q for g, q in zip(gens, prev)):
            fail(f"img{i} generations went backwards: {prev} -> {gens}")
        if prev and gens == prev:
            fail(f"img{i} shows no progress over img{i-1}: memtouch did not run between images?")
        prev = gens
        if i < 3:
            os.unlink(ram)
    saved = prev
    vmm.stop()

    # Restore from the last incremental image: the chain is followed, the guest continues.
    r = Vmm(tmp, "r", ["--restore-image", last])
    r.wait_socket()
    # Whole lines only: the console is written byte by byte.
    ms = r.wait_for(r"^memtouch: cpu=0 gen=(\d+)\n", count=2)
    first, later = int(ms[0].group(1)), int(ms[-1].group(1))
    log(f"checkpoint cpu0 gen {saved[0]}; after restore {first} then {later}")
    if "memtouch: cpu=0 data_base" in r.text():
        fail("the restored guest booted again instead of continuing")
    if first < saved[0] or later <= first:
        fail(f"generation did not continue past the checkpoint ({saved[0]} -> {first} -> {later}); "
             f"console:\n{r.text()[-3000:]}")
    if "restored from image" not in r.stderr():
        fail("the VMM did not report restoring from the image")
    snap = os.path.join(tmp, "restored.ram")
    run([ENV["DR_HARVESTER"], "snapshot", "--control", r.control, "--state", os.path.join(tmp, "st"),
         "--ram", snap, "--resume"])
    gens = memcheck(snap)
    if any(g < s for g, s in zip(gens, saved)):
        fail(f"restored VM's RAM is behind the checkpoint: {saved} -> {gens}")
    if r.stop() != 0:
        fail("restored VMM did not exit 0 on SIGTERM")
    log(f"PASS: restored from a chain of 4, checker ok, generations {saved} -> {gens}")

    # A flipped byte in any file of the newest image or of a parent: verify and restore name the file.
    for img in ("img3", "img1"):
        for name in ("inventory.img", "state.img", "pagemap.img", "pages.img"):
            f = os.path.join(imgs, img, name)
            size = os.path.getsize(f)
            off = random.choice([5, 40, size // 2, size - 1] if name != "pages.img" else [20, 4096, size - 1])
            flip(f, off)
            v = imagectl("verify", last, check=False)
            rel = f"{img}/{name}"
            if v.returncode == 0 or rel not in v.stderr:
                fail(f"image verify missed a flipped byte at {rel}+{off} (rc {v.returncode}): {v.stderr}")
            p = run([ENV["DR_VMM"], "--restore-image", last, "--name", "bad", "--control",
                     os.path.join(tmp, "bad.sock"), "--console", os.path.join(tmp, "bad.log")], check=False,
                    timeout=60)
            if p.returncode != 1 or rel not in p.stderr:
                fail(f"restore missed a flipped byte at {rel}+{off} (rc {p.returncode})")
            flip(f, off)
            log(f"flipped byte at {rel}+{off}: named by verify and by restore")
    imagectl("verify", last)

    # A missing parent.
    os.rename(os.path.join(imgs, "img1"), os.path.join(tmp, "img1-away"))
    v = imagectl("verify", last, check=False)
    if v.returncode != 1 or "parent image" not in v.stderr or "missing" not in v.stderr:
        fail(f"missing parent not reported clearly: {v.stderr}")
    p = run([ENV["DR_VMM"], "--restore-image", last, "--control", os.path.join(tmp, "bad.sock"),
             "--console", os.path.join(tmp, "bad.log")], check=False, timeout=60)
    if p.returncode != 1 or "missing" not in p.stderr:
        fail("restore with a missing parent did not fail clearly")
    log("PASS: flipped bytes and a missing parent detected")


HOT = 64 << 20


def test_size(tmp):
    vmm = Vmm(tmp, "s", ["--kernel", ENV["DR_GUEST_DIRTIER"], "--cpus", "1", "--memory", "1G",
                         "--append", "ws=64M pattern=seq rate=0 report_ms=500"])
    vmm.wait_for(r"^dirtier: cpu=0 pass=\d+", count=1)
    vmm.wait_socket()
    imgs = os.path.join(tmp, "images")
    os.mkdir(imgs)
    # Raw page data, so the sizes are what was stored, not what LZ4 made of it.
    p = imager("run", "--control", vmm.control, "--name", "imgvm", "--dir", imgs, "--images", "3",
               "--interval-ms", "2500")
    st = image_lines(p.stdout)
    vmm.stop()
    full = du(os.path.join(imgs, "img0"))
    log(f"full image: {full} bytes; RAM 1 GiB")
    for i in (1, 2):
        d = os.path.join(imgs, f"img{i}")
        size = du(d)
        s = st[f"img{i}"]
        meta = size - s["stored_bytes"]
        log(f"img{i}: {size} bytes on disk ({s['present']} present pages, {s['stored_bytes']} data bytes, "
            f"{meta} bytes metadata+state), pause {s['pause_us']} us")
        # The dirtier rewrote its whole hot set between images (else the bound proves nothing) ...
        if s["present"] < 0.9 * HOT // 4096:
            fail(f"img{i} stores only {s['present']} pages: the dirtier did not cover its 64 MiB hot set")
        # ... and the image holds the hot set plus at most a few guest-internal pages (stacks, counters),
        # plus metadata (page map, state, headers) bounded well below a MiB.
        if s["stored_bytes"] > HOT + 16 * 4096:
            fail(f"img{i} stores {s['stored_bytes']} bytes of pages, more than the 64 MiB hot set")
        if meta > 256 << 10:
            fail(f"img{i} has {meta} bytes of metadata")
        if size > HOT + 16 * 4096 + (256 << 10):
            fail(f"img{i} is {size} bytes, more than hot set + metadata")
    imagectl("verify", os.path.join(imgs, "img2"))
    log("PASS: incremental images hold the 64 MiB hot set plus metadata only")


def test_kill(tmp):
    # 512 MiB of stamped pages makes a full image large enough to kill mid-write.
    vmm = Vmm(tmp, "k", ["--kernel", ENV["DR_GUEST_DIRTIER"], "--cpus", "1", "--memory", "1G",
                         "--append", "ws=512M pattern=seq rate=0 report_ms=500"])
    vmm.wait_for(r"^dirtier: cpu=0 pass=[1-9]\d*", count=1)
    vmm.wait_socket()
    imgs = os.path.join(tmp, "images")
    os.mkdir(imgs)
    killed_mid_write = 0
    for round in range(4):
        d = os.path.join(imgs, f"k{round}")
        os.mkdir(d)
        cmd = [ENV["DR_IMAGER"], "run", "--control", vmm.control, "--name", "imgvm", "--dir", d, "--images", "1"]
        log("+", " ".join(cmd))
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        if not line.startswith("imager: writing"):
            p.kill()
            p.wait()
            fail(f"imager did not start writing: {line!r} {p.stderr.read()}")
        time.sleep(random.uniform(0.0, 0.25) if round else 0.0)
        still_running = p.poll() is None
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()
        target = os.path.join(d, "img0")
        left = sorted(os.listdir(d))
        log(f"round {round}: killed {'while writing' if still_running else 'after it finished'}; left {left}")
        if still_running:
            killed_mid_write += 1
            if os.path.exists(target):
                # Only possible if it had renamed already: then it must be whole.
                imagectl("verify", target)
            else:
                v = imagectl("verify", target, check=False)
                if v.returncode == 0:
                    fail("verify accepted a missing image")
            for t in left:
                if t != "img0":
                    # A leftover temporary directory is not at the target and never looks like an image.
                    if not t.startswith(".img0.tmp-"):
                        fail(f"unexpected leftover {t}")
        # The VM runs on: the agent resumed it when the imager died.
        before = len(vmm.text())
        vmm.wait_for(r"^dirtier: cpu=0 pass=\d+", after=before, timeout=30)
    if killed_mid_write == 0:
        fail("never managed to kill the imager mid-write")
    # And a checkpoint that is not interrupted completes and verifies.
    d = os.path.join(imgs, "whole")
    os.mkdir(d)
    imager("run", "--control", vmm.control, "--name", "imgvm", "--dir", d, "--images", "1")
    imagectl("verify", os.path.join(d, "img0"))
    vmm.stop()
    log(f"PASS: {killed_mid_write} checkpoints killed mid-write left no valid-looking image")


def main():
    if not os.path.exists("/dev/kvm"):
        print("SKIP: /dev/kvm missing")
        sys.exit(77)
    for k in ("DR_VMM", "DR_IMAGER", "DR_IMAGECTL", "DR_GUEST_MEMTOUCH", "DR_MEMCHECK", "DR_HARVESTER"):
        if k not in ENV:
            fail(f"{k} not set: not built")
    which = sys.argv[1]
    tmp = tempfile.mkdtemp(prefix="dr-image-", dir=os.environ.get("DR_IMAGE_TMP", "/var/tmp"))
    try:
        {"chain": test_chain, "size": test_size, "kill": test_kill}[which](tmp)
    finally:
        for v in list(LIVE):
            v.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
