// Overview: control-plane health, its backends, counts, and recent problems (critical instances,
// dead letters per group, sagas stuck or failed).
import * as api from "./api.js";
import { badge, clear, enumName, errorBox, h, link, section, time } from "./dom.js";

const STUCK_AFTER_MS = 60_000;
// Unsettled sagas are read page by page, up to this many of each kind (failed, in flight): past
// that the overview says it looked at the newest ones only (the Sagas page lists them all).
const SAGA_PAGE_SIZE = 1000;
const MAX_SAGAS = 5000;
const IN_FLIGHT = ["SAGA_STATE_RUNNING", "SAGA_STATE_COMPENSATING", "SAGA_STATE_ABORTING"];

function card(label, value, extra) {
  return h("div", { class: "card" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value), extra || "");
}

// Pages of a List call until the last one or until at least maxItems were read;
// more: whether the listing went on past them.
async function pages(method, request, field, maxItems) {
  const items = [];
  let pageToken = "";
  do {
    const response = await api.call(method, { ...request, pageToken });
    items.push(...(response[field] || []));
    pageToken = response.nextPageToken || "";
  } while (pageToken && items.length < maxItems);
  return { items, more: Boolean(pageToken) };
}

async function allPages(method, request, field) {
  return (await pages(method, request, field, 20 * request.pageSize)).items;
}

// Failed and in-flight sagas are read apart, so that many in-flight ones cannot hide a failed one.
const sagaPages = (states) => pages("SagaCoordinator/ListSagas", { states, pageSize: SAGA_PAGE_SIZE }, "sagas", MAX_SAGAS);

async function load(main, isLive) {
  // A part the caller may not read (e.g. no ListServices grant) leaves the others shown.
  const failures = [];
  const part = (what, promise, fallback) =>
    promise.catch((error) => {
      failures.push(`${what}: ${error.message || error}`);
      return fallback;
    });
  const none = { items: [], more: false };
  const [info, healthCheck, services, topics, [failedSagas, inFlight]] = await Promise.all([
    api.info().catch((e) => ({ error: e })),
    api.call("grpc.health.v1.Health/Check", {}).catch((e) => ({ error: e })),
    part("services", allPages("Registry/ListServices", { pageSize: 1000 }, "services"), []),
    part("topics", allPages("Bus/ListTopics", { pageSize: 1000 }, "topics"), []),
    part("sagas", Promise.all([sagaPages(["SAGA_STATE_FAILED_COMPENSATION"]), sagaPages(IN_FLIGHT)]), [none, none]),
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
  // A saga may change state between the two reads: count it once, as failed.
  const failed = failedSagas.items;
  const failedIds = new Set(failed.map((s) => s.sagaId));
  const running = inFlight.items.filter((s) => !failedIds.has(s.sagaId) && s.state !== "SAGA_STATE_FAILED_COMPENSATION");
  const unsettledCount = failed.length + running.length;
  const now = Date.now();
  const stuck = running.filter((s) => now - new Date(s.updatedAt || s.startedAt).getTime() > STUCK_AFTER_MS);
  const truncated = [];
  if (failedSagas.more) truncated.push(`${failed.length} FAILED_COMPENSATION`);
  if (inFlight.more) truncated.push(`${running.length} running, compensating or aborting`);
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
      card("Unsettled sagas", `${unsettledCount}${truncated.length ? "+" : ""}`),
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
      truncated.length
        ? h(
            "p",
            { class: "error", id: "sagas-truncated" },
            `Too many unsettled sagas to check them all: only the newest ${truncated.join(" and the newest ")} sagas were read, `,
            "so older ones, the likeliest to be stuck, may be missing below; the ",
            link("#/sagas", "Sagas"),
            " page lists every one.",
          )
        : null,
      problems.length
        ? h("ul", { class: "problems", id: "problems" }, problems)
        : h(
            "p",
            { class: "notice", id: "problems" },
            truncated.length ? "No problem among the instances, dead letters and sagas read." : "No problem: every instance passes, no dead letter, no stuck saga.",
          ),
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
