# Recomputes the test vectors of docs/PROTOCOL.md section 2.3 from the
# document alone (Python standard library + the `cryptography` package),
# as a check that the description and crates/proto/src/secure.rs agree.
import hashlib, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
def hkdf_extract(salt, ikm):
    return hmac.new(salt, ikm, hashlib.sha256).digest()
def hkdf_expand(prk, info, n):
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest(); out += t; i += 1
    return out[:n]
def hkdf(salt, ikm, info, n):
    return hkdf_expand(hkdf_extract(salt, ikm), info, n)
def u64(n):
    return n.to_bytes(8, "big")
def nonce(counter):
    return b"\x00"*4 + u64(counter)
def link_key(key, nc, ns, counter, half):
    okm = hkdf(nc + ns, key, b"p2pchat v2 link" + u64(counter >> 20), 64)
    return okm[32*half:32*half + 32]
def group_key(key, epoch, term, counter):
    return hkdf(b"p2pchat v2", key, b"group" + u64(epoch) + term + u64(counter >> 20), 32)
key = bytes(range(32)); nc = b"\x11"*32; ns = b"\x22"*32
print("key_id", hashlib.sha256(b"p2pchat key id" + key).digest()[:4].hex())
ka = hkdf(b"p2pchat v2", key, b"auth", 32)
print("server_proof", hmac.new(ka, b"p2pchat server" + nc + ns, hashlib.sha256).hexdigest())
print("client_proof", hmac.new(ka, b"p2pchat client" + nc + ns, hashlib.sha256).hexdigest())
ct = AESGCM(link_key(key, nc, ns, 0, 0)).encrypt(nonce(0), b"{}", b"\x00")
print("link_record", (b"\x00" + ct).hex())
frames = b"\x00\x00\x00\x02{}\x00\x00\x00\x02{}"
ct = AESGCM(link_key(key, nc, ns, 1, 0)).encrypt(nonce(1), frames, b"\x02")
print("second_client_record_batch", (b"\x02" + ct).hex())
c = 1 << 20
ct = AESGCM(link_key(key, nc, ns, c, 0)).encrypt(nonce(c), b"{}", b"\x00")
print("client_link_record_2^20", (b"\x00" + ct).hex())
term = b"\x33"*16
for c in [2, 1 << 20]:
    header = b"\x01" + u64(1) + term + u64(c)
    ct = AESGCM(group_key(key, 1, term, c)).encrypt(nonce(c), b"{}", header)
    print("group_record_counter_%d" % c, (header + ct).hex())
print("session_id_42", int.from_bytes(hashlib.sha256(b"p2pchat session" + u64(42)).digest()[:8], "big") | 1)
# The chain hash (section 3.1) over two entries: a chat message and a join.
def s(b):
    return len(b).to_bytes(4, "big") + b
chat = b"\x01" + u64(1) + u64(1) + s(b"alice") + u64(1) + u64(7) + s("h\u00e9llo".encode()) + b"\x00"
joined = b"\x02" + u64(1) + u64(2) + u64(2) + s(b"bob") + b"\x01" + s(b"127.0.0.1:7102") + u64(9) + b"\x00"
h1 = hashlib.sha256(b"p2pchat chain\x00" + b"\x00"*32 + chat).digest()
h2 = hashlib.sha256(b"p2pchat chain\x00" + h1 + joined).digest()
print("chain_1_chat", h1.hex())
print("chain_2_joined", h2.hex())
