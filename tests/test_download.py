"""Downloads, tested against a real HTTP server on 127.0.0.1 (range requests, checksums, resume)."""
from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import randomize_, run_cli, tiny_config
from repa_probe import download as D
from repa_probe.errors import UserError
from repa_probe.models import SiT


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from the server's folder, honouring `Range: bytes=N-`; can drop a response half-way."""

    def do_GET(self):
        path = Path(self.server.folder) / self.path.lstrip("/").split("?")[0]
        self.server.requests.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        if start >= len(data) and start:
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.cut_after is not None:          # a connection that dies mid-file
            body, self.server.cut_after = body[:self.server.cut_after], None
            self.wfile.write(body)
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.folder, httpd.requests, httpd.cut_after = folder, [], None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("REPA_PROBE_MIRROR", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield httpd
    httpd.shutdown()


def test_resume_checksum_and_nothing_kept_on_mismatch(server, tmp_path):
    payload = np.random.default_rng(0).bytes(3_000_000)
    (server.folder / "blob.bin").write_bytes(payload)
    good = D.Remote("http://origin.invalid/blob.bin", "blob.bin", "a blob", sha256=hashlib.sha256(payload).hexdigest())
    server.cut_after = 1_000_000                          # the first attempt dies after 1 MB
    with pytest.raises(UserError, match="run again to resume"):
        D.fetch(good, tmp_path / "dl", quiet=True)
    part = tmp_path / "dl" / ".blob.bin.part"
    assert 0 < part.stat().st_size < len(payload) and not (tmp_path / "dl" / "blob.bin").exists()
    got = D.fetch(good, tmp_path / "dl", quiet=True)      # resumes with a range request
    assert got.read_bytes() == payload and not part.exists()
    assert server.requests[-1][1] == f"bytes={part_size(server)}-"

    bad = D.Remote("http://origin.invalid/blob.bin", "blob.bin", "a blob", sha256="0" * 64)
    with pytest.raises(UserError, match="does not match its published checksum: nothing was kept"):
        D.fetch(bad, tmp_path / "other", quiet=True)
    assert list((tmp_path / "other").iterdir()) == []
    with pytest.raises(UserError, match="HTTP 404"):
        D.fetch(D.Remote("http://origin.invalid/x", "missing.bin", "x"), tmp_path / "other", quiet=True)


def part_size(server) -> int:
    return int(server.requests[-1][1].split("=")[1].rstrip("-"))


def test_unpinned_file_is_recorded_at_first_download_and_checked_after(server, tmp_path):
    (server.folder / "w.pth").write_bytes(b"weights v1")
    remote = D.Remote("http://origin.invalid/w.pth", "w.pth", "weights")
    path = D.fetch(remote, tmp_path, quiet=True)
    assert (tmp_path / "w.pth.sha256").read_text().split()[0] == hashlib.sha256(b"weights v1").hexdigest()
    path.write_bytes(b"weights v2")                       # changed on disk afterwards
    with pytest.raises(UserError, match="damaged"):
        D.fetch(remote, tmp_path, quiet=True)


def test_official_checkpoint_by_name_through_the_command_line(server, tmp_path, cifar_dir):
    """`repa-probe inspect`/`analyze` on an official name: refused without --download, fetched with it."""
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    torch.save(randomize_(SiT(cfg)).state_dict(), server.folder / "SiT-XL-2-256x256.pt")
    env = {"REPA_PROBE_MIRROR": server_url(server), "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["analyze", "SiT-XL-2-256x256.pt", "--data", cifar_dir / "test", "--n", 30, "--t", 0, "--bootstrap", 0,
            "--null", 0, "--no-baselines", "--heads", 4, "--quiet", "--out", tmp_path / "r", "--cache", tmp_path / "c"]
    r = run_cli(*args, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "add --download" in r.stderr and not server.requests
    r = run_cli(*args, "--download", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "downloading SiT-XL/2" in r.stderr and (tmp_path / "cache" / "repa-probe" / "checkpoints" /
                                                   "SiT-XL-2-256x256.pt").is_file()
    assert (tmp_path / "r" / "report.pdf").is_file()


def server_url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def fake_cifar(folder: Path, per_batch: int = 4) -> bytes:
    """A CIFAR-10 python archive in the real layout (pickled dicts of uint8 arrays), tiny."""
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            add(name, {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                       "labels": list(rng.integers(0, 10, per_batch).tolist())})
    (folder / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    return buf.getvalue()


def test_cifar10_for_the_demo_is_fetched_checked_and_converted_once(server, tmp_path):
    archive = fake_cifar(server.folder)
    with pytest.raises(UserError, match="published checksum"):      # the real md5 refuses the fake archive
        D.cifar10(quiet=True)
    assert not (tmp_path / "cache" / "repa-probe" / "data" / "cifar10").exists()
    remote = D.Remote(D.CIFAR10.url, D.CIFAR10.filename, "CIFAR-10", md5=hashlib.md5(archive).hexdigest())
    root = D.cifar10(quiet=True, remote=remote)
    assert len(list((root / "train").glob("*/*.png"))) == 20 and len(list((root / "test").glob("*/*.png"))) == 4
    from PIL import Image
    assert Image.open(next((root / "test").glob("*/*.png"))).size == (32, 32)
    requests = len(server.requests)
    assert D.cifar10(quiet=True, remote=remote) == root and len(server.requests) == requests


def test_a_cifar_batch_that_would_run_code_is_refused(server, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = pickle.dumps({"label_names": Evil()})
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (server.folder / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    remote = D.Remote(D.CIFAR10.url, D.CIFAR10.filename, "CIFAR-10", md5=hashlib.md5(buf.getvalue()).hexdigest())
    with pytest.raises(pickle.UnpicklingError, match="refusing builtins.print"):
        D.cifar10(quiet=True, remote=remote)


def test_encoder_weights_by_name_come_from_their_official_address(server, tmp_path, monkeypatch):
    """An encoder whose weights are missing locally: refused without download, fetched into the weights folder
    with it, and the features equal those of the served weights."""
    import timm
    from repa_probe import encoders as E
    monkeypatch.setenv("REPA_PROBE_WEIGHTS", str(tmp_path / "weights"))
    spec = E.EncoderSpec(E.DINOV2, "test_vit", ("served_vit.pth",), weights_url="http://origin.invalid/served_vit.pth")
    E.register_encoder("served-vit", spec)
    try:
        torch.manual_seed(0)
        reference = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
        torch.save(reference.state_dict(), server.folder / "served_vit.pth")
        with pytest.raises(UserError, match="needs weights"):
            E.load_encoder("served-vit")
        enc = E.load_encoder("served-vit", pretrained_download=True)
        assert (tmp_path / "weights" / "served_vit.pth").is_file() and enc.source == "file"
        images = torch.rand(2, 3, 64, 64)
        again = E.load_encoder("served-vit=" + str(server.folder / "served_vit.pth"))
        torch.testing.assert_close(enc.encode(images, grid=4)[1], again.encode(images, grid=4)[1], rtol=0, atol=0)
    finally:
        E.ENCODERS.pop("served-vit")
