"""A Slurm cluster across the two "nodes" of cluster.py (tests only): munged on the host (its
socket is a file both namespaces reach), slurmctld and one slurmd in node 1's namespace, a second
slurmd in node 2's, each with its node's host name. Clients (sbatch, scontrol) run in node 1's
namespace, where slurmctld listens. The daemons see a hosts file naming both nodes through a
private mount namespace. Every file lives in a temporary folder; everything is stopped
on exit (TwoNodes kills what runs in the namespaces; munged is stopped by its pid).

    with TwoNodeSlurm() as cluster:
        job_id = cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", "jobs/slurm/train.sbatch"],
                                cwd=tmp, env={"VENV": sys.prefix})
        state, exit_code, fields = cluster.wait(job_id, 120)
"""
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from cluster import TwoNodes

DAEMONS = ("slurmctld", "slurmd", "sbatch", "munged")
COMMON = Path(__file__).resolve().parent.parent / "slurm" / "common.conf"


def slurm_missing():
    missing = [c for c in DAEMONS if not shutil.which(c)]
    return f"Slurm is not installed (missing {', '.join(missing)})" if missing else None


class TwoNodeSlurm(TwoNodes):
    def __init__(self, rate=None, port=None):
        super().__init__(rate)
        self.port = port or 20000 + os.getpid() % 20000
        self.state = None

    def _up(self):
        super()._up()
        self.state = Path(tempfile.mkdtemp(prefix="mpinn-slurm2-"))
        self.state.chmod(0o755)
        munge = self.state / "munge"
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0700", str(munge)],
                       check=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force",
                        f"--key-file={key}", f"--socket={munge}/munge.socket",
                        f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                        f"--seed-file={munge}/munged.seed"], check=True, capture_output=True)
        self._wait(lambda: (munge / "munged.pid").is_file(), "munged")
        munge.chmod(0o711)
        self.hosts_file = self.state / "hosts"
        self.hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
            f"{a} {h}\n" for a, h in zip(self.addr, self.hosts)))
        for sub in ("ctld", "d", "log", "cg", *(f"d/{h}" for h in self.hosts)):
            (self.state / sub).mkdir(mode=0o755)
        enter, inside = self.state / "enter.sh", self.state / "inside.sh"
        enter.write_text(f"""#!/bin/bash
# enter.sh NAMESPACE HOST COMMAND...: runs in a private mount namespace of the host
set -e
mount --rbind /sys/fs/cgroup {self.state}/cg
ns=$1; shift
exec ip netns exec "$ns" unshare --uts --mount {inside} "$@"
""")
        inside.write_text(f"""#!/bin/bash
# inside.sh HOST COMMAND...: in the node's network namespace, with its /sys
set -e
mount --rbind {self.state}/cg /sys/fs/cgroup
mount --bind {self.hosts_file} /etc/hosts
hostname "$1"; shift
exec "$@"
""")
        enter.chmod(0o755)
        inside.chmod(0o755)
        self.conf = self.state / "slurm.conf"
        self.conf.write_text(self._config(munge))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.in_node(0, ["slurmctld", "-f", str(self.conf), "-c"], check=True)
        self._wait(lambda: self.in_node(0, ["scontrol", "ping"]).returncode == 0, "slurmctld")
        for k in (0, 1):
            self.in_node(k, ["slurmd", "-f", str(self.conf), "-N", self.hosts[k]], check=True)
        self._wait(lambda: self.in_node(0, ["sinfo", "-h", "-o", "%T"]).stdout.split() ==
                   ["idle"], "both slurmd idle", timeout=60)

    def _config(self, munge):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
        nodes = "\n".join(f"NodeName={h} NodeAddr={a} CPUs={os.cpu_count()} RealMemory={mem} "
                          "State=UNKNOWN" for h, a in zip(self.hosts, self.addr))
        s = self.state
        return f"""ClusterName=mpinn2n{os.getpid()}
SlurmctldHost={self.hosts[0]}({self.addr[0]})
SlurmctldPort={self.port}
SlurmdPort={self.port + 1}
Include {COMMON}
AuthInfo=socket={munge}/munge.socket,cred_expire=10
StateSaveLocation={s}/ctld
SlurmdSpoolDir={s}/d/%n
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd.%n.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd.%n.log
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def in_node(self, k, argv, env=None, check=False, cwd=None, timeout=60):
        """Run argv in node k's namespace with its host name and this cluster's SLURM_CONF."""
        # in private mount namespaces only: the host's cgroups (slurmd needs them) bound under
        # the /sys that `ip netns exec` mounts for the node (where UCX finds its interface), and a
        # hosts file naming both nodes; the host's mounts and /etc/hosts are not touched
        cmd = ["unshare", "--mount", "--propagation", "private", str(self.state / "enter.sh"),
               self.ns[k], self.hosts[k], *map(str, argv)]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=cwd,
                              env={**getattr(self, "env", os.environ), **(env or {})},
                              timeout=timeout)

    def _wait(self, ready, what, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            time.sleep(0.2)
        logs = "\n".join(p.read_text()[-1500:] for p in (self.state / "log").glob("*.log"))
        raise RuntimeError(f"two-node Slurm: {what} not ready after {timeout} s\n{logs}")

    def sbatch(self, argv, cwd, env=None):
        r = self.in_node(0, ["sbatch", "--parsable", *argv], env=env, cwd=cwd, check=True)
        return r.stdout.strip().split(";")[0]

    def wait(self, job_id, timeout):
        """(state, exit code, scontrol's fields) once the job ends."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.in_node(0, ["scontrol", "show", "job", "-o", job_id]).stdout
            fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
            if fields.get("JobState", "") not in ("PENDING", "CONFIGURING", "RUNNING",
                                                  "COMPLETING", ""):
                return fields["JobState"], fields.get("ExitCode", ""), fields
            time.sleep(0.5)
        self.in_node(0, ["scancel", job_id])
        raise RuntimeError(f"job {job_id} did not end within {timeout} s")

    def _down(self):
        super()._down()  # kills everything in the namespaces: slurmctld, slurmd, job steps
        if self.state is not None:
            pid_file = self.state / "munge" / "munged.pid"
            try:
                os.kill(int(pid_file.read_text()), 15)
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
            shutil.rmtree(self.state, ignore_errors=True)
