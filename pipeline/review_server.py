"""`ivl review serve`: a small local web app that pages through a curate run's review/ rows.

Standard library only (`http.server`), bound to 127.0.0.1 by default. Read-only against the shards; the one
write is an appended line in the decisions file (`pipeline.review`). Row text reaches the page as JSON and is
put into the DOM with `textContent`, never as HTML, and the page's Content-Security-Policy allows only its own
script, so a sample holding `<script>` shows as text. Requests whose Host is not this server's (DNS rebinding)
and decision POSTs that are not `application/json` (cross-site form posts) are refused.
"""

from __future__ import annotations

import json
import os
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlparse

from pipeline.io import image_ext
from pipeline.review import ReviewSet, append_decision, decisions_path, load_decisions

IMAGE_TYPES = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp", "bmp": "image/bmp"}
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'"


class ReviewApp:
    """The state behind the handler: the indexed review set and the decisions file."""

    def __init__(self, run: str, decisions_file: str | None = None, reviewer: str = ""):
        self.rows = ReviewSet.open(run)
        self.index = {rid: i for i, rid in enumerate(self.rows.ids)}
        self.path = decisions_file or decisions_path(run)
        self.reviewer = reviewer
        self.lock = threading.Lock()
        self.decided = load_decisions([self.path]) if os.path.exists(self.path) else {}

    def listing(self, q: dict[str, str]) -> dict:
        lo, hi = _float(q.get("min")), _float(q.get("max"))
        hits = [i for i in range(len(self.rows)) if self.rows.matches(
            i, q.get("reason", ""), q.get("source", ""), q.get("score", ""), lo, hi)]
        if q.get("undecided") == "1":
            hits = [i for i in hits if self.rows.ids[i] not in self.decided]
        off, lim = int(q.get("offset", 0) or 0), min(int(q.get("limit", 50) or 50), 500)
        return {"total": len(hits), "offset": off, "rows": [self.brief(i) for i in hits[off: off + lim]],
                "reasons": sorted({r for rs in self.rows.reasons for r in rs}),
                "sources": sorted(set(self.rows.sources)),
                "scores": sorted({c for s in self.rows.scores for c in s}),
                "decided": len(self.decided)}

    def brief(self, i: int) -> dict:
        rid = self.rows.ids[i]
        d = self.decided.get(rid, {})
        return {"idx": i, "id": rid, "source": self.rows.sources[i], "reasons": self.rows.reasons[i],
                "scores": self.rows.scores[i],
                "decision": d.get("decision", ""), "note": d.get("note", "")}

    def detail(self, i: int) -> dict:
        row = self.rows.row(i)
        return self.brief(i) | {
            "images": len(row.get("images") or []), "category": row.get("category", ""), "conversations": row.get("conversations") or [],
            "meta": row.get("meta", ""), "dup_neighbours": self.rows.dup_neighbours.get(self.rows.ids[i], [])}

    def decide(self, rid: str, decision: str, note: str) -> dict:
        if rid not in self.index:
            raise KeyError(rid)
        with self.lock:  # one writer at a time: lines never interleave
            rec = append_decision(self.path, rid, decision, note, self.reviewer)
            self.decided[rid] = rec
        return rec


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def _asset(name: str) -> bytes:
    return resources.files("pipeline").joinpath("review_page", name).read_bytes()


def make_handler(app: ReviewApp, allowed_hosts: set[str]):
    class Handler(BaseHTTPRequestHandler):
        server_version = "ivl-review"

        def log_message(self, fmt, *args):  # quiet: the terminal shows the URL, not every request
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj, status: int = 200) -> None:
            self._send(status, json.dumps(obj, ensure_ascii=False, allow_nan=False).encode(), "application/json")

        def _host_ok(self) -> bool:
            if self.headers.get("Host", "") in allowed_hosts:
                return True
            self._json({"error": "unknown host"}, HTTPStatus.FORBIDDEN)
            return False

        def do_GET(self):  # noqa: N802 (http.server's name)
            if not self._host_ok():
                return
            url = urlparse(self.path)
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            parts = [p for p in url.path.split("/") if p]
            try:
                if not parts:
                    return self._send(200, _asset("index.html"), "text/html; charset=utf-8")
                if parts == ["app.js"]:
                    return self._send(200, _asset("app.js"), "text/javascript; charset=utf-8")
                if parts == ["app.css"]:
                    return self._send(200, _asset("app.css"), "text/css; charset=utf-8")
                if parts == ["api", "rows"]:
                    return self._json(app.listing(q))
                if len(parts) == 3 and parts[:2] == ["api", "row"]:
                    return self._json(app.detail(int(parts[2])))
                if len(parts) == 4 and parts[:2] == ["api", "image"]:
                    data = app.rows.row(int(parts[2]))["images"][int(parts[3])]
                    return self._send(200, data, IMAGE_TYPES.get(image_ext(data), "application/octet-stream"))
            except (IndexError, ValueError):
                return self._json({"error": "no such row or image"}, HTTPStatus.NOT_FOUND)
            self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)

        def do_POST(self):  # noqa: N802
            if not self._host_ok():
                return
            if urlparse(self.path).path != "/api/decision":
                return self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                return self._json({"error": "decisions are JSON"}, HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
            try:
                body = json.loads(self.rfile.read(min(int(self.headers.get("Content-Length", 0)), 1 << 20)))
                rec = app.decide(str(body["id"]), str(body["decision"]), str(body.get("note", ""))[:4000])
            except KeyError:
                return self._json({"error": "unknown row id"}, HTTPStatus.NOT_FOUND)
            except (ValueError, TypeError) as e:
                return self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)
            self._json(rec)

    return Handler


def serve(run: str, host: str = "127.0.0.1", port: int = 0, decisions_file: str | None = None,
          reviewer: str = "") -> tuple[ThreadingHTTPServer, str]:
    """Bind the server (call `serve_forever` to serve); returns it (`.app` holds the state) and its URL."""
    app = ReviewApp(run, decisions_file, reviewer)
    httpd = ThreadingHTTPServer((host, port), None)
    bound = httpd.server_address[1]
    names = {host, "127.0.0.1", "localhost"} if host in ("127.0.0.1", "localhost") else {host}
    httpd.RequestHandlerClass = make_handler(app, {f"{h}:{bound}" for h in names})
    httpd.app = app
    return httpd, f"http://{host}:{bound}/"
