"""Remote profiling against a real OpenSSH server on 127.0.0.1 (throwaway host and client keys,
a non-default port, its own sshd_config), with a device-side Python venv that has onnxruntime and
numpy but not edgesmith: the agent must be self-contained.

Needs Debian's openssh-server (/usr/sbin/sshd); skipped with that reason where it is absent.
"""

from __future__ import annotations

import ast
import getpass
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edgesmith.errors import BadInput
from edgesmith.profiling import Profile
from edgesmith.profiling.remote import profile_remote
from edgesmith.profiling.ssh import AGENT_PATH, RemoteDevice
from edgesmith.targets import Target
from edgesmith.tensorrt.trtexec import trtexec_build_argv, trtexec_run_argv

SSHD = Path("/usr/sbin/sshd")
REPO = Path(__file__).resolve().parents[1]
EDGESMITH = Path(sys.executable).with_name("edgesmith")

needs_sshd = pytest.mark.skipif(not SSHD.exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
                                reason="needs OpenSSH: apt-get install -y openssh-server openssh-client")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgesmith-test", "-f", str(path)],
                   check=True)
    return (path.with_suffix(".pub") if path.suffix else Path(f"{path}.pub")).read_text().strip()


def _wait_port(port: int, proc: subprocess.Popen, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {proc.stderr.read().decode(errors='replace') if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port}")


def _client_config(path: Path, *, port: int, key: Path, known_hosts: Path) -> Path:
    path.write_text(
        "Host device\n"
        "  HostName 127.0.0.1\n"
        f"  Port {port}\n"
        f"  User {getpass.getuser()}\n"
        f"  IdentityFile {key}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known_hosts}\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  LogLevel ERROR\n")
    return path


class Loopback:
    """What the tests need to know about the running device."""

    def __init__(self, root: Path, port: int, config: Path, python: Path, home: Path, key: Path, host_pub: str):
        self.root, self.port, self.config, self.python, self.home = root, port, config, python, home
        self.key, self.host_pub = key, host_pub

    def target(self, name: str = "loopback", **changes) -> Target:
        values = dict(name=name, runtime="onnxruntime", provider="cpu", threads=1, host="device",
                      python=str(self.python), ssh_config=str(self.config), cache_dir=str(self.root / "device-cache"),
                      connect_timeout_s=5, timeout_s=120)
        values.update(changes)
        return Target(**values)


@pytest.fixture(scope="session")
def device_python(tmp_path_factory) -> Path:
    """A separate venv with onnxruntime and numpy, and no edgesmith (pip from PyPI, ~20 s)."""
    folder = tmp_path_factory.mktemp("device-venv")
    base = shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "onnxruntime", "numpy"], capture_output=True, text=True)
    assert proc.returncode == 0, f"cannot install onnxruntime into the device venv (pip): {proc.stderr.strip()[-300:]}"
    check = subprocess.run([str(python), "-c", "import edgesmith"], capture_output=True)
    assert check.returncode != 0, "the device venv must not have edgesmith"
    return python


@pytest.fixture(scope="session")
def loopback(tmp_path_factory, device_python) -> Loopback:
    # every test that uses this fixture carries @needs_sshd, which skips it where OpenSSH is missing
    root = tmp_path_factory.mktemp("ssh")
    host_key, client_key = root / "host_key", root / "client_key"
    host_pub = _keygen(host_key)
    client_pub = _keygen(client_key)
    (root / "authorized_keys").write_text(client_pub + "\n")
    port = _free_port()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_pub.split()[:2])}\n")
    home = root / "device-home"
    home.mkdir()
    sshd_config = root / "sshd_config"
    sshd_config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {root / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        f"PidFile {root / 'sshd.pid'}\nSubsystem sftp internal-sftp\n"
        # an empty HOME keeps the login's shell start-up files out; python3 on PATH is the device venv's
        f"SetEnv HOME={home} PATH={device_python.parent}:/usr/local/bin:/usr/bin:/bin\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(sshd_config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
        config = _client_config(root / "ssh_config", port=port, key=client_key, known_hosts=root / "known_hosts")
        yield Loopback(root, port, config, device_python, home, client_key, host_pub)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, minilm_tokenizer):
    """A tiny BertModel (hidden 32, 2 layers) exported with torch.onnx, as an OnnxModel artifact folder."""
    return make_tiny_onnx(tmp_path_factory.mktemp("tiny-onnx") / "tiny-bert-onnx", minilm_tokenizer)


def make_tiny_onnx(folder: Path, tokenizer, *, seed: int = 0, intermediate: int = 64):
    from transformers import BertConfig, BertModel

    from edgesmith.artifacts import OnnxModel, load

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=intermediate, max_position_embeddings=128,
                                 attn_implementation="eager")).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    folder.mkdir(parents=True)
    ids = torch.ones(1, 16, dtype=torch.long)
    torch.onnx.export(Encoder(), (ids, torch.ones_like(ids)), str(folder / "model.onnx"), dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                    "last_hidden_state": {0: "batch", 1: "seq"}}, opset_version=17)
    tokenizer.save_pretrained(folder)
    OnnxModel(task="feature-extraction", name=folder.name, folder=folder).save(folder)
    return load(folder)


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob(".partial-*")] if root.exists() else []


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The agent stands alone
# ---------------------------------------------------------------------------------------------


def test_agent_imports_only_the_standard_library_and_the_runtime():
    tree = ast.parse(AGENT_PATH.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add((node.module or "").split(".")[0])
    assert "edgesmith" not in modules
    assert modules - set(sys.stdlib_module_names) - {"__future__"} <= {"numpy", "onnxruntime", "llama_cpp"}


def test_trtexec_command_lines():
    build = trtexec_build_argv("/usr/src/tensorrt/bin/trtexec", "c/artifacts/h/model.onnx", "c/engines/k/model.engine",
                               input_names=["input_ids", "attention_mask"], batch=8, seq=128, precision="int8",
                               workspace_mib=2048, timing_cache="c/engines/timing.cache")
    assert build[0] == "/usr/src/tensorrt/bin/trtexec"
    assert "--onnx=c/artifacts/h/model.onnx" in build and "--saveEngine=c/engines/k/model.engine" in build
    for flag in ("--minShapes", "--optShapes", "--maxShapes"):
        assert f"{flag}=input_ids:8x128,attention_mask:8x128" in build
    assert {"--int8", "--fp16", "--skipInference", "--memPoolSize=workspace:2048",
            "--timingCacheFile=c/engines/timing.cache"} <= set(build)
    fp32 = trtexec_build_argv("trtexec", "m.onnx", "e.engine", input_names=["input_ids"], batch=1, seq=64,
                              precision="fp32")
    assert "--fp16" not in fp32 and "--int8" not in fp32
    with pytest.raises(BadInput):
        trtexec_build_argv("trtexec", "m.onnx", "e.engine", input_names=["x"], batch=1, seq=8, precision="fp8")
    run = trtexec_run_argv("trtexec", "e.engine", input_names=["input_ids", "attention_mask"], batch=1, seq=128,
                           inputs_dir="w", warmup_ms=200, iterations=50, duration_s=0, times_path="w/times.json",
                           profile_path="w/profile.json")
    assert {"--loadEngine=e.engine", "--shapes=input_ids:1x128,attention_mask:1x128", "--warmUp=200",
            "--iterations=50", "--duration=0", "--exportTimes=w/times.json", "--exportProfile=w/profile.json",
            "--separateProfileRun", "--loadInputs=input_ids:w/input_ids.bin,attention_mask:w/attention_mask.bin"
            } <= set(run)


def test_our_ssh_options_come_first():
    argv = RemoteDevice("device").argv("echo hi")
    assert argv[argv.index("--") + 1] == "device" and argv[-1].endswith("; echo hi")
    assert "BatchMode=yes" in argv and "StrictHostKeyChecking=yes" in argv
    # ssh keeps the first value it reads: a target's options cannot turn host-key checking off
    hostile = RemoteDevice("device", ssh_options=["StrictHostKeyChecking=no"]).argv("true")
    assert hostile.index("StrictHostKeyChecking=yes") < hostile.index("StrictHostKeyChecking=no")


@needs_sshd
def test_remote_shell_arguments_are_quoted(loopback, tmp_path):
    hostile = tmp_path / "cache dir $(touch PWNED) `touch PWNED2`; touch PWNED3"
    device = RemoteDevice.from_target(loopback.target(cache_dir=str(hostile)))
    small = tmp_path / "x.txt"
    small.write_text("hello")
    try:
        assert device.put_folder({"x.txt": small}, device.remote_path("a b", "it's")) is True
        assert device.present([device.remote_path("a b", "it's", "x.txt")]) == {
            device.remote_path("a b", "it's", "x.txt"): True}
    finally:
        device.close()
    assert (hostile / "a b" / "it's" / "x.txt").read_text() == "hello"
    assert not any(loopback.home.glob("PWNED*")) and not any(tmp_path.glob("PWNED*"))


# ---------------------------------------------------------------------------------------------
# Through a real sshd
# ---------------------------------------------------------------------------------------------


@needs_sshd
def test_profile_through_ssh_then_reuse_the_device_cache(loopback, tiny_onnx, tmp_path):
    target = loopback.target(cache_dir=str(tmp_path / "cache"))
    first = profile_remote(tiny_onnx, target, batch=1, seq=16, warmup=2, iterations=20, per_op=True,
                           per_op_runs=3, keep_connection=False)
    assert isinstance(first, Profile) and first.kind == "measured"
    assert first.target == "loopback"
    assert first.stats.n == 20 and len(first.latencies_ms) == 20 and first.stats.p50 > 0
    assert first.runtime.providers == ["CPUExecutionProvider"]
    remote = first.runtime.options["remote"]
    assert remote["artifact_copied"] is True and remote["destination"] == "device"
    env = first.environment
    assert env.uname and env.host and env.memory_mb and env.memory_mb > 0 and env.cores
    assert env.libraries.get("onnxruntime") and "edgesmith" not in env.libraries  # the device venv's, not ours
    assert env.threads == 1
    assert first.per_op and any(op.op_type == "MatMul" for op in first.per_op)
    # the artifact sits in the device cache under its hash, byte for byte
    cached = tmp_path / "cache" / "artifacts" / first.artifact.hash[:32] / "model.onnx"
    assert _sha(cached) == _sha(tiny_onnx.path)
    mtime = cached.stat().st_mtime_ns
    assert Profile.load(first.save(tmp_path / "remote.json")) == first

    second = profile_remote(tiny_onnx, target, batch=1, seq=16, warmup=1, iterations=8, keep_connection=False)
    assert second.runtime.options["remote"]["artifact_copied"] is False
    assert cached.stat().st_mtime_ns == mtime
    assert second.per_op is None and second.stats.n == 8
    assert not _partials(tmp_path / "cache")


@needs_sshd
def test_unknown_host_key_is_refused(loopback, tiny_onnx, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    config = _client_config(tmp_path / "config", port=loopback.port, key=loopback.key, known_hosts=empty)
    target = loopback.target(ssh_config=str(config), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(BadInput, match="host key is not known"):
        profile_remote(tiny_onnx, target, iterations=5, keep_connection=False)
    assert empty.read_text() == ""  # never accepted, never written
    assert not (tmp_path / "cache").exists()


@needs_sshd
def test_wrong_client_key_is_refused(loopback, tiny_onnx, tmp_path):
    other = tmp_path / "other_key"
    _keygen(other)
    config = _client_config(tmp_path / "config", port=loopback.port, key=other,
                            known_hosts=loopback.root / "known_hosts")
    target = loopback.target(ssh_config=str(config), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(BadInput, match="authentication refused.*Permission denied"):
        profile_remote(tiny_onnx, target, iterations=5, keep_connection=False)


@needs_sshd
def test_unreachable_host(loopback, tiny_onnx, tmp_path):
    config = _client_config(tmp_path / "config", port=_free_port(), key=loopback.key,
                            known_hosts=loopback.root / "known_hosts")
    with pytest.raises(BadInput, match="host unreachable.*Connection refused"):
        profile_remote(tiny_onnx, loopback.target(ssh_config=str(config)), iterations=5, keep_connection=False)


@needs_sshd
def test_runtime_missing_on_the_device(loopback, tiny_onnx, tmp_path):
    bare = tmp_path / "bare-venv"
    subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    target = loopback.target(python=str(bare / "bin" / "python"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(BadInput, match="runtime is missing.*onnxruntime"):
        profile_remote(tiny_onnx, target, iterations=5, keep_connection=False)
    assert not (tmp_path / "cache" / "artifacts").exists()  # refused before anything was copied


def _agent_processes(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and "--deadline" in cmdline:
                pids.append(int(entry.name))
    return pids


@needs_sshd
def test_run_past_its_timeout_is_stopped_cleanly(loopback, tiny_onnx, tmp_path):
    cache = tmp_path / "cache"
    target = loopback.target(cache_dir=str(cache), timeout_s=6)
    with pytest.raises(BadInput, match="timed? ?out|exceeded its timeout"):
        profile_remote(tiny_onnx, target, batch=1, seq=16, warmup=0, iterations=10_000_000, keep_connection=False)
    deadline = time.monotonic() + 10
    while _agent_processes(str(cache)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _agent_processes(str(cache)) == []  # the agent stopped itself on the device
    assert not _partials(cache)
    model = cache / "artifacts" / tiny_onnx.content_hash()[:32] / "model.onnx"
    assert _sha(model) == _sha(tiny_onnx.path)  # what is in the cache is complete


@needs_sshd
def test_copy_killed_midway_leaves_no_partial_artifact(loopback, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        fh.truncate(768 * 2**20)  # sparse: costs nothing here, takes a while to stream and encrypt
    device = RemoteDevice.from_target(loopback.target(cache_dir=str(tmp_path / "cache")))
    final = device.remote_path("artifacts", "big")
    try:
        device.connect()
        with pytest.raises(BadInput, match="timed out"):
            device.put_folder({"big.bin": big}, final, timeout=0.5)
    finally:
        device.close()
    deadline = time.monotonic() + 10
    while _partials(tmp_path / "cache") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _partials(tmp_path / "cache")
    assert not Path(final).exists()


# ---------------------------------------------------------------------------------------------
# The CLI, end to end
# ---------------------------------------------------------------------------------------------


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(EDGESMITH), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


@needs_sshd
def test_cli_profile_on_target_and_on_ssh_url(loopback, tiny_onnx, tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    import yaml

    target = loopback.target(name="loopback-device", cache_dir=str(tmp_path / "cache"))
    (targets / "loopback-device.yaml").write_text(yaml.safe_dump(target.model_dump(mode="json", exclude_none=True)))
    listed = _cli("targets", "--targets-dir", str(targets), "--json")
    assert listed.returncode == 0 and "loopback-device" in listed.stdout and "jetson-orin-nano" in listed.stdout

    out = tmp_path / "p.json"
    proc = _cli("profile", str(tiny_onnx.folder), "--target", "loopback-device", "--targets-dir", str(targets),
                "--batch", "1", "--seq", "16", "--warmup", "1", "--iterations", "10", "--per-op", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    prof = Profile.load(out)
    assert prof.target == "loopback-device" and prof.per_op and prof.environment.uname

    # ssh://user@host:port with the user's ssh config: python3 on the device's PATH, the default cache under HOME
    url = f"ssh://{getpass.getuser()}@127.0.0.1:{loopback.port}"
    config = tmp_path / "url_config"
    config.write_text(f"Host 127.0.0.1\n  IdentityFile {loopback.key}\n  IdentitiesOnly yes\n"
                      f"  UserKnownHostsFile {loopback.root / 'known_hosts'}\n  GlobalKnownHostsFile /dev/null\n")
    out2 = tmp_path / "p2.json"
    proc = _cli("profile", str(tiny_onnx.folder), "--target", url, "--ssh-config", str(config), "--batch", "1",
                "--seq", "16", "--iterations", "10", "--per-op", "-o", str(out2))
    assert proc.returncode == 0, proc.stderr
    assert (loopback.home / ".cache" / "edgesmith-device" / "artifacts").is_dir()
    compared = _cli("compare", str(out), str(out2))
    assert compared.returncode == 0 and "per-op" in compared.stdout

    # the CLI keeps its connection for the next command (ControlPersist); stop both here
    from edgesmith.targets import get_target

    RemoteDevice.from_target(target).close()
    RemoteDevice.from_target(get_target(url), config).close()

    # a failure is one line, exit 2
    bad = tmp_path / "bad_config"
    bad.write_text(f"Host 127.0.0.1\n  IdentityFile {loopback.key}\n  UserKnownHostsFile /dev/null\n"
                   "  GlobalKnownHostsFile /dev/null\n")
    proc = _cli("profile", str(tiny_onnx.folder), "--target", url, "--ssh-config", str(bad), "--iterations", "5")
    assert proc.returncode == 2
    assert "host key" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
