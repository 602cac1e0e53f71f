"""slurm/*.sbatch dry runs: srun, scontrol, ray and python are stubs that log their argv, no Slurm and no Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
SCRIPTS = ("ray_cluster.sbatch", "ray_cluster_requeue.sbatch", "ray_cluster_gpu.sbatch")
REQUEUEING = ("ray_cluster_requeue.sbatch", "ray_cluster_gpu.sbatch")
PORT = 58400  # the GCS port of job 4242: 20000 + (4242 % 225) * 200
ADDRESS = f"10.0.0.1:{PORT}"

# One stub for every command, dispatched on the name it is called by. Each call appends one JSON line to
# $STUB_LOG, with the Ray token settings of its environment. srun logs the node (-w) and runs the command after its
# options (the ray or hostname stub). `ray list nodes` lists the nodes whose `ray start` is up, by --node-name; a
# node in STUB_JOIN_DELAY ("node3=1.5") comes up that much later, one in STUB_NEVER_JOINS never does.
# `ray start ... --block` and, with STUB_PYTHON=block, python run until SIGTERM, as the real ones do (python
# then takes 0.3 s to exit, as the driver does to checkpoint).
# python waits until every node's `ray start` is up so that the log is complete when the script stops the cluster.
STUB = r'''#!{python} -S
import json, os, re, signal, sys, time

PROG, ARGV = os.path.basename(sys.argv[0]), sys.argv[1:]


def log(**entry):
    auth = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH") if k in os.environ}
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps({"prog": PROG, "argv": ARGV, "auth": auth, **entry}) + "\n")


def joined_nodes():
    """`--node-name`s of the `ray start`s that are up (what `ray list nodes` shows)."""
    with open(os.environ["STUB_LOG"]) as f:
        calls = [json.loads(line) for line in f]
    return [opt.split("=", 1)[1] for c in calls if c["prog"] == "ray" and c.get("event") == "start"
            for opt in c["argv"] if opt.startswith("--node-name=")]


def run_until_sigterm(stop_seconds=0.0, **entry):
    def stop(signum, frame):
        time.sleep(stop_seconds)
        log(event="terminated", **entry)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    log(event="start", **entry)
    while True:
        signal.pause()


if PROG == "srun":
    i, node = 0, None
    while ARGV[i].startswith("-"):
        if ARGV[i] == "-w":
            node = ARGV[i + 1]
            i += 1
        i += 1
    command = ARGV[i:]
    log(node=node, command=command)
    if command[0] == "hostname":
        print("10.0.0." + re.sub(r"\D", "", node), "192.168.0.9")  # two interfaces: the first one counts
    else:
        os.environ["STUB_NODE"] = node
        os.execvp(command[0], command)
elif PROG == "scontrol":
    log()
    if ARGV[:2] == ["show", "hostnames"]:
        print("\n".join(os.environ["STUB_NODES"].split()))
elif PROG == "ray":
    if ARGV[0] == "start":
        node = os.environ.get("STUB_NODE")
        delays = dict(item.split("=") for item in os.environ.get("STUB_JOIN_DELAY", "").split())
        if node in os.environ.get("STUB_NEVER_JOINS", "").split():  # hangs, never reaching the head
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while True:
                signal.pause()
        time.sleep(float(delays.get(node, 0)))
        run_until_sigterm(node=node)
    log()
    if ARGV[:2] == ["list", "nodes"]:
        if int(ARGV[ARGV.index("--limit") + 1]) > 10000:  # Ray 2.60's state API refuses more
            sys.exit("ray list: limit must be <= 10000")
        print(json.dumps([{"node_name": name, "state": "ALIVE"} for name in joined_nodes()]))
    sys.exit(int(os.environ.get("STUB_RAY_STATUS", "0")))
elif PROG == "python":
    nodes, deadline = len(os.environ["STUB_NODES"].split()), time.monotonic() + 10
    while time.monotonic() < deadline and len(joined_nodes()) < nodes:
        time.sleep(0.01)
    if os.environ.get("STUB_PYTHON") == "block":
        run_until_sigterm(stop_seconds=0.3)  # the driver takes a while to checkpoint
    log()
    sys.exit(int(os.environ.get("STUB_PYTHON_EXIT", "0")))
'''


@dataclass
class Result:
    returncode: int
    stderr: str
    calls: list[dict]
    leftover: bool  # some process the script started still runs after it exited


def stub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A 3-node job 4242 with 8 CPUs and 2 GPUs a node; the stubs come first on PATH, no real ray or python."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir(parents=True)
        stub = bin_dir / "stub"
        stub.write_text(STUB.replace("{python}", sys.executable))
        stub.chmod(0o755)
        for name in ("srun", "scontrol", "ray", "python"):
            (bin_dir / name).symlink_to(stub)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(tmp_path / "calls.jsonl"),
        "STUB_NODES": "node1 node2 node3", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-3]",
        "SLURM_CPUS_PER_TASK": "8", "SLURM_GPUS_ON_NODE": "2", "USER": "tester",
    }
    env.update(extra)
    (tmp_path / "calls.jsonl").touch()
    return env


def read_calls(env: dict[str, str]) -> list[dict]:
    return [json.loads(line) for line in Path(env["STUB_LOG"]).read_text().splitlines()]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group(pgid: int) -> None:
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)


def start(script: str | Path, args: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
    # Own session: the script and everything it starts form one process group, checked and cleaned up as one.
    return subprocess.Popen(["bash", str(SLURM / script), *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, env: dict[str, str], timeout: float = 20) -> Result:
    try:
        _, stderr = proc.communicate(timeout=timeout)
        leftover = group_alive(proc.pid)
    finally:
        kill_group(proc.pid)
    return Result(proc.returncode, stderr, read_calls(env), leftover)


def run(script: str | Path, args: list[str], env: dict[str, str], cwd: Path = REPO) -> Result:
    return finish(start(script, args, env, cwd), env)


def ray_starts(calls: list[dict]) -> list[dict]:
    """The srun calls that start Ray, each with node and the `ray start` options as a dict."""
    starts = []
    for call in calls:
        if call["prog"] == "srun" and call["command"][:2] == ["ray", "start"]:
            options = dict(opt.split("=", 1) if "=" in opt else (opt, True) for opt in call["command"][2:])
            starts.append({"node": call["node"], "srun": call["argv"], "options": options})
    return starts


def python_argvs(calls: list[dict]) -> list[list[str]]:
    """The program's command lines (a blocking python stub logs its start and its termination: one call)."""
    return [call["argv"] for call in calls if call["prog"] == "python" and call.get("event") != "terminated"]


def ports(start_options: dict) -> set[int]:
    """Every port one `ray start` binds: the single ports plus the whole worker range."""
    single = {int(v) for k, v in start_options.items() if k.endswith("-port") and "worker" not in k}
    workers = set(range(int(start_options["--min-worker-port"]), int(start_options["--max-worker-port"]) + 1))
    assert len(workers) > 100 and not single & workers
    return single | workers


@pytest.mark.parametrize("path", sorted(SLURM.glob("*.sbatch")) + [SLURM / "lib.sh"], ids=lambda p: p.name)
def test_bash_syntax(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_run_starts_head_then_workers_runs_the_program_and_stops_the_cluster(tmp_path):
    env = stub_env(tmp_path)
    out_dir = str(tmp_path / "runs")
    result = run("ray_cluster.sbatch", ["run", "config=configs/cifar10.yaml", "name=c10", f"out_dir={out_dir}"], env)
    assert result.returncode == 0, result.stderr

    starts = ray_starts(result.calls)
    head = [s for s in starts if "--head" in s["options"]]
    assert [s["node"] for s in head] == ["node1"]
    opts = head[0]["options"]
    assert opts["--node-ip-address"] == "10.0.0.1" and opts["--port"] == str(PORT)
    assert opts["--temp-dir"] == "/tmp/ray-tester-4242"
    assert (opts["--num-cpus"], opts["--num-gpus"], opts["--dashboard-host"]) == ("8", "2", "127.0.0.1")
    assert "--block" in opts and "--cpus-per-task=8" in head[0]["srun"]

    workers = [s for s in starts if "--head" not in s["options"]]
    assert sorted(s["node"] for s in workers) == ["node2", "node3"]
    for worker in workers:
        assert worker["options"]["--address"] == ADDRESS
        assert worker["options"]["--temp-dir"] == "/tmp/ray-tester-4242"
        assert ports(worker["options"]) <= ports(opts)  # the same per-job ports as the head's raylet

    assert python_argvs(result.calls) == [["-m", "orchestrator.run", "config=configs/cifar10.yaml", "name=c10",
                                           f"out_dir={out_dir}", f"cluster.address={ADDRESS}"]]
    # The head answered before the program started, and every Ray step got SIGTERM once the program was done.
    order = [c["prog"] for c in result.calls if c["prog"] in ("python", "ray") and "event" not in c]
    assert order[-1] == "python" and set(order[:-1]) == {"ray"}
    assert {"--node-name=node1", "--node-name=node2", "--node-name=node3"} <= {
        a for c in result.calls if c["prog"] == "ray" for a in c["argv"]}
    assert sum(c.get("event") == "terminated" for c in result.calls) == 3 and not result.leftover


def test_tune_runs_the_sweep_module(tmp_path):
    env = stub_env(tmp_path)
    args = ["config=configs/cifar10.yaml", "sweep=configs/sweeps/cifar10_g.yaml", "name=g"]
    result = run("ray_cluster.sbatch", ["tune", *args], env)
    assert result.returncode == 0, result.stderr
    assert python_argvs(result.calls) == [["-m", "orchestrator.tune", *args, f"cluster.address={ADDRESS}"]]


def test_single_node_job_has_no_workers(tmp_path):
    env = stub_env(tmp_path, STUB_NODES="node1", SLURM_JOB_NODELIST="node1")
    result = run("ray_cluster.sbatch", ["run", "name=one"], env)
    assert result.returncode == 0, result.stderr
    assert [s["node"] for s in ray_starts(result.calls)] == ["node1"]
    assert python_argvs(result.calls) == [["-m", "orchestrator.run", "name=one", f"cluster.address={ADDRESS}"]]


def test_two_jobs_get_disjoint_ports_and_RAY_PORT_BASE_moves_the_block(tmp_path):
    def head_ports(job_id: str, **extra: str) -> set[int]:
        env = stub_env(tmp_path / f"{job_id}-{len(extra)}", SLURM_JOB_ID=job_id, STUB_NODES="node1", **extra)
        result = run("ray_cluster.sbatch", ["run", "name=p"], env)
        assert result.returncode == 0, result.stderr
        return ports(ray_starts(result.calls)[0]["options"])

    first, second = head_ports("4242"), head_ports("4243")
    assert not first & second
    assert min(first) == PORT and max(first) < PORT + 200 and max(second) < 65536
    moved = head_ports("4242", RAY_PORT_BASE="30000")
    assert min(moved) == 30000 and max(moved) == 30199
    result = run("ray_cluster.sbatch", ["run", "name=p"], stub_env(tmp_path / "bad", RAY_PORT_BASE="65400"))
    assert result.returncode == 2 and "RAY_PORT_BASE=65400: need an integer in 1024..65336" in result.stderr


def test_program_status_is_the_job_status(tmp_path):
    env = stub_env(tmp_path, STUB_PYTHON_EXIT="3")
    result = run("ray_cluster.sbatch", ["run", "name=c10"], env)
    assert result.returncode == 3
    assert sum(c.get("event") == "terminated" for c in result.calls) == 3 and not result.leftover


def test_head_that_never_answers_fails_clearly(tmp_path):
    env = stub_env(tmp_path, STUB_RAY_STATUS="1", RAY_START_TIMEOUT="0")
    result = run("ray_cluster.sbatch", ["run", "name=c10"], env)
    assert result.returncode == 1
    assert f"the Ray head at {ADDRESS} did not answer within 0 s" in result.stderr
    assert python_argvs(result.calls) == [] and not result.leftover


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args", [[], ["train", "name=c10"]], ids=["no-args", "unknown"])
def test_unknown_program_exits_2_naming_run_and_tune(tmp_path, script, args):
    env = stub_env(tmp_path)
    result = run(script, args, env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "must be run or tune" in result.stderr
    assert result.calls == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_arguments_reach_the_program_verbatim(tmp_path, script):
    env = stub_env(tmp_path)
    args = ["name=a;rm -rf x", "data.class_names=[a b]", f"teacher.checkpoint=$(touch {tmp_path}/pwned)",
            "data.eval=*", "x='\"`id`\" && echo"]
    result = run(script, ["run", *args], env)
    assert result.returncode == 0, result.stderr
    assert python_argvs(result.calls) == [["-m", "orchestrator.run", *args, f"cluster.address={ADDRESS}"]]
    assert not (tmp_path / "pwned").exists()


def test_lib_is_found_from_the_submit_dir_when_sbatch_runs_a_spool_copy(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    copy.write_text((SLURM / "ray_cluster.sbatch").read_text())
    env = stub_env(tmp_path, SLURM_SUBMIT_DIR=str(REPO))
    result = run(copy, ["run", "name=c10"], env, cwd=spool)
    assert result.returncode == 0, result.stderr
    assert len(python_argvs(result.calls)) == 1


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_requeue_on_signal_stops_the_program_then_requeues(tmp_path, sig):
    env = stub_env(tmp_path, STUB_PYTHON="block")
    args = ["config=configs/cifar10.yaml", "name=c10", f"out_dir={tmp_path / 'runs'}"]
    proc = start("ray_cluster_requeue.sbatch", ["run", *args], env)
    try:
        deadline = time.monotonic() + 15
        while not any(c["prog"] == "python" and c.get("event") == "start" for c in read_calls(env)):
            assert proc.poll() is None and time.monotonic() < deadline, "the program never started"
            time.sleep(0.02)
        os.kill(proc.pid, sig)
    finally:
        result = finish(proc, env)
    assert result.returncode == 0, result.stderr
    events = [(c["prog"], c.get("event") or c["argv"][0]) for c in result.calls if c["prog"] in ("python", "scontrol")]
    assert events[-2:] == [("python", "terminated"), ("scontrol", "requeue")]
    assert [c["argv"] for c in result.calls if c["argv"][:1] == ["requeue"]] == [["requeue", "4242"]]
    assert python_argvs(result.calls) == [["-m", "orchestrator.run", *args, f"cluster.address={ADDRESS}"]]
    assert not result.leftover


@pytest.mark.parametrize("mode, marker, extra, resumed", [
    ("run", "checkpoints/driver.pt", [], True),
    ("tune", "tuner.pkl", ["sweep=configs/sweeps/cifar10_g.yaml"], True),
    ("run", None, [], False),
    ("run", "checkpoints/driver.pt", ["resume=false"], False),  # the user's resume= is kept
], ids=["run-checkpoint", "tune-state", "fresh", "user-resume"])
def test_requeued_job_resumes_when_the_run_folder_can_be_resumed(tmp_path, mode, marker, extra, resumed):
    out_dir = tmp_path / "runs"
    if marker:
        (out_dir / "c10" / marker).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "c10" / marker).touch()
    env = stub_env(tmp_path, SLURM_RESTART_COUNT="1")
    args = ["config=configs/cifar10.yaml", "name=c10", f"out_dir={out_dir}", *extra]
    result = run("ray_cluster_requeue.sbatch", [mode, *args], env)
    assert result.returncode == 0, result.stderr
    assert python_argvs(result.calls) == [["-m", f"orchestrator.{mode}", *args, f"cluster.address={ADDRESS}"]
                                          + (["resume=true"] if resumed else [])]
    assert "[slurm] restart 1 of job 4242" in result.stderr
    assert not any(c["prog"] == "scontrol" and c["argv"][0] == "requeue" for c in result.calls)


def test_requeue_needs_the_run_name(tmp_path):
    env = stub_env(tmp_path)
    result = run("ray_cluster_requeue.sbatch", ["run", "config=configs/cifar10.yaml"], env)
    assert result.returncode == 2 and "pass name=<run name>" in result.stderr
    assert result.calls == []


def test_requeue_refuses_a_run_folder_on_an_object_store(tmp_path):
    env = stub_env(tmp_path)
    result = run("ray_cluster_requeue.sbatch", ["run", "name=c10", "out_dir=s3://bucket/runs"], env)
    assert result.returncode == 2 and "out_dir=s3://bucket/runs: a requeueing job keeps its resume marker" \
        in result.stderr and result.calls == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_port_of_the_block_already_in_use_fails_before_ray_starts(tmp_path, script):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        base = taken.getsockname()[1] - 1  # the dashboard port (+1) is the one in use
        env = stub_env(tmp_path, RAY_PORT_BASE=str(base))
        result = run(script, ["run", "name=c10"], env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert f"port {base + 1} (dashboard) is already in use on" in result.stderr and "RAY_PORT_BASE=<n>" in result.stderr
    assert ray_starts(result.calls) == [] and python_argvs(result.calls) == []


def test_the_job_waits_for_a_late_node_before_the_program_starts(tmp_path):
    env = stub_env(tmp_path, STUB_JOIN_DELAY="node3=1.5")
    result = run("ray_cluster.sbatch", ["run", "name=late"], env)
    assert result.returncode == 0, result.stderr
    node3_up = next(i for i, c in enumerate(result.calls) if c.get("event") == "start" and c.get("node") == "node3")
    program = next(i for i, c in enumerate(result.calls) if c["prog"] == "python")
    lists = [i for i, c in enumerate(result.calls) if c["prog"] == "ray" and c["argv"][:2] == ["list", "nodes"]]
    assert node3_up < program and any(i < node3_up for i in lists) and lists[-1] > node3_up
    assert "all 3 node(s) joined the Ray cluster" in result.stderr


def test_a_node_that_never_joins_fails_the_job_naming_it(tmp_path):
    env = stub_env(tmp_path, STUB_NEVER_JOINS="node3", RAY_NODES_TIMEOUT="1")
    result = run("ray_cluster.sbatch", ["run", "name=lost"], env)
    assert result.returncode == 1
    assert "1 of 3 node(s) did not join the Ray cluster within 1 s: node3" in result.stderr
    assert "--exclude=node3" in result.stderr
    assert python_argvs(result.calls) == [] and not result.leftover


def test_every_ray_call_and_the_program_get_the_jobs_own_token_never_in_argv(tmp_path):
    tokens = []
    for job in ("4242", "4243"):
        env = stub_env(tmp_path / job, SLURM_JOB_ID=job)
        result = run("ray_cluster.sbatch", ["run", "name=t"], env)
        assert result.returncode == 0, result.stderr
        calls = [c for c in result.calls if c["prog"] in ("ray", "python")]
        assert {c["prog"] for c in calls} == {"ray", "python"} and len(calls) >= 6
        assert {json.dumps(c["auth"]) for c in calls} == {json.dumps(calls[0]["auth"])}  # one token, everywhere
        token = calls[0]["auth"]["RAY_AUTH_TOKEN"]
        assert calls[0]["auth"]["RAY_AUTH_MODE"] == "token" and len(token) == 64 and int(token, 16) >= 0
        assert not any(token in " ".join(c["argv"]) for c in result.calls) and token not in result.stderr
        tokens.append(token)
    assert tokens[0] != tokens[1]


@pytest.mark.parametrize("given, mode, message", [
    ({"RAY_AUTH_TOKEN": "mine"}, "token", "with the token given in RAY_AUTH_TOKEN"),
    ({"RAY_AUTH_TOKEN_PATH": "/secret/token"}, "token", "with the token given in RAY_AUTH_TOKEN_PATH"),
    ({"RAY_AUTH_MODE": "disabled"}, "disabled", "RAY_AUTH_MODE=disabled: the job's Ray cluster accepts anyone"),
], ids=["token", "token-path", "disabled"])
def test_a_token_or_mode_the_user_gives_is_kept(tmp_path, given, mode, message):
    result = run("ray_cluster.sbatch", ["run", "name=t"], stub_env(tmp_path, **given))
    assert result.returncode == 0, result.stderr
    assert message in result.stderr
    auth = [c["auth"] for c in result.calls if c["prog"] == "ray"]
    assert auth and all(a == {"RAY_AUTH_MODE": mode, **given} for a in auth)


@pytest.mark.parametrize("script", REQUEUEING)
def test_a_crash_requeues_up_to_the_limit_and_a_bad_input_never(tmp_path, script):
    out_dir = tmp_path / "runs"
    args = ["run", "name=c10", f"out_dir={out_dir}"]
    counter = out_dir / "c10" / "slurm" / "4242.crashes"

    def requeues(result: Result) -> int:
        return sum(c["prog"] == "scontrol" and c["argv"][0] == "requeue" for c in result.calls)

    for crash in (1, 2):  # RAY_CRASH_REQUEUES=2: the first two crashes requeue
        result = run(script, args, stub_env(tmp_path / f"c{crash}", STUB_PYTHON_EXIT="137",
                                            RAY_CRASH_REQUEUES="2"))
        assert result.returncode == 0 and requeues(result) == 1, result.stderr
        assert f"crashed with status 137; requeueing job 4242 (crash {crash} of at most 2)" in result.stderr
        assert counter.read_text() == f"{crash}\n" and not result.leftover
    result = run(script, args, stub_env(tmp_path / "c3", STUB_PYTHON_EXIT="137", RAY_CRASH_REQUEUES="2"))
    assert result.returncode == 137 and requeues(result) == 0
    assert "not requeueing: job 4242 was requeued after 2 crash(es) already" in result.stderr
    result = run(script, ["run", "name=bad", f"out_dir={out_dir}"], stub_env(tmp_path / "bad", STUB_PYTHON_EXIT="2"))
    assert result.returncode == 2 and requeues(result) == 0 and "finished with status 2" in result.stderr


def test_gpu_script_gives_ray_every_gpu_and_cpu_of_whole_nodes(tmp_path):
    script = (SLURM / "ray_cluster_gpu.sbatch").read_text()
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert {"#SBATCH --exclusive", "#SBATCH --mem=0", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue"} <= set(header)
    env = stub_env(tmp_path, SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96")
    del env["SLURM_CPUS_PER_TASK"]  # --exclusive without --cpus-per-task: the node's CPUs
    result = run("ray_cluster_gpu.sbatch", ["run", "name=g", f"out_dir={tmp_path / 'runs'}"], env)
    assert result.returncode == 0, result.stderr
    starts = ray_starts(result.calls)
    assert len(starts) == 3 and all((s["options"]["--num-gpus"], s["options"]["--num-cpus"]) == ("8", "96")
                                    for s in starts)
    assert all("--cpus-per-task=96" in s["srun"] for s in starts)
