"""`tandem intents page`: the clusters as a small static HTML page, for an operator to read."""

import html
from collections.abc import Sequence

from cloud.discovery.clusters import Cluster


def render_page(task: str, clusters: Sequence[Cluster], examples: int, min_devices: int) -> str:
    rows = "\n".join(
        f"<tr><td><code>{html.escape(c.id)}</code></td><td>{c.size}</td><td>{c.devices}</td><td>{c.cohesion:.2f}</td>"
        f"<td><ul>{''.join(f'<li>{html.escape(t)}</li>' for t in c.texts[:examples])}</ul></td></tr>"
        for c in clusters
    ) or f'<tr><td colspan="5">no cluster from at least {min_devices} devices</td></tr>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(task)}: out-of-scope clusters</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:.3em .6em;vertical-align:top;text-align:left}}ul{{margin:0;padding-left:1.2em}}</style></head><body>
<h1>{html.escape(task)}: out-of-scope traffic, clustered</h1>
<p>Clusters of texts answered out of scope, from at least {min_devices} distinct devices, most devices first.
Name one with <code>tandem intents name CLUSTER LABEL --description TEXT</code>.</p>
<table><tr><th>cluster</th><th>texts</th><th>devices</th><th>cohesion</th><th>examples (most central first)</th></tr>
{rows}
</table></body></html>
"""
