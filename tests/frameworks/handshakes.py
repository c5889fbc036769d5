"""redis-py as an app uses it, through redcloak: connects (redis-py 8 sends
CLIENT SETINFO twice; with protocol=3, HELLO 3 first), writes and reads a
few values. Usage: handshakes.py PORT PROTOCOL. Prints "ok"."""
import sys

import redis

port, protocol = int(sys.argv[1]), int(sys.argv[2])
client = redis.Redis(host="127.0.0.1", port=port, protocol=protocol)
for i in range(3):
    key = f"handshake:py{protocol}:{i}"
    client.set(key, f"value-{i}")
    assert client.get(key) == f"value-{i}".encode(), key
client.close()
print("ok")
