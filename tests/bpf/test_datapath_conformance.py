"""The real Datapath passes the same conformance check as the fake the agent's unit
test uses (pilus.testing.check_datapath): loaded with pins under a fresh directory on
bpffs, in a fresh network namespace (a child process that unshares one), then removed."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import ctypes
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pilus.datapath import Datapath, DatapathConfig
from pilus.testing.check_datapath import check_datapath

CLONE_NEWNET = 0x40000000
if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
    sys.exit("unshare(CLONE_NEWNET) failed: errno %d" % ctypes.get_errno())
state_dir, bpffs_root = Path(sys.argv[1]), Path(sys.argv[2])
cfg = DatapathConfig(node_name="conformance", router_ip=IPv4Address("10.231.0.1"),
                     node_ip=IPv4Address("10.231.0.1"), pod_cidr=IPv4Network("10.231.0.0/24"))
with Datapath(cfg, state_dir, bpffs_root=bpffs_root) as dp:
    dp.load()
    check_datapath(dp)
print("conformant")
"""


def test_real_datapath_passes_the_conformance_check(bpf_state_dir):
    root = Path("/sys/fs/bpf") / f"pilus-conformance-{secrets.token_hex(4)}"
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(bpf_state_dir), str(root)],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().endswith("conformant")
        assert (root / "conformance").is_dir()  # it was pinned there
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert not root.exists()
