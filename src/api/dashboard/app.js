// qlorad dashboard: hash routes (#/ jobs, #/new, #/jobs/<id>) over the native JSON API; a job's
// page follows its Server-Sent Events and redraws an SVG chart of loss and learning rate.
// The API key, if the server needs one, lives in localStorage and goes out as a bearer header on
// every request (the event stream is read with fetch for that reason: EventSource cannot send
// headers, and a key in a URL would end up in logs).
"use strict";

const app = document.getElementById("app");
let cleanup = [];

const KEY_ITEM = "qlorad.api_key";
const keyForm = document.getElementById("key");
keyForm.key.value = localStorage.getItem(KEY_ITEM) || "";
keyForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const k = keyForm.key.value.trim();
  if (k) localStorage.setItem(KEY_ITEM, k); else localStorage.removeItem(KEY_ITEM);
  route();
});

function authHeaders(extra = {}) {
  const k = localStorage.getItem(KEY_ITEM);
  return k ? { ...extra, authorization: `Bearer ${k}` } : extra;
}

// Read a Server-Sent Events stream with fetch; calls onEvent({id, event, data}) per event and
// reconnects from the last id until stopped. Returns a function that stops it.
function followEvents(url, onEvent, isDone) {
  const ctl = new AbortController();
  let last = null, stopped = false;
  const run = async () => {
    while (!stopped) {
      try {
        const headers = authHeaders({ accept: "text/event-stream" });
        if (last !== null) headers["last-event-id"] = last;
        const r = await fetch(url, { headers, signal: ctl.signal });
        if (!r.ok) throw new Error(`${r.status}`);
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true }).replace(/\r\n/g, "\n");
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            const frame = buf.slice(0, i);
            buf = buf.slice(i + 2);
            const msg = { id: null, event: "message", data: [] };
            for (const line of frame.split("\n")) {
              if (line.startsWith(":")) continue;
              const j = line.indexOf(":");
              const field = j < 0 ? line : line.slice(0, j);
              const v = j < 0 ? "" : line.slice(j + 1).replace(/^ /, "");
              if (field === "data") msg.data.push(v);
              else if (field === "event") msg.event = v;
              else if (field === "id") msg.id = v;
            }
            if (!msg.data.length) continue;
            if (msg.id !== null) last = msg.id;
            onEvent({ ...msg, data: msg.data.join("\n") });
          }
        }
      } catch (e) {
        if (stopped || e.name === "AbortError") return;
      }
      if (isDone()) return;
      await new Promise((res) => setTimeout(res, 2000));
    }
  };
  run();
  return () => { stopped = true; ctl.abort(); };
}

// Download through fetch so the key goes in a header, then hand the bytes to the browser.
async function download(url, name) {
  const r = await fetch(url, { headers: authHeaders() });
  if (!r.ok) throw new Error(`${r.status} downloading ${name}`);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(await r.blob());
  a.download = name.split("/").pop();
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function fmtTime(t) {
  return t ? new Date(t * 1000).toLocaleString() : "";
}

function fmtNum(x, digits = 4) {
  return x === null || x === undefined ? "" : Number(x).toPrecision(digits);
}

function fmtBytes(n) {
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

async function api(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: authHeaders(opts.headers || {}) });
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  if (!r.ok) {
    const e = body && body.error ? body.error : { message: `${r.status} ${text}` };
    throw new Error(e.param ? `${e.param}: ${e.message}` : e.message);
  }
  return body;
}

function statusBadge(s) {
  return `<span class="status ${esc(s)}">${esc(s)}</span>`;
}

function progressBar(p) {
  const total = p.total_steps || 0;
  const pct = total ? Math.min(100, (100 * p.step) / total) : 0;
  return `<span class="bar" title="${p.step}/${total || "?"}"><span style="width:${pct.toFixed(1)}%"></span></span>
    <span class="muted">${p.step}/${total || "?"}</span>`;
}

// ---- jobs list -------------------------------------------------------------------------------

async function showJobs() {
  app.innerHTML = `<h1>Jobs</h1><div class="card"><table id="jobs"><thead><tr>
    <th>Job</th><th>Model</th><th>Status</th><th>Progress</th><th>Loss</th><th>Created</th></tr></thead>
    <tbody><tr><td colspan="6" class="muted">Loading…</td></tr></tbody></table></div>`;
  const tbody = app.querySelector("#jobs tbody");
  async function refresh() {
    try {
      const page = await api("/jobs?limit=100");
      tbody.innerHTML = page.data.length ? page.data.map((j) => `<tr data-job="${esc(j.id)}">
        <td><a class="mono" href="#/jobs/${esc(j.id)}">${esc(j.id)}</a></td>
        <td>${esc(j.spec.model)}</td>
        <td>${statusBadge(j.status)}</td>
        <td>${progressBar(j.progress)}</td>
        <td class="num">${fmtNum(j.progress.last_loss)}</td>
        <td>${esc(fmtTime(j.created_at))}</td></tr>`).join("")
        : `<tr><td colspan="6" class="muted">No jobs yet. <a href="#/new">Start one.</a></td></tr>`;
    } catch (e) {
      tbody.innerHTML = `<tr><td colspan="6" class="error">${esc(e.message)}</td></tr>`;
    }
  }
  await refresh();
  const timer = setInterval(refresh, 2000);
  cleanup.push(() => clearInterval(timer));
}

// ---- new job ---------------------------------------------------------------------------------

// `from` is a fine-tuned model or checkpoint (`ft:…`) to continue: its base and adapter shape.
async function showNew(from) {
  app.innerHTML = `<h1>New job</h1><form class="card" id="new">
    <p class="muted" id="from" hidden>Continues from <span class="mono"></span>: training starts from its adapter, with its LoRA shape.</p>
    <label><span>Dataset (JSONL or a JSON array: chat, alpaca, sharegpt, completion or text; preference pairs with {"method": {"type": "dpo"}} below)</span>
      <input type="file" name="file" required></label>
    <div class="grid2">
      <label><span>Base model</span><select name="model" required></select></label>
      <label><span>Max steps (empty: epochs)</span><input type="number" name="max_steps" min="1"></label>
      <label><span>Epochs</span><input type="number" name="n_epochs" min="1" value="3"></label>
      <label><span>Batch size</span><input type="number" name="batch_size" min="1" value="4"></label>
      <label><span>Learning rate</span><input type="text" name="learning_rate" value="2e-4"></label>
      <label><span>LoRA rank</span><input type="number" name="r" min="1" value="16"></label>
      <label><span>Checkpoint every N steps</span><input type="number" name="checkpoint_every" min="1"></label>
    </div>
    <label><span>More of the job spec, as JSON (merged over the fields above), e.g. {"export": {"gguf": ["q8_0"]}}</span>
      <textarea name="extra">{}</textarea></label>
    <button type="button" class="secondary continue" id="estimate">Estimate</button>
    <button type="submit">Upload and start</button> <span class="muted" id="state"></span>
    <p class="error" id="err"></p><div id="preflight" hidden></div></form>`;
  const form = app.querySelector("#new");
  const select = form.querySelector("select[name=model]");
  try {
    const models = await api("/models");
    select.innerHTML = models.data.map((m) => `<option value="${esc(m.id)}">${esc(m.id)} (${esc(m.model_type || "?")})</option>`).join("");
  } catch (e) {
    form.querySelector("#err").textContent = e.message;
  }
  if (from) {
    select.insertAdjacentHTML("afterbegin", `<option value="${esc(from)}">${esc(from)}</option>`);
    select.value = from;
    const note = form.querySelector("#from");
    note.hidden = false;
    note.querySelector("span").textContent = from;
    form.querySelector("input[name=r]").disabled = true;
  }
  // The chosen file is uploaded once, for an estimate or the start, whichever comes first.
  let uploaded = null;
  const upload = async (file) => {
    if (!uploaded || uploaded.file !== file) {
      const up = await api(`/files?filename=${encodeURIComponent(file.name)}`, { method: "POST", body: file });
      uploaded = { file, id: up.id };
    }
    return uploaded.id;
  };
  const specOf = async (f, state) => {
    const file = f.get("file");
    if (!file || !file.name) throw new Error("choose a dataset first");
    const num = (k) => (f.get(k) === "" ? undefined : Number(f.get(k)));
    let extra = {};
    try { extra = JSON.parse(f.get("extra") || "{}"); } catch (e) { throw new Error(`extra spec: ${e.message}`); }
    state.textContent = "uploading…";
    const id = await upload(file);
    const spec = {
      model: f.get("model"),
      training_file: id,
      hyperparameters: { max_steps: num("max_steps"), n_epochs: num("n_epochs"), batch_size: num("batch_size"), learning_rate: num("learning_rate") },
      lora: from ? undefined : { r: num("r") },
      checkpoint_every: num("checkpoint_every"),
    };
    for (const [k, v] of Object.entries(extra)) {
      spec[k] = v && typeof v === "object" && !Array.isArray(v) && spec[k] ? { ...spec[k], ...v } : v;
    }
    return spec;
  };
  // The dry run: what the job would take, nothing created.
  form.querySelector("#estimate").addEventListener("click", async () => {
    const err = form.querySelector("#err"), state = form.querySelector("#state"), out = form.querySelector("#preflight");
    err.textContent = "";
    try {
      const spec = await specOf(new FormData(form), state);
      state.textContent = "estimating…";
      const p = await api("/jobs?dry_run=true", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(spec) });
      const d = p.data;
      const rows = d ? [
        ["Examples", d.examples], ["Tokens", d.tokens], ["Packed rows", d.rows], ["Steps", d.steps],
        ["Epochs", fmtNum(d.epochs, 3)], ["Trained tokens", d.trained_tokens], ["Largest micro-batch", `${d.largest_step.tokens} tokens`],
      ].filter(([, v]) => v !== null && v !== undefined) : [];
      for (const m of p.memory) {
        rows.push([`Peak memory on ${m.device}`, `${fmtBytes(m.estimated_peak_bytes)}${m.available_bytes ? ` of ${fmtBytes(m.available_bytes)}` : ""} ${m.fits === false ? "(does not fit)" : ""}`]);
      }
      if (p.time) rows.push(["Time", `about ${Math.round(p.time.estimated_seconds)} s (${p.time.basis === "measured" ? `at ${Math.round(p.time.tokens_per_second)} tokens/s, as ${p.time.from_job} ran` : "from the model's size"})`]);
      out.innerHTML = `<dl class="kv">${rows.map(([k, v]) => `<dt>${esc(k)}</dt><dd class="num">${esc(String(v))}</dd>`).join("")}</dl>`
        + p.notes.map((n) => `<p class="muted">${esc(n)}</p>`).join("");
      out.hidden = false;
      state.textContent = "";
    } catch (e) {
      err.textContent = e.message;
      state.textContent = "";
    }
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(form);
    const err = form.querySelector("#err");
    const state = form.querySelector("#state");
    const button = form.querySelector("button[type=submit]");
    err.textContent = "";
    button.disabled = true;
    try {
      const spec = await specOf(f, state);
      state.textContent = "starting…";
      const job = await api("/jobs", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(spec) });
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      err.textContent = e.message;
      state.textContent = "";
    } finally {
      button.disabled = false;
    }
  });
}

// ---- the chart -------------------------------------------------------------------------------

// Points are {step, loss, lr} and {step, eval}; loss on the left axis, learning rate on the right
// (`right` formats its labels). DPO's chart draws reward margins on the left, accuracy on the right.
function drawChart(svg, points, evals, right = (v) => v.toExponential(1)) {
  const W = svg.clientWidth || 800, H = svg.clientHeight || 300;
  const m = { l: 56, r: 64, t: 12, b: 28 };
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.dataset.points = String(points.length);
  if (!points.length) {
    svg.innerHTML = `<text x="${W / 2}" y="${H / 2}" text-anchor="middle">waiting for the first step…</text>`;
    return;
  }
  const steps = points.map((p) => p.step).concat(evals.map((e) => e.step));
  const x0 = Math.min(...steps), x1 = Math.max(...steps, x0 + 1);
  const losses = points.map((p) => p.loss).concat(evals.map((e) => e.eval)).filter(Number.isFinite);
  let y0 = Math.min(...losses), y1 = Math.max(...losses);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const lrs = points.map((p) => p.lr).filter(Number.isFinite);
  const r0 = 0, r1 = Math.max(...lrs, 1e-12);
  const X = (s) => m.l + ((s - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (v) => H - m.b - ((v - y0) / (y1 - y0)) * (H - m.t - m.b);
  const R = (v) => H - m.b - ((v - r0) / (r1 - r0)) * (H - m.t - m.b);
  let s = "";
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4, y = Y(v);
    s += `<line class="grid" x1="${m.l}" x2="${W - m.r}" y1="${y}" y2="${y}"/>`;
    s += `<text x="${m.l - 6}" y="${y + 4}" text-anchor="end">${v.toPrecision(3)}</text>`;
    const lr = r0 + ((r1 - r0) * i) / 4;
    s += `<text x="${W - m.r + 6}" y="${R(lr) + 4}">${right(lr)}</text>`;
  }
  for (let i = 0; i <= 5; i++) {
    const st = Math.round(x0 + ((x1 - x0) * i) / 5);
    s += `<text x="${X(st)}" y="${H - 8}" text-anchor="middle">${st}</text>`;
  }
  s += `<line class="axis" x1="${m.l}" x2="${m.l}" y1="${m.t}" y2="${H - m.b}"/>`;
  s += `<line class="axis" x1="${m.l}" x2="${W - m.r}" y1="${H - m.b}" y2="${H - m.b}"/>`;
  s += `<line class="axis" x1="${W - m.r}" x2="${W - m.r}" y1="${m.t}" y2="${H - m.b}"/>`;
  const line = (sel, f) => points.filter((p) => Number.isFinite(sel(p))).map((p) => `${X(p.step).toFixed(1)},${f(sel(p)).toFixed(1)}`).join(" ");
  s += `<polyline class="lr" points="${line((p) => p.lr, R)}"/>`;
  s += `<polyline class="loss" points="${line((p) => p.loss, Y)}"/>`;
  for (const e of evals) s += `<circle class="eval" cx="${X(e.step)}" cy="${Y(e.eval)}" r="3.5"/>`;
  svg.innerHTML = s;
}

// ---- a job -----------------------------------------------------------------------------------

async function showJob(id) {
  app.innerHTML = `<h1>Job <span class="mono">${esc(id)}</span></h1>
    <div class="card"><dl class="kv" id="summary"></dl>
      <p><button class="secondary" id="pause">Pause</button> <button class="secondary" id="resume">Resume</button>
        <button class="secondary" id="cancel">Cancel</button>
        <button class="secondary" id="continue" hidden>Continue from this model</button> <span class="error" id="err"></span></p></div>
    <div class="card"><h2>Loss and learning rate</h2>
      <div class="legend"><span><i style="background:var(--loss)"></i>training loss</span>
        <span><i style="background:var(--eval)"></i>validation loss</span>
        <span><i style="background:var(--lr)"></i>learning rate (right axis)</span></div>
      <svg id="chart" class="chart" data-points="0" role="img" aria-label="loss and learning rate by step"></svg></div>
    <div class="card" id="dpo" hidden><h2>DPO rewards</h2>
      <div class="legend"><span><i style="background:var(--loss)"></i>reward margin (chosen − rejected)</span>
        <span><i style="background:var(--eval)"></i>validation margin</span>
        <span><i style="background:var(--lr)"></i>reward accuracy (right axis)</span></div>
      <svg id="dpochart" class="chart" data-points="0" role="img" aria-label="DPO reward margin and accuracy by step"></svg></div>
    <div class="card" id="samples" hidden><h2>Answers to the eval prompts</h2>
      <p class="muted" id="samples-step"></p><table><thead><tr><th>Prompt</th><th>Answer</th></tr></thead><tbody></tbody></table></div>
    <div class="card" id="chat" hidden><h2>Try it</h2>
      <p class="muted">The fine-tuned model <span class="mono" id="chat-model"></span>, through <span class="mono">/v1/chat/completions</span>.</p>
      <div class="log" id="chat-log"></div>
      <form id="chat-form"><textarea name="q" rows="2" placeholder="Ask something…" required></textarea>
        <button type="submit">Send</button> <span class="error" id="chat-err"></span></form></div>
    <div class="row">
      <div class="card"><h2>Checkpoints</h2><table id="ckpts"><thead><tr><th>Step</th><th>Name</th><th>Loss</th><th>Validation loss</th><th>Saved</th><th></th></tr></thead><tbody></tbody></table></div>
      <div class="card"><h2>Artifacts</h2><table id="arts"><thead><tr><th>File</th><th>Size</th></tr></thead><tbody></tbody></table></div>
    </div>
    <div class="card"><h2>Events</h2><div class="log"><table id="events"><thead><tr><th>#</th><th>Time</th><th>Type</th><th>Message</th></tr></thead><tbody></tbody></table></div></div>`;
  const svg = app.querySelector("#chart");
  const dpoSvg = app.querySelector("#dpochart");
  const points = [], evals = [], margins = [], evalMargins = [];
  // The step whose adapter won (early stopping or load_best says which), when the job says.
  let job = null, pending = false, bestStep = null, fineTuned = null;

  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      drawChart(svg, points, evals);
      if (margins.length) drawChart(dpoSvg, margins, evalMargins, (v) => v.toFixed(2));
    });
  };
  const summary = () => {
    if (!job) return;
    const p = job.progress;
    app.querySelector("#summary").innerHTML = `
      <dt>Status</dt><dd>${statusBadge(job.status)} ${job.error ? `<span class="error">${esc(job.error)}</span>` : ""}</dd>
      <dt>Progress</dt><dd>${progressBar(p)}</dd>
      <dt>Model</dt><dd>${esc(job.spec.model)}</dd>
      <dt>Method</dt><dd>${job.spec.method.type === "dpo" ? `DPO, β=${job.spec.method.beta}` : "supervised"}</dd>
      <dt>Training file</dt><dd class="mono">${esc(job.spec.training_file)}</dd>
      <dt>Last loss</dt><dd class="num">${fmtNum(p.last_loss)}</dd>
      <dt>Tokens/s</dt><dd class="num">${p.tokens_per_second ? p.tokens_per_second.toFixed(0) : ""}</dd>
      <dt>Trained tokens</dt><dd class="num">${p.trained_tokens}</dd>
      <dt>ETA</dt><dd>${job.status === "running" && p.eta_seconds ? `${Math.round(p.eta_seconds)} s` : ""}</dd>
      <dt>Created</dt><dd>${esc(fmtTime(job.created_at))}</dd>
      <dt>LoRA</dt><dd class="mono">r=${job.spec.lora.r} alpha=${job.spec.lora.alpha} · ${esc(job.spec.quantization.type)}</dd>`;
    app.querySelector("#cancel").disabled = !["queued", "running", "paused"].includes(job.status);
    app.querySelector("#pause").disabled = !["queued", "running"].includes(job.status);
    app.querySelector("#resume").disabled = job.status !== "paused";
  };
  const loadJob = async () => {
    job = await api(`/jobs/${encodeURIComponent(id)}`);
    summary();
    if (job.status === "succeeded" && !fineTuned) {
      const v1 = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`);
      fineTuned = v1.fine_tuned_model;
      if (fineTuned) {
        startChat(fineTuned);
        app.querySelector("#continue").hidden = false;
      }
    }
  };
  // A chat with the fine-tuned model, streamed as it is generated.
  const startChat = (model) => {
    const card = app.querySelector("#chat"), log = app.querySelector("#chat-log");
    card.hidden = false;
    app.querySelector("#chat-model").textContent = model;
    const history = [];
    const say = (role, text) => {
      log.insertAdjacentHTML("beforeend", `<p class="chat-${role}"><b>${role === "user" ? "You" : "Model"}:</b> <span></span></p>`);
      const span = log.lastElementChild.querySelector("span");
      span.textContent = text;
      return span;
    };
    app.querySelector("#chat-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const form = ev.target, err = app.querySelector("#chat-err");
      const q = form.q.value.trim();
      if (!q) return;
      err.textContent = "";
      form.q.value = "";
      history.push({ role: "user", content: q });
      say("user", q);
      const out = say("assistant", "");
      try {
        const r = await fetch("/v1/chat/completions", {
          method: "POST",
          headers: authHeaders({ "content-type": "application/json" }),
          body: JSON.stringify({ model, messages: history, stream: true, temperature: 0, max_tokens: 256 }),
        });
        if (!r.ok) throw new Error((await r.json()).error.message);
        const reader = r.body.getReader(), dec = new TextDecoder();
        let buf = "", answer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, i);
            buf = buf.slice(i + 2);
            for (const line of block.split("\n")) {
              if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
              const c = JSON.parse(line.slice(6));
              if (c.error) throw new Error(c.error.message);
              const d = c.choices && c.choices[0] && c.choices[0].delta;
              if (d && d.content) { answer += d.content; out.textContent = answer; }
            }
          }
        }
        history.push({ role: "assistant", content: answer });
      } catch (e) {
        err.textContent = e.message;
        history.pop();
      }
    });
  };
  // Each checkpoint with its validation loss where one was measured at its step; the winner is
  // the step the job named, or else the lowest validation loss. Each can start a new job.
  const loadCheckpoints = async () => {
    const [c, v1] = await Promise.all([
      api(`/jobs/${encodeURIComponent(id)}/checkpoints`),
      api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/checkpoints?limit=100`),
    ]);
    const names = new Map(v1.data.map((k) => [k.step_number, k.fine_tuned_model_checkpoint]));
    const evalAt = new Map(evals.map((e) => [e.step, e.eval]));
    let best = c.data.some((k) => k.step === bestStep) ? bestStep : null;
    if (best === null) {
      const scored = c.data.filter((k) => evalAt.has(k.step));
      if (scored.length) best = scored.reduce((a, b) => (evalAt.get(b.step) < evalAt.get(a.step) ? b : a)).step;
    }
    app.querySelector("#ckpts tbody").innerHTML = c.data.map((k) => `<tr data-step="${k.step}"${k.step === best ? ` class="best"` : ""}>
      <td class="num">${k.step}</td>
      <td class="mono">${esc(k.name)}${k.step === best ? ` <span class="badge best">best</span>` : ""}</td>
      <td class="num">${fmtNum(k.loss)}</td><td class="num">${evalAt.has(k.step) ? fmtNum(evalAt.get(k.step)) : ""}</td>
      <td>${esc(fmtTime(k.created_at))}</td>
      <td>${names.has(k.step) ? `<button class="secondary small continue" data-from="${esc(names.get(k.step))}">Continue from</button>` : ""}</td></tr>`).join("")
      || `<tr><td colspan="6" class="muted">none yet</td></tr>`;
  };
  const continueFrom = (name) => { location.hash = `#/new?from=${encodeURIComponent(name)}`; };
  const loadArtifacts = async () => {
    const a = await api(`/jobs/${encodeURIComponent(id)}/artifacts`);
    app.querySelector("#arts tbody").innerHTML = a.data.map((f) => `<tr>
      <td><a class="mono artifact" href="/jobs/${encodeURIComponent(id)}/artifacts/${f.name.split("/").map(encodeURIComponent).join("/")}" data-name="${esc(f.name)}">${esc(f.name)}</a></td>
      <td class="num">${fmtBytes(f.bytes)}</td></tr>`).join("")
      || `<tr><td colspan="2" class="muted">none yet</td></tr>`;
  };

  try {
    await Promise.all([loadJob(), loadCheckpoints(), loadArtifacts()]);
  } catch (e) {
    app.querySelector("#err").textContent = e.message;
    return;
  }
  for (const action of ["cancel", "pause", "resume"]) {
    app.querySelector(`#${action}`).addEventListener("click", async () => {
      try {
        job = await api(`/jobs/${encodeURIComponent(id)}/${action}`, { method: "POST" });
        summary();
      } catch (e) { app.querySelector("#err").textContent = e.message; }
    });
  }

  app.querySelector("#continue").addEventListener("click", () => fineTuned && continueFrom(fineTuned));
  app.querySelector("#ckpts").addEventListener("click", (ev) => {
    const b = ev.target.closest("button.continue");
    if (b) continueFrom(b.dataset.from);
  });

  app.querySelector("#arts").addEventListener("click", (ev) => {
    const a = ev.target.closest("a.artifact");
    if (!a) return;
    ev.preventDefault();
    download(a.getAttribute("href"), a.dataset.name).catch((e) => { app.querySelector("#err").textContent = e.message; });
  });

  const log = app.querySelector("#events tbody");
  const logBox = app.querySelector(".log");
  // A paused job's stream stays open: its events go on when it resumes.
  const finished = () => job && ["succeeded", "failed", "cancelled"].includes(job.status);
  let stop = () => {};
  const onEvent = (msg) => {
    const e = JSON.parse(msg.data);
    const stick = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
    log.insertAdjacentHTML("beforeend", `<tr class="level-${esc(e.level)}"><td class="num">${e.seq}</td>
      <td>${esc(new Date(e.created_at * 1000).toLocaleTimeString())}</td><td>${esc(e.type)}</td><td>${esc(e.message)}</td></tr>`);
    if (stick) logBox.scrollTop = logBox.scrollHeight;
    const d = e.data || {};
    if (e.type === "metrics" && Number.isFinite(d["rewards/margins"])) {
      margins.push({ step: d.step, loss: d["rewards/margins"], lr: d["rewards/accuracies"] });
      app.querySelector("#dpo").hidden = false;
    }
    if (e.type === "metrics" && Number.isFinite(d["eval_rewards/margins"])) {
      evalMargins.push({ step: d.step, eval: d["eval_rewards/margins"] });
    }
    if (e.type === "metrics" && Number.isFinite(d.loss)) {
      points.push({ step: d.step, loss: d.loss, lr: d.learning_rate });
      if (job) {
        Object.assign(job.progress, { step: d.step, total_steps: d.total_steps, last_loss: d.loss, tokens_per_second: d.tokens_per_second, eta_seconds: d.eta_seconds });
        job.progress.trained_tokens += d.tokens || 0;
        summary();
      }
      redraw();
    } else if (e.type === "metrics" && Number.isFinite(d.eval_loss)) {
      evals.push({ step: d.step, eval: d.eval_loss });
      redraw();
      loadCheckpoints().catch(() => {});
    } else if (e.type === "log" && Number.isFinite(d.best_step)) {
      bestStep = d.best_step;
      loadCheckpoints().catch(() => {});
    } else if (e.type === "log" && Array.isArray(d.samples)) {
      const card = app.querySelector("#samples");
      card.hidden = false;
      app.querySelector("#samples-step").textContent = `at step ${d.step}`;
      card.querySelector("tbody").innerHTML = d.samples.map((x) => `<tr>
        <td>${esc((x.messages[x.messages.length - 1] || {}).content || "")}</td><td>${esc(x.answer)}</td></tr>`).join("");
    } else if (e.type === "checkpoint") {
      loadCheckpoints().catch(() => {});
    } else if (e.type === "artifact") {
      loadArtifacts().catch(() => {});
    } else if (e.type === "status") {
      if (job && ["succeeded", "failed", "cancelled", "paused", "queued"].includes(d.status)) job.status = d.status;
      loadJob().catch(() => {});
    }
  };
  // The stream ends with the job; it reconnects (from the last id) only while the job runs.
  stop = followEvents(`/jobs/${encodeURIComponent(id)}/events`, onEvent, finished);
  cleanup.push(() => stop());
  redraw();
  const onResize = () => redraw();
  window.addEventListener("resize", onResize);
  cleanup.push(() => window.removeEventListener("resize", onResize));
}

// ---- routing ---------------------------------------------------------------------------------

function route() {
  for (const f of cleanup.splice(0)) f();
  const h = location.hash.replace(/^#/, "") || "/";
  const m = h.match(/^\/jobs\/(.+)$/);
  if (m) return showJob(decodeURIComponent(m[1]));
  const n = h.match(/^\/new(?:\?from=(.+))?$/);
  if (n) return showNew(n[1] ? decodeURIComponent(n[1]) : null);
  return showJobs();
}

window.addEventListener("hashchange", route);
route();
