#!/usr/bin/python3
"""A gRPC server for Moonlet's gRPC tests (GRPCTests.swift) and bench/run's gRPC row.

Service moonlet.test.Echo with generic handlers (no generated code; messages are raw
bytes):
  Echo    unary          the request back; "fail:CODE:DETAILS" aborts with that status
                         and trailing metadata (x-detail, x-raw-bin); "sleep:MS" waits
                         first; "flaky:KEY:N" fails UNAVAILABLE the first N calls of KEY
                         (trailers-only), then answers "attempt K"
  Count   server stream  "N:SIZE[:MS]": N messages of SIZE bytes, MS milliseconds apart
  Sum     client stream  "COUNT BYTES" of what the client sent
  Chat    bidi stream    each message back with "re:" in front
Usage: server.py [PORT] (0 or none: any free port). Prints "PORT n" once serving, then
serves until stdin closes.
"""
import sys, threading, time
from concurrent import futures
import grpc

flaky_calls = {}
flaky_lock = threading.Lock()


def echo(request, context):
    if request.startswith(b"fail:"):
        _, code, details = request.decode().split(":", 2)
        context.set_trailing_metadata((("x-detail", "d1"), ("x-raw-bin", b"\x00\x01\xfe")))
        context.abort(grpc.StatusCode[code], details)
    if request.startswith(b"sleep:"):
        ms = int(request.decode().split(":")[1])
        deadline = time.monotonic() + ms / 1000.0
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.01)
        if not context.is_active():
            return b""
    if request.startswith(b"flaky:"):
        _, key, n = request.decode().split(":")
        with flaky_lock:
            k = flaky_calls.get(key, 0) + 1
            flaky_calls[key] = k
        if k <= int(n):
            context.abort(grpc.StatusCode.UNAVAILABLE, "flaky %s try %d" % (key, k))
        return ("attempt %d" % k).encode()
    return request


def count(request, context):
    parts = [int(x) for x in request.decode().split(":")]
    n, size, gap = parts[0], parts[1], (parts[2] if len(parts) > 2 else 0)
    for i in range(n):
        if i and gap:
            time.sleep(gap / 1000.0)
        yield (b"%06d" % i + b"x" * max(0, size - 6))


def total(request_iterator, context):
    c = b = 0
    for m in request_iterator:
        c += 1
        b += len(m)
    return ("%d %d" % (c, b)).encode()


def chat(request_iterator, context):
    for m in request_iterator:
        yield b"re:" + m


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    ident = lambda b: b
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, request_deserializer=ident, response_serializer=ident),
        "Count": grpc.unary_stream_rpc_method_handler(count, request_deserializer=ident, response_serializer=ident),
        "Sum": grpc.stream_unary_rpc_method_handler(total, request_deserializer=ident, response_serializer=ident),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, request_deserializer=ident, response_serializer=ident),
    }
    limit = 16 * 1024 * 1024
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32),
                         options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("moonlet.test.Echo", handlers),))
    bound = server.add_insecure_port("127.0.0.1:%d" % port)
    server.start()
    print("PORT %d" % bound, flush=True)
    try:
        sys.stdin.read()
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
