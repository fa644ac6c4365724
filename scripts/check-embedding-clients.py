"""The stock `openai` SDK and plain HTTP calls of TEI's /embed against a running Quiver that
serves a sentence-embedding model. Every embedding must equal the KServe v2 route's for the same
text (cosine 1 within 1e-6). Prints a transcript; exits non-zero on the first surprise.

Usage: check-embedding-clients.py HTTP_ADDR TOKEN MODEL
"""

import base64
import json
import math
import struct
import sys
import urllib.error
import urllib.request

import openai
from openai import OpenAI

http_addr, token, model = sys.argv[1:4]
base = f"http://{http_addr}"
TEXTS = [
    "A man is eating food.",
    "The new movie is awesome",
    "Edge gateways batch requests for the accelerator.",
    "Ünïcödé, emoji 🚀 and CJK 文字 tokenize too.",
]


def say(*args):
    print("  ", *args, flush=True)


def expect(cond, what):
    if not cond:
        print(f"check-embedding-clients: FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def post(path, body):
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def cosine(a, b):
    expect(len(a) == len(b), f"widths {len(a)} and {len(b)}")
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def same(got, want, what):
    c = cosine(got, want)
    expect(abs(1.0 - c) <= 1e-6, f"{what}: cosine {c:.9f} to the KServe route's")
    return c


# The KServe route: the reference for everything below.
status, _, v = post(f"/v2/models/{model}/infer", {
    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]})
expect(status == 200, f"KServe infer: {status} {v}")
out = v["outputs"][0]
dim = out["shape"][1]
kserve = [out["data"][i * dim:(i + 1) * dim] for i in range(len(TEXTS))]
say(f"KServe /v2/models/{model}/infer: {len(TEXTS)} x {dim}")
status, _, toks = post("/tokenize", {"inputs": TEXTS})
expect(status == 200, f"/tokenize: {status} {toks}")
tokens = [len(t) for t in toks]
say("/tokenize token counts:", tokens)

print(f"openai {openai.__version__} base_url={base}/v1")
client = OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0, timeout=60)

models = [m.id for m in client.models.list()]
say("models.list() ->", models)
expect(model in models, "the model is listed")

r = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
cos = [same(d.embedding, kserve[d.index], f"float, many: input {d.index}") for d in r.data]
expect([d.index for d in r.data] == list(range(len(TEXTS))), "indices in order")
expect(r.usage.prompt_tokens == sum(tokens) == r.usage.total_tokens,
       f"usage {r.usage} against {sum(tokens)} tokens")
say(f"embeddings.create(float, {len(TEXTS)} strings): min cosine {min(cos):.9f}, usage {r.usage}")

r = client.embeddings.create(model=model, input=TEXTS[0], encoding_format="float")
same(r.data[0].embedding, kserve[0], "float, one string")
expect(r.usage.prompt_tokens == tokens[0], "usage of one string")
say(f"embeddings.create(float, one string): cosine ok, usage {r.usage.prompt_tokens}")

# The SDK's default: it asks for base64 on the wire and decodes it into floats.
r = client.embeddings.create(model=model, input=TEXTS)
cos = [same(d.embedding, kserve[d.index], f"SDK default (base64 on the wire): input {d.index}")
       for d in r.data]
say(f"embeddings.create(default: base64 on the wire, decoded by the SDK): min cosine {min(cos):.9f}")

r = client.embeddings.create(model=model, input=TEXTS[2], encoding_format="base64")
raw = base64.b64decode(r.data[0].embedding)
vec = list(struct.unpack(f"<{len(raw) // 4}f", raw))
expect(len(vec) == dim, f"base64 of {dim} little-endian f32")
same(vec, kserve[2], "base64, one string")
say("embeddings.create(base64, one string): little-endian f32, cosine ok")

r = client.embeddings.create(model=model, input=TEXTS[:2], encoding_format="base64")
for d in r.data:
    raw = base64.b64decode(d.embedding)
    same(list(struct.unpack(f"<{dim}f", raw)), kserve[d.index], f"base64, many: input {d.index}")
say("embeddings.create(base64, many strings): cosine ok")

r = client.embeddings.create(model=model, input=TEXTS[1], dimensions=128, encoding_format="float")
e = r.data[0].embedding
expect(len(e) == 128, "dimensions=128")
same(e, kserve[1][:128], "dimensions=128 (cut, normalised again)")
expect(abs(math.sqrt(sum(x * x for x in e)) - 1.0) < 1e-5, "unit norm after the cut")
say("embeddings.create(dimensions=128): 128 values, unit norm")

for call, exc, what in [
    (lambda: client.embeddings.create(model="no-such-model", input="x"), openai.NotFoundError,
     "unknown model"),
    (lambda: client.embeddings.create(model=model, input=[[101, 7592, 102]]), openai.BadRequestError,
     "token ids"),
    (lambda: client.embeddings.create(model=model, input="x", dimensions=dim + 1),
     openai.BadRequestError, "dimensions past the width"),
    (lambda: client.embeddings.create(model=model, input=[f"t{i}" for i in range(33)]),
     openai.BadRequestError, "33 inputs"),
    (lambda: OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).embeddings.create(
        model=model, input="x"), openai.AuthenticationError, "a wrong token"),
]:
    try:
        call()
        expect(False, f"{what}: no error")
    except exc as e:
        body = e.body if isinstance(e.body, dict) else {}
        expect(isinstance(body.get("message"), str), f"{what}: OpenAI's error shape, got {e.body}")
        say(f"{what} -> {type(e).__name__} {e.status_code}: {body.get('message')}")

print(f"text-embeddings-inference routes, plain HTTP, {base}")
status, headers, v = post("/embed", {"inputs": TEXTS})
expect(status == 200, f"/embed: {status} {v}")
cos = [same(v[i], kserve[i], f"/embed: input {i}") for i in range(len(TEXTS))]
say(f"POST /embed (many): min cosine {min(cos):.9f}, x-quiver-truncated {headers.get('x-quiver-truncated')}")
status, _, v = post("/embed", {"inputs": TEXTS[3], "truncate": False})
expect(status == 200, f"/embed one: {status} {v}")
same(v[0], kserve[3], "/embed: one string")
say("POST /embed (one string, truncate false): cosine ok")
long = "edge gateways batch requests for the accelerator " * 60
status, _, v = post("/embed", {"inputs": long, "truncate": False})
expect(status == 413 and v.get("error_type") == "validation", f"/embed too long: {status} {v}")
say(f"POST /embed (a long text, truncate false) -> 413: {v['error']}")
with urllib.request.urlopen(urllib.request.Request(
        base + "/info", headers={"Authorization": f"Bearer {token}"}), timeout=10) as r:
    info = json.loads(r.read())
say("GET /info ->", info)
expect(info["model_id"] == model and info["max_input_length"] == 256, "/info")
