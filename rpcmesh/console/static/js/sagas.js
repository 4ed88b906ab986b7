// Sagas: a list filterable by state and definition; a saga's page draws its timeline (each step's
// execution and compensation as bars on a time axis), live from SagaCoordinator/WatchSaga, with the
// operator actions abort, retry compensation and resolve.
import * as api from "./api.js";
import { badge, clear, enumName, errorBox, formatSeconds, h, link, section, svg, table, time } from "./dom.js";

const STATES = [
  "RUNNING",
  "COMPLETED",
  "COMPENSATING",
  "COMPENSATED",
  "FAILED_COMPENSATION",
  "ABORTING",
  "ABORTED",
  "RESOLVED_MANUALLY",
];
const TERMINAL = new Set(["COMPLETED", "COMPENSATED", "FAILED_COMPENSATION", "ABORTED", "RESOLVED_MANUALLY"]);

function sagaState(saga) {
  return enumName(saga.state, "SAGA_STATE_");
}

function renderList(main, filters, isLive) {
  const stateSelect = h("select", { id: "state-filter", "aria-label": "state" }, h("option", { value: "" }, "any state"), STATES.map((s) => h("option", { value: s }, s)));
  stateSelect.value = filters.state || "";
  const definition = h("input", { id: "definition-filter", type: "text", placeholder: "definition name", value: filters.definition || "" });
  const body = h("div", {});
  let pageToken = "";
  const more = h("button", { type: "button", id: "more" }, "More");
  const load = async (append) => {
    const request = { pageSize: 50, pageToken: append ? pageToken : "" };
    if (stateSelect.value) request.states = [`SAGA_STATE_${stateSelect.value}`];
    if (definition.value.trim()) request.definitionName = definition.value.trim();
    try {
      const response = await api.call("SagaCoordinator/ListSagas", request);
      if (!isLive()) return;
      pageToken = response.nextPageToken || "";
      more.disabled = !pageToken;
      const rows = (response.sagas || []).map((s) =>
        h(
          "tr",
          { "data-saga": s.sagaId },
          h("td", {}, link(`#/sagas/${encodeURIComponent(s.sagaId)}`, s.sagaId)),
          h("td", {}, `${s.definitionName} v${s.definitionVersion || ""}`),
          h("td", {}, badge(sagaState(s))),
          h("td", {}, time(s.startedAt)),
          h("td", {}, time(s.updatedAt)),
          h("td", {}, s.idempotencyKey || ""),
          h("td", {}, s.error || ""),
        ),
      );
      const tbody = body.querySelector("tbody");
      if (append && tbody) tbody.append(...rows);
      else
        clear(body).append(
          rows.length
            ? table(["Saga", "Definition", "State", "Started", "Updated", "Idempotency key", "Error"], rows, { id: "sagas" })
            : h("p", {}, "No saga matches."),
        );
    } catch (error) {
      clear(body).append(errorBox(error));
    }
  };
  more.addEventListener("click", () => load(true));
  stateSelect.addEventListener("change", () => load(false));
  definition.addEventListener("change", () => load(false));
  main.append(
    h("h1", {}, "Sagas"),
    h("div", { class: "toolbar" }, stateSelect, definition, h("button", { type: "button", onclick: () => load(false) }, "Refresh")),
    body,
    h("div", { class: "toolbar" }, more),
  );
  load(false);
}

// Bars from the transitions: one per step execution and one per compensation.
function bars(saga, transitions, now) {
  const ms = (t) => new Date(t).getTime();
  const execs = new Map();
  const comps = new Map();
  const barFor = (map, step, phase) => {
    if (!map.has(step)) map.set(step, { step, phase, start: null, end: null, failed: false, attemptFailures: [], errors: [] });
    return map.get(step);
  };
  for (const t of transitions) {
    if (!t.step) continue;
    const at = ms(t.time);
    const compensation = t.kind.startsWith("compensation");
    const bar = barFor(compensation ? comps : execs, t.step, compensation ? "compensate" : "execute");
    if (t.kind.endsWith("_started")) {
      // Started again after it had ended (an operator's retry of a failed compensation): running again.
      bar.start = bar.start === null ? at : Math.min(bar.start, at);
      bar.end = null;
      bar.failed = false;
    } else if (t.kind.endsWith("_succeeded")) {
      bar.end = at;
      bar.failed = false;
    }
    else if (t.kind.endsWith("attempt_failed")) {
      bar.attemptFailures.push(at);
      if (t.detail) bar.errors.push(t.detail);
    } else if (t.kind.endsWith("_failed")) {
      bar.end = at;
      bar.failed = true;
      if (t.detail) bar.errors.push(t.detail);
    }
  }
  const steps = saga.steps || [];
  for (const s of steps) {
    // A step without transitions (e.g. the watch started late) falls back on the step's own times.
    if (!execs.has(s.name) && s.startedAt) {
      const bar = barFor(execs, s.name, "execute");
      bar.start = ms(s.startedAt);
      bar.end = s.endedAt ? ms(s.endedAt) : null;
      bar.failed = enumName(s.state, "STEP_STATE_") === "FAILED";
    }
  }
  const byName = new Map(steps.map((s) => [s.name, s]));
  const order = (a, b) => (a.start ?? now) - (b.start ?? now);
  const result = [...[...execs.values()].sort(order), ...[...comps.values()].sort(order)];
  for (const bar of result) {
    if (bar.start === null) bar.start = bar.end ?? now;
    bar.running = bar.end === null;
    if (bar.running) bar.end = now;
    const step = byName.get(bar.step) || {};
    bar.attempts = bar.phase === "execute" ? step.attempts || 0 : step.compensationAttempts || 0;
  }
  return result;
}

function timeline(saga, transitions, live) {
  const now = Date.now();
  const rows = bars(saga, transitions, now);
  const times = rows.flatMap((r) => [r.start, r.end]);
  if (saga.startedAt) times.push(new Date(saga.startedAt).getTime());
  if (!times.length) return h("p", { class: "muted" }, "No step has started yet.");
  const t0 = Math.min(...times);
  const t1 = Math.max(...times, saga.endedAt ? new Date(saga.endedAt).getTime() : t0, live ? now : t0);
  const span = Math.max(t1 - t0, 1);
  const labelWidth = 190;
  const width = 960;
  const plot = width - labelWidth - 110;
  const rowHeight = 30;
  const top = 24;
  const height = top + rows.length * rowHeight + 8;
  const x = (t) => labelWidth + ((t - t0) / span) * plot;
  const ticks = [];
  for (let i = 0; i <= 5; i += 1) {
    const t = t0 + (span * i) / 5;
    ticks.push(
      svg("g", { class: "axis" }, svg("line", { x1: x(t), x2: x(t), y1: top - 6, y2: height }), svg("text", { x: x(t) + 2, y: 12 }, `+${formatSeconds((t - t0) / 1000)}`)),
    );
  }
  const drawn = rows.map((r, i) => {
    const y = top + i * rowHeight;
    const duration = (r.end - r.start) / 1000;
    const classes = [r.phase, r.failed ? "failed" : "", r.running ? "running" : ""].filter(Boolean).join(" ");
    const tip = [
      `${r.step} (${r.phase}) ${r.running ? "running" : r.failed ? "failed" : "done"} in ${formatSeconds(duration)}`,
      `attempts: ${r.attempts}`,
      `idempotency key: ${saga.sagaId}/${r.step}/${r.phase}`,
      ...r.errors.map((e) => `error: ${e}`),
    ].join("\n");
    return svg(
      "g",
      { class: "bar", "data-step": r.step, "data-phase": r.phase, "data-start": r.start, "data-failed": r.failed ? "true" : "false" },
      svg("text", { x: 4, y: y + 17 }, `${r.step} · ${r.phase}`),
      svg("rect", { class: classes, x: x(r.start), y: y + 4, width: Math.max(x(r.end) - x(r.start), 3), height: rowHeight - 10, rx: 3 }, svg("title", {}, tip)),
      r.attemptFailures.map((t) => svg("circle", { class: "attempt-failed", cx: x(t), cy: y + rowHeight / 2 - 1, r: 3 }, svg("title", {}, "attempt failed"))),
      svg("text", { x: x(r.end) + 6, y: y + 17 }, `${formatSeconds(duration)} · ${r.attempts} att.`),
    );
  });
  return h(
    "div",
    { class: "timeline", id: "timeline" },
    svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "saga timeline" }, ticks, drawn),
    h(
      "div",
      { class: "legend" },
      h("span", {}, h("span", { class: "swatch execute" }), "execution"),
      h("span", {}, h("span", { class: "swatch compensate" }), "compensation"),
      h("span", {}, h("span", { class: "swatch failed" }), "failed"),
      h("span", { class: "muted" }, "dots: failed attempts; hover a bar for details"),
    ),
  );
}

function stepsTable(saga) {
  const rows = (saga.steps || []).map((s) => {
    const started = s.startedAt ? new Date(s.startedAt).getTime() : null;
    const ended = s.endedAt ? new Date(s.endedAt).getTime() : null;
    return h(
      "tr",
      { "data-step": s.name },
      h("td", {}, s.name),
      h("td", {}, badge(enumName(s.state, "STEP_STATE_"))),
      h("td", { class: "num" }, s.attempts || 0),
      h("td", { class: "num" }, s.compensationAttempts || 0),
      h("td", {}, time(s.startedAt)),
      h("td", { class: "num" }, started && ended ? formatSeconds((ended - started) / 1000) : ""),
      h("td", {}, s.error || ""),
      h(
        "td",
        { class: "muted" },
        h("div", {}, `${saga.sagaId}/${s.name}/execute`),
        s.compensationAttempts ? h("div", {}, `${saga.sagaId}/${s.name}/compensate`) : null,
      ),
    );
  });
  return table(["Step", "State", "Attempts", "Comp. attempts", "Started", "Duration", "Last error", "Idempotency key"], rows, { id: "steps" });
}

function renderSaga(main, sagaId, isLive) {
  let saga = null;
  let transitions = [];
  let watch = null;
  let live = false;
  const notice = h("div", { id: "saga-notice" });
  const body = h("div", {});
  main.append(h("h1", {}, h("a", { href: "#/sagas" }, "Sagas"), " / ", sagaId), notice, body);
  const reason = h("input", { type: "text", id: "action-reason", placeholder: "reason", size: 40 });
  const act = async (method, label) => {
    if (method === "SagaCoordinator/ResolveSaga" && !reason.value.trim()) {
      notice.replaceChildren(errorBox("A reason is required to resolve a saga."));
      return;
    }
    try {
      await api.call(method, { sagaId, reason: reason.value.trim() });
      notice.replaceChildren(h("div", { class: "notice" }, `${label}: done.`));
      start();
    } catch (error) {
      notice.replaceChildren(errorBox(error));
    }
  };
  const draw = () => {
    if (!isLive() || !saga) return;
    const state = sagaState(saga);
    const actions = [];
    if (state === "RUNNING") actions.push(h("button", { type: "button", id: "abort", class: "danger", onclick: () => act("SagaCoordinator/AbortSaga", "Abort") }, "Abort"));
    if (state === "FAILED_COMPENSATION") {
      actions.push(h("button", { type: "button", id: "retry-compensation", onclick: () => act("SagaCoordinator/RetryCompensation", "Retry compensation") }, "Retry compensation"));
      actions.push(h("button", { type: "button", id: "resolve", class: "danger", onclick: () => act("SagaCoordinator/ResolveSaga", "Resolve") }, "Resolve"));
    }
    const labels = Object.entries(saga.labels || {}).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`));
    const parts = [
      h(
        "dl",
        { class: "facts" },
        h("dt", {}, "State"), h("dd", { id: "saga-state" }, badge(state), live ? " (live)" : ""),
        h("dt", {}, "Definition"), h("dd", {}, `${saga.definitionName} v${saga.definitionVersion || ""}`),
        h("dt", {}, "Idempotency key"), h("dd", {}, saga.idempotencyKey || ""),
        h("dt", {}, "Correlation id"), h("dd", {}, saga.correlationId || ""),
        h("dt", {}, "Started / ended"), h("dd", {}, `${time(saga.startedAt)} / ${time(saga.endedAt) || "—"}`),
        h("dt", {}, "Error"), h("dd", { id: "saga-error" }, saga.error || ""),
        labels.length ? [h("dt", {}, "Labels"), h("dd", {}, labels)] : null,
      ),
      actions.length ? h("div", { class: "toolbar" }, reason, actions) : null,
      section("Timeline", timeline(saga, transitions, live)),
      section("Steps", stepsTable(saga)),
      (saga.operatorActions || []).length
        ? section(
            "Operator actions",
            table(
              ["Time", "Action", "Identity", "Step", "Reason"],
              saga.operatorActions.map((a) => h("tr", {}, h("td", {}, time(a.time)), h("td", {}, a.kind), h("td", {}, a.identity || ""), h("td", {}, a.step || ""), h("td", {}, a.reason || ""))),
            ),
          )
        : null,
      section(
        "Transitions",
        table(
          ["Time", "Kind", "Step", "State", "Detail"],
          transitions.map((t) => h("tr", { "data-kind": t.kind }, h("td", {}, time(t.time)), h("td", {}, t.kind), h("td", {}, t.step || ""), h("td", {}, enumName(t.state, "SAGA_STATE_")), h("td", {}, t.detail || ""))),
          { id: "transitions" },
        ),
      ),
    ];
    clear(body).append(...parts.filter(Boolean));
  };
  let ticker = null;
  // Follows the saga with WatchSaga (every transition from the start, then live ones) until it ends;
  // the watch reopens after a control-plane restart or a network error and replays the transitions.
  function start() {
    if (watch) watch.cancel();
    transitions = [];
    live = true;
    watch = api.liveStream(
      "SagaCoordinator/WatchSaga",
      () => ({ sagaId }),
      (response) => {
        if (response.transition) transitions.push(response.transition);
        if (response.saga) saga = response.saga;
        draw();
      },
      {
        finished: () => Boolean(saga && TERMINAL.has(sagaState(saga))),
        onStatus: (state) => {
          if (!isLive()) return;
          if (state.live) {
            if (state.reopened) {
              transitions = []; // the reopened watch replays them
              notice.replaceChildren();
            }
            live = true;
            return;
          }
          live = false;
          draw();
          if (state.error) {
            const retrying = state.final ? [] : [h("p", { class: "muted" }, "Reconnecting…")];
            notice.replaceChildren(errorBox(state.error), ...retrying);
          }
        },
      },
    );
  }
  start();
  ticker = setInterval(() => live && draw(), 1000);
  return () => {
    clearInterval(ticker);
    if (watch) watch.cancel();
  };
}

export function render(main, arg) {
  let active = true;
  const isLive = () => active;
  const cleanup = arg ? renderSaga(main, arg, isLive) : renderList(main, {}, isLive);
  return () => {
    active = false;
    if (cleanup) cleanup();
  };
}
