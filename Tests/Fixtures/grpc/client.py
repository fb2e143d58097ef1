#!/usr/bin/python3
"""A gRPC client for Moonlet's gRPC tests (GRPCTests.swift): one case against
moonlet.test.Echo (server.py), printed as one JSON object on stdout.

Usage: client.py HOST:PORT AUTHORITY CASE [ARG]
  unary N          N unary calls on one channel, each checked
  concurrent N     N unary calls in flight at once on one channel (each 300 ms at the app)
  big BYTES        one unary call with a message of BYTES bytes, checked
  server_stream N  Count: N messages, checked in order
  client_stream N  Sum over N messages of 1000 bytes
  bidi N[:MS]      Chat: N messages, one answer read after each, MS milliseconds apart
  slow_stream N:MS Count: N messages MS milliseconds apart, checked in order, timed
  call MESSAGE     one unary Echo call: its code, details, trailing metadata, answer
  call_at PATH     one unary call of method PATH ("/moonlet.test.Echo/Other")
  deadline MS      Echo "sleep:5000" with a deadline of MS milliseconds
Every result has "code" (the gRPC status name of the last call) and "ok".
"""
import json, sys, time
import grpc

ident = lambda b: b


def status_of(e):
    return {"code": e.code().name, "details": e.details() or "",
            "trailing": {k: (v.hex() if isinstance(v, bytes) else v) for k, v in (e.trailing_metadata() or ())}}


def main():
    target, authority, case = sys.argv[1], sys.argv[2], sys.argv[3]
    arg = sys.argv[4] if len(sys.argv) > 4 else ""
    limit = 16 * 1024 * 1024
    ch = grpc.insecure_channel(target, options=[("grpc.default_authority", authority),
                                                ("grpc.max_receive_message_length", limit),
                                                ("grpc.max_send_message_length", limit),
                                                ("grpc.enable_retries", 0)])
    unary = ch.unary_unary("/moonlet.test.Echo/Echo", request_serializer=ident, response_deserializer=ident)
    out = {"case": case, "ok": False, "code": "OK"}
    try:
        if case == "unary":
            n = int(arg)
            for i in range(n):
                m = b"hello %d" % i
                if unary(m, timeout=10) != m:
                    out["error"] = "call %d: wrong answer" % i
                    break
            else:
                out["ok"] = True
            out["calls"] = n
        elif case == "concurrent":
            n = int(arg)
            futures = [unary.future(b"sleep:300:%d" % i, timeout=30) for i in range(n)]
            got = [f.result() for f in futures]
            out["calls"] = n
            out["ok"] = got == [b"sleep:300:%d" % i for i in range(n)]
        elif case == "big":
            m = bytes(range(256)) * (int(arg) // 256)
            r = unary(m, timeout=30)
            out["ok"] = r == m
            out["bytes"] = len(r)
        elif case == "server_stream":
            n = int(arg)
            call = ch.unary_stream("/moonlet.test.Echo/Count", request_serializer=ident, response_deserializer=ident)
            got = [m[:6] for m in call(b"%d:100" % n, timeout=30)]
            out["messages"] = len(got)
            out["ok"] = got == [b"%06d" % i for i in range(n)]
        elif case == "client_stream":
            n = int(arg)
            call = ch.stream_unary("/moonlet.test.Echo/Sum", request_serializer=ident, response_deserializer=ident)
            r = call(iter([b"y" * 1000] * n), timeout=30).decode()
            out["answer"] = r
            out["ok"] = r == "%d %d" % (n, n * 1000)
        elif case == "slow_stream":
            n, gap = (int(x) for x in arg.split(":"))
            call = ch.unary_stream("/moonlet.test.Echo/Count", request_serializer=ident, response_deserializer=ident)
            start = time.monotonic()
            got = [m[:6] for m in call(b"%d:100:%d" % (n, gap), timeout=60)]
            out["elapsed_ms"] = int((time.monotonic() - start) * 1000)
            out["messages"] = len(got)
            out["ok"] = got == [b"%06d" % i for i in range(n)]
        elif case == "bidi":
            import queue
            n = int(arg.split(":")[0])
            gap = int(arg.split(":")[1]) / 1000.0 if ":" in arg else 0
            q = queue.Queue()
            call = ch.stream_stream("/moonlet.test.Echo/Chat", request_serializer=ident, response_deserializer=ident)

            def requests():
                start = time.monotonic()
                for i in range(n):
                    if i and gap:
                        time.sleep(gap)
                    yield b"m%d" % i
                    q.get(timeout=10)   # the answer to this one came back first
                out["elapsed_ms"] = int((time.monotonic() - start) * 1000)
            answers = call(requests(), timeout=30)
            got = []
            for a in answers:
                got.append(a)
                q.put(1)
            out["messages"] = len(got)
            out["ok"] = got == [b"re:m%d" % i for i in range(n)]
        elif case == "call":
            r = unary(arg.encode(), timeout=10)
            out["answer"] = r.decode(errors="replace")
            out["ok"] = True
        elif case == "call_at":
            other = ch.unary_unary(arg, request_serializer=ident, response_deserializer=ident)
            out["answer"] = other(b"hello", timeout=10).decode(errors="replace")
            out["ok"] = True
        elif case == "deadline":
            start = time.monotonic()
            try:
                unary(b"sleep:5000", timeout=int(arg) / 1000.0)
                out["ok"] = False
            except grpc.RpcError as e:
                out.update(status_of(e))
                out["elapsed_ms"] = int((time.monotonic() - start) * 1000)
                out["ok"] = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            out["error"] = "unknown case " + case
    except grpc.RpcError as e:
        out.update(status_of(e))
    print(json.dumps(out), flush=True)
    ch.close()


if __name__ == "__main__":
    main()
