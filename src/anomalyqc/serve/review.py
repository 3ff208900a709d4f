"""The operator review page: the latest decisions with their heatmaps, a filter by decision,
and a reviewer's confirm / override, itself appended to the audit trail.

A browser cannot send a bearer header on a plain page load, so the page signs in once: the
form at /review posts the token to /review/login, which sets it as an HttpOnly, SameSite=Strict
cookie that the service accepts like the header (SameSite=Strict keeps other sites from
posting reviews with it). Without a valid cookie /review answers 401 with the sign-in form
and no data. A review is a row of kind "review" with the reviewer's token id, the reviewed
request id, the verdict, the decision it leaves (the original one confirmed, or the opposite
one on override) and an optional note; the original row is never changed.
"""

from __future__ import annotations

import html
import json
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from anomalyqc.serve.audit import Entry

COOKIE = "aqc_token"
_OPPOSITE = {"good": "defect", "defect": "good"}
_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:middle}
tr.defect td.d{color:#b00;font-weight:bold}tr.good td.d{color:#060;font-weight:bold}
img{height:96px;image-rendering:pixelated}nav a{margin-right:1em}
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


_LOGIN = _page("anomalyqc review: sign in", """
<form method="post" action="/review/login">
<label>API token <input type="password" name="token" autocomplete="off"></label>
<button type="submit">Sign in</button></form>""")


async def _form(request: Request) -> dict[str, str]:
    """application/x-www-form-urlencoded body, bounded (a form here is a few fields)."""
    body = await request.body()
    if len(body) > 16_384:
        return {}
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


def add_review_routes(app: FastAPI, svc: Any, token_id_of: Callable[[str | None], str | None]) -> None:
    """`token_id_of(token)`: the id of a configured token, else None."""

    def reviewer(request: Request) -> str | None:
        return token_id_of(request.cookies.get(COOKIE))

    @app.get("/review", response_class=HTMLResponse)
    async def review(request: Request, decision: str | None = None, limit: int = 50) -> Response:
        if reviewer(request) is None:
            return HTMLResponse(_LOGIN, status_code=401)
        decision = decision if decision in ("good", "defect") else None
        limit = min(max(limit, 1), 500)
        import asyncio

        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(svc.pool, svc.audit.latest, limit, decision)
        reviews = await loop.run_in_executor(svc.pool, lambda: svc.audit.latest(2000, None, ("review",)))
        verdicts: dict[str, dict[str, Any]] = {}
        for r in reversed(reviews):  # oldest first, so the latest review of a request wins
            d = json.loads(r["detail"])
            verdicts[d.get("reviews", "")] = {**d, "by": r["token_id"], "ts": r["ts"]}
        body = ["<nav>Show: <a href='/review'>all</a><a href='/review?decision=defect'>defect</a>"
                "<a href='/review?decision=good'>good</a></nav>",
                f"<p>{len(rows)} latest decisions{' (' + decision + ')' if decision else ''}.</p>",
                "<table><tr><th>time (UTC)</th><th>heatmap</th><th>decision</th><th>score / threshold</th>"
                "<th>model</th><th>request</th><th>review</th><th></th></tr>"]
        for r in rows:
            rid = html.escape(r["request_id"])
            dec = r["decision"] or "none"
            score = "n/a" if r["score"] is None else f"{r['score']:.4g}"
            thr = "n/a" if r["threshold"] is None else f"{r['threshold']:.4g}"
            v = verdicts.get(r["request_id"])
            status = ("" if v is None else
                      f"<span class='verdict'>{html.escape(v['verdict'])}</span> → "
                      f"{html.escape(v['decision'])} "
                      f"by {html.escape(str(v['by']))}")
            body.append(
                f"<tr class='decision {html.escape(dec)}' data-id='{rid}' data-decision='{html.escape(dec)}'>"
                f"<td>{html.escape(r['ts'][:19])}</td>"
                f"<td><img alt='heatmap {rid}' src='/v1/heatmaps/{rid}.png'></td>"
                f"<td class='d'>{html.escape(dec)}</td><td>{score} / {thr}</td>"
                f"<td>{html.escape(str(r['model_id']))}</td><td><code>{rid[:12]}</code></td>"
                f"<td class='status'>{status}</td><td>"
                f"<form method='post' action='/review/{rid}'><input name='note' placeholder='note'>"
                "<button name='verdict' value='confirm'>confirm</button>"
                "<button name='verdict' value='override'>override</button></form></td></tr>")
        body.append("</table>")
        return HTMLResponse(_page("anomalyqc review", "".join(body)))

    @app.post("/review/login")
    async def login(request: Request) -> Response:
        token = (await _form(request)).get("token", "")
        if token_id_of(token) is None:
            return HTMLResponse(_LOGIN.replace("<form", "<p>That token is not valid.</p><form"),
                                status_code=403)
        resp = RedirectResponse("/review", status_code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return resp

    @app.post("/review/{request_id}")
    async def record_review(request_id: str, request: Request) -> Response:
        who = reviewer(request)
        if who is None:
            return HTMLResponse(_LOGIN, status_code=401)
        form = await _form(request)
        verdict = form.get("verdict")
        if verdict not in ("confirm", "override"):
            return HTMLResponse(_page("review refused", "<p>verdict must be confirm or override</p>"), 422)
        import asyncio

        loop = asyncio.get_running_loop()
        row = await loop.run_in_executor(svc.pool, svc.audit.find, request_id)
        if row is None or row["kind"] not in ("decision", "strip"):
            return HTMLResponse(_page("review refused", f"<p>no decision {html.escape(request_id)}</p>"), 404)
        original = row["decision"]
        if verdict == "override" and original not in _OPPOSITE:
            return HTMLResponse(_page("review refused", "<p>an undecided (uncalibrated) result cannot be "
                                                        "overridden; calibrate the model</p>"), 422)
        result = original if verdict == "confirm" else _OPPOSITE[original]
        entry = Entry("review", uuid.uuid4().hex, result, row["image_sha256"], row["model_id"],
                      row["threshold"], row["score"], who, {"reviews": request_id, "verdict": verdict,
                                          "original_decision": original, "decision": result,
                                          "note": form.get("note", "")[:500]})
        await loop.run_in_executor(svc.pool, svc.audit_entry, entry)
        back = request.headers.get("referer") or ""
        # back to the page (and filter) the review came from, never to another site
        return RedirectResponse(back if back.startswith(f"{request.base_url}review") else "/review",
                                status_code=303)
