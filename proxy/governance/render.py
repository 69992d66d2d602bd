"""The report as a self-contained HTML page (inline CSS, no script, no external asset), Markdown
and JSON. Every figure in the page carries a ``data-figure`` attribute and every matrix cell its
identity and credential, so a browser test can read them back and compare with the JSON."""

from __future__ import annotations

import json
from html import escape
from typing import Any

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#f6f7f9}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}h3{font-size:15px;margin:0 0 6px}
.meta{color:#5b6475;margin-bottom:16px}.tiles{display:flex;gap:12px;flex-wrap:wrap}
.tile{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px 14px;min-width:110px}
.tile b{display:block;font-size:24px}.tile span{color:#5b6475;font-size:12px}
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e8;margin:6px 0 10px;width:100%}
th,td{border-bottom:1px solid #e8ebf0;padding:5px 8px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#eef1f5;font-weight:600}td.used{background:#d9f2e1}td.allowed{background:#fff2cc}
td.none{color:#aab}
code{font:12px ui-monospace,Menlo,Consolas,monospace;background:#eef1f5;padding:1px 4px;border-radius:3px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px 14px;margin:10px 0}
.nhi{display:inline-block;background:#203a72;color:#fff;border-radius:4px;padding:0 6px;font-size:12px}
.bad{color:#a3262a;font-weight:600}ul{margin:4px 0 4px 18px;padding:0}
"""


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"


def _t(v: Any) -> str:
    return escape(str(v), quote=True)


def to_html(r: dict[str, Any]) -> str:
    s = r["summary"]
    out = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
           "<meta name=viewport content='width=device-width,initial-scale=1'>",
           "<title>Keyless: identity blast radius</title><style>", _CSS, "</style></head><body>",
           "<h1>Identity blast radius</h1>",
           f"<div class=meta>generated {_t(r['generated'])} · policy {_t(r['policy']['decision'])} "
           f"revision <code>{_t(r['policy']['revision'])}</code> · {_t(r['window']['records'])} audit records "
           f"{_t(r['window']['first'] or '')} – {_t(r['window']['last'] or '')} · unused after "
           f"{_t(r['unused_days'])} days</div><div class=tiles>"]
    for key, label in (("identities", "identities"), ("credentials", "credentials"), ("secrets", "static secrets sent"),
                       ("reused_secrets", "secrets reused (NHI9)"), ("unused_grants", "unused grants (NHI5)"),
                       ("findings", "findings")):
        out.append(f"<div class=tile><b data-figure='{key}'>{_t(s[key])}</b><span>{_t(label)}</span></div>")
    out.append("</div>")
    m = r["matrix"]
    out.append("<h2>Identity × credential</h2><table id=matrix><tr><th>identity</th>")
    out += [f"<th>{_t(c)}</th>" for c in m["credentials"]]
    out.append("</tr>")
    for ident in m["identities"]:
        out.append(f"<tr><th>{_t(ident)}</th>")
        for c in m["credentials"]:
            v = m["cells"].get(ident, {}).get(c, "")
            out.append(f"<td class='{_t(v or 'none')}' data-identity='{_t(ident)}' data-credential='{_t(c)}'>"
                       f"{_t(v or '–')}</td>")
        out.append("</tr>")
    out.append("</table><div class=meta>used: a forwarded request obtained it · allowed: the policy "
               "would let this identity obtain it</div>")
    out.append("<h2>Static secrets apps send (discovery)</h2><table id=discovery><tr><th>fingerprint</th>"
               "<th>detector</th><th>identities</th><th>where</th><th>hosts</th><th>seen</th>"
               "<th>first / last seen</th><th>suggested</th></tr>")
    for d in r["discovery"]:
        ids = ", ".join(f"{i['id']} ({i['count']})" for i in d["identities"])
        cred = d["migration"]["credential"]
        name = next(iter(cred))
        out.append(f"<tr data-fingerprint='{_t(d['fingerprint'])}'><td><code>{_t(d['fingerprint'])}</code></td>"
                   f"<td>{_t(', '.join(d['detectors']))}</td>"
                   f"<td>{_t(ids)}{' <span class=bad>reuse (NHI9)</span>' if d['reuse'] else ''}</td>"
                   f"<td>{_t(', '.join(x['location'] for x in d['locations']))}</td>"
                   f"<td>{_t(', '.join(d['hosts']))}</td>"
                   f"<td><b data-figure='count'>{_t(d['count'])}</b>×<br>{_t(d['stripped'])} stripped<br>"
                   f"{_t(d['forwarded'])} forwarded</td>"
                   f"<td>{_t(d['first_seen'][:19])}<br>{_t(d['last_seen'][:19])}</td>"
                   f"<td><code>{_t(name)}: {_t(cred[name]['type'])}</code></td></tr>")
    out.append("</table><h2>Findings</h2><table id=findings><tr><th>OWASP NHI</th><th>identity</th>"
               "<th>finding</th></tr>")
    for f in r["findings"]:
        out.append(f"<tr data-nhi='{_t(f['nhi'])}'><td><span class=nhi>{_t(f['nhi'])}</span> {_t(f['title'])}</td>"
                   f"<td>{_t(f['identity'] or '–')}</td><td>{_t(f['detail'])}</td></tr>")
    out.append("</table>")
    out.append("<h2>Reach and use per identity</h2>")
    for ident in r["identities"]:
        iid = _t(ident["id"])
        out.append(f"<div class=card data-identity='{iid}'><h3>{iid}</h3>"
                   f"<div>grants <b data-figure='reach'>{len(ident['reach'])}</b> · used "
                   f"<b data-figure='used'>{len(ident['used'])}</b> · unused "
                   f"<b data-figure='unused'>{len(ident['unused_grants'])}</b> · secrets it sends "
                   f"<b data-figure='sent'>{len(ident['secrets_sent'])}</b></div>")
        out.append("<table><tr><th>grant</th><th>credential</th><th>destinations</th><th>uses</th>"
                   "<th>last used</th></tr>")
        for g in ident["reach"]:
            unused = g in ident["unused_grants"]
            out.append(f"<tr><td>{_t(g['reason'])}{' <span class=bad>unused</span>' if unused else ''}</td>"
                       f"<td>{_t(g['credential'] or '–')}</td><td>"
                       + "<br>".join(f"<code>{_t(d)}</code>" for d in g["destinations"])
                       + f"</td><td>{_t(g['count'])}</td><td>{_t(g['last_used'] or 'never')}</td></tr>")
        out.append("</table>")
        if ident["shared_credentials"]:
            out.append("<div>shares credentials: " + "; ".join(
                f"<code>{_t(x['credential'])}</code> with {_t(', '.join(x['with']))}"
                for x in ident["shared_credentials"]) + "</div>")
        out.append("<div><b>If compromised, the attacker gets:</b><ul>"
                   + "".join(f"<li>{_t(line)}</li>" for line in ident["if_compromised"]) + "</ul></div></div>")
    out.append("</body></html>\n")
    return "".join(out)


def _md(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(r: dict[str, Any]) -> str:
    s = r["summary"]
    lines = ["# Identity blast radius", "",
             f"Generated {r['generated']}, policy `{r['policy']['decision']}` revision `{r['policy']['revision']}`, "
             f"{r['window']['records']} audit records; grants unused after {r['unused_days']} days.", "",
             f"**{s['identities']}** identities · **{s['credentials']}** credentials · **{s['secrets']}** static "
             f"secrets sent · **{s['reused_secrets']}** reused · **{s['unused_grants']}** unused grants · "
             f"**{s['findings']}** findings", "", "## Identity × credential", ""]
    m = r["matrix"]
    lines.append("| identity | " + " | ".join(_md(c) for c in m["credentials"]) + " |")
    lines.append("|---" * (len(m["credentials"]) + 1) + "|")
    for ident in m["identities"]:
        lines.append(f"| {_md(ident)} | " + " | ".join(m["cells"].get(ident, {}).get(c, "–") for c in m["credentials"])
                     + " |")
    lines += ["", "## Reach and use per identity"]
    for ident in r["identities"]:
        lines += ["", f"### {ident['id']}", "", "| grant | credential | destinations | uses | last used |",
                  "|---|---|---|---|---|"]
        for g in ident["reach"]:
            flag = " **(unused)**" if g in ident["unused_grants"] else ""
            lines.append(f"| {_md(g['reason'])}{flag} | {_md(g['credential'] or '–')} | "
                         f"{'<br>'.join('`' + _md(d) + '`' for d in g['destinations'])} | {g['count']} | "
                         f"{g['last_used'] or 'never'} |")
        for x in ident["shared_credentials"]:
            lines.append(f"\nShares `{x['credential']}` with {', '.join(x['with'])}.")
        lines += ["", "If compromised, the attacker gets:", ""] + [f"- {_md(x)}" for x in ident["if_compromised"]]
    lines += ["", "## Static secrets apps send (discovery)", "",
              "| fingerprint | detector | identities | where | hosts | seen | stripped / forwarded | suggested |",
              "|---|---|---|---|---|---|---|---|"]
    for d in r["discovery"]:
        cred = d["migration"]["credential"]
        name = next(iter(cred))
        ids = ", ".join(f"{i['id']} ({i['count']})" for i in d["identities"]) + (" **reuse**" if d["reuse"] else "")
        lines.append(f"| `{d['fingerprint']}` | {', '.join(d['detectors'])} | {_md(ids)} | "
                     f"{_md(', '.join(x['location'] for x in d['locations']))} | {_md(', '.join(d['hosts']))} | "
                     f"{d['count']} | {d['stripped']} / {d['forwarded']} | `{name}: {cred[name]['type']}` |")
    lines += ["", "## Findings", "", "| OWASP NHI | identity | finding |", "|---|---|---|"]
    for f in r["findings"]:
        lines.append(f"| {f['nhi']} {f['title']} | {_md(f['identity'] or '–')} | {_md(f['detail'])} |")
    return "\n".join(lines) + "\n"
