// pilus service map: plain JavaScript and SVG, no build step.
// Data: the WebSocket /api/stream?namespace=NS: "snapshot" (nodes, edges, rows), then
// "flow" (a row, its edge, both nodes) for every new flow, "status" on changes; the page
// sends {"namespace": NS} when another namespace is chosen.
// Layout: a node's column is the length of the longest path reaching it (sources left),
// rows sorted by namespace and name; one curve per edge (source, destination, port).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const BOX_W = 180, BOX_H = 58, COL_GAP = 150, ROW_GAP = 30, MARGIN = 30, EDGE_GAP = 16;
const MAX_ROWS = 200;

const state = { namespace: null, nodes: new Map(), edges: new Map(), rows: [], flows: 0, status: null };

function el(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function edgeTitle(e) {
  const parts = [`${e.source} → ${e.destination} ${e.port}/${e.protocol}`,
                 `forwarded: ${e.forwarded}`, `dropped: ${e.dropped}`];
  if (e.audit) parts.push(`audit: ${e.audit}`);
  if (e.dropped) {
    parts.push(`drop reason: ${e.last_reason || "unknown"}`);
    const all = Object.entries(e.reasons || {}).map(([r, n]) => `${r} ×${n}`).join(", ");
    if (all) parts.push(`reasons: ${all}`);
  }
  return parts.join("\n");
}

function ranks(nodes, edges) {
  const rank = new Map([...nodes.keys()].map((id) => [id, 0]));
  const links = [...edges.values()].filter((e) => e.source !== e.destination);
  // longest path, with at most |nodes| rounds so that a cycle cannot loop forever
  for (let round = 0; round < nodes.size; round++) {
    let changed = false;
    for (const e of links) {
      const r = (rank.get(e.source) || 0) + 1;
      if (r > (rank.get(e.destination) || 0) && r < nodes.size) { rank.set(e.destination, r); changed = true; }
    }
    if (!changed) break;
  }
  return rank;
}

function layout() {
  const rank = ranks(state.nodes, state.edges);
  const columns = new Map();
  for (const n of state.nodes.values()) {
    const r = rank.get(n.id) || 0;
    if (!columns.has(r)) columns.set(r, []);
    columns.get(r).push(n);
  }
  // a box grows with the edges on its busier side, so that their ends stay EDGE_GAP apart
  const degree = new Map();
  for (const e of state.edges.values()) {
    if (e.source === e.destination) continue;
    for (const [id, side] of [[e.source, 0], [e.destination, 1]]) {
      if (!degree.has(id)) degree.set(id, [0, 0]);
      degree.get(id)[side] += 1;
    }
  }
  const pos = new Map();
  let height = 0, width = 0;
  for (const [r, list] of columns) {
    list.sort((a, b) => (a.namespace + "/" + a.name).localeCompare(b.namespace + "/" + b.name));
    let y = MARGIN;
    for (const n of list) {
      const h = Math.max(BOX_H, EDGE_GAP * (Math.max(...(degree.get(n.id) || [0, 0])) + 1));
      const x = MARGIN + r * (BOX_W + COL_GAP);
      pos.set(n.id, { x, y, h });
      width = Math.max(width, x + BOX_W + MARGIN + 90);
      y += h + ROW_GAP;
      height = Math.max(height, y - ROW_GAP + MARGIN);
    }
  }
  return { pos, width, height };
}

// where an edge leaves its source and enters its destination: the edges of one side of a
// box spread over its height, ordered by the other end's height so that they do not cross
function anchors(edges, pos) {
  const out = new Map(), inc = new Map();
  for (const e of edges) {
    if (!pos.get(e.source) || !pos.get(e.destination)) continue;
    if (!out.has(e.source)) out.set(e.source, []);
    if (!inc.has(e.destination)) inc.set(e.destination, []);
    out.get(e.source).push(e);
    inc.get(e.destination).push(e);
  }
  const at = new Map();
  const spread = (lists, end, other) => {
    for (const [id, list] of lists) {
      list.sort((p, q) => pos.get(p[other]).y - pos.get(q[other]).y || p.id.localeCompare(q.id));
      list.forEach((e, i) => {
        const y = pos.get(id).y + pos.get(id).h * (i + 1) / (list.length + 1);
        at.set(e.id + end, y);
      });
    }
  };
  spread(out, "\u0000out", "destination");
  spread(inc, "\u0000in", "source");
  return (e) => [at.get(e.id + "\u0000out"), at.get(e.id + "\u0000in")];
}

function edgePath(a, b, y1, y2, offset) {
  if (a === b) {  // a workload talking to itself: a loop over its box
    const x = a.x + BOX_W - 30, y = a.y;
    return { d: `M${x},${y} C${x - 10},${y - 50 - offset} ${x + 60},${y - 50 - offset} ${x + 30},${y}`,
             lx: x + 12, ly: y - 40 - offset };
  }
  if (b.x > a.x) {
    const x1 = a.x + BOX_W, x2 = b.x, mid = (x1 + x2) / 2;
    // the label sits near the destination, above the curve's end (Hubble UI puts ports there)
    return { d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, lx: x2 - 48, ly: y2 - 6 };
  }
  // same column or backwards: leave and enter on the right side
  const x1 = a.x + BOX_W, x2 = b.x + BOX_W, bend = Math.max(x1, x2) + 70;
  return { d: `M${x1},${y1} C${bend},${y1} ${bend},${y2} ${x2},${y2}`, lx: bend - 18, ly: (y1 + y2) / 2 };
}

function renderMap() {
  const svg = document.getElementById("map");
  const nodesG = document.getElementById("nodes"), edgesG = document.getElementById("edges");
  nodesG.replaceChildren();
  edgesG.replaceChildren();
  document.getElementById("empty").hidden = state.nodes.size > 0;
  const { pos, width, height } = layout();
  svg.setAttribute("width", Math.max(width, 400));
  svg.setAttribute("height", Math.max(height, 120));

  const edges = [...state.edges.values()].sort((p, q) => p.id.localeCompare(q.id));
  const ends = anchors(edges.filter((e) => e.source !== e.destination), pos);
  let loops = 0;
  for (const e of edges) {
    const a = pos.get(e.source), b = pos.get(e.destination);
    if (!a || !b) continue;
    const [y1, y2] = a === b ? [0, 0] : ends(e);
    const { d, lx, ly } = edgePath(a, b, y1, y2, a === b ? 12 * loops++ : 0);
    const kind = e.dropped ? "dropped" : "forwarded";
    const title = edgeTitle(e);
    const g = el("g", {
      class: `edge ${kind}`, id: "edge-" + e.id, title,
      "data-source": e.source, "data-destination": e.destination, "data-port": e.port,
      "data-protocol": e.protocol, "data-forwarded": e.forwarded, "data-dropped": e.dropped,
      "data-reason": e.dropped ? e.last_reason : "",
    });
    g.appendChild(el("title", {}, title));
    g.appendChild(el("path", { class: "line", d, "marker-end": `url(#arrow-${kind})` }));
    const counts = e.dropped ? `${e.forwarded}✓ ${e.dropped}✗` : `${e.forwarded}✓`;
    g.appendChild(el("text", { class: "label", x: lx, y: ly, "text-anchor": "middle" },
                     `${e.port ? e.port + "/" : ""}${e.protocol || "?"} ${counts}`));
    edgesG.appendChild(g);
  }
  for (const n of state.nodes.values()) {
    const p = pos.get(n.id);
    const g = el("g", { class: `node ${n.kind}`, id: "node-" + n.id, "data-node": n.id,
                        transform: `translate(${p.x},${p.y})` });
    g.appendChild(el("title", {}, [n.id, ...n.labels].join("\n")));
    g.appendChild(el("rect", { width: BOX_W, height: p.h, rx: 6 }));
    g.appendChild(el("text", { class: "name", x: 10, y: 20 }, n.name));
    g.appendChild(el("text", { class: "ns", x: 10, y: 36 }, n.kind === "entity" ? "entity" : `namespace ${n.namespace}`));
    const shown = n.labels.filter((l) => !l.startsWith("k8s:io.kubernetes") && !l.startsWith("k8s:io.cilium"))
      .map((l) => l.replace(/^k8s:/, "")).join(" ");
    g.appendChild(el("text", { class: "labels", x: 10, y: 50 }, shown.length > 30 ? shown.slice(0, 29) + "…" : shown));
    nodesG.appendChild(g);
  }
}

function renderTable() {
  const body = document.getElementById("flow-rows");
  body.replaceChildren();
  for (const r of state.rows.slice(-MAX_ROWS).reverse()) {
    const tr = document.createElement("tr");
    const kind = r.verdict === "DROPPED" || r.verdict === "ERROR" ? "dropped" : "forwarded";
    tr.className = `flow ${kind}`;
    tr.dataset.edge = r.edge;
    const cells = [["time", r.time.replace("T", " ").replace("Z", "")], ["source", r.source_pod],
                   ["destination", r.destination_pod], ["port", r.port ? `${r.port}/${r.protocol}` : r.protocol],
                   ["verdict", r.verdict], ["reason", r.reason], ["node", r.node_name]];
    for (const [cls, text] of cells) {
      const td = document.createElement("td");
      td.className = cls;
      td.textContent = text;
      if (cls === "source" || cls === "destination") td.title = cls === "source" ? r.source : r.destination;
      tr.appendChild(td);
    }
    if (r.summary) tr.title = r.summary;
    body.appendChild(tr);
  }
  document.getElementById("flow-count").textContent = `(${state.rows.length} shown, ${state.flows} seen)`;
}

function renderStatus() {
  const s = state.status, span = document.getElementById("status");
  if (!s) return;
  let text = `${s.connected ? "connected to" : "not connected to"} ${s.source}`;
  if (s.error) text += ` — ${s.error}`;
  if (s.unavailable_nodes && s.unavailable_nodes.length) text += ` — unavailable: ${s.unavailable_nodes.join(", ")}`;
  span.textContent = text;
  span.classList.toggle("error", !s.connected);
  span.dataset.connected = s.connected ? "true" : "false";
}

function setNamespaces(list) {
  const select = document.getElementById("namespace");
  const have = new Set([...select.options].map((o) => o.value));
  for (const ns of list) {
    if (ns && !have.has(ns)) select.appendChild(new Option(ns, ns));
  }
  select.value = state.namespace || "";
}

let pending = null;
function render() {
  if (pending) return;
  pending = setTimeout(() => { pending = null; renderMap(); renderTable(); renderStatus(); }, 50);
}

function onSnapshot(view) {
  state.namespace = view.namespace;
  state.nodes = new Map(view.nodes.map((n) => [n.id, n]));
  state.edges = new Map(view.edges.map((e) => [e.id, e]));
  state.rows = view.rows;
  state.flows = view.flows;
  state.status = view.status;
  setNamespaces(view.namespaces);
  document.body.dataset.namespace = view.namespace;
  render();
}

function onFlow(msg) {
  for (const n of msg.nodes) state.nodes.set(n.id, n);
  state.edges.set(msg.edge.id, msg.edge);
  state.rows.push(msg.row);
  if (state.rows.length > MAX_ROWS) state.rows.splice(0, state.rows.length - MAX_ROWS);
  state.flows = msg.flows;
  setNamespaces(msg.nodes.map((n) => n.namespace));
  render();
}

let socket = null, retry = 500;
function connect() {
  const q = state.namespace === null ? "" : "?namespace=" + encodeURIComponent(state.namespace);
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/api/stream" + q;
  socket = new WebSocket(url);
  socket.onopen = () => { retry = 500; };
  socket.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.type === "snapshot") onSnapshot(msg.data);
    else if (msg.type === "flow") onFlow(msg.data);
    else if (msg.type === "status") { state.status = msg.data; renderStatus(); }
  };
  socket.onclose = () => {
    const span = document.getElementById("status");
    span.textContent = "the pilus ui server does not answer; retrying…";
    span.classList.add("error");
    span.dataset.connected = "false";
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 5000);
  };
}

document.getElementById("namespace").addEventListener("change", (ev) => {
  state.namespace = ev.target.value;
  const url = new URL(window.location.href);
  url.searchParams.set("namespace", state.namespace);
  window.history.replaceState(null, "", url);
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ namespace: state.namespace }));
});

state.namespace = new URL(window.location.href).searchParams.get("namespace");  // null: the server's default
connect();
