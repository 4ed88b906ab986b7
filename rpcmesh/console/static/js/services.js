// Services: every service with its instances by health, live from Registry/Watch; a service's page
// lists its instances (address, zone, version, tags, health and its changes, lease TTL).
import * as api from "./api.js";
import { badge, clear, enumName, h, link, seconds, formatSeconds, section, table, time } from "./dom.js";

function health(instance) {
  return enumName(instance.health, "HEALTH_STATE_") || "UNSPECIFIED";
}

// Keeps the instances a Registry/Watch stream describes; calls onChange after each response. The watch
// reopens after a control-plane restart or a network error (api.liveStream; each reopening starts with
// a fresh snapshot); onStatus hears when it is down and why.
function watchInstances(service, onChange, onStatus) {
  const instances = new Map();
  const history = new Map(); // service/instance_id -> [{at, health}] seen since the page opened
  const removed = [];
  const apply = (response) => {
    if (response.snapshot) instances.clear();
    for (const event of response.events || []) {
      const instance = event.instance || {};
      const key = `${instance.service}/${instance.instanceId}`;
      if (event.type === "WATCH_EVENT_TYPE_DELETE") {
        instances.delete(key);
        removed.unshift({ instance, reason: event.reason || "", at: new Date() });
      } else {
        const before = instances.get(key);
        instances.set(key, instance);
        const seen = history.get(key) || [];
        if (!before || health(before) !== health(instance)) seen.push({ at: new Date(), health: health(instance) });
        history.set(key, seen);
      }
    }
    onChange(instances, history, removed);
  };
  return api.liveStream("Registry/Watch", () => ({ service }), apply, { onStatus });
}

function showDown(status, state) {
  if (state.live || !state.error) return;
  status.className = "error";
  const error = state.error;
  status.textContent = `${error && error.message ? error.message : error}${state.final ? "" : "; reconnecting…"}`;
}

function showLive(status, count) {
  status.className = "muted";
  status.textContent = `Live: ${count} instances. Updated ${new Date().toLocaleTimeString()}.`;
}

function renderList(main) {
  const status = h("p", { class: "muted", id: "watch-status" }, "Watching the registry…");
  const body = h("div", {});
  main.append(h("h1", {}, "Services"), status, body);
  const watch = watchInstances(
    "",
    (instances) => {
      showLive(status, instances.size);
      const byService = new Map();
      for (const instance of instances.values()) {
        const list = byService.get(instance.service) || [];
        list.push(instance);
        byService.set(instance.service, list);
      }
      const rows = [...byService.keys()].sort().map((name) => {
        const list = byService.get(name);
        const passing = list.filter((i) => health(i) === "PASSING").length;
        const critical = list.filter((i) => health(i) === "CRITICAL").length;
        return h(
          "tr",
          { "data-service": name },
          h("td", {}, link(`#/services/${encodeURIComponent(name)}`, name)),
          h("td", { class: "num" }, list.length),
          h("td", { class: "num" }, badge(String(passing), passing ? "passing" : "muted")),
          h("td", { class: "num" }, badge(String(critical), critical ? "critical" : "muted")),
          h("td", {}, [...new Set(list.map((i) => i.version).filter(Boolean))].join(", ")),
        );
      });
      clear(body).append(
        rows.length
          ? table(["Service", "Instances", "Passing", "Critical", "Versions"], rows, { id: "services" })
          : h("p", {}, "No service is registered."),
      );
    },
    (state) => showDown(status, state),
  );
  return () => watch.cancel();
}

function renderService(main, name) {
  const status = h("p", { class: "muted", id: "watch-status" }, "Watching the registry…");
  const body = h("div", {});
  const gone = h("div", {});
  main.append(h("h1", {}, h("a", { href: "#/services" }, "Services"), " / ", name), status, body, gone);
  const watch = watchInstances(
    name,
    (instances, history, removed) => {
      showLive(status, instances.size);
      const rows = [...instances.values()]
        .sort((a, b) => String(a.instanceId).localeCompare(String(b.instanceId)))
        .map((i) => {
          const state = health(i);
          const seen = history.get(`${i.service}/${i.instanceId}`) || [];
          return h(
            "tr",
            { "data-instance": i.instanceId, class: state.toLowerCase() },
            h("td", {}, i.instanceId),
            h("td", {}, i.address),
            h("td", {}, i.zone || ""),
            h("td", {}, i.version || ""),
            h("td", {}, (i.tags || []).map((tag) => h("span", { class: "tag" }, tag))),
            h("td", {}, badge(state), " ", enumName(i.reportedStatus, "SERVING_STATUS_")),
            h(
              "td",
              { class: "history" },
              seen.map((s) => h("div", {}, `${s.at.toLocaleTimeString()} ${s.health}`)),
            ),
            h("td", { class: "num" }, i.ttl ? formatSeconds(seconds(i.ttl)) : ""),
            h("td", {}, time(i.registeredAt)),
            h("td", {}, i.owner || ""),
          );
        });
      clear(body).append(
        rows.length
          ? table(
              [
                "Instance",
                "Address",
                "Zone",
                "Version",
                "Tags",
                "Health",
                "Health changes (this page)",
                "Lease TTL",
                "Registered",
                "Owner",
              ],
              rows,
              { id: "instances" },
            )
          : h("p", {}, `No instance of ${name} is registered.`),
      );
      clear(gone);
      if (removed.length) {
        gone.append(
          section(
            "Removed while watching",
            h(
              "ul",
              { id: "removed" },
              removed.map((r) =>
                h("li", {}, `${r.at.toLocaleTimeString()} ${r.instance.instanceId} (${r.instance.address}): ${r.reason}`),
              ),
            ),
          ),
        );
      }
    },
    (state) => showDown(status, state),
  );
  return () => watch.cancel();
}

export function render(main, arg) {
  return arg ? renderService(main, arg) : renderList(main);
}
