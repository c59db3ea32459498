// The live page: polls /live/state.json about once a second and draws it. Plain DOM, no
// framework; every value from the daemon goes in as text (textContent), never as HTML.
"use strict";

const POLL_MS = 1000;
const TIMEOUT_MS = 5000;
const VERDICTS = ["pass", "fail", "timeout", "shed", "error"];
let lastUpdate = null;  // when state.json last answered (this browser's clock)

function $(id) { return document.getElementById(id); }
function text(id, value) { $(id).textContent = value; }
function clock(seconds) { return new Date(seconds * 1000).toLocaleTimeString(); }
function num(x, digits) { return x === null || x === undefined ? "–" : x.toFixed(digits); }

function el(tag, cls, content) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (content !== undefined) node.textContent = content;
  return node;
}

// Why a part failed, in words: the reason when there is one, and what the object branch saw.
function why(f) {
  const parts = [];
  if (f.reason) parts.push(f.reason);
  const objects = Object.entries(f.objects).map(([status, n]) => `${n} ${status}`);
  if (objects.length) parts.push("objects: " + objects.join(", "));
  return parts.length ? parts.join(" · ") : "score above threshold";
}

// Which branch saw it: the fused score's positive z-scores, largest first.
function branches(f) {
  const seen = Object.entries(f.branch_scores)
    .filter(([, z]) => z !== null && z >= 0.05)
    .sort((a, b) => b[1] - a[1])
    .map(([name, z]) => `${name} ${z.toFixed(1)}`);
  return seen.length ? "z: " + seen.join(" · ") : "";
}

function card(f) {
  const node = el("article", "failure");
  node.dataset.id = f.id;
  if (f.image) {
    const img = el("img");
    img.src = f.image;
    img.alt = `overlay of failed part ${f.part_id || f.frame_id}`;
    node.append(img);
  } else {
    node.append(el("div", "noimage", "no picture"));
  }
  const body = el("div", "body");
  body.append(el("div", "title", `${f.camera} · frame ${f.frame_id}` + (f.part_id ? ` · ${f.part_id}` : "")));
  const line = el("div");
  line.append(el("span", "score", `score ${num(f.score, 3)}`), ` / threshold ${num(f.threshold, 3)}`,
              el("span", "muted", f.capture_ts ? ` · ${clock(f.capture_ts)}` : ""));
  body.append(line, el("div", "why", why(f)), el("div", "branches muted", branches(f)));
  if (f.verdict_id) body.append(el("div", "id muted", `verdict ${f.verdict_id}`));
  node.append(body);
  return node;
}

// Keep the cards already drawn (their pictures stay loaded); add the new ones, drop the old.
function drawFailures(failures) {
  const box = $("failures");
  const wanted = new Set(failures.map(f => f.id));
  for (const node of [...box.children]) if (!wanted.has(node.dataset.id)) node.remove();
  const drawn = new Map([...box.children].map(node => [node.dataset.id, node]));
  let previous = null;
  for (const f of failures) {  // newest first
    const node = drawn.get(f.id) || card(f);
    if (previous === null) { if (box.firstChild !== node) box.prepend(node); }
    else if (previous.nextSibling !== node) previous.after(node);
    previous = node;
  }
  $("no-failures").hidden = failures.length > 0;
}

// The last self-check (runtime.selfcheck): passed or failed, when, and which reference failed why.
function drawSelfcheck(c) {
  $("selfcheck").hidden = !c;
  if (!c) return;
  const pill = $("selfcheck-pill");
  const last = c.last;
  if (!last) {
    pill.className = "pill waiting";
    pill.textContent = "SELF-CHECK RUNNING";
    text("selfcheck-detail", "the first self-check has not finished yet");
    return;
  }
  pill.className = "pill " + (last.ok ? "ready" : "failed");
  pill.textContent = last.ok ? "SELF-CHECK PASSED" : "SELF-CHECK FAILED";
  const failed = last.checks.filter(x => x.failure).map(x => `${x.reference}: ${x.failure} (${x.detail})`);
  const when = `at ${clock(last.finished)}, ${last.checks.length} references`;
  const next = c.next_in_s === null ? "" : ` · next in ${Math.round(c.next_in_s / 60)} min`;
  text("selfcheck-detail", (failed.length ? `${when} · ${failed.join("; ")}` : when) + next);
}

function draw(s) {
  const d = s.daemon;
  const link = $("link");
  link.className = "pill " + (d.ready ? "ready" : "not-ready");
  link.textContent = d.ready ? "READY" : "NOT READY";
  text("bank-id", d.bank_id || "–");
  text("bank-images", d.bank_images ? `(${d.bank_images} good images)` : "");
  text("backend", "backend: " + (d.backend_label || d.backend || "–"));
  text("version", d.version || "–");
  text("updated", clock(s.time));
  text("judged-per-s", num(s.judged_per_s, 1));
  text("p50", s.latency_ms ? `${Math.round(s.latency_ms.p50)} ms` : "–");
  text("p99", s.latency_ms ? `${Math.round(s.latency_ms.p99)} ms` : "–");
  text("total", String(s.total));
  text("window-note", `rates and latencies: the last ${s.window_s} s (${num(s.verdicts_per_s, 1)} verdicts/s ` +
       `of every kind; latency over ${s.latency_ms ? s.latency_ms.n : 0} verdicts); counts: since the daemon started`);
  for (const v of VERDICTS) text("count-" + v, String(s.counts[v] ?? 0));
  text("failures-note", s.failures.length ? `(${s.failures.length}, newest first)` : "");
  drawFailures(s.failures);
  drawSelfcheck(d.selfcheck);
}

function lost() {
  document.body.classList.add("offline");
  $("lost").hidden = false;
  text("lost-since", lastUpdate ? lastUpdate.toLocaleTimeString() : "never (no answer yet)");
  const link = $("link");
  link.className = "pill lost";
  link.textContent = "CONNECTION LOST";
}

async function poll() {
  try {
    const answer = await fetch("/live/state.json", {cache: "no-store", signal: AbortSignal.timeout(TIMEOUT_MS)});
    if (!answer.ok) throw new Error(`state.json: HTTP ${answer.status}`);
    draw(await answer.json());
    lastUpdate = new Date();
    document.body.classList.remove("offline");
    $("lost").hidden = true;
  } catch (e) {
    lost();
  }
  setTimeout(poll, POLL_MS);
}

poll();
