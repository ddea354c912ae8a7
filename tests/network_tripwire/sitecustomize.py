"""Network tripwire for child processes: put this folder on PYTHONPATH and set
VERSAT2I_TRIPWIRE_LOG to a file; Python imports this module at start-up (``site``), and every DNS
look-up (``socket.getaddrinfo``) or connection to a non-loopback address is refused and recorded in
that file with the stack that made it. Loopback stays open (accelerate and ComfyUI's server use it).

Used by tests/unit/test_offline.py, which runs the pack's processes with the Hugging Face offline
switches unset and expects an empty log.
"""

import os
import socket
import traceback

_LOG = os.environ.get("VERSAT2I_TRIPWIRE_LOG")
_LOOPBACK = ("127.", "::1", "localhost")


def _refuse(kind, target):
    with open(_LOG, "a", encoding="utf-8") as log:
        log.write(f"pid {os.getpid()}: {kind} {target!r}\n{''.join(traceback.format_stack(limit=25))}\n")
    raise OSError(f"network tripwire: {kind} {target!r} refused (the pack must not reach the network)")


if _LOG:
    _getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host is None or str(host).startswith(_LOOPBACK):
            return _getaddrinfo(host, *args, **kwargs)
        _refuse("getaddrinfo", host)

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and not str(host).startswith(_LOOPBACK):
            _refuse("connect", address)
        return _connect(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect
