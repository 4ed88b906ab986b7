// Calls the control plane's rpcmesh.v1 services over the Connect protocol (JSON), from the same origin.
// Unary: POST /<service>/<method> with the request's canonical protobuf JSON.
// Server streaming: Content-Type application/connect+json, messages in envelopes
// (1 flag byte, 4-byte big-endian length, JSON); the last envelope (flag 0x02) ends the stream.

const TOKEN_KEY = "rpcmesh.console.token";

export class RpcError extends Error {
  constructor(code, message, details) {
    super(`${code}: ${message}`);
    this.code = code;
    this.rpcMessage = message;
    this.details = details || [];
  }
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

// Set by app.js: asks the user for a token once, when a call comes back unauthenticated.
let tokenPrompt = null;
export function onTokenNeeded(callback) {
  tokenPrompt = callback;
}

function headers(contentType) {
  const result = { "Content-Type": contentType, "Connect-Protocol-Version": "1" };
  const token = getToken();
  if (token) result.Authorization = `Bearer ${token}`;
  return result;
}

function path(method) {
  return method.includes(".") ? `/${method}` : `/rpcmesh.v1.${method}`;
}

async function errorFrom(response) {
  let body = {};
  try {
    body = await response.json();
  } catch (_) {
    body = {};
  }
  return new RpcError(body.code || `http_${response.status}`, body.message || response.statusText, body.details);
}

// call("Registry/Resolve", {service: "users"}) -> the response message as JSON.
export async function call(method, request = {}, retried = false) {
  const response = await fetch(path(method), {
    method: "POST",
    headers: headers("application/json"),
    body: JSON.stringify(request),
    credentials: "same-origin",
  });
  if (response.ok) return response.json();
  const error = await errorFrom(response);
  if (error.code === "unauthenticated" && !retried && tokenPrompt && (await tokenPrompt())) {
    return call(method, request, true);
  }
  throw error;
}

function envelope(message) {
  const json = new TextEncoder().encode(JSON.stringify(message));
  const out = new Uint8Array(5 + json.length);
  new DataView(out.buffer).setUint32(1, json.length, false);
  out.set(json, 5);
  return out;
}

// stream("Registry/Watch", {}, onMessage) -> {cancel(), done}: done resolves when the stream ends
// normally (or is cancelled) and rejects with an RpcError when it ends with an error. A stream refused
// as unauthenticated before its first message asks for a token (once) and starts again.
export function stream(method, request, onMessage) {
  const controller = new AbortController();
  let received = 0;
  const open = async () => {
    const response = await fetch(path(method), {
      method: "POST",
      headers: headers("application/connect+json"),
      body: envelope(request),
      signal: controller.signal,
      credentials: "same-origin",
    });
    if (!response.ok) throw await errorFrom(response);
    const reader = response.body.getReader();
    let buffer = new Uint8Array(0);
    for (;;) {
      const { value, done: finished } = await reader.read();
      if (finished) return;
      const joined = new Uint8Array(buffer.length + value.length);
      joined.set(buffer);
      joined.set(value, buffer.length);
      buffer = joined;
      while (buffer.length >= 5) {
        const view = new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
        const flags = view.getUint8(0);
        const length = view.getUint32(1, false);
        if (buffer.length < 5 + length) break;
        const text = new TextDecoder().decode(buffer.subarray(5, 5 + length));
        buffer = buffer.slice(5 + length);
        const message = text ? JSON.parse(text) : {};
        if (flags & 0x02) {
          if (message.error) {
            const e = message.error;
            throw new RpcError(e.code || "unknown", e.message || "", e.details);
          }
          return;
        }
        received += 1;
        onMessage(message);
      }
    }
  };
  const done = (async () => {
    try {
      await open();
    } catch (error) {
      const retry =
        error instanceof RpcError && error.code === "unauthenticated" && received === 0 && tokenPrompt;
      if (!retry || controller.signal.aborted || !(await tokenPrompt())) throw error;
      await open();
    }
  })().catch((error) => {
    if (controller.signal.aborted) return;
    throw error;
  });
  return { cancel: () => controller.abort(), done };
}

const RECONNECT_FIRST_MS = 1000;
const RECONNECT_MAX_MS = 10000;
// Refusals that asking again will not change: a live view stops and shows them.
const FINAL_CODES = new Set(["unauthenticated", "permission_denied", "invalid_argument", "not_found"]);

// liveStream(method, requestFor, onMessage, {onStatus, finished}) -> {cancel()}: keeps a server stream
// open across control-plane restarts and network errors. When the stream breaks, or ends while
// finished() is false, onStatus({live: false, error, final: false, retryInMs}) is told and the stream
// opens again after a delay (1 s, doubling up to 10 s; back to 1 s once a message arrives), with the
// request requestFor() gives then, so a view resumes where it was. The first message of each stream
// calls onStatus({live: true, reopened}). A refusal (FINAL_CODES) ends it for good, and so does a
// normal end once finished() is true: onStatus({live: false, error, final: true}), error null for the
// latter. cancel() ends it silently.
export function liveStream(method, requestFor, onMessage, { onStatus = () => {}, finished = () => false } = {}) {
  let cancelled = false;
  let current = null;
  let timer = null;
  let delay = RECONNECT_FIRST_MS;
  let opened = 0;
  const open = () => {
    let first = true;
    opened += 1;
    current = stream(method, requestFor(), (message) => {
      if (first) {
        first = false;
        delay = RECONNECT_FIRST_MS;
        onStatus({ live: true, reopened: opened > 1 });
      }
      onMessage(message);
    });
    current.done
      .then(
        () => null,
        (error) => error,
      )
      .then((error) => {
        if (cancelled) return;
        if (!error && finished()) {
          onStatus({ live: false, error: null, final: true, retryInMs: null });
          return;
        }
        const final = Boolean(error && FINAL_CODES.has(error.code));
        onStatus({ live: false, error: error || new Error("the stream ended"), final, retryInMs: final ? null : delay });
        if (final) return;
        timer = setTimeout(open, delay);
        delay = Math.min(delay * 2, RECONNECT_MAX_MS);
      });
  };
  open();
  return {
    cancel: () => {
      cancelled = true;
      clearTimeout(timer);
      if (current) current.cancel();
    },
  };
}

export async function info() {
  const response = await fetch("/console/info.json", { credentials: "same-origin" });
  if (!response.ok) throw new RpcError(`http_${response.status}`, response.statusText);
  return response.json();
}
