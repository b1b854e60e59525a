"""A small Keystone v3 + Nova + Glance v2 server on 127.0.0.1, for the ``cloud`` tests.

OpenStack has no maintained simulator, so this serves the documented subset vcycle uses
(VCYCLE.md §7.1, at Nova's base microversion 2.1): version documents, ``POST /v3/auth/tokens``
(password and application credential) answering tokens and catalogs built by keystoneauth1's
own ``fixture.V3Token``, Nova flavors/limits/servers/actions/key pairs with pagination, and
Glance v2 image list/create/upload. Every API call needs a token it issued. test_cloud_openstack
proves it against openstacksdk before the backend is tested against it.

Test controls: ``faults`` (statuses answered to the next API calls), ``stall`` (set: API calls
wait until it is cleared, as a cloud that hangs), ``answers`` (a fixed status and body for one
path), ``set_server`` (move a server to a state), ``requests`` (log).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import json
import ssl
import threading
import time
import urllib.parse
import uuid as uuidlib
from typing import Any, Optional

from keystoneauth1 import fixture

USER, PASSWORD, PROJECT, DOMAIN = "vcycle", "emulator-password-7c1e", "lhcb", "Default"
CRED_ID, CRED_SECRET = "appcred-1", "emulator-appcred-secret-9d2a"
REGION = "RegionOne"
FLAVORS = [("1", "m1.small", 1, 2048), ("2", "m1.medium", 2, 4096), ("4", "m1.large", 4, 8192)]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class OpenStackEmulator:
    def __init__(self, *, max_total_cores: int = 20, page_size: int = 1000,
                 tls_context: Optional[ssl.SSLContext] = None) -> None:
        self.max_total_cores = max_total_cores
        self.page_size = page_size
        self.servers: dict[str, dict] = {}  # id -> server (Nova representation)
        self.images: dict[str, dict] = {}
        self.image_data: dict[str, bytes] = {}
        self.keypairs: dict[str, dict] = {}
        self.user_data: dict[str, bytes] = {}  # server id -> decoded user_data
        self.tokens: set = set()
        self.faults: list[int] = []
        self.stall = threading.Event()  # set: API calls hang until it is cleared (or 60 s)
        self.answers: dict[tuple[str, str], tuple[int, Any]] = {}  # (method, path) -> answer
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[Any] = []  # JSON bodies of API calls, in order
        self._lock = threading.Lock()
        emulator = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                emulator._handle(self)

            do_POST = do_PUT = do_DELETE = do_GET  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls_context is not None:
            self._server.socket = tls_context.wrap_socket(self._server.socket, server_side=True)
        scheme = "https" if tls_context is not None else "http"
        self.base = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self.auth_url = f"{self.base}/identity/v3"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    # --- test controls -----------------------------------------------------------------------

    def set_server(self, server_id: str, status: str, power_state: int = 1,
                   task_state: Optional[str] = None) -> None:
        with self._lock:
            server = self.servers[server_id]
            server.update({"status": status, "OS-EXT-STS:power_state": power_state,
                           "OS-EXT-STS:task_state": task_state, "updated": _now()})
            if status == "ACTIVE" and not server.get("OS-SRV-USG:launched_at"):
                server["OS-SRV-USG:launched_at"] = _now()[:-1] + ".000000"

    # --- plumbing ----------------------------------------------------------------------------

    def _handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        parts = urllib.parse.urlsplit(request.path)
        path = parts.path.rstrip("/") or "/"
        query = dict(urllib.parse.parse_qsl(parts.query))
        body = _read_body(request)
        with self._lock:
            self.requests.append((request.command, path))
            status, answer, headers = self._route(request, path, query, body)
        payload = b"" if answer is None else json.dumps(answer).encode()
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        if payload:
            request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    def _route(self, request: Any, path: str, query: dict, body: bytes) -> tuple[int, Any, dict]:
        method = request.command
        if path.startswith("/identity"):
            return self._identity(method, path[len("/identity"):], body)
        version = self._version_document(path)
        if version is not None:
            return 200, version, {}
        if request.headers.get("X-Auth-Token") not in self.tokens:
            return 401, {"error": {"code": 401, "message": "The request you have made requires authentication."}}, {}
        deadline = time.monotonic() + 60
        while self.stall.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.faults:
            fault = self.faults.pop(0)
            return fault, {"computeFault": {"code": fault, "message": f"injected {fault}"}}, \
                {"Retry-After": "0"} if fault == 429 else {}
        if (method, path) in self.answers:
            status, answer = self.answers[(method, path)]
            return status, answer, {}
        data: Any = None
        if body and request.headers.get("Content-Type", "").startswith("application/json"):
            try:
                data = json.loads(body)
            except ValueError:
                return 400, {"badRequest": {"code": 400, "message": "malformed JSON"}}, {}
            self.bodies.append(data)
        if path.startswith("/compute/v2.1/"):
            return self._compute(method, path[len("/compute/v2.1/"):], query, data)
        if path.startswith("/image/v2/"):
            return self._image(method, path[len("/image/v2/"):], query, data, body, request)
        return 404, {"itemNotFound": {"code": 404, "message": f"no route {path}"}}, {}

    def _version_document(self, path: str) -> Optional[dict]:
        compute = {"id": "v2.1", "status": "CURRENT", "version": "2.1", "min_version": "2.1",
                   "updated": "2013-07-23T11:33:21Z",
                   "links": [{"rel": "self", "href": f"{self.base}/compute/v2.1/"}]}
        image = {"id": "v2.9", "status": "CURRENT",
                 "links": [{"rel": "self", "href": f"{self.base}/image/v2/"}]}
        return {"/compute": {"versions": [compute]}, "/compute/v2.1": {"version": compute},
                "/image": {"versions": [image]}, "/image/v2": {"versions": [image]}}.get(path)

    # --- Keystone ----------------------------------------------------------------------------

    def _identity(self, method: str, path: str, body: bytes) -> tuple[int, Any, dict]:
        v3 = {"id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
              "links": [{"rel": "self", "href": f"{self.auth_url}/"}],
              "media-types": [{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}]}
        if method == "GET" and path in ("", "/"):
            return 300, {"versions": {"values": [v3]}}, {}
        if method == "GET" and path == "/v3":
            return 200, {"version": v3}, {}
        if method != "POST" or path != "/v3/auth/tokens":
            return 404, {"error": {"code": 404, "message": "not found"}}, {}
        try:
            identity = json.loads(body)["auth"]["identity"]
            methods = identity["methods"]
        except (ValueError, KeyError, TypeError):
            return 400, {"error": {"code": 400, "message": "malformed auth request"}}, {}
        if methods == ["password"]:
            user = identity["password"]["user"]
            scope = json.loads(body)["auth"].get("scope", {}).get("project", {})
            good = (user.get("name"), user.get("domain", {}).get("name"), user.get("password"),
                    scope.get("name"), scope.get("domain", {}).get("name")) == (USER, DOMAIN, PASSWORD, PROJECT, DOMAIN)
        elif methods == ["application_credential"]:
            credential = identity["application_credential"]
            good = (credential.get("id"), credential.get("secret")) == (CRED_ID, CRED_SECRET)
        else:
            good = False
        if not good:
            return 401, {"error": {"code": 401, "message": "The request you have made requires authentication.",
                                   "title": "Unauthorized"}}, {}
        token = fixture.V3Token(user_name=USER, user_domain_name=DOMAIN, project_name=PROJECT,
                                project_domain_name=DOMAIN, methods=methods)
        for service_type, name, url in (("compute", "nova", f"{self.base}/compute/v2.1"),
                                        ("image", "glance", f"{self.base}/image"),
                                        ("identity", "keystone", self.auth_url)):
            service = token.add_service(service_type, name=name)
            service.add_standard_endpoints(public=url, internal=url, region=REGION)
            # Another region's endpoint: a client ignoring the region would talk to a closed port.
            service.add_endpoint("public", "http://127.0.0.1:9/", region="RegionTwo")
        token_id = uuidlib.uuid4().hex
        self.tokens.add(token_id)
        return 201, dict(token), {"X-Subject-Token": token_id}

    # --- Nova --------------------------------------------------------------------------------

    def _flavor(self, flavor_id: str) -> Optional[dict]:
        for fid, name, vcpus, ram in FLAVORS:
            if fid == flavor_id:
                return {"id": fid, "name": name, "vcpus": vcpus, "ram": ram, "disk": 10,
                        "OS-FLV-EXT-DATA:ephemeral": 0, "swap": "", "rxtx_factor": 1.0,
                        "os-flavor-access:is_public": True, "OS-FLV-DISABLED:disabled": False,
                        "links": [{"rel": "self", "href": f"{self.base}/compute/v2.1/flavors/{fid}"}]}
        return None

    def _compute(self, method: str, path: str, query: dict, data: Any) -> tuple[int, Any, dict]:
        if method == "GET" and path == "flavors/detail":
            return 200, {"flavors": [self._flavor(fid) for fid, *_ in FLAVORS]}, {}
        if method == "GET" and path == "limits":
            used = sum(self._flavor(s["flavor"]["id"])["vcpus"] for s in self.servers.values())
            return 200, {"limits": {"rate": [], "absolute": {
                "maxTotalCores": self.max_total_cores, "totalCoresUsed": used,
                "maxTotalInstances": 100, "totalInstancesUsed": len(self.servers)}}}, {}
        if method == "GET" and path == "servers/detail":
            return 200, self._server_page(query), {}
        if method == "POST" and path == "servers":
            return self._create_server(data)
        if path.startswith("servers/"):
            server_id, _, action = path[len("servers/"):].partition("/")
            server = self.servers.get(server_id)
            if server is None:
                return 404, {"itemNotFound": {"code": 404, "message": f"Instance {server_id} could not be found."}}, {}
            if method == "GET" and not action:
                return 200, {"server": server}, {}
            if method == "DELETE" and not action:
                del self.servers[server_id]
                return 204, None, {}
            if method == "POST" and action == "action" and isinstance(data, dict) and "os-stop" in data:
                if server["status"] == "SHUTOFF":
                    return 409, {"conflictingRequest": {"code": 409, "message": "already stopped"}}, {}
                server.update({"status": "SHUTOFF", "OS-EXT-STS:power_state": 4, "updated": _now()})
                return 202, None, {}
        if path == "os-keypairs" and method == "GET":
            return 200, {"keypairs": [{"keypair": pair} for pair in self.keypairs.values()]}, {}
        if path == "os-keypairs" and method == "POST":
            pair = data.get("keypair", {}) if isinstance(data, dict) else {}
            if not isinstance(pair.get("name"), str) or not isinstance(pair.get("public_key"), str):
                return 400, {"badRequest": {"code": 400, "message": "keypair needs name and public_key"}}, {}
            if pair["name"] in self.keypairs:
                return 409, {"conflictingRequest": {"code": 409, "message": "Key pair already exists"}}, {}
            stored = {"name": pair["name"], "public_key": pair["public_key"], "type": "ssh",
                      "fingerprint": hashlib.md5(pair["public_key"].encode()).hexdigest()}  # noqa: S324 - a label
            self.keypairs[pair["name"]] = stored
            return 200, {"keypair": stored}, {}
        if path.startswith("os-keypairs/") and method == "GET":
            pair = self.keypairs.get(path[len("os-keypairs/"):])
            if pair is None:
                return 404, {"itemNotFound": {"code": 404, "message": "Keypair not found"}}, {}
            return 200, {"keypair": pair}, {}
        return 404, {"itemNotFound": {"code": 404, "message": f"no route {path}"}}, {}

    def _server_page(self, query: dict) -> dict:
        servers = sorted(self.servers.values(), key=lambda server: server["id"])
        if "marker" in query:
            servers = [server for server in servers if server["id"] > query["marker"]]
        limit = min(int(query.get("limit", self.page_size)), self.page_size)
        page = {"servers": servers[:limit]}
        if len(servers) > limit:
            marker = servers[limit - 1]["id"]
            page["servers_links"] = [{"rel": "next",
                                      "href": f"{self.base}/compute/v2.1/servers/detail?limit={limit}&marker={marker}"}]
        return page

    def _create_server(self, data: Any) -> tuple[int, Any, dict]:
        server = data.get("server") if isinstance(data, dict) else None
        if not isinstance(server, dict) or not isinstance(server.get("name"), str):
            return 400, {"badRequest": {"code": 400, "message": "server needs a name"}}, {}
        flavor = self._flavor(str(server.get("flavorRef")))
        image = self.images.get(str(server.get("imageRef")))
        if flavor is None or image is None or image["status"] != "active":
            return 400, {"badRequest": {"code": 400, "message": "invalid flavorRef or imageRef"}}, {}
        if "key_name" in server and server["key_name"] not in self.keypairs:
            return 400, {"badRequest": {"code": 400, "message": "Invalid key_name provided."}}, {}
        try:
            base64.b64decode(server.get("user_data", ""), validate=True)
        except ValueError:
            return 400, {"badRequest": {"code": 400, "message": "User data needs to be valid base 64."}}, {}
        used = sum(self._flavor(s["flavor"]["id"])["vcpus"] for s in self.servers.values())
        if used + flavor["vcpus"] > self.max_total_cores:
            return 403, {"forbidden": {"code": 403, "message": "Quota exceeded for cores"}}, {}
        server_id = str(uuidlib.uuid4())
        # Nova at 2.1 never shows user_data back: kept aside for the tests.
        self.user_data[server_id] = base64.b64decode(server.get("user_data", ""))
        now = _now()
        self.servers[server_id] = {
            "id": server_id, "name": server["name"], "status": "BUILD", "tenant_id": "project",
            "user_id": USER, "metadata": dict(server.get("metadata") or {}),
            "flavor": {"id": flavor["id"], "links": []}, "image": {"id": image["id"], "links": []},
            "created": now, "updated": now, "addresses": {}, "key_name": server.get("key_name"),
            "OS-EXT-STS:task_state": "scheduling", "OS-EXT-STS:vm_state": "building",
            "OS-EXT-STS:power_state": 0, "OS-SRV-USG:launched_at": None,
            "OS-EXT-AZ:availability_zone": server.get("availability_zone", "nova"),
            "links": [], "accessIPv4": "", "accessIPv6": "",
            "hostId": "", "config_drive": "", "progress": 0,
        }
        return 202, {"server": {"id": server_id, "links": [], "adminPass": "x",
                                "OS-DCF:diskConfig": "MANUAL", "security_groups": [{"name": "default"}]}}, {}

    # --- Glance ------------------------------------------------------------------------------

    def _image(self, method: str, path: str, query: dict, data: Any, body: bytes,
               request: Any) -> tuple[int, Any, dict]:
        if method == "GET" and path == "images":
            images = sorted(self.images.values(), key=lambda image: image["id"])
            for key in ("name", "status"):
                if key in query:
                    images = [image for image in images if image[key] == query[key]]
            if "marker" in query:
                images = [image for image in images if image["id"] > query["marker"]]
            limit = min(int(query.get("limit", self.page_size)), self.page_size)
            page: dict = {"images": images[:limit], "first": "/v2/images", "schema": "/v2/schemas/images"}
            if len(images) > limit:
                rest = {k: v for k, v in query.items() if k != "marker"}
                page["next"] = "/v2/images?" + urllib.parse.urlencode({**rest, "marker": images[limit - 1]["id"]})
            return 200, page, {}
        if method == "POST" and path == "images":
            if not isinstance(data, dict) or data.get("disk_format") not in ("raw", "qcow2", "iso") \
                    or data.get("container_format") != "bare":
                return 400, {"message": "bad image request"}, {}
            image_id = str(uuidlib.uuid4())
            image = {**data, "id": image_id, "status": "queued", "tags": data.get("tags", []),
                     "created_at": _now(), "updated_at": _now(), "size": None, "checksum": None,
                     "file": f"/v2/images/{image_id}/file", "self": f"/v2/images/{image_id}",
                     "schema": "/v2/schemas/image", "visibility": data.get("visibility", "shared"),
                     "protected": False, "min_disk": 0, "min_ram": 0, "owner": "project"}
            self.images[image_id] = image
            return 201, image, {"Location": f"{self.base}/image/v2/images/{image_id}"}
        if path.startswith("images/"):
            image_id, _, rest = path[len("images/"):].partition("/")
            image = self.images.get(image_id)
            if image is None:
                return 404, {"message": "image not found"}, {}
            if method == "GET" and not rest:
                return 200, image, {}
            if method == "DELETE" and not rest:
                del self.images[image_id]
                return 204, None, {}
            if method == "PUT" and rest == "file":
                if request.headers.get("Content-Type") != "application/octet-stream":
                    return 415, {"message": "Content-Type must be application/octet-stream"}, {}
                self.image_data[image_id] = body
                image.update({"status": "active", "size": len(body), "updated_at": _now(),
                              "checksum": hashlib.md5(body).hexdigest()})  # noqa: S324 - Glance's field
                return 204, None, {}
        return 404, {"message": f"no route {path}"}, {}


def _read_body(request: http.server.BaseHTTPRequestHandler) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        for _ in range(1_000_000):  # bounded: a test upload is far smaller
            size = int(request.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                request.rfile.readline()
                break
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
        return b"".join(chunks)
    length = int(request.headers.get("Content-Length") or 0)
    return request.rfile.read(length) if length else b""
