#!/usr/bin/env python3
"""Loads a page in headless Chromium at a given window size and reports what a person sees.

Usage: page-snapshot.py CHROMIUM URL WIDTH HEIGHT WAIT_S OUT_PREFIX

Drives Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: file
descriptors 3 and 4, NUL-terminated JSON), so nothing beyond the standard library is needed.
After the page's load event and WAIT_S more seconds (the status page polls every 2 s), writes
  OUT_PREFIX.png     a screenshot of the viewport (WIDTH x HEIGHT),
  OUT_PREFIX.html    the DOM after the page's script ran,
  OUT_PREFIX.json    layout facts: the viewport width, the document's scroll width, the routes
                     table's right edge, and every table cell whose content is wider than the
                     cell (clipped or spilling over).
"""

import base64
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time

chromium, url, width, height, wait_s, out = sys.argv[1:7]
width, height, wait_s = int(width), int(height), float(wait_s)

# Chromium reads commands on fd 3 and writes answers and events on fd 4.
to_chrome_r, to_chrome_w = os.pipe()
from_chrome_r, from_chrome_w = os.pipe()
# Copies above 4 first, so that placing them at 3 and 4 cannot overwrite one another.
high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)


def place():
    os.dup2(high_r, 3)
    os.dup2(high_w, 4)


profile = tempfile.mkdtemp(prefix="spillway-chromium-")
proc = subprocess.Popen(
    [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
     "--disable-background-networking", "--disable-component-update", "--disable-sync",
     "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe",
     f"--window-size={width},{height}", "about:blank"],
    preexec_fn=place, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for fd in (to_chrome_r, from_chrome_w, high_r, high_w):
    os.close(fd)
writer = os.fdopen(to_chrome_w, "wb", buffering=0)
reader = os.fdopen(from_chrome_r, "rb", buffering=0)

buffer = b""
next_id = 0
deadline = time.monotonic() + 60


def read_message():
    global buffer
    while b"\0" not in buffer:
        if time.monotonic() > deadline:
            sys.exit("chromium: no answer within 60 s")
        chunk = reader.read(65536)
        if not chunk:
            sys.exit("chromium closed the DevTools pipe")
        buffer += chunk
    message, buffer = buffer.split(b"\0", 1)
    return json.loads(message)


events = []


def call(method, params=None, session=None):
    global next_id
    next_id += 1
    message = {"id": next_id, "method": method, "params": params or {}}
    if session:
        message["sessionId"] = session
    writer.write(json.dumps(message).encode() + b"\0")
    while True:
        m = read_message()
        if m.get("id") == next_id:
            if "error" in m:
                sys.exit(f"chromium: {method}: {m['error']}")
            return m.get("result", {})
        events.append(m)


def wait_event(name, session):
    while True:
        for i, e in enumerate(events):
            if e.get("method") == name and e.get("sessionId") == session:
                return events.pop(i)
        events.append(read_message())


try:
    target = call("Target.createTarget", {"url": "about:blank"})
    session = call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
    call("Emulation.setDeviceMetricsOverride",
         {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
    call("Page.enable", session=session)
    call("Page.navigate", {"url": url}, session)
    wait_event("Page.loadEventFired", session)
    time.sleep(wait_s)
    facts = call("Runtime.evaluate", {"returnByValue": True, "expression": """(() => {
        const table = document.getElementById('routes');
        const spilled = [];
        document.querySelectorAll('#routes td, #routes th').forEach((c) => {
            if (c.scrollWidth > c.clientWidth + 1) {
                spilled.push(c.textContent.trim().slice(0, 60) + ' (' + c.scrollWidth + ' > ' + c.clientWidth + ')');
            }
        });
        return {
            viewport: window.innerWidth,
            scroll_width: document.documentElement.scrollWidth,
            table_right: table ? table.getBoundingClientRect().right : null,
            spilled: spilled,
        };
    })()"""}, session)["result"]["value"]
    dom = call("Runtime.evaluate", {"returnByValue": True,
                                    "expression": "document.documentElement.outerHTML"}, session)
    shot = call("Page.captureScreenshot", {"format": "png"}, session)
    with open(out + ".png", "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    with open(out + ".html", "w") as f:
        f.write(dom["result"]["value"])
    with open(out + ".json", "w") as f:
        json.dump(facts, f)
    call("Browser.close")
finally:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    subprocess.run(["rm", "-rf", profile], stderr=subprocess.DEVNULL)
