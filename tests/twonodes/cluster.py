"""Two "nodes" on one machine for tests (not part of mpinn): two network namespaces joined by a
veth link of a chosen rate (tc tbf), each with its own host name, and MPICH's Hydra launching into
both through a "remote shell" that enters the namespace. UCX is told to use TCP, so every byte
between the nodes crosses the link (otherwise it would find shared memory on the same kernel).

    with TwoNodes(rate="1gbit") as nodes:
        nodes.mpiexec(["python", "-m", "mpinn", "train", ...], ranks=4, per_node=2)

Names and addresses are unique per instance (two runs cannot collide); everything is torn down on
exit, also when the command fails or is interrupted: the namespaces' processes are killed, then
the namespaces deleted (the veth pair goes with them). `unavailable()` says why it cannot run here
(not root, no `ip`, namespaces not allowed) for a skip."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def unavailable():
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [c for c in ("ip", "unshare", "tc") if not shutil.which(c)]
    if missing:
        return f"missing {', '.join(missing)}"
    probe = f"mpinn-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class TwoNodes:
    def __init__(self, rate=None):
        tag = f"{os.getpid() % 100000:05d}{id(self) % 100:02d}"
        self.ns = [f"mpinn{tag}a", f"mpinn{tag}b"]
        self.dev = [f"mv{tag}a", f"mv{tag}b"]           # interface names: 15 characters at most
        net = 10 + (os.getpid() % 200)
        self.addr = [f"10.{net}.{int(tag[-2:]) % 250}.1", f"10.{net}.{int(tag[-2:]) % 250}.2"]
        self.hosts = ["node1", "node2"]
        self.rate, self.tmp = rate, None

    def __enter__(self):
        try:
            self._up()
        except BaseException:
            self._down()
            raise
        return self

    def __exit__(self, *exc):
        self._down()

    def _up(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="mpinn-twonodes-"))
        for ns in self.ns:
            _ip("netns", "add", ns)
        _ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        for ns, dev, addr in zip(self.ns, self.dev, self.addr):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.rate:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev,
                                "root", "tbf", "rate", self.rate, "burst", "128kb", "latency",
                                "50ms"], check=True, capture_output=True)
        cases = "\n".join(f"  {a}) ns={ns} hn={hn};;"
                          for a, ns, hn in zip(self.addr, self.ns, self.hosts))
        self.rsh = self.tmp / "netns-rsh.sh"
        self.rsh.write_text(f"""#!/bin/bash
# Hydra calls: <this> [options] HOST COMMAND...  -> run COMMAND in that node's namespace
while [[ "$1" == -* ]]; do shift; done
host=$1; shift
case "$host" in
{cases}
  *) echo "netns-rsh: unknown host $host" >&2; exit 1;;
esac
exec ip netns exec $ns unshare --uts bash -c "hostname $hn; $*"
""")
        self.rsh.chmod(0o755)

    def _down(self):
        for ns in self.ns:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def command(self, argv, ranks, per_node, env=None):
        """The mpiexec command line that runs argv on `ranks` ranks, `per_node` per node."""
        mpiexec = str(Path(sys.executable).parent / "mpiexec")
        genv = []
        for key, value in {"UCX_TLS": "tcp", **(env or {})}.items():
            genv += ["-genv", key, value]
        # mpiexec runs on node 1 (Hydra starts that node's proxy itself, not through the rsh)
        return [
            "ip",
            "netns",
            "exec",
            self.ns[0],
            "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname {self.hosts[0]}; exec "$@"',
            "sh",
            mpiexec,
            "-iface",
            self.dev[0],
            "-hosts",
            ",".join(self.addr),
            "-n",
            str(ranks),
            "-ppn",
            str(per_node),
            "-launcher",
            "ssh",
            "-launcher-exec",
            str(self.rsh),
            *genv,
            *map(str, argv),
        ]

    def mpiexec(self, argv, ranks, per_node, env=None, timeout=300, cwd=None):
        return subprocess.run(self.command(argv, ranks, per_node, env), capture_output=True,
                              text=True, timeout=timeout, cwd=cwd)
