"""A TCP proxy on loopback in front of the test S3 endpoint, for fault injection: kill -9 this process and
the endpoint is gone for the pipeline (connections refused, transfers cut mid-way), start it again on the
same port and it is back, with the data intact behind it (the S3 server itself keeps running).

    python tests/fault_proxy.py LISTEN_PORT TARGET_PORT [CUT_RESPONSES]

With CUT_RESPONSES = N, the first N responses larger than 64 KiB are cut off after 64 KiB (the connection
closed mid-body, as when an endpoint goes away during a transfer); later ones pass whole.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading

CUT_AFTER = 1 << 16
cuts_left = [0]
cuts_lock = threading.Lock()


def pipe(source: socket.socket, sink: socket.socket, may_cut: bool = False) -> None:
    sent = 0
    try:
        while data := source.recv(1 << 16):
            if may_cut and sent + len(data) > CUT_AFTER:
                with cuts_lock:
                    cut, cuts_left[0] = cuts_left[0] > 0, max(cuts_left[0] - 1, 0)
                if cut:
                    sink.sendall(data[: CUT_AFTER - sent])
                    break
                may_cut = False
            sink.sendall(data)
            sent += len(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def main() -> None:
    listen_port, target_port = int(sys.argv[1]), int(sys.argv[2])
    cuts_left[0] = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(64)
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", target_port))
        except OSError:
            client.close()
            continue
        threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, client, True), daemon=True).start()


if __name__ == "__main__":
    main()
