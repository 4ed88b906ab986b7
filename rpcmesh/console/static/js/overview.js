// Overview: control-plane health, its backends, counts, and recent problems (critical instances,
// dead letters per group, sagas stuck or failed).
import * as api from "./api.js";
import { badge, clear, enumName, errorBox, h, link, section, time } from "./dom.js";

const STUCK_AFTER_MS = 60_000;

function card(label, value, extra) {
  return h("div", { class: "card" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value), extra || "");
}

async function allPages(method, request, field) {
  const items = [];
  let pageToken = "";
  for (let page = 0; page < 20; page += 1) {
    const response = await api.call(method, { ...request, pageToken });
    items.push(...(response[field] || []));
    pageToken = response.nextPageToken || "";
    if (!pageToken) break;
  }
  return items;
}

async function load(main, isLive) {
  // A part the caller may not read (e.g. no ListServices grant) leaves the others shown.
  const failures = [];
  const part = (what, promise, fallback) =>
    promise.catch((error) => {
      failures.push(`${what}: ${error.message || error}`);
      return fallback;
    });
  const [info, healthCheck, services, topics, sagas] = await Promise.all([
    api.info().catch((e) => ({ error: e })),
    api.call("grpc.health.v1.Health/Check", {}).catch((e) => ({ error: e })),
    part("services", allPages("Registry/ListServices", { pageSize: 1000 }, "services"), []),
    part("topics", allPages("Bus/ListTopics", { pageSize: 1000 }, "topics"), []),
    part(
      "sagas",
      api.call("SagaCoordinator/ListSagas", {
        states: ["SAGA_STATE_RUNNING", "SAGA_STATE_COMPENSATING", "SAGA_STATE_ABORTING", "SAGA_STATE_FAILED_COMPENSATION"],
        pageSize: 200,
      }),
      {},
    ),
  ]);
  if (!isLive()) return;
  const instances = services.reduce((n, s) => n + (s.instanceCount || 0), 0);
  const passing = services.reduce((n, s) => n + (s.passingCount || 0), 0);
  const deadLetters = [];
  for (const topic of topics) {
    for (const group of topic.groups || []) {
      if (Number(group.deadLetters || 0) > 0) deadLetters.push({ topic: topic.name, group: group.name, count: Number(group.deadLetters) });
    }
  }
  const unsettled = sagas.sagas || [];
  const failed = unsettled.filter((s) => s.state === "SAGA_STATE_FAILED_COMPENSATION");
  const now = Date.now();
  const stuck = unsettled.filter(
    (s) => s.state !== "SAGA_STATE_FAILED_COMPENSATION" && now - new Date(s.updatedAt || s.startedAt).getTime() > STUCK_AFTER_MS,
  );
  const unhealthy = services.filter((s) => (s.passingCount || 0) < (s.instanceCount || 0));
  const critical = [];
  for (const service of unhealthy) {
    const resolved = await part(
      `instances of ${service.name}`,
      api.call("Registry/Resolve", { service: service.name, includeUnhealthy: true }),
      {},
    );
    for (const instance of resolved.instances || []) {
      if (instance.health === "HEALTH_STATE_CRITICAL") critical.push(instance);
    }
  }
  if (!isLive()) return;

  const serving = healthCheck.error ? "UNREACHABLE" : enumName(healthCheck.status, "") || "UNKNOWN";
  const problems = [
    ...critical.map((i) =>
      h("li", {}, badge("CRITICAL", "critical"), " instance ", link(`#/services/${encodeURIComponent(i.service)}`, i.service), ` ${i.instanceId} at ${i.address}`),
    ),
    ...deadLetters.map((d) =>
      h("li", {}, badge("DEAD LETTERS", "failed"), ` ${d.count} in group ${d.group} of `, link(`#/bus/${encodeURIComponent(d.topic)}`, d.topic)),
    ),
    ...failed.map((s) =>
      h("li", {}, badge("FAILED_COMPENSATION", "failed"), " saga ", link(`#/sagas/${s.sagaId}`, s.sagaId), ` (${s.definitionName}): ${s.error || ""}`),
    ),
    ...stuck.map((s) =>
      h("li", {}, badge(enumName(s.state, "SAGA_STATE_"), "running"), " saga ", link(`#/sagas/${s.sagaId}`, s.sagaId), ` (${s.definitionName}) unchanged since ${time(s.updatedAt)}`),
    ),
  ];
  clear(main).append(
    h("h1", {}, "Overview"),
    ...failures.map((failure) => errorBox(failure)),
    h(
      "div",
      { class: "cards" },
      card("Control plane", badge(serving, serving === "SERVING" ? "serving" : "critical")),
      card("Store", info.store || "?"),
      card("Bus backend", info.bus || "?"),
      card("Authentication", info.auth || "?"),
      card("Services", String(services.length)),
      card("Instances", `${passing} / ${instances}`, h("div", { class: "muted" }, "passing / registered")),
      card("Topics", String(topics.filter((t) => !String(t.name).startsWith("$")).length)),
      card("Unsettled sagas", String(unsettled.length)),
    ),
    h(
      "dl",
      { class: "facts" },
      h("dt", {}, "Version"), h("dd", {}, info.version || ""),
      h("dt", {}, "Node"), h("dd", {}, info.node_id || ""),
      h("dt", {}, "gRPC address"), h("dd", {}, info.grpc_address || ""),
    ),
    section(
      "Recent problems",
      problems.length ? h("ul", { class: "problems", id: "problems" }, problems) : h("p", { class: "notice", id: "problems" }, "No problem: every instance passes, no dead letter, no stuck saga."),
    ),
    h("p", { class: "muted" }, `Refreshed ${new Date().toLocaleTimeString()} (every 5 s).`),
  );
}

export function render(main) {
  let live = true;
  let timer = null;
  const isLive = () => live;
  const tick = () =>
    load(main, isLive)
      .catch((error) => {
        if (live) clear(main).append(h("h1", {}, "Overview"), errorBox(error));
      })
      .finally(() => {
        if (live) timer = setTimeout(tick, 5000);
      });
  tick();
  return () => {
    live = false;
    clearTimeout(timer);
  };
}
