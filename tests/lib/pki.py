# SPDX-License-Identifier: GPL-2.0-or-later
"""Certificates for the TLS tests and benchmarks, made at test time with `openssl req` and
`openssl x509` in the test's temporary directory (no key is committed)."""
import os
import subprocess

from loopback import fail


def openssl(*args, cwd):
    c = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if c.returncode != 0:
        fail(f"openssl {' '.join(args)}: {c.stderr}")


class Pki:
    """Two CAs and leaf certificates (EC P-256, SAN = the name, client+server use)."""

    def __init__(self, tmp):
        self.dir = os.path.join(tmp, "pki")
        os.makedirs(self.dir)
        for ca in ("ca1", "ca2"):
            openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN=dirtyrep test {ca}",
                    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
                    cwd=self.dir)

    def leaf(self, name, ca="ca1"):
        d = self.dir
        ext = os.path.join(d, name + ".ext")
        with open(ext, "w") as f:
            f.write(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"
                    "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature\n")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext, cwd=d)
        os.chmod(os.path.join(d, f"{name}.key"), 0o600)
        return os.path.join(d, f"{name}.crt"), os.path.join(d, f"{name}.key")

    def ca(self, ca="ca1"):
        return os.path.join(self.dir, f"{ca}.crt")


def tls_keys(pki, name, ca="ca1", peer=None):
    crt, key = pki.leaf(name) if not os.path.exists(os.path.join(pki.dir, name + ".crt")) else (
        os.path.join(pki.dir, name + ".crt"), os.path.join(pki.dir, name + ".key"))
    k = {"TLS": "yes", "TLSCertificateFile": crt, "TLSKeyFile": key, "TLSCAFile": pki.ca(ca)}
    if peer:
        k["TLSPeerName"] = peer
    return k
