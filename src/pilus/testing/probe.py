"""Network probes run inside a namespace: `ip netns exec NS python3 -m pilus.testing.probe CMD ...`.

Every client command prints one JSON line ({"ok": bool, ...}) and exits 0, so a
caller can tell "connected" from "timed out" from "refused" by reading it. Servers
print "ready" once listening and serve until killed. Used by the e2e tests, the
demo and the benchmarks; all traffic stays between namespaces on this machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time


def _out(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _ready() -> None:
    print("ready", flush=True)


def tcp_server(port: str) -> None:
    """Echo server; a connection's first bytes 'whoami' get the peer address back."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(port)))
    srv.listen(64)
    _ready()
    while True:
        conn, peer = srv.accept()
        if os.fork() == 0:
            srv.close()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(f"{peer[0]}:{peer[1]}".encode() if data == b"whoami" else data)
            os._exit(0)
        conn.close()
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


def udp_server(port: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", int(port)))
    _ready()
    while True:
        data, peer = sock.recvfrom(65536)
        print(json.dumps({"from": f"{peer[0]}:{peer[1]}", "data": data.decode(errors="replace")}), flush=True)
        sock.sendto(data, peer)


def _tcp_open(ip: str, port: str, timeout: float) -> socket.socket:
    return socket.create_connection((ip, int(port)), timeout=timeout)


def tcp_request(ip: str, port: str, message: bytes, timeout: float, reply_max: int = 65536) -> bytes:
    """The TCP probe: connect, send ``message``, read one reply, close. OSError on failure."""
    with _tcp_open(ip, port, timeout) as conn:
        conn.sendall(message)
        return conn.recv(reply_max)


def tcp_failure(exc: OSError) -> str:
    """How a TCP probe failed, as the JSON lines say it: timeout, refused or the errno text."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    return exc.strerror or str(exc)


def tcp_connect(ip: str, port: str, message: str = "whoami", timeout: str = "2") -> None:
    start = time.monotonic()
    try:
        reply = tcp_request(ip, port, message.encode(), float(timeout)).decode(errors="replace")
        _out(ok=True, reply=reply, rtt_ms=round((time.monotonic() - start) * 1000, 3))
    except OSError as exc:
        _out(ok=False, error=tcp_failure(exc))


def udp_send(ip: str, port: str, message: str = "ping", timeout: str = "2") -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(float(timeout))
    try:
        sock.sendto(message.encode(), (ip, int(port)))
        data, peer = sock.recvfrom(65536)
        _out(ok=True, reply=data.decode(errors="replace"), peer=f"{peer[0]}:{peer[1]}")
    except TimeoutError:
        _out(ok=False, error="timeout")
    except OSError as exc:
        _out(ok=False, error=exc.strerror or str(exc))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(ip: str, timeout: str = "2") -> None:
    """One ICMP echo request/reply over a raw socket (needs CAP_NET_RAW)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(float(timeout))
    ident, seq = os.getpid() & 0xFFFF, 1
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    payload = b"pilus-probe"
    packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload
    start = time.monotonic()
    deadline = start + float(timeout)
    try:
        sock.sendto(packet, (ip, 0))
        while time.monotonic() < deadline:
            data, peer = sock.recvfrom(65536)
            ihl = (data[0] & 0x0F) * 4
            icmp_type, _code, _sum, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if icmp_type == 0 and rid == ident and rseq == seq and peer[0] == ip:
                _out(ok=True, rtt_ms=round((time.monotonic() - start) * 1000, 3))
                return
        _out(ok=False, error="timeout")
    except TimeoutError:
        _out(ok=False, error="timeout")
    except OSError as exc:
        _out(ok=False, error=exc.strerror or str(exc))


def spoof_udp(src: str, dst: str, port: str, message: str = "spoofed") -> None:
    """Send one UDP datagram with a forged source address (IP_HDRINCL)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    data = message.encode()
    udp = struct.pack("!HHHH", 40000, int(port), 8 + len(data), 0) + data
    total = 20 + len(udp)
    ip_header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 0x1234, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )
    ip_header = ip_header[:10] + struct.pack("!H", _checksum(ip_header)) + ip_header[12:]
    sock.sendto(ip_header + udp, (dst, 0))
    _out(ok=True, sent=len(ip_header) + len(udp))


def _total_retrans(conn: socket.socket) -> int:
    """tcp_info.tcpi_total_retrans (u32 at offset 100 of struct tcp_info, linux/tcp.h)."""
    info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, 100)[0]


def tcp_stream(ip: str, port: str, seconds: str) -> None:
    """Round trips on one TCP connection for N seconds; reports the longest gap and how
    many segments TCP had to retransmit (a dropped packet shows there, whatever the timing)."""
    conn = _tcp_open(ip, port, timeout=10)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    end = time.monotonic() + float(seconds)
    last = time.monotonic()
    max_gap = 0.0
    count = 0
    try:
        while time.monotonic() < end:
            conn.sendall(b"x" * 64)
            got = 0
            while got < 64:
                chunk = conn.recv(64 - got)
                if not chunk:
                    raise ConnectionError("connection closed by peer")
                got += len(chunk)
            now = time.monotonic()
            max_gap = max(max_gap, now - last)
            last = now
            count += 1
            time.sleep(0.005)
        _out(ok=True, round_trips=count, max_gap_ms=round(max_gap * 1000, 1), retransmits=_total_retrans(conn))
    except OSError as exc:
        _out(ok=False, error=str(exc), round_trips=count, max_gap_ms=round(max_gap * 1000, 1))


def tcp_connect_loop(ip: str, port: str, seconds: str, interval_ms: str = "4") -> None:
    """A new connection (connect, 'whoami', reply, close) every interval for N seconds or
    until SIGTERM; reports the successes per second and every failure with its time, so
    an outage of a few milliseconds shows up as failed connections."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    start = time.monotonic()
    end = start + float(seconds)
    per_second: list[int] = []
    failures: list[dict] = []
    while not stop and time.monotonic() < end:
        t = time.monotonic() - start
        try:
            if not tcp_request(ip, port, b"whoami", 2, reply_max=64):
                raise ConnectionError("closed without a reply")
            second = int(t)
            per_second.extend([0] * (second + 1 - len(per_second)))
            per_second[second] += 1
        except OSError as exc:
            failures.append({"t": round(t, 3), "error": tcp_failure(exc)})
        time.sleep(float(interval_ms) / 1000)
    _out(ok=not failures, connected=sum(per_second), per_second=per_second,
         failed=len(failures), failures=failures[:20], seconds=round(time.monotonic() - start, 1))


COMMANDS = {
    "tcp-server": tcp_server,
    "udp-server": udp_server,
    "tcp-connect": tcp_connect,
    "udp-send": udp_send,
    "ping": ping,
    "spoof-udp": spoof_udp,
    "tcp-stream": tcp_stream,
    "tcp-connect-loop": tcp_connect_loop,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: probe {{{'|'.join(COMMANDS)}}} ARGS...", file=sys.stderr)
        return 2
    COMMANDS[argv[0]](*argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
