"""Load the dashboard in headless Chromium while a job runs and check that its chart follows the
job live: the number of plotted points grows between two looks, and the polyline holds that many
points. Saves a screenshot. Drives Chromium over the DevTools protocol.

    pip install websocket-client          # and a chromium binary (Debian: apt-get install chromium)
    cargo run --release -- serve --model-root models --data-dir /tmp/qlorad-data &
    python scripts/check_dashboard.py [--server http://127.0.0.1:8080] [--model tiny] \
        [--screenshot /tmp/qlorad-dashboard.png] [--chat-job JOB --chat-question TEXT]

The script starts its own long job (and cancels it at the end). With --chat-job (a succeeded job)
it also asks that job's page's chat a question and prints the streamed answer. A second, short
job with evaluations and load_best checks that its page marks the winning checkpoint and that
"Continue from" opens the new-job form on that checkpoint.
"""

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket

DATA = [
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "Boil time?"}, {"role": "assistant", "content": "Ninety seconds."}]},
]


def http(method, url, body=None, content_type="application/json"):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", content_type)
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")


def cancel(server, jid):
    """Cancel a job unless it has already ended."""
    try:
        http("POST", f"{server}/jobs/{jid}/cancel", {})
    except urllib.error.HTTPError as e:
        if e.code != 409:
            raise


class Tab:
    """One page over the DevTools websocket."""

    def __init__(self, ws_url):
        self.ws = websocket.create_connection(ws_url, timeout=30)
        self.n = 0

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return r.get("result", {}).get("value")


def check_chat(tab, args):
    """A succeeded job's page: its chat answers a question, streamed into the page."""
    tab.call("Page.navigate", url=f"{args.server}/#/jobs/{args.chat_job}")
    for _ in range(100):
        if tab.eval("!!document.getElementById('chat') && !document.getElementById('chat').hidden"):
            break
        time.sleep(0.1)
    else:
        print("FAIL: no chat on the succeeded job's page")
        return False
    # A DPO job's page draws its reward margins too.
    dpo = tab.eval("(() => { const p = document.querySelector('#dpochart polyline.loss');"
                   " return document.getElementById('dpo').hidden || !p ? 0 : p.getAttribute('points').trim().split(/\\s+/).length; })()")
    print(f"DPO reward chart points: {dpo}")
    q = json.dumps(args.chat_question)
    tab.eval(f"(() => {{ const f = document.getElementById('chat-form'); f.q.value = {q}; f.requestSubmit(); return 1; }})()")
    last = "(() => { const a = document.querySelectorAll('#chat-log .chat-assistant span'); return a.length ? a[a.length - 1].textContent : ''; })()"
    answer, steady = "", 0
    for _ in range(600):
        err = tab.eval("document.getElementById('chat-err').textContent")
        if err:
            print(f"FAIL: chat error {err}")
            return False
        now = tab.eval(last) or ""
        steady = steady + 1 if now and now == answer else 0
        answer = now
        if steady >= 15:  # the streamed answer has not grown for 1.5 s
            break
        time.sleep(0.1)
    shot = tab.call("Page.captureScreenshot", format="png")
    path = args.screenshot.replace(".png", "-chat.png")
    with open(path, "wb") as out:
        out.write(base64.b64decode(shot["data"]))
    model = tab.eval("document.getElementById('chat-model').textContent")
    print(f"chat with {model}: {args.chat_question!r} -> {answer!r} (screenshot {path})")
    return bool(answer)


def check_best(tab, args):
    """A finished job with evaluations and load_best: its page marks the winning checkpoint, and
    that checkpoint's "Continue from" opens the new-job form on it with the adapter's shape."""
    body = "".join(json.dumps(r) + "\n" for r in DATA).encode()
    f = http("POST", f"{args.server}/files?filename=best.jsonl", body, "application/octet-stream")
    job = http("POST", f"{args.server}/jobs", {
        "model": args.model, "training_file": f["id"], "validation_file": f["id"],
        "checkpoint_every": 1, "eval_every": 1, "load_best": True,
        "hyperparameters": {"max_steps": 4, "batch_size": 3, "learning_rate": 0.05},
    })
    jid = job["id"]
    for _ in range(600):
        job = http("GET", f"{args.server}/jobs/{jid}")
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    if job["status"] != "succeeded":
        print(f"FAIL: the load_best job ended {job['status']}: {job.get('error')}")
        return False
    events = http("GET", f"{args.server}/jobs/{jid}/events?limit=1000")["data"]
    best = [e["data"]["best_step"] for e in events if "best_step" in (e.get("data") or {})]
    tab.call("Page.navigate", url=f"{args.server}/#/jobs/{jid}")
    marked = None
    for _ in range(100):
        marked = tab.eval("(() => { const r = document.querySelector('#ckpts tr.best'); return r ? Number(r.dataset.step) : null; })()")
        if marked is not None:
            break
        time.sleep(0.1)
    print(f"best step from the events: {best}; marked on the page: {marked}")
    shot = tab.call("Page.captureScreenshot", format="png")
    path = args.screenshot.replace(".png", "-best.png")
    with open(path, "wb") as out:
        out.write(base64.b64decode(shot["data"]))
    tab.eval("document.querySelector('#ckpts tr.best button.continue').click()")
    form = None
    for _ in range(50):
        form = tab.eval("(() => { const s = document.querySelector('#new select[name=model]');"
                        " return s && s.value.startsWith('ft:') ? [location.hash, s.value, document.querySelector('#new input[name=r]').disabled] : null; })()")
        if form:
            break
        time.sleep(0.1)
    print(f"continue from the best checkpoint opens: {form} (screenshot {path})")
    want = f":ckpt-step-{best[-1]}" if best else None
    return bool(best) and marked == best[-1] and bool(form) and form[1].endswith(want) and form[2]


def check_estimate(tab, args):
    """The new-job form's "Estimate": the dataset uploaded once, the dry run's steps and peak
    memory shown, no job created."""
    path = os.path.join(tempfile.mkdtemp(prefix="qlorad-estimate-"), "estimate.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in DATA))
    before = len(http("GET", f"{args.server}/jobs?limit=100")["data"])
    tab.call("Page.navigate", url=f"{args.server}/#/new")
    for _ in range(100):
        if tab.eval("!!document.querySelector('#new input[name=file]') && document.querySelectorAll('#new select option').length > 0"):
            break
        time.sleep(0.1)
    doc = tab.call("DOM.getDocument")
    node = tab.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#new input[name=file]")
    tab.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[path])
    tab.eval("document.querySelector('#new input[name=max_steps]').value = '5'; document.getElementById('estimate').click(); 1")
    text = ""
    for _ in range(200):
        text = tab.eval("(() => { const p = document.getElementById('preflight'); return p && !p.hidden ? p.innerText : ''; })()") or ""
        err = tab.eval("document.getElementById('err').textContent")
        if text or err:
            break
        time.sleep(0.1)
    after = len(http("GET", f"{args.server}/jobs?limit=100")["data"])
    shot = tab.call("Page.captureScreenshot", format="png")
    shot_path = args.screenshot.replace(".png", "-estimate.png")
    with open(shot_path, "wb") as out:
        out.write(base64.b64decode(shot["data"]))
    print(f"estimate: {text!r} error: {err!r}; jobs before {before}, after {after} (screenshot {shot_path})")
    return "Steps" in text and "Peak memory on" in text and before == after


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--screenshot", default="/tmp/qlorad-dashboard.png")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    ap.add_argument("--port", type=int, default=9333)
    ap.add_argument("--chat-job", help="a succeeded job whose page's chat is asked --chat-question")
    ap.add_argument("--chat-question", default="Who designed the Lumenfold?")
    args = ap.parse_args()

    body = "".join(json.dumps(r) + "\n" for r in DATA).encode()
    f = http("POST", f"{args.server}/files?filename=dashboard.jsonl", body, "application/octet-stream")
    job = http("POST", f"{args.server}/jobs", {
        "model": args.model, "training_file": f["id"], "checkpoint_every": 50,
        "hyperparameters": {"max_steps": 100000, "batch_size": 3, "lr_scheduler": "cosine", "warmup_steps": 20},
    })
    jid = job["id"]
    print(f"job {jid} started")
    profile = tempfile.mkdtemp(prefix="qlorad-chromium-")
    browser = subprocess.Popen([
        args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--remote-debugging-port={args.port}", f"--remote-allow-origins=http://127.0.0.1:{args.port}",
        f"--user-data-dir={profile}", "--window-size=1280,1400",
        "about:blank",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ok = False
    try:
        for _ in range(100):
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{args.port}/json").read())
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise SystemExit("FAIL: chromium did not start")
        tab = Tab(pages[0]["webSocketDebuggerUrl"])
        tab.call("Page.enable")
        tab.call("Emulation.setDeviceMetricsOverride", width=1280, height=1400, deviceScaleFactor=1, mobile=False)
        tab.call("Page.navigate", url=f"{args.server}/#/jobs/{jid}")
        count = "Number(document.getElementById('chart') && document.getElementById('chart').dataset.points || 0)"
        polyline = ("(() => { const p = document.querySelector('#chart polyline.loss');"
                    " return p ? p.getAttribute('points').trim().split(/\\s+/).length : 0; })()")
        first = 0
        for _ in range(100):
            first = tab.eval(count) or 0
            if first >= 2:
                break
            time.sleep(0.1)
        time.sleep(3)
        # One evaluation reads both, so points arriving in between cannot make them differ.
        second, drawn = tab.eval(f"[{count}, {polyline}]")
        status = tab.eval("document.querySelector('#summary .status') && document.querySelector('#summary .status').textContent")
        rows = tab.eval("document.querySelectorAll('#events tbody tr').length")
        print(f"chart points: {first} -> {second} after 3 s; polyline points: {drawn}; status: {status}; event rows: {rows}")
        shot = tab.call("Page.captureScreenshot", format="png")
        with open(args.screenshot, "wb") as out:
            out.write(base64.b64decode(shot["data"]))
        print(f"screenshot: {args.screenshot}")
        jobs_page = None
        tab.call("Page.navigate", url=f"{args.server}/#/")
        for _ in range(50):
            jobs_page = tab.eval(f"!!document.querySelector('tr[data-job=\"{jid}\"] .status.running')")
            if jobs_page:
                break
            time.sleep(0.1)
        print(f"jobs list shows the job running: {jobs_page}")
        ok = first >= 2 and second > first and drawn == second and status == "running" and rows > 0 and jobs_page
        # One worker: the long job makes way for the short one.
        cancel(args.server, jid)
        ok = check_best(tab, args) and ok
        ok = check_estimate(tab, args) and ok
        if args.chat_job:
            ok = check_chat(tab, args) and ok
    finally:
        browser.terminate()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)
        cancel(args.server, jid)
    if not ok:
        print("FAIL: the chart did not follow the job")
        sys.exit(1)
    print("the dashboard follows the job live")


if __name__ == "__main__":
    main()
