"""A large policy import runs off the agent's event loop: the API keeps answering."""

from __future__ import annotations

import threading
import time

from pilus.api.client import Client

DOCS = 2000


def _policies(n: int) -> str:
    docs = []
    for i in range(n):
        docs.append(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
            f"metadata: {{name: bulk-{i}, namespace: bulk}}\n"
            "spec:\n"
            f"  endpointSelector: {{matchLabels: {{app: svc-{i}}}}}\n"
            f"  ingress: [{{fromEndpoints: [{{matchLabels: {{app: client-{i}}}}}], "
            f"toPorts: [{{ports: [{{port: \"{1000 + i}\", protocol: TCP}}]}}]}}]\n"
        )
    return "---\n".join(docs)


def test_large_import_does_not_stall_the_api(api, node):
    text = _policies(DOCS)
    result: dict = {}

    def run_import():
        slow = Client(node["socket"], timeout=300)
        result["reply"] = slow.request("PUT", "/policy", {"yaml": text})

    importer = threading.Thread(target=run_import)
    started = time.monotonic()
    importer.start()
    answered = []
    try:
        while importer.is_alive():
            t0 = time.monotonic()
            assert api.healthz()["agent"]["state"] == "Ok"
            answered.append(time.monotonic() - t0)
            time.sleep(0.2)
        importer.join()
        duration = time.monotonic() - started
        assert len(result["reply"]["imported"]) == DOCS
        # the API answered all along the import (liveness, not a benchmark: generous bound)
        assert len(answered) >= 3, (duration, answered)
        assert max(answered) < 2.0, answered
        assert api.request("GET", "/policy")["revision"] == result["reply"]["revision"]
    finally:
        importer.join()
        api.request("DELETE", "/policy?all=true")
