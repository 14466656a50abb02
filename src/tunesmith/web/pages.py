"""The dashboard's HTML: plain pages with a little inline JavaScript (live curves on a canvas, the
playground's streaming), no network resource of any kind."""

from __future__ import annotations

import html
import json
from typing import Any

from tunesmith.runtime.commands import command
from tunesmith.report.html import html_table


def nav() -> str:
    return ("<nav><a href='/'>Runs</a> · <a href='/playground'>Playground</a> · "
            "<a href='/#studies'>Studies</a></nav>")


def page(title: str, body: str, script: str = "") -> str:
    return PAGE.format(title=html.escape(title), body=body, script=script)


def _value(r: dict[str, Any]) -> str:
    v = r.get("value")
    if v is None:
        return "-"
    low, high = r.get("low"), r.get("high")
    ci = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
    return f"{r.get('metric')} {v:.3f}{ci}"


def runs_page(runs: list[dict[str, Any]], studies: list[tuple[str, dict[str, Any]]]) -> str:
    rows = []
    for r in runs:
        name = html.escape(str(r.get("name")))
        link = f"<a href='/runs/{r['id']}'>{name}</a>" if r["exists"] else f"{name} <small>(folder gone)</small>"
        report = f"<a href='/runs/{r['id']}/report'>report</a>" if r["exists"] and r.get("status") == "evaluated" else ""
        pick = f"<input type='checkbox' name='pick' value='{r['id']}'>" if r["exists"] else ""
        rows.append(f"<tr><td>{pick}</td><td>{link}</td><td class='st-{html.escape(str(r.get('status')))}'>"
                    f"{html.escape(str(r.get('status')))}</td><td>{html.escape(str(r.get('method') or '-'))}</td>"
                    f"<td>{html.escape(str(r.get('task') or '-'))}</td><td>{html.escape(_value(r))}</td>"
                    f"<td>{html.escape(str(r.get('created') or '-'))}</td><td>{report}</td></tr>")
    table = ("<form action='/compare' onsubmit='return pickTwo(this)'><table><tr><th></th><th>run</th><th>status</th>"
             "<th>method</th><th>task</th><th>tuned (test)</th><th>created</th><th></th></tr>"
             + "".join(rows) + "</table><input type='hidden' name='a'><input type='hidden' name='b'>"
             "<button type='submit'>Compare the two ticked runs</button></form>") if runs else \
        (f"<p>No runs found. Train one (<code>{html.escape(command('train', 'CONFIG'))}</code>) or point the dashboard "
         f"at a folder (<code>{html.escape(command('ui', '--runs', 'DIR'))}</code>).</p>")
    study_rows = "".join(f"<tr><td><a href='/studies/{html.escape(n)}'>{html.escape(n)}</a>"
                         + (f" <small>({html.escape(s['problem'])})</small>" if s.get("problem") else "") + "</td>"
                         f"<td>{html.escape(', '.join(s['systems']))}</td><td>{s['items']}</td>"
                         f"<td>{s['ratings']} of {s['wanted']}</td></tr>" for n, s in studies)
    study_html = (f"<table><tr><th>study</th><th>systems</th><th>prompts</th><th>human ratings</th></tr>{study_rows}</table>"
                  if studies else f"<p>No rating studies found (<code>{html.escape(command('study', 'create'))}</code>).</p>")
    return page("runs", nav() + f"<h1>Runs</h1>{table}<h2 id='studies'>Rating studies</h2>{study_html}", PICK_JS)


def run_page(row: dict[str, Any], others: list[dict[str, Any]]) -> str:
    rid = row["id"]
    facts = [["status", str(row.get("status"))], ["method", str(row.get("method"))], ["task", str(row.get("task"))],
             ["model", str(row.get("model"))], ["data", str(row.get("data"))], ["tuned (test)", _value(row)],
             ["base (test)", "-" if row.get("base_value") is None else f"{row['base_value']:.3f}"],
             ["folder", str(row.get("path"))]]
    options = "".join(f"<option value='{o['id']}'>{html.escape(str(o['name']))}</option>" for o in others)
    compare = (f"<form action='/compare'><input type='hidden' name='a' value='{rid}'>Compare with "
               f"<select name='b'>{options}</select> <button>compare</button></form>") if others else ""
    report = f"<p><a href='/runs/{rid}/report'>Full report</a></p>" if row.get("status") == "evaluated" else ""
    chat = f"<p><a href='/playground?run={rid}'>Chat with it (playground)</a></p>" \
        if row.get("method") in ("lora", "full") and row.get("task") != "classification" else ""
    body = (nav() + f"<h1>Run {html.escape(str(row.get('name')))}</h1>" + html_table(["", ""], facts) + report + chat + compare
            + "<h2>Training</h2><p id='progress'>loading...</p>"
            "<canvas id='curves' width='900' height='320' aria-label='Loss curves'></canvas>"
            "<p class='legend'><span class='train'>&#9632; training loss</span> <span class='val'>&#9632; validation loss</span></p>")
    return page(f"run {row.get('name')}", body, LIVE_JS.replace("RUN_ID", json.dumps(rid)))


def compare_page(a: dict[str, Any], b: dict[str, Any], differences: dict[str, dict[str, tuple[Any, Any]]]) -> str:
    def shown(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    order = sorted(differences, key=lambda section: section != "results")  # results first, then the config
    rows = [[f"{section}: {key}", shown(va), shown(vb)] for section in order for key, (va, vb) in sorted(differences[section].items())]
    frames = "".join(f"<iframe title='report {html.escape(str(r['name']))}' src='/runs/{r['id']}/report'></iframe>"
                     if r.get("status") == "evaluated" else f"<div class='noreport'>{html.escape(str(r['name']))}: no report yet</div>"
                     for r in (a, b))
    return page("compare", nav() + f"<h1>{html.escape(str(a['name']))} vs {html.escape(str(b['name']))}</h1>"
                + (html_table(["what differs", str(a["name"]), str(b["name"])], rows) if rows else "<p>Same config and results.</p>")
                + f"<div class='side'>{frames}</div>")


def playground_page(runs: list[dict[str, Any]], chosen: str | None) -> str:
    if not runs:
        return page("playground", nav() + "<h1>Playground</h1><p>No finished LoRA or full fine-tuning run of a "
                    "generation task to chat with.</p>")
    options = "".join(f"<option value='{r['id']}'{' selected' if r['id'] == chosen else ''}>{html.escape(str(r['name']))}</option>"
                      for r in runs)
    body = (nav() + "<h1>Playground</h1><p>The base model and the run answer the same message side by side, "
            "streamed by the same code as <code>tunesmith serve</code> (greedy unless you set a temperature).</p>"
            f"<form id='chat'><label>Run <select id='run'>{options}</select></label> "
            "<label>max tokens <input id='max' type='number' value='128' min='1' max='512'></label> "
            "<label>temperature <input id='temp' type='number' value='0' min='0' max='2' step='0.1'></label>"
            "<label>System prompt (the run's, as in training; edit or clear it)<textarea id='system' rows='2'></textarea></label>"
            "<textarea id='msg' rows='3' placeholder='Your message' required></textarea>"
            "<button id='send' type='submit'>Send</button> <span id='state'></span></form>"
            "<div class='side'><section><h2 id='base-name'>base</h2><div class='answer' id='base-out'></div></section>"
            "<section><h2 id='tuned-name'>tuned</h2><div class='answer' id='tuned-out'></div></section></div>")
    return page("playground", body, CHAT_JS)


PICK_JS = """
function pickTwo(form) {
  const ticked = Array.from(form.querySelectorAll('input[name=pick]:checked')).map(x => x.value);
  if (ticked.length !== 2) { alert('Tick exactly two runs to compare.'); return false; }
  form.a.value = ticked[0]; form.b.value = ticked[1];
  form.querySelectorAll('input[name=pick]').forEach(x => x.disabled = true);
  return true;
}
"""

# polls the run's metrics.jsonl (only new lines) every 2 s while it trains; draws both curves
LIVE_JS = """
const rid = RUN_ID; let next = 0; const train = [], val = [];
function draw(maxSteps) {
  const c = document.getElementById('curves'), g = c.getContext('2d');
  g.fillStyle = '#fff'; g.fillRect(0, 0, c.width, c.height);
  const pts = train.concat(val); if (!pts.length) return;
  const xmax = Math.max(maxSteps || 0, ...pts.map(p => p[0])), ys = pts.map(p => p[1]);
  const ymin = Math.min(...ys), ymax = Math.max(...ys), pad = 40;
  const X = s => pad + (c.width - 2 * pad) * s / Math.max(xmax, 1);
  const Y = v => c.height - pad - (c.height - 2 * pad) * (v - ymin) / Math.max(ymax - ymin, 1e-9);
  g.strokeStyle = '#999'; g.lineWidth = 1; g.beginPath(); g.moveTo(pad, pad / 2); g.lineTo(pad, c.height - pad);
  g.lineTo(c.width - pad / 2, c.height - pad); g.stroke();
  g.fillStyle = '#333'; g.font = '12px sans-serif';
  g.fillText(ymax.toFixed(3), 2, Y(ymax) + 4); g.fillText(ymin.toFixed(3), 2, Y(ymin) + 4);
  g.fillText('step ' + xmax, c.width - pad - 40, c.height - pad + 16);
  for (const [series, colour] of [[train, '#4c72b0'], [val, '#dd8452']]) {
    if (!series.length) continue;
    g.strokeStyle = colour; g.fillStyle = colour; g.lineWidth = 2; g.beginPath();
    series.forEach((p, i) => i ? g.lineTo(X(p[0]), Y(p[1])) : g.moveTo(X(p[0]), Y(p[1]))); g.stroke();
    series.forEach(p => { g.beginPath(); g.arc(X(p[0]), Y(p[1]), 2.5, 0, 7); g.fill(); });
  }
}
async function poll() {
  let status = 'unknown';
  try {
    const r = await fetch('/api/runs/' + rid + '/metrics?after=' + next); const d = await r.json();
    for (const row of d.rows) {
      if (row.type === 'train' && row.loss != null) train.push([row.step, row.loss]);
      if (row.type === 'eval' && row.val_loss != null) val.push([row.step, row.val_loss]);
    }
    next = d.next; status = d.status; draw(d.max_steps);
    const last = train.length ? train[train.length - 1] : null;
    const ph = d.phase;
    let text = status + (last ? ': step ' + last[0] + (d.max_steps ? ' of ' + d.max_steps : '')
      + ', training loss ' + last[1].toFixed(4) : ': no training steps yet')
      + (val.length ? ', validation loss ' + val[val.length - 1][1].toFixed(4) : '');
    if (ph && ph.phase !== 'training') {  // preparing, evaluating (the final evaluation can outlast training)
      text = ph.phase + (ph.detail ? ' (' + ph.detail + ')' : '')
        + (ph.total ? ': ' + Math.round(ph.completed) + ' of ' + Math.round(ph.total) : '')
        + (ph.eta_s != null ? ', about ' + Math.ceil(ph.eta_s / 60) + ' min left' : '')
        + (last ? '; training ended at step ' + last[0] : '');
      status = 'busy';
    }
    document.getElementById('progress').textContent = text;
    document.body.dataset.points = String(train.length + val.length);
  } catch (e) { document.getElementById('progress').textContent = 'cannot read the metrics: ' + e; }
  if (status === 'training' || status === 'evaluating' || status === 'busy' || status === 'unknown') setTimeout(poll, 2000);
}
poll();
"""

# asks the base and the run at once; reads each server-sent event stream as it arrives
CHAT_JS = """
const models = {};
async function load(rid) {
  if (models[rid]) return models[rid];
  document.getElementById('state').textContent = 'loading the models (first time only)...';
  const r = await fetch('/api/playground/' + rid + '/models', {method: 'POST'}); const d = await r.json();
  if (!r.ok) throw new Error(d.error ? d.error.message : r.statusText);
  document.getElementById('system').value = d.system_prompt;
  return models[rid] = d;
}
async function stream(rid, model, messages, out) {
  out.textContent = '';
  const body = {model, messages, stream: true, max_tokens: Number(document.getElementById('max').value),
                temperature: Number(document.getElementById('temp').value)};
  const r = await fetch('/api/playground/' + rid + '/chat/completions',
                        {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
  if (!r.ok) { const d = await r.json(); out.textContent = 'error: ' + (d.error ? d.error.message : r.statusText); return; }
  const reader = r.body.getReader(), dec = new TextDecoder(); let buf = '';
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true}); const events = buf.split('\\n\\n'); buf = events.pop();
    for (const ev of events) {
      const line = ev.trim(); if (!line.startsWith('data:')) continue;
      const data = line.slice(5).trim(); if (data === '[DONE]') return;
      const chunk = JSON.parse(data);
      if (chunk.error) { out.textContent += ' [error: ' + chunk.error.message + ']'; return; }
      for (const c of chunk.choices || []) if (c.delta && c.delta.content) out.textContent += c.delta.content;
    }
  }
}
async function sendChat(ev) {
  ev.preventDefault();
  const rid = document.getElementById('run').value, btn = document.getElementById('send');
  btn.disabled = true;
  try {
    const m = await load(rid);
    const system = document.getElementById('system').value.trim();
    const messages = (system ? [{role: 'system', content: system}] : []).concat([{role: 'user', content: document.getElementById('msg').value}]);
    document.getElementById('base-name').textContent = m.base; document.getElementById('tuned-name').textContent = m.tuned;
    document.getElementById('state').textContent = 'answering...';
    await Promise.all([stream(rid, m.base, messages, document.getElementById('base-out')),
                       stream(rid, m.tuned, messages, document.getElementById('tuned-out'))]);
    document.getElementById('state').textContent = 'done';
  } catch (e) { document.getElementById('state').textContent = 'error: ' + e.message; }
  btn.disabled = false;
}
document.getElementById('chat').addEventListener('submit', sendChat);
document.getElementById('run').addEventListener('change', () => { document.getElementById('system').value = ''; });
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>tunesmith: {title}</title><style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 0 auto; padding: 0.8em; color: #222; }}
nav {{ padding: 0.4em 0; border-bottom: 1px solid #ddd; margin-bottom: 0.6em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
.st-training {{ color: #9a6700; font-weight: bold; }} .st-evaluated {{ color: #1a7f37; }}
canvas {{ max-width: 100%; border: 1px solid #eee; }}
.legend .train {{ color: #4c72b0; }} .legend .val {{ color: #dd8452; }}
.side {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }}
@media (max-width: 800px) {{ .side {{ grid-template-columns: 1fr; }} }}
iframe {{ width: 100%; height: 80vh; border: 1px solid #ccc; }}
.answer {{ white-space: pre-wrap; border: 1px solid #ccc; border-radius: 6px; padding: 0.6em; min-height: 4em; }}
textarea {{ width: 100%; box-sizing: border-box; margin: 0.5em 0; }}
div.wide {{ overflow-x: auto; }} img {{ max-width: 100%; }}
</style></head><body>
{body}
<script>{script}</script>
</body></html>
"""
