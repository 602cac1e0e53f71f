"""What a user hands us is data, never code; what we start listens on loopback unless configured otherwise."""

import ast
import ipaddress
import os
import re
from pathlib import Path

import psutil
import ray

ROOT = Path(__file__).resolve().parents[1]


def python_files():
    """The project's sources; not bench/results/, where benchmark run folders keep DeepSpeed's own scripts."""
    for folder in ("nayer", "orchestrator", "bench"):
        yield from (p for p in (ROOT / folder).rglob("*.py") if (ROOT / "bench" / "results") not in p.parents)


def test_every_torch_load_is_weights_only():
    calls = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                calls.append(path.name)
                assert weights_only and isinstance(weights_only[0].value, ast.Constant) \
                    and weights_only[0].value.value is True, f"{path}:{node.lineno}: torch.load without weights_only=True"
    assert len(calls) >= 8  # the scan sees the loaders (checkpoints, buffers, LTE files, resume state)


def test_no_unpickling_of_buffer_or_embedding_files():
    for path in python_files():
        text = path.read_text()
        assert "allow_pickle=True" not in text and "pickle.load" not in text, path


def test_slurm_scripts_build_no_shell_strings():
    for path in (ROOT / "slurm").iterdir():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not re.search(r"\beval\b|\b(ba)?sh -c\b|\$\(\s*echo", code), f"{path}:{number}: {line}"


def test_the_local_ray_listens_on_loopback_only(local_ray):
    @ray.remote
    class Probe:
        def pid(self):
            return os.getpid()

    probe = Probe.remote()
    worker_pid = ray.get(probe.pid.remote())
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    assert worker_pid in {p.pid for p in processes}  # the scan covers Ray's worker processes
    listening = []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        listening += [(process.name(), c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 5  # GCS, raylet, dashboard, agents, workers
    for name, ip, port in listening:
        address = ipaddress.ip_address(ip)
        loopback = address.is_loopback or (address.version == 6 and address.ipv4_mapped is not None
                                           and address.ipv4_mapped.is_loopback)
        assert loopback, f"{name} listens on {ip}:{port}"
    ray.kill(probe)
