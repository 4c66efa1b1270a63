"""Certificates, keys and kubeconfigs for the test control plane, made with the `openssl` command.

EC P-256 keys keep generation fast (a few milliseconds each); every component gets its own client
certificate so RBAC sees the same identities as in a real cluster.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

# The apiserver's ClusterIP in --service-cluster-ip-range 10.0.0.0/24, which its certificate must name.
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class CertPair:
    """A PEM certificate and its private key."""

    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def _ec_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=path.parent)


@dataclass(frozen=True)
class Pki:
    """All credentials of one test cluster, under `root`."""

    root: Path
    ca: CertPair
    apiserver: CertPair
    service_account_key: Path
    service_account_pub: Path

    @classmethod
    def create(cls, root: Path) -> Pki:
        """Make a fresh CA, the apiserver's serving certificate and the service-account signing key."""
        root.mkdir(parents=True, exist_ok=True)
        ca = CertPair(root / "ca.crt", root / "ca.key")
        _ec_key(ca.key)
        _openssl(
            "req", "-x509", "-new", "-key", str(ca.key), "-out", str(ca.cert), "-days", "2",
            "-subj", "/CN=dsv4-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            cwd=root,
        )  # fmt: skip
        pki = cls(
            root=root,
            ca=ca,
            apiserver=CertPair(root / "apiserver.crt", root / "apiserver.key"),
            service_account_key=root / "sa.key",
            service_account_pub=root / "sa.pub",
        )
        sans = ",".join(
            [
                "IP:127.0.0.1",
                f"IP:{KUBERNETES_SERVICE_IP}",
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
            ]
        )
        pki._sign(pki.apiserver, "/CN=kube-apiserver", "serverAuth", sans)
        _ec_key(pki.service_account_key)
        _openssl("pkey", "-in", str(pki.service_account_key), "-pubout", "-out", str(pki.service_account_pub), cwd=root)
        return pki

    def client(self, name: str, user: str, groups: tuple[str, ...] = ()) -> CertPair:
        """A client certificate for `user` in `groups` (RBAC reads CN as the user, O as the groups)."""
        pair = CertPair(self.root / f"{name}.crt", self.root / f"{name}.key")
        subject = "".join(f"/O={g}" for g in groups) + f"/CN={user}"
        self._sign(pair, subject, "clientAuth")
        return pair

    def server(self, name: str, sans: str = "IP:127.0.0.1,DNS:localhost") -> CertPair:
        """A serving certificate signed by the cluster CA (for webhooks the API server calls on loopback)."""
        pair = CertPair(self.root / f"{name}.crt", self.root / f"{name}.key")
        self._sign(pair, f"/CN={name}", "serverAuth", sans)
        return pair

    def _sign(self, pair: CertPair, subject: str, usage: str, sans: str | None = None) -> None:
        _ec_key(pair.key)
        csr = pair.cert.with_suffix(".csr")
        _openssl("req", "-new", "-key", str(pair.key), "-out", str(csr), "-subj", subject, cwd=self.root)
        ext = self.root / f"{pair.cert.stem}.ext"
        lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature",
            f"extendedKeyUsage={usage}",
        ]
        if sans:
            lines.append(f"subjectAltName={sans}")
        ext.write_text("\n".join(lines) + "\n")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca.cert), "-CAkey", str(self.ca.key),
            "-CAcreateserial", "-out", str(pair.cert), "-days", "2", "-extfile", str(ext),
            cwd=self.root,
        )  # fmt: skip


def write_kubeconfig(path: Path, server: str, ca: Path, client: CertPair, user: str) -> Path:
    """Write a one-context kubeconfig for `user` that trusts `ca`; returns `path`."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "dsv4-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(client.cert), "client-key": str(client.key)}}],
        "contexts": [{"name": "dsv4-test", "context": {"cluster": "dsv4-test", "user": user}}],
        "current-context": "dsv4-test",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
