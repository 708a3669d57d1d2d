import hashlib, hmac
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
def hkdf(salt, ikm, info, n):
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest(); out += t; i += 1
    return out[:n]
key = bytes(range(32)); nc = b"\x11"*32; ns = b"\x22"*32
print("key_id", hashlib.sha256(b"p2pchat key id" + key).digest()[:4].hex())
ka = hkdf(b"p2pchat v2", key, b"auth", 32)
print("server_proof", hmac.new(ka, b"p2pchat server" + nc + ns, hashlib.sha256).hexdigest())
print("client_proof", hmac.new(ka, b"p2pchat client" + nc + ns, hashlib.sha256).hexdigest())
lk = hkdf(nc + ns, key, b"p2pchat v2 link", 64)
ct = ChaCha20Poly1305(lk[:32]).encrypt(b"\x00"*12, b"{}", b"\x00")
print("link_record", (b"\x00" + ct).hex())
frames = b"\x00\x00\x00\x02{}\x00\x00\x00\x02{}"
ct = ChaCha20Poly1305(lk[:32]).encrypt(b"\x00"*4 + (1).to_bytes(8, "big"), frames, b"\x02")
print("second_client_record_batch", (b"\x02" + ct).hex())
term = b"\x33"*16
gk = hkdf(b"p2pchat v2", key, b"group" + (1).to_bytes(8, "big") + term, 32)
header = b"\x01" + (1).to_bytes(8, "big") + term + (2).to_bytes(8, "big")
ct = ChaCha20Poly1305(gk).encrypt(b"\x00"*4 + (2).to_bytes(8, "big"), b"{}", header)
print("group_record", (header + ct).hex())
print("session_id_42", int.from_bytes(hashlib.sha256(b"p2pchat session" + (42).to_bytes(8, "big")).digest()[:8], "big") | 1)
