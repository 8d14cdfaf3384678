"""The admin status page: rendered here from the status JSON, whole, so that it is complete
without JavaScript (curl shows every server); its script renders the same view again from
`{admin.path}/status` every second. Everything shown is escaped (server names and URLs come
from the config), and the page loads nothing from anywhere: its style and script are inline,
allowed by a per-response nonce in its Content-Security-Policy.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any, Final
from urllib.parse import quote

__all__ = ["render_page"]

_CSS: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.3em 0;background:#fff}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.s{font-weight:600;border-radius:3px;padding:0 .35em}
.s-healthy{color:#0a6b2d;background:#e3f5e8}.s-unhealthy,.s-ejected{color:#fff;background:#b3261e}
.s-drained,.s-draining{color:#5b4500;background:#fde9a8}.s-stale{color:#444;background:#ddd}
.m-primary{color:#0a6b2d}.m-backup,.m-panic{color:#8a5a00}.m-unavailable{color:#b3261e}
.meta{color:#555}form{display:inline;margin:0}button{font:inherit;cursor:pointer}
.err{color:#b3261e}
"""

# The same view as `_render` below, from the status JSON; built with DOM calls and
# textContent only, so nothing from the JSON is ever parsed as HTML.
_JS: Final = r"""
(function () {
  "use strict";
  var body = document.body, prefix = body.dataset.prefix, traceUrl = body.dataset.traceUrl || "";
  function el(tag, attrs, kids) {
    var node = document.createElement(tag);
    if (attrs) for (var k in attrs) if (attrs[k] !== null && attrs[k] !== undefined) node.setAttribute(k, attrs[k]);
    (kids || []).forEach(function (kid) {
      node.appendChild(typeof kid === "object" && kid !== null ? kid : document.createTextNode(kid === null || kid === undefined ? "" : String(kid)));
    });
    return node;
  }
  function fmt(v) { return v === null || v === undefined ? "-" : v; }
  function ms(v) { return v === null || v === undefined ? "-" : (v * 1000).toFixed(1) + " ms"; }
  function pct(v) { return v === null || v === undefined ? "-" : (v * 100).toFixed(1) + " %"; }
  function td(v, cls) { return el("td", cls ? {"class": cls} : null, [fmt(v)]); }
  function action(upstream, index, what) {
    return el("form", {method: "post", action: prefix + "/servers/" + encodeURIComponent(upstream) + "/" + index + "/" + what},
      [el("button", {type: "submit", "data-action": what}, [what])]);
  }
  function check(c) { return c ? c.result + " (" + ms(c.latency) + ", " + c.at + ")" : "-"; }
  function upstreamView(name, u) {
    var rows = [el("tr", null, ["#", "server", "state", "weight", "in flight", "req/s", "errors",
      "p50", "p99", "ejections", "last failure", "last check", ""].map(function (h) { return el("th", null, [h]); }))];
    u.servers.forEach(function (s) {
      var state = s.state === "healthy" && u.stale ? "stale" : s.state;
      rows.push(el("tr", {"data-server": name + "/" + s.index + "/" + s.address, "data-state": state}, [
        td(s.index), el("td", null, [s.url + (s.address && s.url.indexOf(s.address) < 0 ? " (" + s.address + ")" : "") + (s.backup ? " backup" : "")]),
        el("td", null, [el("span", {"class": "s s-" + state}, [state])]), td(s.weight, "n"), td(s.in_flight, "n"),
        td(s.requests_per_second, "n"), td(pct(s.error_rate), "n"), td(ms(s.latency_p50), "n"), td(ms(s.latency_p99), "n"),
        td(s.ejections, "n"), td(s.last_failure), td(check(s.last_check)),
        el("td", null, s.state === "draining" ? [] : [action(name, s.index, s.drained ? "enable" : "drain")])
      ]));
    });
    var extra = [];
    if (u.adaptive_concurrency) extra.push(" · concurrency limit " + u.adaptive_concurrency.limit);
    if (u.hedge) extra.push(" · hedge after " + u.hedge.delay + " s");
    return el("section", {"data-upstream": name}, [
      el("h2", null, ["upstream " + name + " ", el("span", {"class": "m-" + u.mode, "data-mode": u.mode}, [u.mode])]),
      el("p", {"class": "meta"}, ["balancer " + u.balancer + " · " + u.available + " available" + extra.join("")]),
      el("table", null, rows)]);
  }
  function view(st) {
    var c = st.config, a = st.admin || {}, kids = [];
    kids.push(el("p", {"class": "meta"}, ["config version " + c.version + " · loaded " + c.loaded_at +
      " · sha256 " + c.sha256.slice(0, 12) + (st.draining ? " · DRAINING" : "")]));
    if (c.last_error) kids.push(el("p", {"class": "err"}, ["last reload failed: " + c.last_error]));
    Object.keys(st.upstreams).forEach(function (n) { kids.push(upstreamView(n, st.upstreams[n])); });
    var limits = a.rate_limits || {};
    if (Object.keys(limits).length) {
      var lr = [el("tr", null, ["route", "allowed", "limited", "shadow", "backend errors"].map(function (h) { return el("th", null, [h]); }))];
      Object.keys(limits).forEach(function (r) {
        var x = limits[r];
        lr.push(el("tr", null, [td(r), td(x.allowed || 0, "n"), td(x.limited || 0, "n"), td(x.shadow || 0, "n"), td(x.backend_error || 0, "n")]));
      });
      kids.push(el("h2", null, ["rate limits"]), el("table", null, lr));
    }
    var er = [el("tr", null, ["time", "status", "route", "upstream", "server", "request id", "trace"].map(function (h) { return el("th", null, [h]); }))];
    (a.recent_errors || []).forEach(function (e) {
      var trace = e.trace_id ? (traceUrl ? el("a", {href: traceUrl.split("{trace_id}").join(e.trace_id), rel: "noopener noreferrer"}, [e.trace_id]) : e.trace_id) : "-";
      er.push(el("tr", {"data-request-id": e.request_id}, [td(e.at), td(e.status, "n"), td(e.route), td(e.upstream), td(e.server), td(e.request_id), el("td", null, [trace])]));
    });
    kids.push(el("h2", null, ["recent errors (5xx)"]), el("table", {id: "errors"}, er));
    var ar = [el("tr", null, ["time", "client", "action", "target", "result"].map(function (h) { return el("th", null, [h]); }))];
    (a.actions || []).forEach(function (x) { ar.push(el("tr", null, [td(x.at), td(x.client), td(x.action), td(x.target), td(x.result)])); });
    kids.push(el("h2", null, ["actions"]), el("table", {id: "actions"}, ar));
    return kids;
  }
  var main = document.getElementById("view"), stamp = document.getElementById("updated");
  function refresh() {
    fetch(prefix + "/status", {credentials: "same-origin", cache: "no-store", headers: {accept: "application/json"}})
      .then(function (r) { if (!r.ok) throw new Error("status " + r.status); return r.json(); })
      .then(function (st) {
        main.replaceChildren.apply(main, view(st));
        stamp.textContent = "updated " + new Date().toLocaleTimeString();
      })
      .catch(function (e) { stamp.textContent = "refresh failed: " + e.message; });
  }
  setInterval(refresh, 1000);
})();
"""


def _e(value: Any) -> str:
    return escape("-" if value is None else str(value), quote=True)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def _td(value: Any, numeric: bool = False) -> str:
    return f'<td class="n">{_e(value)}</td>' if numeric else f"<td>{_e(value)}</td>"


def _row(*cells: str) -> str:
    return "<tr>" + "".join(f"<th>{_e(cell)}</th>" for cell in cells) + "</tr>"


def _upstream(prefix: str, name: str, upstream: dict[str, Any]) -> str:
    out = [
        _row(
            "#",
            "server",
            "state",
            "weight",
            "in flight",
            "req/s",
            "errors",
            "p50",
            "p99",
            "ejections",
            "last failure",
            "last check",
            "",
        )
    ]
    for server in upstream["servers"]:
        state = "stale" if server["state"] == "healthy" and upstream.get("stale") else server["state"]
        url = server["url"]
        address = server.get("address")
        shown = (
            url
            + (f" ({address})" if address and address not in url else "")
            + (" backup" if server["backup"] else "")
        )
        check = server.get("last_check")
        checked = f"{check['result']} ({_ms(check['latency'])}, {check['at']})" if check else None
        if server["state"] == "draining":
            button = ""
        else:
            what = "enable" if server.get("drained") else "drain"
            target = f"{prefix}/servers/{quote(name, safe='')}/{server['index']}/{what}"
            button = (
                f'<form method="post" action="{_e(target)}">'
                f'<button type="submit" data-action="{what}">{what}</button></form>'
            )
        out.append(
            f'<tr data-server="{_e(name)}/{server["index"]}/{_e(address)}" data-state="{_e(state)}">'
            + _td(server["index"])
            + _td(shown)
            + f'<td><span class="s s-{_e(state)}">{_e(state)}</span></td>'
            + _td(server["weight"], True)
            + _td(server["in_flight"], True)
            + _td(server.get("requests_per_second"), True)
            + _td(_pct(server.get("error_rate")), True)
            + _td(_ms(server.get("latency_p50")), True)
            + _td(_ms(server.get("latency_p99")), True)
            + _td(server["ejections"], True)
            + _td(server["last_failure"])
            + _td(checked)
            + f"<td>{button}</td></tr>"
        )
    extra = ""
    if upstream.get("adaptive_concurrency"):
        extra += f" · concurrency limit {upstream['adaptive_concurrency'].get('limit')}"
    if upstream.get("hedge"):
        extra += f" · hedge after {upstream['hedge']['delay']} s"
    mode = upstream["mode"]
    return (
        f'<section data-upstream="{_e(name)}"><h2>upstream {_e(name)} '
        f'<span class="m-{_e(mode)}" data-mode="{_e(mode)}">{_e(mode)}</span></h2>'
        f'<p class="meta">balancer {_e(upstream.get("balancer"))} · {_e(upstream["available"])} available{_e(extra)}</p>'
        f"<table>{''.join(out)}</table></section>"
    )


def _view(prefix: str, status: dict[str, Any], trace_url: str | None) -> str:
    config = status["config"]
    admin = status.get("admin", {})
    parts = [
        f'<p class="meta">config version {_e(config["version"])} · loaded {_e(config["loaded_at"])}'
        f" · sha256 {_e(config['sha256'][:12])}{' · DRAINING' if status.get('draining') else ''}</p>"
    ]
    if config.get("last_error"):
        parts.append(f'<p class="err">last reload failed: {_e(config["last_error"])}</p>')
    parts.extend(_upstream(prefix, name, upstream) for name, upstream in status["upstreams"].items())
    limits = admin.get("rate_limits") or {}
    if limits:
        rows = [_row("route", "allowed", "limited", "shadow", "backend errors")]
        for route, counts in limits.items():
            rows.append(
                "<tr>"
                + _td(route)
                + "".join(
                    _td(counts.get(k, 0), True) for k in ("allowed", "limited", "shadow", "backend_error")
                )
                + "</tr>"
            )
        parts.append(f"<h2>rate limits</h2><table>{''.join(rows)}</table>")
    rows = [_row("time", "status", "route", "upstream", "server", "request id", "trace")]
    for error in admin.get("recent_errors", ()):
        trace_id = error.get("trace_id")
        if trace_id and trace_url:
            link = trace_url.replace("{trace_id}", trace_id)
            trace = f'<a href="{_e(link)}" rel="noopener noreferrer">{_e(trace_id)}</a>'
        else:
            trace = _e(trace_id)
        rows.append(
            f'<tr data-request-id="{_e(error["request_id"])}">'
            + "".join(
                _td(error.get(k), k == "status") for k in ("at", "status", "route", "upstream", "server")
            )
            + _td(error["request_id"])
            + f"<td>{trace}</td></tr>"
        )
    parts.append(f'<h2>recent errors (5xx)</h2><table id="errors">{"".join(rows)}</table>')
    rows = [_row("time", "client", "action", "target", "result")]
    for action in admin.get("actions", ()):
        rows.append(
            "<tr>"
            + "".join(_td(action.get(k)) for k in ("at", "client", "action", "target", "result"))
            + "</tr>"
        )
    parts.append(f'<h2>actions</h2><table id="actions">{"".join(rows)}</table>')
    return "".join(parts)


def render_page(prefix: str, status: dict[str, Any], trace_url: str | None, nonce: str) -> str:
    """The whole page for `status` (what `{prefix}/status` answers)."""
    reload_form = (
        f'<form method="post" action="{_e(prefix + "/reload")}">'
        '<button type="submit" data-action="reload">reload config</button></form>'
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<title>asgi-gateway</title><style nonce="{nonce}">{_CSS}</style></head>'
        f'<body data-prefix="{_e(prefix)}" data-trace-url="{_e(trace_url or "")}">'
        f'<h1>asgi-gateway</h1><p class="meta">{reload_form} · '
        f'<a href="{_e(prefix + "/status")}">status JSON</a> · <a href="{_e(prefix + "/metrics")}">metrics</a> · '
        '<span id="updated">rendered by the gateway</span></p>'
        f'<main id="view">{_view(prefix, status, trace_url)}</main>'
        f'<script nonce="{nonce}">{_JS}</script></body></html>'
    )


def page_status_json(status: dict[str, Any]) -> bytes:
    return json.dumps(status, default=str).encode()
