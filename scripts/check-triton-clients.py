"""Triton's stock Python client (tritonclient) against a running Quiver, over HTTP and gRPC:
the model repository extension (index, load with a config override, unload), model readiness,
and inference on a named version. Prints a transcript; exits non-zero on the first surprise.

Usage: check-triton-clients.py HTTP_ADDR GRPC_ADDR REPOSITORY_DIR
The repository holds `echo/model.toml` (an identity model, `version_policy = "all"`) and
version 1; this script adds version 2, then narrows the policy to version 2 alone.
"""

import json
import os
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

http_addr, grpc_addr, repo = sys.argv[1:4]


def say(*args):
    print("  ", *args, flush=True)


def expect(cond, what):
    if not cond:
        print(f"check-triton-clients: FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def infer(client, mod, version=""):
    data = np.array([[1.5, -2.0, 3.25]], dtype=np.float32)
    inp = mod.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    result = client.infer("echo", [inp], model_version=version)
    out = result.as_numpy("OUTPUT0")
    expect(np.array_equal(out, data), f"echo returned {out}")
    return result.get_response()


for name, mod, addr in (("http", httpclient, http_addr), ("grpc", grpcclient, grpc_addr)):
    print(f"tritonclient.{name} {addr}")
    client = mod.InferenceServerClient(url=addr)
    v2 = os.path.join(repo, "echo", "2")
    if os.path.isdir(v2):
        os.rmdir(v2)
    # Start from version 1 alone (the previous protocol's pass narrowed the policy).
    client.load_model("echo", config=json.dumps({"version_policy": {"all": {}}}))
    index = client.get_model_repository_index()
    say("get_model_repository_index() ->", index if name == "http" else json.loads(
        __import__("google.protobuf.json_format", fromlist=["x"]).MessageToJson(index)))
    say("is_model_ready('echo') ->", client.is_model_ready("echo"))
    expect(client.is_model_ready("echo"), "echo ready")
    say("is_model_ready('echo', '2') ->", client.is_model_ready("echo", "2"))
    expect(not client.is_model_ready("echo", "2"), "version 2 not ready before its load")

    os.mkdir(v2)
    client.load_model("echo")
    say("load_model('echo') with version 2 in the repository -> ok")
    say("is_model_ready('echo', '1'), ('echo', '2') ->",
        client.is_model_ready("echo", "1"), client.is_model_ready("echo", "2"))
    expect(client.is_model_ready("echo", "1") and client.is_model_ready("echo", "2"),
           "both versions ready under version_policy all")
    resp = infer(client, mod)
    version = resp["model_version"] if name == "http" else resp.model_version
    say("infer('echo') answered by version", version)
    expect(version == "2", "the newest version answers requests that name none")
    resp = infer(client, mod, "1")
    version = resp["model_version"] if name == "http" else resp.model_version
    say("infer('echo', model_version='1') answered by version", version)
    expect(version == "1", "a named version answers")

    override = json.dumps({"version_policy": {"specific": {"versions": [2]}}})
    client.load_model("echo", config=override)
    say(f"load_model('echo', config='{override}') -> ok")
    say("is_model_ready('echo', '1') ->", client.is_model_ready("echo", "1"))
    expect(not client.is_model_ready("echo", "1"), "version 1 unloaded by the override")

    try:
        client.load_model("no-such-model")
        expect(False, "loading an unknown model fails")
    except InferenceServerException as e:
        say("load_model('no-such-model') -> InferenceServerException:", e.message())

    client.unload_model("echo")
    say("unload_model('echo') -> ok; is_model_ready('echo') ->", client.is_model_ready("echo"))
    expect(not client.is_model_ready("echo"), "echo not ready once unloaded")
    client.load_model("echo")
    say("load_model('echo') -> ok; is_model_ready('echo') ->", client.is_model_ready("echo"))
    expect(client.is_model_ready("echo"), "echo ready again")

print("check-triton-clients: tritonclient's repository calls work over HTTP and gRPC")
