// DOM helpers. Every server-provided string goes into the page as text (textContent or an
// attribute), never as HTML: the console has no innerHTML anywhere.

// h("td", {class: "num"}, "text", childNode, ...) -> an element. Attributes starting with "on"
// take a function (an event listener); strings, numbers and nodes become children.
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export function table(headers, rows, attrs = {}) {
  return h(
    "table",
    attrs,
    h("thead", {}, h("tr", {}, headers.map((title) => h("th", {}, title)))),
    h("tbody", {}, rows),
  );
}

export function errorBox(error) {
  return h("div", { class: "error", role: "alert" }, String(error && error.message ? error.message : error));
}

// "HEALTH_STATE_PASSING" -> "PASSING"
export function enumName(value, prefix) {
  if (value === undefined || value === null || value === "") return "";
  return String(value).replace(prefix, "");
}

export function badge(text, kind) {
  return h("span", { class: `badge ${kind || String(text).toLowerCase()}` }, text);
}

export function link(href, text, attrs = {}) {
  return h("a", { href, ...attrs }, text);
}

export function time(timestamp) {
  if (!timestamp) return "";
  const date = new Date(timestamp);
  return Number.isNaN(date.getTime()) ? String(timestamp) : date.toISOString().replace("T", " ").replace("Z", "");
}

// Protobuf JSON duration "5s" / "0.250s" -> seconds.
export function seconds(duration) {
  return duration ? Number.parseFloat(String(duration).replace("s", "")) : 0;
}

export function formatSeconds(value) {
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 120) return `${value.toFixed(value < 10 ? 2 : 1)} s`;
  return `${Math.round(value / 60)} min`;
}

function base64Bytes(data) {
  const raw = atob(data || "");
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i += 1) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

// A payload (protobuf JSON bytes: base64) as a <pre>: pretty JSON when it parses, UTF-8 text when it
// decodes, otherwise hex and base64.
export function payload(data, contentType) {
  const bytes = base64Bytes(data);
  let text = null;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch (_) {
    text = null;
  }
  if (text !== null) {
    try {
      return h("pre", { class: "payload json" }, JSON.stringify(JSON.parse(text), null, 2));
    } catch (_) {
      if (!/[\u0000-\u0008\u000e-\u001f]/.test(text)) return h("pre", { class: "payload text" }, text);
    }
  }
  const hex = Array.from(bytes.slice(0, 512), (b) => b.toString(16).padStart(2, "0")).join(" ");
  return h(
    "pre",
    { class: "payload binary", title: contentType || "application/octet-stream" },
    `hex: ${hex}${bytes.length > 512 ? " …" : ""}\nbase64: ${data || ""}`,
  );
}

export function section(title, ...children) {
  return h("section", {}, h("h2", {}, title), ...children);
}
